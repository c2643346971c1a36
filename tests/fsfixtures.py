"""Real file systems for tests: loop-mounted images, a sample tree that exercises every
kind of metadata a backup must keep, and an exact tree comparison.

``populate_sample_tree`` + ``assert_trees_identical`` are the fidelity check of the
project: back a tree up, restore it, and compare. Sockets and FIFOs are not part of
:func:`tree_manifest` (backups omit them by design); :func:`manifest_specials` lists them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zfsbackd.snapshot.base import BTRFS_MAGIC, BTRFS_SUBVOLUME_INO, fs_type

IMAGE_DIR = "/var/tmp"
MiB = 1024 * 1024

# Fixed timestamps: far from "now", with nanoseconds, so a restore that drops or rounds them shows.
BASE_MTIME_NS = 1_600_000_000_123_456_789
SAMPLE_UID = 1234
SAMPLE_GID = 5678
BAD_UTF8_NAME = b"bad-\xff-name"
UNICODE_NAME = "späce ünïcode ☃.txt".encode()

FsKind = Literal["xfs", "btrfs", "ext4"]


def _run(*argv: str | os.PathLike[str]) -> None:
    """Run a tool and fail with its stderr (not just an exit status) if it fails."""
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(os.fspath, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass
class LoopFs:
    """A file system in a sparse image file, loop-mounted at ``mountpoint``."""

    kind: FsKind
    image: Path
    mountpoint: Path
    mounted: bool = True

    def cleanup(self) -> None:
        """Unmount (lazily if something still holds it busy) and delete the image; idempotent."""
        if self.mounted:
            proc = subprocess.run(["umount", self.mountpoint], capture_output=True, check=False)
            if proc.returncode != 0:
                _run("umount", "-l", self.mountpoint)
            self.mounted = False
        self.image.unlink(missing_ok=True)


def make_loop_fs(kind: FsKind, size_mib: int, mountpoint: Path, *, reflink: bool = True) -> LoopFs:
    """Create a sparse *size_mib* image under /var/tmp, mkfs it and mount it at *mountpoint*.

    XFS gets ``-m reflink=1`` (or ``reflink=0`` with ``reflink=False``, to test refusal).
    XFS needs at least 300 MiB.
    """
    fd, name = tempfile.mkstemp(prefix=f"zfsbackd-test-{kind}-", suffix=".img", dir=IMAGE_DIR)
    image = Path(name)
    try:
        os.ftruncate(fd, size_mib * MiB)
        os.close(fd)
        if kind == "xfs":
            _run("mkfs.xfs", "-q", "-f", "-m", f"reflink={int(reflink)}", image)
        elif kind == "btrfs":
            _run("mkfs.btrfs", "-q", "-f", image)
        elif kind == "ext4":
            _run("mkfs.ext4", "-q", "-F", image)
        else:
            raise ValueError(f"unknown file system kind {kind!r}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "loop", image, mountpoint)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    return LoopFs(kind, image, mountpoint)


def btrfs_subvolume(path: Path) -> Path:
    _run("btrfs", "subvolume", "create", path)
    return path


def _is_btrfs_subvolume(path: str | os.PathLike[str], st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOLUME_INO and fs_type(path) == BTRFS_MAGIC


def remove_tree(path: Path) -> None:
    """Delete *path* whatever it is, including (read-only) btrfs subvolumes nested in it.

    ``btrfs subvolume delete`` refuses a subvolume that contains others, and a read-only
    snapshot's files cannot be unlinked, so subvolumes are found and deleted innermost first.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if _is_btrfs_subvolume(path, st):
        for dirpath, dirnames, _ in os.walk(path):
            for name in list(dirnames):
                sub = os.path.join(dirpath, name)
                if _is_btrfs_subvolume(sub, os.lstat(sub)):
                    dirnames.remove(name)
                    remove_tree(Path(sub))
        _run("btrfs", "subvolume", "delete", path)
        return
    for entry in os.scandir(path):
        remove_tree(Path(entry.path))
    os.rmdir(path)


# --------------------------------------------------------------------------- sample tree


