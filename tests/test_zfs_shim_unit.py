"""Host unit tests of zfsbackd.zfs: no ZFS needed (fakes of libzfs_core and of the zfs command).

What runs only against real OpenZFS (nvlists through libzfs_core, parity with
Debian's pyzfs, real `zfs diff`) lives in tests/zfsvm and runs in the VM.
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import stat
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from zfsbackd.errors import SnapshotError
from zfsbackd.zfs import command, exceptions
from zfsbackd.zfs import libzfs_core as lzc

# ---------------------------------------------------------------------------
# Import and initialisation without ZFS


@pytest.fixture
def no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget any loaded library so the next call loads again."""
    monkeypatch.setattr(lzc, "_backend", None)


def test_calls_without_libzfs_core_raise_initialization_failed(
    monkeypatch: pytest.MonkeyPatch, no_backend: None
) -> None:
    monkeypatch.setattr(lzc, "_LZC_SONAMES", ("libzfs_core.so.99", "libzfs_core.so.98"))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(exceptions.ZFSInitializationFailed) as info:
        lzc.lzc_exists(b"tank/home")
    err = info.value
    assert err.errno == errno.ENOENT
    assert "libzfs_core is not installed (tried: libzfs_core.so.99, libzfs_core.so.98)" in str(err)
    assert "install zfsutils-linux" in str(err)
    # A failure is not cached: the next call tries again.
    assert lzc._backend is None
    with pytest.raises(exceptions.ZFSInitializationFailed):
        lzc.is_supported(lzc.lzc_snapshot)


def test_header_is_found_and_parses() -> None:
    import cffi

    path = lzc.header_path()
    assert path.name == "libzfs_core.h"
    ffi = cffi.FFI()
    ffi.cdef(path.read_text())
    assert ffi.typeof("nvlist_t *").cname == "nvlist_t *"
    lib = ffi.dlopen(None)  # only the constants of the cdef are needed here
    assert (lib.LZC_SEND_FLAG_RAW, lib.LZC_DATSET_TYPE_ZFS, lib.DATA_TYPE_NVLIST) == (8, 2, 19)


def test_failed_libzfs_core_init_names_the_cause(monkeypatch: pytest.MonkeyPatch, no_backend: None) -> None:
    class Lib:
        def libzfs_core_init(self) -> int:
            return errno.ENOENT

    monkeypatch.setattr(lzc, "_dlopen", lambda ffi, names: Lib())
    with pytest.raises(exceptions.ZFSInitializationFailed) as info:
        lzc.lzc_exists(b"tank")
    assert info.value.errno == errno.ENOENT
    assert "modprobe zfs" in str(info.value)


def test_names_must_be_bytes_without_nul(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lzc, "_backend", FakeBackend())
    with pytest.raises(TypeError):
        lzc.lzc_exists("tank/home")  # type: ignore[arg-type]
    with pytest.raises(exceptions.NameInvalid):
        lzc.lzc_destroy(b"tank/home\0/other")


# ---------------------------------------------------------------------------
# Exception classes: names, hierarchy and errno as in pyzfs 2.1-2.3

# (class, direct base, errno) as defined in contrib/pyzfs/libzfs_core/exceptions.py
PYZFS_CLASSES = [
    ("ZFSGenericError", "ZFSError", None),
    ("ZFSInitializationFailed", "ZFSError", None),
    ("MultipleOperationsFailure", "ZFSError", None),
    ("DatasetNotFound", "ZFSError", errno.ENOENT),
    ("DatasetExists", "ZFSError", errno.EEXIST),
    ("FilesystemExists", "DatasetExists", errno.EEXIST),
    ("FilesystemNotFound", "DatasetNotFound", errno.ENOENT),
    ("ParentNotFound", "ZFSError", errno.ENOENT),
    ("WrongParent", "ZFSError", 1033),
    ("SnapshotExists", "DatasetExists", errno.EEXIST),
    ("SnapshotNotFound", "DatasetNotFound", errno.ENOENT),
    ("SnapshotIsCloned", "ZFSError", errno.EEXIST),
    ("SnapshotIsHeld", "ZFSError", errno.EBUSY),
    ("DuplicateSnapshots", "ZFSError", errno.EXDEV),
    ("SnapshotFailure", "MultipleOperationsFailure", None),
    ("SnapshotDestructionFailure", "MultipleOperationsFailure", None),
    ("BookmarkExists", "ZFSError", errno.EEXIST),
    ("BookmarkNotFound", "ZFSError", errno.ENOENT),
    ("BookmarkMismatch", "ZFSError", errno.EINVAL),
    ("BookmarkSourceInvalid", "ZFSError", errno.EINVAL),
    ("BookmarkNotSupported", "ZFSError", errno.ENOTSUP),
    ("BookmarkFailure", "MultipleOperationsFailure", None),
    ("BookmarkDestructionFailure", "MultipleOperationsFailure", None),
    ("BadHoldCleanupFD", "ZFSError", errno.EBADF),
    ("HoldExists", "ZFSError", errno.EEXIST),
    ("HoldNotFound", "ZFSError", errno.ENOENT),
    ("HoldFailure", "MultipleOperationsFailure", None),
    ("HoldReleaseFailure", "MultipleOperationsFailure", None),
    ("SnapshotMismatch", "ZFSError", errno.ENODEV),
    ("StreamMismatch", "ZFSError", errno.ENODEV),
    ("DestinationModified", "ZFSError", errno.ETXTBSY),
    ("BadStream", "ZFSError", errno.EBADE),
    ("EncryptionKeyNotLoaded", "ZFSError", errno.EACCES),
    ("StreamFeatureNotSupported", "ZFSError", errno.ENOTSUP),
    ("UnknownStreamFeature", "ZFSError", errno.ENOTSUP),
    ("StreamTruncated", "ZFSError", 1040),
    ("StreamIOError", "ZFSError", None),
    ("ZIOError", "ZFSError", errno.EIO),
    ("NoSpace", "ZFSError", errno.ENOSPC),
    ("QuotaExceeded", "ZFSError", errno.EDQUOT),
    ("DatasetBusy", "ZFSError", errno.EBUSY),
    ("NameTooLong", "ZFSError", errno.ENAMETOOLONG),
    ("NameInvalid", "ZFSError", errno.EINVAL),
    ("SnapshotNameInvalid", "NameInvalid", errno.EINVAL),
    ("FilesystemNameInvalid", "NameInvalid", errno.EINVAL),
    ("BookmarkNameInvalid", "NameInvalid", errno.EINVAL),
    ("ReadOnlyPool", "ZFSError", errno.EROFS),
    ("SuspendedPool", "ZFSError", errno.EAGAIN),
    ("PoolNotFound", "ZFSError", errno.EXDEV),
    ("PoolsDiffer", "ZFSError", errno.EXDEV),
    ("FeatureNotSupported", "ZFSError", errno.ENOTSUP),
    ("PropertyNotSupported", "ZFSError", errno.ENOTSUP),
    ("PropertyInvalid", "ZFSError", errno.EINVAL),
    ("DatasetTypeInvalid", "ZFSError", errno.EINVAL),
    ("NotClone", "ZFSError", errno.EINVAL),
    ("SnapshotNotLatest", "ZFSError", errno.EEXIST),
    ("StreamFeatureInvalid", "ZFSError", errno.EINVAL),
    ("StreamFeatureIncompatible", "ZFSError", errno.EINVAL),
    ("ReceivePropertyFailure", "MultipleOperationsFailure", None),
    ("UnknownCryptCommand", "ZFSError", errno.EINVAL),
    ("EncryptionKeyAlreadyLoaded", "ZFSError", errno.EEXIST),
    ("EncryptionKeyInvalid", "ZFSError", errno.EACCES),
    ("ZCPError", "ZFSError", None),
    ("CheckpointExists", "ZFSError", 1024),
    ("CheckpointNotFound", "ZFSError", 1026),
    ("CheckpointDiscarding", "ZFSError", 1025),
    ("DeviceRemovalRunning", "ZFSError", 1027),
    ("DeviceTooBig", "ZFSError", 1028),
    ("RaidzExpansionRunning", "ZFSError", 1049),
]


