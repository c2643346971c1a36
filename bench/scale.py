#!/usr/bin/env python3
"""Scale benchmark: zfsbackd vs restic on millions of small files, and opening a store of many blobs.

Run as root (it creates a loopback file system):

    sudo /work/main/.venv/bin/python bench/scale.py                        # 100k, 1M and 3M files (~1 h, estimated)
    sudo /work/main/.venv/bin/python bench/scale.py --files 100000         # one N (~1.5 min here)
    sudo /work/main/.venv/bin/python bench/scale.py --synthetic-blobs 10000000
    python3 bench/scale.py --report bench/results/A-scale.json bench/results/B-scale.json

Files mode, per N: a fresh loopback XFS (reflink=1), N files of 64 B-4 KiB of
random bytes in about sqrt(N) directories (deterministic from ``--seed``), then
for each tool, page cache dropped before every step: full backup, no-change
backup, backup after 1 % of the files were rewritten, full restore plus a check
of the restored tree. Small files are where per-file costs (a stat, an open, an
index entry, a tree entry, restic's and zfsbackd's per-blob memory) dominate, so
this is the benchmark that shows how each tool grows with N.

Synthetic mode, per blob count: a store whose index lists that many blobs, written
straight through zfsbackd's store API (``Store.write_index``) with fake pack ids,
so building it takes seconds instead of a backup of millions of files. Then
``Store.open`` + ``load_index`` in a fresh process: nocache (the local index cache
in state_dir deleted, page cache dropped: a host's first open), cold (the cache
that open built, page cache dropped) and warm (again right after).

The loop file system, the measuring launcher (wall time, CPU and peak RSS from
wait4), the tools and the restore check are bench/run.py's. See bench/README.md
("Scale benchmark").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
VENV_PYTHON = BENCH.parent / ".venv" / "bin" / "python"


def _use_project_python() -> None:
    """Re-run under the project's venv when zfsbackd's dependencies are not importable here.

    run.py's Zfsbackd tool starts ``sys.executable -m zfsbackd.cli`` and the synthetic mode imports
    zfsbackd itself, so the interpreter running this file must be able to import zfsbackd.
    """
    if all(importlib.util.find_spec(m) is not None for m in ("blake3", "zstandard", "structlog", "boto3")):
        return
    # sys.prefix, not the executable: a venv's python is often a symlink to the very interpreter it runs on.
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
    raise SystemExit("bench/scale.py needs zfsbackd's dependencies: run it with /work/main/.venv/bin/python")


if __name__ == "__main__":
    _use_project_python()

import blake3  # noqa: E402

sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))  # zfsbackd itself (the synthetic mode's children import it)
import run as base  # noqa: E402  (bench/run.py: loop file system, launcher, tools, restore check)
import s3 as s3bench  # noqa: E402  (bench/s3.py: Ceph RGW, the tools on S3, buckets)

KiB, MiB, GiB = base.KiB, base.MiB, base.GiB
log = base.log
DEFAULT_FILES = (100_000, 1_000_000, 3_000_000)
SCALE_TOOLS = ("zfsbackd", "restic")
BACKUP_STEPS = ("full", "nochange", "churn")
FILE_STEPS = (*BACKUP_STEPS, "restore")
STORE_STEPS = ("build", "open-nocache", "open-cold", "open-warm")
# zfsbackd's other operations, on the store the file steps left (issue 13: every operation under one bound):
# CLI arguments after ``--config``; {first}/{last} are the full and newest backups, {path} one leaf directory.
OPERATIONS = {
    "describe": ("describe-backups",),
    "restore-path": ("restore-backup", "--backup-id", "{last}", "--path", "{path}", "--target", "{target}"),
    "check": ("check",),
    "check-read-data": ("check", "--read-data"),
    "copy": ("copy-backup", "--source-backup-id", "{last}", "--destination-region", "{copy_region}"),
    "delete": ("delete-backup", "--backup-id", "{first}"),
    "gc": ("gc", "--grace-period", "0"),
}
MIN_SIZE, MAX_SIZE = 64, 4 * KiB
GROWTH_NOTE = ("value at the largest N ÷ value at the smallest; k = log(ratio) / log(N ratio): "
               "k = 1 grows like N, k = 0 stays flat, so ×10 N costs ×10^k")


# ============================================================ the files
def layout(n: int) -> tuple[int, int]:
    """(leaf directories, top-level groups): about sqrt(N) leaves of about sqrt(N) files each, under sqrt(leaves)
    groups, so neither the root nor any leaf holds a degenerate number of entries at any N."""
    leaves = max(1, round(math.sqrt(n)))
    return leaves, max(1, round(math.sqrt(leaves)))


def leaf_dir(j: int, groups: int) -> str:
    return f"g{j % groups:03d}/d{j:04d}"


def file_rel(i: int, n: int) -> str:
    """File *i*'s path relative to the data root; churn finds its files by index without walking the tree."""
    leaves, groups = layout(n)
    return f"{leaf_dir(i % leaves, groups)}/f{i:07d}"


