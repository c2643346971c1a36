"""structlog set-up: JSON lines for machines (journald), readable lines on a terminal.

The CLI logs to stderr so that stdout carries only its JSON answer; the
daemon logs to stdout, which systemd hands to the journal.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

# Keys whose values must never be printed, whatever an event carries.
_SECRET_KEYS = frozenset({"key", "key_material", "secret", "secret_key", "password", "token", "aws_secret_access_key"})


def _redact(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
    for name in list(event):
        if name.lower() in _SECRET_KEYS:
            event[name] = "<redacted>"
    return event


def configure_logging(*, stream: TextIO = sys.stderr, level: int = logging.WARNING, json: bool | None = None) -> None:
    if json is None:
        json = not stream.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
