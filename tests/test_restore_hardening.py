"""Restore hardening (issue 9): a restore never writes outside ``<target>/zfsbackd-restore_<ts>``,
and whatever goes wrong on the target is a classified error that names the path and the fix.

Backups with unusual trees (2,000 levels deep, hostile names, malformed fields, attributes
in unknown namespaces) are written directly with the store API, as someone holding the
key could; the others go through the engine or the CLI from real XFS trees.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import make_config, run_cli, write_config
from fsfixtures import LoopFs, assert_trees_identical, make_loop_fs, tree_manifest

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.engine.restore_files import FileWriter, RestoreTarget
from zfsbackd.errors import (
    EXIT_BAD_REQUEST,
    EXIT_INTEGRITY,
    EXIT_TARGET_FULL,
    IntegrityError,
    RestoreError,
    RestoreTargetFull,
)
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.packs import pack_key
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle, new_backup_id, utc_now
from zfsbackd.store.tree import Node, encode_name, encode_xattrs, serialize_tree
from zfsbackd.store.writer import PackWriter

MiB = 1024 * 1024
MTIME_NS = 1_600_000_000_123_456_789
FAILED = "zfsbackd-failed-restore_"
RESTORED = "zfsbackd-restore_"


# ----------------------------------------------------------------------------- crafted backups
def _named(name: str | bytes) -> dict[str, str]:
    return encode_name(name) if isinstance(name, bytes) else {"name": name}


def file_node(name: str | bytes, data: bytes = b"data\n", **fields: Any) -> Node:
    """A regular file; its data is stored when the backup is built (unless ``chunks`` is given)."""
    node = {**_named(name), "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": MTIME_NS}
    return {**node, "ctime_ns": 0, "inode": 1, "size": len(data), "_data": data, **fields}


def dir_node(name: str | bytes, children: list[Node], **fields: Any) -> Node:
    """A directory; its tree is stored when the backup is built (unless ``subtree`` is given)."""
    node = {**_named(name), "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": MTIME_NS}
    return {**node, "ctime_ns": 0, "inode": 2, "_children": children, **fields}


def tree_blob(writer: PackWriter, nodes: list[Node]) -> str:
    """Store ``nodes`` as one tree (their data and subtrees first); the tree's id in hex."""
    out = []
    for node in nodes:
        node = dict(node)
        data = node.pop("_data", None)
        if data is not None and "chunks" not in node:
            node["chunks"] = [[0, len(data), writer.add(BlobType.DATA, data)[0].hex()]] if data else []
        children = node.pop("_children", None)
        if children is not None and "subtree" not in node:
            node["subtree"] = tree_blob(writer, children)  # recursion: only for shallow test trees
        out.append(node)
    return writer.add(BlobType.TREE, serialize_tree(out))[0].hex()


def crafted_backup(engine: Engine, top: list[Node] | Callable[[PackWriter], list[Node]]) -> str:
    """An AVAILABLE backup whose root directory holds ``top`` (or what ``top(writer)`` returns)."""
    store = engine.store()
    store.load_index()
    with PackWriter(store) as writer:
        entries = top(writer) if callable(top) else top
        root_id = tree_blob(writer, [dir_node(".", entries)])
        writer.flush()
    record = BackupRecord(
        new_backup_id(), "fs-src", store.region, BackupType.USER_INITIATED, Lifecycle.AVAILABLE, utc_now(),
        root_tree=root_id,
    )  # fmt: skip
    store.save_record(record)
    return record.backup_id


def only_entry(target: Path) -> Path:
    (entry,) = list(target.iterdir())
    return entry


def snapshot_of(root: Path, *, skip: tuple[str, ...] = ()) -> set[Path]:
    return {p for p in root.rglob("*") if not any(part in skip for part in p.relative_to(root).parts)}


