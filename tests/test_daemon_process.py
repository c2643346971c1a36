"""A real daemon process: systemd notify protocol, the control socket, metrics, reload, kill and stop."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from daemonkit import DaemonProcess
from enginekit import REPO, make_config, pack_files, run_cli, write_config
from fsfixtures import assert_trees_identical
from prometheus_client.parser import text_string_to_metric_families

from zfsbackd.engine.engine import Engine
from zfsbackd.store.records import Lifecycle

MiB = 1024 * 1024


def _start(daemons: list[DaemonProcess], config: Path, tmp_path: Path, **kwargs: object) -> DaemonProcess:
    d = DaemonProcess(config, tmp_path, **kwargs)  # type: ignore[arg-type]
    daemons.append(d)
    d.start()
    return d


def _metrics(d: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(d.metrics_url(), timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_lifecycle(config: Path, backup_id: str, wanted: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = run_cli(config, "describe-backups", "--backup-id", backup_id, "--no-daemon")
        (backup,) = result.json["Backups"]
        if backup["Lifecycle"] == wanted:
            return backup
        assert time.monotonic() < deadline, f"{backup_id} still {backup['Lifecycle']}"
        time.sleep(0.2)


def test_daemon_socket_metrics_reload_and_graceful_stop(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (xfs_dir / "hello.txt").write_text("hello\n")
    config = write_config(tmp_path, {"src": xfs_dir})
    d = _start(daemons, config, tmp_path, watchdog_usec=1_000_000)
    ready_after = d.wait_ready()
    assert ready_after < 30
    d.wait_for("WATCHDOG=1", timeout=5)

    created = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--name", "via socket")
    assert created.returncode == 0, created.stderr
    assert created.json["Backup"]["Lifecycle"] == "CREATING"  # FSx-style: returns at once
    backup_id = created.json["Backup"]["BackupId"]
    _wait_lifecycle(config, backup_id, "AVAILABLE")
    waited = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--wait")
    assert waited.returncode == 0, waited.stderr
    assert waited.json["Backup"]["Lifecycle"] == "AVAILABLE"
    events = d.events()
    assert any(e.get("event") == "backup_available" and e.get("backup_id") == backup_id for e in events)
    assert all("fs_id" in e for e in events if e.get("event", "").startswith("backup_"))

    deadline = time.monotonic() + 90  # generous: a loaded CI machine can stall I/O for many seconds
    while True:  # counters are fed when backups finish; the state gauges on the next tick
        m = _metrics(d)
        key = (
            "zfsbackd_backups",
            (("file_system_id", "fs-src"), ("lifecycle", "AVAILABLE"), ("type", "USER_INITIATED")),
        )
        if m.get(key) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert m[key] == 2, f"metrics: {m}\nthreads:\n{d.thread_dump()}"
    assert m[("zfsbackd_up", ())] == 1 and m[("zfsbackd_ready", ())] == 1
    assert m[("zfsbackd_last_successful_backup_timestamp_seconds", (("file_system_id", "fs-src"),))] > 0
    assert (
        m[
            (
                "zfsbackd_backups_finished_total",
                (("file_system_id", "fs-src"), ("outcome", "available"), ("type", "USER_INITIATED")),
            )
        ]
        == 2
    )
    assert m[("zfsbackd_store_reachable", (("region", "local"),))] == 1
    assert m[("zfsbackd_object_store_requests_total", (("operation", "put"), ("region", "local")))] > 0
    assert ("zfsbackd_build_info", (("version", "0.1.0"),)) in m

    # SIGHUP with a good config: a second file system appears.
    second = xfs_dir.parent / (xfs_dir.name + "-second")
    second.mkdir()
    data = yaml.safe_load(config.read_text())
    data["file_systems"].append(
        {"id": "fs-second", "source": {"path": str(second)}, "automatic_backup_retention_days": 0}
    )
    config.write_text(yaml.safe_dump(data))
    d.signal(signal.SIGHUP)
    d.wait_for("RELOADING=1")
    d.wait_for("READY=1")
    assert "fs-second" in run_cli(config, "status").json["Daemon"]["NextAutomaticBackups"]
    # SIGHUP with a bad config: logged, old config kept.
    good_text = config.read_text()
    config.write_text(good_text.replace("automatic_backup_retention_days: 0", "automatic_backup_retention_days: 400"))
    d.signal(signal.SIGHUP)
    d.wait_for("RELOADING=1")
    kept = d.wait_for("READY=1")
    assert "old configuration kept" in kept
    rejected = [e for e in d.events() if e.get("event") == "reload_rejected"]
    assert rejected and "automatic_backup_retention_days" in json.dumps(rejected[-1])
    config.write_text(good_text)
    status = run_cli(config, "status")
    assert status.returncode == 0 and "fs-second" in status.json["Daemon"]["NextAutomaticBackups"]

    d.signal(signal.SIGTERM)
    d.wait_for("STOPPING=1")
    assert d.wait_exit(timeout=30) == 0
    assert not (tmp_path / "control.sock").exists()
    # Without a daemon the CLI works in-process again.
    assert run_cli(config, "describe-backups").returncode == 0


def _big_tree(root: Path, seed: int, files: int = 12) -> None:
    rng = random.Random(seed)
    for i in range(files):
        (root / f"big-{i:02d}.bin").write_bytes(rng.randbytes(16 * MiB))


def test_sigkill_mid_backup_then_restart_resumes_it(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _big_tree(xfs_dir, 11)
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    d = _start(daemons, config, tmp_path, fault_point="pack-uploaded:3")  # dies right after its third pack
    d.wait_ready()
    backup_id = run_cli(config, "create-backup", "--file-system-id", "fs-src").json["Backup"]["BackupId"]
    d.wait_killed()
    assert len(pack_files(tmp_path / "store")) >= 3
    assert _wait_lifecycle(config, backup_id, "CREATING", timeout=5)

    again = _start(daemons, config, tmp_path)
    again.wait_ready()
    done = _wait_lifecycle(config, backup_id, "AVAILABLE")
    assert done["Stats"]["BytesDeduplicated"] >= 2 * 16 * MiB * 0.9  # the packs uploaded before the kill
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    assert not [r for r in engine.store().load_records() if r.lifecycle == Lifecycle.CREATING]
    target = tmp_path / "restore"
    target.mkdir()
    assert_trees_identical(xfs_dir, engine.restore_backup(backup_id, target).path)


def test_sigterm_mid_backup_checkpoints_within_the_bound(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _big_tree(xfs_dir, 12, files=16)
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    # Every pack upload takes at least 0.5 s: the backup lasts > 8 s on any machine, so SIGTERM lands in it.
    d = _start(daemons, config, tmp_path, fault_point="pack-uploaded:delay=0.5")
    d.wait_ready()
    backup_id = run_cli(config, "create-backup", "--file-system-id", "fs-src").json["Backup"]["BackupId"]
    while len(pack_files(tmp_path / "store")) < 1:
        time.sleep(0.01)
    packs_at_term = len(pack_files(tmp_path / "store"))
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=60) == 0
    assert time.monotonic() - started < 60
    interrupted = _wait_lifecycle(config, backup_id, "CREATING", timeout=5)
    assert interrupted["BackupId"] == backup_id
    assert len(pack_files(tmp_path / "store")) >= packs_at_term  # what was read is checkpointed, not thrown away

    again = _start(daemons, config, tmp_path)
    again.wait_ready()
    done = _wait_lifecycle(config, backup_id, "AVAILABLE")
    assert done["Stats"]["BytesDeduplicated"] > 0
    assert run_cli(config, "check", "--read-data").json["Check"]["Errors"] == []


def test_control_socket_refuses_strangers_and_survives_bad_requests(daemons, xfs_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    # A socket in a directory others can traverse (pytest's tmp dirs are 0700).
    sock_dir = Path(tempfile.mkdtemp(prefix="zfsbackd-sock-"))
    os.chmod(sock_dir, 0o755)
    sock_path = sock_dir / "control.sock"
    config.write_text(config.read_text().replace(str(tmp_path / "control.sock"), str(sock_path)))
    d = _start(daemons, config, tmp_path)
    d.wait_ready()
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600"

    for raw in (
        b"this is not json\n",
        b'{"Action": 42}\n',
        b'{"Action": "Nope", "Params": {}}\n',
        b'{"Action": "CreateBackup", "Params": {"FileSystemId": "fs-missing"}}\n',
        b'{"Action": "CreateBackup", "Params": {"FileSystemId": "fs-src", "Tags": "x"}}\n',
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.sendall(raw)
            reply = json.loads(s.makefile("rb").readline())
        assert "Error" in reply and reply["Error"]["Message"], raw
    assert run_cli(config, "status").returncode == 0  # still serving

    # A stranger is stopped by the file mode first ...
    assert _as_stranger(sock_path) == "PermissionError"
    # ... and, if the socket is made reachable by mistake, by the peer-credential check.
    os.chmod(sock_path, 0o666)
    reply = json.loads(_as_stranger(sock_path))
    assert reply["Error"]["Code"] == "AccessDenied"
    assert "uid 65534" in reply["Error"]["Message"] and "root" in reply["Error"]["Message"]
    assert run_cli(config, "status").returncode == 0
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    sock_dir.rmdir()


def _as_stranger(sock_path: Path, uid: int = 65534) -> str:
    """Connect as another user (a forked child drops to ``uid``) and return the daemon's answer."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec, so no interpreter the stranger could not run
        answer = b""
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock_path))
                # The daemon may refuse (answer and close) before it reads the request: the send then
                # fails with EPIPE, and the refusal is still waiting to be read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b'{"Action": "DescribeBackups", "Params": {}}\n')
                answer = s.makefile("rb").readline()
        except OSError as exc:
            answer = type(exc).__name__.encode()
        finally:
            os.write(write_end, answer)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer.strip()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is installed by scripts/setup-env.sh (package systemd)"
    unit = (REPO / "systemd" / "zfsbackd.service").read_text()
    exe = Path(sys.executable).with_name("zfsbackd")
    if not exe.exists():
        exe = Path(shutil.which("zfsbackd") or "/nonexistent")
    assert exe.exists(), "the zfsbackd console script is installed"
    unit_path = tmp_path / "zfsbackd.service"
    unit_path.write_text(unit.replace("/usr/bin/zfsbackd", str(exe)))
    # --man=no: Documentation=man:zfsbackd(8) is installed by the Debian package (tests/test_package.py), not here.
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit_path)], capture_output=True, text=True, check=False
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "zfsbackd" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ExecReload=" in unit


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup-env.sh (package prometheus)"
    result = subprocess.run(
        [promtool, "check", "rules", str(REPO / "config" / "prometheus-alerts.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout
