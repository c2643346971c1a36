#!/usr/bin/env python3
"""Side-by-side benchmark: zfsbackd vs restic vs borg on the same data, same file system, same run.

Run as root (it creates a loopback file system):

    sudo python3 bench/run.py                         # all datasets, full size
    sudo python3 bench/run.py --scale 0.1             # quick run, 1/10 of everything
    sudo python3 bench/run.py --datasets small,large --cold

For each dataset it makes a fresh loopback XFS (reflink=1) or btrfs image under
/var/tmp, generates the data deterministically (seeded), and for every tool runs:
full backup, no-change backup, backup after ~1 % churn (the same churn, applied
once), and a full restore that is checked byte- and metadata-identical against
the source. Per step it measures the child process: wall time, CPU (user+sys,
from wait4), peak RSS (ru_maxrss from wait4, or the tool's whole process tree
summed if larger), and the store size afterwards.

See bench/README.md for what each column means. Only the standard library plus
blake3 (a zfsbackd dependency, used for fast deterministic data and hashing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import blake3
except ImportError:  # pragma: no cover - zfsbackd depends on it, but keep the bench usable
    blake3 = None  # type: ignore[assignment]
import hashlib

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PROJECT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("zfsbackd", "restic", "borg")
STEPS = ("full", "nochange", "churn", "restore")
DATASETS = ("small", "large", "mix")
FS_ID = "fs-bench"
BASE_MTIME_NS = 1_600_000_000 * 10**9  # 2020-09-13; deterministic mtimes with a ns part


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================ deterministic data
class Data:
    """Deterministic bytes: random (incompressible) and text-like (compresses ~3x, no dedup)."""

    SEGMENT = 64 * KiB

    def __init__(self, seed: int, pool_size: int = 16 * MiB) -> None:
        rng = random.Random(f"text-pool-{seed}")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, 0.8, 0.2,
                   0.2, 0.1, 0.1]
        vocab = sorted({"".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(6000)})
        rng.shuffle(vocab)
        zipf = [1.0 / (i + 1) for i in range(len(vocab))]
        punct = [",", ".", "", "", "", "", "", "", "", ";", ":", "=", "()", "{}", "0", "42", "1999"]
        words = rng.choices(vocab, zipf, k=pool_size // 6)
        marks = rng.choices(punct, k=len(words))
        lines, i = [], 0
        while i < len(words):
            n = rng.randint(4, 16)
            lines.append(" ".join(w + m for w, m in zip(words[i : i + n], marks[i : i + n], strict=False)))
            i += n
        self.pool = ("\n".join(lines) + "\n").encode()
        self.seed = seed

    def random(self, rng: random.Random, n: int) -> bytes:
        key = rng.getrandbits(64).to_bytes(8, "little") + self.seed.to_bytes(8, "little", signed=True)
        if blake3 is not None:
            return blake3.blake3(key).digest(n)
        return hashlib.shake_128(key).digest(n)

    def text(self, rng: random.Random, n: int) -> bytes:
        out = bytearray()
        pool, limit = self.pool, len(self.pool)
        while len(out) < n:
            seg = min(self.SEGMENT, n - len(out))
            off = rng.randrange(0, limit - seg)
            out += pool[off : off + seg]
        return bytes(out)

    def content(self, rng: random.Random, kind: str, n: int) -> bytes:
        return self.text(rng, n) if kind == "text" else self.random(rng, n)


def write_big(path: Path, data: Data, rng: random.Random, kind: str, size: int, offset: int = 0,
              block: int = 8 * MiB) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        pos = offset
        end = offset + size
        while pos < end:
            n = min(block, end - pos)
            os.pwrite(fd, data.content(rng, kind, n), pos)
            pos += n
    finally:
        os.close(fd)


def _set_times(path: Path, rng: random.Random, *, follow: bool = True) -> None:
    ns = BASE_MTIME_NS + rng.randrange(0, 3 * 365 * 86400 * 10**9)
    os.utime(path, ns=(ns, ns), follow_symlinks=follow)


def _all_dirs(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        out.append(Path(dirpath))
    return sorted(out)


def _finish_dirs(root: Path, rng: random.Random) -> None:
    """Deterministic modes and mtimes for every directory, deepest first (setting them last)."""
    modes = [0o755] * 8 + [0o750, 0o700, 0o775]
    for d in sorted(_all_dirs(root), key=lambda p: len(p.parts), reverse=True):
        os.chmod(d, 0o755 if d == root else rng.choice(modes))
        _set_times(d, rng)


@dataclass
class GenInfo:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0  # logical file bytes (sparse files: data extents only)
    apparent_bytes: int = 0  # st_size sums
    seconds: float = 0.0


def gen_small(root: Path, data: Data, scale: float, seed: int, info: GenInfo) -> None:
    """~50,000 files, log-uniform 1-64 KiB (mean ~15 KiB, ~740 MiB), half text, half random, ~300 dirs."""
    rng = random.Random(f"small-{seed}")
    n_files = max(50, round(50_000 * scale))
    n_dirs = max(6, round(300 * scale))
    n_top = max(2, min(20, n_dirs // 15))
    dirs: list[Path] = []
    for i in range(n_dirs):
        if i < n_top:
            d = root / f"d{i:02d}"
        elif i % 5 == 0 and dirs[-1].parent != root:
            d = dirs[-1] / f"n{i:03d}"  # a third level now and then
        else:
            d = root / f"d{i % n_top:02d}" / f"s{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    info.dirs += n_dirs
    modes = [0o644] * 12 + [0o600, 0o640, 0o755, 0o444, 0o664, 0o4755]
    owners = [(0, 0)] * 95 + [(1000, 1000)] * 3 + [(65534, 65534), (1234, 5678)]
    files: list[Path] = []
    lo, hi = math.log(1 * KiB), math.log(64 * KiB)
    for i in range(n_files):
        d = dirs[rng.randrange(n_dirs)]
        kind = "text" if rng.random() < 0.5 else "random"
        size = int(math.exp(rng.uniform(lo, hi)))
        name = f"report {i} é ünïcode.txt" if i % 997 == 0 else f"f{i:06d}.{'txt' if kind == 'text' else 'bin'}"
        p = d / name
        with open(p, "wb") as f:
            f.write(data.content(rng, kind, size))
        uid, gid = rng.choice(owners)
        if uid:
            os.chown(p, uid, gid)
        os.chmod(p, rng.choice(modes))
        _set_times(p, rng)
        files.append(p)
        info.files += 1
        info.bytes += size
        info.apparent_bytes += size
    for i in range(max(2, round(20 * scale))):  # empty files
        p = dirs[rng.randrange(n_dirs)] / f"empty{i:03d}"
        p.touch()
        _set_times(p, rng)
        info.files += 1
    for i in range(max(2, round(100 * scale))):  # hardlinks to existing files, in other dirs
        src = files[rng.randrange(len(files))]
        dst = dirs[rng.randrange(n_dirs)] / f"hl{i:04d}-{src.name}"
        if dst.exists():
            continue
        os.link(src, dst)
        info.hardlinks += 1
        info.files += 1
    for i in range(max(3, round(200 * scale))):  # symlinks: relative, absolute, dangling
        d = dirs[rng.randrange(n_dirs)]
        r = rng.random()
        if r < 0.8:
            target = os.path.relpath(files[rng.randrange(len(files))], d)
        elif r < 0.9:
            target = "/etc/hostname"
        else:
            target = f"missing/target-{i}"
        link = d / f"ln{i:04d}"
        os.symlink(target, link)
        _set_times(link, rng, follow=False)
        info.symlinks += 1


# name, size (MiB at scale 1), kind
LARGE_FILES = [
    ("db/table.ibd", 512, "random"),
    ("logs/app.log", 512, "text"),
    ("backup/dump.sql", 384, "text"),
    ("media/video.mkv", 256, "random"),
    ("misc/notes.txt", 4, "text"),
    ("misc/blob.bin", 16, "random"),
    ("tmp/scratch.bin", 8, "random"),
]
SPARSE_FILE = "vm/disk.img"  # 1 GiB apparent at scale 1, 11 data extents of 32 MiB every 96 MiB


def _mib(n: float, scale: float) -> int:
    return max(4 * KiB, int(n * scale * MiB) // (4 * KiB) * 4 * KiB)


def gen_large(root: Path, data: Data, scale: float, seed: int, info: GenInfo) -> None:
    """A few large files, ~2 GiB of data: random, compressible text, and one sparse image."""
    rng = random.Random(f"large-{seed}")
    for rel, size_mib, kind in LARGE_FILES:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        size = _mib(size_mib, scale)
        write_big(p, data, rng, kind, size)
        os.chmod(p, 0o640 if "db" in rel else 0o644)
        _set_times(p, rng)
        info.files += 1
        info.bytes += size
        info.apparent_bytes += size
    p = root / SPARSE_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    apparent = _mib(1024, scale)
    extent, stride = _mib(32, scale), _mib(96, scale)
    with open(p, "wb") as f:
        f.truncate(apparent)
    for i in range(11):
        write_big(p, data, rng, "text" if i % 2 else "random", extent, offset=i * stride + _mib(8, scale))
        info.bytes += extent
    os.chmod(p, 0o600)
    _set_times(p, rng)
    info.files += 1
    info.apparent_bytes += apparent
    info.dirs += len({Path(r).parent for r, _, _ in LARGE_FILES} | {Path(SPARSE_FILE).parent})


def generate(name: str, root: Path, scale: float, seed: int) -> GenInfo:
    t0 = time.perf_counter()
    data = Data(seed)
    info = GenInfo()
    if name in ("small", "mix"):
        sub = root / "small" if name == "mix" else root
        sub.mkdir(exist_ok=True)
        gen_small(sub, data, scale, seed, info)
    if name in ("large", "mix"):
        sub = root / "large" if name == "mix" else root
        sub.mkdir(exist_ok=True)
        gen_large(sub, data, scale, seed, info)
    _finish_dirs(root, random.Random(f"dirs-{name}-{seed}"))
    info.seconds = time.perf_counter() - t0
    return info


# ------------------------------------------------------------------- churn
def _regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(filenames):
            p = Path(dirpath) / n
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p)
    return out


def churn_small(root: Path, data: Data, scale: float, seed: int, report: dict[str, int], round_no: int = 0) -> None:
    """~1 % of files touched: in-place edits, appends, deletes, new files, chmods, one renamed directory.

    ``round_no`` > 0 makes repeated rounds on the same tree (bench/zfs_vm.py --rounds) differ.
    """
    tag = f"-{round_no}" if round_no else ""
    rng = random.Random(f"churn-small-{seed}{tag}")
    files = _regular_files(root)
    n = len(files)
    picks = rng.sample(range(n), k=min(n, max(5, round(n * 0.0105))))
    k_edit, k_append, k_delete, k_chmod = (max(1, round(n * f)) for f in (0.003, 0.002, 0.002, 0.0005))
    it = iter(picks)
    for _ in range(k_edit):
        p = files[next(it)]
        size = p.stat().st_size
        if size == 0:
            continue
        blen = min(size, rng.randint(64, 4096))
        with open(p, "r+b") as f:
            f.seek(rng.randrange(0, size - blen + 1))
            f.write(data.random(rng, blen))
        report["edited"] = report.get("edited", 0) + 1
    for _ in range(k_append):
        p = files[next(it)]
        with open(p, "ab") as f:
            f.write(data.text(rng, rng.randint(1 * KiB, 8 * KiB)))
        report["appended"] = report.get("appended", 0) + 1
    for _ in range(k_chmod):
        p = files[next(it)]
        os.chmod(p, 0o600 if (p.stat().st_mode & 0o777) != 0o600 else 0o644)
        report["chmodded"] = report.get("chmodded", 0) + 1
    for _ in range(k_delete):
        p = files[next(it)]
        p.unlink()
        report["deleted"] = report.get("deleted", 0) + 1
    dirs = [d for d in _all_dirs(root) if d != root]
    for i in range(max(1, round(n * 0.002))):
        d = dirs[rng.randrange(len(dirs))]
        kind = "text" if rng.random() < 0.5 else "random"
        (d / f"new{tag}{i:05d}.dat").write_bytes(data.content(rng, kind, int(math.exp(rng.uniform(7, 11)))))
        report["new"] = report.get("new", 0) + 1
    newdir = root / f"added-dir{tag}"
    newdir.mkdir()
    for i in range(max(2, round(n * 0.001))):
        (newdir / f"a{i:04d}.txt").write_bytes(data.text(rng, rng.randint(1 * KiB, 32 * KiB)))
        report["new"] = report.get("new", 0) + 1
    # Rename one leaf directory that holds files (its files keep their content and inodes).
    leaves = [d for d in dirs if d.exists() and not any(c.is_dir() for c in d.iterdir()) and any(d.iterdir())]
    victim = leaves[len(leaves) // 2]
    report["renamed_dir_files"] = sum(1 for _ in victim.iterdir())
    victim.rename(victim.with_name(victim.name + "-renamed" + tag))
    report["renamed_dirs"] = 1


def churn_large(root: Path, data: Data, scale: float, seed: int, report: dict[str, int]) -> None:
    """~1 % of the bytes: in-place writes, an append, a write into a hole, a delete, a new file, a renamed dir."""
    rng = random.Random(f"churn-large-{seed}")
    p = root / "db/table.ibd"
    size = p.stat().st_size
    fd = os.open(p, os.O_WRONLY)
    try:
        for _ in range(16):
            off = rng.randrange(0, max(1, size - 64 * KiB)) // 4096 * 4096
            os.pwrite(fd, data.random(rng, 64 * KiB), off)
            report["edited_ranges"] = report.get("edited_ranges", 0) + 1
    finally:
        os.close(fd)
    with open(root / "logs/app.log", "ab") as f:
        f.write(data.text(rng, _mib(5, scale)))
    report["appended_bytes"] = _mib(5, scale)
    # Fill part of the first hole in the sparse image.
    write_big(root / SPARSE_FILE, data, rng, "random", _mib(2, scale), offset=_mib(48, scale))
    report["hole_filled_bytes"] = _mib(2, scale)
    (root / "tmp/scratch.bin").unlink()
    report["deleted"] = 1
    (root / "new").mkdir()
    write_big(root / "new/added.bin", data, rng, "random", _mib(8, scale))
    report["new_bytes"] = _mib(8, scale)
    (root / "misc").rename(root / "misc-renamed")
    report["renamed_dirs"] = 1


def apply_churn(name: str, root: Path, scale: float, seed: int) -> dict[str, Any]:
    data = Data(seed)
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    if name in ("small", "mix"):
        report["small"] = {}
        churn_small(root / "small" if name == "mix" else root, data, scale, seed, report["small"])
    if name in ("large", "mix"):
        report["large"] = {}
        churn_large(root / "large" if name == "mix" else root, data, scale, seed, report["large"])
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


# ============================================================ verification
def _hash_file(path: bytes) -> str:
    h = blake3.blake3() if blake3 is not None else hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            block = os.read(fd, 4 * MiB)
            if not block:
                break
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def manifest(root: Path, hash_if: Callable[[bytes], bool] | None = None) -> dict[str, Any]:
    """Everything that must survive a restore, keyed by relative path (bytes, b'' is the root).

    ``hash_if`` hashes only the files whose relative path it accepts (bench/scale.py's sampled check at
    millions of files, where reading every file of three trees would outlast the backups).
    """
    entries: dict[bytes, dict[str, Any]] = {}
    links: dict[tuple[int, int], list[bytes]] = {}
    allocated = 0
    base = os.fsencode(str(root))

    def visit(rel: bytes) -> None:
        nonlocal allocated
        path = base + b"/" + rel if rel else base
        st = os.lstat(path)
        e: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
        if stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            e["hash"] = _hash_file(path) if hash_if is None or hash_if(rel) else None
            allocated += st.st_blocks * 512
            if st.st_nlink > 1:
                links.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(path)
        entries[rel] = e
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(rel + b"/" + name if rel else name)

    visit(b"")
    groups = {frozenset(paths) for paths in links.values()}
    return {"entries": entries, "hardlinks": groups, "allocated": allocated}


def compare(src: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
    diffs: dict[str, int] = {}
    examples: list[str] = []

    def note(kind: str, rel: bytes, detail: str = "") -> None:
        diffs[kind] = diffs.get(kind, 0) + 1
        if len(examples) < 25:
            examples.append(f"{kind}: /{os.fsdecode(rel)} {detail}".rstrip())

    s, d = src["entries"], dst["entries"]
    for rel, e in s.items():
        other = d.get(rel)
        if other is None:
            note("missing", rel)
            continue
        for key in ("mode", "uid", "gid", "mtime_ns", "size", "hash", "target"):
            if e.get(key) != other.get(key):
                a, b = e.get(key), other.get(key)
                if key == "mode":
                    a, b = oct(a) if a is not None else a, oct(b) if b is not None else b
                note(key if rel else f"root-{key}", rel, f"{a!r} != {b!r}" if key != "hash" else "")
    for rel in d:
        if rel not in s:
            note("extra", rel)
    if src["hardlinks"] != dst["hardlinks"]:
        missing = src["hardlinks"] - dst["hardlinks"]
        extra = dst["hardlinks"] - src["hardlinks"]
        diffs["hardlink-groups"] = len(missing) + len(extra)
        for g in list(missing)[:3]:
            examples.append("hardlink group not restored: " + ", ".join("/" + os.fsdecode(p) for p in sorted(g)))
    return {
        "identical": not diffs,
        "entries": len(s),
        "differences": diffs,
        "examples": examples,
        "allocated_source": src["allocated"],
        "allocated_restore": dst["allocated"],
    }


# ============================================================ measuring
@dataclass
class Measure:
    argv: list[str]
    rc: int = 0
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    stdout: str = ""
    stderr_tail: str = ""


# The tool is started by a tiny launcher (python3 -S -E, ~8 MiB) that spawns it and reports wait4's
# numbers. Starting the tool straight from this process would be wrong for peak RSS: on exec, Linux
# carries the forking process's RSS high-water mark into the child's ru_maxrss, so every tool would
# "peak" at this bench's own size (the source manifest, the text pool, ...).
# wait4's ru_maxrss is the largest single process of the tool's tree, so the launcher also samples the
# whole tree's RSS (the tool and every descendant, summed, every 0.1 s): a tool that works in several
# processes (zfsbackd's archive workers) is measured by what it holds together.
LAUNCHER = r"""
import os, signal, sys, threading, time
out = sys.argv[1]
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
tree_peak = [0]
def tree_rss():
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, pp in parents.items() if pp == p and c not in tree)
    return sum(rss.get(p, 0) for p in tree)
