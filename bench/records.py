#!/usr/bin/env python3
"""Listing N backup records on S3: without the record cache, with it, and with one record changed.

    sudo /work/main/.venv/bin/python bench/records.py --records 5000

Every daemon tick, `describe-backups`, retention and garbage collection list
every record of a store. On a fleet's store that is tens of thousands of
records after a few years. This writes N records (small, like real ones) to a
fresh bucket on Ceph RGW (bench/s3.py's server handling), then times
``Store.load_records()`` in a new process state each way. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s3  # bench/s3.py: the Ceph RGW it starts or reuses

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from zfsbackd.config import load_config  # noqa: E402
from zfsbackd.engine.engine import Engine  # noqa: E402
from zfsbackd.store.crypto import generate_key_file  # noqa: E402
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle, new_backup_id  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    args = parser.parse_args()
    server = s3.start_ceph()
    client = server.client()
    bucket = f"zfsbackd-bench-records-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    rows: list[tuple[str, float, int]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="zfsbackd-records-") as tmp:
            work = Path(tmp)
            key = work / "store.key"
            generate_key_file(key)
            credentials = work / "s3.ini"
            credentials.write_text(f"[default]\naws_access_key_id = {server.access_key}\n"
                                   f"aws_secret_access_key = {server.secret_key}\n")
            os.chmod(credentials, 0o600)

            def engine(state: str) -> Engine:
                config = work / f"{state}.yaml"
                config.write_text(json.dumps({
                    "state_dir": str(work / state), "home_region": "s3",
                    "regions": {"s3": {"type": "s3", "endpoint_url": server.endpoint, "bucket": bucket,
                                       "prefix": "zfsbackd/", "region_name": server.region,
                                       "credentials_file": str(credentials), "addressing_style": "path",
                                       "create_if_missing": True}},
                    "encryption": {"key_file": str(key)}, "file_systems": [],
                }))
                return Engine(load_config(config))

            store = engine("writer").store()
            t0 = datetime(2024, 1, 1, tzinfo=UTC)

            def write(i: int) -> None:
                store.save_record(BackupRecord(
                    backup_id=new_backup_id(), file_system_id=f"fs-{i % 20}", region="s3",
                    backup_type=BackupType.AUTOMATIC, lifecycle=Lifecycle.AVAILABLE,
                    creation_time=t0 + timedelta(hours=i), root_tree="ab" * 32, host_name=f"host-{i % 50}",
                ))

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(write, range(args.records)))

            def timed(label: str, reader: Engine) -> None:
                objects = reader.store().objects
                gets = objects.metrics.requests["get"]
                start = time.perf_counter()
                count = len(reader.store().load_records())
                rows.append((label, time.perf_counter() - start, objects.metrics.requests["get"] - gets))
                assert count == args.records, count

            timed("first listing on this host (cache empty)", engine("reader"))
            timed("next listing, new process (cache warm)", engine("reader"))
            store.save_record(store.load_records()[0].with_changes(name="renamed"))
            timed("one record changed since", engine("reader"))
    finally:
        s3.empty_and_delete_bucket(client, bucket)
        s3.stop_ceph(server)
    print(f"{args.records} records on {server.kind} at {server.endpoint}\n")
    print("| listing | seconds | GETs |")
    print("| --- | ---: | ---: |")
    for label, seconds, gets in rows:
        print(f"| {label} | {seconds:.2f} | {gets} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
