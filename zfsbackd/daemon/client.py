"""The CLI's side of the control socket.

Whatever the daemon does — answers, refuses, hangs, hangs up, or answers
something that is not a reply — the CLI ends with a classified error, never a
traceback: the daemon's own errors keep their code and exit code, and a daemon
that does not answer properly is ``DaemonUnresponsive``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from zfsbackd import errors

#: long enough for CreateBackup, which answers once the backup's record exists (jobs.START_TIMEOUT)
DEFAULT_TIMEOUT = 300.0
#: how long to keep trying while the daemon's queue of connections waiting to be accepted is full
CONNECT_TIMEOUT = 10.0

_ERRORS: dict[str, type[errors.ZfsbackdError]] = {
    cls.code: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ZfsbackdError)
}


class DaemonUnavailable(Exception):
    """No daemon listens on the socket: the CLI then works in-process."""


class RemoteError(errors.ZfsbackdError):
    """An error the daemon reported, re-raised with its code and exit code."""


def _remote_error(code: str, message: str) -> errors.ZfsbackdError:
    cls = _ERRORS.get(code)
    if cls is not None and cls is not errors.ConfigError:
        return cls(message)
    err = RemoteError(message)
    err.code = code
    err.exit_code = errors.EXIT_BAD_REQUEST if code == "AccessDenied" else errors.EXIT_INTERNAL
    return err


class DaemonClient:
    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = self._connect(path, timeout)
        self._file = self._sock.makefile("rwb")

    @staticmethod
    def _connect(path: Path, timeout: float) -> socket.socket:
        """Connect, telling "no daemon" (work in-process) from "a daemon, but busy" (an error).

        A Unix socket whose accept queue is full refuses with EAGAIN: the daemon
        is there, so falling back to in-process work would be wrong; retry a
        little, then report DaemonBusy.
        """
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise errors.DaemonBusy(
                        f"the daemon on {path} accepts no more connections (its queue stayed full for "
                        f"{CONNECT_TIMEOUT:.0f} s); try again later"
                    ) from None
                time.sleep(0.05)
            except PermissionError:
                sock.close()
                raise _remote_error(
                    "AccessDenied",
                    f"permission denied on the control socket {path}: run as root or as a member of the "
                    "group configured in daemon.control_group",
                ) from None
            except OSError as exc:  # missing, refused, not a socket, a path no socket can have: no daemon there
                sock.close()
                raise DaemonUnavailable(str(exc)) from None

    def _unresponsive(self, what: str) -> errors.DaemonUnresponsive:
        return errors.DaemonUnresponsive(
            f"the daemon on {self.path} {what}; check it with `systemctl status zfsbackd` and its journal "
            "(`journalctl -u zfsbackd`), or run the command with --no-daemon"
        )

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its ``Result``; the daemon's error is raised as its own class."""
        try:
            # A daemon that refuses us answers and hangs up before reading: still read its answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._file.write(json.dumps({"Action": action, "Params": params}).encode() + b"\n")
                self._file.flush()
            line = self._file.readline()
        except TimeoutError:
            raise self._unresponsive(f"did not answer {action} within {self.timeout:.0f} s") from None
        except OSError as exc:
            raise self._unresponsive(f"dropped the connection during {action} ({exc.strerror or exc})") from None
        if not line:
            raise self._unresponsive(f"closed the control socket without answering {action}")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and isinstance(reply.get("Error"), dict):
            error = reply["Error"]
            raise _remote_error(str(error.get("Code", "InternalError")), str(error.get("Message", "")))
        if not isinstance(reply, dict) or not isinstance(reply.get("Result"), dict):
            raise self._unresponsive(f"answered {action} with something that is not a zfsbackd reply")
        return reply["Result"]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # flushing to a daemon that hung up
            self._file.close()
        self._sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