@pytest.mark.parametrize(("name", "base", "errno_value"), PYZFS_CLASSES)
def test_exception_classes_match_pyzfs(name: str, base: str, errno_value: int | None) -> None:
    cls = getattr(exceptions, name)
    assert issubclass(cls, getattr(exceptions, base))
    assert issubclass(cls, exceptions.ZFSError)
    assert cls.errno == errno_value
    # Where pyzfs has an intermediate private base we may too, but never another public one.
    public_bases = [b.__name__ for b in cls.__mro__[1:] if not b.__name__.startswith("_") and b is not Exception]
    expected = []
    current: Any = getattr(exceptions, base)
    while current is not Exception:
        expected.append(current.__name__)
        current = current.__mro__[1] if not current.__mro__[1].__name__.startswith("_") else current.__mro__[2]
    assert public_bases[: len(expected)] == expected


def test_exception_rendering_matches_pyzfs() -> None:
    err = exceptions.SnapshotExists(b"tank/home@a")
    assert (err.errno, err.message, err.name) == (errno.EEXIST, "Snapshot already exists", b"tank/home@a")
    assert str(err) == "[Errno 17] Snapshot already exists: 'b'tank/home@a''"
    assert repr(err) == "SnapshotExists(17, 'Snapshot already exists')"
    failure = exceptions.SnapshotFailure([err], 2)
    assert failure.errno == errno.EEXIST and failure.errors == [err] and failure.suppressed_count == 2
    assert (
        str(failure)
        == "[Errno 17] Creation of snapshot(s) failed for one or more reasons, 1 errors included, 2 suppressed"
    )
    generic = exceptions.ZFSGenericError(errno.EPERM, b"tank/x", "Failed to create snapshot")
    assert (generic.name, generic.message) == (b"tank/x", "Failed to create snapshot")
    assert str(exceptions.BadStream()) == "[Errno 52] Bad backup stream"


# ---------------------------------------------------------------------------
# Error translation with a fake library


class FakeBackend:
    """Stands in for the loaded libzfs_core: records calls, returns canned (ret, outputs)."""

    def __init__(self, **results: Any) -> None:
        self.results = results
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            return self.results.get(name, _DEFAULTS.get(name, 0))

        return call


_DEFAULTS: dict[str, Any] = {
    "snapshot": (0, {}),
    "destroy_snaps": (0, {}),
    "hold": (0, {}),
    "release": (0, {}),
    "get_holds": (0, {}),
    "bookmark": (0, {}),
    "get_bookmarks": (0, {}),
    "destroy_bookmarks": (0, {}),
    "send_space": (0, 0),
    "snaprange_space": (0, 0),
    "receive_one": (0, 0, {}),
    "rollback": (0, b""),
    "exists": True,
    "has_function": True,
}


def _c_calls(fake: FakeBackend) -> list[tuple[str, tuple[Any, ...]]]:
    """The recorded calls without is_supported's symbol lookups."""
    return [call for call in fake.calls if call[0] != "has_function"]


def _errors(err: exceptions.MultipleOperationsFailure) -> list[tuple[str, bytes | None]]:
    return [(type(e).__name__, e.name) for e in err.errors]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend()
    monkeypatch.setattr(lzc, "_backend", backend)
    return backend


