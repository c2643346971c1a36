#!/usr/bin/env python3
"""Micro-benchmark of the blob index: the SQLite cache (zfsbackd.store.indexcache) against a dict.

    .venv/bin/python bench/index_cache.py --blobs 2000000 [--threads 1,2,4] [--lookups 200000]

Each variant runs in its own child process so that its RSS is its own: inserts
(packs of 8,077 blobs, one transaction per 4 packs — how a sync absorbs
checkpoint index objects), then lookups of present blobs (a restore's
``get``) and of absent ones (a backup's ``in`` on new data) from 1, 2 and 4
threads at once. ``dict`` is the in-memory index zfsbackd used before (a dict
of ``Location`` tuples). Prints one JSON line per variant; see bench/README.md
("Blob index cache").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

PER_PACK = 8077
PACKS_PER_OBJECT = 4


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _blob_id(n: int) -> bytes:
    import blake3

    return blake3.blake3(n.to_bytes(8, "little")).digest()


def _objects(blobs: int) -> Iterator[dict[bytes, list]]:  # type: ignore[type-arg]
    from zfsbackd.store.blobs import BlobType
    from zfsbackd.store.packs import PackEntry

    per_object = PER_PACK * PACKS_PER_OBJECT
    for first in range(0, blobs, per_object):
        packs = {}
        for p in range(first, min(first + per_object, blobs), PER_PACK):
            pack_id = _blob_id(-1 - p // PER_PACK & (1 << 63) - 1 | 1 << 62)
            packs[pack_id] = [PackEntry(BlobType.DATA, _blob_id(k), (k - p) * 2100, 2100, 2048)
                              for k in range(p, min(p + PER_PACK, blobs))]
        yield packs


def _lookups(lookup: Callable[[bytes], object], ids: list[bytes], threads: int) -> float:
    """Lookups per second, all threads together, each thread looking up its share of ``ids``."""
    share = len(ids) // threads
    barrier = threading.Barrier(threads + 1)

    def work(part: list[bytes]) -> None:
        barrier.wait()
        for blob_id in part:
            lookup(blob_id)

    workers = [threading.Thread(target=work, args=(ids[i * share:(i + 1) * share],)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return share * threads / (time.perf_counter() - t0)


def child(variant: str, blobs: int, threads: list[int], lookups: int) -> dict[str, object]:
    import blake3  # noqa: F401  (imported before the RSS baseline)

    from zfsbackd.store.index import Location
    from zfsbackd.store.indexcache import BlobIndex

    base_rss = _rss_mib()
    tmp = Path(tempfile.mkdtemp(prefix="zfsbackd-bench-index-"))
    if variant == "sqlite":
        index = BlobIndex(tmp, "0" * 32)
        get: Callable[[bytes], object] = index.get
        contains: Callable[[bytes], object] = index.__contains__
    else:
        table: dict[bytes, Location] = {}

        def add(packs: dict) -> None:  # type: ignore[type-arg]
            for pack_id, entries in packs.items():
                for e in entries:
                    table.setdefault(e.blob_id, Location(pack_id, e.offset, e.length, e.raw_length, e.blob_type))

        get, contains = table.get, table.__contains__
    t = time.perf_counter()
    if variant == "sqlite":  # as a sync does: every new object in one merge
        index.absorb((f"index/{n}", packs) for n, packs in enumerate(_objects(blobs)))
    else:
        for packs in _objects(blobs):
            add(packs)
    insert = time.perf_counter() - t
    rss_built = _rss_mib()
    rng = random.Random(1)
    present = [_blob_id(rng.randrange(blobs)) for _ in range(lookups)]
    absent = [_blob_id(blobs + rng.randrange(1 << 40)) for _ in range(lookups)]
    out: dict[str, object] = {
        "variant": variant, "blobs": blobs, "inserts_per_s": round(blobs / insert),
        "rss_after_inserts_mib": round(rss_built - base_rss, 1),
        "rss_per_blob_b": round((rss_built - base_rss) * 2**20 / blobs, 1),
    }
    if variant == "sqlite":
        size = sum(f.stat().st_size for f in tmp.iterdir())
        out["file_mib"] = round(size / 2**20, 1)
        out["file_b_per_blob"] = round(size / blobs, 1)
    for n in threads:
        out[f"get_present_per_s_{n}t"] = round(_lookups(get, present, n))
        out[f"in_absent_per_s_{n}t"] = round(_lookups(contains, absent, n))
    if variant == "sqlite":  # a backup's writer: one pack of new blobs at a time, into the full index
        packs = next(_objects(blobs + PER_PACK))  # ids 0… again: only the pack's own rows are new
        t = time.perf_counter()
        for pack_id, entries in packs.items():
            index.add_pack(pack_id[::-1], [e.__class__(e.blob_type, e.blob_id[::-1], e.offset, e.length,
                                                       e.raw_length) for e in entries])
        out["add_pack_rows_per_s"] = round(PER_PACK * PACKS_PER_OBJECT / (time.perf_counter() - t))
    out["rss_peak_mib"] = round(_rss_mib() - base_rss, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=2_000_000)
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--variants", default="dict,sqlite")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.blobs, threads, args.lookups)))
        return
    for variant in args.variants.split(","):
        subprocess.run([sys.executable, __file__, "--child", variant, "--blobs", str(args.blobs),
                        "--threads", args.threads, "--lookups", str(args.lookups)], check=True)


if __name__ == "__main__":
    main()
