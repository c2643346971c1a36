"""The CLI's side of the control socket."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from zfsbackd import errors

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
    def __init__(self, path: Path, timeout: float = 300.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonUnavailable(str(exc)) from None
        except PermissionError:
            self._sock.close()
            raise _remote_error(
                "AccessDenied",
                f"permission denied on the control socket {path}: run as root or as a member of the "
                "group configured in daemon.control_group",
            ) from None
        self._file = self._sock.makefile("rwb")

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        # A daemon that refuses us answers and hangs up before reading: still read its answer.
        with contextlib.suppress(BrokenPipeError):
            self._file.write(json.dumps({"Action": action, "Params": params}).encode() + b"\n")
            self._file.flush()
        line = self._file.readline()
        if not line:
            raise errors.StoreError(f"the daemon closed the control socket {self.path} without answering")
        reply = json.loads(line)
        if "Error" in reply:
            raise _remote_error(reply["Error"].get("Code", "InternalError"), reply["Error"].get("Message", ""))
        return reply["Result"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
