"""The control socket: JSON requests from the CLI, checked against the caller's credentials.

One JSON object per line each way: ``{"Action": "CreateBackup", "Params": {…}}``
→ ``{"Result": {…}}`` or ``{"Error": {"Code", "Message"}}``. Only root and
members of ``daemon.control_group`` may talk to it: the socket file is
0600/0660 *and* every connection's ``SO_PEERCRED`` is checked, so a socket
made reachable by mistake still refuses strangers.

Everything that arrives here is untrusted input, and a bad request must be a
``BadRequest``, never a crash or an ``InternalError``:

* Each action declares its parameters (:class:`Action`, :class:`Param`); they
  are type-checked here, in one place, before any handler runs, so handlers
  receive exactly the declared keys with values of the declared types.
* A request is at most :data:`MAX_REQUEST_BYTES` and must arrive complete
  within :data:`IDLE_TIMEOUT_SECONDS` of connecting or of the previous answer,
  so a client that sends slowly or nothing at all cannot hold a thread forever.
* At most :data:`MAX_CONNECTIONS` connections are served at once. When a new
  one arrives at the limit, the connection that has waited longest *without a
  request in progress* is closed to make room: a flood of idle connections
  can never lock out a real client, and the thread count stays bounded. Only
  when every connection is busy running a request is the newcomer refused
  (``DaemonBusy``).
"""

from __future__ import annotations

import contextlib
import enum
import grp
import json
import os
import pwd
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from zfsbackd.errors import BadRequest, ConfigError, DaemonBusy, ZfsbackdError
from zfsbackd.validation import describe_value

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
#: connections served at once (each has a thread); beyond it idle ones are closed first
MAX_CONNECTIONS = 64
#: a connection must deliver each complete request within this many seconds
IDLE_TIMEOUT_SECONDS = 30.0
#: a client that does not read its answer within this many seconds is dropped
SEND_TIMEOUT_SECONDS = 30.0
#: longest text and most items in one parameter (far beyond any real request)
MAX_TEXT = 4096
MAX_ITEMS = 1000
_UCRED = struct.Struct("3i")
_REQUEST_KEYS = ("Action", "Params")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class PermissionRefused(ZfsbackdError):
    code = "AccessDenied"
    exit_code = 2


# ------------------------------------------------------------------ parameter schema
def _is_text(value: object) -> bool:
    """A string of bounded length that is valid Unicode (JSON allows lone surrogates; files and logs do not)."""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_text_list(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_ITEMS and all(_is_text(v) for v in value)


class Kind(enum.Enum):
    """The JSON types a parameter can have: (what a person is told, the check)."""

    TEXT = (f"text of at most {MAX_TEXT} characters", _is_text)
    INTEGER = ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool))
    BOOLEAN = ("true or false", lambda v: isinstance(v, bool))
    TEXT_LIST = (f"a list of at most {MAX_ITEMS} texts", _is_text_list)
    TEXT_MAP = (
        f"an object of at most {MAX_ITEMS} text keys → text",
        lambda v: isinstance(v, dict) and len(v) <= MAX_ITEMS and all(_is_text(x) for x in (*v, *v.values())),
    )
    TEXT_LIST_MAP = (
        f"an object of at most {MAX_ITEMS} text keys → lists of text",
        lambda v: (
            isinstance(v, dict)
            and len(v) <= MAX_ITEMS
            and all(_is_text(k) for k in v)
            and all(_is_text_list(x) for x in v.values())
        ),
    )

    def __init__(self, description: str, check: Callable[[object], bool]) -> None:
        self.description = description
        self.check = check


@dataclass(frozen=True)
class Param:
    """One parameter of an action: its JSON type and whether it must be given (``null`` = not given)."""

    kind: Kind
    required: bool = False


@dataclass(frozen=True)
class Action:
    """A control-socket action: the handler and the parameters it accepts (no others)."""

    handler: Handler
    params: Mapping[str, Param] = field(default_factory=dict)

    def checked(self, name: str, params: object) -> dict[str, Any]:
        """Every declared parameter (``None`` when not given), type-checked; BadRequest names the first misfit."""
        if not isinstance(params, dict):
            raise BadRequest(f'{name}: "Params" must be a JSON object, got {describe_value(params)}')
        known = ", ".join(self.params) or "none"
        for key in params:
            if key not in self.params:
                raise BadRequest(f"{name}: unknown parameter {str(key)[:60]!r}; known parameters: {known}")
        out: dict[str, Any] = {}
        for key, spec in self.params.items():
            value = params.get(key)
            if value is None:
                if spec.required:
                    raise BadRequest(f"{name}: parameter {key!r} is required ({spec.kind.description})")
            elif not spec.kind.check(value):
                raise BadRequest(f"{name}: parameter {key!r} must be {spec.kind.description}, got {_describe(value)}")
            out[key] = value
        return out


def _describe(value: object) -> str:
    """describe_value, but never reproducing text that cannot be printed (lone surrogates)."""
    if isinstance(value, str) and not _is_text(value):
        return f"text of {len(value)} characters that is too long or not valid Unicode"
    return describe_value(value)


# ------------------------------------------------------------------------ credentials
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


# --------------------------------------------------------------------------- serving
class _RequestTooLarge(Exception):
    pass


