"""Snapshot providers against real file systems: btrfs, XFS, ext4, tmpfs, overlayfs.

Only what no test machine can provide (an NFS server) is simulated.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from fsfixtures import (
    BAD_UTF8_NAME,
    LoopFs,
    assert_trees_identical,
    btrfs_subvolume,
    copy_tree,
    make_loop_fs,
    manifest_specials,
    populate_sample_tree,
    remove_tree,
    tree_manifest,
)

from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot import (
    BtrfsProvider,
    CopyProvider,
    FileChangedError,
    ReflinkProvider,
    Snapshot,
    choose_provider,
    detect,
    reflink,
    run_hook,
    take_snapshot,
)
from zfsbackd.snapshot.base import open_beneath_by_walk
from zfsbackd.snapshot.btrfs import SNAPSHOT_DIR


@dataclass(frozen=True)
class Source:
    """Stands in for config.FileSystemConfig (only the fields snapshots read)."""

    id: str
    source_path: Path | None
    source_zfs: str | None = None
    allow_copy_snapshots: bool = False
    pre_snapshot: tuple[str, ...] | None = None
    post_snapshot: tuple[str, ...] | None = None
    hook_timeout_seconds: int = 30


def _mount(tmp: Path, *args: str) -> Iterator[Path]:
    mnt = tmp / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", *args, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture(scope="module")
def xfs_noreflink_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    fs = make_loop_fs("xfs", 300, tmp_path_factory.mktemp("xfs0") / "mnt", reflink=False)
    yield fs
    fs.cleanup()


@pytest.fixture
def small_btrfs(tmp_path: Path) -> Iterator[LoopFs]:
    """A btrfs of its own, for tests that snapshot a whole file system from its mount root."""
    fs = make_loop_fs("btrfs", 256, tmp_path / "mnt")
    yield fs
    fs.cleanup()


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    yield from _mount(tmp_path, "-t", "tmpfs", "-o", "size=16m", "tmpfs")


@pytest.fixture
def overlay_dir(tmp_path: Path) -> Iterator[Path]:
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    yield from _mount(tmp_path, "-t", "overlay", "-o", opts, "overlay")


@pytest.fixture
def btrfs_plain_dir(btrfs_subvol: Path) -> Path:
    """A directory on btrfs that is not a subvolume: gets reflink clones, not snapshots."""
    path = btrfs_subvol / "plain"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def sample_tree(xfs_fs: LoopFs) -> Iterator[Path]:
    path = xfs_fs.mountpoint / "sample-tree"
    path.mkdir()
    populate_sample_tree(path)
    yield path
    remove_tree(path)


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_dir(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory for the clone tests: every file is cloned, however small (see the direct-read test)."""
    monkeypatch.setattr(reflink, "DIRECT_READ_MAX", -1)
    return request.getfixturevalue("xfs_dir" if request.param == "xfs" else "btrfs_plain_dir")


def test_reflink_reads_small_files_directly_and_notices_changes(xfs_dir: Path) -> None:
    small, big = xfs_dir / "small", xfs_dir / "big"
    small.write_bytes(b"a" * 1000)
    big.write_bytes(os.urandom(reflink.DIRECT_READ_MAX + 1))
    snap = ReflinkProvider().take(Source("fs-a", xfs_dir), "backup-0123456789abcdef0")
    try:
        with snap.open_file(b"small") as frozen:
            assert frozen.live and not frozen.clone and not frozen.changed()
            with small.open("ab") as f:
                f.write(b"more")
            assert frozen.changed(), "a live small file that moved must be read again"
        with snap.open_file(b"big") as frozen:
            assert not frozen.live and frozen.clone
            assert os.fstat(frozen.fd).st_ino != big.stat().st_ino  # a clone
    finally:
        snap.release()