def sample():
    while True:
        tree_peak[0] = max(tree_peak[0], tree_rss())
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    f.write("%r %r %r %r %r\n" % (wall, ru.ru_utime, ru.ru_stime, max(ru.ru_maxrss, tree_peak[0]), status))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


class Runner:
    """Runs one child at a time and measures it with wait4 (its own CPU and peak RSS) via the launcher."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.child: subprocess.Popen[bytes] | None = None
        self.seq = 0

    def run(self, label: str, argv: list[str], *, env: dict[str, str], cwd: Path | str) -> Measure:
        self.seq += 1
        stem = self.logdir / f"{self.seq:03d}-{label}"
        out_path, err_path, ru_path = stem.with_suffix(".out"), stem.with_suffix(".err"), stem.with_suffix(".rusage")
        m = Measure(argv=argv)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            err.write((" ".join(argv) + "\n").encode())
            err.flush()
            launcher = [sys.executable, "-S", "-E", "-c", LAUNCHER, str(ru_path), *argv]
            t0 = time.perf_counter()
            self.child = subprocess.Popen(launcher, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err)
            rc = self.child.wait()
            self.child = None
        try:
            wall, user, sys_, maxrss, status = (float(x) for x in ru_path.read_text().split())
            ru_path.unlink()
            m.rc = os.waitstatus_to_exitcode(int(status))
        except (OSError, ValueError):  # the launcher itself died: no numbers but the wall time
            wall, user, sys_, maxrss, m.rc = time.perf_counter() - t0, 0.0, 0.0, 0.0, rc or -1
        m.wall_s, m.user_s, m.sys_s = wall, user, sys_
        m.cpu_s = user + sys_
        m.peak_rss_mib = maxrss / 1024  # KiB on Linux
        m.stdout = out_path.read_text(errors="replace")
        m.stderr_tail = err_path.read_text(errors="replace")[-3000:]
        return m

    def run_checked(self, label: str, argv: list[str], *, env: dict[str, str], cwd: Path | str) -> Measure:
        m = self.run(label, argv, env=env, cwd=cwd)
        if m.rc != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {m.rc}:\n{m.stderr_tail}")
        return m

    def stop_child(self) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)  # the launcher forwards it to the tool
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()


def tree_size(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under *path*."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def settle(cold: bool) -> None:
    """Flush dirty data (so one tool's writeback never lands in the next one's timing); optionally drop caches."""
    os.sync()
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


# ============================================================ the tools
class Tool:
    name = ""

    def __init__(self, runner: Runner, work: Path, data: Path) -> None:
        self.runner = runner
        self.work = work
        self.data = data
        self.repo = work / "repos" / self.name
        self.env = dict(os.environ)
        self.env.update(HOME=str(work / "home" / self.name), XDG_CACHE_HOME=str(work / "cache" / self.name),
                        TMPDIR=str(work / "tmp"), LC_ALL="C.UTF-8")
        for d in (Path(self.env["HOME"]), Path(self.env["XDG_CACHE_HOME"]), work / "tmp", self.repo.parent):
            d.mkdir(parents=True, exist_ok=True)

    def setup(self) -> dict[str, Any]:
        raise NotImplementedError

    def backup(self, step: str) -> tuple[Measure, dict[str, Any]]:
        raise NotImplementedError

    def restore(self, target: Path) -> tuple[Measure, Path | None]:
        raise NotImplementedError


def json_document(text: str) -> dict[str, Any]:
    """The JSON object a command printed, skipping lines before it (py-spy talks on stdout too)."""
    start = text.find("\n{")
    start = 0 if text.startswith("{") else start + 1 if start >= 0 else -1
    if start < 0:
        raise ValueError(f"no JSON document in the output: {text[:200]!r}")
    return json.JSONDecoder().raw_decode(text[start:])[0]


class Zfsbackd(Tool):
    name = "zfsbackd"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.config = self.work / "zfsbackd.yaml"
        self.key = self.work / "zfsbackd.key"
        extra = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = str(PROJECT) + (os.pathsep + extra if extra else "")
        self.last_backup: str | None = None
        self.copy_region: Path | None = None  # set before setup(): a second local region named "copy"

    profile_dir: Path | None = None  # set by --profile: run each step under py-spy, write collapsed stacks here

    def cli(self, *args: str, profile: str | None = None) -> list[str]:
        argv = [sys.executable, "-m", "zfsbackd.cli", *args]
        if profile and self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"zfsbackd-{profile}.txt"
            argv = ["py-spy", "record", "--idle", "--threads", "--rate", "200", "--format", "raw",
                    "--output", str(out), "--", *argv]
        return argv

    def setup(self) -> dict[str, Any]:
        self.runner.run_checked("zfsbackd-key", self.cli("key", "generate", "--key-file", str(self.key)),
                                env=self.env, cwd=PROJECT)
        regions = {"local": self.repo, **({"copy": self.copy_region} if self.copy_region else {})}
        for store in regions.values():
            store.mkdir(parents=True, exist_ok=True)  # zfsbackd never creates a store's directory itself
        region_map = ", ".join(f"{name}: {{type: local, path: {path}, create_if_missing: true}}"
                               for name, path in regions.items())
        self.config.write_text(
            f"state_dir: {self.work / 'state' / 'zfsbackd'}\n"
            "home_region: local\n"
            f"regions: {{{region_map}}}\n"
            f"encryption: {{key_file: {self.key}}}\n"
            "file_systems:\n"
            f"  - id: {FS_ID}\n"
            f"    source: {{path: {self.data}}}\n"
        )
        m = self.runner.run("zfsbackd-startup", self.cli("--version"), env=self.env, cwd=PROJECT)
        return {"version": m.stdout.strip(), "startup_wall_s": round(m.wall_s, 3)}

    def backup(self, step: str) -> tuple[Measure, dict[str, Any]]:
        m = self.runner.run(f"zfsbackd-{step}", self.cli("create-backup", "--config", str(self.config),
                                                         "--file-system-id", FS_ID, profile=step),
                            env=self.env, cwd=PROJECT)
        stats: dict[str, Any] = {}
        if m.rc == 0:
            backup = json_document(m.stdout)["Backup"]
            self.last_backup = backup["BackupId"]
            stats = dict(backup.get("Stats") or {})
            stats["BackupId"] = backup["BackupId"]
            stats["Lifecycle"] = backup.get("Lifecycle")
            stats["Snapshot"] = backup.get("Snapshot")
        return m, stats

    def restore(self, target: Path) -> tuple[Measure, Path | None]:
        if not self.last_backup:
            raise RuntimeError("no zfsbackd backup to restore")
        m = self.runner.run("zfsbackd-restore", self.cli("restore-backup", "--config", str(self.config),
                                                         "--backup-id", self.last_backup, "--target", str(target),
                                                         profile="restore"),
                            env=self.env, cwd=PROJECT)
        if m.rc != 0:
            return m, None
        return m, Path(json_document(m.stdout)["Restore"]["Path"])


class Restic(Tool):
    name = "restic"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.env.update(RESTIC_REPOSITORY=str(self.repo), RESTIC_PASSWORD="zfsbackd-bench",
                        RESTIC_CACHE_DIR=str(self.work / "cache" / "restic"))

    def setup(self) -> dict[str, Any]:
        self.runner.run_checked("restic-init", ["restic", "init"], env=self.env, cwd="/")
        cfg = self.runner.run("restic-config", ["restic", "cat", "config"], env=self.env, cwd="/")
        version = self.runner.run("restic-version", ["restic", "version"], env=self.env, cwd="/")
        repo_version = None
        with contextlib.suppress(ValueError, KeyError):
            repo_version = json.loads(cfg.stdout)["version"]
        return {"version": version.stdout.strip(), "repository_version": repo_version, "compression": "auto"}

    def backup(self, step: str) -> tuple[Measure, dict[str, Any]]:
        m = self.runner.run(f"restic-{step}", ["restic", "backup", "--json", "--host", "bench", str(self.data)],
                            env=self.env, cwd="/")
        stats: dict[str, Any] = {}
        for line in m.stdout.splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("message_type") == "summary":
                    stats = obj
        m.stdout = ""  # status lines are noise in the results file
        return m, stats

    def restore(self, target: Path) -> tuple[Measure, Path | None]:
        m = self.runner.run("restic-restore", ["restic", "restore", "latest", "--host", "bench",
                                               "--target", str(target)], env=self.env, cwd="/")
        return m, (target / self.data.relative_to("/")) if m.rc == 0 else None


class Borg(Tool):
    name = "borg"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.env.update(BORG_BASE_DIR=str(self.work / "cache" / "borg"), BORG_PASSPHRASE="",
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        self.last_archive: str | None = None

    def setup(self) -> dict[str, Any]:
        self.runner.run_checked("borg-init", ["borg", "init", "--encryption=none", str(self.repo)], env=self.env,
                                cwd="/")
        version = self.runner.run("borg-version", ["borg", "--version"], env=self.env, cwd="/")
        return {"version": version.stdout.strip(), "encryption": "none", "compression": "lz4"}

    def backup(self, step: str) -> tuple[Measure, dict[str, Any]]:
        m = self.runner.run(f"borg-{step}", ["borg", "create", "--json", "--compression", "lz4",
                                             f"{self.repo}::{step}", str(self.data)], env=self.env, cwd="/")
        stats: dict[str, Any] = {}
        if m.rc == 0:
            self.last_archive = step
            with contextlib.suppress(ValueError, KeyError):
                stats = json.loads(m.stdout)["archive"]["stats"]
        return m, stats

    def restore(self, target: Path) -> tuple[Measure, Path | None]:
        if not self.last_archive:
            raise RuntimeError("no borg archive to restore")
        m = self.runner.run("borg-restore", ["borg", "extract", "--sparse", f"{self.repo}::{self.last_archive}"],
                            env=self.env, cwd=target)
        return m, (target / self.data.relative_to("/")) if m.rc == 0 else None


TOOL_CLASSES = {"zfsbackd": Zfsbackd, "restic": Restic, "borg": Borg}


# ============================================================ file system
class LoopFs:
    """A sparse image file, attached to a loop device, with a fresh XFS (reflink=1) or btrfs on it."""

    def __init__(self, base: Path, kind: str) -> None:
        self.base = base
        self.kind = kind
        self.image = base / f"{kind}.img"
        self.mnt = base / "mnt"
        self.device: str | None = None
        self.mounted = False

    def create(self, size: int) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.device = subprocess.run(["losetup", "--find", "--show", str(self.image)], check=True,
                                     capture_output=True, text=True).stdout.strip()
        if self.kind == "xfs":
            subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.device], check=True)
        else:
            subprocess.run(["mkfs.btrfs", "-q", "-f", self.device], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["mount", "-o", "noatime", self.device, str(self.mnt)], check=True)
        self.mounted = True

    def make_data_dir(self, path: Path) -> None:
        if self.kind == "btrfs":  # a subvolume, so zfsbackd takes atomic btrfs snapshots
            subprocess.run(["btrfs", "-q", "subvolume", "create", str(path)], check=True, stdout=subprocess.DEVNULL)
        else:
            path.mkdir()

    def destroy(self) -> None:
        if self.mounted:
            for attempt in range(5):
                os.sync()
                if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(1 + attempt)
            else:
                log(f"umount {self.mnt} failed; detaching lazily")
                subprocess.run(["umount", "-l", str(self.mnt)], check=False)
            self.mounted = False
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
            self.device = None
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()


# ============================================================ orchestration
def ensure_tools(fs_kind: str) -> None:
    needed = {"restic": "restic", "borg": "borgbackup", "losetup": "mount"}
    needed["mkfs.xfs" if fs_kind == "xfs" else "mkfs.btrfs"] = "xfsprogs" if fs_kind == "xfs" else "btrfs-progs"
    missing = sorted({pkg for cmd, pkg in needed.items() if shutil.which(cmd) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", *missing], env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=True)


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * KiB
    commit = None
    with contextlib.suppress(OSError, StopIteration):  # read .git files directly; no git command
        head = (PROJECT / ".git" / "HEAD").read_text().strip()
        commit = head
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = PROJECT / ".git" / ref
            if ref_file.exists():
                commit = ref_file.read_text().strip()
            else:
                packed = (PROJECT / ".git" / "packed-refs").read_text().splitlines()
                commit = next(line.split()[0] for line in packed if line.endswith(" " + ref))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "zfsbackd_commit": commit}


def expected_sizes(name: str, scale: float) -> tuple[int, int]:
    """(data bytes, apparent bytes) a dataset will have, roughly, for sizing the image."""
    data = apparent = 0
    if name in ("small", "mix"):
        n = max(50, round(50_000 * scale))
        data += int(n * 15.2 * KiB)
        apparent += int(n * 15.2 * KiB)
    if name in ("large", "mix"):
        big = sum(s for _, s, _ in LARGE_FILES) * scale * MiB
        data += int(big + 11 * 32 * scale * MiB)
        apparent += int(big + 1024 * scale * MiB)
    return data, apparent



def ratio_cell(steps: dict, step: str) -> str:
    """zfsbackd's wall time over restic's for one step, or "—"."""
    z, rs = steps.get(step, {}).get("zfsbackd"), steps.get(step, {}).get("restic")
    ok = z and rs and z.get("ok") and rs.get("ok") and rs["wall_s"] > 0
    return f"{z['wall_s'] / rs['wall_s']:.2f}" if ok else "—"


def identical_cell(steps: dict, tool: str) -> str:
    """Whether the tool's restore matched the source: "yes", "NO: …" or "—"."""
    r = steps.get("restore", {}).get(tool)
    v = r.get("verify") if r else None
    if v is None:
        return "—"
    if v.get("identical"):
        return "yes"
    return "NO: " + ", ".join(f"{k} {n}" for k, n in v.get("differences", {}).items())

