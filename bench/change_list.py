"""The archiver's change-list path, natively: an incremental backup guided by a change list, without ZFS.

Under the VM's emulation (``bench/zfs.sh``) a scattered-churn incremental takes a quarter of
an hour to set up and varies by ±15 % from run to run, yet the archiver's share of it is CPU
work that behaves alike on any file system. This measures that share natively on a loopback
XFS, in seconds: bench/zfs_vm.py's files (same generator, same seed), a full backup, bench/run.py's
1 % churn (edits, appends, chmods, deletes, new files, a new directory, a renamed directory),
and the change list a send stream would give (:func:`change_list`, from an ``lstat`` of the whole
tree before and after). Then the incremental's ``Archiver.run()`` with that change list,
``--rounds`` times, each on a new reflink snapshot against the same parent: wall and CPU time per
round, the median, and (``--profile``) a cProfile of the last round. The first round is checked
against a full walk (same root tree).

    sudo .venv/bin/python bench/change_list.py --files 50000 --rounds 5
    sudo .venv/bin/python bench/change_list.py --files 50000 --profile /tmp/change-list.pstats
"""

from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
import run as base  # noqa: E402  (bench/run.py: loop file system, data, churn)
import zfs_vm  # noqa: E402  (bench/zfs_vm.py: the files of the ZFS benchmark)
from ab import variant_config  # noqa: E402  (bench/ab.py: a config with one local store)

from zfsbackd.config import load_config  # noqa: E402
from zfsbackd.engine.archiver import Archiver  # noqa: E402
from zfsbackd.engine.engine import BackupRequest, Engine  # noqa: E402
from zfsbackd.runtime import tune_process  # noqa: E402
from zfsbackd.snapshot import take_snapshot  # noqa: E402
from zfsbackd.snapshot.base import ChangeSet  # noqa: E402
from zfsbackd.snapshot.detect import choose_provider  # noqa: E402
from zfsbackd.store.crypto import generate_key_file  # noqa: E402
from zfsbackd.store.writer import PackWriter  # noqa: E402

FS_ID = base.FS_ID
log = base.log


def tree_state(root: bytes) -> dict[bytes, tuple[int, int]]:
    """Every path below *root* (relative) with its (inode, ctime ns): what a change list compares."""
    state: dict[bytes, tuple[int, int]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                path = os.path.join(rel, entry.name) if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                state[path] = (st.st_ino, st.st_ctime_ns)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
    return state


def change_list(before: dict[bytes, tuple[int, int]], after: dict[bytes, tuple[int, int]]) -> ChangeSet:
    """What a send stream's change list gives (zfsbackd.snapshot.zfs): the objects (inodes) that are new or
    whose ctime changed, and the names the object map had for them before — none for a new object, and a
    deleted object is in neither (the archiver finds those names missing from the listing)."""
    ctime_before = {ino: ctime for ino, ctime in before.values()}
    objects = {ino for ino, ctime in after.values() if ctime_before.get(ino) != ctime}
    return ChangeSet.from_paths((path for path, (ino, _) in before.items() if ino in objects), objects)


def archive(engine: Engine, parent_root: str, changes: ChangeSet | None, backup_id: str) -> tuple[str, float, float]:
    """Archive a new snapshot against *parent_root*: (root tree id, wall s, CPU s of the archiver)."""
    fs = engine.config.file_system(FS_ID)
    store = engine.store()
    snapshot = take_snapshot(fs, backup_id, choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            wall, cpu = time.perf_counter(), time.process_time()
            root, _stats = Archiver(store, writer, snapshot, parent_root, changes=changes).run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            writer.flush()
    finally:
        snapshot.release()
    return root, wall, cpu


@dataclass
class Measured:
    """What :func:`measure` found: the change list's size, and the archiver's times with it and without."""

    report: dict[str, int]
    paths: int
    full_wall: float
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)


def measure(engine: Engine, data: Path, seed: int, rounds: int, profile: Path | None = None) -> Measured:
    """Back *data* up in full, churn it, then archive it ``rounds`` times with the change list (see the module
    docstring); SystemExit if a round's root tree is not the full walk's."""
    parent = engine.create_backup(BackupRequest(FS_ID)).root_tree or ""
    before = tree_state(os.fsencode(data))
    report: dict[str, int] = {}
    base.churn_small(data, base.Data(seed), 1.0, seed, report)
    changes = change_list(before, tree_state(os.fsencode(data)))
    log(f"churn: {report}; the change list names {len(changes.touched):,} paths")
    full_root, full_wall, full_cpu = archive(engine, parent, None, "backup-00000000000000001")
    log(f"full walk: {full_wall:.3f} s wall, {full_cpu:.3f} s CPU")
    measured = Measured(report, len(changes.touched), full_wall)
    for round_no in range(rounds):
        profiler = cProfile.Profile() if profile is not None and round_no == rounds - 1 else None
        if profiler is not None:
            profiler.enable()
        hinted_root, wall, cpu = archive(engine, parent, changes, f"backup-{round_no + 2:017x}")
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        if hinted_root != full_root:
            raise SystemExit(f"round {round_no}: the change list's root tree {hinted_root} is not the full walk's")
        measured.walls.append(wall)
        measured.cpus.append(cpu)
        log(f"round {round_no}: change list {wall:.3f} s wall, {cpu:.3f} s CPU")
    return measured


def write_config(work: Path, data: Path) -> Path:
    """A config with a local store in *work* backing up *data* (bench/ab.py's), and its key."""
    config = variant_config(work, data)
    generate_key_file(work / "key")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000, help="files to generate (default 50000)")
    parser.add_argument("--rounds", type=int, default=5, help="incrementals with the change list (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="data seed (same seed, same files)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the last round here (.pstats)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the loopback image goes (default /var/tmp)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (it creates and mounts a loopback file system)")
    tune_process()  # zfsbackd runs in this process: tuned as the command line and the daemon tune theirs
    base.ensure_tools("xfs")
    root = Path(args.workdir) / f"zfsbackd-change-list-{os.getpid()}"
    fs = base.LoopFs(root, "xfs")
    try:
        fs.create(max(4 * base.GiB, args.files * 48 * base.KiB))
        data, work = fs.mnt / "data", fs.mnt / "work"
        data.mkdir()
        work.mkdir()
        info = generate(data, args.files, args.seed)
        log(f"generated {info.files:,} files in {info.seconds:.1f} s")
        engine = Engine(load_config(write_config(work, data)))
        m = measure(engine, data, args.seed, args.rounds, args.profile)
        print(
            f"change list, {args.files:,} files, {m.paths:,} paths: median {statistics.median(m.walls):.3f} s wall, "
            f"{statistics.median(m.cpus):.3f} s CPU over {args.rounds} rounds (full walk {m.full_wall:.3f} s)"
        )
    finally:
        fs.destroy()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def generate(data: Path, files: int, seed: int) -> base.GenInfo:
    """bench/zfs_vm.py's files (its defaults: 1-16 KiB, no extra hard links) in *data*."""
    gen_args = argparse.Namespace(files=files, seed=seed, min_size=1024, max_size=16 * 1024, hardlinks=0)
    return zfs_vm.generate(data, gen_args, base.Data(seed))


if __name__ == "__main__":
    sys.exit(main())
