"""Hostile input to the daemon: bad configs on SIGHUP, fuzzed and flooding control-socket clients,
and backups that end FAILED behind `--wait`.

The invariants: a bad reload never stops the daemon; every control request gets
a well-formed, classified answer (never InternalError); idle or slow clients
cannot lock out real ones; and a FAILED backup is an error with a documented
exit code that names the backup.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess
from enginekit import pack_files, run_cli, write_config

from zfsbackd.daemon.control import MAX_CONNECTIONS, MAX_REQUEST_BYTES, Action, ControlServer, Kind, Param
from zfsbackd.errors import EXIT_BACKUP_FAILED, EXIT_BAD_REQUEST, BadRequest

BACKUP_ID = "backup-0123456789abcdef0"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (a socket path has at most 107 bytes; pytest's tmp paths get long)."""
    path = Path(tempfile.mkdtemp(prefix="zb-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _start_daemon(daemons: list[DaemonProcess], config: Path, tmp_path: Path) -> DaemonProcess:
    d = DaemonProcess(config, tmp_path)
    daemons.append(d)
    d.start()
    d.wait_ready()
    return d


def _connect(path: Path, timeout: float = 30.0) -> socket.socket:
    """Connect, retrying while the listener's accept queue is full (EAGAIN), as DaemonClient does."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            s.close()
            assert time.monotonic() < deadline, f"{path}: accept queue full for {timeout} s"
            time.sleep(0.01)


def _read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _ask(path: Path, line: bytes) -> dict[str, Any]:
    """One request on a fresh connection; the parsed answer (also one sent before hanging up on us)."""
    with _connect(path) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(line)
        return json.loads(_read_line(s))


def _request(action: str, **params: Any) -> bytes:
    return json.dumps({"Action": action, "Params": params}).encode() + b"\n"


def _assert_classified(reply: object, request: bytes) -> None:
    """A well-formed answer: a Result object, or an Error with a code other than InternalError and a message."""
    assert isinstance(reply, dict) and len(reply) == 1, (reply, request[:300])
    if "Result" in reply:
        assert isinstance(reply["Result"], dict), (reply, request[:300])
        return
    error = reply.get("Error")
    assert isinstance(error, dict), (reply, request[:300])
    assert isinstance(error.get("Code"), str) and error["Code"] != "InternalError", (reply, request[:300])
    assert isinstance(error.get("Message"), str) and error["Message"], (reply, request[:300])


# ------------------------------------------------------------------ the schema, in-process
def test_action_schema_refuses_every_wrong_type() -> None:
    action = Action(
        lambda params: params,
        {
            "Text": Param(Kind.TEXT, required=True),
            "Number": Param(Kind.INTEGER),
            "Flag": Param(Kind.BOOLEAN),
            "Ids": Param(Kind.TEXT_LIST),
            "Tags": Param(Kind.TEXT_MAP),
            "Filters": Param(Kind.TEXT_LIST_MAP),
        },
    )
    good = {"Text": "x", "Number": 3, "Flag": False, "Ids": ["a"], "Tags": {"k": ""}, "Filters": {"f": ["v"]}}
    assert action.checked("Test", good) == good
    assert action.checked("Test", {"Text": "x", "Number": None}) == {
        "Text": "x",
        "Number": None,
        "Flag": None,
        "Ids": None,
        "Tags": None,
        "Filters": None,
    }
    wrong: dict[str, list[object]] = {
        "Text": [1, True, [], {}, "x" * 5000, "\ud800"],
        "Number": ["3", 1.5, True, [3]],
        "Flag": ["false", 0, 1],
        "Ids": ["a", [1], [["a"]], {"a": 1}, ["x"] * 1001],
        "Tags": [[], ["k"], {"k": 1}, {"k": None}, {"k": ["v"]}],
        "Filters": [{"f": "v"}, {"f": [1]}, ["f"]],
    }
    for key, values in wrong.items():
        for value in values:
            with pytest.raises(BadRequest, match=f"Test: parameter '{key}' must be") as info:
                action.checked("Test", {**good, key: value})
            info.value.message.encode("utf-8")  # printable, even for a lone surrogate
    with pytest.raises(BadRequest, match="parameter 'Text' is required"):
        action.checked("Test", {"Text": None})
    with pytest.raises(BadRequest, match="unknown parameter 'MaxResult'; known parameters: Text, Number"):
        action.checked("Test", {**good, "MaxResult": 1})
    with pytest.raises(BadRequest, match='"Params" must be a JSON object, got a list'):
        action.checked("Test", [good])


# ------------------------------------------------------ connection limits, in-process server
@pytest.fixture
def small_server(sock_dir: Path) -> Iterator[tuple[ControlServer, threading.Event]]:
    """A ControlServer with 4 connection slots and a 1 s request deadline; ``Block`` waits for the event."""
    release = threading.Event()
    actions = {
        "Echo": Action(lambda p: {"Echo": p["Text"]}, {"Text": Param(Kind.TEXT)}),
        "Block": Action(lambda _p: {"Released": release.wait(30)}),
    }
    server = ControlServer(sock_dir / "c.sock", actions, group=None, max_connections=4, idle_timeout=1.0)
    server.start()
    yield server, release
    release.set()
    server.stop()


def test_a_request_must_arrive_within_the_deadline_however_slowly_it_trickles(small_server) -> None:  # type: ignore[no-untyped-def]
    server, _release = small_server
    with _connect(server.path) as silent, _connect(server.path) as slow:
        started = time.monotonic()
        # One byte every 0.1 s: each recv is quick, but the request never ends; the server stops it
        # after its 1 s deadline (then sending fails).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in b'{"Action": "Echo", "Params": {"Text": "' + b"x" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        for s in (silent, slow):
            reply = json.loads(_read_line(s))
            assert reply["Error"]["Code"] == "BadRequest" and "within 1 s" in reply["Error"]["Message"]
            assert _read_line(s) == b""  # and closed
        assert time.monotonic() - started < 5


def test_an_oversized_request_is_refused_and_the_connection_closed(small_server) -> None:  # type: ignore[no-untyped-def]
    server, _release = small_server
    with _connect(server.path) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (MAX_REQUEST_BYTES + 70_000))
        reply = json.loads(_read_line(s))
        assert reply["Error"]["Code"] == "BadRequest" and "larger than" in reply["Error"]["Message"]
    assert _ask(server.path, _request("Echo", Text="still here")) == {"Result": {"Echo": "still here"}}


def test_idle_connections_make_room_for_a_real_client(small_server) -> None:  # type: ignore[no-untyped-def]
    server, _release = small_server
    idle = [_connect(server.path) for _ in range(10)]  # 2.5 times the slots, sending nothing
    try:
        started = time.monotonic()
        assert _ask(server.path, _request("Echo", Text="hi")) == {"Result": {"Echo": "hi"}}
        assert time.monotonic() - started < 0.9  # served at once, not after the idle ones time out
        closed = 0
        for s in idle[:6]:  # the oldest ones were closed to make room
            s.settimeout(2)
            closed += _read_line(s) == b""
        assert closed == 6
    finally:
        for s in idle:
            s.close()


def test_when_every_slot_runs_a_request_a_newcomer_gets_daemon_busy(small_server) -> None:  # type: ignore[no-untyped-def]
    server, release = small_server
    busy = [_connect(server.path) for _ in range(4)]
    try:
        for s in busy:
            s.sendall(_request("Block"))
        time.sleep(0.3)
        reply = _ask(server.path, _request("Echo", Text="x"))
        assert reply["Error"]["Code"] == "DaemonBusy" and "4 control requests" in reply["Error"]["Message"]
        release.set()
        for s in busy:
            assert json.loads(_read_line(s)) == {"Result": {"Released": True}}
        assert _ask(server.path, _request("Echo", Text="x")) == {"Result": {"Echo": "x"}}
    finally:
        for s in busy:
            s.close()


# --------------------------------------------------------------------- SIGHUP, real daemon
def _status(sock: Path) -> dict[str, Any]:
    reply = _ask(sock, _request("Status"))
    assert "Result" in reply, reply
    return reply["Result"]["Daemon"]


def test_a_hostile_config_on_sighup_never_stops_the_daemon(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (xfs_dir / "f").write_text("x")
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    good = config.read_text()
    sock = tmp_path / "control.sock"
    d = _start_daemon(daemons, config, tmp_path)
    laughs = "l0: &l0 [a, a, a, a, a, a, a, a, a]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
    )
    hostile: list[tuple[str, bytes | None, str]] = [
        ("nested lists", ("[" * 10_000 + "]" * 10_000).encode(), "nested more than"),
        ("nested mappings", ("a: " + "{a: " * 10_000 + "1" + "}" * 10_000).encode(), "nested more than"),
        ("billion laughs", laughs.encode(), "expand to more than"),
        ("binary garbage", bytes(range(256)) * 64, "not UTF-8"),
        ("huge file", b"#" * (2 * 1024 * 1024), "larger than"),
        ("python tag", b"a: !!python/object/apply:os.system [touch /tmp/pwned]\n", "remove the tag"),
        ("a directory", None, "is a directory"),
    ]
    for what, content, expected in hostile:
        config.unlink()
        if content is None:
            config.mkdir()
        else:
            config.write_bytes(content)
        d.signal(signal.SIGHUP)
        d.wait_for("RELOADING=1")
        kept = d.wait_for("READY=1")
        assert "old configuration kept" in kept, what
        assert d.proc is not None and d.proc.poll() is None, f"{what}: the daemon exited"
        assert list(_status(sock)["NextAutomaticBackups"]) == ["fs-src"], what  # the old config serves
        rejected = [e for e in d.events() if e.get("event") == "reload_rejected"]
        assert rejected and expected in json.dumps(rejected[-1]), (what, rejected[-1:])
        if content is None:
            config.rmdir()
    config.write_text(good)
    created = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--wait")
    assert created.returncode == 0, created.stderr  # still does its job
    assert not [e for e in d.events() if e.get("event") in ("reload_failed", "control_request_failed")]
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0


# ------------------------------------------------------------- fuzzing the real control socket
_NASTY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**70,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x" * 5000,
    "\ud800",
    "\x00",
    "a\nb",
    "../../etc/passwd",
    "ｆｓ－ｓｒｃ",
    BACKUP_ID,
    "fs-src",
    "local",
    "far",
    "nope",
    "LTE=",
    "!!!",
    [],
    ["x"],
    [1, 2],
    [[[[]]]],
    {},
    {"a": 1},
    {"lifecycle": ["AVAILABLE"]},
    {"aws:x": "y"},
    {"": ""},
]

_VALID: list[dict[str, Any]] = [
    {"Action": "Status", "Params": {}},
    {
        "Action": "DescribeBackups",
        "Params": {
            "Region": "local",
            "BackupIds": [BACKUP_ID],
            "Filters": {"lifecycle": ["AVAILABLE"]},
            "MaxResults": 5,
            "NextToken": "MQ==",
        },
    },
    {
        "Action": "CreateBackup",
        "Params": {"FileSystemId": "fs-src", "Name": "fuzz", "Tags": {"k": "v"}, "ClientRequestToken": "tok"},
    },
    {"Action": "DeleteBackup", "Params": {"BackupId": BACKUP_ID, "Region": "local"}},
    {
        "Action": "CopyBackup",
        "Params": {
            "SourceBackupId": BACKUP_ID,
            "SourceRegion": "local",
            "DestinationRegion": "far",
            "CopyTags": True,
            "Tags": {"k": "v"},
        },
    },
]


def _mutated(rng: random.Random) -> bytes:
    """One request line: a valid request with one thing broken, or broken bytes."""
    request = json.loads(json.dumps(rng.choice(_VALID)))
    params = request["Params"]
    how = rng.randrange(10)
    if how <= 2 and params:  # a parameter of a wrong type or value
        params[rng.choice(list(params))] = rng.choice(_NASTY)
    elif how == 3 and params:
        del params[rng.choice(list(params))]
    elif how == 4:
        params[rng.choice(["MaxResult", "Param", "backupid", "Extra"])] = rng.choice(_NASTY)
    elif how == 5:
        request["Params"] = rng.choice(_NASTY)
    elif how == 6:
        request["Action"] = rng.choice([*_NASTY, "Nope", "status", "createbackup"])
    elif how == 7:
        request[rng.choice(["Parameters", "action", "Extra"])] = request.pop(rng.choice(["Params", "Action"]))
    text = json.dumps(request).encode()
    if how == 8:  # bytes: flip, cut, insert
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos:]
            else:
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))
            if not data:
                data = bytearray(b"{")
        text = bytes(data)
    elif how == 9:  # structure: deep nesting, or plain garbage
        depth = rng.choice([10, 1000, 100_000])
        text = rng.choice([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, rng.randbytes(200)])
    return text.replace(b"\n", b" ") + b"\n"


def _exact_cases() -> list[bytes]:
    """The requests the issue names, checked every run whatever the seed gives."""
    return [
        b'{"Action": "DescribeBackups", "Parameters": {"MaxResults": "x"}}\n',
        b'{"Action": "DescribeBackups", "Params": {"MaxResults": "x"}}\n',
        b'{"Action": "DescribeBackups", "Params": {"BackupIds": "backup-0123456789abcdef0"}}\n',
        b'{"Action": "DeleteBackup", "Params": {"BackupId": ["backup-0123456789abcdef0"]}}\n',
        b'{"Action": "CopyBackup", "Params": {"SourceBackupId": 5, "DestinationRegion": {}}}\n',
        b'{"Action": "CreateBackup", "Params": {"FileSystemId": "fs-src", "Name": 7}}\n',
        b'{"Action": "CreateBackup", "Params": ["fs-src"]}\n',
        b'{"Action": "Status", "Params": "x"}\n',
        b"[" * 500_000 + b"\n",
        b"\xff\xfe\x00garbage\n",
        b'{"Action": "DescribeBackups", "Params": {"NextToken": "\\ud800"}}\n',
        b'{"Action": "DescribeBackups", "Params": {"MaxResults": NaN}}\n',
    ]


def test_fuzzed_requests_all_get_classified_answers(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (xfs_dir / "f").write_text("x")
    config = write_config(
        tmp_path,
        {"src": xfs_dir},
        extra_fs={"automatic_backup_retention_days": 0},
        extra_regions={"far": tmp_path / "store-far"},
    )
    sock = tmp_path / "control.sock"
    d = _start_daemon(daemons, config, tmp_path)
    rng = random.Random(20240611)
    lines = _exact_cases() + [_mutated(rng) for _ in range(3000)]
    conn = _connect(sock)
    codes: dict[str, int] = {}
    try:
        for line in lines:
            conn.sendall(line)
            answer = _read_line(conn)
            assert answer, f"no answer to {line[:200]!r}"
            reply = json.loads(answer)
            _assert_classified(reply, line)
            code = reply["Error"]["Code"] if "Error" in reply else "Result"
            codes[code] = codes.get(code, 0) + 1
    finally:
        conn.close()
    assert d.proc is not None and d.proc.poll() is None
    assert codes.get("BadRequest", 0) > 1000 and codes.get("Result", 0) > 50, codes
    assert not [e for e in d.events() if e.get("event") == "control_request_failed"]
    # Afterwards a real request is still served correctly.
    created = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--name", "after-fuzz", "--wait")
    assert created.returncode in (0, 4), created.stderr  # 4: a fuzzed CreateBackup may still be running
    described = run_cli(config, "describe-backups", "--filter", "file-system-id=fs-src")
    assert described.returncode == 0 and all(b["FileSystemId"] == "fs-src" for b in described.json["Backups"])
    assert _status(sock)["Ready"] is True


def test_a_flood_of_idle_and_slow_connections_does_not_lock_out_a_real_client(  # type: ignore[no-untyped-def]
    daemons, xfs_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    sock = tmp_path / "control.sock"
    d = _start_daemon(daemons, config, tmp_path)
    assert d.proc is not None
    threads_before = _threads(d.proc.pid)
    idle = [_connect(sock) for _ in range(200)]
    slow = [_connect(sock) for _ in range(20)]
    try:
        for s in slow:
            with contextlib.suppress(OSError):  # closed to make room: fine
                s.sendall(b'{"Action": ')
        started = time.monotonic()
        status = run_cli(config, "status", timeout=60)
        assert status.returncode == 0, status.stderr
        assert time.monotonic() - started < 15
        assert _threads(d.proc.pid) <= threads_before + MAX_CONNECTIONS + 5
        reply = _ask(sock, _request("DescribeBackups", MaxResults=1))
        assert reply == {"Result": {"Backups": []}}
    finally:
        for s in idle + slow:
            s.close()
    assert d.proc.poll() is None


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


# -------------------------------------------------------------------- backups that end FAILED
def _failing_hook_config(tmp_path: Path, source: Path) -> Path:
    return write_config(
        tmp_path,
        {"src": source},
        extra_fs={
            "automatic_backup_retention_days": 0,
            "pre_snapshot": "echo database-unreachable >&2; exit 1",
        },
    )


def test_create_backup_wait_through_the_daemon_reports_a_failed_backup(  # type: ignore[no-untyped-def]
    daemons, btrfs_subvol: Path, tmp_path: Path
) -> None:
    (btrfs_subvol / "f").write_text("x")
    config = _failing_hook_config(tmp_path, btrfs_subvol)
    _start_daemon(daemons, config, tmp_path)
    result = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--wait")
    assert result.returncode == EXIT_BACKUP_FAILED, (result.returncode, result.stderr)
    error = result.error
    assert error["Code"] == "BackupFailed"
    backup = result.json["Backup"]
    assert backup["Lifecycle"] == "FAILED" and error["BackupId"] == backup["BackupId"]
    assert error["Region"] == "local"
    assert backup["FailureDetails"]["Message"] in error["Message"]
    assert "pre_snapshot" in error["Message"] and "database-unreachable" in error["Message"]


def test_create_backup_in_process_reports_its_own_error_and_the_backup_id(btrfs_subvol: Path, tmp_path: Path) -> None:
    (btrfs_subvol / "f").write_text("x")
    config = _failing_hook_config(tmp_path, btrfs_subvol)
    result = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--no-daemon")
    assert result.returncode == EXIT_BAD_REQUEST, result.stderr
    assert result.error["Code"] == "SnapshotFailed" and "database-unreachable" in result.error["Message"]
    (failed,) = run_cli(config, "describe-backups").json["Backups"]
    assert failed["Lifecycle"] == "FAILED" and result.error["BackupId"] == failed["BackupId"]


def test_copy_backup_wait_through_the_daemon_reports_a_failed_copy(  # type: ignore[no-untyped-def]
    daemons, xfs_dir: Path, tmp_path: Path
) -> None:
    (xfs_dir / "data.bin").write_bytes(random.Random(7).randbytes(256 * 1024))
    config = write_config(
        tmp_path,
        {"src": xfs_dir},
        extra_fs={"automatic_backup_retention_days": 0},
        extra_regions={"far": tmp_path / "store-far"},
    )
    source = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert source.returncode == 0, source.stderr
    packs = pack_files(tmp_path / "store")
    assert packs
    for pack in packs:  # every blob fails authentication: the copy cannot succeed
        data = bytearray(pack.read_bytes())
        for i in range(0, len(data), 7):
            data[i] ^= 0xFF
        pack.write_bytes(bytes(data))
    _start_daemon(daemons, config, tmp_path)
    source_id = source.json["Backup"]["BackupId"]
    result = run_cli(config, "copy-backup", "--source-backup-id", source_id, "--destination-region", "far", "--wait")
    assert result.returncode == EXIT_BACKUP_FAILED, (result.returncode, result.stderr)
    copy = result.json["Backup"]
    assert copy["Lifecycle"] == "FAILED" and copy["SourceBackupId"] == source_id
    assert result.error["Code"] == "BackupFailed"
    assert result.error["BackupId"] == copy["BackupId"] and result.error["Region"] == "far"
    assert result.error["Message"].startswith(f"copy {copy['BackupId']} of fs-src ended FAILED: ")
