"""The alert rules fire when they should and only then (`promtool test rules`), and the metrics they read
are what the daemon exports (counter series at 0, gauges only for configured file systems).

Each rule has cases that fire and cases that must not; a rule added to
config/prometheus-alerts.yaml without both fails :func:`test_every_rule_is_tested_firing_and_not`.
In promtool, ``time()`` is the evaluation time counted from the epoch, so "an
hour ago" is a timestamp of ``-3600`` at time 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from enginekit import write_config
from test_skipped_entries_metrics import T0
from test_skipped_entries_metrics import _record as record_with_skips

from zfsbackd.daemon.checks import CheckScheduler, CheckState
from zfsbackd.daemon.metrics import DaemonMetrics, StateSnapshot
from zfsbackd.daemon.service import Daemon
from zfsbackd.engine.engine import BackupRequest
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import StoreError
from zfsbackd.store.check import CheckResult
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "config" / "prometheus-alerts.yaml"
DAY = 86400


def _rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(alertname: str, summary: str, **labels: str) -> dict[str, Any]:
    """An expected alert: its labels, the summary written out, the description from the rule's template.

    The summary is spelled out because it is what the administrator reads
    first (the region in it, say); descriptions only name labels.
    """
    rule = _rules()[alertname]
    description = re.sub(
        r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), rule["annotations"]["description"]
    )
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }


def _at(minutes: float, alertname: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    """At ``minutes``, exactly ``alerts`` (none: the rule must be quiet)."""
    return {"eval_time": f"{minutes}m", "alertname": alertname, "exp_alerts": list(alerts)}


def _fires(minutes: float, alertname: str, summary: str, **labels: str) -> dict[str, Any]:
    """At ``minutes``, one alert with these labels and this summary."""
    return _at(minutes, alertname, _alert(alertname, summary, **labels))


#: per rule: (input series, expectations); every rule needs an expectation with and one without alerts
CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "ZfsbackdDown": (
        [
            _series("up", "1x5 0x20", job="zfsbackd", instance="db-01:9810"),
            _series("zfsbackd_up", "1x30", job="zfsbackd", instance="db-01:9810"),
        ],
        [
            _at(5, "ZfsbackdDown"),
            _at(12, "ZfsbackdDown"),  # down since 6m: pending for 10m
            _fires(20, "ZfsbackdDown", "zfsbackd on db-01:9810 is not running", job="zfsbackd", instance="db-01:9810"),
        ],
    ),
    "ZfsbackdDailyBackupMissed": (
        [
            # fs-late: configured with automatic backups, last success 26 h before time 0: fires.
            _series("zfsbackd_last_successful_backup_timestamp_seconds", f"{-26 * 3600}x40", file_system_id="fs-late"),
            _series("zfsbackd_next_automatic_backup_timestamp_seconds", f"{DAY}x40", file_system_id="fs-late"),
            # fs-ok: succeeded at time 0.
            _series("zfsbackd_last_successful_backup_timestamp_seconds", "0x40", file_system_id="fs-ok"),
            _series("zfsbackd_next_automatic_backup_timestamp_seconds", f"{DAY}x40", file_system_id="fs-ok"),
            # fs-removed (gone from the config, or automatic_backup_retention_days: 0): no next window, no alert.
            _series(
                "zfsbackd_last_successful_backup_timestamp_seconds", f"{-30 * DAY}x40", file_system_id="fs-removed"
            ),
        ],
        [
            _at(10, "ZfsbackdDailyBackupMissed"),  # pending: 15m
            _fires(
                20,
                "ZfsbackdDailyBackupMissed",
                "fs-late has had no successful backup for 1d 2h 20m 0s",
                file_system_id="fs-late",
            ),
        ],
    ),
    "ZfsbackdNeverBackedUp": (
        [
            _series("zfsbackd_next_automatic_backup_timestamp_seconds", f"{DAY}x1620", file_system_id="fs-new"),
            _series("zfsbackd_next_automatic_backup_timestamp_seconds", f"{DAY}x1620", file_system_id="fs-ok"),
            _series("zfsbackd_last_successful_backup_timestamp_seconds", "0x1620", file_system_id="fs-ok"),
        ],
        [
            _at(25 * 60, "ZfsbackdNeverBackedUp"),  # a first backup may take a while: not yet
            _fires(
                26 * 60 + 5,
                "ZfsbackdNeverBackedUp",
                "fs-new has never been backed up successfully",
                file_system_id="fs-new",
            ),
        ],
    ),
    "ZfsbackdBackupFailed": (
        [
            # The daemon creates the series at 0 when it starts; the first failure (at 11m) is an increase.
            _series(
                "zfsbackd_backups_finished_total",
                "0x10 1x70",
                file_system_id="fs-a",
                type="AUTOMATIC",
                outcome="failed",
            ),
            _series(
                "zfsbackd_backups_finished_total",
                "0+1x80",
                file_system_id="fs-a",
                type="AUTOMATIC",
                outcome="available",
            ),
        ],
        [
            _at(5, "ZfsbackdBackupFailed"),
            _fires(
                12,
                "ZfsbackdBackupFailed",
                "A backup of fs-a failed",
                file_system_id="fs-a",
                type="AUTOMATIC",
                outcome="failed",
            ),
            _at(75, "ZfsbackdBackupFailed"),  # an hour later it has cleared
        ],
    ),
    "ZfsbackdBackupSkippedEntries": (
        [_series("zfsbackd_last_backup_entries_skipped", "0x10 2x10", file_system_id="fs-a")],
        [
            _at(5, "ZfsbackdBackupSkippedEntries"),
            _fires(
                15,
                "ZfsbackdBackupSkippedEntries",
                "The last backup of fs-a skipped 2 unreadable entries",
                file_system_id="fs-a",
            ),
        ],
    ),
    "ZfsbackdBackupRunningTooLong": (
        [
            # fs-a: a one-hour completion window, running since time 0.
            _series("zfsbackd_backup_started_timestamp_seconds", "0x90", file_system_id="fs-a"),
            _series("zfsbackd_backup_completion_window_seconds", "3600x90", file_system_id="fs-a"),
            # fs-b: no window: a day is the limit.
            _series("zfsbackd_backup_started_timestamp_seconds", "0x90", file_system_id="fs-b"),
            # fs-c: a window, but no backup runs.
            _series("zfsbackd_backup_completion_window_seconds", "60x90", file_system_id="fs-c"),
        ],
        [
            _at(60, "ZfsbackdBackupRunningTooLong"),
            _at(70, "ZfsbackdBackupRunningTooLong"),  # past the window since 61m: pending for 15m
            _fires(
                80,
                "ZfsbackdBackupRunningTooLong",
                "The backup of fs-a has run for 1h 20m 0s, past its completion window",
                file_system_id="fs-a",
            ),
        ],
    ),
    "ZfsbackdStoreUnreachable": (
        [
            # eu-west-1 answered at start-up, then stopped answering at 6m.
            _series("zfsbackd_store_reachable", "1x5 0x20", region="eu-west-1"),
            _series("zfsbackd_store_reachable", "1x25", region="local"),
        ],
        [
            _at(5, "ZfsbackdStoreUnreachable"),
            _at(12, "ZfsbackdStoreUnreachable"),
            _fires(
                20,
                "ZfsbackdStoreUnreachable",
                "zfsbackd cannot reach the store of region eu-west-1",
                region="eu-west-1",
            ),
        ],
    ),
    "ZfsbackdObjectStoreErrors": (
        [
            _series("zfsbackd_object_store_errors_total", "0+1x40", region="eu-west-1", operation="put"),
            _series("zfsbackd_object_store_errors_total", "5x40", region="local", operation="put"),
        ],
        [
            _at(10, "ZfsbackdObjectStoreErrors"),
            _fires(
                20,
                "ZfsbackdObjectStoreErrors",
                "Object-store requests to eu-west-1 fail after retries",
                region="eu-west-1",
            ),
        ],
    ),
    "ZfsbackdCopyFailed": (
        [
            _series("zfsbackd_copies_finished_total", "0x10 1x70", region="eu-west-1", outcome="failed"),
            _series("zfsbackd_copies_finished_total", "0x80", region="us-east-1", outcome="failed"),
            _series("zfsbackd_copies_finished_total", "0+1x80", region="us-east-1", outcome="available"),
        ],
        [
            _at(5, "ZfsbackdCopyFailed"),
            _fires(12, "ZfsbackdCopyFailed", "A backup copy to region eu-west-1 failed", region="eu-west-1"),
            _at(75, "ZfsbackdCopyFailed"),
        ],
    ),
    "ZfsbackdCopyQueuedTooLong": (
        [
            # eu-west-1: the oldest PENDING copy was made 6 hours before time 0; us-east-1: at time 0.
            _series("zfsbackd_oldest_queued_copy_timestamp_seconds", f"{-6 * 3600}x30", region="eu-west-1"),
            _series("zfsbackd_oldest_queued_copy_timestamp_seconds", "0x30", region="us-east-1"),
        ],
        [
            _at(10, "ZfsbackdCopyQueuedTooLong"),
            _fires(
                20,
                "ZfsbackdCopyQueuedTooLong",
                "A copy to region eu-west-1 has been queued for 6h 20m 0s",
                region="eu-west-1",
            ),
        ],
    ),
    "ZfsbackdCheckFailed": (
        [
            _series("zfsbackd_check_errors", "0x10 3x10", region="local"),
            _series("zfsbackd_check_errors", "0x20", region="eu-west-1"),
        ],
        [
            _at(5, "ZfsbackdCheckFailed"),
            _fires(15, "ZfsbackdCheckFailed", "The check of the store of region local found 3 errors", region="local"),
        ],
    ),
    "ZfsbackdCheckOverdue": (
        [
            # local: due a day before time 0 and never done; eu-west-1: due at time 0 (ran on time or runs now).
            _series("zfsbackd_check_due_timestamp_seconds", f"{-DAY}x20", region="local"),
            _series("zfsbackd_check_due_timestamp_seconds", "0x20", region="eu-west-1"),
        ],
        [
            _at(0, "ZfsbackdCheckOverdue"),
            _fires(
                5,
                "ZfsbackdCheckOverdue",
                "The store of region local has not been checked for 1d 0h 5m 0s past its schedule",
                region="local",
            ),
        ],
    ),
}


def test_every_rule_is_tested_firing_and_not() -> None:
    assert set(CASES) == set(_rules())
    for name, (_series_list, expectations) in CASES.items():
        assert any(e["exp_alerts"] for e in expectations), f"{name}: no case where it fires"
        assert any(not e["exp_alerts"] for e in expectations), f"{name}: no case where it stays quiet"


@pytest.mark.parametrize("alertname", sorted(CASES))
def test_rule_fires_when_it_should_and_only_then(alertname: str, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup-env.sh (package prometheus)"
    series, expectations = CASES[alertname]
    tests = tmp_path / "tests.yaml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": expectations}],
            },
            sort_keys=False,
        )
    )
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------- what the daemon exports for these rules
def _record(fs_id: str, hours: int, lifecycle: Lifecycle) -> BackupRecord:
    return record_with_skips(fs_id, 0, hours, lifecycle)


def test_counters_start_at_zero_for_every_configured_file_system_type_and_outcome() -> None:
    metrics = DaemonMetrics(StateSnapshot)
    metrics.declare(["fs-a"], ["eu-west-1"])
    sample = metrics.registry.get_sample_value
    for backup_type in ("AUTOMATIC", "USER_INITIATED"):
        for outcome in ("available", "failed"):
            labels = {"file_system_id": "fs-a", "type": backup_type, "outcome": outcome}
            assert sample("zfsbackd_backups_finished_total", labels) == 0
    for outcome in ("available", "failed", "interrupted"):
        assert sample("zfsbackd_copies_finished_total", {"region": "eu-west-1", "outcome": outcome}) == 0
    assert sample("zfsbackd_bytes_read_total", {"file_system_id": "fs-a"}) == 0
    assert sample("zfsbackd_files_processed_total", {"file_system_id": "fs-a"}) == 0
    assert sample("process_resident_memory_bytes") > 0  # prometheus_client's ProcessCollector


def test_per_file_system_gauges_cover_configured_file_systems_only() -> None:
    records = [
        _record("fs-a", 0, Lifecycle.AVAILABLE),
        _record("fs-a", 24, Lifecycle.FAILED),
        _record("fs-gone", 0, Lifecycle.AVAILABLE),  # removed from the config; its backups stay
    ]
    checks = {"local": CheckState(due=100.0, last_run=50.0, errors=2, duration_seconds=3.0)}
    state = StateSnapshot(records=records, file_systems=["fs-a", "fs-new"], checks=checks)
    sample = DaemonMetrics(lambda: state).registry.get_sample_value
    last_ok = "zfsbackd_last_successful_backup_timestamp_seconds"
    assert sample(last_ok, {"file_system_id": "fs-a"}) == (T0 + timedelta(minutes=5)).timestamp()
    assert sample(last_ok, {"file_system_id": "fs-gone"}) is None
    assert sample(last_ok, {"file_system_id": "fs-new"}) is None  # never succeeded: ZfsbackdNeverBackedUp
    failed = sample("zfsbackd_last_failed_backup_timestamp_seconds", {"file_system_id": "fs-a"})
    assert failed == (T0 + timedelta(hours=24, minutes=5)).timestamp()
    assert sample("zfsbackd_backup_in_progress", {"file_system_id": "fs-new"}) == 0
    assert sample("zfsbackd_check_errors", {"region": "local"}) == 2
    assert sample("zfsbackd_check_due_timestamp_seconds", {"region": "local"}) == 100


def test_progress_is_reported_once_while_the_backup_runs() -> None:
    metrics = DaemonMetrics(StateSnapshot)
    progress = Progress(interval=0.0)
    progress.on_update = lambda p: metrics.observe_progress("fs-a", p.take_unreported())
    progress.advance(files=2, nbytes=100)
    progress.uploaded(70)  # a pack landed (an upload thread)
    progress.advance(nbytes=50)
    sample = metrics.registry.get_sample_value
    assert sample("zfsbackd_bytes_processed_total", {"file_system_id": "fs-a"}) == 150
    assert sample("zfsbackd_files_processed_total", {"file_system_id": "fs-a"}) == 2
    assert sample("zfsbackd_bytes_uploaded_total", {"file_system_id": "fs-a"}) == 70
    assert progress.take_unreported() == (0, 0, 0)


def test_daemon_counts_progress_while_the_backup_runs(tmp_path: Path) -> None:
    """A long backup shows throughput before it ends: the job's progress feeds the counters as it advances."""
    proceed = threading.Event()

    class HalfwayEngine:
        def create_backup(self, request: BackupRequest, *, progress: Progress, **kwargs: Any) -> BackupRecord:
            kwargs["on_record"](_record(request.file_system_id, 0, Lifecycle.CREATING))
            progress.uploaded(2500)
            progress.advance(files=3, nbytes=3000)
            proceed.wait(30)
            progress.advance(files=1, nbytes=1000)  # within the half-second throttle: reported at the end
            return _record(request.file_system_id, 0, Lifecycle.AVAILABLE)

    (tmp_path / "src").mkdir()
    daemon = Daemon(write_config(tmp_path, {"src": tmp_path / "src"}), serve=False)
    daemon.engine = HalfwayEngine()  # type: ignore[assignment]
    sample = daemon.metrics.registry.get_sample_value
    job = daemon.runner.submit(BackupRequest("fs-src", BackupType.USER_INITIATED))
    job.wait_started()
    deadline = time.monotonic() + 10
    while sample("zfsbackd_bytes_processed_total", {"file_system_id": "fs-src"}) != 3000:
        assert time.monotonic() < deadline, "no progress counted while the backup runs"
        time.sleep(0.01)
    assert sample("zfsbackd_files_processed_total", {"file_system_id": "fs-src"}) == 3
    assert sample("zfsbackd_bytes_uploaded_total", {"file_system_id": "fs-src"}) == 2500
    proceed.set()
    assert daemon.runner.wait_idle(10)
    assert sample("zfsbackd_bytes_processed_total", {"file_system_id": "fs-src"}) == 4000
    assert sample("zfsbackd_files_processed_total", {"file_system_id": "fs-src"}) == 4
    daemon.runner.shutdown()


