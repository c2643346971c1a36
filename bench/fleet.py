#!/usr/bin/env python3
"""Cross-host deduplication: two hosts back up the same tree into one store; how much does the second upload?

    sudo .venv/bin/python bench/fleet.py --scale 0.5     # "large" data set: ~1 GiB at scale 0.5

Two host configurations (own state_dir, own host_name, one key file, one local
store on a loopback XFS), each backing up its own reflink copy of the same
generated tree (bench/run.py's "large" data set: random, text and a sparse
image), one after the other, each with the CLI as a separate process. Prints a
Markdown table: seconds, bytes read, bytes uploaded, bytes deduplicated and the
store's size after each host, then the share of host B's data it did not upload.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # the data generator and loop file systems of the main benchmark

REPO = Path(__file__).resolve().parent.parent


def host_config(work: Path, name: str, source: Path, store: Path, key: Path) -> Path:
    host = work / name
    host.mkdir()
    config = {
        "state_dir": str(host / "state"),
        "host_name": name,
        "home_region": "local",
        "regions": {"local": {"type": "local", "path": str(store), "create_if_missing": True}},
        "encryption": {"key_file": str(key)},
        "daemon": {"control_socket": str(host / "control.sock"), "metrics_listen": "127.0.0.1:0"},
        "file_systems": [{"id": "fs-data", "source": {"path": str(source)}}],
    }
    path = host / "zfsbackd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def zfsbackd(config: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "zfsbackd.cli", *args, "--config", str(config), "--no-daemon"],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"zfsbackd {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.5, help="of bench/run.py's large data set (1.0 ≈ 2 GiB)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zfsbackd-fleet-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        fs = base.LoopFs(work, "xfs")
        fs.create(8 * 1024**3)
        try:
            src_a, src_b = fs.mnt / "host-a", fs.mnt / "host-b"
            src_a.mkdir()
            info = base.generate("large", src_a, args.scale, args.seed)
            subprocess.run(["cp", "-a", "--reflink=always", str(src_a), str(src_b)], check=True)
            store = fs.mnt / "store"
            store.mkdir()
            key = work / "store.key"
            subprocess.run([sys.executable, "-m", "zfsbackd.cli", "key", "generate", "--key-file", str(key)],
                           check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            rows = []
            for name, source in (("host-a", src_a), ("host-b", src_b)):
                config = host_config(work, name, source, store, key)
                base.settle(True)
                t0 = time.perf_counter()
                stats = zfsbackd(config, "create-backup", "--file-system-id", "fs-data")["Backup"]["Stats"]
                seconds = time.perf_counter() - t0
                store_size = sum(p.stat().st_size for p in (store / "data").rglob("*") if p.is_file())
                rows.append((name, seconds, stats, store_size))
        finally:
            fs.destroy()
    gib = 1024**3
    print(f"Data: bench/run.py large data set at scale {args.scale}: {info.bytes / gib:.2f} GiB in {info.files} files")
    print()
    print("| host | seconds | read GiB | uploaded GiB | deduplicated GiB | store GiB after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, seconds, stats, size in rows:
        print(
            f"| {name} | {seconds:.1f} | {stats['BytesRead'] / gib:.3f} | {stats['BytesUploaded'] / gib:.3f} | "
            f"{stats['BytesDeduplicated'] / gib:.3f} | {size / gib:.3f} |"
        )
    b = rows[1][2]
    print()
    print(f"host-b uploaded {b['BytesUploaded'] / max(1, b['BytesRead']):.2%} of what it read; the store grew "
          f"{(rows[1][3] - rows[0][3]) / gib:.3f} GiB for host-b's {b['BytesRead'] / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
