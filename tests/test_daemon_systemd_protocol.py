"""What systemd needs from a real daemon process: MONOTONIC_USEC with RELOADING=1, EXTEND_TIMEOUT_USEC while
stopping, and journal lines that carry their priority (the same run: one daemon start)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from daemonkit import DaemonProcess
from enginekit import write_config


def _field(message: str, name: str) -> str:
    (value,) = [line.split("=", 1)[1] for line in message.splitlines() if line.startswith(f"{name}=")]
    return value


def test_reload_stop_and_journal_priorities(
    daemons: list[DaemonProcess], xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"automatic_backup_retention_days": 0})
    d = DaemonProcess(config, tmp_path)
    daemons.append(d)
    # The daemon's stdout is this file: $JOURNAL_STREAM naming it is what systemd does for the journal.
    d.log_path.touch()
    st = d.log_path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d.start()
    d.wait_ready()

    good = config.read_text()
    config.write_text(good.replace("automatic_backup_retention_days: 0", "automatic_backup_retention_days: 400"))
    sent_after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.signal(signal.SIGHUP)
    reloading = d.wait_for("RELOADING=1")
    # systemd >= 253 pairs the reload with the request by this CLOCK_MONOTONIC time, and fails it without.
    monotonic_usec = int(_field(reloading, "MONOTONIC_USEC"))
    assert sent_after <= monotonic_usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.wait_for("READY=1")
    config.write_text(good)

    d.signal(signal.SIGTERM)
    d.wait_for("STOPPING=1")
    extend = d.wait_for("EXTEND_TIMEOUT_USEC=")
    # stop_timeout_seconds (60 by default) may exceed the unit's TimeoutStopSec: asked for in steps.
    assert 0 < int(_field(extend, "EXTEND_TIMEOUT_USEC")) <= (60 + 30) * 1_000_000
    assert "stopping" in _field(extend, "STATUS")
    assert d.wait_exit(timeout=30) == 0

    lines = d.log_text().splitlines()
    priorities = {}
    for line in lines:
        assert line[:1] == "<" and line[2:4] == ">{", f"no priority prefix: {line!r}"
        event = json.loads(line[3:])  # the rest stays one JSON object
        assert "timestamp" not in event  # the journal stamps each line itself
        priorities.setdefault(event["level"], set()).add(int(line[1]))
    assert priorities["info"] == {6}
    assert priorities["error"] == {3}  # reload_rejected: `journalctl -p warning` shows it