class _LineReader:
    """Reads newline-terminated requests with a size bound and a deadline per request."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def readline(self, timeout: float) -> bytes | None:
        """The next line (without limit on how it is split into packets); None at end of stream.

        Raises TimeoutError if the line is not complete within ``timeout`` seconds
        (however slowly its bytes trickle in) and _RequestTooLarge past MAX_REQUEST_BYTES.
        """
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > MAX_REQUEST_BYTES:
                raise _RequestTooLarge
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk


class _RequestHandler(socketserver.BaseRequestHandler):
    server: ControlServer
    request: socket.socket

    def handle(self) -> None:
        try:
            _pid, uid, gid = peer_credentials(self.request)
        except OSError:  # the client is already gone
            return
        if not caller_allowed(uid, gid, self.server.group):
            who = f"uid {uid}"
            group = self.server.group
            fix = f"run it as root or as a member of group {group}" if group else "run it as root"
            self._reply(PermissionRefused(f"{who} may not use the zfsbackd control socket; {fix}").to_dict())
            log.warning("control_refused", uid=uid, gid=gid)
            return
        reader = _LineReader(self.request)
        while True:
            try:
                line = reader.readline(self.server.idle_timeout)
            except _RequestTooLarge:  # the rest of the line cannot be told apart from a next request
                self._reply(BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes; connection closed").to_dict())
                return
            except TimeoutError:
                late = BadRequest(
                    f"no complete request (one JSON object and a new line) within "
                    f"{self.server.idle_timeout:g} s; connection closed"
                )
                self._reply(late.to_dict())
                return
            except OSError:  # reset, or closed by the server to make room
                return
            if line is None or not self.server.begin_request(self.request):
                return
            try:
                self._reply(self.server.dispatch(line))
            finally:
                self.server.end_request(self.request)

    def _reply(self, payload: dict[str, Any]) -> None:
        # ASCII on the wire: a message quoting odd input can never fail to encode.
        with contextlib.suppress(OSError):
            self.request.settimeout(SEND_TIMEOUT_SECONDS)
            self.request.sendall(json.dumps(payload).encode() + b"\n")


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # connections the kernel queues until accepted (each is admitted at once)

    def __init__(
        self,
        path: Path,
        actions: Mapping[str, Action],
        *,
        group: str | None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self.path = path
        self.actions = actions
        self.group = group
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        # Open connections → when they started waiting for a request (None: running one).
        self._connections: dict[socket.socket, float | None] = {}
        self._connections_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            self._remove_stale(path)
        gid = -1
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:  # the config is validated without looking groups up (it may be for another host)
                raise ConfigError(
                    f"daemon.control_group: there is no group {group!r} on this host; create it "
                    f"(`groupadd --system {group}`) or remove the key so that only root may use the socket"
                ) from None
        super().__init__(str(path), _RequestHandler)
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

    # ------------------------------------------------------------- connection limit
    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit the connection (closing the longest-idle one at the limit), or refuse it with DaemonBusy."""
        with self._connections_lock:
            admitted = len(self._connections) < self.max_connections or self._evict_idle_locked()
            if admitted:
                self._connections[request] = time.monotonic()
        if not admitted:
            log.warning("control_busy", connections=self.max_connections)
            busy = DaemonBusy(
                f"the daemon is already running {self.max_connections} control requests; try again when one "
                "has finished"
            )
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(json.dumps(busy.to_dict()).encode() + b"\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _evict_idle_locked(self) -> bool:
        idle = [(since, sock) for sock, since in self._connections.items() if since is not None]
        if not idle:
            return False
        _since, oldest = min(idle, key=lambda item: item[0])
        del self._connections[oldest]  # its thread's begin_request now refuses, even if a line just arrived
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv with end of stream
        log.debug("control_idle_connection_closed", connections=self.max_connections)
        return True

    def begin_request(self, sock: socket.socket) -> bool:
        """Mark the connection busy (not evictable); False if it was closed to make room meanwhile."""
        with self._connections_lock:
            if sock not in self._connections:
                return False
            self._connections[sock] = None
            return True

    def end_request(self, sock: socket.socket) -> None:
        with self._connections_lock:
            if sock in self._connections:
                self._connections[sock] = time.monotonic()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    # --------------------------------------------------------------------- dispatch
    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Answer one request line: ``{"Result": …}`` or a classified ``{"Error": …}``, never an exception."""
        try:
            try:
                request = json.loads(line)
            except (ValueError, RecursionError) as exc:  # RecursionError: [[[[…]]]] nested past the stack
                raise BadRequest(f"request is not valid JSON: {str(exc)[:200]}") from None
            if not isinstance(request, dict) or not isinstance(request.get("Action"), str):
                raise BadRequest('request must be a JSON object with "Action" (text) and "Params" (an object)')
            for key in request:
                if key not in _REQUEST_KEYS:
                    raise BadRequest(
                        f"request: unknown key {str(key)[:60]!r}; a request has only "
                        '"Action" and "Params" (the parameters go in "Params")'
                    )
            name = request["Action"]
            action = self.actions.get(name)
            if action is None:
                raise BadRequest(f"unknown action {name[:60]!r}; known: {', '.join(sorted(self.actions))}")
            params = request.get("Params")
            return {"Result": action.handler(action.checked(name, {} if params is None else params))}
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
