"""structlog set-up: JSON lines for machines (journald), readable lines on a terminal.

The CLI logs to stderr so that stdout carries only its JSON answer; the
daemon logs to stdout, which systemd hands to the journal.

Under systemd (the stream is the one ``$JOURNAL_STREAM`` names) each JSON
line starts with its syslog priority, ``<3>`` error, ``<4>`` warning, ``<6>``
info, ``<7>`` debug: journald's stream reader strips it and files the line at
that priority (``SyslogLevelPrefix=`` is on by default), so
``journalctl -u zfsbackd -p warning`` shows failures while the message stays
one JSON object. The timestamp is left out there: the journal stamps every
line itself (``journalctl -o json`` has it, to the microsecond).
"""

from __future__ import annotations

import logging
import os
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


#: syslog priorities (sd-daemon(3)) of structlog's level names
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def under_journal(stream: TextIO) -> bool:
    """True if ``stream`` is connected to journald: ``$JOURNAL_STREAM`` is its ``device:inode``.

    Compared with the stream itself, not just present: a process started from
    a unit's shell with its output redirected to a file inherits the variable
    but does not write to the journal (see systemd.exec(5)).
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no such variable, a malformed one, or no file behind the stream
        return False


def _priority_prefix(_logger: object, method: str, line: str) -> str:
    """``<N>`` in front of the rendered line: journald's SyslogLevelPrefix= files it at that priority."""
    return f"<{_PRIORITY.get(method, 6)}>{line}"


def configure_logging(*, stream: TextIO = sys.stderr, level: int = logging.WARNING, json: bool | None = None) -> None:
    journal = under_journal(stream)
    if json is None:
        json = journal or not stream.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not journal:  # the journal stamps each line; a second timestamp would only disagree with it
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [_redact, structlog.processors.format_exc_info]
    if json:
        processors.append(structlog.processors.JSONRenderer())
        if journal:
            processors.append(_priority_prefix)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