# (call, backend result, expected exception class, expected per-item errors or name)
COMPOUND_CASES = [
    (
        lambda: lzc.lzc_snapshot([b"p/a@s", b"p/b@s"]),
        ("snapshot", (errno.EEXIST, {b"p/b@s": errno.EEXIST})),
        "SnapshotFailure",
        [("SnapshotExists", b"p/b@s")],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s", b"p/a@t"]),
        ("snapshot", (errno.EXDEV, {})),
        "SnapshotFailure",
        [("DuplicateSnapshots", None)],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s", b"q/a@t"]),
        ("snapshot", (errno.EXDEV, {})),
        "SnapshotFailure",
        [("PoolsDiffer", None)],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s"]),
        ("snapshot", (errno.ENOENT, {})),
        "SnapshotFailure",
        [("FilesystemNotFound", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s!"]),
        ("snapshot", (errno.EINVAL, {})),
        "SnapshotFailure",
        [("NameInvalid", b"p/a@s!")],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s"], {b"user:x": b"1"}),
        ("snapshot", (errno.EINVAL, {})),
        "SnapshotFailure",
        [("PropertyInvalid", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s", b"p/b@s"]),
        ("snapshot", (errno.EEXIST, {b"p/a@s": errno.EEXIST, b"N_MORE_ERRORS": 3})),
        "SnapshotFailure",
        [("SnapshotExists", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_snapshot([b"p/a@s"]),
        ("snapshot", (errno.EPERM, {})),
        "SnapshotFailure",
        [("ZFSGenericError", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_destroy_snaps([b"p/a@s"], False),
        ("destroy_snaps", (errno.EBUSY, {b"p/a@s": errno.EBUSY})),
        "SnapshotDestructionFailure",
        [("SnapshotIsHeld", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_destroy_snaps([b"p/a@s"], False),
        ("destroy_snaps", (errno.EEXIST, {b"p/a@s": errno.EEXIST})),
        "SnapshotDestructionFailure",
        [("SnapshotIsCloned", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_destroy_snaps([b"nopool/a@s"], True),
        ("destroy_snaps", (errno.ENOENT, {})),
        "SnapshotDestructionFailure",
        [("PoolNotFound", b"nopool/a@s")],
    ),
    (
        lambda: lzc.lzc_hold({b"p/a@s": b"tag"}),
        ("hold", (errno.EEXIST, {b"p/a@s": errno.EEXIST})),
        "HoldFailure",
        [("HoldExists", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_hold({b"p/a@s": b"t" * 300}),
        ("hold", (errno.E2BIG, {b"p/a@s": errno.E2BIG})),
        "HoldFailure",
        [("NameTooLong", b"t" * 300)],
    ),
    (
        lambda: lzc.lzc_hold({b"p/a@s": b"tag", b"q/a@s": b"tag"}),
        ("hold", (errno.EXDEV, {})),
        "HoldFailure",
        [("PoolsDiffer", None)],
    ),
    (
        lambda: lzc.lzc_hold({b"p/a@s": b"tag"}),
        ("hold", (errno.ENOENT, {b"p/a@s": errno.ENOENT})),
        "HoldFailure",
        [("FilesystemNotFound", b"p/a")],
    ),
    (
        lambda: lzc.lzc_release({b"p/a@s": [b"tag"]}),
        ("release", (errno.EINVAL, {b"p/a@s": errno.EINVAL})),
        "HoldReleaseFailure",
        [("ZFSGenericError", b"p/a@s")],
    ),
    (
        lambda: lzc.lzc_release({b"p/a@s": [b"tag"]}),
        ("release", (errno.ENOTSUP, {})),
        "HoldReleaseFailure",
        [("FeatureNotSupported", b"p")],
    ),
    (
        lambda: lzc.lzc_bookmark({b"p/a#b": b"p/a@s"}),
        ("bookmark", (errno.EEXIST, {b"p/a#b": errno.EEXIST})),
        "BookmarkFailure",
        [("BookmarkExists", b"p/a#b")],
    ),
    (
        lambda: lzc.lzc_bookmark({b"p/a#b": b"p/a@s"}),
        ("bookmark", (errno.ENOENT, {b"p/a#b": errno.ENOENT})),
        "BookmarkFailure",
        [("SnapshotNotFound", b"p/a#b")],
    ),
    (
        lambda: lzc.lzc_bookmark({b"p/a#b": b"p/a"}),
        ("bookmark", (errno.EINVAL, {b"p/a#b": errno.EINVAL})),
        "BookmarkFailure",
        [("BookmarkSourceInvalid", b"p/a")],
    ),
    (
        lambda: lzc.lzc_bookmark({b"p/a#b": b"p/a@s", b"p/a#b!": b"p/a@s"}),
        ("bookmark", (errno.EINVAL, {})),
        "BookmarkFailure",
        [("BookmarkNameInvalid", b"p/a#b!")],
    ),
    (
        lambda: lzc.lzc_bookmark({b"p/a#b": b"p/a@s", b"p/c#b": b"p/c@s"}),
        ("bookmark", (1024 + 15, {})),
        "BookmarkFailure",
        [("BookmarkMismatch", None)],
    ),
    (
        lambda: lzc.lzc_destroy_bookmarks([b"p/a#b"]),
        ("destroy_bookmarks", (errno.EINVAL, {b"p/a#b": errno.EINVAL})),
        "BookmarkDestructionFailure",
        [("NameInvalid", b"p/a#b")],
    ),
]


@pytest.mark.parametrize(("call", "result", "failure", "errors"), COMPOUND_CASES)
def test_compound_error_translation(
    fake: FakeBackend, call: Any, result: tuple[str, Any], failure: str, errors: list[Any]
) -> None:
    fake.results[result[0]] = result[1]
    with pytest.raises(exceptions.MultipleOperationsFailure) as info:
        call()
    assert type(info.value).__name__ == failure
    assert _errors(info.value) == errors
    assert info.value.errno == info.value.errors[0].errno


def test_n_more_errors_becomes_suppressed_count(fake: FakeBackend) -> None:
    fake.results["destroy_snaps"] = (errno.EBUSY, {b"p/a@s": errno.EBUSY, b"N_MORE_ERRORS": 7})
    with pytest.raises(exceptions.SnapshotDestructionFailure) as info:
        lzc.lzc_destroy_snaps([b"p/a@s"], defer=False)
    assert info.value.suppressed_count == 7 and len(info.value.errors) == 1


# (call, backend method, backend result, expected exception, expected name)
SINGLE_CASES = [
    (lambda: lzc.lzc_create(b"p/a"), "create", errno.EEXIST, "FilesystemExists", b"p/a"),
    (lambda: lzc.lzc_create(b"p/a/b"), "create", errno.ENOENT, "ParentNotFound", b"p/a/b"),
    (lambda: lzc.lzc_create(b"p/a b!"), "create", errno.EINVAL, "FilesystemNameInvalid", b"p/a b!"),
    (lambda: lzc.lzc_create(b"p/" + b"x" * 300), "create", errno.EINVAL, "NameTooLong", b"p/" + b"x" * 300),
    (lambda: lzc.lzc_create(b"p/a", props={b"bogus": 1}), "create", errno.EINVAL, "PropertyInvalid", b"p/a"),
    (lambda: lzc.lzc_create(b"p/vol/a"), "create", 1024 + 9, "WrongParent", b"p/vol/a"),
    (lambda: lzc.lzc_create(b"p/a"), "create", 1024 + 20, "PropertyInvalid", b"p/a"),
    (lambda: lzc.lzc_create(b"p/a"), "create", errno.ENOSPC, "NoSpace", b"p/a"),
    (lambda: lzc.lzc_get_holds(b"p/a@s"), "get_holds", (errno.ENOENT, {}), "SnapshotNotFound", b"p/a@s"),
    (lambda: lzc.lzc_get_holds(b"p/a"), "get_holds", (errno.EINVAL, {}), "SnapshotNameInvalid", b"p/a"),
    (lambda: lzc.lzc_get_holds(b"p/a@s"), "get_holds", (errno.ENOTSUP, {}), "FeatureNotSupported", b"p"),
    (lambda: lzc.lzc_get_bookmarks(b"p/a"), "get_bookmarks", (errno.ENOENT, {}), "FilesystemNotFound", b"p/a"),
    (lambda: lzc.lzc_send(b"p/a@s", None, 1), "send", errno.ENOENT, "SnapshotNotFound", b"p/a@s"),
    (lambda: lzc.lzc_send(b"p/a@s", b"p/a@r", 1), "send", errno.EXDEV, "SnapshotMismatch", b"p/a@s"),
    (lambda: lzc.lzc_send(b"p/a@s", b"q/a@r", 1), "send", errno.EXDEV, "PoolsDiffer", b"p/a@s"),
    (lambda: lzc.lzc_send(b"p/a@s", b"p/a@r!", 1), "send", errno.EINVAL, "NameInvalid", b"p/a@r!"),
    (lambda: lzc.lzc_send(b"p/a@s", b"p/a#bm", 1), "send", errno.ENOENT, "SnapshotNotFound", b"p/a@s"),
    (lambda: lzc.lzc_send(b"p/a@s", None, 1), "send", errno.EPIPE, "StreamIOError", None),
    (lambda: lzc.lzc_send(b"p/a@s", None, 1, ["bogus"]), "send", 0, "UnknownStreamFeature", None),
    (lambda: lzc.lzc_send_space(b"p/a@s", b"p/a#bm"), "send_space", (errno.ENOENT, 0), "NameInvalid", b"p/a#bm"),
    (lambda: lzc.lzc_send_space(b"p/a@s"), "send_space", (errno.ENOENT, 0), "SnapshotNotFound", b"p/a@s"),
    (lambda: lzc.lzc_send_space(b"p/a@s"), "send_space", (errno.EPERM, 0), "ZFSGenericError", b"p/a@s"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EEXIST, "DatasetExists", b"p/a@s"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.ENOENT, "DatasetNotFound", b"p/a@s"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EINVAL, "BadStream", None),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.ENODEV, "StreamMismatch", b"p/a"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.ETXTBSY, "DestinationModified", b"p/a"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EBADE, "BadStream", None),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", 1024 + 16, "StreamTruncated", None),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EROFS, "ReadOnlyPool", b"p"),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EIO, "StreamIOError", None),
    (lambda: lzc.lzc_receive(b"p/a@s", 0), "receive", errno.EACCES, "EncryptionKeyNotLoaded", None),
    (lambda: lzc.lzc_rollback(b"p/a"), "rollback", (errno.ESRCH, b""), "SnapshotNotFound", b"p/a"),
    (lambda: lzc.lzc_rollback(b"p/a"), "rollback", (errno.ENOENT, b""), "FilesystemNotFound", b"p/a"),
    (lambda: lzc.lzc_rollback(b"p/a!"), "rollback", (errno.ENOENT, b""), "NameInvalid", b"p/a!"),
    (lambda: lzc.lzc_destroy(b"p/a"), "plain", errno.ENOENT, "FilesystemNotFound", b"p/a"),
    (lambda: lzc.lzc_destroy(b"p/a"), "plain", errno.EBUSY, "DatasetBusy", b"p/a"),
    (lambda: lzc.lzc_destroy(b"p/a"), "plain", errno.EEXIST, "ZFSGenericError", b"p/a"),
    (lambda: lzc.lzc_hold({b"p/a@s": b"t"}, fd=99), "hold", (errno.EBADF, {}), "BadHoldCleanupFD", None),
    (lambda: lzc.lzc_create(b"p/a", ds_type="dir"), "create", 0, "DatasetTypeInvalid", "dir"),
    # the functions beyond zfsbackd's own use, by pyzfs's _error_translation
    (lambda: lzc.lzc_clone(b"p/c", b"p/a@s"), "clone", errno.EEXIST, "FilesystemExists", b"p/c"),
    (lambda: lzc.lzc_clone(b"p/c", b"p/a@s"), "clone", errno.ENOENT, "DatasetNotFound", b"p/c"),
    (lambda: lzc.lzc_clone(b"p/c", b"p/a"), "clone", errno.ENOENT, "SnapshotNameInvalid", b"p/a"),
    (lambda: lzc.lzc_clone(b"p/c!", b"p/a@s"), "clone", errno.EINVAL, "FilesystemNameInvalid", b"p/c!"),
    (lambda: lzc.lzc_clone(b"p/c", b"p/a"), "clone", errno.EINVAL, "SnapshotNameInvalid", b"p/a"),
    (lambda: lzc.lzc_clone(b"p/c", b"p/a@s"), "clone", errno.EINVAL, "PropertyInvalid", b"p/c"),
    (lambda: lzc.lzc_clone(b"q/c", b"p/a@s"), "clone", errno.EXDEV, "PoolsDiffer", b"q/c"),
    (lambda: lzc.lzc_clone(b"p/c", b"p/a@s"), "clone", errno.EPERM, "ZFSGenericError", b"p/c"),
    (lambda: lzc.lzc_promote(b"p/c"), "plain", errno.EINVAL, "NotClone", b"p/c"),
    (lambda: lzc.lzc_promote(b"p/c!"), "plain", errno.EINVAL, "FilesystemNameInvalid", b"p/c!"),
    (lambda: lzc.lzc_promote(b"p/c"), "plain", errno.ENOTSOCK, "NotClone", b"p/c"),
    (lambda: lzc.lzc_promote(b"p/c"), "plain", errno.EEXIST, "SnapshotExists", b"p/c"),
    (lambda: lzc.lzc_promote(b"p/c"), "plain", errno.ENOENT, "FilesystemNotFound", b"p/c"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/b"), "plain", errno.EEXIST, "FilesystemExists", b"p/b"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/b"), "plain", errno.ENOENT, "FilesystemNotFound", b"p/a"),
    (lambda: lzc.lzc_rename(b"p/a", b"q/b"), "plain", errno.EINVAL, "PoolsDiffer", b"p/a"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/b!"), "plain", errno.EINVAL, "FilesystemNameInvalid", b"p/b!"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/b"), "plain", errno.EINVAL, "ZFSGenericError", b"p/a"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/vol/b"), "plain", 1024 + 9, "WrongParent", b"p/vol/b"),
    (lambda: lzc.lzc_rename(b"p/a", b"p/b"), "plain", errno.EBUSY, "DatasetBusy", b"p/a"),
    (lambda: lzc.lzc_rollback_to(b"p/a", b"p/a@s"), "plain", errno.EEXIST, "SnapshotNotLatest", b"p/a@s"),
    (lambda: lzc.lzc_rollback_to(b"p/a", b"p/a@s"), "plain", errno.ESRCH, "SnapshotNotFound", b"p/a"),
    (lambda: lzc.lzc_rollback_to(b"p/a", b"p/a@s"), "plain", errno.ENOENT, "FilesystemNotFound", b"p/a"),
    (lambda: lzc.lzc_snaprange_space(b"p/a@s", b"q/a@t"), "snaprange_space", (errno.EXDEV, 0), "PoolsDiffer", b"q/a@t"),
    (
        lambda: lzc.lzc_snaprange_space(b"p/a@s", b"p/b@t"),
        "snaprange_space",
        (errno.EXDEV, 0),
        "SnapshotMismatch",
        b"p/b@t",
    ),
    (lambda: lzc.lzc_snaprange_space(b"p/a", b"p/a@t"), "snaprange_space", (errno.EINVAL, 0), "NameInvalid", b"p/a"),
    (
        lambda: lzc.lzc_snaprange_space(b"p/a@s", b"p/a@t"),
        "snaprange_space",
        (errno.EINVAL, 0),
        "SnapshotMismatch",
        b"p/a@t",
    ),
    (
        lambda: lzc.lzc_snaprange_space(b"p/a@s", b"p/a@t"),
        "snaprange_space",
        (errno.ENOENT, 0),
        "SnapshotNotFound",
        b"p/a@t",
    ),
    (lambda: lzc.lzc_load_key(b"p/e", False, b"k" * 32), "load_key", errno.EACCES, "EncryptionKeyInvalid", None),
    (lambda: lzc.lzc_load_key(b"p/e", False, b"k" * 32), "load_key", errno.EEXIST, "EncryptionKeyAlreadyLoaded", None),
    (lambda: lzc.lzc_load_key(b"p/e", True, b"k"), "load_key", errno.EINVAL, "PropertyInvalid", b"p/e"),
    (lambda: lzc.lzc_load_key(b"p/e!", True, b"k"), "load_key", errno.EINVAL, "FilesystemNameInvalid", b"p/e!"),
    (lambda: lzc.lzc_load_key(b"p/e", True, b"k"), "load_key", errno.ENOENT, "FilesystemNotFound", b"p/e"),
    (lambda: lzc.lzc_unload_key(b"p/e"), "plain", errno.EACCES, "EncryptionKeyNotLoaded", None),
    (lambda: lzc.lzc_unload_key(b"p/e"), "plain", errno.EBUSY, "DatasetBusy", b"p/e"),
    (lambda: lzc.lzc_change_key(b"p/e", "inherit"), "change_key", errno.EACCES, "EncryptionKeyNotLoaded", None),
    (lambda: lzc.lzc_change_key(b"p/e", "inherit"), "change_key", errno.EINVAL, "PropertyInvalid", b"p/e"),
    (lambda: lzc.lzc_change_key(b"p/e", "rotate"), "change_key", 0, "UnknownCryptCommand", "rotate"),
    (lambda: lzc.lzc_sync(b"p"), "sync", errno.ENOENT, "PoolNotFound", b"p"),
    (lambda: lzc.lzc_sync(b"p"), "sync", errno.EROFS, "ReadOnlyPool", b"p"),
    (lambda: lzc.lzc_reopen(b"p"), "plain", errno.ENOENT, "PoolNotFound", b"p"),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", 1024, "CheckpointExists", None),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", 1025, "CheckpointDiscarding", None),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", 1027, "DeviceRemovalRunning", None),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", 1028, "DeviceTooBig", None),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", 1049, "RaidzExpansionRunning", None),
    (lambda: lzc.lzc_pool_checkpoint(b"p"), "plain", errno.ENOENT, "PoolNotFound", b"p"),
    (lambda: lzc.lzc_pool_checkpoint_discard(b"p"), "plain", 1026, "CheckpointNotFound", None),
    (lambda: lzc.lzc_send_resume(b"p/a@s", None, 1), "send_resume", errno.ENOENT, "SnapshotNotFound", b"p/a@s"),
    (lambda: lzc.lzc_send_resume(b"p/a@s", None, 1), "send_resume", errno.EPIPE, "StreamIOError", None),
    (lambda: lzc.lzc_send_resume(b"p/a@s", None, 1, ["x"]), "send_resume", 0, "UnknownStreamFeature", None),
    (lambda: lzc.lzc_receive_resumable(b"p/a@s", 0), "receive", 1024 + 16, "StreamTruncated", None),
    (
        lambda: lzc.lzc_receive_with_header(b"p/a@s", 0, None),
        "receive_with_header",
        errno.EEXIST,
        "DatasetExists",
        b"p/a@s",
    ),
    (lambda: lzc.lzc_receive_one(b"p/a@s", 0, None), "receive_one", (errno.ENODEV, 0, {}), "StreamMismatch", b"p/a"),
]


@pytest.mark.parametrize(("call", "method", "result", "expected", "name"), SINGLE_CASES)
def test_error_translation(fake: FakeBackend, call: Any, method: str, result: Any, expected: str, name: Any) -> None:
    fake.results[method] = result
    with pytest.raises(exceptions.ZFSError) as info:
        call()
    assert type(info.value).__name__ == expected
    assert info.value.name == name


def test_successful_calls_pass_pyzfs_shapes_to_the_library(fake: FakeBackend) -> None:
    fake.results["hold"] = (0, {b"p/gone@s": errno.ENOENT})
    fake.results["release"] = (0, {b"p/a@s#nope": errno.ENOENT})
    fake.results["get_holds"] = (0, {b"tag": 1700000000})
    fake.results["rollback"] = (0, b"p/a@latest")
    fake.results["send_space"] = (0, 123456)
    lzc.lzc_snapshot([b"p/a@s"], {b"user:x": b"1"})
    assert lzc.lzc_hold({b"p/a@s": b"tag", b"p/gone@s": b"tag"}) == [b"p/gone@s"]
    assert lzc.lzc_release({b"p/a@s": [b"tag", b"nope"]}) == [b"p/a@s#nope"]
    assert lzc.lzc_get_holds(b"p/a@s") == {b"tag": 1700000000}
    assert lzc.lzc_rollback(b"p/a") == b"p/a@latest"
    assert lzc.lzc_send_space(b"p/a@s", flags=["compress"]) == 123456
    lzc.lzc_send(b"p/a@s", b"p/a#bm", 5, ["large_blocks", "embedded_data", "compress", "raw"])
    lzc.lzc_create(b"p/v", "zvol", {b"volsize": 1 << 20})
    lzc.lzc_receive(b"p/r@s", 7, force=True, origin=b"p/o@s", props={b"user:x": b"y"})
    lzc.lzc_destroy_snaps(iter([b"p/a@s"]), defer=True)
    assert lzc.lzc_exists(b"p/a") is True
    assert lzc.is_supported(lzc.lzc_bookmark) is True
    calls = dict(fake.calls)
    assert calls["snapshot"] == ({b"p/a@s": None}, {b"user:x": b"1"})
    assert calls["release"] == ({b"p/a@s": {b"tag": None, b"nope": None}},)
    assert calls["hold"] == ({b"p/a@s": b"tag", b"p/gone@s": b"tag"}, -1)
    assert calls["send"] == (
        b"p/a@s",
        b"p/a#bm",
        5,
        ["LZC_SEND_FLAG_LARGE_BLOCK", "LZC_SEND_FLAG_EMBED_DATA", "LZC_SEND_FLAG_COMPRESS", "LZC_SEND_FLAG_RAW"],
    )
    assert calls["create"] == (b"p/v", "LZC_DATSET_TYPE_ZVOL", {b"volsize": 1 << 20}, b"")
    assert calls["receive"] == (
        "lzc_receive",
        b"p/r@s",
        7,
        lzc.ReceiveOptions(force=True, origin=b"p/o@s", props={b"user:x": b"y"}),
    )
    assert calls["destroy_snaps"] == ({b"p/a@s": None}, True)
    assert calls["has_function"] == ("lzc_bookmark",)


def test_failed_checkpoint_discard_says_discard(fake: FakeBackend) -> None:
    fake.results["plain"] = errno.EPERM
    with pytest.raises(exceptions.ZFSGenericError, match="Failed to discard pool checkpoint"):
        lzc.lzc_pool_checkpoint_discard(b"p")
    with pytest.raises(exceptions.ZFSGenericError, match="Failed to create pool checkpoint"):
        lzc.lzc_pool_checkpoint(b"p")


def test_new_calls_pass_pyzfs_shapes_to_the_library(fake: FakeBackend) -> None:
    fake.results["snaprange_space"] = (0, 4096)
    lzc.lzc_clone(b"p/c", b"p/a@s")
    lzc.lzc_promote(b"p/c")
    lzc.lzc_rename(b"p/a", b"p/b")
    lzc.lzc_rollback_to(b"p/a", b"p/a@s")
    assert lzc.lzc_snaprange_space(b"p/a@s", b"p/a@t") == 4096
    lzc.lzc_load_key(b"p/e", 1, b"k" * 32)
    lzc.lzc_unload_key(b"p/e")
    lzc.lzc_change_key(b"p/e", "force_new_key", {b"keyformat": 1}, bytearray(b"k" * 32))
    lzc.lzc_sync(b"p")
    lzc.lzc_reopen(b"p", restart=False)
    lzc.lzc_pool_checkpoint(b"p")
    lzc.lzc_pool_checkpoint_discard(b"p")
    lzc.lzc_send_resume(b"p/a@s", b"p/a@r", 3, ["raw"], 5, 6)
    lzc.lzc_receive_resumable(b"p/r@s", 4, raw=True)
    lzc.lzc_receive_with_header(b"p/r@s", 4, "record", resumable=True)
    calls = _c_calls(fake)
    assert calls[0] == ("clone", (b"p/c", b"p/a@s", {}))
    assert calls[1:4] == [
        ("plain", ("lzc_promote", b"p/c", None, 0)),
        ("plain", ("lzc_rename", b"p/a", b"p/b")),
        ("plain", ("lzc_rollback_to", b"p/a", b"p/a@s")),
    ]
    assert calls[5] == ("load_key", (b"p/e", 1, b"k" * 32))
    assert calls[6] == ("plain", ("lzc_unload_key", b"p/e"))
    assert calls[7] == ("change_key", (b"p/e", "DCP_CMD_FORCE_NEW_KEY", {b"keyformat": 1}, b"k" * 32))
    assert calls[8] == ("sync", (b"p", {b"force": False}))
    assert calls[9] == ("plain", ("lzc_reopen", b"p", 0))
    assert [c[1][0] for c in calls[10:12]] == ["lzc_pool_checkpoint", "lzc_pool_checkpoint_discard"]
    assert calls[12] == ("send_resume", (b"p/a@s", b"p/a@r", 3, ["LZC_SEND_FLAG_RAW"], 5, 6))
    assert calls[13] == ("receive", ("lzc_receive_resumable", b"p/r@s", 4, lzc.ReceiveOptions(raw=True)))
    assert calls[14] == ("receive_with_header", (b"p/r@s", 4, "record", lzc.ReceiveOptions(resumable=True)))


def test_receive_one_family(fake: FakeBackend) -> None:
    fake.results["receive_one"] = (0, 1234, {})
    assert lzc.lzc_receive_one(b"p/r@s", 4, "rec", props={b"user:a": b"1"}) == (1234, 0)
    assert lzc.lzc_receive_with_cmdprops(b"p/r@s", 4, "rec", cmdprops={b"compression": 1}, action_handle=None) == (
        1234,
        None,
    )
    assert lzc.lzc_receive_with_heal(b"p/r@s", 4, "rec", key=b"k", action_handle=9) == (1234, 9)
    (f1, a1), (f2, a2), (f3, a3) = (call[1][0::4] for call in _c_calls(fake))
    assert (f1, f2, f3) == ("lzc_receive_one", "lzc_receive_with_cmdprops", "lzc_receive_with_heal")
    assert a1 == lzc.ReceiveOptions(props={b"user:a": b"1"})
    assert a2 == lzc.ReceiveOptions(cmdprops={b"compression": 1}, action_handle=None)
    assert a3 == lzc.ReceiveOptions(key=b"k", action_handle=9, corrective=True)
    # The stream arrived but properties did not: ReceivePropertyFailure, one error per property
    fake.results["receive_one"] = (0, 1234, {b"compression": errno.EINVAL, b"quota": 1024 + 20, b"x": errno.EPERM})
    with pytest.raises(exceptions.ReceivePropertyFailure) as info:
        lzc.lzc_receive_one(b"p/r@s", 4, "rec")
    assert _errors(info.value) == [
        ("PropertyInvalid", b"compression"),
        ("PropertyInvalid", b"quota"),
        ("ZFSGenericError", b"x"),
    ]
    # A failed receive ignores the property errors
    fake.results["receive_one"] = (errno.EEXIST, 0, {b"compression": errno.EINVAL})
    with pytest.raises(exceptions.DatasetExists):
        lzc.lzc_receive_with_cmdprops(b"p/r@s", 4, "rec")


def test_uncommitted_functions_raise_not_implemented_without_their_symbol(fake: FakeBackend) -> None:
    fake.results["has_function"] = False
    for call in (
        lambda: lzc.lzc_promote(b"p/c"),
        lambda: lzc.lzc_sync(b"p"),
        lambda: lzc.lzc_receive_with_heal(b"p/a@s", 0, None),
        lambda: lzc.lzc_inherit_prop(b"p/a", b"user:x"),
        lambda: lzc.lzc_set_prop(b"p/a", b"user:x", b"v"),
        lambda: lzc.lzc_list_snaps(b"p/a"),
    ):
        with pytest.raises(NotImplementedError):
            call()
    asked = [args[0] for name, args in fake.calls if name == "has_function"]
    assert asked == ["lzc_promote", "lzc_sync", "lzc_receive_with_heal", "lzc_inherit", "lzc_set_props", "lzc_list"]
    # committed functions are not checked: a missing symbol fails in the call itself, as in pyzfs
    fake.calls.clear()
    lzc.lzc_rename(b"p/a", b"p/b")
    assert [name for name, _ in fake.calls] == ["plain"]


def test_is_supported_follows_pyzfs_names(fake: FakeBackend) -> None:
    for func, symbol in (
        (lzc.lzc_inherit_prop, "lzc_inherit"),
        (lzc.lzc_set_prop, "lzc_set_props"),
        (lzc.lzc_get_props, "lzc_list"),
        (lzc.lzc_list_children, "lzc_list"),
        (lzc.lzc_recv, "lzc_receive"),
        (lzc.lzc_snap, "lzc_snapshot"),
        (lzc.lzc_rollback_to, "lzc_rollback_to"),
    ):
        fake.calls.clear()
        assert lzc.is_supported(func) is True
        assert fake.calls == [("has_function", (symbol,))]
    with pytest.raises(ValueError, match="not a libzfs_core API function"):
        lzc.is_supported(lzc.receive_header)


def test_clusterhq_listing_is_as_broken_as_in_pyzfs(fake: FakeBackend) -> None:
    """Were lzc_list present, pyzfs would fail building its options (str keys); so does the shim."""
    for call in (lzc.lzc_get_props, lzc.lzc_list_children, lzc.lzc_list_snaps):
        with pytest.raises(TypeError, match="Unsupported key type str"):
            call(b"p/a")


def test_inherit_and_set_props_where_the_library_has_them(fake: FakeBackend) -> None:
    lzc.lzc_inherit_prop(b"p/a", b"user:x")
    lzc.lzc_set_props(b"p/a@s", b"user:x", 5)
    assert _c_calls(fake) == [
        ("inherit", (b"p/a", b"user:x")),
        ("set_props", (b"p/a@s", {b"user:x": 5})),
    ]
    fake.results["inherit"] = errno.EINVAL
    with pytest.raises(exceptions.PropertyInvalid) as info:
        lzc.lzc_inherit_prop(b"p/a", b"bogus")
    assert info.value.name == b"bogus"
    fake.results["set_props"] = errno.EINVAL
    with pytest.raises(exceptions.NameInvalid):
        lzc.lzc_set_props(b"p/a@s!", b"user:x", 5)
    fake.results["set_props"] = errno.ENOENT
    with pytest.raises(exceptions.DatasetNotFound):
        lzc.lzc_set_props(b"p/a@s", b"user:x", 5)


def test_receive_header_reads_the_begin_record(tmp_path: Path) -> None:
    import struct

    toname = b"tank/fs@snap"
    begin = struct.pack("<QQQIIQQ256s", 0x2F5BACBAC, 17, 1700000000, 2, 4, 111, 0, toname)
    record = struct.pack("<II", 0, 0) + begin
    stream = tmp_path / "stream"
    stream.write_bytes(record + b"rest of the stream")
    with stream.open("rb") as f:
        header, c_record = lzc.receive_header(f.fileno())
        assert f.read() == b"rest of the stream"  # exactly one record was read
    assert header == {
        "drr_magic": 0x2F5BACBAC,
        "drr_versioninfo": 17,
        "drr_creation_time": 1700000000,
        "drr_type": 2,
        "drr_flags": 4,
        "drr_toguid": 111,
        "drr_fromguid": 0,
        "drr_toname": toname,
    }
    assert c_record.drr_u.drr_begin.drr_toguid == 111
    short = tmp_path / "short"
    short.write_bytes(record[:100])
    with short.open("rb") as f, pytest.raises(ValueError):
        lzc.receive_header(f.fileno())


def test_constants_as_pyzfs() -> None:
    assert lzc.WRAPPING_KEY_LEN == 32
    assert (lzc.zfs_keyformat.ZFS_KEYFORMAT_RAW, lzc.zfs_keyformat.ZFS_KEYFORMAT_PASSPHRASE) == (1, 3)
    assert lzc.zfs_key_location.ZFS_KEYLOCATION_URI == 2
    assert (lzc.zio_encrypt.ZIO_CRYPT_INHERIT, lzc.zio_encrypt.ZIO_CRYPT_AES_256_GCM) == (0, 8)
    assert lzc.exceptions is exceptions
    assert set(lzc.__all__) <= set(dir(lzc))


def test_typed_integers_check_their_range() -> None:
    c = lzc.ctypes
    assert int(c.uint8_t(255)) == 255 and c.uint8_t.__name__ == "uint8_t"
    assert int(c.int64_t(-(2**63))) == -(2**63)
    assert int(c.boolean_t(1)) == 1
    for cast, value in ((c.uint8_t, 256), (c.uint32_t, -1), (c.int8_t, 128), (c.boolean_t, 2), (c.uchar_t, -1)):
        with pytest.raises(OverflowError):
            cast(value)


def test_release_wants_lists(fake: FakeBackend) -> None:
    with pytest.raises(TypeError, match="holds must be in a list"):
        lzc.lzc_release({b"p/a@s": b"tag"})  # type: ignore[dict-item]


def test_is_supported_refuses_foreign_functions(fake: FakeBackend) -> None:
    with pytest.raises(ValueError, match="not from libzfs_core"):
        lzc.is_supported(os.getcwd)
    with pytest.raises(ValueError, match="not a libzfs_core API function"):
        lzc.is_supported(lzc.header_path)


# ---------------------------------------------------------------------------
# zfs diff parsing (samples as OpenZFS 2.1 and 2.3 print them; see tests/zfsvm for the real thing)


def test_decode_diff_path_is_exact() -> None:
    assert command.decode_diff_path(rb"/p/fs/with\0040space") == b"/p/fs/with space"
    assert command.decode_diff_path(rb"/p/fs/new\0012line") == b"/p/fs/new\nline"
    assert command.decode_diff_path(rb"/p/fs/back\0134slash") == b"/p/fs/back\\slash"
    assert command.decode_diff_path(rb"/p/fs/caf\0303\0251") == "/p/fs/café".encode()
    assert command.decode_diff_path(rb"/p/fs/latin\0351") == b"/p/fs/latin\xe9"
    assert command.decode_diff_path(rb"/p/fs/\00400401") == b"/p/fs/ 0401"
    for bad in (rb"/p/trailing\\", rb"/p/short\012", rb"/p/x\0400", rb"/p/\x41"):
        with pytest.raises(ValueError, match="bad escape"):
            command.decode_diff_path(bad)


DIFF_SAMPLE = (
    b"1700000000.123456789\tM\t/\t/p/fs/dir\n"
    b"1700000001.000000001\t+\tF\t/p/fs/dir/new\\0040file\n"
    b"1700000002.000000000\t-\t@\t/p/fs/link\n"
    b"1700000003.500000000\tR\tF\t/p/fs/old\tp/fs/new\n"
    b"1700000004.000000000\tM\tF\t/p/fs/hard\t(+1)\n"
    b"1700000005.000000000\tR\t/\t/p/fs/a\\0012b\t/p/fs/c\\0377d\n"
)


def test_parse_diff_lines() -> None:
    lines = DIFF_SAMPLE.split(b"\n")[:-1]
    entries = [command.parse_diff_line(line) for line in lines if b"\tp/fs/new" not in line]
    assert entries == [
        command.DiffEntry(1_700_000_000_123_456_789, "M", "/", b"/p/fs/dir"),
        command.DiffEntry(1_700_000_001_000_000_001, "+", "F", b"/p/fs/dir/new file"),
        command.DiffEntry(1_700_000_002_000_000_000, "-", "@", b"/p/fs/link"),
        command.DiffEntry(1_700_000_004_000_000_000, "M", "F", b"/p/fs/hard", link_delta=1),
        command.DiffEntry(1_700_000_005_000_000_000, "R", "/", b"/p/fs/a\nb", new_path=b"/p/fs/c\xffd"),
    ]
    with pytest.raises(ValueError, match="not absolute"):
        command.parse_diff_line(lines[3])


@pytest.mark.parametrize(
    "line",
    [
        b"1700000000.1\tM\tF\t/p/x",  # nanoseconds must have 9 digits
        b"1700000000.123456789\tX\tF\t/p/x",  # unknown change
        b"1700000000.123456789\tM\tZ\t/p/x",  # unknown file type
        b"1700000000.123456789\tM\tF",  # missing path
        b"1700000000.123456789\tR\tF\t/p/x",  # rename without target
        b"1700000000.123456789\t+\tF\t/p/x\t(+1)",  # link delta on an add
        b"1700000000.123456789\tM\tF\t/p/x\t+1",
        b"M\tF\t/p/x",  # no -t
    ],
)
def test_parse_diff_rejects_surprises(line: bytes) -> None:
    with pytest.raises(ValueError):
        command.parse_diff_line(line)


# ---------------------------------------------------------------------------
# The zfs command wrapper with a fake zfs/zpool on PATH


@pytest.fixture
def fake_zfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH whose zfs/zpool print files from it: `<dir>/<prog>.out`, `.err`, `.rc`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("zfs", "zpool"):
        script = bindir / prog
        script.write_text(
            textwrap.dedent(
                f"""\
                #!/bin/sh
                d={bindir}
                printf '%s\\n' "$*" >> "$d/{prog}.args"
                [ -f "$d/{prog}.out" ] && cat "$d/{prog}.out"
                [ -f "$d/{prog}.err" ] && cat "$d/{prog}.err" >&2
                exit "$(cat "$d/{prog}.rc" 2>/dev/null || echo 0)"
                """
            )
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir


def _say(bindir: Path, prog: str, out: bytes = b"", err: bytes = b"", rc: int = 0) -> None:
    (bindir / f"{prog}.out").write_bytes(out)
    (bindir / f"{prog}.err").write_bytes(err)
    (bindir / f"{prog}.rc").write_text(str(rc))


def _args(bindir: Path, prog: str) -> list[str]:
    return (bindir / f"{prog}.args").read_text().splitlines()


def test_list_snapshots_parses_zfs_get(fake_zfs: Path) -> None:
    _say(
        fake_zfs,
        "zfs",
        b"p/fs@b\tcreatetxg\t20\t-\n"
        b"p/fs@b\tguid\t222\t-\n"
        b"p/fs@b\tcreation\t1700000100\t-\n"
        b"p/fs@b\tzfsbackd:backup-id\tbackup-0123456789abcdef0\tlocal\n"
        b"p/fs@a\tcreatetxg\t10\t-\n"
        b"p/fs@a\tguid\t111\t-\n"
        b"p/fs@a\tcreation\t1700000000\t-\n"
        b"p/fs@a\tzfsbackd:backup-id\tbackup-inherited\tinherited from p/fs\n"
        b"p/fs@c d\tcreatetxg\t30\t-\n"
        b"p/fs@c d\tguid\t333\t-\n"
        b"p/fs@c d\tcreation\t1700000200\t-\n"
        b"p/fs@c d\tzfsbackd:backup-id\tvalue\twith tab\tlocal\n",
    )
    snaps = command.list_snapshots("p/fs")
    assert [(s.name, s.createtxg, s.guid, s.creation, s.backup_id) for s in snaps] == [
        ("p/fs@a", 10, 111, 1700000000, None),
        ("p/fs@b", 20, 222, 1700000100, "backup-0123456789abcdef0"),
        ("p/fs@c d", 30, 333, 1700000200, "value\twith tab"),
    ]
    assert snaps[2].snapname == "c d"
    assert _args(fake_zfs, "zfs") == [
        "get -Hp -d 1 -t snapshot -o name,property,value,source createtxg,guid,creation,zfsbackd:backup-id p/fs"
    ]


@pytest.mark.parametrize(
    ("out", "what"),
    [
        (
            b"p/fs@a\tcreatetxg\tten\t-\np/fs@a\tguid\t1\t-\np/fs@a\tcreation\t1\t-\n"
            b"p/fs@a\tzfsbackd:backup-id\t-\t-\n",
            "not a number",
        ),
        (b"p/other@a\tcreatetxg\t10\t-\n", "is not a snapshot of"),
        (b"p/fs@a\tcreatetxg\t10\n", "3 tab-separated fields instead of 4"),
        (b"p/fs@a\tcreatetxg\t10\t-\np/fs@a\tcreatetxg\t11\t-\n", "property 'createtxg'"),
        (b"p/fs@a\tcreatetxg\t10\t-\n", "lacks"),
    ],
)
def test_list_snapshots_is_strict(fake_zfs: Path, out: bytes, what: str) -> None:
    _say(fake_zfs, "zfs", out)
    with pytest.raises(command.ZfsCommandError, match=what) as info:
        command.list_snapshots("p/fs")
    assert "zfs get -Hp" in str(info.value)


def test_mounts_and_properties(fake_zfs: Path) -> None:
    def rows(*datasets: tuple[str, str, str]) -> bytes:
        return b"".join(
            f"{name}\tcanmount\ton\tdefault\n{name}\tmounted\t{mounted}\t-\n"
            f"{name}\tmountpoint\t{where}\tinherited from p\n".encode()
            for name, mounted, where in datasets
        )

    extra = b"p/fs\tuser:note\ta\tb\tlocal\np/fs\tcompression\tlz4\treceived\n"
    _say(fake_zfs, "zfs", rows(("p/fs", "yes", "/srv/fs"), ("p/fs/child one", "yes", "/srv/fs/child\tone"),
                               ("p/fs/off", "no", "/srv/fs/off")) + extra)
    mounts, props = command.mounts_and_properties("p/fs")
    assert mounts == [
        command.MountInfo("p/fs", Path("/srv/fs")),
        command.MountInfo("p/fs/child one", Path("/srv/fs/child\tone")),
        command.MountInfo("p/fs/off", None),
    ]
    assert props["p/fs/off"] == {
        "canmount": ("on", "default"), "mounted": ("no", "-"), "mountpoint": ("/srv/fs/off", "inherited from p")
    }
    assert command.set_here(props["p/fs"]) == {"user:note": "a\tb", "compression": "lz4"}
    assert command.set_here(props["p/fs/off"]) == {}
    want = "get -Hp -r -t filesystem -o name,property,value,source all p/fs"
    assert _args(fake_zfs, "zfs")[-1] == want
    command.mounts_and_properties("p/fs", recursive=False)
    assert _args(fake_zfs, "zfs")[-1] == want.replace("-r ", "")
    for out, what in [
        (rows(("p/fsx", "yes", "/x")), "is not 'p/fs' or below it"),
        (rows(("p/fs", "yes", "relative")), "not an absolute path"),
        (rows(("p/fs", "maybe", "/x")), "is not yes/no"),
        (rows(("p/fs", "yes", "/x"), ("p/fs", "yes", "/x")), "property 'canmount' twice"),
        (b"p/fs\tmounted\tyes\n", "3 tab-separated fields instead of 4"),
        (b"", "'p/fs' itself is missing"),
    ]:
        _say(fake_zfs, "zfs", out)
        with pytest.raises(command.ZfsCommandError, match=what):
            command.mounts_and_properties("p/fs")
    _say(fake_zfs, "zfs", b"compression\tlz4\tlocal\nuser:note\ta\tb\treceived\n")
    assert command.get_properties("p/fs") == {"compression": "lz4", "user:note": "a\tb"}
    assert _args(fake_zfs, "zfs")[-1] == "get -Hp -o property,value,source -s local,received all p/fs"
    command.get_properties("p/fs", ["recordsize", "atime"], sources=None)
    assert _args(fake_zfs, "zfs")[-1] == "get -Hp -o property,value,source recordsize,atime p/fs"


def test_mountpoint_and_mounted(fake_zfs: Path) -> None:
    _say(fake_zfs, "zfs", b"/srv/data dir\n")
    assert command.mountpoint("p/fs") == Path("/srv/data dir")
    for value in (b"none\n", b"-\n"):
        _say(fake_zfs, "zfs", value)
        assert command.mountpoint("p/fs") is None
    _say(fake_zfs, "zfs", b"relative\n")
    with pytest.raises(command.ZfsCommandError, match="not an absolute path"):
        command.mountpoint("p/fs")
    _say(fake_zfs, "zfs", b"yes\n")
    assert command.is_mounted("p/fs") is True
    _say(fake_zfs, "zfs", b"no\n")
    assert command.is_mounted("p/fs") is False
    _say(fake_zfs, "zfs", b"maybe\n")
    with pytest.raises(command.ZfsCommandError, match="mounted is not yes/no"):
        command.is_mounted("p/fs")


def test_legacy_mountpoint_comes_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(
        b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        b"90 1 0:50 / /mnt/legacy\\040dir rw,relatime shared:1 - zfs p/with\\040space rw,xattr\n"
    )
    assert command._legacy_mountpoint("p/with space", mountinfo) == Path("/mnt/legacy dir")
    assert command._legacy_mountpoint("p/other", mountinfo) is None


def test_missing_dataset_names_the_fix(fake_zfs: Path) -> None:
    _say(fake_zfs, "zfs", err=b"cannot open 'tank/home': dataset does not exist\n", rc=1)
    _say(fake_zfs, "zpool", out=b"tank\n")
    with pytest.raises(command.DatasetMissing) as info:
        command.list_snapshots("tank/home")
    err = info.value
    assert isinstance(err, SnapshotError) and not isinstance(err, command.PoolNotImported)
    assert err.dataset == "tank/home"
    assert "zfs create tank/home" in str(err) and "file_systems[].source.zfs" in str(err)


def test_pool_not_imported_says_zpool_import(fake_zfs: Path) -> None:
    _say(fake_zfs, "zfs", err=b"cannot open 'tank/home': dataset does not exist\n", rc=1)
    _say(fake_zfs, "zpool", err=b"cannot open 'tank': no such pool\n", rc=1)
    with pytest.raises(command.PoolNotImported) as info:
        command.mountpoint("tank/home")
    assert info.value.pool == "tank" and "zpool import tank" in str(info.value)
    _say(fake_zfs, "zfs", err=b"cannot create 'tank/new': no such pool 'tank'\n", rc=1)
    with pytest.raises(command.PoolNotImported, match="zpool import tank"):
        command.create("tank/new", {"compression": "lz4"})
    assert _args(fake_zfs, "zfs")[-1] == "create -o compression=lz4 tank/new"
    assert command.pool_imported("tank") is False


def test_other_failures_keep_the_message(fake_zfs: Path) -> None:
    _say(fake_zfs, "zfs", err=b"cannot set property for 'p/fs': permission denied\n", rc=1)
    with pytest.raises(command.ZfsCommandError, match="run zfsbackd as root") as info:
        command.set_user_property("p/fs", "zfsbackd:note", "x")
    assert info.value.returncode == 1 and "permission denied" in info.value.stderr
    with pytest.raises(SnapshotError, match="not a user property"):
        command.set_user_property("p/fs", "compression", "lz4")


def test_zfs_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(command.ZfsNotInstalled, match="install zfsutils-linux"):
        command.mounts_and_properties("p/fs")
    with pytest.raises(command.ZfsNotInstalled):
        list(command.diff("p/fs@a", "p/fs@b"))


def test_diff_streams_and_reports_failure(fake_zfs: Path) -> None:
    _say(fake_zfs, "zfs", DIFF_SAMPLE.replace(b"\tp/fs/new", b"\t/p/fs/new"))
    entries = list(command.diff("p/fs@a", "p/fs@b"))
    assert len(entries) == 6 and entries[3].new_path == b"/p/fs/new"
    assert _args(fake_zfs, "zfs") == ["diff -FHt p/fs@a p/fs@b"]
    _say(
        fake_zfs,
        "zfs",
        DIFF_SAMPLE.split(b"\n")[0] + b"\n",
        err=b"cannot open 'p/fs@b': dataset does not exist\n",
        rc=1,
    )
    _say(fake_zfs, "zpool", out=b"p\n")
    gen = command.diff("p/fs@a", "p/fs@b")
    assert next(gen).path == b"/p/fs/dir"
    with pytest.raises(command.DatasetMissing, match="snapshot 'p/fs@b' does not exist"):
        next(gen)
    _say(fake_zfs, "zfs", b"garbage\n")
    with pytest.raises(command.ZfsCommandError, match="unexpected output"):
        list(command.diff("p/fs@a", "p/fs@b"))


def test_diff_stops_when_told_and_kills_zfs(fake_zfs: Path) -> None:
    """`zfs diff` can think for minutes without a line: a stop request must not wait for it."""
    pidfile = fake_zfs / "zfs.pid"
    first_line = DIFF_SAMPLE.split(b"\n")[0].decode()
    (fake_zfs / "zfs").write_text(f"#!/bin/sh\necho $$ > {pidfile}\nprintf '%s\\n' '{first_line}'\nexec sleep 60\n")
    stop = threading.Event()
    gen = command.diff("p/fs@a", "p/fs@b", stop)
    assert next(gen).path == b"/p/fs/dir"
    started = time.monotonic()
    stop.set()
    with pytest.raises(command.DiffStopped):
        next(gen)
    assert time.monotonic() - started < 5
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_pending_changes_is_a_race_the_walk_can_end() -> None:
    from zfsbackd.snapshot.base import ChangeSet, PendingChanges

    class SlowSnapshot:
        name = "slow"

        def __init__(self, answer: ChangeSet | None, delay: float) -> None:
            self.answer, self.delay, self.stopped = answer, delay, False

        def changes_since(self, parent: dict[str, object], stop: threading.Event | None = None) -> ChangeSet | None:
            assert stop is not None
            if stop.wait(self.delay):
                self.stopped = True
                raise command.DiffStopped()
            return self.answer

    quick = SlowSnapshot(ChangeSet.from_paths([b"a/b"]), 0)
    pending = PendingChanges(quick, {})  # type: ignore[arg-type]
    assert pending.wait(5) == ChangeSet.from_paths([b"a/b"])
    pending.stop()
    slow = SlowSnapshot(ChangeSet.from_paths([b"x"]), 60)
    pending = PendingChanges(slow, {})  # type: ignore[arg-type]
    assert pending.ready() is None
    started = time.monotonic()
    pending.stop()
    assert slow.stopped and time.monotonic() - started < 5 and pending.ready() is None
    abandoned = PendingChanges(SlowSnapshot(ChangeSet.from_paths([b"y"]), 0.2), {})  # type: ignore[arg-type]
    abandoned.abandon()  # the walk went on without it: a late answer is not used
    assert abandoned.wait(5) is None


def test_restore_target_recreates_children_and_refuses_paths_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit level (the VM test restores a real recursive backup): what gets created, in which order."""
    from zfsbackd.errors import RestoreError
    from zfsbackd.snapshot import zfs as zfs_snapshots

    calls: list[tuple[str, ...]] = []
    mounted: dict[str, Path] = {}

    def create(dataset: str, props: dict[str, str] | None = None) -> None:
        calls.append(("create", dataset, *sorted(f"{k}={v}" for k, v in (props or {}).items())))
        if (props or {}).get("canmount") != "off":
            mounted[dataset] = Path("/") / dataset

    monkeypatch.setattr(command, "create", create)
    monkeypatch.setattr(command, "mountpoint", lambda d: mounted.get(d))
    monkeypatch.setattr(command, "is_mounted", lambda d: d in mounted)

    def set_property(dataset: str, name: str, value: str) -> None:
        calls.append(("set", dataset, f"{name}={value}"))
        mounted[dataset] = Path(value)

    monkeypatch.setattr(command, "set_property", set_property)
    children = [
        {"Dataset": "a", "Path": "a", "Properties": {"recordsize": "16384", "readonly": "on"}},
        {"Dataset": "a/b", "Path": "x/y", "Properties": {}},
        {"Dataset": "off", "Path": None, "Properties": {}},
    ]
    mnt, mounts = zfs_snapshots.create_restore_target("p/new", {"compression": "lz4"}, children)
    assert mnt == Path("/p/new") and mounts == [Path("/p/new/a"), Path("/p/new/x/y")]
    assert calls == [
        ("create", "p/new", "compression=lz4"),
        ("create", "p/new/a", "recordsize=16384"),  # readonly comes after the data
        ("create", "p/new/a/b"),
        ("set", "p/new/a/b", "mountpoint=/p/new/x/y"),  # mounted where its files are in the tree
        ("create", "p/new/off", "canmount=off"),
    ]
    calls.clear()
    zfs_snapshots.finish_restore_target("p/new", {"readonly": "off"}, children)
    assert calls == [("set", "p/new/a", "readonly=on")]
    outside = (
        {"Dataset": "../evil", "Path": "e"},
        {"Dataset": "e", "Path": "../../etc"},
        {"Dataset": "e", "Path": "/x"},
    )
    for bad in outside:
        with pytest.raises(RestoreError, match="outside p/new2"):
            zfs_snapshots.create_restore_target("p/new2", {}, [bad])


@pytest.mark.parametrize(
    ("ret", "output", "expected"),
    [
        (errno.ENOENT, {}, "PoolNotFound"),
        (errno.ETIME, {}, "ZCPTimeout"),
        (errno.ENOMEM, {}, "ZCPMemoryError"),
        (errno.ENOSPC, {}, "ZCPSpaceError"),
        (errno.EPERM, {}, "ZCPPermissionError"),
        (errno.ECHRNG, {b"error": b"[string] boom"}, "ZCPRuntimeError"),
        (errno.EINVAL, {b"error": b"[string] near <eof>"}, "ZCPSyntaxError"),
        (errno.EINVAL, {}, "ZCPLimitInvalid"),
        (errno.EIO, {}, "ZIOError"),
        (errno.EDOM, {}, "ZFSGenericError"),
    ],
)
def test_channel_program_errors_as_pyzfs(
    fake: FakeBackend, ret: int, output: dict[bytes, bytes], expected: str
) -> None:
    """pyzfs's translation (lzc_channel_program_translate_error): EINVAL is a syntax error when the
    program says why, else invalid limits; the Lua message is kept in ``details``."""
    fake.results["channel_program"] = (ret, output)
    with pytest.raises(exceptions.ZFSError) as info:
        lzc.lzc_channel_program(b"tank", b"return 1")
    assert type(info.value).__name__ == expected
    if b"error" in output:
        assert info.value.details == output[b"error"]  # type: ignore[attr-defined]


def test_channel_program_arguments_and_result(fake: FakeBackend) -> None:
    fake.results["channel_program"] = (0, {b"return": {b"a": 1}})
    assert lzc.lzc_channel_program(b"tank", b"return {a=1}", params=[b"x"]) == {b"a": 1}
    assert lzc.lzc_channel_program_nosync(b"tank", b"return {a=1}") == {b"a": 1}
    first, second = fake.calls
    assert first == (
        "channel_program",
        ("lzc_channel_program", b"tank", b"return {a=1}", 10_000_000, 10 * 1024 * 1024, {b"argv": [b"x"]}),
    )
    assert second[1][0] == "lzc_channel_program_nosync" and second[1][-1] == {b"argv": None}
    fake.results["channel_program"] = (0, {})
    assert lzc.lzc_channel_program(b"tank", b"local x = 1") is None
    with pytest.raises(exceptions.NameInvalid):
        lzc.lzc_channel_program(b"ta\0nk", b"return 1")
    with pytest.raises(ValueError, match="NUL"):
        lzc.lzc_channel_program(b"tank", b"return 1\0")