def generate_files(root: Path, n: int, seed: int) -> base.GenInfo:
    """N files of MIN_SIZE..MAX_SIZE random bytes, deterministic from *seed* (sizes, names and bytes).

    Written directory by directory through a directory fd (no path lookup per file), so generation time
    stays small next to the backups even at millions of files. ``seconds`` includes the final sync: the time
    to have the files on disk.
    """
    t0 = time.perf_counter()
    data = base.Data(seed, pool_size=64 * KiB)  # only Data.random is used: a small text pool starts fast
    rng = random.Random(f"scale-{seed}")
    leaves, groups = layout(n)
    info = base.GenInfo(files=n, dirs=leaves + groups)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for j in range(leaves):
        d = root / leaf_dir(j, groups)
        d.mkdir(parents=True)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i in range(j, n, leaves):
                size = rng.randint(MIN_SIZE, MAX_SIZE)
                fd = os.open(f"f{i:07d}", flags, 0o644, dir_fd=dfd)
                try:
                    os.write(fd, data.random(rng, size))
                finally:
                    os.close(fd)
                info.bytes += size
                info.apparent_bytes += size
        finally:
            os.close(dfd)
    os.sync()
    info.seconds = round(time.perf_counter() - t0, 2)
    return info


def churn_files(root: Path, n: int, seed: int, fraction: float) -> dict[str, Any]:
    """Rewrite *fraction* of the files in place with new random bytes of the same size (deterministic).

    Same size and inode, only mtime/ctime and content change: the change every tool must notice from
    metadata alone, with no new or deleted entries to make it easy.
    """
    t0 = time.perf_counter()
    data = base.Data(seed, pool_size=64 * KiB)
    rng = random.Random(f"scale-churn-{seed}")
    picks = sorted(rng.sample(range(n), k=min(n, max(1, round(n * fraction)))))
    written = 0
    for i in picks:
        fd = os.open(root / file_rel(i, n), os.O_WRONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, data.random(rng, size), 0)
        finally:
            os.close(fd)
        written += size
    return {"modified": len(picks), "bytes": written, "fraction": fraction,
            "seconds": round(time.perf_counter() - t0, 3)}


def sample_predicate(fraction: float) -> Callable[[bytes], bool]:
    """Accept about *fraction* of relative paths, the same ones in the source and in every restore."""
    cut = int(fraction * (1 << 32))
    return lambda rel: zlib.crc32(rel) < cut


# ============================================================ the synthetic store
class Floor(base.Tool):
    """What the machine allows without any backup tool: GNU find, xargs, cat and cp, 8 streams in parallel.

    ``full``: read every file once (``cat`` to /dev/null); ``nochange`` and ``churn``:
    ``lstat`` every entry (``find -printf %s``), which is all a backup that reads no
    file content must do. Both cold, like the tools. ``restore``: ``cp -a`` of the
    source tree into the target, timed after the source was read into the page cache
    (untimed), so what is measured is creating the files and writing their bytes,
    which a restore must do and a tool cannot do for less. A target below these times
    is out of reach on this machine, whatever the tool.
    """

    name = "floor"
    STREAMS = 8

    def setup(self) -> dict[str, Any]:
        return {"version": f"GNU find/xargs/cat, {self.STREAMS} streams"}

    def backup(self, step: str) -> tuple[base.Measure, dict[str, Any]]:
        data, streams = str(self.data), str(self.STREAMS)
        if step == "full":
            script = 'find "$1" -type f -print0 | xargs -0 -r -P "$2" -n 512 cat > /dev/null'
        else:
            script = ('find "$1" -mindepth 1 -maxdepth 1 -print0 | '
                      'xargs -0 -r -P "$2" -I{} find {} -printf "%s\\n" > /dev/null')
        m = self.runner.run(f"floor-{step}", ["sh", "-c", script, "floor", data, streams], env=self.env, cwd="/")
        return m, {}

    def restore(self, target: Path) -> tuple[base.Measure, Path | None]:
        data, streams, restored = str(self.data), str(self.STREAMS), target / self.data.name
        self.runner.run_checked("floor-restore-warm", ["sh", "-c", 'find "$1" -type f -print0 | '
                                'xargs -0 -r -P "$2" -n 512 cat > /dev/null', "warm", data, streams],
                                env=self.env, cwd="/")
        restored.mkdir()
        script = ('find "$1" -mindepth 1 -maxdepth 1 -print0 | xargs -0 -r -P "$2" -I{} cp -a {} "$3"/ && '
                  'touch -r "$1" "$3" && chmod --reference="$1" "$3"')
        m = self.runner.run("floor-restore", ["sh", "-c", script, "floor", data, streams, str(restored)],
                            env=self.env, cwd="/")
        return m, restored if m.rc == 0 else None