def populate_sample_tree(root: Path, seed: int = 0) -> None:
    """Fill the existing directory *root* with a deterministic tree (for a given *seed*).

    It holds every kind of entry and metadata a backup must reproduce; sizes are chosen
    to cover empty, tiny, chunked and compressible content and sparse files. Run as root
    (ownership, devices). Timestamps are set last, to fixed values.
    """
    rng = random.Random(seed)
    r = os.fsencode(root)

    def p(rel: bytes) -> bytes:
        return os.path.join(r, rel)

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        with open(p(rel), "wb") as f:
            f.write(data)
        os.chmod(p(rel), mode)

    for d, mode in [
        (b"empty-dir", 0o755),
        (b"files", 0o755),
        (b"dir", 0o2755),  # setgid directory
        (b"dir/sub", 0o750),
        (b"dir/sub/deep", 0o700),
        (b"sticky", 0o1777),
        (b"links", 0o755),
        (b"hardlinks", 0o755),
        (b"acl-dir", 0o755),
        (b"specials", 0o755),
    ]:
        os.mkdir(p(d))
        os.chmod(p(d), mode)

    write(b"files/empty", b"")
    write(b"files/one-byte", b"x")
    write(b"dir/sub/deep/random-100k", rng.randbytes(100 * 1024))
    write(b"files/random-3m", rng.randbytes(3 * MiB))
    words = [b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"foxtrot", b"golf", b"hotel"]
    text = bytearray()
    while len(text) < 5 * MiB:
        text += b"%08d %s the quick brown fox jumps over the lazy dog\n" % (len(text), rng.choice(words))
    write(b"files/text-5m", bytes(text[: 5 * MiB]))
    # Sparse: 64 MiB apparent, two 64 KiB data regions, a hole at the start, between and at the end.
    with open(p(b"files/sparse-64m"), "wb") as f:
        f.seek(1 * MiB)
        f.write(rng.randbytes(64 * 1024))
        f.seek(40 * MiB)
        f.write(rng.randbytes(64 * 1024))
        f.truncate(64 * MiB)
    write(b"files/setuid", b"#!/bin/sh\n", 0o4755)
    write(b"files/private", b"secret\n", 0o600)
    write(b"files/executable", b"#!/bin/sh\necho hi\n", 0o755)
    write(b"files/" + BAD_UTF8_NAME, b"not utf-8\n")
    write(b"files/" + UNICODE_NAME, "unicode ✓\n".encode())
    write(b"sticky/in-sticky", b"s\n")

    write(b"files/owned", b"owned\n")
    os.chown(p(b"files/owned"), SAMPLE_UID, SAMPLE_GID)
    os.chown(p(b"dir/sub"), SAMPLE_UID, SAMPLE_GID)
    # chown clears setuid, so the setuid file is chowned first and chmod'ed again.
    os.chown(p(b"files/setuid"), SAMPLE_UID, SAMPLE_GID)
    os.chmod(p(b"files/setuid"), 0o4755)

    write(b"files/xattrs", b"has xattrs\n")
    os.setxattr(p(b"files/xattrs"), b"user.k", b"v")
    os.setxattr(p(b"files/xattrs"), b"user.binary", bytes(range(256)))
    os.setxattr(p(b"files/xattrs"), b"user.empty", b"")
    os.setxattr(p(b"dir"), b"user.on-dir", b"directory xattr")
    write(b"files/acl", b"has an acl\n")
    _run("setfacl", "-m", f"u:{SAMPLE_UID}:rwx", os.fsdecode(p(b"files/acl")))
    _run("setfacl", "-d", "-m", f"u:{SAMPLE_UID}:rx", os.fsdecode(p(b"acl-dir")))

    os.symlink(b"../files/one-byte", p(b"links/relative"))
    os.symlink(b"does-not-exist", p(b"links/dangling"))
    os.symlink(b"../dir", p(b"links/to-dir"))
    os.symlink(b"/nonexistent/absolute/target", p(b"links/absolute"))
    os.lchown(p(b"links/relative"), SAMPLE_UID, SAMPLE_GID)

    write(b"hardlinks/pair-1", b"two names\n")
    os.link(p(b"hardlinks/pair-1"), p(b"hardlinks/pair-2"))
    write(b"hardlinks/three-1", b"three names\n", 0o640)
    os.setxattr(p(b"hardlinks/three-1"), b"user.linked", b"shared inode")
    os.link(p(b"hardlinks/three-1"), p(b"hardlinks/three-2"))
    os.link(p(b"hardlinks/three-1"), p(b"dir/sub/three-3"))  # across directories

    os.mkfifo(p(b"specials/fifo"))
    os.chmod(p(b"specials/fifo"), 0o620)
    os.mknod(p(b"specials/socket"), stat.S_IFSOCK)  # a socket inode without binding a path
    os.chmod(p(b"specials/socket"), 0o755)
    with contextlib.suppress(PermissionError):  # no CAP_MKNOD (unprivileged container): no device
        os.mknod(p(b"specials/null"), stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(p(b"specials/null"), 0o666)

    entries = sorted(rel for rel, _, _ in _walk(r, frozenset()))
    for i, rel in enumerate(entries):
        t = BASE_MTIME_NS + i * 1_000_000_007
        os.utime(p(rel), ns=(t, t), follow_symlinks=False)
    os.utime(r, ns=(BASE_MTIME_NS - 1, BASE_MTIME_NS - 1))


# --------------------------------------------------------------------------- manifests

_SPECIAL_TYPES = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    **_SPECIAL_TYPES,
}


