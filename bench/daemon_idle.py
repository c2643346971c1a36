#!/usr/bin/env python3
"""Measure the daemon's start-to-READY time and its idle CPU and memory with N file systems.

    sudo .venv/bin/python bench/daemon_idle.py --file-systems 10 --seconds 60

Starts a real `zfsbackd daemon` with a NOTIFY_SOCKET this script reads, lets it
take the first automatic backups, then samples /proc/<pid> while it idles.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file-systems", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle sampling time")
    parser.add_argument("--tick-seconds", type=float, default=30.0, help="the daemon's scheduling tick (default 30)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zfsbackd-idle-", dir="/var/tmp"))
    image = work / "xfs.img"
    mnt = work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "1G", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    proc = None
    try:
        sources = []
        for i in range(args.file_systems):
            src = mnt / f"fs{i}"
            (src / "dir").mkdir(parents=True)
            for j in range(100):
                (src / "dir" / f"file{j}.txt").write_text(f"file {j} of fs {i}\n" * 50)
            sources.append(src)
        key = work / "store.key"
        subprocess.run([sys.executable, "-m", "zfsbackd.cli", "key", "generate", "--key-file", str(key)],
                       check=True, capture_output=True, cwd=REPO)
        config = work / "zfsbackd.yaml"
        (work / "store").mkdir()  # zfsbackd never creates a store's directory itself
        config.write_text(yaml.safe_dump({
            "state_dir": str(work / "state"),
            "regions": {"local": {"type": "local", "path": str(work / "store"), "create_if_missing": True}},
            "encryption": {"key_file": str(key)},
            "daemon": {"control_socket": str(work / "control.sock"), "metrics_listen": "127.0.0.1:0"},
            "file_systems": [{"id": f"fs-bench{i}", "source": {"path": str(s)}} for i, s in enumerate(sources)],
        }))
        notify_path = work / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(120)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfsbackd.cli", "daemon", "--config", str(config),
             "--tick-seconds", str(args.tick_seconds)],
            env=env, stdout=(work / "daemon.log").open("wb"), stderr=subprocess.STDOUT,
        )
        while b"READY=1" not in notify.recv(65536):
            pass
        ready = time.monotonic() - started
        notify.setblocking(False)
        # Let the first automatic backups finish, then measure the idle daemon.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = (work / "daemon.log").read_text()
            if log.count('"backup_available"') >= args.file_systems:
                break
            time.sleep(0.5)
        time.sleep(2)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        peak = 0.0
        while time.monotonic() - t0 < args.seconds:
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(1)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        print(f"| file systems | start → READY=1 | idle CPU ({args.seconds:.0f} s, tick {args.tick_seconds:g} s) "
              "| idle RSS (peak) |")
        print("| --- | --- | --- | --- |")
        print(f"| {args.file_systems} | {ready:.2f} s | {100 * cpu:.2f} % of one core | {peak:.1f} MiB |")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # dump its threads into the log, then give up on it
                time.sleep(1)
                print((work / "daemon.log").read_text()[-5000:], file=sys.stderr)
                proc.kill()
                proc.wait()
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