@pytest.fixture
def engine(tmp_path: Path, xfs_dir: Path) -> Engine:
    return Engine(make_config(tmp_path, {"src": xfs_dir}))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def _cli_backup(tmp_path: Path, source: Path) -> tuple[Path, str]:
    config = write_config(tmp_path, {"src": source})
    created = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert created.returncode == 0, created.stderr
    return config, created.json["Backup"]["BackupId"]


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[Callable[[int], LoopFs]]:
    """Make small ext4 file systems for one test (unmounted and deleted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounted file systems need root")
    made: list[LoopFs] = []

    def make(size_mib: int) -> LoopFs:
        made.append(make_loop_fs("ext4", size_mib, tmp_path / f"ext4-{len(made)}"))
        return made[-1]

    yield make
    for fs in made:
        subprocess.run(["mount", "-o", "remount,rw", fs.mountpoint], capture_output=True, check=False)
        fs.cleanup()


# ------------------------------------------------------------------------------------ target
def test_target_that_is_a_symlink_missing_or_not_a_directory_is_refused(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    config, backup_id = _cli_backup(tmp_path, xfs_dir)
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    to_root, to_real = tmp_path / "to-root", tmp_path / "to-real"
    to_root.symlink_to("/")
    to_real.symlink_to(real)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    root_before = set(os.listdir("/"))
    refused = {
        str(to_root): "is a symlink",
        str(to_real): "is a symlink",
        f"{to_real}/": "is a symlink",
        str(tmp_path / "missing"): "does not exist",
        str(a_file): "is not a directory",
        str(a_file / "below"): "not a directory",
    }
    for given, words in refused.items():
        result = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", given)
        assert result.returncode == EXIT_BAD_REQUEST, (given, result.stderr)
        message = result.error["Message"]
        assert result.error["Code"] == "RestoreFailed" and words in message, (given, message)
        assert given.rstrip("/") in message
    link_message = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(to_real)).error
    assert f"--target {real}" in link_message["Message"], "the fix names the real directory"
    assert set(os.listdir("/")) == root_before
    assert list(real.iterdir()) == [real / "sub"] and not list((real / "sub").iterdir())

    # A symlink above the target is resolved once, and the result names the real path.
    ok = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(to_real / "sub"))
    assert ok.returncode == 0, ok.stderr
    restored = Path(ok.json["Restore"]["Path"])
    assert restored.parent == real / "sub" and (restored / "f").read_text() == "x"


def test_a_directory_swapped_for_a_symlink_mid_restore_cannot_redirect_writes(
    engine: Engine, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process renames a directory of the restore and puts a symlink in its place while
    files are being written into it: the writes still land in the directory the restore made."""
    backup_id = crafted_backup(engine, [dir_node("d", [file_node(f"f{i:02}", b"x" * i) for i in range(40)])])
    outside = tmp_path / "outside"
    outside.mkdir()
    write_file = FileWriter._write_file
    lock, swapped = threading.Lock(), []

    def swap_then_write(self: FileWriter, *args: Any) -> int:
        with lock:
            if not swapped:
                dest = only_entry(target)
                os.rename(dest / "d", dest / "d.moved")
                os.symlink(outside, dest / "d")
                swapped.append(dest)
        return write_file(self, *args)

    monkeypatch.setattr(FileWriter, "_write_file", swap_then_write)
    try:
        engine.restore_backup(backup_id, target)
    except RestoreError as exc:  # acceptable too: the swap is noticed when the directory is reopened
        assert "replaced" in exc.message
    assert swapped and list(outside.iterdir()) == []
    assert len(list((only_entry(target) / "d.moved").iterdir())) == 40


# --------------------------------------------------------------------------- full target
def test_full_target_is_insufficient_storage_and_the_same_restore_works_after_freeing_space(
    xfs_dir: Path, tmp_path: Path, loop_ext4: Callable[[int], LoopFs]
) -> None:
    rng = random.Random(9)
    (xfs_dir / "dir").mkdir()
    for i in range(3):
        (xfs_dir / "dir" / f"big-{i}.bin").write_bytes(rng.randbytes(8 * MiB))
    for i in range(20):
        (xfs_dir / f"small-{i}.txt").write_bytes(rng.randbytes(1000 + i))
    config, backup_id = _cli_backup(tmp_path, xfs_dir)
    fs = loop_ext4(48)
    target = fs.mountpoint / "target"
    target.mkdir()
    filler = fs.mountpoint / "filler"
    with filler.open("wb") as f:  # leave 12 MiB free: the restore needs 24 MiB
        st = os.statvfs(fs.mountpoint)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 12 * MiB)
    before = snapshot_of(fs.mountpoint, skip=("target",))

    full = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))

    assert full.returncode == EXIT_TARGET_FULL, full.stderr
    assert full.error["Code"] == "InsufficientStorage"
    message = full.error["Message"]
    failed = only_entry(target)
    assert failed.name.startswith(FAILED) and str(failed) in message, message
    # Which file meets the full disk first depends on the writer threads; it is always named.
    assert re.search(r"cannot write /(dir/big-\d\.bin|small-\d+\.txt)", message), message
    assert "No space left on device (ENOSPC)" in message, message
    assert "bytes" in message and "available" in message and "Free space" in message, message
    assert snapshot_of(fs.mountpoint, skip=("target",)) == before, "nothing is written outside the target"

    filler.unlink()
    shutil.rmtree(failed)
    ok = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))
    assert ok.returncode == 0, ok.stderr
    assert_trees_identical(xfs_dir, Path(ok.json["Restore"]["Path"]))