def test_store_size_is_measured_at_the_first_tick_even_right_after_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """time.monotonic() counts from boot: a daemon started by systemd at boot must not wait 5 minutes."""
    (tmp_path / "src").mkdir()
    daemon = Daemon(
        write_config(tmp_path, {"src": tmp_path / "src"}, extra_fs={"automatic_backup_retention_days": 0}),
        serve=False,
    )
    monkeypatch.setattr(time, "monotonic", lambda: 12.0)  # 12 seconds after boot
    daemon.tick()
    sample = daemon.metrics.registry.get_sample_value
    assert sample("zfsbackd_store_size_bytes", {"region": "local"}) == 0
    assert sample("zfsbackd_store_reachable", {"region": "local"}) == 1
    daemon.runner.shutdown()


def test_scheduled_check_result_survives_a_restart_and_a_failed_run_retries_in_an_hour(tmp_path: Path) -> None:
    now = [1000.0]

    class Checked:
        def check(self, *, region: str) -> CheckResult:
            if region == "gone":
                raise StoreError("the store directory is gone")
            return CheckResult(region=region, errors=["pack data/ab/x: unreadable"])

    def run(scheduler: CheckScheduler) -> None:
        scheduler.start_due(Checked, ["local", "gone"], 7)  # type: ignore[arg-type]
        assert scheduler.wait_idle(10)

    scheduler = CheckScheduler(tmp_path, clock=lambda: now[0])
    run(scheduler)
    local = CheckState(due=1000.0 + 7 * DAY, last_run=1000.0, errors=1, duration_seconds=0.0)
    assert scheduler.states(["local", "gone"], 7) == {"local": local, "gone": CheckState(due=1000.0 + 3600)}
    now[0] += 2 * 3600
    restarted = CheckScheduler(tmp_path, clock=lambda: now[0])
    assert restarted.states(["local"], 7) == {"local": local}  # not due again for a week
    run(restarted)  # only "gone" is due
    assert restarted.states(["local", "gone"], 7)["gone"].due == now[0] + 3600
    assert restarted.states(["local"], 0) == {}  # daemon.check_interval_days: 0 exports nothing


