#!/usr/bin/env python3
"""The ZFS path of the benchmark: zfs-diff incrementals vs zfsbackd's full walk vs restic, on real OpenZFS.

Runs INSIDE the zfsvm VM, as root (start it with ``bench/zfs.sh``, which makes the
venv and boots the VM once):

    bench/zfs.sh                      # 50,000 files
    bench/zfs.sh --files 5000         # a quicker run

What it does, in one process and one VM boot:

1. makes a pool on a sparse file in /var/tmp with two datasets: ``<pool>/data``
   (the file system backed up) and ``<pool>/work`` (both tools' repositories,
   caches and zfsbackd's state, so they share one disk);
2. writes ``--files`` files into ``data`` (deterministic: sizes log-uniform
   between ``--min-size`` and ``--max-size``, half text-like, half random,
   ~300 directories per 50,000 files in 2-3 levels, symlinks, empty files,
   several modes/owners, ns mtimes; ``--hardlinks`` adds hard links, off by default);
3. initial backups (context only): zfsbackd (which takes and keeps snapshot S0),
   then restic of S0;
4. ``nochange``: nothing changed. ``churn``: ~1 % of the files changed (in-place
   edits, appends, deletes, chmods, new files in old and a new directory, one
   leaf directory renamed). Each is measured three ways on the same data:

   * **zfs diff**: ``Engine.create_backup`` end to end — takes snapshot Sn, runs
     ``zfs diff S(n-1) Sn`` on a thread while the archiver already walks (the
     walk skips clean subtrees from the moment the change list is ready, and
     stops ``zfs diff`` if it finishes first), archives only what changed,
     commits (keeps Sn, destroys S(n-1)). In-process, so Python start-up and
     imports are not counted.
   * **full walk**: the same snapshot Sn archived again by ``Archiver`` with the
     same parent tree but no change list (every entry stat'ed and compared with
     the parent backup's tree; only files whose inode/size/mtime/ctime differ are
     read). Only the archiver is timed (it reuses the already loaded store),
     not the snapshot/commit work the zfs-diff row includes — that favours the
     full walk. The bench checks it produces the same root tree as the zfs-diff
     backup.
   * **restic**: ``restic backup`` of the same snapshot Sn, read through its
     snapshot directory ``<mnt>/.zfs/snapshot/<Sn>`` bind-mounted at a fixed
     path (``/mnt/zfsbackd-bench-src``): restic picks its parent snapshot by
     path, so reading ``.zfs/snapshot/<name>`` directly would make every restic
     backup re-read everything. Measured with ``os.wait4`` (wall, user+sys CPU).

Caches are warm (the data was just written; nothing is dropped), and zfs diff
always runs first on a new snapshot, so the later methods find its changed files
in the ARC: both choices favour the full walk and restic.

CPU s: user+sys of this process (all threads) plus waited-for children (``zfs
diff``, ``zfs get``/``list``) for zfsbackd; user+sys of the restic process from
``wait4``. ZFS kernel threads (txg sync) are charged to nobody.

Writes a Markdown table to stdout and everything (per step, per method, the
zfs-diff path's breakdown, restic's JSON summary) to
``bench/results/<UTC stamp>-zfs.json``; zfsbackd's JSON log lines go to
``bench/results/<stamp>-zfs-logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PROJECT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FS_ID = "fs-zfs"
RESTIC_SRC = Path("/mnt/zfsbackd-bench-src")  # fixed path: restic finds its parent snapshot by path
TARGET_RATIO = 5.0

sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The deterministic data and its helpers are bench/run.py's (the same generator as its `small` set).
from run import Data, GenInfo, _finish_dirs, _set_times, churn_small, log  # noqa: E402


def sh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _half_text(data: Data, rng: random.Random, n: int) -> bytes:
    """Half the files text-like (compressible), half random."""
    return data.content(rng, "text" if rng.random() < 0.5 else "random", n)


def generate(root: Path, args: argparse.Namespace, data: Data) -> GenInfo:
    """``args.files`` files in ~300 directories per 50,000 files (2-3 levels), like bench/run.py's small set."""
    t0 = time.perf_counter()
    rng = random.Random(f"zfs-small-{args.seed}")
    info = GenInfo()
    n_files = args.files
    n_dirs = max(6, round(300 * n_files / 50_000))
    n_top = max(2, min(20, n_dirs // 15))
    dirs: list[Path] = []
    for i in range(n_dirs):
        if i < n_top:
            d = root / f"d{i:02d}"
        elif i % 5 == 0 and dirs[-1].parent != root:
            d = dirs[-1] / f"n{i:03d}"
        else:
            d = root / f"d{i % n_top:02d}" / f"s{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    info.dirs = n_dirs
    modes = [0o644] * 12 + [0o600, 0o640, 0o755, 0o444, 0o664]
    owners = [(0, 0)] * 95 + [(1000, 1000)] * 3 + [(65534, 65534), (1234, 5678)]
    lo, hi = math.log(args.min_size), math.log(args.max_size)
    n_empty = max(2, n_files // 2500)
    n_links = max(3, n_files // 250)
    files: list[Path] = []
    regular = n_files - n_empty - args.hardlinks
    for i in range(regular):
        d = dirs[rng.randrange(n_dirs)]
        size = int(math.exp(rng.uniform(lo, hi)))
        p = d / (f"report {i} é ünïcode.txt" if i % 997 == 0 else f"f{i:06d}.dat")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, _half_text(data, rng, size))
            uid, gid = rng.choice(owners)
            if uid:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, rng.choice(modes))
        finally:
            os.close(fd)
        _set_times(p, rng)
        files.append(p)
        info.files += 1
        info.bytes += size
        if i and i % 10_000 == 0:
            log(f"  {i} files written")
    for i in range(n_empty):
        p = dirs[rng.randrange(n_dirs)] / f"empty{i:04d}"
        p.touch()
        _set_times(p, rng)
        info.files += 1
    for i in range(args.hardlinks):
        src = files[rng.randrange(len(files))]
        dst = dirs[rng.randrange(n_dirs)] / f"hl{i:04d}-{src.name}"
        if not dst.exists():
            os.link(src, dst)
            info.hardlinks += 1
            info.files += 1
    for i in range(n_links):
        d = dirs[rng.randrange(n_dirs)]
        target = os.path.relpath(files[rng.randrange(len(files))], d) if rng.random() < 0.9 else f"missing/t{i}"
        link = d / f"ln{i:04d}"
        os.symlink(target, link)
        _set_times(link, rng, follow=False)
        info.symlinks += 1
    _finish_dirs(root, rng)
    info.seconds = time.perf_counter() - t0
    return info


# ============================================================ measuring
@dataclass
class Result:
    method: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    files_read: int | None = None
    files: int | None = None
    bytes_read: int | None = None
    bytes_uploaded: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class InProcess:
    """Wall and CPU (this process's threads + reaped children) of a block of in-process work."""

    def __enter__(self) -> InProcess:
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.user = (r1.ru_utime - self.r0.ru_utime) + (c1.ru_utime - self.c0.ru_utime)
        self.sys = (r1.ru_stime - self.r0.ru_stime) + (c1.ru_stime - self.c0.ru_stime)
        self.children_cpu = (c1.ru_utime - self.c0.ru_utime) + (c1.ru_stime - self.c0.ru_stime)


class Timers:
    """Timing wrappers around two zfsbackd functions (behaviour unchanged): the change list and the archiver."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.changes_s = 0.0
        self.changes_paths: int | None = None
        self.diff_s = 0.0  # `zfs diff` from start to its last line (inside the change list's time)
        self.diff_cpu_s = 0.0  # its user+sys CPU (RUSAGE_CHILDREN once it is reaped)
        self.diff_lines = 0
        self.changes_fallback = False
        self.changes_stopped = False  # the walk finished first and stopped `zfs diff`
        self.archiver_s = 0.0
        self.directories: dict[str, int] = {}  # the archiver's counts of directories not listed / listed by the stream
        self.stream = {"seconds": 0.0, "objects": 0, "stream_bytes": 0, "records": 0}  # send-stream change lists
        self.calls: dict[str, list[float]] = {}  # "zfs get", "lzc_snapshot", "Store.save_record": [count, seconds]

    def _wrap(self, owner: Any, name: str, key: Any) -> None:
        orig = getattr(owner, name)
        calls = self

        @functools.wraps(orig)  # keeps the name: lzc.is_supported(lzc.lzc_channel_program) looks the C name up by it
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                entry = calls.calls.setdefault(key(a), [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def install(self) -> None:
        from zfsbackd.engine import engine as engine_mod
        from zfsbackd.snapshot.zfs import ZfsSnapshot
        from zfsbackd.store.repository import Store
        from zfsbackd.zfs import command
        from zfsbackd.zfs import libzfs_core as lzc

        timers = self
        # zfs/zpool commands (all but `zfs diff`, which is in the change list's time) and libzfs_core calls
        self._wrap(command, "_run", lambda a: f"{a[0]} {a[1][0]}")
        for fn in (
            "lzc_snapshot",
            "lzc_hold",
            "lzc_release",
            "lzc_exists",
            "lzc_bookmark",
            "lzc_get_holds",
            "lzc_destroy_snaps",
            "lzc_get_bookmarks",
            "lzc_destroy_bookmarks",
            "lzc_channel_program",
        ):
            self._wrap(lzc, fn, lambda _a, fn=fn: fn)
        for fn in ("save_record", "load_records", "load_index"):
            self._wrap(Store, fn, lambda _a, fn=fn: f"Store.{fn}")
        # summed over the read-pool threads (so it can exceed the wall time); parent trees: main thread
        from zfsbackd.engine.archiver import Archiver

        self._wrap(Archiver, "_read_file", lambda _a: "Archiver._read_file (thread-s)")
        self._wrap(Archiver, "_read_parent_tree", lambda _a: "Archiver._read_parent_tree")
        orig_changes = ZfsSnapshot.changes_since

        def changes_since(snap: Any, parent_snapshot: dict[str, object], stop: Any = None) -> Any:
            # Runs on the engine's change-list thread, alongside the archiver's walk.
            t0 = time.perf_counter()
            result = None
            try:
                result = orig_changes(snap, parent_snapshot, stop)
            except command.DiffStopped:
                timers.changes_stopped = True
                raise
            finally:
                timers.changes_s += time.perf_counter() - t0
                timers.changes_fallback = result is None
                timers.changes_paths = None if result is None else len(result.touched)
            return result

        ZfsSnapshot.changes_since = changes_since  # type: ignore[method-assign]
        orig_diff = command.diff

        def diff(*a: Any, **kw: Any) -> Any:
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            try:
                for entry in orig_diff(*a, **kw):
                    timers.diff_lines += 1
                    yield entry
            finally:
                timers.diff_s += time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                timers.diff_cpu_s += (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)

        command.diff = diff
        from zfsbackd.zfs import sendstream

        orig_stream = sendstream.incremental_stream

        @contextlib.contextmanager
        def incremental_stream(*a: Any, **kw: Any) -> Any:
            with orig_stream(*a, **kw) as stream:
                yield stream
            summary = stream.summary
            timers.stream["seconds"] += summary.seconds
            timers.stream["objects"] += summary.objects
            timers.stream["stream_bytes"] += summary.stream_bytes
            timers.stream["records"] += sum(summary.records.values())

        sendstream.incremental_stream = incremental_stream
        orig_archiver = engine_mod.Archiver

        class TimedArchiver(orig_archiver):  # type: ignore[misc, valid-type]
            def run(self) -> Any:
                t0 = time.perf_counter()
                try:
                    return super().run()
                finally:
                    timers.archiver_s += time.perf_counter() - t0
                    timers.directories = {
                        "not_listed": self.directories_not_listed,
                        "listings_from_stream": self.directories_listed_by_changes,
                    }

        engine_mod.Archiver = TimedArchiver  # the engine module's name only; the bench's full walk uses the original


# ============================================================ the bench
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.logdir = RESULTS / f"{self.stamp}-zfs-logs"
        self.json_path = RESULTS / f"{self.stamp}-zfs.json"
        self.pool = "zbench" + uuid.uuid4().hex[:6]
        self.vdev = Path(args.workdir) / f"{self.pool}.img"
        self.kept: dict[str, Any] | None = None  # the dataset a --data-pool holds, as its marker describes it
        if args.data_pool:
            self.vdev = Path(args.data_pool).resolve() / "pool.img"
            marker = self.vdev.with_suffix(".json")
            if marker.exists():
                self.kept = json.loads(marker.read_text())
                self.pool = self.kept["pool"]
        self.data_ds = f"{self.pool}/data"
        self.work_ds = f"{self.pool}/work"
        self.doc: dict[str, Any] = {"args": vars(args), "steps": {}}
        self.timers = Timers()
        self.bind_mounted = False
        self.profile_seq = 0

    # ---------------------------------------------------------------- setup
    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        tmp.replace(self.json_path)

    def machine(self) -> dict[str, Any]:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem = next((int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemTotal")), 0)
        return {
            "openzfs": sh("zfs", "version").split()[0],
            "kmod": sh("zfs", "version").split()[-1],
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "memory_mib": mem,
            "restic": sh("restic", "version").strip(),
            "python": sys.version.split()[0],
            "host": os.environ.get("ZFSBENCH_HOST", ""),
        }

    def make_pool(self) -> None:
        if self.kept is not None:
            self.reuse_pool()
            return
        self.vdev.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.vdev.parent).free
        size = min(int(free * 0.85), self.args.pool_gib * GiB) // MiB * MiB
        need = self.args.files * (self.args.min_size + self.args.max_size) // 2 * 3 + 256 * MiB
        if size < need:
            raise SystemExit(
                f"{self.vdev.parent} has {free // MiB} MiB free; the pool needs about {need // MiB} MiB for "
                f"{self.args.files} files (data + two repositories): lower --files/--max-size or use --workdir"
            )
        with self.vdev.open("wb") as f:
            f.truncate(size)
        sh("zpool", "create", "-f", "-O", "atime=off", "-O", "xattr=sa", self.pool, str(self.vdev))
        sh("zfs", "create", self.data_ds)
        sh("zfs", "create", self.work_ds)
        self.doc["pool"] = {"name": self.pool, "vdev": str(self.vdev), "size_mib": size // MiB}

    def reuse_pool(self) -> None:
        """Import the --data-pool's pool: its data dataset as the last run left it (churn included), without
        snapshots or bookmarks, and a new, empty work dataset (repositories, zfsbackd's state). Forced (``-f``):
        a run stopped by its timeout after the generation (500,000 files take ~50 min under TCG) left the pool
        imported by a VM that is gone, never exported."""
        sh("zpool", "import", "-f", "-d", str(self.vdev.parent), self.pool)
        for kind in ("bookmark", "snapshot"):
            for name in sh("zfs", "list", "-H", "-o", "name", "-t", kind, "-r", self.data_ds).split():
                if kind == "snapshot":
                    self.release_holds(name)
                sh("zfs", "destroy", name)
        sh("zfs", "destroy", "-r", self.work_ds)
        sh("zfs", "create", self.work_ds)
        self.doc["pool"] = {"name": self.pool, "vdev": str(self.vdev), "reused": True}

    @staticmethod
    def release_holds(snapshot: str) -> None:
        """Release the holds on a snapshot a stopped run left (zfsbackd holds the snapshot of its last backup),
        which would otherwise make its destroy fail with "dataset is busy"."""
        for line in sh("zfs", "holds", "-H", snapshot).splitlines():
            tag = line.split("\t")[1]
            sh("zfs", "release", tag, snapshot)

    def keep_pool(self, info: GenInfo) -> None:
        """Describe the generated dataset next to the --data-pool's file, so the next run imports it."""
        self.kept = {"pool": self.pool, "dataset": asdict(info), "args": vars(self.args), "churn_rounds": 0}
        self.vdev.with_suffix(".json").write_text(json.dumps(self.kept, indent=2) + "\n")

    def churn_round(self, r: int) -> int:
        """The churn's round number: a --data-pool's rounds go on from its earlier runs' (the names they made
        are there), and the marker counts them."""
        if self.kept is None:
            return r
        self.kept["churn_rounds"] = n = self.kept.get("churn_rounds", 0) + 1
        self.vdev.with_suffix(".json").write_text(json.dumps(self.kept, indent=2) + "\n")
        return n

    def mountpoint(self, ds: str) -> Path:
        return Path(sh("zfs", "get", "-H", "-o", "value", "mountpoint", ds).strip())

    def cleanup(self) -> None:
        self.unbind()
        if self.args.data_pool and self.vdev.with_suffix(".json").exists():
            sh("zpool", "export", self.pool, check=False)
            log(f"exported pool {self.pool} ({self.vdev}): the next --data-pool {self.args.data_pool} imports it")
            return
        if self.args.keep:
            log(f"kept pool {self.pool} ({self.vdev})")
            return
        sh("zpool", "destroy", "-f", self.pool, check=False)
        self.vdev.unlink(missing_ok=True)

    # ------------------------------------------------------------- zfsbackd
    def setup_zfsbackd(self) -> None:
        import yaml

        from zfsbackd.config import load_config
        from zfsbackd.engine.engine import Engine
        from zfsbackd.logs import configure_logging
        from zfsbackd.store.crypto import generate_key_file

        self.logdir.mkdir(parents=True, exist_ok=True)
        self.engine_log = open(self.logdir / "zfsbackd.jsonl", "w")  # noqa: SIM115 - open for the whole run
        configure_logging(stream=self.engine_log, level=logging.INFO, json=True)
        work = self.mountpoint(self.work_ds) / "zfsbackd"
        work.mkdir()
        (work / "store").mkdir()  # zfsbackd never creates a store's directory itself
        key = work / "store.key"
        generate_key_file(key)
        config = {
            "state_dir": str(work / "state"),
            "home_region": "local",
            "regions": {"local": {"type": "local", "path": str(work / "store"), "create_if_missing": True}},
            "encryption": {"key_file": str(key)},
            "daemon": {"control_socket": str(work / "control.sock"), "metrics_listen": "127.0.0.1:0"},
            "file_systems": [{"id": FS_ID, "source": {"zfs": self.data_ds}}],
        }
        path = work / "zfsbackd.yaml"
        path.write_text(yaml.safe_dump(config))
        self.timers.install()
        if self.args.change_list == "zfs-diff":  # no object map: every change list comes from `zfs diff`
            from zfsbackd.snapshot.zfs import ZfsProvider

            ZfsProvider._objmap = lambda self, fs: None  # type: ignore[method-assign]
        self.engine = Engine(load_config(path))

    def _write_profile(self, profiler: Any, name: str) -> None:
        """The profile as text (cumulative and own time) and as pstats (for pstats/snakeviz later) in the logs."""
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        (self.logdir / f"{name}.txt").write_text(text.getvalue())
        profiler.dump_stats(self.logdir / f"{name}.pstats")

    def zfsbackd_backup(self, label: str) -> tuple[Result, Any]:
        from zfsbackd.engine.engine import BackupRequest

        self.timers.reset()
        profiler = None
        threads: list[Any] = []  # the change list's thread's profile (see _profile_change_list)
        if self.args.profile:
            import cProfile

            profiler = cProfile.Profile()
        with InProcess() as m, _profile_change_list(threads if profiler else None):
            if profiler:
                profiler.enable()
            try:
                record = self.engine.create_backup(BackupRequest(FS_ID))
            finally:
                if profiler:
                    profiler.disable()
        if profiler:
            name = f"profile-{self.profile_seq:02d}-{label.replace(' ', '_')}"
            self.profile_seq += 1
            self._write_profile(profiler, name)
            for thread_profiler in threads:
                self._write_profile(thread_profiler, name + "-change-list")
        s = record.stats
        t = self.timers
        res = Result(
            label,
            m.wall,
            m.user + m.sys,
            m.user,
            m.sys,
            s.files_read,
            s.files,
            s.bytes_read,
            s.bytes_uploaded,
            detail={
                "backup_id": record.backup_id,
                "lifecycle": str(record.lifecycle),
                "engine_duration_s": round(s.duration_seconds, 3),
                "change_list_s": round(t.changes_s, 3),
                "change_list_paths": t.changes_paths,
                "zfs_diff_s": round(t.diff_s, 3),
                "zfs_diff_cpu_s": round(t.diff_cpu_s, 3),
                "zfs_diff_lines": t.diff_lines,
                "send_stream": {k: round(v, 3) for k, v in t.stream.items()},
                "change_list_fallback_full_walk": t.changes_fallback,
                "change_list_stopped_by_walk": t.changes_stopped,
                "entries_not_examined": s.entries_not_examined,
                "directories": t.directories,
                "archiver_s": round(t.archiver_s, 3),
                "other_s": round(m.wall - t.archiver_s, 3),  # the change list runs alongside the archiver
                "children_cpu_s": round(m.children_cpu, 3),
                "calls": {k: [n, round(sec, 3)] for k, (n, sec) in sorted(t.calls.items(), key=lambda kv: -kv[1][1])},
                "stats": asdict(s),
            },
        )
        return res, record

    def full_walk(self, backup_id: str, parent_root: str, expect_root: str) -> Result:
        """Archive the backup's kept snapshot again, with the same parent tree and no change list."""
        from zfsbackd.engine.archiver import Archiver
        from zfsbackd.snapshot.zfs import HOLD_TAG, ZfsProvider
        from zfsbackd.store.writer import PackWriter
        from zfsbackd.zfs import libzfs_core as lzc

        fs = self.engine.config.file_system(FS_ID)
        snapshot = ZfsProvider().find(fs, backup_id)  # holds it
        if snapshot is None:
            raise RuntimeError(f"the snapshot of {backup_id} was not kept as the next base")
        store = self.engine.store()
        store.load_index()
        try:
            with InProcess() as m, PackWriter(store) as writer:
                root, stats = Archiver(store, writer, snapshot, parent_root).run()
                writer.flush()
            ws = writer.stats
        finally:
            lzc.lzc_release({f"{self.data_ds}@{snapshot.name}".encode(): [HOLD_TAG]})  # find() holds; close() keeps it
            snapshot.close()
        return Result(
            "zfsbackd full walk",
            m.wall,
            m.user + m.sys,
            m.user,
            m.sys,
            stats.files_read,
            stats.files,
            stats.bytes_read,
            ws.bytes_uploaded,
            detail={
                "same_root_tree_as_change_list": root == expect_root,
                "root_tree": root,
                "blobs_new": ws.blobs_new,
                "stats": asdict(stats),
            },
        )

    # --------------------------------------------------------------- restic
    def setup_restic(self) -> None:
        work = self.mountpoint(self.work_ds) / "restic"
        self.restic_env = dict(
            os.environ,
            RESTIC_REPOSITORY=str(work / "repo"),
            RESTIC_PASSWORD="zfsbackd-bench",
            RESTIC_CACHE_DIR=str(work / "cache"),
            HOME=str(work),
            TMPDIR=str(work / "tmp"),
            LC_ALL="C.UTF-8",
        )
        (work / "tmp").mkdir(parents=True)
        subprocess.run(["restic", "init"], env=self.restic_env, check=True, capture_output=True)
        RESTIC_SRC.mkdir(parents=True, exist_ok=True)

    def bind(self, backup_id: str) -> Path:
        snapdir = self.mountpoint(self.data_ds) / ".zfs" / "snapshot" / f"zfsbackd-{backup_id}"
        sh("mount", "--bind", str(snapdir), str(RESTIC_SRC))
        self.bind_mounted = True
        return snapdir

    def unbind(self) -> None:
        if self.bind_mounted:
            sh("umount", str(RESTIC_SRC), check=False)
            self.bind_mounted = False

    def restic_backup(self, label: str, backup_id: str) -> Result:
        snapdir = self.bind(backup_id)
        out_path = self.logdir / f"restic-{label}.jsonl"
        try:
            with open(out_path, "wb") as out:
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    ["restic", "backup", "--json", "--host", "bench", str(RESTIC_SRC)],
                    env=self.restic_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                )
                _, status, ru = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            self.unbind()
        summary: dict[str, Any] = {}
        for line in out_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("message_type") == "summary":
                    summary = obj
        if proc.returncode != 0 or not summary:
            raise RuntimeError(f"restic backup exited {proc.returncode}; see {out_path}")
        read = int(summary.get("files_new", 0)) + int(summary.get("files_changed", 0))
        return Result(
            "restic",
            wall,
            ru.ru_utime + ru.ru_stime,
            ru.ru_utime,
            ru.ru_stime,
            read,
            int(summary.get("total_files_processed", 0)),
            None,
            int(summary.get("data_added", 0)),
            detail={"source": f"{snapdir} bind-mounted at {RESTIC_SRC}", "summary": summary},
        )

    # ----------------------------------------------------------------- steps
    def step(self, name: str, prev: Any) -> Any:
        os.sync()
        log(f"{name}: zfsbackd ({self.args.change_list})")
        diff_res, record = self.zfsbackd_backup("zfsbackd change list")
        d = diff_res.detail
        log(
            f"  {diff_res.wall_s:.1f} s, files read {diff_res.files_read}, {d['change_list_paths']} "
            f"changed paths (zfs diff {d['change_list_s']:.1f} s"
            f"{', stopped by the walk' if d['change_list_stopped_by_walk'] else ''}, "
            f"archiver {d['archiver_s']:.1f} s, {d['entries_not_examined']} entries not examined, "
            f"directories {d['directories']})"
        )
        os.sync()
        log(f"{name}: zfsbackd full walk of the same snapshot")
        walk_res = self.full_walk(record.backup_id, prev.root_tree, record.root_tree)
        log(
            f"  {walk_res.wall_s:.1f} s, files read {walk_res.files_read}, same root tree: "
            f"{walk_res.detail['same_root_tree_as_change_list']}"
        )
        os.sync()
        log(f"{name}: restic of the same snapshot")
        restic_res = self.restic_backup(name, record.backup_id)
        log(f"  {restic_res.wall_s:.1f} s, files read {restic_res.files_read}")
        self.doc["steps"][name] = {m.method: asdict(m) for m in (diff_res, walk_res, restic_res)}
        self.save()
        return record

    def run(self) -> int:
        a = self.args
        self.doc["machine"] = self.machine()
        log(f"pool {self.pool} on {self.vdev}")
        self.make_pool()
        try:
            data = Data(a.seed)
            root = self.mountpoint(self.data_ds)
            if self.kept is not None:
                info = GenInfo(**self.kept["dataset"])
                log(f"the dataset of {self.vdev} as its last run left it ({info.files} files when generated)")
            else:
                log(f"writing {a.files} files into {root}")
                info = generate(root, a, data)
                os.sync()
                if a.data_pool:
                    self.keep_pool(info)
            self.doc["dataset"] = asdict(info)
            log(f"  {info.files} files, {info.dirs} dirs, {info.bytes / MiB:.0f} MiB in {info.seconds:.0f} s")
            self.setup_zfsbackd()
            self.setup_restic()
            self.save()

            log("full: zfsbackd initial backup")
            full_z, record = self.zfsbackd_backup("zfsbackd (first backup)")
            log(f"  {full_z.wall_s:.1f} s")
            os.sync()
            log("full: restic initial backup of the same snapshot")
            full_r = self.restic_backup("full", record.backup_id)
            log(f"  {full_r.wall_s:.1f} s")
            self.doc["steps"]["full"] = {m.method: asdict(m) for m in (full_z, full_r)}
            self.save()

            for r in range(1, a.rounds + 1):
                suffix = "" if a.rounds == 1 else f" #{r}"
                record = self.step(f"nochange{suffix}", record)
                log(f"churn{suffix}: applying ~1 % churn")
                t0 = time.perf_counter()
                report: dict[str, int] = {}
                churn_small(root, data, 1.0, a.seed, report, round_no=self.churn_round(r))  # run.py: small mix
                os.sync()
                report_s = time.perf_counter() - t0
                self.doc.setdefault("churn", {})[f"churn{suffix}"] = {**report, "seconds": round(report_s, 1)}
                log(f"  {report}")
                record = self.step(f"churn{suffix}", record)
        finally:
            self.cleanup()
        print(render(self.doc))
        log(f"results: {self.json_path}")
        return 0 if all_same_trees(self.doc) else 1


# ============================================================ output
def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _count(v: int | None) -> str:
    return "–" if v is None else f"{v:,}"


def _stream_cell(stream: dict[str, float] | None) -> str:
    if not stream or not stream["records"]:
        return "–"
    return f"{stream['seconds']:.2f} / {int(stream['objects']):,} / {stream['stream_bytes'] / MiB:,.1f}"


def all_same_trees(doc: dict[str, Any]) -> bool:
    return all(
        step["zfsbackd full walk"]["detail"]["same_root_tree_as_change_list"]
        for step in doc["steps"].values()
        if "zfsbackd full walk" in step
    )


def render(doc: dict[str, Any]) -> str:
    m, ds = doc["machine"], doc["dataset"]
    out = [
        f"### ZFS path: {ds['files']:,} files ({ds['bytes'] / MiB:,.0f} MiB, {ds['dirs']} dirs, "
        f"{ds['symlinks']} symlinks, {ds['hardlinks']} hardlinks) — {m['openzfs']} / {m['kmod']}, "
        f"guest {m['cpus']} vCPU {m['memory_mib']} MiB, {m['restic'].split(' compiled')[0]}",
        "",
        f"Host: {m['host'] or 'unknown'}. Warm caches. zfsbackd in-process (no interpreter start-up); "
        "restic reads the same ZFS snapshot through a bind mount at a fixed path.",
        "",
        "| step | method | wall s | CPU s | files read | files | bytes uploaded (restic: data added) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for step, methods in doc["steps"].items():
        for name, r in methods.items():
            up, read, files = r["bytes_uploaded"], r["files_read"], r["files"]
            out.append(
                f"| {step} | {name} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | {_count(read)} | {_count(files)} | "
                f"{'–' if up is None else f'{up / MiB:,.1f} MiB'} |"
            )
    out += [
        "",
        f"| step | restic / change-list wall | restic / change-list CPU | target ≥ {TARGET_RATIO:g}× (wall) "
        "| full walk / change-list wall | full walk / change-list, tree work only¹ | full walk = change-list tree |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for step, methods in doc["steps"].items():
        if "zfsbackd full walk" not in methods:
            continue
        z, w, r = methods["zfsbackd change list"], methods["zfsbackd full walk"], methods["restic"]
        ratio = r["wall_s"] / z["wall_s"]
        tree_work = z["detail"]["change_list_s"] + z["detail"]["archiver_s"]
        out.append(
            f"| {step} | {ratio:.1f}× | {r['cpu_s'] / max(z['cpu_s'], 1e-9):.1f}× | "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'} | {w['wall_s'] / z['wall_s']:.2f}× | "
            f"{w['wall_s'] / max(tree_work, 1e-9):.1f}× | "
            f"{'yes' if w['detail']['same_root_tree_as_change_list'] else 'NO'} |"
        )
    out += [
        "",
        "¹ the full-walk row times only the archiver; this column divides it by the zfs-diff path's change list + "
        "archiver time, leaving out the snapshot/record/commit work only the change-list row pays.",
        "",
        f"Change-list path ({doc['args'].get('change_list', 'zfs-diff')}), where the wall time went (s):",
        "",
        "| step | total | change list | of which `zfs diff` (CPU s) | diff lines / changed paths | send stream s "
        "/ objects / MiB | archiver | snapshot, records, commit | slowest calls (count×, s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for step, methods in doc["steps"].items():
        z = next(v for k, v in methods.items() if k.startswith("zfsbackd") and k != "zfsbackd full walk")
        d = z["detail"]
        paths = "full walk (no change list)" if d["change_list_fallback_full_walk"] else d["change_list_paths"]
        if step == "full":
            paths = "first backup"
        calls = ", ".join(f"`{k}` {n}× {sec:.2f}" for k, (n, sec) in list(d.get("calls", {}).items())[:5])
        out.append(
            f"| {step} | {_fmt(z['wall_s'], 2)} | {_fmt(d['change_list_s'], 2)} | "
            f"{_fmt(d.get('zfs_diff_s'), 2)} ({_fmt(d.get('zfs_diff_cpu_s'), 2)}) | "
            f"{d.get('zfs_diff_lines', '–')} / {paths} | {_stream_cell(d.get('send_stream'))} | "
            f"{_fmt(d['archiver_s'], 2)} | {_fmt(d['other_s'], 2)} | {calls} |"
        )
    if doc.get("churn"):
        out += [
            "",
            "Churn applied: "
            + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in rep.items()) for k, rep in doc["churn"].items()),
        ]
    return "\n".join(out)


@contextlib.contextmanager
def _profile_change_list(profilers: list[Any] | None) -> Iterator[None]:
    """With a list: each change list worked out meanwhile (``PendingChanges``' own thread, which the main
    thread's profiler does not see: the send stream's parsing and the object map) is profiled into it."""
    if profilers is None:
        yield
        return
    import cProfile

    from zfsbackd.snapshot.base import PendingChanges

    real_run = PendingChanges._run

    def profiled_run(self: PendingChanges, *args: Any) -> None:
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()
        try:
            real_run(self, *args)
        finally:
            profiler.disable()

    PendingChanges._run = profiled_run  # type: ignore[method-assign]
    try:
        yield
    finally:
        PendingChanges._run = real_run  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50_000, help="files in the dataset (default 50000)")
    p.add_argument("--min-size", type=int, default=1 * KiB, help="smallest file, bytes (default 1024)")
    p.add_argument("--max-size", type=int, default=16 * KiB, help="largest file, bytes (default 16384)")
    p.add_argument(
        "--hardlinks",
        type=int,
        default=0,
        help="extra hard links (default 0: a changed hard-linked file makes zfsbackd walk everything)",
    )
    p.add_argument("--rounds", type=int, default=1, help="no-change + churn rounds (default 1)")
    p.add_argument(
        "--change-list",
        choices=("send-stream", "zfs-diff"),
        default="send-stream",
        help="where zfsbackd's incremental change lists come from (default send-stream; zfs-diff: no object map)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default="/var/tmp", help="where the sparse pool file goes (default /var/tmp)")
    p.add_argument("--pool-gib", type=int, default=8, help="largest pool size in GiB (default 8; capped by free space)")
    p.add_argument("--keep", action="store_true", help="keep the pool at the end (debugging)")
    p.add_argument(
        "--data-pool",
        metavar="DIR",
        help="keep the pool in DIR/pool.img and use its dataset again next time (500,000 files take ~50 min to "
        "generate under TCG): generated when DIR has none, else imported as the last run left it (its churn "
        "included; --files etc. are then the first run's); repositories and zfsbackd's state are made anew",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile (main thread) each zfsbackd backup into the logs dir; slows zfsbackd, timings not comparable",
    )
    args = p.parse_args()
    if os.geteuid() != 0 or not Path("/dev/zfs").exists() or shutil.which("restic") is None:
        print(
            "zfs_vm.py runs inside the zfsvm VM as root (needs /dev/zfs and restic): use bench/zfs.sh", file=sys.stderr
        )
        return 2
    if args.files < 500:
        print("--files: at least 500", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # run-in-vm's timeout: still destroy the pool
    # zfsbackd runs in this process: tuned as the command line and the daemon tune theirs (the GIL's switch
    # interval above all: at Python's default 5 ms, each system call of the walk's thread waited up to 5 ms
    # for the GIL while the read threads hashed, most of a scattered churn's walk under emulation)
    from zfsbackd.runtime import tune_process

    tune_process()
    return Bench(args).run()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