@pytest.mark.parametrize(
    ("code", "error_class", "words"),
    [
        (errno.ENOSPC, RestoreTargetFull, "is full"),
        (errno.EDQUOT, RestoreTargetFull, "quota"),
        (errno.EROFS, RestoreError, "read-only"),
        (errno.EACCES, RestoreError, "restores run as root"),
        (errno.EPERM, RestoreError, "chattr"),
        (errno.EIO, RestoreError, "dmesg"),
        (errno.EMLINK, RestoreError, "hard links"),
        (errno.EEXIST, RestoreError, "tampered"),
        (errno.ELOOP, RestoreError, "replaced"),
        (errno.ENOTCONN, RestoreError, "run the restore again"),
    ],
)
def test_errors_of_the_target_are_classified_with_path_and_fix(
    code: int, error_class: type[RestoreError], words: str, tmp_path: Path
) -> None:
    target = RestoreTarget("backup-0", tmp_path, tmp_path, space_fd=os.open(tmp_path, os.O_RDONLY))
    try:
        error = target.error(OSError(code, os.strerror(code)), "write", b"dir/file")
    finally:
        os.close(target.space_fd)
    assert type(error) is error_class
    assert error.exit_code == (EXIT_TARGET_FULL if error_class is RestoreTargetFull else EXIT_BAD_REQUEST)
    assert "backup-0" in error.message and "/dir/file" in error.message and errno.errorcode[code] in error.message
    assert words in error.message.lower(), error.message


def test_read_only_or_immutable_target_is_refused_with_the_fix(
    xfs_dir: Path, tmp_path: Path, loop_ext4: Callable[[int], LoopFs]
) -> None:
    (xfs_dir / "f").write_text("x")
    config, backup_id = _cli_backup(tmp_path, xfs_dir)
    fs = loop_ext4(16)
    (fs.mountpoint / "target").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", fs.mountpoint], check=True)
    read_only = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(fs.mountpoint / "target"))
    assert read_only.returncode == EXIT_BAD_REQUEST, read_only.stderr
    assert "read-only" in read_only.error["Message"] and str(fs.mountpoint / "target") in read_only.error["Message"]

    immutable = tmp_path / "immutable"
    immutable.mkdir()
    subprocess.run(["chattr", "+i", immutable], check=True)
    try:
        refused = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(immutable))
    finally:
        subprocess.run(["chattr", "-i", immutable], check=True)
    assert refused.returncode == EXIT_BAD_REQUEST, refused.stderr
    message = refused.error["Message"]
    assert "(EPERM)" in message and "chattr -i" in message and str(immutable) in message, message
    assert list(immutable.iterdir()) == []


def test_name_too_long_for_the_target_names_the_path_and_limit(engine: Engine, target: Path) -> None:
    long_name = "n" * 300  # a safe name, but longer than XFS (or ext4) allows
    backup_id = crafted_backup(engine, [dir_node("d", [file_node(long_name)])])
    with pytest.raises(RestoreError) as raised:
        engine.restore_backup(backup_id, target)
    message = raised.value.message
    assert type(raised.value) is RestoreError
    assert f"/d/{long_name}" in message and "300 bytes" in message and "at most 255 bytes" in message, message
    assert only_entry(target).name.startswith(FAILED)


# ------------------------------------------------------------------------------------ xattrs
def test_xattr_too_large_for_the_target_is_skipped_counted_and_reported(
    xfs_dir: Path, tmp_path: Path, ext4_fs: LoopFs
) -> None:
    """XFS holds a 60 KiB attribute value; ext4 (without ea_inode) only what fits one block."""
    big = random.Random(3).randbytes(60 * 1024)
    (xfs_dir / "docs").mkdir()
    doc = xfs_dir / "docs" / "report.txt"
    doc.write_text("report\n")
    os.setxattr(doc, "user.big", big)
    os.setxattr(doc, "user.small", b"kept")
    os.setxattr(xfs_dir / "docs", "user.big", big)
    config, backup_id = _cli_backup(tmp_path, xfs_dir)
    target = ext4_fs.mountpoint / f"xattr-target-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    try:
        result = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))
        assert result.returncode == 0, result.stderr
        restore = result.json["Restore"]
        assert restore["XattrsNotRestored"] == 2, restore
        warnings = "\n".join(restore["Warnings"])
        assert "/docs/report.txt: extended attribute user.big (61440 bytes) not restored" in warnings, warnings
        assert "/docs: extended attribute user.big" in warnings, warnings
        restored = Path(restore["Path"]) / "docs" / "report.txt"
        assert restored.read_text() == "report\n"
        assert os.getxattr(restored, "user.small") == b"kept"
        assert "user.big" not in os.listxattr(restored)
        assert restored.stat().st_mtime_ns == doc.stat().st_mtime_ns, "the rest of the metadata is restored"
    finally:
        shutil.rmtree(target)


