"""zfsbackd.zfs.command against the real ``zfs``/``zpool`` commands."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from zfsvm_util import openzfs_version, sh, zfs_get

from zfsbackd.zfs import command
from zfsbackd.zfs import libzfs_core as lzc


def _tree_before(m: Path) -> None:
    (m / "dir").mkdir()
    (m / "dir" / "mod").write_bytes(b"a\n")
    for name in ("del", "ren", "hard", "xat", "perm", "tochange", "unlinkme", "old name"):
        (m / name).write_bytes(name.encode() + b"\n")
    os.link(m / "unlinkme", m / "unlinkme-link")
    (m / "sub" / "deep").mkdir(parents=True)
    (m / "sub" / "deep" / "x").write_bytes(b"x\n")
    (m / "gone").mkdir()
    (m / "gone" / "f").write_bytes(b"f\n")
    os.symlink("del", m / "sym")


def _tree_after(m: Path) -> None:
    with (m / "dir" / "mod").open("ab") as f:
        f.write(b"more\n")
    (m / "del").unlink()
    (m / "ren").rename(m / "renamed")
    os.link(m / "hard", m / "hard2")
    os.setxattr(m / "xat", "user.k", b"v")
    (m / "perm").chmod(0o600)
    (m / "tochange").unlink()
    (m / "tochange").mkdir()
    (m / "unlinkme-link").unlink()
    (m / "sub").rename(m / "sub2")
    (m / "old name").rename(m / os.fsdecode(b"latin\xe9 \\ name"))
    (m / "gone" / "f").unlink()
    (m / "gone").rmdir()
    (m / "sym").unlink()
    os.symlink("renamed", m / "sym")
    for name in (b"with space", b"new\nline", b"tab\tx", b"back\\slash", "café".encode()):
        (m / os.fsdecode(name)).write_bytes(b"new\n")
    os.sync()


def _rel(m: Path, path: bytes | None) -> bytes | None:
    if path is None:
        return None
    prefix = os.fsencode(m)
    assert path == prefix + b"/" or path.startswith(prefix + b"/"), path
    return path[len(prefix) + 1 :]


def test_diff_reports_every_kind_of_change(dataset: str) -> None:
    m = Path(zfs_get("mountpoint", dataset)[0])
    _tree_before(m)
    sh("zfs", "snapshot", f"{dataset}@a")
    started = time.time_ns()
    _tree_after(m)
    sh("zfs", "snapshot", f"{dataset}@b")
    entries = list(command.diff(f"{dataset}@a", f"{dataset}@b"))
    got = {(e.change, e.file_type, _rel(m, e.path), _rel(m, e.new_path), e.link_delta) for e in entries}
    expected = {
        ("M", "/", b"", None, None),
        ("M", "F", b"dir/mod", None, None),
        ("-", "F", b"del", None, None),
        ("R", "F", b"ren", b"renamed", None),
        ("M", "F", b"hard", None, 1),
        ("M", "F", b"xat", None, None),
        ("M", "F", b"perm", None, None),
        ("-", "F", b"tochange", None, None),
        ("+", "/", b"tochange", None, None),
        ("M", "F", b"unlinkme", None, -1),
        ("R", "/", b"sub", b"sub2", None),
        ("R", "F", b"old name", b"latin\xe9 \\ name", None),
        ("-", "/", b"gone", None, None),
        ("-", "F", b"gone/f", None, None),
        ("-", "@", b"sym", None, None),
        ("+", "@", b"sym", None, None),
        ("+", "F", b"with space", None, None),
        ("+", "F", b"new\nline", None, None),
        ("+", "F", b"tab\tx", None, None),
        ("+", "F", b"back\\slash", None, None),
        ("+", "F", "café".encode(), None, None),
    }
    dir_xattrs = openzfs_version() < (2, 2)  # xattr=on means directory xattrs on 2.1, system attributes since 2.2
    if dir_xattrs:
        expected |= {("+", "/", b"xat/<xattrdir>", None, None), ("+", "F", b"xat/<xattrdir>/user.k", None, None)}
    assert got == expected, f"missing: {expected - got}\nunexpected: {got - expected}"
    assert len(entries) == len(got)
    # A new hard link name is not listed itself: only its parent directory (M) and the (+1) show it.
    assert not any(e.path.endswith(b"/hard2") for e in entries)
    assert {e.path for e in entries if e.in_xattr_dir} == (
        {os.fsencode(m / "xat" / "<xattrdir>"), os.fsencode(m / "xat" / "<xattrdir>" / "user.k")}
        if dir_xattrs
        else set()
    )
    changed = [e for e in entries if e.change in "+MR" and not e.in_xattr_dir]
    assert all(started - 5_000_000_000 <= e.ctime_ns <= time.time_ns() for e in changed)


def test_diff_against_the_live_file_system_and_errors(dataset: str) -> None:
    m = Path(zfs_get("mountpoint", dataset)[0])
    sh("zfs", "snapshot", f"{dataset}@a")
    (m / "new").write_bytes(b"x")
    os.sync()
    entries = list(command.diff(f"{dataset}@a", dataset))
    assert {(e.change, _rel(m, e.path)) for e in entries} == {("M", b""), ("+", b"new")}
    with pytest.raises(command.ZfsCommandError, match="zfs diff -FHt"):
        list(command.diff(f"{dataset}@a", f"{dataset}@nope"))
    sh("zfs", "snapshot", f"{dataset}@b")
    with pytest.raises(command.ZfsCommandError, match="earlier snapshot"):
        list(command.diff(f"{dataset}@b", f"{dataset}@a"))
    with pytest.raises(command.DatasetMissing) as info:
        list(command.diff(f"{dataset}/nofs@a", f"{dataset}/nofs@b"))
    assert info.value.dataset == f"{dataset}/nofs"


def test_mounts_and_properties(dataset: str) -> None:
    sh("zfs", "create", "-p", f"{dataset}/c1/c 2")
    sh("zfs", "create", "-o", "canmount=off", f"{dataset}/off")
    sh("zfs", "create", "-o", "mountpoint=legacy", f"{dataset}/leg")
    sh("zfs", "create", "-V", "8M", f"{dataset}/vol")  # volumes have no files: not listed
    top = Path(f"/{dataset}")
    sh("zfs", "set", "atime=off", "user:owner=a b", f"{dataset}/c1")
    mounts, props = command.mounts_and_properties(dataset)
    assert mounts == [
        command.MountInfo(dataset, top),
        command.MountInfo(f"{dataset}/c1", top / "c1"),
        command.MountInfo(f"{dataset}/c1/c 2", top / "c1" / "c 2"),
        command.MountInfo(f"{dataset}/leg", None),
        command.MountInfo(f"{dataset}/off", None),
    ]
    assert props[f"{dataset}/off"]["canmount"] == ("off", "local")
    assert props[f"{dataset}/off"]["mounted"] == ("no", "-")
    assert props[f"{dataset}/off"]["mountpoint"] == (f"/{dataset}/off", "default")
    assert props[f"{dataset}/c1/c 2"]["atime"] == ("off", f"inherited from {dataset}/c1")
    assert command.set_here(props[f"{dataset}/c1"]) == {"atime": "off", "user:owner": "a b"}
    assert command.set_here(props[f"{dataset}/c1/c 2"]) == {}
    legacy = Path(f"/mnt/{dataset.replace('/', '_')}-leg")
    legacy.mkdir(parents=True)
    sh("mount", "-t", "zfs", f"{dataset}/leg", str(legacy))
    try:
        assert command.MountInfo(f"{dataset}/leg", legacy) in command.mounts_and_properties(dataset)[0]
    finally:
        sh("umount", str(legacy))


def test_list_snapshots_only_counts_our_own_property(dataset: str) -> None:
    sh("zfs", "create", f"{dataset}/child")
    sh("zfs", "set", f"{command.BACKUP_ID_PROPERTY}=set-on-the-fs", dataset)
    fs = dataset.encode()
    lzc.lzc_snapshot([fs + b"@first"])
    lzc.lzc_snapshot(
        [fs + b"@zfsbackd-backup-1", fs + b"/child@zfsbackd-backup-1"], {b"zfsbackd:backup-id": b"backup-1"}
    )
    lzc.lzc_snapshot([fs + b"@a-later-one"])
    snaps = command.list_snapshots(dataset)
    assert [(s.snapname, s.backup_id) for s in snaps] == [
        ("first", None),
        ("zfsbackd-backup-1", "backup-1"),
        ("a-later-one", None),
    ]
    assert snaps[0].createtxg < snaps[1].createtxg < snaps[2].createtxg
    for snap in snaps:
        assert snap.guid == int(zfs_get("guid", snap.name)[0])
        assert snap.creation == int(zfs_get("creation", snap.name)[0])
    assert [s.name for s in command.list_snapshots(f"{dataset}/child")] == [f"{dataset}/child@zfsbackd-backup-1"]


def test_properties_set_and_received(dataset: str) -> None:
    sh("zfs", "set", "compression=lz4", "recordsize=65536", "user:note=two words", dataset)
    command.set_user_property(dataset, "zfsbackd:test", "tab\there")
    assert command.get_properties(dataset) == {
        "compression": "lz4",
        "recordsize": "65536",
        "user:note": "two words",
        "zfsbackd:test": "tab\there",
    }
    assert command.get_properties(dataset, ["recordsize", "atime"], sources=None) == {
        "recordsize": "65536",
        "atime": "off",  # inherited from the pool's root (created with atime=off)
    }
    lzc.lzc_snapshot([dataset.encode() + b"@s"])
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: feed the stream
        os.close(read_fd)
        lzc.lzc_send(dataset.encode() + b"@s", None, write_fd)
        os._exit(0)
    os.close(write_fd)
    lzc.lzc_receive(dataset.encode() + b"-recv@s", read_fd, props={b"user:from": b"sender"})
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert command.get_properties(dataset + "-recv") == {"user:from": "sender"}
    assert command.get_properties(dataset + "-recv", sources=["received"]) == {"user:from": "sender"}


def test_create_mountpoint_and_mounted(dataset: str, tmp_path: Path) -> None:
    new = f"{dataset}/new"
    command.create(new, {"compression": "lz4", "user:a": "b c"})
    assert command.get_properties(new) == {"compression": "lz4", "user:a": "b c"}
    assert command.is_mounted(new) is True
    assert command.mountpoint(new) == Path(f"/{new}")
    sh("zfs", "unmount", new)
    assert command.is_mounted(new) is False
    assert command.mountpoint(new) == Path(f"/{new}")  # where it would be mounted
    sh("zfs", "set", "mountpoint=legacy", new)
    assert command.mountpoint(new) is None
    target = tmp_path / "legacy mnt"
    target.mkdir()
    sh("mount", "-t", "zfs", new, str(target))
    try:
        assert command.mountpoint(new) == target
        assert command.is_mounted(new) is True
    finally:
        sh("umount", str(target))
    sh("zfs", "set", "mountpoint=none", new)
    assert command.mountpoint(new) is None
    sh("zfs", "create", "-V", "8M", f"{dataset}/vol")
    assert command.mountpoint(f"{dataset}/vol") is None
    assert command.is_mounted(f"{dataset}/vol") is False


def test_missing_things_say_how_to_fix(pool: str, dataset: str) -> None:
    assert command.pool_imported(pool) is True
    assert command.pool_imported("nopool") is False
    with pytest.raises(command.DatasetMissing) as missing:
        command.list_snapshots(f"{dataset}/nope")
    assert not isinstance(missing.value, command.PoolNotImported)
    assert f"zfs create {dataset}/nope" in str(missing.value)
    with pytest.raises(command.PoolNotImported, match="zpool import nopool"):
        command.list_snapshots("nopool/data")
    with pytest.raises(command.PoolNotImported, match="zpool import nopool"):
        command.create("nopool/data")
    with pytest.raises(command.DatasetMissing, match=f"zfs create -p {dataset}/a"):
        command.create(f"{dataset}/a/b")
    with pytest.raises(command.DatasetMissing):
        command.mountpoint(f"{dataset}/nope")
