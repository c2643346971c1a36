"""The control socket: JSON requests from the CLI, checked against the caller's credentials.

One JSON object per line each way: ``{"Action": "CreateBackup", "Params": {…}}``
→ ``{"Result": {…}}`` or ``{"Error": {"Code", "Message"}}``. Only root and
members of ``daemon.control_group`` may talk to it: the socket file is
0600/0660 *and* every connection's ``SO_PEERCRED`` is checked, so a socket
made reachable by mistake still refuses strangers.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from zfsbackd.errors import BadRequest, ZfsbackdError

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
_UCRED = struct.Struct("3i")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class PermissionRefused(ZfsbackdError):
    code = "AccessDenied"
    exit_code = 2


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, from the kernel (cannot be forged)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def caller_allowed(uid: int, gid: int, group: str | None) -> bool:
    if uid == 0:
        return True
    if group is None:
        return False
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    if gid == entry.gr_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in entry.gr_mem


class _RequestHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        _pid, uid, gid = peer_credentials(self.request)
        if not caller_allowed(uid, gid, self.server.group):
            who = f"uid {uid}"
            group = self.server.group
            fix = f"run it as root or as a member of group {group}" if group else "run it as root"
            self._reply(
                {"Error": PermissionRefused(f"{who} may not use the zfsbackd control socket; {fix}").to_dict()["Error"]}
            )
            log.warning("control_refused", uid=uid, gid=gid)
            return
        while True:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if not line:
                return
            self._reply(self.server.dispatch(line))

    def _reply(self, payload: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(json.dumps(payload, ensure_ascii=False).encode() + b"\n")
            self.wfile.flush()


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handlers: dict[str, Handler], *, group: str | None) -> None:
        self.path = path
        self.handlers = handlers
        self.group = group
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            self._remove_stale(path)
        super().__init__(str(path), _RequestHandler)
        gid = grp.getgrnam(group).gr_gid if group else -1
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
        os.chmod(path, 0o660 if group else 0o600)

    @staticmethod
    def _remove_stale(path: Path) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over from a crash
            return
        finally:
            probe.close()
        raise ZfsbackdError(
            f"daemon.control_socket: another zfsbackd daemon already listens on {path}; stop it first "
            "(`systemctl stop zfsbackd`) or configure another socket path"
        )

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
            try:
                request = json.loads(line)
            except ValueError as exc:
                raise BadRequest(f"request is not valid JSON: {exc}") from None
            if not isinstance(request, dict) or not isinstance(request.get("Action"), str):
                raise BadRequest('request must be a JSON object with "Action" and "Params"')
            params = request.get("Params", {})
            if not isinstance(params, dict):
                raise BadRequest('"Params" must be a JSON object')
            handler = self.handlers.get(request["Action"])
            if handler is None:
                raise BadRequest(f"unknown action {request['Action']!r}; known: {', '.join(sorted(self.handlers))}")
            return {"Result": handler(params)}
        except ZfsbackdError as exc:
            return exc.to_dict()
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("control_request_failed")
            return {"Error": {"Code": "InternalError", "Message": f"{type(exc).__name__}: {exc}"}}

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="zfsbackd-control", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