def test_xattr_in_a_namespace_the_target_does_not_know_is_skipped(engine: Engine, target: Path) -> None:
    xattrs = encode_xattrs([("bogus.attribute", b"v"), ("user.fine", b"ok")])
    backup_id = crafted_backup(engine, [file_node("f", xattrs=xattrs)])
    result = engine.restore_backup(backup_id, target)
    assert result.xattrs_not_restored == 1
    (warning,) = result.warnings
    assert warning.startswith("/f: extended attribute bogus.attribute (1 bytes) not restored: Operation not supported")
    assert os.getxattr(result.path / "f", "user.fine") == b"ok"
    assert result.to_api()["XattrsNotRestored"] == 1


# ------------------------------------------------------------------------------------- paths
def test_duplicate_and_overlapping_paths_are_merged(xfs_dir: Path, tmp_path: Path, target: Path) -> None:
    (xfs_dir / "a" / "b").mkdir(parents=True)
    (xfs_dir / "a" / "b" / "c.txt").write_text("c")
    (xfs_dir / "a" / "x.txt").write_text("x")
    (xfs_dir / "other.txt").write_text("o")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    backup_id = engine.create_backup(BackupRequest("fs-src")).backup_id

    for paths in (["a", "a"], ["a", "a/b"], ["a/b", "a"], ["a/b/c.txt", "a/b", "/a/", "./a"]):
        result = engine.restore_backup(backup_id, target, paths=paths)
        assert [p.name for p in result.path.iterdir()] == ["a"], paths
        assert_trees_identical(xfs_dir / "a", result.path / "a")
        assert result.files == 2, paths
    everything = engine.restore_backup(backup_id, target, paths=["a/b", "/"])
    assert_trees_identical(xfs_dir, everything.path)
    siblings = engine.restore_backup(backup_id, target, paths=["a/x.txt", "a/b"])
    assert tree_manifest(siblings.path / "a") == tree_manifest(xfs_dir / "a")

    leftovers = set(target.iterdir())
    config = write_config(tmp_path, {"src": xfs_dir})
    bad = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target), "--path", "a",
                  "--path", "nope")  # fmt: skip
    assert bad.returncode == EXIT_BAD_REQUEST and "'nope' is not in backup" in bad.error["Message"], bad.stderr
    assert set(target.iterdir()) == leftovers, "a refused --path leaves nothing behind"
    dup = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target), "--path", "a",
                  "--path", "a")  # fmt: skip
    assert dup.returncode == 0, dup.stderr


# -------------------------------------------------------------------------------------- depth
DEPTH = 2000
LEVEL = "level-directory-name"  # 2,000 of them: a 42,000-byte path, ten times PATH_MAX


def _deep_chain(writer: PackWriter) -> list[Node]:
    entries = [file_node("bottom.txt", b"at the bottom\n", mode=0o600)]
    for _ in range(DEPTH):  # bottom up, so no recursion
        entries = [dir_node(LEVEL, [], subtree=tree_blob(writer, entries), mode=0o750)]
    return entries


