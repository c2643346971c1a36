"""Hostile input to the config loader and the command line: every one is a classified error, never exit 1.

Exit 1 means a bug in zfsbackd (README, "Exit codes"), so each case here checks
the exit code, the error code and that the message names what was wrong and
where (file and line, option, parameter).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from enginekit import REPO, cli_command, run_cli, write_config

from zfsbackd import cli
from zfsbackd.config import MAX_CONFIG_BYTES, MAX_EXPANDED_NODES, MAX_NESTING, load_config
from zfsbackd.daemon.jobs import BackupJob
from zfsbackd.daemon.service import Daemon
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import (
    EXIT_BAD_REQUEST,
    EXIT_CONFLICT,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_STORE,
    ConfigError,
    DaemonBusy,
    ZfsbackdError,
)

ENCRYPTION = "encryption: {mode: none}\n"


def _laughs(levels: int, fan_out: int = 9) -> str:
    """The "billion laughs": each anchor lists the previous one ``fan_out`` times."""
    text = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]\n"
    return text


def _alias_chain(length: int) -> str:
    """Each anchor wraps the previous one once: small expansion, but nested ``length`` levels deep."""
    return "c0: &c0 [1]\n" + "".join(f"c{i}: &c{i} [*c{i - 1}]\n" for i in range(1, length))


# (id, file content, text the single problem must contain)
HOSTILE_YAML: list[tuple[str, str | bytes, str]] = [
    ("nested-lists", "[" * 10_000 + "]" * 10_000 + "\n", f"line 1, column {MAX_NESTING + 1}: values are nested"),
    ("nested-flow-maps", "a: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", "nested more than"),
    ("nested-block-maps", "".join(" " * i + "a:\n" for i in range(200)) + " " * 200 + "b: 1\n", "nested more than"),
    ("billion-laughs", ENCRYPTION + _laughs(10), f"expand to more than {MAX_EXPANDED_NODES:,}"),
    ("alias-chain", ENCRYPTION + _alias_chain(500), "levels of nesting"),
    ("self-alias", "file_systems: &a [*a]\n", "line 1, column 15: this anchor (&name) is used inside its own value"),
    ("self-alias-map", ENCRYPTION + "regions: &r {x: *r}\n", "used inside its own value"),
    ("python-object", "a: !!python/object:os.system {}\n", "line 1, column 4: could not determine a constructor"),
    ("python-name", "a: !!python/name:os.system\n", "remove the tag"),
    ("python-apply", "a: !!python/object/apply:os.system [true]\n", "remove the tag"),
    ("huge-int", "a: " + "9" * 5000 + "\n", "is not a valid int; put it in quotes"),
    ("bad-date", "a: 2024-13-45\n", "line 1, column 4: '2024-13-45' is not a valid timestamp"),
    ("tagged-bad-bool", "a: !!bool maybe\n", "'maybe' is not a valid bool"),
    ("tagged-bad-timestamp", "a: !!timestamp x\n", "'x' is not a valid timestamp"),
    ("tagged-bad-float", "a: !!float x\n", "'x' is not a valid float"),
    ("unhashable-key", "? [a]\n: 1\n", "found unhashable key"),
    ("binary-garbage", bytes(range(256)) * 16, "not UTF-8 text (byte 0x80 at offset 128)"),
    ("latin-1", b"state_dir: /var/lib/zfsb\xe4ckd\n", "not UTF-8 text (byte 0xe4 at offset 24)"),
    ("utf-16", ENCRYPTION.encode("utf-16"), "not UTF-8 text"),
    ("nul-byte", "a: 1\x00\n", "the character U+0000 is not allowed"),
    ("huge-file", "# " + "x" * MAX_CONFIG_BYTES + "\n", f"larger than {MAX_CONFIG_BYTES // 1024} KiB"),
    ("empty", "", "the file is empty"),
    ("top-level-list", "- a\n- b\n", "top level: expected a mapping"),
]


@pytest.mark.parametrize(("content", "expected"), [case[1:] for case in HOSTILE_YAML], ids=[c[0] for c in HOSTILE_YAML])
def test_hostile_yaml_is_a_config_error_naming_file_and_place(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    path = tmp_path / "zfsbackd.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - started < 10, "refused, but only after a long time"
    assert info.value.message.startswith(f"{path}: "), info.value.message
    assert any(expected in problem for problem in info.value.errors), info.value.errors


def test_config_validate_reports_deep_nesting_with_exit_2(tmp_path: Path) -> None:
    """The reported case: RecursionError → InternalError (exit 1) in `config validate`."""
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 10_000 + "]" * 10_000 + "\n")
    result = run_cli(path, "config", "validate")
    assert result.returncode == EXIT_BAD_REQUEST, result.stderr
    assert result.error["Code"] == "InvalidConfiguration"
    assert str(path) in result.error["Message"] and "line 1" in result.error["Message"]


def test_limits_leave_room_for_real_configs(tmp_path: Path) -> None:
    """Nesting up to the limit, aliases and merge keys, and a file just under the size cap still load."""
    path = tmp_path / "ok.yaml"
    nested = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    path.write_text(f"{ENCRYPTION}x: {nested}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        "x: unknown key; known keys: state_dir, host_name, home_region, regions, encryption, file_systems, daemon, "
        "copies, garbage_collection"
    ]
    base = ENCRYPTION + "state_dir: /var/lib/zfsbackd-test\n"
    path.write_text(base + "#" * (MAX_CONFIG_BYTES - len(base) - 1) + "\n")
    assert load_config(path).state_dir == Path("/var/lib/zfsbackd-test")
    load_config(REPO / "config" / "zfsbackd.example.yaml")  # uses anchors and `<<:` merges


def test_config_that_is_not_a_readable_file(tmp_path: Path) -> None:
    cases: dict[Path, str] = {
        tmp_path: "is a directory",
        tmp_path / "missing.yaml": "file not found",
        Path("/dev/zero"): "larger than",
        Path("/dev/null"): "the file is empty",
        tmp_path / "missing-dir" / "x.yaml": "file not found",
        Path("/proc/self/mem"): "cannot read the file",
    }
    (tmp_path / "file").write_text(ENCRYPTION)
    cases[tmp_path / "file" / "x.yaml"] = "cannot read the file: Not a directory"
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.message.startswith(f"{path}: ") and expected in info.value.message, info.value.message


def _as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534; return what it returned (or raised)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # no exec: the child needs nothing nobody cannot read
        answer = ""
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = fn()
        except BaseException as exc:
            answer = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_unreadable_config_as_an_unprivileged_user(tmp_path: Path) -> None:
    """Root reads anything, so the permission error is produced for real by another user."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "zfsbackd.yaml"
    path.write_text(ENCRYPTION)
    os.chmod(path, 0o600)
    answer = _as_nobody(lambda: repr(load_config(path)))
    assert answer.startswith("ConfigError: ") and str(path) in answer and "permission denied" in answer, answer


