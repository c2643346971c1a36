"""A real Prometheus scrapes a real daemon: every PromQL expression of the Grafana dashboard and of the alert
rules is evaluated through Prometheus's HTTP API and returns data, or the test says why it may not.

The daemon does what a first day does: an automatic backup at start, a user
backup, a backup that fails (the first failure after the start must be an
``increase()``: ZfsbackdBackupFailed fires), a copy to another region, its
scheduled check; then a store goes away (ZfsbackdStoreUnreachable's
expression turns true). Prometheus scrapes every second.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemonkit import DaemonProcess
from enginekit import REPO, run_cli, write_config

DASHBOARD = REPO / "config" / "grafana-dashboard.json"
RULES = REPO / "config" / "prometheus-alerts.yaml"
#: Grafana's variables, as a dashboard with every host selected and a short range would expand them
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m"}
#: series that a healthy daemon between backups does not have, and why
EXPECTED_EMPTY = {
    "zfsbackd_backup_started_timestamp_seconds": "no backup runs when the test queries (they all ended)",
    "zfsbackd_oldest_queued_copy_timestamp_seconds": "no copy waits for a slot (the one copy ran at once)",
}
#: alert expressions that are true in this scenario; every other one must be false (empty) on this daemon
EXPECTED_FIRING = {"ZfsbackdBackupFailed": {"fs-broken"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """``/usr/bin/prometheus`` on 127.0.0.1 with a tmp data dir, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [{"job_name": "zfsbackd", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is installed by scripts/setup-env.sh"
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready"
                time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now; a PromQL error fails the test with Prometheus's message."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = json.load(urllib.request.urlopen(url, timeout=10))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Pending and firing alerts by name, with their annotations as Prometheus templated them."""
        url = f"http://127.0.0.1:{self.port}/api/v1/alerts"
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in json.load(urllib.request.urlopen(url, timeout=10))["data"]["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no data for {expr} within {timeout} s"
            time.sleep(0.5)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_of(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for p in started:
        p.close()


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression with the dashboard's variables expanded) for every target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


def _rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def _metric_names(expr: str) -> set[str]:
    """The series an expression reads (``up{…}`` and every zfsbackd_/process_ name)."""
    return set(re.findall(r"\b(?:zfsbackd|process)_[a-z_]+\b|\bup(?=\{)", expr))


def _has_number(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_dashboard_and_alert_expression_returns_data(
    daemons: list[DaemonProcess], prometheus_of: list[Prometheus], xfs_dir: Path, tmp_path: Path
) -> None:
    (xfs_dir / "hello.txt").write_text("hello\n")
    not_cow = tmp_path / "plain-dir"  # tmp is not a copy-on-write file system: its backups fail
    not_cow.mkdir()
    config = write_config(tmp_path, {"src": xfs_dir, "broken": not_cow}, extra_regions={"far": tmp_path / "far"})
    data = yaml.safe_load(config.read_text())
    data["daemon"]["check_interval_days"] = 1
    data["file_systems"][0]["completion_window_minutes"] = 60
    data["file_systems"][1]["automatic_backup_retention_days"] = 0
    config.write_text(yaml.safe_dump(data))

    d = DaemonProcess(config, tmp_path)
    daemons.append(d)
    d.start()
    d.wait_ready()
    prom = Prometheus(tmp_path, d.metrics_url().removeprefix("http://").removesuffix("/metrics"))
    prometheus_of.append(prom)
    prom.wait_ready()
    prom.wait_for('zfsbackd_backups_finished_total{outcome="failed", file_system_id="fs-broken"}')  # scraped at 0

    user = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--wait")
    assert user.returncode == 0, user.stderr
    backup_id = user.json["Backup"]["BackupId"]
    broken = run_cli(config, "create-backup", "--file-system-id", "fs-broken", "--wait")
    assert broken.returncode != 0, broken.stdout
    copy = run_cli(config, "copy-backup", "--source-backup-id", backup_id, "--destination-region", "far", "--wait")
    assert copy.returncode == 0, copy.stderr
    # The automatic first backup of fs-src, the check, and a few scrapes after the last change.
    prom.wait_for('zfsbackd_backups{file_system_id="fs-src", type="AUTOMATIC", lifecycle="AVAILABLE"}')
    prom.wait_for('zfsbackd_check_last_run_timestamp_seconds{region="far"}')
    prom.wait_for('zfsbackd_last_failed_backup_timestamp_seconds{file_system_id="fs-broken"}')
    time.sleep(3)

    empty = [(title, expr) for title, expr in _dashboard_exprs() if not _has_number(prom.query(expr))]
    explained = [(t, e) for t, e in empty if _metric_names(e) & set(EXPECTED_EMPTY)]
    assert empty == explained, f"dashboard expressions without data: {empty}"

    for alert, expr in _rules().items():
        for name in sorted(_metric_names(expr) - set(EXPECTED_EMPTY)):
            assert prom.query(name), f"{alert} reads {name}, which the daemon does not export"
        firing = {r["metric"].get("file_system_id", r["metric"].get("region", "")) for r in prom.query(expr)}
        assert firing == EXPECTED_FIRING.get(alert, set()), f"{alert}: {expr} is true for {firing}"

    # A store that goes away after start-up: the probe sees it, and with it the alert's expression.
    (tmp_path / "far").rename(tmp_path / "far-unmounted")
    try:
        prom.wait_for(_rules()["ZfsbackdStoreUnreachable"])
    except AssertionError as exc:
        metrics = urllib.request.urlopen(d.metrics_url(), timeout=10).read().decode()
        reachable = [line for line in metrics.splitlines() if line.startswith("zfsbackd_store_reachable")]
        raise AssertionError(
            f"{exc}\ndaemon says {reachable}; {sorted(os.listdir(tmp_path))}; log:\n{d.log_text()[-3000:]}"
        ) from None
    deadline = time.monotonic() + 10
    while "ZfsbackdStoreUnreachable" not in (alerts := prom.alerts()):  # pending: `for: 10m`
        assert time.monotonic() < deadline, alerts
        time.sleep(0.5)
    (unreachable,) = alerts["ZfsbackdStoreUnreachable"]
    assert unreachable["annotations"]["summary"] == "zfsbackd cannot reach the store of region far"
    (failed,) = alerts["ZfsbackdBackupFailed"]  # the first failure after the start: no `for`, firing
    assert failed["state"] == "firing" and failed["annotations"]["summary"] == "A backup of fs-broken failed"
    (tmp_path / "far-unmounted").rename(tmp_path / "far")
    prom.wait_for('zfsbackd_store_reachable{region="far"} == 1')
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0


def test_dashboard_is_importable() -> None:
    """What Grafana's import needs: a title and uid, unique panel ids, a data source it asks for at import
    (the ``datasource`` variable, so no ``__inputs`` to fill), and every query panel on that data source."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    assert {
        "Time since last successful backup",
        "Backup duration",
        "Bytes read, uploaded and deduplicated",
        "Store size",
        "Object-store errors and retries",
        "Copies queued and in flight",
        "Process memory",
    } <= titles