def test_a_backup_asked_for_right_after_the_previous_one_ended_waits_for_its_cleanup(tmp_path: Path) -> None:
    """Found by the fleet soak test: the record says AVAILABLE while the job still releases its store
    lease; a client that saw AVAILABLE and asks for the next backup is served, not refused."""
    cleanup = threading.Event()
    committed: dict[str, BackupRecord] = {}

    class CleaningUpEngine:
        def create_backup(self, request: BackupRequest, *, progress: Progress, **kwargs: Any) -> BackupRecord:
            kwargs["on_record"](_record(request.file_system_id, 0, Lifecycle.CREATING))
            committed["fs-src"] = _record(request.file_system_id, 0, Lifecycle.AVAILABLE)  # the store says so
            cleanup.wait(30)  # releasing the lease through a slow network
            return committed["fs-src"]

        def get_backup(self, backup_id: str, region: str | None = None) -> BackupRecord:
            return committed.get("fs-src") or _record("fs-src", 0, Lifecycle.CREATING)

    (tmp_path / "src").mkdir()
    daemon = Daemon(write_config(tmp_path, {"src": tmp_path / "src"}), serve=False)
    daemon.engine = CleaningUpEngine()  # type: ignore[assignment]
    first = daemon.runner.submit(BackupRequest("fs-src", BackupType.USER_INITIATED))
    first.wait_started()
    deadline = time.monotonic() + 10
    while "fs-src" not in committed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threading.Timer(0.3, cleanup.set).start()
    second = daemon.runner.submit(BackupRequest("fs-src", BackupType.USER_INITIATED))  # waits, then runs
    assert first.done.is_set()
    second.wait_started()
    assert daemon.runner.wait_idle(10)
    daemon.runner.shutdown()