def _describe_error(config: Path) -> dict[str, str]:
    try:
        Engine(load_config(config)).describe_backups()
    except ZfsbackdError as exc:
        return exc.to_dict()["Error"]
    return {}


@pytest.mark.parametrize("state_dir_exists", [True, False], ids=["existing", "to-be-made"])
def test_a_state_dir_of_another_user_is_a_classified_error(state_dir_exists: bool) -> None:
    """Another user's ``state_dir`` (or a parent it cannot write) is StateDirectoryUnusable, exit 2, naming
    the directory and the fix; ``config validate`` needs no state_dir at all."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # pytest's tmp_path is not reachable by others
        os.chmod(top, 0o755)
        _state_dir_of_another_user(Path(top), state_dir_exists)


def _state_dir_of_another_user(tmp_path: Path, state_dir_exists: bool) -> None:
    config = write_config(tmp_path, {"src": tmp_path}, encrypted=False)
    state_dir = tmp_path / "state"
    if state_dir_exists:
        assert run_cli(config, "describe-backups").returncode == 0  # root made it, with its host id
        assert (state_dir / "host-id").exists()
    for path in [tmp_path, *tmp_path.rglob("*")]:
        os.chmod(path, os.stat(path).st_mode | (0o005 if path.is_dir() else 0o004))

    def describe() -> str:
        return str(cli.main(["describe-backups", "--config", str(config)]))

    if state_dir_exists:  # readable by others: a read-only command needs nothing written
        assert _as_nobody(describe) == "0"
        os.chmod(state_dir, 0o700)
    answer = _as_nobody(describe)
    assert answer == "2", answer
    error = _as_nobody(lambda: json.dumps(_describe_error(config)))
    assert '"StateDirectoryUnusable"' in error and str(state_dir) in error and "uid 65534" in error, error
    as_nobody = _as_nobody(lambda: str(cli.main(["config", "validate", "--config", str(config)])))
    assert as_nobody == "0", as_nobody


# ----------------------------------------------------------------------------- daemon reload
def test_reload_survives_any_exception_and_keeps_the_old_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only ConfigError: whatever goes wrong while reloading, the daemon keeps its configuration."""
    config = write_config(tmp_path, {"src": tmp_path})
    daemon = Daemon(config, serve=False)
    old_config, old_engine = daemon.config, daemon.engine

    def broken(_path: object) -> None:
        raise RuntimeError("a bug while reading the config")

    monkeypatch.setattr("zfsbackd.daemon.service.load_config", broken)
    daemon.reload()  # must not raise
    assert daemon.config is old_config and daemon.engine is old_engine
    monkeypatch.undo()
    config.write_text("[" * 5000 + "]" * 5000)
    daemon.reload()
    assert daemon.config is old_config


