"""A pyzfs-compatible ``libzfs_core`` binding: cffi in ABI mode, no compiler at install time.

The functions below have the names, argument order, defaults, return values
and exceptions of OpenZFS's pyzfs ``libzfs_core`` module (2.1-2.3; where
pyzfs 2.1 and 2.3 differ, as 2.3 does), so code written against one runs on
the other::

    from zfsbackd.zfs import libzfs_core as lzc
    lzc.lzc_snapshot([b"tank/home@zfsbackd-backup-0123"], {b"zfsbackd:backup-id": b"backup-0123"})
    lzc.lzc_hold({b"tank/home@zfsbackd-backup-0123": b"zfsbackd"})

Why not pyzfs itself: Debian ships it only for the system Python, it compiles
nothing but still needs the distribution package, and a daemon in a venv
cannot import it. This module needs only ``cffi`` and the shared libraries of
zfsutils-linux.

How it works:

- The C declarations are ``native/libzfs_core.h``, parsed by ``cffi.FFI.cdef``
  at run time (see native/README.md for where the file is looked up).
- ``libzfs_core`` and ``libnvpair`` are ``dlopen``-ed by trying the sonames of
  OpenZFS 0.7-2.3 and ``ctypes.util.find_library``; nothing is hard-coded to
  one version.
- Loading and ``libzfs_core_init()`` happen once, on the first call, under a
  lock. Importing this module never touches ZFS, so it imports on any host; on
  a host without ZFS every call raises :class:`ZFSInitializationFailed` saying
  what was tried and what to install.
- Errors are translated per function exactly as pyzfs does (the same errno can
  mean different things for different calls), into the classes of
  :mod:`zfsbackd.zfs.exceptions`.

Deliberate differences from pyzfs (each closes a pyzfs bug; none changes a
successful call):

- names containing a NUL byte are refused (C would cut them and act on another
  dataset): :class:`NameInvalid` for name arguments, ``ValueError`` inside
  dicts and lists;
- ``lzc_create`` passes no key (NULL) when none is given;
- a compound error's ``N_MORE_ERRORS`` entry becomes ``suppressed_count``
  instead of a bogus per-name error, an unexpected EINVAL from ``lzc_release``
  gives an error object instead of ``None`` in ``errors``, and ``lzc_bookmark``
  failing for several bookmarks at once no longer raises ``KeyError``.
"""

from __future__ import annotations

import ctypes.util
import errno
import importlib.resources
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import cffi

from . import exceptions as exc
from ._nvlist import NvlistCodec
from .exceptions import (
    ECKSUM,
    ZFS_ERR_BADPROP,
    ZFS_ERR_BOOKMARK_SOURCE_NOT_ANCESTOR,
    ZFS_ERR_STREAM_TRUNCATED,
    ZFS_ERR_WRONG_PARENT,
    ZFSError,
    ZFSInitializationFailed,
    generic_error,
)

MAXNAMELEN = 255
"""Longest ZFS name (ZFS_MAX_DATASET_NAME_LEN - 1), as pyzfs exports it."""

HEADER_NAME = "libzfs_core.h"

# Tried in this order; libzfs_core.so.3 is OpenZFS 0.8-2.3 on Linux, .so.1 ZoL 0.6/0.7,
# .so.2 FreeBSD's base system. find_library() adds whatever ldconfig knows.
_LZC_SONAMES = ("libzfs_core.so.3", "libzfs_core.so.1", "libzfs_core.so.2", "libzfs_core.so")
_NVPAIR_SONAMES = ("libnvpair.so.3", "libnvpair.so.1", "libnvpair.so.2", "libnvpair.so")

_SEND_FLAGS = {
    "embedded_data": "LZC_SEND_FLAG_EMBED_DATA",
    "large_blocks": "LZC_SEND_FLAG_LARGE_BLOCK",
    "compress": "LZC_SEND_FLAG_COMPRESS",
    "raw": "LZC_SEND_FLAG_RAW",
}
"""pyzfs's flag names (``str``) -> enumerators of ``enum lzc_send_flags`` in the header."""

_DATASET_TYPES = {"zfs": "LZC_DATSET_TYPE_ZFS", "zvol": "LZC_DATSET_TYPE_ZVOL"}