def _open_chain(root: Path, depth: int) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        child = os.open(LEVEL, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def test_a_tree_2000_levels_deep_restores_beyond_path_max(engine: Engine, xfs_dir: Path) -> None:
    """Built with the store API: the archiver's own depth limit is another change (issue 9)."""
    backup_id = crafted_backup(engine, _deep_chain)
    target = xfs_dir / "deep-target"
    target.mkdir()
    try:
        full = engine.restore_backup(backup_id, target)
        partial = engine.restore_backup(backup_id, target, paths=["/".join([LEVEL] * DEPTH + ["bottom.txt"])])
        assert full.directories == DEPTH and full.files == 1 and partial.files == 1
        for root in (full.path, partial.path):
            fd = _open_chain(root, DEPTH)
            try:
                with open(os.open("bottom.txt", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as f:
                    assert f.read() == b"at the bottom\n"
                st = os.stat("bottom.txt", dir_fd=fd)
                assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o600, MTIME_NS)
            finally:
                os.close(fd)
        fd = _open_chain(full.path, DEPTH // 2)
        try:
            st = os.fstat(fd)
            assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o750, MTIME_NS), "directory metadata, applied last"
        finally:
            os.close(fd)
    finally:
        subprocess.run(["rm", "-rf", "--", target], check=True)  # beyond PATH_MAX: rm works by descriptors


# ---------------------------------------------------------------------------- hostile trees
@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "",
        "../../escaped",
        "a/../../escaped",
        "/tmp/zfsbackd-absolute-escape",
        "nul\0byte",
        b"../\xff-not-utf8",
    ],
)
@pytest.mark.parametrize("paths", [[], ["sub/x"]])
def test_hostile_names_deep_in_a_tree_never_write_outside_the_target(
    name: str | bytes, paths: list[str], engine: Engine, target: Path, tmp_path: Path
) -> None:
    backup_id = crafted_backup(engine, [dir_node("sub", [file_node("x"), file_node(name, b"pwned\n")])])
    before = snapshot_of(tmp_path, skip=("store", "state", "target"))
    with pytest.raises(RestoreError, match="unsafe entry name"):
        engine.restore_backup(backup_id, target, paths=paths)
    assert snapshot_of(tmp_path, skip=("store", "state", "target")) == before
    assert not Path("/tmp/zfsbackd-absolute-escape").exists()
    left = list(target.iterdir())
    if paths:  # refused while resolving the --path: before anything was written
        assert left == []
    else:
        assert [p.name.startswith(FAILED) for p in left] == [True]
        assert not any(p.name == "pwned" or b"escaped" in os.fsencode(p) for p in left[0].rglob("*"))


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (file_node("bad", chunks="zzz"), "chunk list"),
        (file_node("bad", chunks=[[0, 5, "not-hex"]]), "malformed chunk"),
        (file_node("bad", chunks=[[-1, 5, "00" * 32]]), "malformed chunk"),
        (file_node("bad", mode="0644"), "mode"),
        (file_node("bad", hardlink=[1]), "hard link"),
        (file_node("bad", xattrs=[["user.x"]]), "extended attributes"),
        (dir_node("bad", [], subtree=None), "subtree"),
        ({**dir_node("bad", []), "type": "fifo"}, "unknown type"),
        ({**file_node("bad"), "type": "symlink"}, "symlink without a valid target"),
        ({**file_node("bad"), "type": "chardev"}, "device"),
    ],
)
def test_malformed_entries_are_integrity_errors_naming_the_path(
    bad: Node, words: str, engine: Engine, target: Path
) -> None:
    backup_id = crafted_backup(engine, [dir_node("sub", [bad])])
    with pytest.raises(IntegrityError) as raised:
        engine.restore_backup(backup_id, target)
    assert "/sub/bad" in raised.value.message and words in raised.value.message, raised.value.message
    assert raised.value.exit_code == EXIT_INTEGRITY


def test_corrupt_file_data_names_the_backup_and_file_and_keeps_the_failed_restore(
    engine: Engine, target: Path, tmp_path: Path
) -> None:
    data = random.Random(5).randbytes(200_000)
    backup_id = crafted_backup(engine, [dir_node("docs", [file_node("report.bin", data)])])
    store = engine.store()
    store.load_index()
    loc = store.index.get(next(b for b in store.index.blob_ids() if store.blob_type(b) == BlobType.DATA))
    assert loc is not None
    pack = tmp_path / "store" / pack_key(loc.pack_id)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0xFF
    pack.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as raised:
        engine.restore_backup(backup_id, target)
    message = raised.value.message
    assert backup_id in message and "/docs/report.bin" in message, message
    failed = only_entry(target)
    assert failed.name.startswith(FAILED) and str(failed) in message


def test_a_dataset_target_on_a_host_without_zfs_is_a_classified_error(engine: Engine, xfs_dir: Path) -> None:
    (xfs_dir / "f").write_text("f\n")
    record = engine.create_backup(BackupRequest("fs-src"))
    with pytest.raises(RestoreError, match=r"--target-dataset tank/new: .*libzfs_core is not installed.*--target DIR"):
        engine.restore_backup(record.backup_id, None, target_dataset="tank/new")