def test_a_backup_that_cannot_start_in_time_is_daemon_busy() -> None:
    """All workers busy is an ordinary state (DaemonBusy, exit 4), not a TimeoutError → InternalError."""
    job = BackupJob(BackupRequest("fs-src"))
    with pytest.raises(DaemonBusy, match="max_parallel_backups") as info:
        job.wait_started(timeout=0.01)
    assert info.value.exit_code == EXIT_CONFLICT and "fs-src" in info.value.message


# ------------------------------------------------------------------------------- the CLI
BACKUP_ID = "backup-0123456789abcdef0"


@pytest.fixture
def cli_config(xfs_dir: Path, tmp_path: Path) -> Iterator[Path]:
    yield write_config(tmp_path, {"src": xfs_dir}, extra_regions={"far": tmp_path / "store-far"})


# (argv, exit code, error code, text the message must contain); no daemon runs.
CLI_CASES: list[tuple[list[str], int, str, str]] = [
    ([], EXIT_BAD_REQUEST, "BadRequest", "required: COMMAND"),
    (["frobnicate"], EXIT_BAD_REQUEST, "BadRequest", "invalid choice: 'frobnicate'"),
    (["create-backup"], EXIT_BAD_REQUEST, "BadRequest", "--file-system-id"),
    (["create-backup", "--file-system-id", "garbage"], EXIT_BAD_REQUEST, "BadRequest", "--file-system-id"),
    (["create-backup", "--file-system-id", ""], EXIT_BAD_REQUEST, "BadRequest", "--file-system-id"),
    (["create-backup", "--file-system-id", "fs-nope"], EXIT_NOT_FOUND, "FileSystemNotFound", "fs-src"),
    (["create-backup", "--file-system-id", "fs-src", "--tag", "noequals"], EXIT_BAD_REQUEST, "BadRequest", "--tag"),
    (["create-backup", "--file-system-id", "fs-src", "--tag", "=v"], EXIT_BAD_REQUEST, "BadRequest", "--tag"),
    (["create-backup", "--file-system-id", "fs-src", "--name", ""], EXIT_BAD_REQUEST, "BadRequest", "--name"),
    (["create-backup", "--file-system-id", "fs-src", "--name", "a\nb"], EXIT_BAD_REQUEST, "BadRequest", "--name"),
    (["describe-backups", "--backup-id", "garbage"], EXIT_BAD_REQUEST, "BadRequest", "--backup-id"),
    (["describe-backups", "--max-results", "-1"], EXIT_BAD_REQUEST, "BadRequest", "--max-results"),
    (["describe-backups", "--max-results", "0"], EXIT_BAD_REQUEST, "BadRequest", "--max-results"),
    (["describe-backups", "--max-results", "abc"], EXIT_BAD_REQUEST, "BadRequest", "--max-results"),
    (["describe-backups", "--filter", "garbage"], EXIT_BAD_REQUEST, "BadRequest", "--filter"),
    (["describe-backups", "--filter", "lifecycle="], EXIT_BAD_REQUEST, "BadRequest", "--filter"),
    (["describe-backups", "--filter", "colour=red"], EXIT_BAD_REQUEST, "BadRequest", "colour"),
    (["describe-backups", "--next-token", "garbage"], EXIT_BAD_REQUEST, "BadRequest", "--next-token"),
    (["describe-backups", "--next-token", "w4Y="], EXIT_BAD_REQUEST, "BadRequest", "--next-token"),
    (["describe-backups", "--region", "nope"], EXIT_NOT_FOUND, "InvalidRegion", "'nope'"),
    (["describe-backups", "--output", "xml"], EXIT_BAD_REQUEST, "BadRequest", "--output"),
    (["delete-backup"], EXIT_BAD_REQUEST, "BadRequest", "--backup-id"),
    (["delete-backup", "--backup-id", "garbage"], EXIT_BAD_REQUEST, "BadRequest", "--backup-id"),
    (["delete-backup", "--backup-id", BACKUP_ID], EXIT_NOT_FOUND, "BackupNotFound", BACKUP_ID),
    (["delete-backup", "--backup-id", BACKUP_ID, "--region", "nope"], EXIT_NOT_FOUND, "InvalidRegion", "'nope'"),
    (["copy-backup", "--source-backup-id", BACKUP_ID], EXIT_BAD_REQUEST, "BadRequest", "--destination-region"),
    (
        ["copy-backup", "--source-backup-id", "garbage", "--destination-region", "far"],
        EXIT_BAD_REQUEST,
        "BadRequest",
        "garbage",
    ),
    (
        ["copy-backup", "--source-backup-id", BACKUP_ID, "--destination-region", "nope"],
        EXIT_NOT_FOUND,
        "InvalidRegion",
        "'nope'",
    ),
    (
        ["copy-backup", "--source-backup-id", BACKUP_ID, "--destination-region", "far", "--tag", "x"],
        EXIT_BAD_REQUEST,
        "BadRequest",
        "--tag",
    ),
    (
        ["copy-backup", "--source-backup-id", BACKUP_ID, "--destination-region", "far"],
        EXIT_NOT_FOUND,
        "BackupNotFound",
        BACKUP_ID,
    ),
    (["restore-backup", "--backup-id", BACKUP_ID], EXIT_BAD_REQUEST, "BadRequest", "--target"),
    (["restore-backup", "--backup-id", "garbage", "--target", "/tmp"], EXIT_BAD_REQUEST, "BadRequest", "--backup-id"),
    (
        ["restore-backup", "--backup-id", BACKUP_ID, "--target", "/tmp", "--region", "nope"],
        EXIT_NOT_FOUND,
        "InvalidRegion",
        "'nope'",
    ),
    (["check", "--region", "nope"], EXIT_NOT_FOUND, "InvalidRegion", "'nope'"),
    (["gc", "--region", "nope"], EXIT_NOT_FOUND, "InvalidRegion", "'nope'"),
    (["gc", "--grace-period", "-5"], EXIT_BAD_REQUEST, "BadRequest", "--grace-period"),
    (["gc", "--grace-period", "abc"], EXIT_BAD_REQUEST, "BadRequest", "--grace-period"),
    (["daemon", "--tick-seconds", "nan"], EXIT_BAD_REQUEST, "BadRequest", "--tick-seconds"),
    (["status"], EXIT_STORE, "DaemonNotRunning", "control.sock"),
    (["config"], EXIT_BAD_REQUEST, "BadRequest", "SUBCOMMAND"),
    (["key", "generate"], EXIT_BAD_REQUEST, "BadRequest", "--key-file"),
    (["key", "generate", "--key-file", ""], EXIT_BAD_REQUEST, "BadRequest", "--key-file"),
    (["key", "generate", "--key-file", "/proc/zfsbackd-test/store.key"], EXIT_BAD_REQUEST, "InvalidKeyFile", "/proc"),
]