def _walk(root: bytes, ignore: frozenset[bytes]) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) of every entry below *root*, root excluded.

    Paths in *ignore* (relative, like ``b".zfsbackd-snapshots"``) are skipped with their subtree.
    """
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name)
            if rel in ignore:
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
            yield rel, entry.path, st


def _is_special(st: os.stat_result) -> bool:
    return stat.S_IFMT(st.st_mode) in _SPECIAL_TYPES


# XFS also lists its on-disk form of POSIX ACLs; system.posix_acl_* already carries them
# and they only exist on XFS, so a tree restored to another file system would differ.
_FS_PRIVATE_XATTRS = {"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"}


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    names = set(os.listxattr(path, follow_symlinks=False)) - _FS_PRIVATE_XATTRS
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_manifest(root: Path, *, ignore: frozenset[bytes] | set[bytes] = frozenset()) -> dict[bytes, dict[str, Any]]:
    """Everything a restore must reproduce, per relative path (bytes), sockets/FIFOs excluded.

    Not compared (they cannot survive a restore): inode numbers, ctime, atime, directory
    sizes, and the metadata of *root* itself. Hardlinks are compared as ``link_group``:
    the smallest path sharing the inode, so a broken or extra link shows.
    """
    rootb = os.fsencode(root)
    manifest: dict[bytes, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, path, st in _walk(rootb, frozenset(ignore)):
        if _is_special(st):
            continue
        kind = _TYPES[stat.S_IFMT(st.st_mode)]
        info: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": _xattrs(path),
        }
        if kind == "file":
            info["size"] = st.st_size
            info["sha256"] = _sha256(path)
            info["allocated_blocks_lt_size"] = st.st_blocks * 512 < st.st_size
        elif kind == "symlink":
            info["target"] = os.readlink(path)
        elif kind in ("chr", "blk"):
            info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        manifest[rel] = info
    for paths in inodes.values():
        for rel in paths:
            manifest[rel]["link_group"] = min(paths)
    return manifest


def manifest_specials(
    root: Path, *, ignore: frozenset[bytes] | set[bytes] = frozenset()
) -> dict[bytes, dict[str, Any]]:
    """The sockets and FIFOs below *root*, which backups omit (and count) by design."""
    return {
        rel: {
            "type": _SPECIAL_TYPES[stat.S_IFMT(st.st_mode)],
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
        for rel, _, st in _walk(os.fsencode(root), frozenset(ignore))
        if _is_special(st)
    }


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff(a: dict[bytes, dict[str, Any]], b: dict[bytes, dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for rel in sorted(a.keys() | b.keys()):
        name = rel.decode("utf-8", "backslashreplace")
        if rel not in b:
            out.append(f"{name}: only in the first tree ({a[rel]['type']})")
        elif rel not in a:
            out.append(f"{name}: only in the second tree ({b[rel]['type']})")
        else:
            for key in sorted(a[rel].keys() | b[rel].keys()):
                va, vb = a[rel].get(key), b[rel].get(key)
                if va != vb:
                    out.append(f"{name}: {key}: {_show(va)} != {_show(vb)}")
    return out


def assert_trees_identical(
    a: Path, b: Path, *, skip_specials: bool = True, ignore: frozenset[bytes] | set[bytes] = frozenset()
) -> None:
    """Raise AssertionError listing the first differences if the trees below *a* and *b* differ.

    With ``skip_specials=False`` sockets and FIFOs must match too (for comparing a tree
    with a plain copy of it; a restore never contains them).
    """
    diffs = _diff(tree_manifest(a, ignore=ignore), tree_manifest(b, ignore=ignore))
    if not skip_specials:
        diffs += _diff(manifest_specials(a, ignore=ignore), manifest_specials(b, ignore=ignore))
    if diffs:
        shown = "\n  ".join(diffs[:15])
        more = f"\n  ... and {len(diffs) - 15} more" if len(diffs) > 15 else ""
        raise AssertionError(f"trees differ: {a} vs {b} ({len(diffs)} differences)\n  {shown}{more}")


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a --reflink=auto``: the reference copy a restore is expected to match."""
    _run("cp", "-a", "--reflink=auto", "--", f"{src}/.", dst)
