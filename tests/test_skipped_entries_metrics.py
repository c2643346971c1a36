"""Skipped entries reach the administrator: a counter, a per-file-system gauge, and an alert rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from zfsbackd.daemon.metrics import DaemonMetrics, StateSnapshot
from zfsbackd.store.records import BackupRecord, BackupStats, BackupType, Lifecycle

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2024, 5, 1, 2, 30, tzinfo=UTC)
DESCRIPTION = (
    "`zfsbackd describe-backups --filter file-system-id=fs-a` lists the first 100 under Stats.SkippedEntries "
    "with the reason; the journal has every one (event entry_skipped). Fix the permissions or the failing disk, "
    "or set on_entry_error: fail to fail such backups instead."
)


def _record(fs_id: str, skipped: int, hours: int, lifecycle: Lifecycle = Lifecycle.AVAILABLE) -> BackupRecord:
    return BackupRecord(
        backup_id=f"backup-{fs_id[-1]}{hours:016x}",
        file_system_id=fs_id,
        region="local",
        backup_type=BackupType.AUTOMATIC,
        lifecycle=lifecycle,
        creation_time=T0 + timedelta(hours=hours),
        completion_time=T0 + timedelta(hours=hours, minutes=5),
        stats=BackupStats(entries_skipped_with_errors=skipped),
    )


def test_counter_and_newest_backup_gauge() -> None:
    records = [
        _record("fs-a", 4, 0),
        _record("fs-a", 2, 24),  # the newest successful one of fs-a
        _record("fs-a", 9, 48, Lifecycle.FAILED),  # a failed backup says nothing about skipping
        _record("fs-b", 0, 24),
    ]
    state = StateSnapshot(records=records, file_systems=["fs-a", "fs-b"])
    metrics = DaemonMetrics(lambda: state)
    for record in records:
        metrics.observe_backup(record, "available" if record.lifecycle == Lifecycle.AVAILABLE else "failed")
    sample = metrics.registry.get_sample_value

    assert sample("zfsbackd_entries_skipped_total", {"file_system_id": "fs-a"}) == 6
    assert sample("zfsbackd_entries_skipped_total", {"file_system_id": "fs-b"}) == 0
    assert sample("zfsbackd_last_backup_entries_skipped", {"file_system_id": "fs-a"}) == 2
    assert sample("zfsbackd_last_backup_entries_skipped", {"file_system_id": "fs-b"}) == 0


def test_skipped_entries_alert_fires_and_clears(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup-env.sh (package prometheus)"
    tests = tmp_path / "alert-tests.yaml"
    tests.write_text(
        textwrap.dedent(
            f"""\
            rule_files: [{REPO / "config" / "prometheus-alerts.yaml"}]
            evaluation_interval: 1m
            tests:
              - interval: 1m
                input_series:
                  - series: 'zfsbackd_last_backup_entries_skipped{{file_system_id="fs-a"}}'
                    values: '0x10 3x10 0x10'
                alert_rule_test:
                  - eval_time: 5m
                    alertname: ZfsbackdBackupSkippedEntries
                    exp_alerts: []
                  - eval_time: 15m
                    alertname: ZfsbackdBackupSkippedEntries
                    exp_alerts:
                      - exp_labels: {{severity: warning, file_system_id: fs-a}}
                        exp_annotations:
                          summary: "The last backup of fs-a skipped 3 unreadable entries"
                          description: {json.dumps(DESCRIPTION)}
                  - eval_time: 25m
                    alertname: ZfsbackdBackupSkippedEntries
                    exp_alerts: []
            """
        )
    )
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("outcome", ["available", "failed"])
def test_counter_exists_for_every_finished_backup(outcome: str) -> None:
    """The series appears with the first backup of a file system, so rate() sees later increments."""
    metrics = DaemonMetrics(StateSnapshot)
    metrics.observe_backup(_record("fs-c", 0, 0), outcome)
    assert metrics.registry.get_sample_value("zfsbackd_entries_skipped_total", {"file_system_id": "fs-c"}) == 0