#: argument lists that take no --config (no command, or a command group without its subcommand)
NO_CONFIG_OPTION = ([], ["frobnicate"], ["config"])


def _error_document(stderr: str) -> dict[str, str]:
    assert "Traceback" not in stderr
    start = stderr.rfind('{\n  "Error"')
    assert start >= 0, f"no error document on stderr: {stderr!r}"
    return json.loads(stderr[start:])["Error"]


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str], str]:
    """The CLI in this process (fast); the same code as the installed command runs."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, _error_document(captured.err), captured.out


@pytest.mark.parametrize(
    ("argv", "exit_code", "code", "text"), CLI_CASES, ids=[" ".join(c[0])[:60] or "no-arguments" for c in CLI_CASES]
)
def test_cli_garbage_arguments_are_classified(
    cli_config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], exit_code: int, code: str, text: str
) -> None:
    with_config = argv if argv in NO_CONFIG_OPTION else [*argv, "--config", str(cli_config)]
    got, error, out = _run_main(with_config, capsys)
    assert (got, error["Code"]) == (exit_code, code), error
    assert text in error["Message"], error["Message"]
    assert out == ""


@pytest.mark.parametrize(
    "command",
    [
        ["describe-backups"],
        ["create-backup", "--file-system-id", "fs-src"],
        ["delete-backup", "--backup-id", BACKUP_ID],
        ["copy-backup", "--source-backup-id", BACKUP_ID, "--destination-region", "far"],
        ["restore-backup", "--backup-id", BACKUP_ID, "--target", "/tmp"],
        ["check"],
        ["gc"],
        ["status"],
        ["daemon"],
        ["config", "validate"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_with_a_bad_config_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "deep.yaml").write_text("[" * 10_000 + "]" * 10_000)
    for config, text in (
        (tmp_path, "is a directory"),
        (tmp_path / "missing.yaml", "file not found"),
        (tmp_path / "empty.yaml", "the file is empty"),
        (tmp_path / "deep.yaml", "nested more than"),
    ):
        argv = [*command, "--config", str(config)]
        if command == ["daemon"]:  # it would set up the daemon's logging in the test process
            result = run_cli(None, *argv)
            got, error = result.returncode, _error_document(result.stderr)
        else:
            got, error, _out = _run_main(argv, capsys)
        assert (got, error["Code"]) == (EXIT_BAD_REQUEST, "InvalidConfiguration"), error
        assert str(config) in error["Message"] and text in error["Message"], error["Message"]


# ------------------------------------------------------------- a daemon that misbehaves
class _FakeDaemon:
    """A listener on the control socket path that answers each connection with ``reply`` (None: never)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.accepted = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()
            if self.reply is not None:
                conn.recv(65536)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("reply", [b"", b"not json\n", b"[1, 2]\n", b'{"Result": 5}\n', b'{"Error": "x"}\n'], ids=repr)