#: the tools --tools can name: bench/run.py's and the floor
SCALE_TOOL_CLASSES: dict[str, type[base.Tool]] = {**base.TOOL_CLASSES, "floor": Floor}


class SyntheticStore(base.Zfsbackd):
    """run.py's zfsbackd set-up (key, config with ``create_if_missing``), driven through this file's child modes.

    The children run under run.py's launcher, so build and open get wall time, CPU and peak RSS from wait4
    like every other step, and each open is a fresh process with nothing cached in memory.
    """

    def internal(self, label: str, *args: str) -> tuple[base.Measure, dict[str, Any]]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--internal", label, "--config", str(self.config),
                *args]
        m = self.runner.run(f"zfsbackd-{label}", argv, env=self.env, cwd=base.PROJECT)
        return m, (base.json_document(m.stdout) if m.rc == 0 else {})


def _rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process (MiB): lets the child split its peak into interpreter+imports and index."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return round(kib / 1024, 1)


def build_store(config: Path, blobs: int, seed: int, blob_size: int, consolidated: bool) -> dict[str, Any]:
    """Write index objects listing *blobs* blobs, as backups' checkpoints would (or one object, as after gc).

    Blob ids are a BLAKE3 stream of *seed*; every blob claims *blob_size* plaintext bytes and the sealed size
    the store's codec gives such a blob; packs hold as many as fit the writer's pack size and each index
    object covers the writer's ``checkpoint_every`` packs. The pack ids are fake (no ``data/`` objects):
    opening the store never reads packs that an index lists, so this measures exactly the open.
    """
    from zfsbackd.config import load_config
    from zfsbackd.engine.engine import Engine
    from zfsbackd.logs import configure_logging
    from zfsbackd.store.blobs import BlobType
    from zfsbackd.store.packs import PackEntry
    from zfsbackd.store.writer import DEFAULT_PACK_SIZE, PackWriter

    configure_logging()
    store = Engine(load_config(config)).store()  # created now: run.py's config says create_if_missing
    sample = blake3.blake3(b"scale-sample").digest(blob_size)
    sealed = len(store.codec.encode(store.hasher.blob_id(sample), sample))
    per_pack = max(1, DEFAULT_PACK_SIZE // sealed)
    per_object = blobs if consolidated else per_pack * PackWriter.__init__.__kwdefaults__["checkpoint_every"]
    ids = blake3.blake3(f"scale-synthetic-blobs-{seed}".encode())
    objects = 0
    for first in range(0, blobs, per_object):
        count = min(per_object, blobs - first)
        raw = ids.digest(32 * count, seek=32 * first)
        packs: dict[bytes, list[PackEntry]] = {}
        for p in range(0, count, per_pack):
            pack_id = blake3.blake3(f"scale-synthetic-pack-{seed}-{(first + p) // per_pack}".encode()).digest()
            packs[pack_id] = [PackEntry(BlobType.DATA, raw[32 * k : 32 * k + 32], (k - p) * sealed, sealed, blob_size)
                              for k in range(p, min(p + per_pack, count))]
        store.write_index(packs)
        objects += 1
    return {"blobs": blobs, "index_objects": objects, "blobs_per_pack": per_pack, "sealed_blob_bytes": sealed,
            "layout": "consolidated" if consolidated else "checkpoints", "store_id": store.store_id}


def open_store(config: Path, drop_index_cache: bool = False) -> dict[str, Any]:
    """Open the home region's store and load its index the way a backup does, timing each part.

    ``drop_index_cache`` deletes the local index cache (``state_dir/cache``) first: a host's first open.
    """
    t0 = time.perf_counter()
    from zfsbackd.config import load_config
    from zfsbackd.engine.engine import Engine
    from zfsbackd.logs import configure_logging

    imported = time.perf_counter()
    rss_imports = _rss_mib("VmRSS")
    configure_logging()
    engine = Engine(load_config(config))
    if drop_index_cache:
        shutil.rmtree(engine.config.state_dir / "cache", ignore_errors=True)
    store = engine.store()
    opened = time.perf_counter()
    gets = store.objects.metrics.requests["get"]
    store.load_index(record_adopted=False)
    loaded = time.perf_counter()
    read = store.objects.metrics.requests["get"] - gets
    rss_peak = _rss_mib("VmHWM")  # before counting the blobs (a scan of the cache), as the index is used
    blobs = len(store.index)
    return {"import_s": round(imported - t0, 3), "open_s": round(opened - imported, 3),
            "load_index_s": round(loaded - opened, 3), "count_blobs_s": round(time.perf_counter() - loaded, 3),
            "blobs": blobs,
            "index_objects": len(store.index_keys), "index_objects_read": read,
            "rss_after_imports_mib": rss_imports, "rss_peak_mib": rss_peak}


# ============================================================ the bench
class ScaleBench(base.Bench):
    """run.py's Bench (results file, launcher, loop file system, ``_record``), with scale's own datasets."""

    def __init__(self, args: argparse.Namespace, server: s3bench.S3Server | None = None) -> None:
        """*server*: the S3 server whose buckets hold the stores (``--s3``); None: directories on the image."""
        super().__init__(args, suffix="-scale")
        self.results["mode"] = "scale"
        self.server = server
        self.client = server.client() if server is not None else None
        self._buckets: list[str] = []
        if server is not None:
            self.results["s3"] = server.public()

    def run(self) -> None:
        for n in self.args.files:
            self.run_files(n)
        for n in self.args.synthetic_blobs:
            self.run_synthetic(n)
        self.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.save()
        print("\n" + render_report(self.results) + "\n")
        print(f"results: {self.result_path}")
        print(f"logs:    {self.logdir}")

    def _record(self, ds: dict[str, Any], step: str, tool: base.Tool, m: base.Measure,
                stats: dict[str, Any]) -> dict[str, Any]:
        r = super()._record(ds, step, tool, m, stats)
        if self.client is not None and hasattr(tool, "store_location"):
            s3bench.record_bucket_usage(self.client, r, tool)
        if ds.get("files") and m.wall_s > 0:
            r["files_per_s"] = round(ds["files"] / m.wall_s, 1)
            self.save()
        return r

    @contextlib.contextmanager
    def dataset(self, name: str, ds: dict[str, Any], image: int, needed: int) -> Iterator[Path]:
        """A fresh loop file system for one dataset, saved, unmounted and deleted whatever happens."""
        free = shutil.disk_usage(self.base.parent).free
        log(f"=== {name}: image {image / GiB:.1f} GiB (sparse) on {self.base.parent} ({free / GiB:.0f} GiB free, "
            f"~{needed / GiB:.1f} GiB needed)")
        if free < needed:
            raise SystemExit(f"not enough space under {self.base.parent} for {name}")
        self.fs.create(image)
        self._current = (name, [], ds)  # save() writes it as it fills in
        try:
            yield self.fs.mnt
        finally:
            self.save()
            self._current = None
            self.runner.stop_child()  # an interrupted step's child must go before the unmount
            if self.client is not None:
                s3bench.drop_buckets(self.client, self._buckets, self.args.keep_buckets)
            self.fs.destroy()

    def run_files(self, n: int) -> None:
        args = self.args
        ds: dict[str, Any] = {"kind": "files", "files": n, "fs": "xfs", "cold": True, "seed": args.seed,
                              "steps": {}}
        if self.server is not None:
            ds["s3"] = self.server.public()
        # Per file: source and one restore (a 4 KiB block and an inode each), zfsbackd's reflink snapshot
        # (an inode), two stores; the image is sparse, the check is on what it will really use.
        with self.dataset(f"files-{n}", ds, image=n * 24 * KiB + 2 * GiB, needed=n * 15 * KiB + GiB) as mnt:
            data = mnt / "data"
            data.mkdir()
            log(f"generating {n:,} files in {data}")
            info = generate_files(data, n, args.seed)
            ds["generated"] = asdict(info)
            log(f"generated {info.files:,} files in {info.dirs:,} directories, {info.bytes / MiB:,.0f} MiB in "
                f"{info.seconds:.1f} s ({info.files / max(info.seconds, 1e-9):,.0f} files/s)")
            tools = self._tools(n, mnt / "work", data)
            for tool in tools:
                self.results["tools"][tool.name] = tool.setup()
            for step in BACKUP_STEPS:
                if step == "churn":
                    ds["churn"] = churn_files(data, n, args.seed, args.churn)
                    log(f"churn applied: {ds['churn']}")
                for tool in tools:
                    base.settle(True)
                    m, stats = tool.backup(step)
                    r = self._record(ds, step, tool, m, stats)
                    log(f"{n:,} files {step:9s} {tool.name:8s} {r['wall_s']:8.2f} s wall "
                        f"{r.get('files_per_s', 0):9,.0f} files/s {r['peak_rss_mib']:7.0f} MiB RSS  "
                        f"store {r['store_mib']:9.1f} MiB")
            sampled = n > args.verify_full_max
            ds["verify_mode"] = {"kind": "sampled" if sampled else "full",
                                 "content_fraction": args.verify_sample if sampled else 1.0}
            base.restore_and_verify(self, ds, f"{n:,} files", tools, data, mnt, True,
                                    sample_predicate(args.verify_sample) if sampled else None)
            for tool in tools:
                if isinstance(tool, base.Zfsbackd):
                    self.run_operations(ds, tool, mnt)
            print("\n" + render_files_table(ds, self.tools) + "\n", flush=True)

    def _tools(self, n: int, work: Path, data: Path) -> list[base.Tool]:
        """The tools of one run: their stores in directories below *work*, or in fresh buckets (``--s3``)."""
        if self.server is None or self.client is None:
            tools = [SCALE_TOOL_CLASSES[t](self.runner, work, data) for t in self.tools]
            for tool in tools:
                if isinstance(tool, base.Zfsbackd):
                    tool.copy_region = work / "repos" / "zfsbackd-copy"
            return tools
        stem = f"zb-{self.stamp.lower()}-files-{n}"
        buckets = {role: f"{stem}-{role}" for role in ("zfsbackd", "zfsbackd-copy", "restic")}
        for bucket in buckets.values():
            self.client.create_bucket(Bucket=bucket)
            self._buckets.append(bucket)
        regions = {s3bench.HOME_REGION: buckets["zfsbackd"], s3bench.COPY_REGION: buckets["zfsbackd-copy"]}
        return [
            s3bench.S3Zfsbackd(self.runner, work, data, self.server, regions) if t == "zfsbackd"
            else s3bench.S3Restic(self.runner, work, data, self.server, buckets["restic"])
            for t in self.tools
        ]

    def run_operations(self, ds: dict[str, Any], tool: base.Zfsbackd, mnt: Path) -> None:
        """Each of OPERATIONS once, page cache dropped first, with wall time and peak RSS like the backups."""
        n = ds["files"]
        first = ds["steps"]["full"]["zfsbackd"]["tool_stats"].get("BackupId")
        values = {"first": first, "last": tool.last_backup, "path": leaf_dir(0, layout(n)[1]),
                  "target": str(mnt / "restore" / "zfsbackd-path"),
                  "copy_region": s3bench.COPY_REGION if isinstance(tool, s3bench.S3Zfsbackd) else "copy"}
        Path(values["target"]).mkdir(parents=True)
        for step, argv in OPERATIONS.items():
            base.settle(True)
            cli = tool.cli(*(a.format(**values) for a in argv), "--config", str(tool.config), profile=step)
            m = self.runner.run(f"zfsbackd-{step}", cli, env=tool.env, cwd=base.PROJECT)
            r = self._record(ds, step, tool, m, {})
            log(f"{n:,} files {step:15s} zfsbackd {r['wall_s']:8.2f} s wall {r['peak_rss_mib']:7.0f} MiB RSS")

    def run_synthetic(self, blobs: int) -> None:
        args = self.args
        ds: dict[str, Any] = {"kind": "synthetic", "blobs": blobs, "fs": "xfs", "seed": args.seed,
                              "blob_size": args.synthetic_blob_size, "layout": args.synthetic_layout, "steps": {}}
        # ~60 bytes of index per blob, plus the key, config and state: small next to the 2 GiB floor.
        with self.dataset(f"synthetic-{blobs}", ds, image=blobs * 256 + 2 * GiB, needed=blobs * 128 + GiB) as mnt:
            data = mnt / "data"  # the config names a source; nothing is backed up from it
            data.mkdir()
            tool = SyntheticStore(self.runner, mnt / "work", data)
            self.results["tools"][tool.name] = tool.setup()
            build_args = ["--blobs", str(blobs), "--seed", str(args.seed),
                          "--synthetic-blob-size", str(args.synthetic_blob_size),
                          "--synthetic-layout", args.synthetic_layout]
            log(f"building a store of {blobs:,} blobs ({args.synthetic_layout})")
            children = {"build": ("build", build_args), "open-nocache": ("open", ["--drop-index-cache"]),
                        "open-cold": ("open", []), "open-warm": ("open", [])}
            for step in STORE_STEPS:
                # nocache: a host's first open (the local index cache deleted, page cache dropped); cold: the
                # cache that open built, page cache dropped; warm: right after
                base.settle(step in ("open-nocache", "open-cold"))
                label, extra = children[step]
                m, stats = tool.internal(label, *extra)
                r = self._record(ds, step, tool, m, stats)
                log(f"{blobs:,} blobs {step:9s} {r['wall_s']:8.2f} s wall {r['peak_rss_mib']:7.0f} MiB RSS  "
                    f"store {r['store_mib']:9.1f} MiB  {stats}")
                if m.rc != 0:
                    break
            print("\n" + render_synthetic_table(ds) + "\n", flush=True)


# ============================================================ tables
def _load_range(ds: dict[str, Any]) -> str:
    loads = [r["loadavg_1m_after"] for step in ds.get("steps", {}).values() for r in step.values()
             if "loadavg_1m_after" in r]
    return f", load avg {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores" if loads else ""


def _cell(r: dict[str, Any] | None, key: str, digits: int) -> str:
    if not r:
        return "—"
    if not r.get("ok"):
        return "FAILED"
    v = r.get(key)
    return "—" if v is None else f"{v:,.{digits}f}"


FILE_COLUMNS = (("wall s", "wall_s", 2), ("files/s", "files_per_s", 0), ("CPU s", "cpu_s", 1),
                ("RSS MiB", "peak_rss_mib", 0), ("store MiB", "store_mib", 1))


def _stores(ds: dict[str, Any]) -> str:
    s3 = ds.get("s3")
    return f"stores in S3 ({s3.get('kind', 'S3')} at {s3.get('endpoint', '?')})" if s3 else "stores on the same XFS"


def render_files_table(ds: dict[str, Any], tools: list[str]) -> str:
    """One table per N: a row per step, wall / files/s / CPU / peak RSS / store size per tool."""
    g = ds.get("generated", {})
    verify = ds.get("verify_mode", {})
    check = ("full: every entry's metadata and every file's BLAKE3" if verify.get("kind") == "full" else
             f"sampled: every entry's metadata, BLAKE3 of {verify.get('content_fraction', 0):.0%} of the files")
    churn = ds.get("churn", {})
    lines = [f"### {ds['files']:,} files, {g.get('bytes', 0) / MiB:,.0f} MiB in {g.get('dirs', 0):,} directories "
             f"— XFS reflink=1, {_stores(ds)}, page cache dropped before every step{_load_range(ds)}", "",
             f"Generated in {g.get('seconds', 0):.1f} s; churn rewrote {churn.get('modified', 0):,} files; "
             f"restore check {check}.", ""]
    head = ["step"] + [f"{t} {label}" for t in tools for label, _, _ in FILE_COLUMNS]
    ratio = "zfsbackd" in tools and "restic" in tools
    if ratio:
        head.append("zfsbackd/restic wall")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    steps = ds.get("steps", {})
    for step in FILE_STEPS:
        row = [step] + [_cell(steps.get(step, {}).get(t), key, digits) for t in tools
                        for _, key, digits in FILE_COLUMNS]
        if ratio:
            row.append(base.ratio_cell(steps, step))
        lines.append("| " + " | ".join(row) + " |")
    row = ["restore identical"]
    for t in tools:
        row += [base.identical_cell(steps, t)] + [""] * (len(FILE_COLUMNS) - 1)
    lines.append("| " + " | ".join([*row, ""] if ratio else row) + " |")
    return "\n".join([*lines, "", _what_was_read(steps), "", *_operations_table(steps)])


def _operations_table(steps: dict[str, Any]) -> list[str]:
    """zfsbackd's other operations (OPERATIONS): wall and peak RSS."""
    rows = [(op, steps[op]["zfsbackd"]) for op in OPERATIONS if "zfsbackd" in steps.get(op, {})]
    if not rows:
        return []
    lines = ["| zfsbackd operation | wall s | CPU s | RSS MiB |", "|---|---:|---:|---:|"]
    for op, r in rows:
        lines.append(f"| {op} | " + " | ".join(_cell(r, key, digits) for key, digits in
                                                (("wall_s", 2), ("cpu_s", 1), ("peak_rss_mib", 0))) + " |")
    return lines


def _what_was_read(steps: dict[str, Any]) -> str:
    """Each tool's own count of files it read, so a no-change backup that reads everything shows up."""
    parts = []
    for step in BACKUP_STEPS:
        z = (steps.get(step, {}).get("zfsbackd") or {}).get("tool_stats") or {}
        r = (steps.get(step, {}).get("restic") or {}).get("tool_stats") or {}
        counts = (z.get("FilesRead"), r.get("files_new", 0) + r.get("files_changed", 0) if r else None)
        parts.append(f"{step} " + " / ".join("—" if c is None else f"{c:,}" for c in counts))
    return "Files read (zfsbackd `FilesRead` / restic new+changed): " + ", ".join(parts) + "."


STORE_COLUMNS = (("process wall s", lambda r: r.get("wall_s"), 2),
                 ("imports s", lambda r: r["tool_stats"].get("import_s"), 2),
                 ("Store.open s", lambda r: r["tool_stats"].get("open_s"), 3),
                 ("load_index s", lambda r: r["tool_stats"].get("load_index_s"), 2),
                 ("index objects read", lambda r: r["tool_stats"].get("index_objects_read"), 0),
                 ("counting blobs s", lambda r: r["tool_stats"].get("count_blobs_s"), 2),
                 ("peak RSS MiB", lambda r: r.get("peak_rss_mib"), 0),
                 ("RSS after imports MiB", lambda r: r["tool_stats"].get("rss_after_imports_mib"), 0),
                 ("blobs loaded", lambda r: r["tool_stats"].get("blobs"), 0))


def render_synthetic_table(ds: dict[str, Any]) -> str:
    """Building the store, then opening it cold and warm: where the time and the memory go."""
    steps = ds.get("steps", {})
    build = (steps.get("build") or {}).get("zfsbackd") or {}
    info = build.get("tool_stats") or {}
    objects = info.get("index_objects", 0)
    lines = [f"### synthetic store: {ds['blobs']:,} blobs ({ds.get('layout')}: {objects:,} "
             f"index object{'' if objects == 1 else 's'}, {info.get('blobs_per_pack', 0):,} blobs of "
             f"{ds.get('blob_size', 0):,} B per pack), "
             f"store {build.get('store_mib', 0):,.1f} MiB{_load_range(ds)}", "",
             f"Built in {build.get('wall_s', 0):.1f} s (peak RSS {build.get('peak_rss_mib', 0):,.0f} MiB).", ""]
    head = ["open", *(label for label, _, _ in STORE_COLUMNS), "index RSS per 1M blobs MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for step in STORE_STEPS[1:]:
        r = steps.get(step, {}).get("zfsbackd")
        if not r or not r.get("ok"):
            lines.append(f"| {step.removeprefix('open-')} | " + " | ".join(["FAILED" if r else "—"] * (len(head) - 1))
                         + " |")
            continue
        cells = [f"{v:,.{digits}f}" if (v := get(r)) is not None else "—" for _, get, digits in STORE_COLUMNS]
        s = r["tool_stats"]
        per_m = (r["peak_rss_mib"] - s["rss_after_imports_mib"]) / s["blobs"] * 1e6 if s.get("blobs") else None
        lines.append(f"| {step.removeprefix('open-')} | " + " | ".join(cells) + f" | {base.fmt(per_m, 0)} |")
    return "\n".join(lines)


def _growth_cell(small: float | None, large: float | None, n_ratio: float) -> str:
    if not small or large is None or small <= 0 or large <= 0:
        return "—"
    ratio = large / small
    return f"×{ratio:.2f} (k {math.log(ratio) / math.log(n_ratio):.2f})"


def render_growth(dss: list[dict[str, Any]], size_key: str, steps: tuple[str, ...], tools: list[str],
                  metrics: list[tuple[str, Callable[[dict[str, Any]], float | None]]]) -> str:
    """A line per metric and tool: how it grows from the smallest to the largest N, per step."""
    dss = sorted(dss, key=lambda d: d[size_key])
    small, large = dss[0], dss[-1]
    n_ratio = large[size_key] / small[size_key]
    lines = [f"### Growth, {size_key} {small[size_key]:,} → {large[size_key]:,} (×{n_ratio:g})", "",
             f"Each cell: {GROWTH_NOTE}.", "",
             "| metric | tool | " + " | ".join(steps) + " |", "|---|---|" + "---:|" * len(steps)]

    def value(ds: dict[str, Any], step: str, tool: str, get: Callable[[dict[str, Any]], float | None]) -> float | None:
        r = ds.get("steps", {}).get(step, {}).get(tool)
        return get(r) if r and r.get("ok") else None

    for label, get in metrics:
        for tool in tools:
            cells = [_growth_cell(value(small, s, tool, get), value(large, s, tool, get), n_ratio) for s in steps]
            lines.append(f"| {label} | {tool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    """Every dataset's table, smallest first, then the growth lines of each mode that has two sizes or more."""
    datasets = list(results.get("datasets", {}).values())
    files = sorted((d for d in datasets if d.get("kind") == "files"), key=lambda d: d["files"])
    stores = sorted((d for d in datasets if d.get("kind") == "synthetic"), key=lambda d: d["blobs"])
    tools = [t for t in results.get("args", {}).get("tools", ",".join(SCALE_TOOLS)).split(",") if t]
    parts = [render_files_table(d, tools) for d in files] + [render_synthetic_table(d) for d in stores]
    if len(files) > 1:
        parts.append(render_growth(files, "files", FILE_STEPS, tools, [
            (label, lambda r, k=key: r.get(k)) for label, key, _ in FILE_COLUMNS]))
    if len(stores) > 1:
        parts.append(render_growth(stores, "blobs", STORE_STEPS, ["zfsbackd"], [
            ("process wall s", lambda r: r.get("wall_s")),
            ("load_index s", lambda r: r["tool_stats"].get("load_index_s")),
            ("peak RSS MiB", lambda r: r.get("peak_rss_mib")),
            ("store MiB", lambda r: r.get("store_mib"))]))
    return "\n\n".join(parts)


def merge_results(paths: list[str]) -> dict[str, Any]:
    """Several runs' JSON as one report (a 3M run is a night's work: run each N apart, report them together)."""
    merged: dict[str, Any] = {"datasets": {}, "args": {"tools": ",".join(SCALE_TOOLS)}}
    for path in paths:
        results = json.loads(Path(path).read_text())
        merged["args"] = results.get("args", merged["args"])
        merged["datasets"].update(results.get("datasets", {}))
    return merged


# ============================================================ command line
def parse_counts(text: str) -> list[int]:
    """``100000,1M,3m,20k`` → [20000, 100000, 1000000, 3000000] (sorted, so growth reads left to right)."""
    units = {"k": 1_000, "m": 1_000_000}
    counts = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        mult = units.get(part[-1], 1)
        number = float(part[:-1] if mult > 1 else part) * mult
        if number < 1 or number != int(number):
            raise argparse.ArgumentTypeError(f"{part!r} is not a positive whole count")
        counts.append(int(number))
    return sorted(set(counts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=parse_counts, default=None, metavar="N,N,…",
                        help="file counts (default 100k,1M,3M; none when only --synthetic-blobs is given)")
    parser.add_argument("--synthetic-blobs", type=parse_counts, default=[], metavar="N,N,…",
                        help="build stores whose index holds N blobs and time opening them cold and warm")
    parser.add_argument("--synthetic-blob-size", type=int, default=2 * KiB, metavar="BYTES",
                        help="plaintext size each synthetic blob claims; sets blobs per pack (default 2048, the "
                             "files mode's mean)")
    parser.add_argument("--synthetic-layout", choices=("checkpoints", "consolidated"), default="checkpoints",
                        help="index objects as a backup's checkpoints write them (every 4 packs), or one object "
                             "for everything as garbage collection leaves it")
    parser.add_argument("--tools", default=",".join(SCALE_TOOLS),
                        help="comma list of: zfsbackd, restic, borg, floor (GNU find/cat/cp: what the machine allows)")
    parser.add_argument("--churn", type=float, default=0.01, help="fraction of files rewritten (default 0.01)")
    parser.add_argument("--verify-full-max", type=int, default=300_000, metavar="N",
                        help="hash every restored file up to N files; above, a sampled check (default 300000)")
    parser.add_argument("--verify-sample", type=float, default=0.01,
                        help="fraction of files hashed by the sampled check (default 0.01)")
    parser.add_argument("--s3", action="store_true",
                        help="the stores in S3 buckets on Ceph RGW on 127.0.0.1, as bench/s3.py (started with "
                             "../shared/s3/ceph-rgw.sh; stopped again if this run started it)")
    parser.add_argument("--keep-buckets", action="store_true", help="with --s3: leave the buckets behind")
    parser.add_argument("--seed", type=int, default=1, help="data seed (same seed, same files)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the loopback image goes (default /var/tmp)")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="print the tables and growth lines of earlier runs' results files; runs nothing")
    parser.add_argument("--internal", choices=("build", "open"), help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--blobs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--drop-index-cache", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(fs="xfs")  # what run.py's Bench reads
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.internal == "build":
        print(json.dumps(build_store(Path(args.config), args.blobs, args.seed, args.synthetic_blob_size,
                                     args.synthetic_layout == "consolidated")))
        return 0
    if args.internal == "open":
        print(json.dumps(open_store(Path(args.config), args.drop_index_cache)))
        return 0
    if args.report:
        print(render_report(merge_results(args.report)))
        return 0
    if args.files is None:
        args.files = [] if args.synthetic_blobs else list(DEFAULT_FILES)
    for name in args.tools.split(","):
        if name not in SCALE_TOOL_CLASSES:
            parser.error(f"--tools: unknown tool {name!r}; use {', '.join(SCALE_TOOL_CLASSES)}")
    if not 0 < args.churn <= 1 or not 0 < args.verify_sample <= 1:
        parser.error("--churn and --verify-sample are fractions in (0, 1]")
    if args.s3 and "floor" in args.tools.split(","):
        parser.error("--s3: the floor tool has no store to put in S3; leave it out of --tools")
    if os.geteuid() != 0:
        parser.error("run as root (it creates and mounts a loopback file system)")
    base.ensure_tools("xfs")
    server = s3bench.start_ceph() if args.s3 else None
    try:
        return base.run_bench(ScaleBench(args, server))
    finally:
        if server is not None:
            s3bench.stop_ceph(server)


if __name__ == "__main__":
    sys.exit(main())
