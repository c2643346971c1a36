"""Helpers for the VM tests: running commands and recording libzfs_core outcomes comparably."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from functools import cache
from typing import Any


def sh(*args: str, check: bool = True) -> str:
    """Run a command, return its stdout; raise with stderr when it fails and ``check``."""
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@cache
def openzfs_version() -> tuple[int, int]:
    """(major, minor) of the loaded kernel module, e.g. (2, 1) for zfs-kmod-2.1.11."""
    match = re.search(r"zfs-kmod-(\d+)\.(\d+)", sh("zfs", "version"))
    assert match, "cannot tell the OpenZFS version from `zfs version`"
    return int(match.group(1)), int(match.group(2))


def zfs_get(prop: str, name: str | bytes) -> tuple[str, str]:
    """(value, source) of one property."""
    target = name.decode() if isinstance(name, bytes) else name
    value, source = sh("zfs", "get", "-Hp", "-o", "value,source", prop, target).rstrip("\n").split("\t")
    return value, source


def describe(err: BaseException) -> tuple[Any, ...]:
    """An exception as comparable data: class name, errno, name, and the per-item errors of compound ones."""
    items = getattr(err, "errors", None)
    return (
        type(err).__name__,
        getattr(err, "errno", None),
        getattr(err, "name", None),
        None if items is None else [describe(e) for e in items],
        getattr(err, "suppressed_count", None),
    )


class Recorder:
    """Runs steps of a scenario and logs each outcome; ``root`` is replaced by ROOT so two runs compare."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.log: list[tuple[str, str, Any]] = []

    def __call__(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # both implementations' classes, compared by name
            self.log.append((label, "raise", self.norm(describe(err))))
            return err
        self.log.append((label, "ok", self.norm(result)))
        return result

    def norm(self, value: Any) -> Any:
        if isinstance(value, bytes):
            return value.replace(self.root, b"ROOT")
        if isinstance(value, str):
            return value.replace(self.root.decode(), "ROOT")
        if isinstance(value, dict):
            return {self.norm(k): self.norm(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.norm(v) for v in value)
        return value

    def outcome(self, label: str) -> tuple[str, Any]:
        matches = [(kind, value) for step, kind, value in self.log if step == label]
        assert len(matches) == 1, f"step {label!r} ran {len(matches)} times"
        return matches[0]