def test_a_daemon_answering_garbage_is_daemon_unresponsive(tmp_path: Path, reply: bytes) -> None:
    config = write_config(tmp_path, {"src": tmp_path})
    fake = _FakeDaemon(tmp_path / "control.sock", reply)
    try:
        result = run_cli(config, "status", timeout=60)
    finally:
        fake.close()
    assert result.returncode == EXIT_STORE, result.stderr
    assert result.error["Code"] == "DaemonUnresponsive" and str(tmp_path / "control.sock") in result.error["Message"]


def test_ctrl_c_while_waiting_for_the_daemon_exits_130(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"src": tmp_path})
    fake = _FakeDaemon(tmp_path / "control.sock", None)  # accepts, never answers
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.Popen(
            cli_command(config, "status"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert fake.accepted.wait(30)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        fake.close()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert '"Code": "Interrupted"' in err and "Traceback" not in err


# ------------------------------------------------------------------------ daemon start
def _daemon_config(tmp_path: Path, **daemon: object) -> Path:
    config = write_config(tmp_path, {"src": tmp_path})
    data = yaml.safe_load(config.read_text())
    data["daemon"].update(daemon)
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_socket_path_too_long_for_unix_sockets_is_a_config_error(tmp_path: Path) -> None:
    long_path = "/run/zfsbackd/" + "s" * 100 + ".sock"
    result = run_cli(_daemon_config(tmp_path, control_socket=long_path), "config", "validate")
    assert result.returncode == EXIT_BAD_REQUEST and result.error["Code"] == "InvalidConfiguration"
    assert "daemon.control_socket" in result.error["Message"] and "at most 107" in result.error["Message"]


def test_listeners_the_daemon_cannot_open_are_config_errors(tmp_path: Path) -> None:
    """A port in use or a group missing on this host: exit 2 naming the key, not a traceback and exit 1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(_daemon_config(tmp_path, metrics_listen=f"127.0.0.1:{port}"), "daemon", timeout=60)
    assert result.returncode == EXIT_BAD_REQUEST, result.stderr
    assert result.error["Code"] == "InvalidConfiguration"
    assert "daemon.metrics_listen" in result.error["Message"] and str(port) in result.error["Message"]
    result = run_cli(_daemon_config(tmp_path, control_group="zfsbackd-no-such-group"), "daemon", timeout=60)
    assert result.returncode == EXIT_BAD_REQUEST, result.stderr
    assert result.error["Code"] == "InvalidConfiguration"
    assert "daemon.control_group" in result.error["Message"] and "groupadd" in result.error["Message"]