def _cached_bytes(path: Path) -> int:
    """Bytes of *path* in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_prefetch_queues_the_reads_of_a_batch_of_files(xfs_dir: Path) -> None:
    """Files evicted from the page cache are read in by the hint alone; a missing one is passed over."""
    files = [xfs_dir / f"small-{i}" for i in range(8)]
    for f in files:
        f.write_bytes(os.urandom(64 * 1024))
    snap = ReflinkProvider().take(Source("fs-a", xfs_dir), "backup-0123456789abcdef0")
    try:
        os.sync()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        assert sum(_cached_bytes(f) for f in files) < len(files) * 64 * 1024
        with snap.prefetched([f.name.encode() for f in files] + [b"gone", b"../escape"]):
            deadline = time.monotonic() + 10
            while sum(_cached_bytes(f) for f in files) < len(files) * 64 * 1024 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [_cached_bytes(f) for f in files] == [64 * 1024] * len(files)
    finally:
        snap.release()


def _fds_open_on(directory: Path) -> dict[int, str]:
    """This process's descriptors open on files of *directory*: fd -> the file's name."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # (the listing's own descriptor, closed by now)
        if target.parent == directory:
            found[int(fd)] = target.name
    return found


def test_prefetched_files_are_opened_once_and_closed_if_not_read(xfs_dir: Path) -> None:
    """A file of the batch is opened by the prefetch and that descriptor is the read's, on the same thread
    only; what no read took is closed at the end of the block."""
    for name in ("a", "b", "c"):
        (xfs_dir / name).write_bytes(name.encode() * 100)
    snap = ReflinkProvider().take(Source("fs-a", xfs_dir), "backup-0123456789abcdef0")
    try:
        with snap.prefetched([b"a", b"b", b"a", b"c"]):
            held = _fds_open_on(xfs_dir)
            assert sorted(held.values()) == ["a", "b", "c"], "one descriptor per file, one named twice too"
            with snap.open_file(b"a") as frozen:
                assert held.get(frozen.fd) == "a" and os.pread(frozen.fd, 3, 0) == b"aaa"
            elsewhere: list[int] = []
            reader = threading.Thread(target=lambda: elsewhere.append(snap.open_file(b"b").fd))
            reader.start()
            reader.join()
            assert held.get(elsewhere[0]) != "b", "another thread opens its own"
            os.close(elsewhere[0])
            assert sorted(_fds_open_on(xfs_dir).values()) == ["b", "c"]
        assert _fds_open_on(xfs_dir) == {}
    finally:
        snap.release()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _listing(root: Path) -> dict[bytes, tuple[int, int, int]]:
    """Every name below *root* with (inode, size, mtime): shows anything we might leave behind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), os.fsencode(root))] = (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            )
    return out


def _walk_excluding(snap: Snapshot) -> list[bytes]:
    """What an archiver walking the snapshot sees: everything except ``excluded`` subtrees."""
    seen = []
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(os.fsencode(snap.root), rel_dir)) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in snap.excluded:
                    continue
                rel = os.path.join(rel_dir, entry.name)
                seen.append(rel)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
    return seen


# --------------------------------------------------------------------------- detection


def test_detect_btrfs_subvolume(btrfs_subvol: Path) -> None:
    assert isinstance(choose_provider(Source("fs-a", btrfs_subvol)), BtrfsProvider)


def test_detect_reflink_on_btrfs_plain_directory(btrfs_plain_dir: Path) -> None:
    assert isinstance(choose_provider(Source("fs-a", btrfs_plain_dir)), ReflinkProvider)


def test_detect_reflink_on_xfs(xfs_dir: Path) -> None:
    assert isinstance(choose_provider(Source("fs-a", xfs_dir)), ReflinkProvider)


def _assert_refused(path: Path, fs_name: str) -> None:
    with pytest.raises(SnapshotError) as exc_info:
        choose_provider(Source("fs-refused", path))
    msg = exc_info.value.message
    for needle in (
        "file_systems[fs-refused]",
        str(path),
        fs_name,
        "btrfs (a subvolume) or XFS with reflink=1",
        "ZFS dataset",
        "allow_copy_snapshots: true",
    ):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert isinstance(choose_provider(Source("fs-refused", path, allow_copy_snapshots=True)), CopyProvider)


def test_refuses_ext4_unless_copy_allowed(ext4_fs: LoopFs) -> None:
    _assert_refused(ext4_fs.mountpoint, "on ext4")


def test_refuses_tmpfs_unless_copy_allowed(tmpfs_dir: Path) -> None:
    _assert_refused(tmpfs_dir, "on tmpfs")


def test_refuses_overlayfs_unless_copy_allowed(overlay_dir: Path) -> None:
    _assert_refused(overlay_dir, "on overlayfs")


def test_refuses_xfs_without_reflink(xfs_noreflink_fs: LoopFs) -> None:
    _assert_refused(xfs_noreflink_fs.mountpoint, "xfs without working reflink (created without reflink=1)")


def test_refuses_nfs_unless_copy_allowed(ext4_fs: LoopFs, monkeypatch: pytest.MonkeyPatch) -> None:
    """No NFS server here: the file system type is the one thing simulated."""
    monkeypatch.setattr(detect, "fs_type", lambda path: 0x6969)
    monkeypatch.setattr(reflink, "fs_type", lambda path: 0x6969)
    _assert_refused(ext4_fs.mountpoint, "on nfs")


def test_bad_sources_are_snapshot_errors(xfs_dir: Path) -> None:
    (xfs_dir / "file").write_bytes(b"x")
    cases = {
        "does not exist": Source("fs-a", xfs_dir / "missing"),
        "is not a directory": Source("fs-a", xfs_dir / "file"),
        "not usable on this host: libzfs_core is not installed": Source("fs-a", None, source_zfs="tank/home"),
        "no source configured": Source("fs-a", None),
    }
    for needle, source in cases.items():
        with pytest.raises(SnapshotError, match=needle):
            take_snapshot(source, "backup-0123456789abcdef0")


def test_explicit_provider_checks_the_source(xfs_dir: Path, btrfs_plain_dir: Path, ext4_fs: LoopFs) -> None:
    with pytest.raises(SnapshotError, match="is on xfs, not btrfs"):
        BtrfsProvider().take(Source("fs-a", xfs_dir), "backup-1")
    with pytest.raises(SnapshotError, match="not a subvolume"):
        BtrfsProvider().take(Source("fs-a", btrfs_plain_dir), "backup-1")
    with pytest.raises(SnapshotError, match=r"cannot use reflink clones .* on ext4"):
        ReflinkProvider().take(Source("fs-a", ext4_fs.mountpoint), "backup-1")
    with pytest.raises(SnapshotError, match="cannot be used as a snapshot name"):
        BtrfsProvider().take(Source("../escape", btrfs_plain_dir.parent), "backup-1")


# --------------------------------------------------------------------------- btrfs


def test_btrfs_snapshot_is_read_only_and_point_in_time(btrfs_subvol: Path, btrfs_fs: LoopFs) -> None:
    populate_sample_tree(btrfs_subvol)
    source = Source("fs-pit", btrfs_subvol)
    snap = take_snapshot(source, "backup-pit")
    try:
        assert snap.describe() == {"Provider": "btrfs", "Name": "zfsbackd-backup-pit", "Atomic": True}
        assert snap.root == btrfs_fs.mountpoint / SNAPSHOT_DIR / "fs-pit" / "zfsbackd-backup-pit"
        assert snap.excluded == frozenset()  # the source is a subvolume below the mount root
        assert os.stat(snap.root.parent.parent).st_mode & 0o777 == 0o700
        assert_trees_identical(btrfs_subvol, snap.root, skip_specials=False)
        before = tree_manifest(btrfs_subvol)

        (btrfs_subvol / "files/one-byte").write_bytes(b"changed")
        (btrfs_subvol / "files/random-3m").unlink()
        (btrfs_subvol / "new-file").write_bytes(b"new")
        os.chmod(btrfs_subvol / "files/private", 0o644)
        assert tree_manifest(snap.root) == before

        with pytest.raises(OSError) as exc_info:
            (snap.root / "files/one-byte").write_bytes(b"y")
        assert exc_info.value.errno == errno.EROFS

        with snap.open_file(b"files/one-byte") as ff:
            assert _read_all(ff.fd) == b"x"
            assert ff.stat.st_size == 1
            assert not ff.changed()
        with snap.open_file(b"files/" + BAD_UTF8_NAME) as ff:
            assert _read_all(ff.fd) == b"not utf-8\n"
        with pytest.raises(FileNotFoundError):
            snap.open_file(b"files/random-3m-missing")

        found = BtrfsProvider().find(source, "backup-pit")
        assert found is not None and found.root == snap.root and found.atomic
        found.release()  # releasing the found view deletes the very same snapshot
        assert not snap.root.exists()
    finally:
        snap.release()
    snap.release()  # idempotent
    assert not snap.root.exists()
    assert BtrfsProvider().find(source, "backup-pit") is None


def test_btrfs_take_refuses_an_existing_snapshot(btrfs_subvol: Path) -> None:
    source = Source("fs-twice", btrfs_subvol)
    snap = BtrfsProvider().take(source, "backup-twice")
    try:
        with pytest.raises(SnapshotError, match="already exists"):
            BtrfsProvider().take(source, "backup-twice")
    finally:
        snap.release()


def test_btrfs_snapshot_of_mount_root_excludes_snapshot_directory(small_btrfs: LoopFs) -> None:
    root = small_btrfs.mountpoint
    (root / "data").write_bytes(b"data")
    btrfs_subvolume(root / "nested")
    source = Source("fs-root", root)
    first = take_snapshot(source, "backup-1")
    second = take_snapshot(source, "backup-2")
    try:
        inside = os.lstat(second.root / SNAPSHOT_DIR)
        assert second.excluded == frozenset({(inside.st_dev, inside.st_ino)})
        assert first.excluded  # the directory was created before the first snapshot, so it is in it too
        seen = _walk_excluding(second)
        assert sorted(seen) == [b"data", b"nested"]
        # What btrfs puts where a nested subvolume was (here: `nested`, and inside the
        # excluded directory our first snapshot): an empty directory, inode 2, another st_dev.
        placeholder = os.lstat(second.root / "nested")
        assert placeholder.st_ino == 2 and os.listdir(second.root / "nested") == []
        assert placeholder.st_dev != os.lstat(second.root).st_dev
        found = BtrfsProvider().find(source, "backup-2")
        assert found is not None and found.excluded == second.excluded
        found.release()
    finally:
        first.release()
        second.release()


# --------------------------------------------------------------------------- reflink


def test_reflink_frozen_file_is_point_in_time(reflink_dir: Path) -> None:
    (reflink_dir / "sub").mkdir()
    old = os.urandom(1 << 20)
    target = reflink_dir / "sub" / "data"
    target.write_bytes(old)
    st_before = os.stat(target)
    listing = _listing(reflink_dir)
    root_mtime = os.stat(reflink_dir).st_mtime_ns

    snap = take_snapshot(Source("fs-rl", reflink_dir), "backup-rl")
    assert snap.describe() == {"Provider": "reflink", "Name": "zfsbackd-backup-rl", "Atomic": False}
    assert snap.root == reflink_dir and snap.excluded == frozenset()
    with snap.open_file(b"sub/data") as ff:
        with open(target, "r+b") as f:  # overwrite in place: same inode
            f.write(b"\0" * (1 << 19))
            f.write(b"appended" * 1000)
        assert _read_all(ff.fd) == old
        assert ff.stat.st_ino == st_before.st_ino
        assert (ff.stat.st_size, ff.stat.st_mtime_ns) == (st_before.st_size, st_before.st_mtime_ns)
        assert not ff.changed()
    snap.release()
    snap.release()

    assert target.read_bytes() != old
    after = _listing(reflink_dir)
    after[b"sub/data"] = listing[b"sub/data"]  # the file we changed ourselves
    assert after == listing  # no clone, temp file or directory was left behind
    assert os.stat(reflink_dir).st_mtime_ns == root_mtime


def test_reflink_reads_the_whole_sample_tree(reflink_dir: Path) -> None:
    populate_sample_tree(reflink_dir)
    snap = ReflinkProvider().take(Source("fs-rl", reflink_dir), "backup-rl")
    try:
        for rel, info in tree_manifest(reflink_dir).items():
            if info["type"] != "file":
                continue
            with snap.open_file(rel) as ff:
                assert hashlib.sha256(_read_all(ff.fd)).hexdigest() == info["sha256"], rel
                st = os.lstat(os.path.join(os.fsencode(reflink_dir), rel))
                assert (ff.stat.st_ino, ff.stat.st_size, ff.stat.st_mtime_ns) == (
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                )
    finally:
        snap.release()


def test_open_file_never_follows_symlinks_or_leaves_the_root(reflink_dir: Path) -> None:
    populate_sample_tree(reflink_dir)
    snap = ReflinkProvider().take(Source("fs-rl", reflink_dir), "backup-rl")
    try:
        with pytest.raises(FileNotFoundError):
            snap.open_file(b"files/vanished")
        with pytest.raises(OSError) as exc_info:
            snap.open_file(b"links/relative")  # the last component is a symlink
        assert exc_info.value.errno == errno.ELOOP
        with pytest.raises(OSError) as exc_info:
            snap.open_file(b"links/to-dir/sub/three-3")  # a directory on the way is a symlink
        assert exc_info.value.errno == errno.ELOOP
        with pytest.raises(OSError) as exc_info:
            snap.open_file(b"../" + reflink_dir.name.encode() + b"/files/one-byte")
        assert exc_info.value.errno == errno.EXDEV
        with pytest.raises(FileChangedError, match="no longer a regular file"):
            snap.open_file(b"dir")
    finally:
        snap.release()


def test_open_beneath_fallback_without_openat2(xfs_dir: Path) -> None:
    """The per-component walk used on kernels without openat2 keeps the same promises."""
    populate_sample_tree(xfs_dir)
    root_fd = os.open(xfs_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_beneath_by_walk(root_fd, b"dir/sub/deep/random-100k")
        assert os.fstat(fd).st_size == 100 * 1024
        os.close(fd)
        for relpath, err in [
            (b"links/relative", errno.ELOOP),
            (b"links/to-dir/sub/three-3", errno.ENOTDIR),  # O_DIRECTORY|O_NOFOLLOW on a symlink
            (b"../x", errno.EXDEV),
            (b"/etc/passwd", errno.EXDEV),
            (b"files/missing", errno.ENOENT),
        ]:
            with pytest.raises(OSError) as exc_info:
                open_beneath_by_walk(root_fd, relpath)
            assert exc_info.value.errno == err, relpath
    finally:
        os.close(root_fd)


def test_reflink_file_that_keeps_changing_raises_file_changed(reflink_dir: Path) -> None:
    target = reflink_dir / "busy"
    target.write_bytes(b"start")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
            "end = time.monotonic() + 60\n"
            "while time.monotonic() < end: os.write(fd, b'x')\n",
            str(target),
        ]
    )
    snap = ReflinkProvider().take(Source("fs-rl", reflink_dir), "backup-rl")
    try:
        while target.stat().st_size < 1000:  # the writer is running
            time.sleep(0.01)
        raised: FileChangedError | None = None
        deadline = time.monotonic() + 30  # usually well under a second; how long varies a lot
        while raised is None and time.monotonic() < deadline:
            try:
                with snap.open_file(b"busy") as ff:
                    # Whatever got through is consistent: the content matches the stat.
                    assert len(_read_all(ff.fd)) == ff.stat.st_size
            except FileChangedError as exc:
                raised = exc
        assert raised is not None, "a file appended to all the time was never reported as changing"
        assert "kept changing" in str(raised) and raised.filename == str(target)
    finally:
        writer.kill()
        writer.wait()
        snap.release()


def test_reflink_nocow_file_falls_back_to_live_read(btrfs_plain_dir: Path) -> None:
    """btrfs cannot clone a nodatacow (chattr +C) file into a normal one: read it live instead."""
    target = btrfs_plain_dir / "nocow"
    target.touch()
    subprocess.run(["chattr", "+C", str(target)], check=True)
    target.write_bytes(b"nocow data")
    snap = ReflinkProvider().take(Source("fs-rl", btrfs_plain_dir), "backup-rl")
    try:
        with snap.open_file(b"nocow") as ff:
            assert ff.live and _read_all(ff.fd) == b"nocow data" and not ff.changed()
        with snap.open_file(b"nocow") as ff:
            with open(target, "ab") as f:
                f.write(b"more")
            assert ff.changed()
    finally:
        snap.release()


# --------------------------------------------------------------------------- copy


def test_copy_provider_reports_changes_while_reading(ext4_fs: LoopFs) -> None:
    root = ext4_fs.mountpoint / "copy-src"
    root.mkdir(exist_ok=True)
    target = root / "file"
    target.write_bytes(b"a" * 4096)
    os.utime(target, ns=(10**18, 10**18))  # any later write must move mtime
    snap = take_snapshot(Source("fs-copy", root, allow_copy_snapshots=True), "backup-cp")
    try:
        assert snap.describe() == {"Provider": "copy", "Name": "zfsbackd-backup-cp", "Atomic": False}
        with snap.open_file(b"file") as ff:
            assert _read_all(ff.fd) == b"a" * 4096
            assert not ff.changed()
        with snap.open_file(b"file") as ff:
            _read_all(ff.fd)
            with open(target, "r+b") as f:  # same size, in place
                f.write(b"b")
            assert ff.changed()
    finally:
        snap.release()


# --------------------------------------------------------------------------- hooks


def _logging_hook(log: Path, code: int = 0, stderr: str = "") -> tuple[str, ...]:
    script = f'echo "$ZFSBACKD_HOOK $ZFSBACKD_FS_ID $ZFSBACKD_BACKUP_ID" >> "$1"; {stderr} exit {code}'
    return ("sh", "-c", script, "hook", str(log))


def test_hooks_run_around_the_snapshot_with_environment(btrfs_subvol: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    marker = btrfs_subvol / "written-by-pre-hook"
    source = Source(
        "fs-hooks",
        btrfs_subvol,
        pre_snapshot=("sh", "-c", f'touch "{marker}" && "$@"', "sh", *_logging_hook(log)),
        post_snapshot=("sh", "-c", f'rm "{marker}" && "$@"', "sh", *_logging_hook(log)),
    )
    snap = take_snapshot(source, "backup-hooks")
    try:
        assert log.read_text().splitlines() == [
            "pre_snapshot fs-hooks backup-hooks",
            "post_snapshot fs-hooks backup-hooks",
        ]
        assert (snap.root / marker.name).exists()  # pre ran before the snapshot
        assert not marker.exists()  # post ran after it
    finally:
        snap.release()


def test_failing_pre_hook_takes_no_snapshot_and_still_runs_post(btrfs_subvol: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    noisy = " ".join(f"echo line{i} >&2;" for i in range(30))
    source = Source(
        "fs-x",
        btrfs_subvol,
        pre_snapshot=_logging_hook(log, code=3, stderr=noisy + " echo 'cannot flush' >&2;"),
        post_snapshot=_logging_hook(log),
    )
    with pytest.raises(SnapshotError) as exc_info:
        take_snapshot(source, "backup-pre")
    msg = exc_info.value.message
    assert "file_systems[fs-x].pre_snapshot" in msg and "exit status 3" in msg
    assert "cannot flush" in msg and "line29" in msg and "line10" not in msg  # the last 20 lines
    assert log.read_text().splitlines() == ["pre_snapshot fs-x backup-pre", "post_snapshot fs-x backup-pre"]
    assert BtrfsProvider().find(source, "backup-pre") is None


def test_post_hook_runs_when_taking_fails(btrfs_subvol: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    source = Source("fs-x", btrfs_subvol, pre_snapshot=_logging_hook(log), post_snapshot=_logging_hook(log))
    existing = BtrfsProvider().take(source, "backup-dup")
    try:
        with pytest.raises(SnapshotError, match="already exists"):
            take_snapshot(source, "backup-dup")
        assert log.read_text().splitlines() == [
            "pre_snapshot fs-x backup-dup",
            "post_snapshot fs-x backup-dup",
        ]
        failing_post = replace(source, post_snapshot=_logging_hook(log, code=4))
        with pytest.raises(SnapshotError, match=r"already exists.*post_snapshot \(sh\) failed with exit status 4"):
            take_snapshot(failing_post, "backup-dup")
    finally:
        existing.release()


def test_failing_post_hook_fails_and_releases_the_snapshot(btrfs_subvol: Path, tmp_path: Path) -> None:
    source = Source("fs-x", btrfs_subvol, post_snapshot=_logging_hook(tmp_path / "log", code=1))
    with pytest.raises(SnapshotError, match=r"file_systems\[fs-x\]\.post_snapshot .*exit status 1"):
        take_snapshot(source, "backup-post")
    assert BtrfsProvider().find(source, "backup-post") is None


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def test_hook_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    argv = ("sh", "-c", 'sleep 60 & echo $! > "$1"; echo waiting >&2; wait', "hook", str(pidfile))
    started = time.monotonic()
    with pytest.raises(SnapshotError) as exc_info:
        run_hook(argv, fs_id="fs-x", backup_id="backup-t", phase="pre_snapshot", timeout=1)
    assert time.monotonic() - started < 10
    msg = exc_info.value.message
    assert "file_systems[fs-x].pre_snapshot" in msg and "did not finish within 1 s" in msg and "waiting" in msg
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(child)


def test_hook_left_running_in_background_does_not_block(tmp_path: Path) -> None:
    """A hook may start a helper that outlives it (holding a lock, say); we only wait for the hook."""
    pidfile = tmp_path / "pid"
    argv = ("sh", "-c", 'sleep 30 >/dev/null 2>&1 & echo $! > "$1"', "hook", str(pidfile))
    started = time.monotonic()
    run_hook(argv, fs_id="fs-x", backup_id="backup-t", phase="post_snapshot", timeout=20)
    assert time.monotonic() - started < 10
    os.kill(int(pidfile.read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("/nonexistent/hook",), "cannot run '/nonexistent/hook'"),
        (("sh", "-c", "kill -TERM $$"), "failed with signal SIGTERM"),
        (("sh", "-c", "exit 2"), r"failed with exit status 2 \(no stderr output\)"),
        ((), "is empty"),
    ],
)
def test_hook_failures_are_explained(argv: tuple[str, ...], expected: str) -> None:
    with pytest.raises(SnapshotError, match=r"file_systems\[fs-x\]\.pre_snapshot.*" + expected):
        run_hook(argv, fs_id="fs-x", backup_id="b", phase="pre_snapshot", timeout=10)


def test_unsupported_source_runs_no_hooks(ext4_fs: LoopFs, tmp_path: Path) -> None:
    log = tmp_path / "log"
    source = Source("fs-x", ext4_fs.mountpoint, pre_snapshot=_logging_hook(log), post_snapshot=_logging_hook(log))
    with pytest.raises(SnapshotError, match="allow_copy_snapshots"):
        take_snapshot(source, "backup-x")
    assert not log.exists()


# --------------------------------------------------------------------------- fsfixtures


def test_sample_tree_has_what_it_promises(sample_tree: Path) -> None:
    manifest = tree_manifest(sample_tree)
    assert manifest[b"files/sparse-64m"]["allocated_blocks_lt_size"] is True
    assert manifest[b"files/random-3m"]["allocated_blocks_lt_size"] is False
    assert manifest[b"hardlinks/pair-2"]["link_group"] == b"hardlinks/pair-1"
    assert {manifest[p]["link_group"] for p in (b"hardlinks/three-1", b"hardlinks/three-2", b"dir/sub/three-3")} == {
        b"dir/sub/three-3"
    }
    assert b"system.posix_acl_access" in manifest[b"files/acl"]["xattrs"]
    assert manifest[b"files/xattrs"]["xattrs"][b"user.k"] == b"v"
    assert manifest[b"files/setuid"]["mode"] == "0o4755" and manifest[b"sticky"]["mode"] == "0o1777"
    assert manifest[b"empty-dir"]["type"] == "dir"
    assert b"files/" + BAD_UTF8_NAME in manifest
    assert set(manifest_specials(sample_tree)) == {b"specials/fifo", b"specials/socket"}
    assert b"specials/fifo" not in manifest


def test_assert_trees_identical_accepts_a_faithful_copy(sample_tree: Path, xfs_dir: Path) -> None:
    copy_tree(sample_tree, xfs_dir)
    assert_trees_identical(sample_tree, xfs_dir, skip_specials=False)


def _keep_mtimes(paths: list[Path], change: Callable[[], None]) -> None:
    """Make *change* without touching mtimes, so only the intended difference remains."""
    saved = [(p, os.lstat(p).st_mtime_ns) for p in paths]
    change()
    for p, ns in saved:
        os.utime(p, ns=(ns, ns), follow_symlinks=False)


def _flip_byte(t: Path) -> None:
    f = t / "files/random-3m"

    def change() -> None:
        with open(f, "r+b") as fh:
            fh.seek(1_000_000)
            b = fh.read(1)
            fh.seek(1_000_000)
            fh.write(bytes([b[0] ^ 1]))

    _keep_mtimes([f], change)


def _retarget_symlink(t: Path) -> None:
    link = t / "links/relative"

    def change() -> None:
        st = os.lstat(link)
        link.unlink()
        os.symlink("../files/empty", link)
        os.lchown(link, st.st_uid, st.st_gid)

    _keep_mtimes([link, link.parent], change)


def _break_hardlink(t: Path) -> None:
    f = t / "hardlinks/pair-2"

    def change() -> None:
        subprocess.run(["cp", "-a", str(f), f"{f}.tmp"], check=True)
        os.rename(f"{f}.tmp", f)

    _keep_mtimes([f.parent], change)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_flip_byte, "sha256"),
        (lambda t: os.chmod(t / "files/private", 0o640), "mode"),
        (lambda t: os.utime(t / "dir/sub", ns=(1, os.stat(t / "dir/sub").st_mtime_ns + 1)), "mtime_ns"),
        (lambda t: os.setxattr(t / "files/xattrs", b"user.k", b"w"), "xattrs"),
        (_retarget_symlink, "target"),
        (_break_hardlink, "link_group"),
    ],
    ids=["content", "mode", "dir-mtime", "xattr", "symlink-target", "hardlink"],
)
def test_assert_trees_identical_catches_each_change(
    sample_tree: Path, xfs_dir: Path, mutate: Callable[[Path], None], field: str
) -> None:
    copy_tree(sample_tree, xfs_dir)
    mutate(xfs_dir)
    with pytest.raises(AssertionError) as exc_info:
        assert_trees_identical(sample_tree, xfs_dir)
    report = str(exc_info.value)
    assert "(1 differences)" in report and f": {field}: " in report, report