__all__ = [
    "MAXNAMELEN",
    "ZCP_DEFAULT_INSTRLIMIT",
    "ZCP_DEFAULT_MEMLIMIT",
    "is_supported",
    "lzc_bookmark",
    "lzc_channel_program",
    "lzc_channel_program_nosync",
    "lzc_create",
    "lzc_destroy",
    "lzc_destroy_bookmarks",
    "lzc_destroy_snaps",
    "lzc_exists",
    "lzc_get_bookmarks",
    "lzc_get_holds",
    "lzc_hold",
    "lzc_receive",
    "lzc_recv",
    "lzc_release",
    "lzc_rollback",
    "lzc_send",
    "lzc_send_space",
    "lzc_snap",
    "lzc_snapshot",
]


# ---------------------------------------------------------------------------
# Loading the libraries


def header_path() -> Path:
    """Where the cdef text is read from: the checkout's ``native/``, else a copy shipped in the package."""
    checkout = Path(__file__).resolve().parents[2] / "native" / HEADER_NAME
    if checkout.is_file():
        return checkout
    packaged = importlib.resources.files(__package__) / HEADER_NAME
    if packaged.is_file():
        return Path(str(packaged))
    raise ZFSInitializationFailed(
        errno.ENOENT,
        f"the C declarations for libzfs_core are missing: neither {checkout} nor {packaged} exists; reinstall zfsbackd",
    )


def _candidates(short_name: str, sonames: tuple[str, ...]) -> list[str]:
    found = ctypes.util.find_library(short_name)
    names = list(sonames)
    if found and found not in names:
        names.insert(1, found)
    return names


def _dlopen(ffi: cffi.FFI, names: list[str]) -> Any:
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError:
            continue
    library = names[0].split(".so", 1)[0]  # "libzfs_core" or "libnvpair"
    raise ZFSInitializationFailed(
        errno.ENOENT,
        f"{library} is not installed (tried: {', '.join(names)}); install zfsutils-linux",
    )


