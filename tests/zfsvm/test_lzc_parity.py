"""The shim and Debian's pyzfs, run through the same sequences on real OpenZFS, must agree exactly.

Each scenario runs once per implementation, each below its own dataset; the
logs of results and exceptions (class name, errno, name, per-item errors)
must be identical once the dataset prefix is replaced by ROOT. Key outcomes
are also asserted outright, so that "both wrong the same way" fails too.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from zfsvm_util import Recorder, openzfs_version, sh, zfs_get

Scenario = Callable[[ModuleType, bytes, Recorder], None]


def run_both(shim: ModuleType, pyzfs: ModuleType, dataset: str, scenario: Scenario) -> Recorder:
    recorders = {}
    for label, module in (("shim", shim), ("pyzfs", pyzfs)):
        root = f"{dataset}/{label}".encode()
        sh("zfs", "create", root.decode())
        recorders[label] = Recorder(root)
        scenario(module, root, recorders[label])
    shim_log, pyzfs_log = recorders["shim"].log, recorders["pyzfs"].log
    for mine, theirs in zip(shim_log, pyzfs_log, strict=True):
        assert mine == theirs, f"shim and pyzfs differ at step {mine[0]!r}"
    return recorders["shim"]


def ok(rec: Recorder, label: str, value: Any = None) -> None:
    kind, result = rec.outcome(label)
    assert kind == "ok", f"{label}: {result}"
    if value is not None:
        assert result == value, f"{label}: {result!r} != {value!r}"


def raised(rec: Recorder, label: str, cls: str, errors: list[str] | None = None) -> tuple[Any, ...]:
    kind, result = rec.outcome(label)
    assert kind == "raise" and result[0] == cls, f"{label}: {kind} {result}"
    if errors is not None:
        assert [e[0] for e in result[3]] == errors, f"{label}: {result}"
    return result


def mountpoint(name: bytes) -> Path:
    """Where a file system is mounted, mounting it first: lzc_create, unlike `zfs create`, does not mount."""
    if zfs_get("mounted", name)[0] != "yes":
        sh("zfs", "mount", name.decode())
    return Path(zfs_get("mountpoint", name)[0])


# ---------------------------------------------------------------------------


def scenario_create_destroy(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    rec("create", lzc.lzc_create, root + b"/fs")
    rec("exists", lzc.lzc_exists, root + b"/fs")
    rec("create-exists", lzc.lzc_create, root + b"/fs")
    rec("create-props", lzc.lzc_create, root + b"/p", props={b"atime": 0, b"user:note": b"hello"})
    rec("props-applied", lambda: (zfs_get("atime", root + b"/p"), zfs_get("user:note", root + b"/p")))
    rec("create-no-parent", lzc.lzc_create, root + b"/missing/child")
    rec("create-bad-name", lzc.lzc_create, root + b"/bad!name")
    rec("create-too-long", lzc.lzc_create, root + b"/" + b"x" * 260)
    rec("create-bad-prop", lzc.lzc_create, root + b"/q", props={b"nosuchprop": 1})
    rec("create-bad-type", lzc.lzc_create, root + b"/q", ds_type="dir")
    rec("create-zvol", lzc.lzc_create, root + b"/vol", ds_type="zvol", props={b"volsize": 16 << 20})
    rec("create-under-zvol", lzc.lzc_create, root + b"/vol/child")
    rec("exists-missing", lzc.lzc_exists, root + b"/nope")
    rec("snap-for-destroy", lzc.lzc_snapshot, [root + b"/fs@s"])
    rec("destroy-with-snapshot", lzc.lzc_destroy, root + b"/fs")
    rec("destroy-snapshot", lzc.lzc_destroy, root + b"/fs@s")
    rec("destroy", lzc.lzc_destroy, root + b"/fs")
    rec("destroy-missing", lzc.lzc_destroy, root + b"/fs")
    rec("destroy-bad-name", lzc.lzc_destroy, root + b"/bad!name")
    rec("exists-destroyed", lzc.lzc_exists, root + b"/fs")
    for fn in (lzc.lzc_create, lzc.lzc_snapshot, lzc.lzc_hold, lzc.lzc_send, lzc.lzc_receive, lzc.lzc_bookmark):
        rec(f"is_supported-{fn.__name__}", lzc.is_supported, fn)


def test_create_and_destroy(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_create_destroy)
    ok(rec, "create")
    ok(rec, "exists", True)
    raised(rec, "create-exists", "FilesystemExists")
    ok(rec, "props-applied", (("off", "local"), ("hello", "local")))
    raised(rec, "create-no-parent", "ParentNotFound")
    raised(rec, "create-bad-name", "FilesystemNameInvalid")
    raised(rec, "create-bad-type", "DatasetTypeInvalid")
    ok(rec, "create-zvol")
    ok(rec, "destroy")
    raised(rec, "destroy-missing", "FilesystemNotFound")
    ok(rec, "exists-destroyed", False)
    ok(rec, "is_supported-lzc_snapshot", True)


def scenario_snapshots(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs, fs2, fs3 = root + b"/fs", root + b"/fs2", root + b"/fs3"
    for name in (fs, fs2, fs3):
        lzc.lzc_create(name)
    rec("snap", lzc.lzc_snapshot, [fs + b"@a"])
    rec("snap-props", lzc.lzc_snapshot, [fs + b"@b"], {b"zfsbackd:backup-id": b"backup-1"})
    rec("snap-prop-value", zfs_get, "zfsbackd:backup-id", fs + b"@b")
    rec("snap-exists", lzc.lzc_snapshot, [fs + b"@a"])
    rec("snap-multi", lzc.lzc_snapshot, [fs2 + b"@m", fs3 + b"@m"])
    rec("snap-multi-exist", lambda: [lzc.lzc_exists(fs2 + b"@m"), lzc.lzc_exists(fs3 + b"@m")])
    rec("snap-multi-one-fails", lzc.lzc_snapshot, [fs2 + b"@n", fs + b"@a", fs3 + b"@n"])
    rec("snap-multi-atomic", lambda: [lzc.lzc_exists(fs2 + b"@n"), lzc.lzc_exists(fs3 + b"@n")])
    rec("snap-same-fs-twice", lzc.lzc_snapshot, [fs + b"@x", fs + b"@y"])
    rec("snap-missing-fs", lzc.lzc_snapshot, [root + b"/nofs@s"])
    rec("snap-bad-name", lzc.lzc_snapshot, [fs + b"@bad!"])
    rec("snap-too-long", lzc.lzc_snapshot, [fs + b"@" + b"x" * 250])
    rec("snap-not-user-prop", lzc.lzc_snapshot, [fs + b"@c"], {b"compression": b"lz4"})
    rec("snap-other-pool", lzc.lzc_snapshot, [fs + b"@z", b"nopool/x@z"])
    rec("snap-empty", lzc.lzc_snapshot, [])
    rec("exists-snap", lzc.lzc_exists, fs + b"@a")
    rec("exists-snap-missing", lzc.lzc_exists, fs + b"@nope")
    rec("destroy-snaps", lzc.lzc_destroy_snaps, [fs2 + b"@m", fs3 + b"@m", fs + b"@nope"], False)
    rec("destroy-snaps-gone", lambda: [lzc.lzc_exists(fs2 + b"@m"), lzc.lzc_exists(fs3 + b"@m")])
    rec("destroy-snaps-no-pool", lzc.lzc_destroy_snaps, [b"nopool/x@s"], False)
    rec("rollback", lzc.lzc_rollback, fs)
    rec("rollback-no-snapshots", lzc.lzc_rollback, fs2)
    rec("rollback-missing", lzc.lzc_rollback, root + b"/nofs")


def test_snapshots(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_snapshots)
    ok(rec, "snap")
    ok(rec, "snap-prop-value", ("backup-1", "local"))
    raised(rec, "snap-exists", "SnapshotFailure", ["SnapshotExists"])
    ok(rec, "snap-multi-exist", [True, True])
    result = raised(rec, "snap-multi-one-fails", "SnapshotFailure", ["SnapshotExists"])
    assert result[3][0][2] == b"ROOT/fs@a"  # the per-snapshot error names the one that failed
    ok(rec, "snap-multi-atomic", [False, False])  # one failure creates none
    raised(rec, "snap-same-fs-twice", "SnapshotFailure", ["DuplicateSnapshots"])
    raised(rec, "snap-missing-fs", "SnapshotFailure")
    ok(rec, "destroy-snaps-gone", [False, False])
    ok(rec, "rollback", b"ROOT/fs@b")
    raised(rec, "rollback-no-snapshots", "SnapshotNotFound")


def scenario_holds(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs = root + b"/fs"
    lzc.lzc_create(fs)
    snap, snap2 = fs + b"@h", fs + b"@h2"
    lzc.lzc_snapshot([snap, snap2][:1])
    lzc.lzc_snapshot([snap2])
    rec("get-holds-none", lzc.lzc_get_holds, snap)
    rec("hold", lzc.lzc_hold, {snap: b"zfsbackd"})
    rec("holds", lambda: sorted(lzc.lzc_get_holds(snap)))
    rec("hold-times", lambda: [isinstance(t, int) and t > 1_000_000_000 for t in lzc.lzc_get_holds(snap).values()])
    rec("hold-again", lzc.lzc_hold, {snap: b"zfsbackd"})
    rec("hold-second-tag", lzc.lzc_hold, {snap: b"other"})
    rec("hold-missing-snap", lzc.lzc_hold, {fs + b"@nope": b"t"})
    rec("hold-tag-too-long", lzc.lzc_hold, {snap2: b"t" * 300})
    rec("hold-bad-snap-name", lzc.lzc_hold, {fs + b"@bad!": b"t"})
    rec("get-holds-missing", lzc.lzc_get_holds, fs + b"@nope")
    rec("get-holds-not-snapshot", lzc.lzc_get_holds, fs)
    rec("destroy-held", lzc.lzc_destroy_snaps, [snap], False)
    rec("exists-after-refused-destroy", lzc.lzc_exists, snap)
    rec("destroy-held-defer", lzc.lzc_destroy_snaps, [snap], True)
    rec("exists-after-defer", lzc.lzc_exists, snap)
    rec("release-missing-tag", lzc.lzc_release, {snap: [b"never"]})
    rec("release-missing-snap", lzc.lzc_release, {fs + b"@nope": [b"x"]})
    rec("release-not-list", lzc.lzc_release, {snap: b"x"})
    rec("release-one", lzc.lzc_release, {snap: [b"other"]})
    rec("exists-while-held", lzc.lzc_exists, snap)
    rec("release-last", lzc.lzc_release, {snap: [b"zfsbackd"]})
    rec("exists-after-last-release", lzc.lzc_exists, snap)
    fd = os.open("/dev/zfs", os.O_EXCL)
    rec("hold-cleanup-fd", lzc.lzc_hold, {snap2: b"fdhold"}, fd)
    rec("holds-with-fd", lambda: sorted(lzc.lzc_get_holds(snap2)))
    os.close(fd)
    rec("holds-after-close", lambda: sorted(lzc.lzc_get_holds(snap2)))
    with open(os.devnull, "rb") as devnull:
        rec("hold-bad-fd", lzc.lzc_hold, {snap2: b"t"}, devnull.fileno())
    rec("hold-several-pools", lzc.lzc_hold, {snap2: b"t", b"nopool/x@s": b"t"})


def test_holds(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_holds)
    ok(rec, "get-holds-none", {})
    ok(rec, "hold", [])
    ok(rec, "holds", [b"zfsbackd"])
    ok(rec, "hold-times", [True])
    raised(rec, "hold-again", "HoldFailure", ["HoldExists"])
    ok(rec, "hold-missing-snap", [b"ROOT/fs@nope"])
    raised(rec, "get-holds-missing", "SnapshotNotFound")
    raised(rec, "destroy-held", "SnapshotDestructionFailure", ["SnapshotIsHeld"])
    ok(rec, "exists-after-refused-destroy", True)
    ok(rec, "destroy-held-defer")
    ok(rec, "exists-after-defer", True)
    ok(rec, "release-missing-tag", [b"ROOT/fs@h#never"])
    ok(rec, "release-missing-snap", [b"ROOT/fs@nope"])
    raised(rec, "release-not-list", "TypeError")
    ok(rec, "exists-while-held", True)
    ok(rec, "release-last", [])
    ok(rec, "exists-after-last-release", False)  # the deferred destroy happened
    ok(rec, "holds-with-fd", [b"fdhold"])
    ok(rec, "holds-after-close", [])
    raised(rec, "hold-bad-fd", "BadHoldCleanupFD")


def scenario_bookmarks(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs = root + b"/fs"
    lzc.lzc_create(fs)
    lzc.lzc_snapshot([fs + b"@a"])
    guid = int(zfs_get("guid", fs + b"@a")[0])
    rec("bookmark", lzc.lzc_bookmark, {fs + b"#b1": fs + b"@a"})
    rec("bookmark-exists", lzc.lzc_bookmark, {fs + b"#b1": fs + b"@a"})
    rec("bookmark-missing-snap", lzc.lzc_bookmark, {fs + b"#b2": fs + b"@nope"})
    rec("bookmark-bad-name", lzc.lzc_bookmark, {fs + b"#bad!": fs + b"@a"})
    rec("bookmark-bad-source", lzc.lzc_bookmark, {fs + b"#b4": fs})
    rec("bookmark-from-bookmark", lzc.lzc_bookmark, {fs + b"#b3": fs + b"#b1"})
    # Values differ between the two runs (guid, txg, time): record the shape, check the guid separately.
    bookmarks = lzc.lzc_get_bookmarks(fs, [b"guid", b"createtxg", b"creation", b"bogus"])
    rec(
        "get-bookmarks-shape",
        lambda: {name: sorted(props) for name, props in bookmarks.items()},
    )
    rec("bookmark-guid", lambda: {name: props[b"guid"] == {b"value": guid} for name, props in bookmarks.items()})
    rec("get-bookmarks-no-props", lambda: sorted(lzc.lzc_get_bookmarks(fs)))
    rec("get-bookmarks-missing-fs", lzc.lzc_get_bookmarks, root + b"/nofs")
    rec("destroy-bookmarks", lzc.lzc_destroy_bookmarks, [fs + b"#b1", fs + b"#b3", fs + b"#never"])
    rec("bookmarks-after", lambda: sorted(lzc.lzc_get_bookmarks(fs)))
    rec("destroy-bookmarks-bad-name", lzc.lzc_destroy_bookmarks, [fs + b"#bad!"])
    rec("destroy-bookmarks-not-bookmark", lzc.lzc_destroy_bookmarks, [fs + b"@a"])


def test_bookmarks(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_bookmarks)
    ok(rec, "bookmark")
    raised(rec, "bookmark-exists", "BookmarkFailure", ["BookmarkExists"])
    raised(rec, "bookmark-missing-snap", "BookmarkFailure", ["SnapshotNotFound"])
    ok(
        rec,
        "get-bookmarks-shape",
        {b"b1": [b"createtxg", b"creation", b"guid"], b"b3": [b"createtxg", b"creation", b"guid"]},
    )
    ok(rec, "bookmark-guid", {b"b1": True, b"b3": True})
    raised(rec, "get-bookmarks-missing-fs", "FilesystemNotFound")
    ok(rec, "destroy-bookmarks")
    ok(rec, "bookmarks-after", [])


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.sync()


def _send_to_bytes(lzc: ModuleType, snap: bytes, fromsnap: bytes | None, flags: list[str] | None = None) -> bytes:
    """lzc_send into a pipe drained by a thread (the GIL must be released during the call)."""
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(read_fd, 1 << 16):
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        lzc.lzc_send(snap, fromsnap, write_fd, flags)
    finally:
        os.close(write_fd)
        reader.join()
        os.close(read_fd)
    return b"".join(chunks)


def _receive_bytes(lzc: ModuleType, snap: bytes, stream: bytes, **kwargs: Any) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(stream)
        f.seek(0)
        lzc.lzc_receive(snap, f.fileno(), **kwargs)


def scenario_send_receive(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs, copy = root + b"/fs", root + b"/copy"
    lzc.lzc_create(fs)
    _write(mountpoint(fs) / "file", b"one\n" * 1000)
    lzc.lzc_snapshot([fs + b"@s1"])
    lzc.lzc_bookmark({fs + b"#b1": fs + b"@s1"})
    _write(mountpoint(fs) / "file", b"two\n" * 2000)
    lzc.lzc_snapshot([fs + b"@s2"])
    _write(mountpoint(fs) / "other", b"three\n")
    lzc.lzc_snapshot([fs + b"@s3"])
    rec("send-space-full", lambda: lzc.lzc_send_space(fs + b"@s1") > 0)
    rec("send-space-incr", lambda: lzc.lzc_send_space(fs + b"@s2", fs + b"@s1") > 0)
    rec("send-space-flags", lambda: lzc.lzc_send_space(fs + b"@s1", flags=["compress"]) > 0)
    rec("send-space-missing", lzc.lzc_send_space, fs + b"@nope")
    rec("send-space-from-bookmark", lzc.lzc_send_space, fs + b"@s2", fs + b"#b1")
    # Streams carry guids, so they differ between the two runs: record that they were produced.
    full = _send_to_bytes(lzc, fs + b"@s1", None)
    incr = _send_to_bytes(lzc, fs + b"@s2", fs + b"@s1")
    rec("streams", lambda: (len(full) > 0, len(incr) > 0))
    rec("send-incr-from-bookmark", lambda: len(_send_to_bytes(lzc, fs + b"@s2", fs + b"#b1")) > 0)
    rec(
        "send-flags",
        lambda: len(_send_to_bytes(lzc, fs + b"@s1", None, ["compress", "embedded_data", "large_blocks"])) > 0,
    )
    with tempfile.TemporaryFile() as f:
        rec("send-to-file", lzc.lzc_send, fs + b"@s1", None, f.fileno())
        rec("send-to-file-size", lambda: os.fstat(f.fileno()).st_size == len(full))
        rec("send-bad-flag", lzc.lzc_send, fs + b"@s1", None, f.fileno(), ["bogus"])
        rec("send-missing", lzc.lzc_send, fs + b"@nope", None, f.fileno())
        rec("send-not-ancestor", lzc.lzc_send, fs + b"@s1", fs + b"@s2", f.fileno())
        rec("send-from-missing", lzc.lzc_send, fs + b"@s2", fs + b"@nope", f.fileno())
    with open(os.devnull, "wb") as devnull:
        rec("send-to-dev-null", lzc.lzc_send, fs + b"@s1", None, devnull.fileno())
    with open(os.devnull, "rb") as devnull:
        rec("send-to-readonly-fd", lzc.lzc_send, fs + b"@s1", None, devnull.fileno())
    rec("recv-full", _receive_bytes, lzc, copy + b"@s1", full)
    rec("recv-full-content", lambda: (mountpoint(copy) / "file").read_bytes() == b"one\n" * 1000)
    rec("recv-full-again", _receive_bytes, lzc, copy + b"@s1", full)
    rec("recv-incr", _receive_bytes, lzc, copy + b"@s2", incr, props={b"user:recv": b"yes"})
    rec("recv-incr-content", lambda: (mountpoint(copy) / "file").read_bytes() == b"two\n" * 2000)
    rec("recv-props", zfs_get, "user:recv", copy)
    rec("recv-garbage", _receive_bytes, lzc, root + b"/junk@s", b"\0garbage" * 4096)
    rec("recv-empty", _receive_bytes, lzc, root + b"/junk@s", b"")
    rec("recv-no-parent", _receive_bytes, lzc, root + b"/no/parent@s1", full)
    incr3 = _send_to_bytes(lzc, fs + b"@s3", fs + b"@s2")
    _write(mountpoint(copy) / "local-change", b"x")
    rec("recv-modified-dest", _receive_bytes, lzc, copy + b"@s3", incr3)
    rec("recv-modified-dest-force", _receive_bytes, lzc, copy + b"@s3", incr3, force=True)
    rec("recv-forced-content", lambda: sorted(p.name for p in mountpoint(copy).iterdir()))
    rec("recv-mismatch", _receive_bytes, lzc, copy + b"@s4", incr)


def test_send_and_receive(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_send_receive)
    for label in ("send-space-full", "send-space-incr", "send-space-flags", "send-incr-from-bookmark", "send-flags"):
        ok(rec, label, True)
    raised(rec, "send-space-missing", "SnapshotNotFound")
    raised(rec, "send-bad-flag", "UnknownStreamFeature")
    raised(rec, "send-missing", "SnapshotNotFound")
    ok(rec, "streams", (True, True))
    ok(rec, "send-to-file")
    ok(rec, "send-to-file-size", True)
    if openzfs_version() < (2, 2):
        # 2.1's kernel refuses to write a stream to a character device (EINVAL); 2.3's writes it.
        assert raised(rec, "send-to-dev-null", "StreamIOError")[1] == errno.EINVAL
    else:
        ok(rec, "send-to-dev-null")
    ok(rec, "recv-full-content", True)
    ok(rec, "recv-incr-content", True)
    ok(rec, "recv-props", ("yes", "received"))
    raised(rec, "recv-modified-dest", "DestinationModified")
    ok(rec, "recv-forced-content", ["file", "other"])


def test_streams_cross_between_implementations(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    fs = f"{dataset}/src".encode()
    shim.lzc_create(fs)
    _write(mountpoint(fs) / "data", os.urandom(100_000))
    shim.lzc_snapshot([fs + b"@a"])
    for sender, receiver, target in ((shim, pyzfs, b"/by-pyzfs"), (pyzfs, shim, b"/by-shim")):
        stream = _send_to_bytes(sender, fs + b"@a", None)
        _receive_bytes(receiver, dataset.encode() + target + b"@a", stream)
        assert (mountpoint(dataset.encode() + target) / "data").read_bytes() == (mountpoint(fs) / "data").read_bytes()
        assert zfs_get("guid", dataset.encode() + target + b"@a")[0] == zfs_get("guid", fs + b"@a")[0]


# ---------------------------------------------------------------------------
# Shim-only properties on the real library


def test_nvlist_round_trip_through_real_libnvpair(shim: ModuleType) -> None:
    codec = shim._lib()._nv
    value = {
        b"flag": None,
        b"yes": True,
        b"no": False,
        b"n": 2**64 - 1,
        b"s": b"\xff\xfe not utf-8",
        b"nested": {b"deeper": {b"x": 1, b"list": [b"a"]}},
        b"strings": [b"a", b"", b"c"],
        b"lists": [{b"a": 1}, {b"b": b"c"}],
        b"bools": [True, False],
        b"ints": [0, 1, 2**64 - 1],
    }
    with codec.nvlist_in(value) as nvl:
        assert codec.to_dict(nvl) == value
    with pytest.raises(OverflowError), codec.nvlist_in({b"neg": -1}):
        pass
    with pytest.raises(TypeError), codec.nvlist_in({b"mixed": [1, b"a"]}):
        pass


def test_lazy_init_is_thread_safe(shim: ModuleType, monkeypatch: pytest.MonkeyPatch, dataset: str) -> None:
    monkeypatch.setattr(shim, "_backend", None)
    loads = []
    real_load = shim._load

    def counting_load() -> Any:
        loads.append(1)
        return real_load()

    monkeypatch.setattr(shim, "_load", counting_load)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker() -> None:
        barrier.wait()
        results.append(shim.lzc_exists(dataset.encode()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert len(loads) == 1


def test_library_found_by_soname(shim: ModuleType) -> None:
    """Record which shared objects the shim opened (the sonames differ across OpenZFS releases)."""
    maps = Path("/proc/self/maps").read_text()
    assert "libzfs_core.so" in maps and "libnvpair.so" in maps


def scenario_channel_programs(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    pool = root.split(b"/")[0]
    lzc.lzc_create(root + b"/fs")
    rec("number", lzc.lzc_channel_program, pool, b"return 1 + 41")
    rec("table", lzc.lzc_channel_program, pool, b'return {a = 1, b = "x", c = {true}}')
    rec("nothing", lzc.lzc_channel_program, pool, b"local x = 1")
    rec("argv", lzc.lzc_channel_program, pool, b'return (...)["argv"]', params={b"k": b"v", b"t": True})
    rec("argv-uint64", lzc.lzc_channel_program, pool, b'return (...)["argv"]', params={b"n": 7})
    rec("argv-list", lzc.lzc_channel_program, pool, b'return (...)["argv"]', params=[b"a", b"b"])
    snap = root + b"/fs@by-program"
    rec("sync-snapshot", lzc.lzc_channel_program, pool, b'return zfs.sync.snapshot((...)["argv"][1])', params=[snap])
    rec("snapshot-made", lzc.lzc_exists, snap)
    bookmark = root + b"/fs#by-program"
    rec("sync-bookmark", lzc.lzc_channel_program, pool, b"local a = (...)['argv'] return zfs.sync.bookmark(a[1], a[2])",
        params=[snap, bookmark])
    rec("bookmark-made", lzc.lzc_get_bookmarks, root + b"/fs")
    rec("sync-destroy-busy", lzc.lzc_channel_program, pool, b'return zfs.sync.destroy((...)["argv"][1])',
        params=[root + b"/fs"])
    rec("nosync-read", lzc.lzc_channel_program_nosync, pool,
        b'local value = zfs.get_prop((...)["argv"][1], "type") return value', params=[root + b"/fs"])
    rec("nosync-refuses-sync", lzc.lzc_channel_program_nosync, pool, b'return zfs.sync.destroy((...)["argv"][1])',
        params=[snap])
    rec("snapshot-still-there", lzc.lzc_exists, snap)
    rec("syntax-error", lzc.lzc_channel_program, pool, b"return (")
    rec("runtime-error", lzc.lzc_channel_program, pool, b'error("boom")')
    rec("no-such-pool", lzc.lzc_channel_program, b"nosuchpool" + pool[-4:], b"return 1")
    rec("limit-invalid", lzc.lzc_channel_program, pool, b"return 1", instrlimit=0)
    rec("timeout", lzc.lzc_channel_program, pool, b"while true do end", instrlimit=1000)
    rec("memory", lzc.lzc_channel_program, pool, b'local t = {} for i = 1, 1e7 do t[i] = "x" .. i end',
        memlimit=1024 * 1024)
    rec("memory-too-small-to-start", lzc.lzc_channel_program, pool, b"return 1", memlimit=1024)
    rec("is_supported", lzc.is_supported, lzc.lzc_channel_program)
    rec("defaults", lambda: (lzc.ZCP_DEFAULT_INSTRLIMIT, lzc.ZCP_DEFAULT_MEMLIMIT))


def test_channel_programs(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_channel_programs)
    for step in rec.log:
        print(step)
    ok(rec, "number", 42)
    ok(rec, "snapshot-made", True)
    ok(rec, "snapshot-still-there", True)
    raised(rec, "syntax-error", "ZCPSyntaxError")
    raised(rec, "runtime-error", "ZCPRuntimeError")
    raised(rec, "nosync-refuses-sync", "ZCPRuntimeError")
    raised(rec, "no-such-pool", "PoolNotFound")
    raised(rec, "limit-invalid", "ZCPLimitInvalid")
    raised(rec, "timeout", "ZCPTimeout")
    ok(rec, "argv", {b"k": b"v", b"t": True})
    ok(rec, "argv-list", {b"1": b"a", b"2": b"b"})
    ok(rec, "sync-destroy-busy", errno.EBUSY)  # zfs.sync.* answer an errno, they do not raise
    ok(rec, "nosync-read", b"filesystem")
    # Lua running out of memory comes back as EINVAL with a message (pyzfs: ZCPSyntaxError); a limit too
    # small to start the interpreter is ENOSPC
    raised(rec, "memory", "ZCPSyntaxError")
    raised(rec, "memory-too-small-to-start", "ZCPSpaceError")
    ok(rec, "is_supported", True)
