"""The benchmarks' hooks into zfsbackd still fit the code they time.

bench/zfs_vm.py wraps zfsbackd functions by name to break a backup's time down; a rename in
zfsbackd only showed up as a traceback minutes into a run in the OpenZFS VM (session 15: the
archiver's ``_load_tree`` had become ``_read_parent_tree``). Installing the wrappers needs no ZFS,
so it is checked here, in a child process (the wrappers patch zfsbackd's classes for good).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_zfs_bench_timers_wrap_existing_functions() -> None:
    script = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        "import zfs_vm\n"
        "timers = zfs_vm.Timers()\n"
        "timers.install()\n"
        "from zfsbackd.engine.archiver import Archiver\n"
        "from zfsbackd.zfs import libzfs_core as lzc\n"
        "assert hasattr(Archiver._read_parent_tree, '__wrapped__'), 'parent tree reads are not timed'\n"
        "assert hasattr(lzc.lzc_channel_program, '__wrapped__'), 'the commit is not timed'\n"
        "assert lzc.lzc_channel_program.__name__ == 'lzc_channel_program', 'lzc.is_supported would refuse it'\n"
        "print('installed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed"


def test_change_list_bench_archives_its_churn_as_a_full_walk_does(xfs_dir: Path, tmp_path: Path) -> None:
    """bench/change_list.py's change list (a send stream's: the objects new or with another ctime and the
    names they had, found by comparing the tree before and after bench/run.py's churn: edits, appends,
    chmods, deletes, new files, a new and a renamed directory) gives the full walk's root tree; the harness
    stops with an error if it does not."""
    script = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        "from pathlib import Path\n"
        "import change_list\n"
        "from zfsbackd.config import load_config\n"
        "from zfsbackd.engine.engine import Engine\n"
        f"data, work = Path({str(xfs_dir)!r}), Path({str(tmp_path)!r})\n"
        "change_list.generate(data, 600, 1)\n"
        "engine = Engine(load_config(change_list.write_config(work, data)))\n"
        "m = change_list.measure(engine, data, 1, 2)\n"
        "r = m.report\n"
        "print(m.paths, len(m.walls), r['renamed_dirs'], r['deleted'], r['new'], r['edited'] + r['appended'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths, rounds, renamed, deleted, new, changed = map(int, proc.stdout.splitlines()[-1].split())  # (logs first)
    assert (rounds, renamed) == (2, 1)
    assert deleted > 0 and new > 0  # (not in the change list, as in a send stream's: found by listing)
    assert paths > changed  # the old name of each changed object, and their directories