class _Native:
    """The C calls with Python values in and out: one method per libzfs_core function.

    The public functions validate arguments and translate errors; this class
    only converts nvlists and calls. Unit tests replace it with a fake that
    has the same methods.
    """

    def __init__(self, ffi: cffi.FFI, lzc: Any, nvpair: Any) -> None:
        self._ffi = ffi
        self._lzc = lzc
        self._nv = NvlistCodec(ffi, nvpair)

    def has_function(self, name: str) -> bool:
        try:
            getattr(self._lzc, name)
        except AttributeError:
            return False
        return True

    def _flags(self, names: Iterable[str]) -> int:
        value = 0
        for name in names:
            value |= getattr(self._lzc, name)
        return value

    def _with_errlist(self, call: Callable[..., int], *args: Any) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_out() as out:
            ret = call(*args, out.ptr)
        return ret, out.value

    def create(self, name: bytes, ds_type: str, props: Mapping[bytes, Any], key: bytes) -> int:
        key_buf = self._ffi.from_buffer("uint8_t[]", key) if key else self._ffi.NULL
        with self._nv.nvlist_in(props) as nvl:
            return self._lzc.lzc_create(name, getattr(self._lzc, ds_type), nvl, key_buf, len(key))

    def snapshot(self, snaps: Mapping[bytes, Any], props: Mapping[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(snaps) as snaps_nvl, self._nv.nvlist_in(props) as props_nvl:
            return self._with_errlist(self._lzc.lzc_snapshot, snaps_nvl, props_nvl)

    def destroy_snaps(self, snaps: Mapping[bytes, Any], defer: bool) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(snaps) as snaps_nvl:
            return self._with_errlist(self._lzc.lzc_destroy_snaps, snaps_nvl, int(bool(defer)))

    def exists(self, name: bytes) -> bool:
        return bool(self._lzc.lzc_exists(name))

    def hold(self, holds: Mapping[bytes, Any], fd: int) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(holds) as holds_nvl:
            return self._with_errlist(self._lzc.lzc_hold, holds_nvl, fd)

    def release(self, holds: Mapping[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(holds) as holds_nvl:
            return self._with_errlist(self._lzc.lzc_release, holds_nvl)

    def get_holds(self, snapname: bytes) -> tuple[int, dict[bytes, Any]]:
        return self._with_errlist(self._lzc.lzc_get_holds, snapname)

    def bookmark(self, bookmarks: Mapping[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(bookmarks) as nvl:
            return self._with_errlist(self._lzc.lzc_bookmark, nvl)

    def get_bookmarks(self, fsname: bytes, props: Mapping[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(props) as nvl:
            return self._with_errlist(self._lzc.lzc_get_bookmarks, fsname, nvl)

    def destroy_bookmarks(self, bookmarks: Mapping[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(bookmarks) as nvl:
            return self._with_errlist(self._lzc.lzc_destroy_bookmarks, nvl)

    def send(self, snapname: bytes, fromsnap: bytes | None, fd: int, flags: list[str]) -> int:
        c_from = self._ffi.NULL if fromsnap is None else fromsnap
        return self._lzc.lzc_send(snapname, c_from, fd, self._flags(flags))

    def send_space(self, snapname: bytes, fromsnap: bytes | None, flags: list[str]) -> tuple[int, int]:
        c_from = self._ffi.NULL if fromsnap is None else fromsnap
        space = self._ffi.new("uint64_t *")
        ret = self._lzc.lzc_send_space(snapname, c_from, self._flags(flags), space)
        return ret, int(space[0])

    def receive(
        self, snapname: bytes, props: Mapping[bytes, Any], origin: bytes | None, force: bool, raw: bool, fd: int
    ) -> int:
        c_origin = self._ffi.NULL if origin is None else origin
        with self._nv.nvlist_in(props) as nvl:
            return self._lzc.lzc_receive(snapname, nvl, c_origin, int(bool(force)), int(bool(raw)), fd)

    def rollback(self, name: bytes) -> tuple[int, bytes]:
        buf = self._ffi.new("char[]", MAXNAMELEN + 1)  # + the terminating NUL
        ret = self._lzc.lzc_rollback(name, buf, MAXNAMELEN + 1)
        return ret, self._ffi.string(buf)

    def destroy(self, name: bytes) -> int:
        return self._lzc.lzc_destroy(name)

    def channel_program(
        self, function: str, pool: bytes, program: bytes, instrlimit: int, memlimit: int, args: Mapping[bytes, Any]
    ) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(args) as nvl:
            return self._with_errlist(getattr(self._lzc, function), pool, program, instrlimit, memlimit, nvl)


def _load() -> _Native:
    """Parse the header, dlopen both libraries, call libzfs_core_init(); raise ZFSInitializationFailed."""
    ffi = cffi.FFI()
    ffi.cdef(header_path().read_text(encoding="utf-8"))
    lzc = _dlopen(ffi, _candidates("zfs_core", _LZC_SONAMES))
    # libzfs_core links libnvpair, so this finds the copy that is already loaded.
    nvpair = _dlopen(ffi, _candidates("nvpair", _NVPAIR_SONAMES))
    ret = lzc.libzfs_core_init()
    if ret != 0:
        raise ZFSInitializationFailed(
            ret,
            f"libzfs_core_init() failed: {os.strerror(ret)}; is the zfs kernel module loaded "
            "(modprobe zfs) and /dev/zfs accessible (run as root)?",
        )
    return _Native(ffi, lzc, nvpair)


_backend: Any = None
"""The loaded :class:`_Native` (or a test's fake); None until the first call."""
_backend_lock = threading.Lock()


def _lib() -> Any:
    """The backend, loading it on first use; failures are not cached, so a later call retries."""
    global _backend
    backend = _backend
    if backend is None:
        with _backend_lock:
            if _backend is None:
                _backend = _load()
            backend = _backend
    return backend


# ---------------------------------------------------------------------------
# Names (the rules pyzfs uses to decide which exception an EINVAL or ENOENT means)

_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.: ")


def _c_name(name: Any) -> bytes:
    """A name argument for C: bytes as in pyzfs (TypeError otherwise) and without NUL bytes."""
    if not isinstance(name, bytes):
        raise TypeError(f"ZFS names are bytes, not {type(name).__name__}: {name!r}")
    if b"\0" in name:
        raise exc.NameInvalid(name)
    return name


def _pool_name(name: bytes) -> bytes:
    return re.split(rb"[/@#]", name, maxsplit=1)[0]


def _fs_name(name: bytes) -> bytes:
    return re.split(rb"[@#]", name, maxsplit=1)[0]


def _valid_component(component: bytes) -> bool:
    return bool(component) and all(ch in _NAME_CHARS for ch in component)


def _valid_fs_name(name: bytes) -> bool:
    return bool(name) and all(_valid_component(c) for c in name.split(b"/"))


def _valid_snap_name(name: bytes) -> bool:
    parts = name.split(b"@")
    return len(parts) == 2 and _valid_fs_name(parts[0]) and _valid_component(parts[1])


def _valid_bmark_name(name: bytes) -> bool:
    parts = name.split(b"#")
    return len(parts) == 2 and _valid_fs_name(parts[0]) and _valid_component(parts[1])


def _name_error(name: bytes, valid: bool, invalid_cls: type[exc.NameInvalid]) -> ZFSError | None:
    if not valid:
        return invalid_cls(name)
    if len(name) > MAXNAMELEN:
        return exc.NameTooLong(name)
    return None


def _check_fs_name(name: bytes) -> None:
    error = _name_error(name, _valid_fs_name(name), exc.FilesystemNameInvalid)
    if error is not None:
        raise error


def _check_snap_name(name: bytes) -> None:
    error = _name_error(name, _valid_snap_name(name), exc.SnapshotNameInvalid)
    if error is not None:
        raise error


def _raise_compound(
    ret: int,
    errlist: Mapping[bytes, Any],
    names: Iterable[bytes],
    failure: type[exc.MultipleOperationsFailure],
    mapper: Callable[[int, bytes | None], ZFSError],
) -> NoReturn:
    """Raise ``failure`` with one mapped error per ``errlist`` entry, or one for ``ret`` when it is empty.

    Without per-name errors the error is attributed to the only name, or to
    None when several were given (the kernel does not say which failed).
    """
    details = dict(errlist)
    suppressed = int(details.pop(b"N_MORE_ERRORS", 0))
    if details:
        errors = [mapper(err, name) for name, err in details.items()]
    else:
        name_list = list(names)
        errors = [mapper(ret, name_list[0] if len(name_list) == 1 else None)]
    raise failure(errors, suppressed)


def _send_flag_names(flags: Iterable[str] | None) -> list[str]:
    names = []
    for flag in flags or ():
        if flag not in _SEND_FLAGS:
            raise exc.UnknownStreamFeature(flag)
        names.append(_SEND_FLAGS[flag])
    return names


# ---------------------------------------------------------------------------
# The API


def lzc_create(
    name: bytes, ds_type: str = "zfs", props: Mapping[bytes, Any] | None = None, key: bytes | None = None
) -> None:
    """Create a file system (``ds_type="zfs"``) or a volume (``"zvol"``) with ``props``.

    Raises FilesystemExists, ParentNotFound, PropertyInvalid, NameInvalid,
    NameTooLong or WrongParent (the parent is a volume).
    """
    name = _c_name(name)
    if ds_type not in _DATASET_TYPES:
        raise exc.DatasetTypeInvalid(ds_type)  # type: ignore[arg-type]
    ret = _lib().create(name, _DATASET_TYPES[ds_type], props or {}, b"" if key is None else bytes(key))
    if ret == 0:
        return
    if ret == errno.EINVAL:
        _check_fs_name(name)
        raise exc.PropertyInvalid(name)
    if ret == errno.EEXIST:
        raise exc.FilesystemExists(name)
    if ret == errno.ENOENT:
        raise exc.ParentNotFound(name)
    if ret == ZFS_ERR_WRONG_PARENT:
        raise exc.WrongParent(_fs_name(name))
    if ret == ZFS_ERR_BADPROP:
        raise exc.PropertyInvalid(name)
    raise generic_error(ret, name, "Failed to create filesystem")


def lzc_snapshot(snaps: Iterable[bytes], props: Mapping[bytes, Any] | None = None) -> None:
    """Create all ``snaps`` atomically (one transaction group), with user ``props`` on each.

    All snapshots must be in one pool. On failure none is created and
    SnapshotFailure lists the reasons; the kernel names the snapshot only for
    SnapshotExists (and sometimes NameTooLong).
    """
    snaps = [_c_name(s) for s in snaps]
    ret, errlist = _lib().snapshot(dict.fromkeys(snaps), props or {})
    if ret == 0:
        return

    def mapper(err: int, name: bytes | None) -> ZFSError:
        if err == errno.EXDEV:
            pools = {_pool_name(s) for s in snaps}
            return exc.DuplicateSnapshots(name) if len(pools) <= 1 else exc.PoolsDiffer(name)
        if err == errno.EINVAL:
            if not all(_valid_snap_name(s) for s in snaps):
                return exc.NameInvalid(name)
            if any(len(s) > MAXNAMELEN for s in snaps):
                return exc.NameTooLong(name)
            return exc.PropertyInvalid(name)
        if err == errno.EEXIST:
            return exc.SnapshotExists(name)
        if err == errno.ENOENT:
            return exc.FilesystemNotFound(name)
        return generic_error(err, name, "Failed to create snapshot")

    _raise_compound(ret, errlist, snaps, exc.SnapshotFailure, mapper)


lzc_snap = lzc_snapshot


def lzc_destroy_snaps(snaps: Iterable[bytes], defer: bool) -> None:
    """Destroy ``snaps`` (one pool); missing ones are ignored.

    With ``defer=False`` a held or cloned snapshot fails the whole call
    (SnapshotDestructionFailure with SnapshotIsHeld / SnapshotIsCloned); with
    ``defer=True`` it is destroyed when its last hold or clone goes.
    """
    snaps = [_c_name(s) for s in snaps]
    ret, errlist = _lib().destroy_snaps(dict.fromkeys(snaps), defer)
    if ret == 0:
        return

    def mapper(err: int, name: bytes | None) -> ZFSError:
        if err == errno.EEXIST:
            return exc.SnapshotIsCloned(name)
        if err == errno.ENOENT:
            return exc.PoolNotFound(name)
        if err == errno.EBUSY:
            return exc.SnapshotIsHeld(name)
        return generic_error(err, name, "Failed to destroy snapshot")

    _raise_compound(ret, errlist, snaps, exc.SnapshotDestructionFailure, mapper)


def lzc_exists(name: bytes) -> bool:
    """Whether a file system, volume or snapshot exists (not for bookmarks)."""
    return _lib().exists(_c_name(name))


def lzc_hold(holds: Mapping[bytes, bytes], fd: int | None = None) -> list[bytes]:
    """Put user holds (snapshot -> tag) on snapshots of one pool; return the snapshots that do not exist.

    With ``fd`` (``os.open("/dev/zfs", os.O_EXCL)``) the holds go away when
    that descriptor is closed. On failure no hold is placed (HoldFailure;
    BadHoldCleanupFD for a bad ``fd``).
    """
    for snap in holds:
        _c_name(snap)
    ret, errlist = _lib().hold(holds, -1 if fd is None else fd)
    if ret != 0:
        if ret == errno.EBADF:
            raise exc.BadHoldCleanupFD()

        def mapper(err: int, name: bytes | None) -> ZFSError:
            if err == errno.EXDEV:
                return exc.PoolsDiffer(name)
            if err == errno.EINVAL:
                error = _batch_name_error(name, list(holds))
                if error is not None:
                    return error
            if err == errno.ENOENT:
                return exc.FilesystemNotFound(None if name is None else _fs_name(name))
            if err == errno.EEXIST:
                return exc.HoldExists(name)
            if err == errno.E2BIG:
                return exc.NameTooLong(None if name is None else holds[name])
            if err == errno.ENOTSUP:
                return exc.FeatureNotSupported(None if name is None else _pool_name(name))
            return generic_error(err, name, "Failed to hold snapshot")

        _raise_compound(ret, errlist, holds, exc.HoldFailure, mapper)
    return list(errlist)


def _batch_name_error(name: bytes | None, names: list[bytes]) -> ZFSError | None:
    """What an EINVAL from lzc_hold / lzc_release means, by pyzfs's rules (None: nothing specific)."""
    if name:
        if not _valid_snap_name(name):
            return exc.NameInvalid(name)
        if len(name) > MAXNAMELEN:
            return exc.NameTooLong(name)
        if any(_pool_name(n) != _pool_name(name) for n in names):
            return exc.PoolsDiffer(name)
        return None
    invalid = [n for n in names if not _valid_snap_name(n)]
    return exc.NameInvalid(invalid[0]) if invalid else None


def lzc_release(holds: Mapping[bytes, list[bytes]]) -> list[bytes]:
    """Release user holds (snapshot -> list of tags); return what did not exist.

    Missing snapshots are returned by name, missing tags as ``snapshot#tag``;
    neither fails the call. A snapshot marked for deferred destruction goes
    away with its last hold.
    """
    nested: dict[bytes, dict[bytes, None]] = {}
    for snap, tags in holds.items():
        if not isinstance(tags, list):
            raise TypeError("holds must be in a list")
        nested[_c_name(snap)] = dict.fromkeys(tags)
    ret, errlist = _lib().release(nested)
    if ret != 0:

        def mapper(err: int, name: bytes | None) -> ZFSError:
            if err == errno.EXDEV:
                return exc.PoolsDiffer(name)
            if err == errno.EINVAL:
                error = _batch_name_error(name, list(holds))
                if error is not None:
                    return error
            elif err == errno.ENOENT:
                return exc.HoldNotFound(name)
            elif err == errno.E2BIG and name is not None:
                return exc.NameTooLong(next((t for t in holds[name] if len(t) > MAXNAMELEN), name))
            elif err == errno.ENOTSUP:
                return exc.FeatureNotSupported(None if name is None else _pool_name(name))
            return generic_error(err, name, "Failed to release snapshot hold")

        _raise_compound(ret, errlist, holds, exc.HoldReleaseFailure, mapper)
    return list(errlist)


def lzc_get_holds(snapname: bytes) -> dict[bytes, int]:
    """The user holds on a snapshot: tag -> creation time (seconds since the epoch)."""
    ret, holds = _lib().get_holds(_c_name(snapname))
    if ret == 0:
        return holds
    if ret == errno.EINVAL:
        _check_snap_name(snapname)
    if ret == errno.ENOENT:
        raise exc.SnapshotNotFound(snapname)
    if ret == errno.ENOTSUP:
        raise exc.FeatureNotSupported(_pool_name(snapname))
    raise generic_error(ret, snapname, "Failed to get holds on snapshot")


def lzc_bookmark(bookmarks: Mapping[bytes, bytes]) -> None:
    """Create bookmarks (``fs#bmark`` -> ``fs@snap`` or an existing bookmark) in one pool, all or none."""
    for bmark in bookmarks:
        _c_name(bmark)
    ret, errlist = _lib().bookmark(bookmarks)
    if ret == 0:
        return

    def mapper(err: int, name: bytes | None) -> ZFSError:
        source = None if name is None else bookmarks.get(name)
        if err == errno.EINVAL:
            if name:
                error = _name_error(name, _valid_bmark_name(name), exc.BookmarkNameInvalid)
                if error is not None:
                    return error
                if source is not None and (
                    len(source) > MAXNAMELEN or not (_valid_snap_name(source) or _valid_bmark_name(source))
                ):
                    return exc.BookmarkSourceInvalid(source)
                if any(_pool_name(b) != _pool_name(name) for b in bookmarks):
                    return exc.PoolsDiffer(name)
            else:
                invalid = [b for b in bookmarks if not _valid_bmark_name(b)]
                if invalid:
                    return exc.BookmarkNameInvalid(invalid[0])
        if err == errno.EEXIST:
            return exc.BookmarkExists(name)
        if err == errno.ENOENT:
            return exc.SnapshotNotFound(name)
        if err == errno.ENOTSUP:
            return exc.BookmarkNotSupported(name)
        if err == ZFS_ERR_BOOKMARK_SOURCE_NOT_ANCESTOR:
            return exc.BookmarkMismatch(source)
        return generic_error(err, name, "Failed to create bookmark")

    _raise_compound(ret, errlist, bookmarks, exc.BookmarkFailure, mapper)


def lzc_get_bookmarks(fsname: bytes, props: Iterable[bytes] | None = None) -> dict[bytes, dict[bytes, Any]]:
    """The bookmarks of a file system: short name -> {property -> {b"value": ...}} for the asked ``props``.

    Valid properties are ``guid``, ``createtxg`` and ``creation`` (2.1 also
    knows ``redact_complete`` and ``redact_snaps``); others are ignored.
    """
    ret, bookmarks = _lib().get_bookmarks(_c_name(fsname), dict.fromkeys(props or ()))
    if ret == 0:
        return bookmarks
    if ret == errno.ENOENT:
        raise exc.FilesystemNotFound(fsname)
    raise generic_error(ret, fsname, "Failed to list bookmarks")


def lzc_destroy_bookmarks(bookmarks: Iterable[bytes]) -> None:
    """Destroy bookmarks (``fs#bmark``, one pool); missing ones are ignored."""
    names = [_c_name(b) for b in bookmarks]
    ret, errlist = _lib().destroy_bookmarks(dict.fromkeys(names))
    if ret == 0:
        return

    def mapper(err: int, name: bytes | None) -> ZFSError:
        if err == errno.EINVAL:
            return exc.NameInvalid(name)
        return generic_error(err, name, "Failed to destroy bookmark")

    _raise_compound(ret, errlist, names, exc.BookmarkDestructionFailure, mapper)


def lzc_send(snapname: bytes, fromsnap: bytes | None, fd: int, flags: Iterable[str] | None = None) -> None:
    """Write a send stream of ``snapname`` (incremental from ``fromsnap``, a snapshot or bookmark) to ``fd``.

    ``flags``: ``"embedded_data"``, ``"large_blocks"``, ``"compress"``,
    ``"raw"`` (``str``, as in pyzfs). Blocks until the stream is written; does
    not close ``fd``. The GIL is released meanwhile, so another thread can read
    a pipe's other end.
    """
    names = _send_flag_names(flags)
    snapname = _c_name(snapname)
    if fromsnap is not None:
        _c_name(fromsnap)
    ret = _lib().send(snapname, fromsnap, fd, names)
    if ret == 0:
        return
    _raise_send_error(ret, snapname, fromsnap, for_send=True)
    raise exc.StreamIOError(ret)


def _raise_send_error(ret: int, snapname: bytes, fromsnap: bytes | None, for_send: bool) -> None:
    """The translations lzc_send (``for_send``) and lzc_send_space share; returns when none applies.

    pyzfs is more lenient for lzc_send: there ``fromsnap`` may be a bookmark,
    ``snapname`` a file system, and ENAMETOOLONG names the longer argument.
    """

    def bad_from(name: bytes) -> bool:
        return not _valid_snap_name(name) and not (for_send and _valid_bmark_name(name))

    if ret == errno.EXDEV and fromsnap is not None:
        if _pool_name(fromsnap) != _pool_name(snapname):
            raise exc.PoolsDiffer(snapname)
        raise exc.SnapshotMismatch(snapname)
    if ret == errno.EINVAL:
        if fromsnap is not None and bad_from(fromsnap):
            raise exc.NameInvalid(fromsnap)
        if not _valid_snap_name(snapname) and not (for_send and _valid_fs_name(snapname)):
            raise exc.NameInvalid(snapname)
        if fromsnap is not None and len(fromsnap) > MAXNAMELEN:
            raise exc.NameTooLong(fromsnap)
        if len(snapname) > MAXNAMELEN:
            raise exc.NameTooLong(snapname)
        if fromsnap is not None and _pool_name(fromsnap) != _pool_name(snapname):
            raise exc.PoolsDiffer(snapname)
    if ret == errno.ENOENT:
        if fromsnap is not None and bad_from(fromsnap):
            raise exc.NameInvalid(fromsnap)
        raise exc.SnapshotNotFound(snapname)
    if ret == errno.ENAMETOOLONG and for_send:
        raise exc.NameTooLong(fromsnap if fromsnap is not None and len(fromsnap) > MAXNAMELEN else snapname)


def lzc_send_space(snapname: bytes, fromsnap: bytes | None = None, flags: Iterable[str] | None = None) -> int:
    """Estimated size in bytes of the stream :func:`lzc_send` would write."""
    names = _send_flag_names(flags)
    snapname = _c_name(snapname)
    if fromsnap is not None:
        _c_name(fromsnap)
    ret, space = _lib().send_space(snapname, fromsnap, names)
    if ret == 0:
        return space
    _raise_send_error(ret, snapname, fromsnap, for_send=False)
    raise generic_error(ret, snapname, "Failed to estimate backup stream size")


def lzc_receive(
    snapname: bytes,
    fd: int,
    force: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
) -> None:
    """Receive a stream from ``fd`` into the snapshot ``snapname`` (its file system is created for a full stream).

    ``force`` rolls the destination back (or replaces it) when needed; ``props``
    are set as received properties. Does not close ``fd``.
    """
    snapname = _c_name(snapname)
    if origin is not None:
        _c_name(origin)
    ret = _lib().receive(snapname, props or {}, origin, force, raw, fd)
    if ret == 0:
        return
    fs, pool = _fs_name(snapname), _pool_name(snapname)
    if ret == errno.EINVAL:
        if not _valid_snap_name(snapname) and not _valid_fs_name(snapname):
            raise exc.NameInvalid(snapname)
        if len(snapname) > MAXNAMELEN:
            raise exc.NameTooLong(snapname)
        if origin is not None and not _valid_snap_name(origin):
            raise exc.NameInvalid(origin)
        raise exc.BadStream()
    if ret == errno.ENOENT:
        raise exc.NameInvalid(snapname) if not _valid_snap_name(snapname) else exc.DatasetNotFound(snapname)
    simple: dict[int, Callable[[], ZFSError]] = {
        errno.EEXIST: lambda: exc.DatasetExists(snapname),
        errno.ENOTSUP: lambda: exc.StreamFeatureNotSupported(),
        errno.ENODEV: lambda: exc.StreamMismatch(fs),
        errno.ETXTBSY: lambda: exc.DestinationModified(fs),
        errno.EBUSY: lambda: exc.DatasetBusy(fs),
        errno.ENOSPC: lambda: exc.NoSpace(fs),
        errno.EDQUOT: lambda: exc.QuotaExceeded(fs),
        errno.ENAMETOOLONG: lambda: exc.NameTooLong(snapname),
        errno.EROFS: lambda: exc.ReadOnlyPool(pool),
        errno.EAGAIN: lambda: exc.SuspendedPool(pool),
        errno.EACCES: lambda: exc.EncryptionKeyNotLoaded(),
        ECKSUM: lambda: exc.BadStream(),
        ZFS_ERR_WRONG_PARENT: lambda: exc.WrongParent(fs),
        ZFS_ERR_STREAM_TRUNCATED: lambda: exc.StreamTruncated(),
        ZFS_ERR_BADPROP: lambda: exc.PropertyInvalid(snapname),
    }
    if ret in simple:
        raise simple[ret]()
    raise exc.StreamIOError(ret)


lzc_recv = lzc_receive


def lzc_rollback(name: bytes) -> bytes:
    """Roll a file system or volume back to its newest snapshot; return that snapshot's name."""
    ret, snapname = _lib().rollback(_c_name(name))
    if ret == 0:
        return snapname
    if ret == errno.ESRCH:
        raise exc.SnapshotNotFound(name)
    if ret == errno.EINVAL:
        _check_fs_name(name)
        raise exc.NameInvalid(name)
    if ret == errno.ENOENT:
        raise exc.FilesystemNotFound(name) if _valid_fs_name(name) else exc.NameInvalid(name)
    raise generic_error(ret, name, "Failed to rollback")


def lzc_destroy(name: bytes) -> None:
    """Destroy a file system or volume (it must have no snapshots or children)."""
    ret = _lib().destroy(_c_name(name))
    if ret == 0:
        return
    if ret == errno.EINVAL:
        _check_fs_name(name)
    if ret == errno.ENOENT:
        raise exc.FilesystemNotFound(name)
    raise generic_error(ret, name, "Failed to destroy dataset")


ZCP_DEFAULT_INSTRLIMIT = 10 * 1000 * 1000
"""Lua instructions a channel program may run by default (``zfs program -t``)."""
ZCP_DEFAULT_MEMLIMIT = 10 * 1024 * 1024
"""Bytes of memory a channel program may use by default (``zfs program -m``)."""


def lzc_channel_program(
    poolname: bytes,
    program: bytes,
    instrlimit: int = ZCP_DEFAULT_INSTRLIMIT,
    memlimit: int = ZCP_DEFAULT_MEMLIMIT,
    params: Any = None,
) -> Any:
    """Run the Lua ``program`` on pool ``poolname`` in syncing context: everything it changes (its
    ``zfs.sync.*`` calls) happens in one transaction group, or nothing does if it fails.

    ``params`` reaches the program as ``argv`` of its argument table; returns
    what the program returned (a Lua table becomes a dict), or None.
    """
    return _channel_program("lzc_channel_program", poolname, program, instrlimit, memlimit, params)


def lzc_channel_program_nosync(
    poolname: bytes,
    program: bytes,
    instrlimit: int = ZCP_DEFAULT_INSTRLIMIT,
    memlimit: int = ZCP_DEFAULT_MEMLIMIT,
    params: Any = None,
) -> Any:
    """:func:`lzc_channel_program` read-only, in open context: no txg is waited for, ``zfs.sync.*`` fails."""
    return _channel_program("lzc_channel_program_nosync", poolname, program, instrlimit, memlimit, params)


def _channel_program(
    function: str, poolname: bytes, program: bytes, instrlimit: int, memlimit: int, params: Any
) -> Any:
    ret, output = _lib().channel_program(
        function, _c_name(poolname), _c_string(program), instrlimit, memlimit, {b"argv": params}
    )
    if ret == 0:
        return output.get(b"return")
    error = output.get(b"error")
    simple: dict[int, Callable[[], ZFSError]] = {
        errno.ENOENT: lambda: exc.PoolNotFound(poolname),
        errno.ETIME: lambda: exc.ZCPTimeout(),
        errno.ENOMEM: lambda: exc.ZCPMemoryError(),
        errno.ENOSPC: lambda: exc.ZCPSpaceError(),
        errno.EPERM: lambda: exc.ZCPPermissionError(),
        errno.ECHRNG: lambda: exc.ZCPRuntimeError(error),
        errno.EINVAL: lambda: exc.ZCPLimitInvalid() if error is None else exc.ZCPSyntaxError(error),
    }
    if ret in simple:
        raise simple[ret]()
    raise generic_error(ret, poolname, "Failed to execute channel program")


def _c_string(value: Any) -> bytes:
    """A bytes argument that C reads up to its first NUL (so it must hold none)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, not {type(value).__name__}")
    if b"\0" in value:
        raise ValueError("embedded NUL byte")
    return value


def is_supported(func: Callable[..., Any]) -> bool:
    """Whether the loaded libzfs_core has the C function behind ``func`` (one of this module's ``lzc_*``)."""
    fname = func.__name__
    if fname not in globals():
        raise ValueError(fname + " is not from libzfs_core")
    if not callable(func):
        raise ValueError(fname + " is not a function")
    if not fname.startswith("lzc_"):
        raise ValueError(fname + " is not a libzfs_core API function")
    return _lib().has_function(fname)