def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render_table(name: str, ds: dict[str, Any], tools: list[str]) -> str:
    g = ds.get("generated", {})
    loads = [r["loadavg_1m_after"] for rnd in ds.get("rounds", [ds]) for step in rnd.get("steps", {}).values()
             for r in step.values() if "loadavg_1m_after" in r]
    load = f", load avg {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores" if loads else ""
    repeat = f", median of {ds['repeat']} runs" if ds.get("repeat", 1) > 1 else ""
    lines = [f"### {name}: {g.get('files', 0):,} files, {g.get('bytes', 0) / MiB:,.0f} MiB data "
             f"({g.get('apparent_bytes', 0) / MiB:,.0f} MiB apparent) — {ds.get('fs')}, "
             f"{'cold' if ds.get('cold') else 'warm'} cache, scale {ds.get('scale')}{repeat}{load}", ""]
    head = ["step"]
    for t in tools:
        head += [f"{t} wall s", f"{t} CPU s", f"{t} RSS MiB", f"{t} store MiB"]
    ratio = "zfsbackd" in tools and "restic" in tools
    if ratio:
        head.append("zfsbackd/restic wall")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    steps = ds.get("steps", {})
    for step in STEPS:
        row = [step]
        for t in tools:
            r = steps.get(step, {}).get(t)
            if not r:
                row += ["—"] * 4
            elif not r.get("ok"):
                row += ["FAILED", fmt(r.get("cpu_s")), fmt(r.get("peak_rss_mib"), 0), fmt(r.get("store_mib"))]
            else:
                row += [fmt(r["wall_s"], 2), fmt(r["cpu_s"], 2), fmt(r["peak_rss_mib"], 0), fmt(r["store_mib"])]
        if ratio:
            row.append(ratio_cell(steps, step))
        lines.append("| " + " | ".join(row) + " |")
    row = ["restore identical"]
    for t in tools:
        cell = identical_cell(steps, t)
        row += [cell, "", "", ""]
    if ratio:
        row.append("")
    lines.append("| " + " | ".join(row) + " |")
    # What each tool says it did: a quick way to spot a no-change backup that reads everything.
    lines += ["", "What each backup read / added (tool's own statistics):", ""]
    lines.append("| step | zfsbackd FilesRead | zfsbackd MiB read | zfsbackd MiB uploaded | restic new+changed files "
                 "| restic MiB added | borg MiB added (dedup) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for step in ("full", "nochange", "churn"):
        s = steps.get(step, {})
        z = (s.get("zfsbackd") or {}).get("tool_stats") or {}
        r = (s.get("restic") or {}).get("tool_stats") or {}
        b = (s.get("borg") or {}).get("tool_stats") or {}
        cells = [
            str(z.get("FilesRead", "—")),
            fmt(z["BytesRead"] / MiB) if "BytesRead" in z else "—",
            fmt(z["BytesUploaded"] / MiB) if "BytesUploaded" in z else "—",
            str(r.get("files_new", 0) + r.get("files_changed", 0)) if r else "—",
            fmt(r["data_added"] / MiB) if "data_added" in r else "—",
            fmt(b["deduplicated_size"] / MiB) if "deduplicated_size" in b else "—",
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one dataset → one result: medians of times, max of RSS, the last store size.

    With one round this is that round (plus ``rounds``). Every round's own numbers stay in ``rounds``.
    """
    last = rounds[-1]
    out = {k: v for k, v in last.items() if k != "steps"}
    out["steps"] = {}
    out["repeat"] = len(rounds)
    # Every step and tool any round has, in first-seen order (the S3 mode adds copy steps, has no borg).
    steps = list(dict.fromkeys(s for r in rounds for s in r.get("steps", {})))
    tools = list(dict.fromkeys(t for r in rounds for s in r.get("steps", {}).values() for t in s))
    for step in steps:
        for tool in tools:
            runs = [r["steps"][step][tool] for r in rounds if tool in r.get("steps", {}).get(step, {})]
            if not runs:
                continue
            agg = dict(runs[-1])
            ok_runs = [x for x in runs if x.get("ok")] or runs
            for key in ("wall_s", "user_s", "sys_s", "cpu_s"):
                agg[key] = round(_median([x[key] for x in ok_runs]), 3)
            agg["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
            agg["ok"] = all(x.get("ok") for x in runs)
            if len(runs) > 1:
                agg["wall_s_all"] = [x["wall_s"] for x in runs]
                agg["cpu_s_all"] = [x["cpu_s"] for x in runs]
                verifies = [x["verify"] for x in runs if "verify" in x]
                if verifies:
                    agg["verify"] = next((v for v in verifies if not v.get("identical")), verifies[-1])
            out["steps"].setdefault(step, {})[tool] = agg
    if len(rounds) > 1:
        out["rounds"] = rounds
    return out


def restore_and_verify(bench: Any, ds: dict[str, Any], name: str, tools: list[Any], data: Path, mnt: Path,
                       cold: bool, hash_if: Callable[[bytes], bool] | None = None) -> None:
    """Restore each tool's newest backup into ``mnt/restore/<tool>``, compare it with ``data`` and record it.

    ``bench`` is this module's or bench/s3.py's Bench (``_record`` and ``save``); ``hash_if``: see manifest().
    """
    settle(False)
    t0 = time.perf_counter()
    source = manifest(data, hash_if)
    ds["source_manifest_seconds"] = round(time.perf_counter() - t0, 2)
    for tool in tools:
        target = mnt / "restore" / tool.name
        target.mkdir(parents=True)
        settle(cold)
        try:
            m, restored = tool.restore(target)
        except RuntimeError as exc:
            log(f"{tool.name} restore skipped: {exc}")
            continue
        r = bench._record(ds, "restore", tool, m, {})
        if restored is not None and restored.is_dir():
            t0 = time.perf_counter()
            r["verify"] = compare(source, manifest(restored, hash_if))
            r["verify_seconds"] = round(time.perf_counter() - t0, 2)
            r["restored_path"] = str(restored)
        else:
            r["verify"] = {"identical": False, "differences": {"no restored tree": 1}, "examples": []}
            r["ok"] = False
        v = r["verify"]
        log(f"{name} restore   {tool.name:8s} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU "
            f"{r['peak_rss_mib']:7.0f} MiB RSS  identical: {v['identical']} {v.get('differences') or ''}")
        for ex in v.get("examples", [])[:10]:
            log(f"    {ex}")
        bench.save()
        shutil.rmtree(target)


class Bench:
    def __init__(self, args: argparse.Namespace, suffix: str = "") -> None:
        """``suffix`` names another mode's files: ``<stamp><suffix>.json`` and ``<stamp><suffix>-logs``."""
        self.args = args
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.base = Path(args.workdir) / f"zfsbackd-bench-{self.stamp}"
        self.fs = LoopFs(self.base, args.fs)
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.result_path = RESULTS / f"{self.stamp}{suffix}.json"
        self.logdir = RESULTS / f"{self.stamp}{suffix}-logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(self.logdir)
        self.tools = [t for t in args.tools.split(",") if t]
        self._current: tuple[str, list[dict[str, Any]], dict[str, Any]] | None = None
        self.results: dict[str, Any] = {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "args": vars(args),
            "machine": machine_info(),
            "tools": {},
            "datasets": {},
        }

    def save(self) -> None:
        if self._current is not None:  # the dataset being measured, with its rounds so far
            name, earlier, ds = self._current
            self.results["datasets"][name] = aggregate([*earlier, ds])
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.result_path)

    def cleanup(self) -> None:
        self.runner.stop_child()
        self.fs.destroy()
        with contextlib.suppress(OSError):
            if self.fs.mnt.exists():
                self.fs.mnt.rmdir()
            self.base.rmdir()

    def run(self) -> None:
        for name in self.args.datasets.split(","):
            rounds: list[dict[str, Any]] = []
            for i in range(self.args.repeat):
                if self.args.repeat > 1:
                    log(f"--- {name}: round {i + 1} of {self.args.repeat}")
                rounds.append(self.run_dataset(name, rounds, i + 1))
                self.results["datasets"][name] = aggregate(rounds)
                self.save()
            if self.args.repeat > 1:
                print("\n" + self.table(name) + "\n", flush=True)
        self.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.save()
        print()
        for name in self.results["datasets"]:
            print(self.table(name))
            print()
        print(f"results: {self.result_path}")
        print(f"logs:    {self.logdir}")

    def _record(self, ds: dict[str, Any], step: str, tool: Tool, m: Measure, stats: dict[str, Any]) -> dict[str, Any]:
        apparent, allocated = tree_size(tool.repo)
        r = {
            "ok": m.rc == 0,
            "rc": m.rc,
            "wall_s": round(m.wall_s, 3),
            "user_s": round(m.user_s, 3),
            "sys_s": round(m.sys_s, 3),
            "cpu_s": round(m.cpu_s, 3),
            "peak_rss_mib": round(m.peak_rss_mib, 1),
            "store_bytes": apparent,
            "store_allocated_bytes": allocated,
            "store_mib": round(apparent / MiB, 1),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),  # other work on the machine skews the numbers
            "tool_stats": stats,
        }
        if m.rc != 0:
            r["error"] = m.stderr_tail
            log(f"  {tool.name} {step} FAILED (exit {m.rc}):\n{m.stderr_tail}")
        ds["steps"].setdefault(step, {})[tool.name] = r
        self.save()
        return r

    def table(self, name: str) -> str:
        """The results table of dataset ``name`` so far."""
        return render_table(name, self.results["datasets"][name], self.tools)

    def run_dataset(self, name: str, earlier_rounds: list[dict[str, Any]], round_no: int = 1) -> dict[str, Any]:
        """One round (``round_no``, from 1): a fresh file system, fresh data, every step for every tool.
        Returns the round's results."""
        args = self.args
        data_bytes, apparent = expected_sizes(name, args.scale)
        image = int((4 * data_bytes + apparent) * 1.4) + 3 * GiB
        free = shutil.disk_usage(self.base.parent).free
        log(f"=== dataset {name}: ~{data_bytes / MiB:,.0f} MiB; image {image / GiB:.1f} GiB (sparse) on "
            f"{self.base.parent} ({free / GiB:.0f} GiB free)")
        if free < 4 * data_bytes + apparent + GiB:
            raise SystemExit(f"not enough space under {self.base.parent} for dataset {name}")
        self.fs.create(image)
        mnt = self.fs.mnt
        ds: dict[str, Any] = {"fs": args.fs, "cold": args.cold, "scale": args.scale, "seed": args.seed, "steps": {}}
        self._current = (name, earlier_rounds, ds)  # save() writes it as it fills in
        try:
            data = mnt / f"data-{name}"
            self.fs.make_data_dir(data)
            log(f"generating {name} in {data}")
            info = generate(name, data, args.scale, args.seed)
            ds["generated"] = asdict(info)
            log(f"generated {info.files:,} files, {info.bytes / MiB:,.0f} MiB in {info.seconds:.1f} s")
            tools = [TOOL_CLASSES[t](self.runner, mnt / "work", data) for t in self.tools]
            for tool in tools:
                if isinstance(tool, Zfsbackd) and args.profile:
                    tool.profile_dir = self.logdir / "profiles" / name
            for tool in tools:
                self.results["tools"][tool.name] = tool.setup()
            for step in ("full", "nochange", "churn"):
                if step == "churn":
                    settle(False)
                    ds["churn"] = apply_churn(name, data, args.scale, args.seed)
                    log(f"churn applied: {ds['churn']}")
                for tool in tools:
                    settle(args.cold)
                    m, stats = tool.backup(step)
                    r = self._record(ds, step, tool, m, stats)
                    log(f"{name} {step:9s} {tool.name:8s} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU "
                        f"{r['peak_rss_mib']:7.0f} MiB RSS  store {r['store_mib']:9.1f} MiB")
            restore_and_verify(self, ds, name, tools, data, mnt, args.cold)
            print("\n" + render_table(name, ds, self.tools) + "\n", flush=True)
        finally:
            self.save()
            self._current = None
            self.runner.stop_child()  # an interrupted step's child must go before the unmount
            self.fs.destroy()
        return ds


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(bench: Bench) -> int:
    """Run *bench*; on Ctrl-C, SIGTERM or SIGHUP save what was measured. Always clean up (the loop mount).

    Returns the exit code: 0, or 130 when interrupted. bench/scale.py runs its Bench subclass with it too.
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        bench.results["interrupted"] = True
        bench.save()
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    return 0


def main() -> int:
    if "--s3" in sys.argv[1:]:  # the S3 mode lives in bench/s3.py (it imports this file as a module)
        argv = [a for a in sys.argv[1:] if a != "--s3"]
        s3 = Path(__file__).resolve().parent / "s3.py"
        os.execv(sys.executable, [sys.executable, str(s3), *argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s3", action="store_true",
                        help="S3 mode: zfsbackd and restic against Ceph RGW on 127.0.0.1, plus zfsbackd copies "
                             "between two S3 regions (runs bench/s3.py with the other options; see its --help)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink (or grow) every dataset; 0.1 = quick run")
    parser.add_argument("--datasets", default="small,large,mix", help="comma list of: small, large, mix")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma list of: zfsbackd, restic, borg")
    parser.add_argument("--fs", choices=("xfs", "btrfs"), default="xfs", help="file system of the loopback image")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches) before every step")
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (same seed, same bytes)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the loopback image goes (default /var/tmp)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each dataset N times, each on a fresh file system; the table shows medians")
    parser.add_argument("--profile", action="store_true",
                        help="run zfsbackd's steps under py-spy (--idle --threads), collapsed stacks in the logs "
                             "directory; slows zfsbackd a little and its RSS column then includes py-spy")
    args = parser.parse_args()
    for name in args.datasets.split(","):
        if name not in DATASETS:
            parser.error(f"--datasets: unknown dataset {name!r}; use {', '.join(DATASETS)}")
    for name in args.tools.split(","):
        if name not in TOOLS:
            parser.error(f"--tools: unknown tool {name!r}; use {', '.join(TOOLS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    if os.geteuid() != 0:
        parser.error("run as root (it creates and mounts a loopback file system): sudo python3 bench/run.py")
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy: pip install py-spy")
    ensure_tools(args.fs)
    return run_bench(Bench(args))


if __name__ == "__main__":
    sys.exit(main())
