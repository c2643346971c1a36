"""The Debian package under real systemd with real OpenZFS: run only by scripts/zfsvm-systemd-tests.sh.

These tests install the package into the VM's root file system, enable its unit
and stop, restart and reconfigure it: they must never run on a host. The host
suite's ``pytest`` (testpaths = tests) would otherwise collect this directory,
so everything here is ignored unless ``ZFSBACKD_SYSTEMD_VM=1``, which only the
runner script sets, in the guest it boots with ``run-in-vm.sh --systemd``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

IN_VM = os.environ.get("ZFSBACKD_SYSTEMD_VM") == "1"

if not IN_VM:
    collect_ignore_glob = ["test_*.py"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test shows the unit's state and the end of its journal: the VM is gone afterwards."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and IN_VM:
        for title, argv in (
            ("systemctl status zfsbackd", ["systemctl", "status", "--no-pager", "-n", "0", "zfsbackd"]),
            ("journalctl -u zfsbackd (last 60)", ["journalctl", "-u", "zfsbackd", "--no-pager", "-n", "60"]),
        ):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            report.sections.append((title, proc.stdout + proc.stderr))
