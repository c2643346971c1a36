"""A pyzfs-compatible ``libzfs_core`` binding: cffi in ABI mode, no compiler at install time.

The functions below have the names, argument order, defaults, return values
and exceptions of OpenZFS's pyzfs ``libzfs_core`` module (2.1-2.3; where
pyzfs 2.1 and 2.3 differ, as 2.3 does), so code written against one runs on
the other::

    from zfsbackd.zfs import libzfs_core as lzc
    lzc.lzc_snapshot([b"tank/home@zfsbackd-backup-0123"], {b"zfsbackd:backup-id": b"backup-0123"})
    lzc.lzc_hold({b"tank/home@zfsbackd-backup-0123": b"zfsbackd"})

Surface: every name that pyzfs 2.3's package exports (its ``__all__``:
``lzc_*``, ``is_supported``, ``receive_header``, ``MAXNAMELEN``,
``WRAPPING_KEY_LEN``, the ``ZCP_DEFAULT_*`` limits, the ``zfs_key_location``,
``zfs_keyformat`` and ``zio_encrypt`` enums, and the ``exceptions`` and
``ctypes`` namespaces), which is 2.1's plus ``lzc_receive_with_heal``. Names
that only pyzfs's private module has are here too where its own functions need
them (``lzc_inherit``, ``lzc_set_prop``, ``lzc_list``). pyzfs binds nothing
else of the C library (no lzc_trim, lzc_initialize, lzc_wait*, lzc_redact,
lzc_*_bootenv), so neither does this module.

Support detection, as in pyzfs: functions pyzfs marks "uncommitted" check
:func:`is_supported` on every call and raise ``NotImplementedError`` (with the
C function's name) when the loaded libzfs_core lacks their symbol, e.g.
``lzc_receive_with_heal`` on OpenZFS 2.1. ``is_supported(func)`` looks up the
C symbol named ``func.__name__`` in the library that was actually loaded
(cffi resolves declared functions lazily, so a missing one is an
AttributeError, i.e. False); for the functions pyzfs builds on ``lzc_list``
it asks about ``lzc_list``. Those, ``lzc_inherit_prop`` and ``lzc_set_props``
wrap ClusterHQ extensions that no OpenZFS release exports: they raise
NotImplementedError on every OpenZFS, in pyzfs and here.

``lzc.exceptions`` and ``lzc.ctypes`` are attributes, not submodules:
``lzc.ctypes.int32_t(5)`` works, ``from ...libzfs_core.ctypes import
int32_t`` does not (import :mod:`zfsbackd.zfs.c_types` for that).

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
- where pyzfs's own ``lzc_list`` would fail on its ``str`` option keys
  (TypeError, only on a library that has lzc_list), the shim raises the same
  TypeError without first leaking a pipe;
- a compound error's ``N_MORE_ERRORS`` entry becomes ``suppressed_count``
  instead of a bogus per-name error, an unexpected EINVAL from ``lzc_release``
  gives an error object instead of ``None`` in ``errors``, and ``lzc_bookmark``
  failing for several bookmarks at once no longer raises ``KeyError``.
"""

from __future__ import annotations

import ctypes.util as _ctypes_util
import errno
import functools
import importlib.resources
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import cffi

from . import c_types as ctypes
from . import exceptions
from . import exceptions as exc
from ._nvlist import NvlistCodec
from .exceptions import (
    ECKSUM,
    ZFS_ERR_BADPROP,
    ZFS_ERR_BOOKMARK_SOURCE_NOT_ANCESTOR,
    ZFS_ERR_CHECKPOINT_EXISTS,
    ZFS_ERR_DEVRM_IN_PROGRESS,
    ZFS_ERR_DISCARDING_CHECKPOINT,
    ZFS_ERR_NO_CHECKPOINT,
    ZFS_ERR_RAIDZ_EXPAND_IN_PROGRESS,
    ZFS_ERR_STREAM_TRUNCATED,
    ZFS_ERR_VDEV_TOO_BIG,
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

_CRYPT_COMMANDS = {
    "new_key": "DCP_CMD_NEW_KEY",
    "inherit": "DCP_CMD_INHERIT",
    "force_new_key": "DCP_CMD_FORCE_NEW_KEY",
    "force_inherit": "DCP_CMD_FORCE_INHERIT",
}
"""pyzfs's ``crypt_cmd`` names for lzc_change_key -> enumerators of ``dcp_cmd_t`` in the header."""

# The names pyzfs 2.3's package exports (its __init__.__all__).
__all__ = [
    "MAXNAMELEN",
    "WRAPPING_KEY_LEN",
    "ZCP_DEFAULT_INSTRLIMIT",
    "ZCP_DEFAULT_MEMLIMIT",
    "ctypes",
    "exceptions",
    "is_supported",
    "lzc_bookmark",
    "lzc_change_key",
    "lzc_channel_program",
    "lzc_channel_program_nosync",
    "lzc_clone",
    "lzc_create",
    "lzc_destroy",
    "lzc_destroy_bookmarks",
    "lzc_destroy_snaps",
    "lzc_exists",
    "lzc_get_bookmarks",
    "lzc_get_holds",
    "lzc_get_props",
    "lzc_hold",
    "lzc_inherit_prop",
    "lzc_list_children",
    "lzc_list_snaps",
    "lzc_load_key",
    "lzc_pool_checkpoint",
    "lzc_pool_checkpoint_discard",
    "lzc_promote",
    "lzc_receive",
    "lzc_receive_one",
    "lzc_receive_resumable",
    "lzc_receive_with_cmdprops",
    "lzc_receive_with_header",
    "lzc_receive_with_heal",
    "lzc_recv",
    "lzc_release",
    "lzc_rename",
    "lzc_reopen",
    "lzc_rollback",
    "lzc_rollback_to",
    "lzc_send",
    "lzc_send_resume",
    "lzc_send_space",
    "lzc_set_props",
    "lzc_snap",
    "lzc_snaprange_space",
    "lzc_snapshot",
    "lzc_sync",
    "lzc_unload_key",
    "receive_header",
    "zfs_key_location",
    "zfs_keyformat",
    "zio_encrypt",
]


def _enum(*names: str) -> type:
    """A class with one int attribute per name, 0, 1, ... (pyzfs's ``_constants.enum``)."""
    return type("Enum", (), {name: value for value, name in enumerate(names)})


WRAPPING_KEY_LEN = 32
"""Bytes of a raw wrapping key (``keyformat=raw``)."""
zfs_key_location = _enum("ZFS_KEYLOCATION_NONE", "ZFS_KEYLOCATION_PROMPT", "ZFS_KEYLOCATION_URI")
zfs_keyformat = _enum("ZFS_KEYFORMAT_NONE", "ZFS_KEYFORMAT_RAW", "ZFS_KEYFORMAT_HEX", "ZFS_KEYFORMAT_PASSPHRASE")
zio_encrypt = _enum(
    "ZIO_CRYPT_INHERIT",
    "ZIO_CRYPT_ON",
    "ZIO_CRYPT_OFF",
    "ZIO_CRYPT_AES_128_CCM",
    "ZIO_CRYPT_AES_192_CCM",
    "ZIO_CRYPT_AES_256_CCM",
    "ZIO_CRYPT_AES_128_GCM",
    "ZIO_CRYPT_AES_192_GCM",
    "ZIO_CRYPT_AES_256_GCM",
)


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
    found = _ctypes_util.find_library(short_name)
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


@dataclass
class ReceiveOptions:
    """The optional arguments of the lzc_receive* family, with pyzfs's defaults and order.

    None for ``props``, ``cmdprops`` or ``key`` means none, as in pyzfs; after
    construction they are a dict and bytes.
    """

    force: bool = False
    resumable: bool = False
    raw: bool = False
    origin: bytes | None = None
    props: Mapping[bytes, Any] | None = None
    cmdprops: Mapping[bytes, Any] | None = None
    key: bytes | None = None
    cleanup_fd: int = -1
    action_handle: int | None = 0
    corrective: bool = True

    def __post_init__(self) -> None:
        self.props = self.props or {}
        self.cmdprops = self.cmdprops or {}
        self.key = b"" if self.key is None else bytes(self.key)


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

    def _with_uint64(self, call: Callable[..., int], *args: Any) -> tuple[int, int]:
        value = self._ffi.new("uint64_t *")
        ret = call(*args, value)
        return ret, int(value[0])

    def _optional(self, name: bytes | None) -> Any:
        return self._ffi.NULL if name is None else name

    def _key(self, key: bytes) -> Any:
        """A key buffer as pyzfs passes it: never NULL, also when empty."""
        return self._ffi.from_buffer("uint8_t[]", key)

    def plain(self, function: str, *args: Any) -> int:
        """Call a C function whose arguments are all strings or integers (None passes NULL)."""
        return getattr(self._lzc, function)(*(self._ffi.NULL if arg is None else arg for arg in args))

    def clone(self, name: bytes, origin: bytes, props: Mapping[bytes, Any]) -> int:
        with self._nv.nvlist_in(props) as nvl:
            return self._lzc.lzc_clone(name, origin, nvl)

    def snaprange_space(self, firstsnap: bytes, lastsnap: bytes) -> tuple[int, int]:
        return self._with_uint64(self._lzc.lzc_snaprange_space, firstsnap, lastsnap)

    def load_key(self, name: bytes, noop: bool, key: bytes) -> int:
        return self._lzc.lzc_load_key(name, int(bool(noop)), self._key(key), len(key))

    def change_key(self, name: bytes, command: str, props: Mapping[bytes, Any], key: bytes) -> int:
        with self._nv.nvlist_in(props) as nvl:
            return self._lzc.lzc_change_key(name, getattr(self._lzc, command), nvl, self._key(key), len(key))

    def sync(self, poolname: bytes, args: Mapping[bytes, Any]) -> int:
        with self._nv.nvlist_in(args) as nvl:
            return self._with_errlist(self._lzc.lzc_sync, poolname, nvl)[0]

    def inherit(self, name: bytes, prop: bytes) -> int:
        return self._lzc.lzc_inherit(name, prop, self._ffi.NULL)

    def set_props(self, name: bytes, props: Mapping[bytes, Any]) -> int:
        with self._nv.nvlist_in(props) as nvl:
            return self._lzc.lzc_set_props(name, nvl, self._ffi.NULL, self._ffi.NULL)

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
        return self._lzc.lzc_send(snapname, self._optional(fromsnap), fd, self._flags(flags))

    def send_space(self, snapname: bytes, fromsnap: bytes | None, flags: list[str]) -> tuple[int, int]:
        return self._with_uint64(self._lzc.lzc_send_space, snapname, self._optional(fromsnap), self._flags(flags))

    def send_resume(
        self, snapname: bytes, fromsnap: bytes | None, fd: int, flags: list[str], resumeobj: int, resumeoff: int
    ) -> int:
        c_from = self._optional(fromsnap)
        return self._lzc.lzc_send_resume(snapname, c_from, fd, self._flags(flags), resumeobj, resumeoff)

    def receive(self, function: str, snapname: bytes, fd: int, opts: ReceiveOptions) -> int:
        """lzc_receive or lzc_receive_resumable (the same arguments)."""
        with self._nv.nvlist_in(opts.props) as nvl:
            return getattr(self._lzc, function)(
                snapname, nvl, self._optional(opts.origin), int(bool(opts.force)), int(bool(opts.raw)), fd
            )

    def receive_with_header(self, snapname: bytes, fd: int, record: Any, opts: ReceiveOptions) -> int:
        with self._nv.nvlist_in(opts.props) as nvl:
            return self._lzc.lzc_receive_with_header(
                snapname,
                nvl,
                self._optional(opts.origin),
                int(bool(opts.force)),
                int(bool(opts.resumable)),
                int(bool(opts.raw)),
                fd,
                record,
            )

    def receive_one(
        self, function: str, snapname: bytes, fd: int, record: Any, opts: ReceiveOptions
    ) -> tuple[int, int, dict[bytes, Any]]:
        """lzc_receive_one, lzc_receive_with_cmdprops or lzc_receive_with_heal: (ret, bytes read, property errors).

        The three share their tail of arguments; with_cmdprops adds command-line
        properties and a key after the properties, with_heal also ``corrective``.
        """
        ffi = self._ffi
        read_bytes, errflags = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        handle = ffi.NULL if opts.action_handle is None else ffi.new("uint64_t *")
        flags = [int(bool(opts.force))]
        if function == "lzc_receive_with_heal":
            flags.append(int(bool(opts.corrective)))
        flags += [int(bool(opts.resumable)), int(bool(opts.raw))]
        with self._nv.nvlist_in(opts.props) as props, self._nv.nvlist_in(opts.cmdprops) as cmdprops:
            head: list[Any] = [snapname, props]
            if function != "lzc_receive_one":
                head += [cmdprops, self._key(opts.key), len(opts.key)]
            args = [*head, self._optional(opts.origin), *flags, fd, record, opts.cleanup_fd, read_bytes, errflags]
            ret, errors = self._with_errlist(getattr(self._lzc, function), *args, handle)
        return ret, int(read_bytes[0]), errors

    def rollback(self, name: bytes) -> tuple[int, bytes]:
        buf = self._ffi.new("char[]", MAXNAMELEN + 1)  # + the terminating NUL
        ret = self._lzc.lzc_rollback(name, buf, MAXNAMELEN + 1)
        return ret, self._ffi.string(buf)

    def channel_program(
        self, function: str, pool: bytes, program: bytes, instrlimit: int, memlimit: int, args: Mapping[bytes, Any]
    ) -> tuple[int, dict[bytes, Any]]:
        with self._nv.nvlist_in(args) as nvl:
            return self._with_errlist(getattr(self._lzc, function), pool, program, instrlimit, memlimit, nvl)


@functools.cache
def _ffi() -> cffi.FFI:
    """The parsed header, once per process (receive_header needs its types without loading a library)."""
    ffi = cffi.FFI()
    ffi.cdef(header_path().read_text(encoding="utf-8"))
    return ffi


def _load() -> _Native:
    """dlopen both libraries, call libzfs_core_init(); raise ZFSInitializationFailed."""
    ffi = _ffi()
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


def _c_optional_name(name: Any) -> None:
    """Check an optional name argument (an origin or incremental source) as :func:`_c_name` does."""
    if name is not None:
        _c_name(name)


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


def _check_fs_or_snap_name(name: bytes) -> None:
    error = _name_error(name, _valid_fs_name(name) or _valid_snap_name(name), exc.NameInvalid)
    if error is not None:
        raise error


def _checked(check: Callable[[bytes], None], name: bytes, error: ZFSError) -> ZFSError:
    """``error``, once ``check`` passed for ``name``: pyzfs blames a bad name first, then the rest."""
    check(name)
    return error


def _raise_for(ret: int, name: bytes, message: str, specific: Mapping[int, Callable[[], ZFSError]]) -> None:
    """Raise the error ``specific`` builds for ``ret``, else pyzfs's generic one; return on success."""
    if ret == 0:
        return
    if ret in specific:
        raise specific[ret]()
    raise generic_error(ret, name, message)


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
    _c_optional_name(fromsnap)
    ret = _lib().send(snapname, fromsnap, fd, names)
    if ret == 0:
        return
    _raise_send_error(ret, snapname, fromsnap, for_send=True)
    raise exc.StreamIOError(ret)


def lzc_send_resume(
    snapname: bytes,
    fromsnap: bytes | None,
    fd: int,
    flags: Iterable[str] | None = None,
    resumeobj: int = 0,
    resumeoff: int = 0,
) -> None:
    """:func:`lzc_send` from object ``resumeobj`` at offset ``resumeoff`` on: the rest of an interrupted
    stream, with the position from the receiving side's ``receive_resume_token``."""
    names = _send_flag_names(flags)
    snapname = _c_name(snapname)
    _c_optional_name(fromsnap)
    ret = _lib().send_resume(snapname, fromsnap, fd, names, resumeobj, resumeoff)
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
    _c_optional_name(fromsnap)
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
    _receive("lzc_receive", snapname, fd, ReceiveOptions(force=force, raw=raw, origin=origin, props=props))


def lzc_receive_resumable(
    snapname: bytes,
    fd: int,
    force: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
) -> None:
    """:func:`lzc_receive` that, when the stream ends early, keeps what arrived so that
    :func:`lzc_send_resume` can continue it (the ``receive_resume_token`` property says from where)."""
    _receive("lzc_receive_resumable", snapname, fd, ReceiveOptions(force=force, raw=raw, origin=origin, props=props))


def _receive(function: str, snapname: bytes, fd: int, opts: ReceiveOptions) -> None:
    snapname = _c_name(snapname)
    _c_optional_name(opts.origin)
    _raise_receive_error(_lib().receive(function, snapname, fd, opts), snapname, opts.origin)


def _raise_receive_error(ret: int, snapname: bytes, origin: bytes | None) -> None:
    """pyzfs's translation for every lzc_receive* (lzc_receive_translate_errors); returns on success."""
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


def receive_header(fd: int) -> tuple[dict[str, Any], Any]:
    """Read a stream's begin record from ``fd``: (its ``drr_begin`` fields as a dict, the record).

    The record goes to :func:`lzc_receive_with_header`, :func:`lzc_receive_one`,
    :func:`lzc_receive_with_cmdprops` or :func:`lzc_receive_with_heal`, which
    read the rest of the stream from the same ``fd``. Needs no ZFS: only the
    header's types. A short read raises ValueError, as in pyzfs.
    """
    ffi = _ffi()
    record = ffi.new("dmu_replay_record_t *")
    ffi.buffer(record)[:] = os.read(fd, ffi.sizeof(record[0]))
    begin = record.drr_u.drr_begin
    header: dict[str, Any] = {}
    for name, descr in ffi.typeof(begin).fields:
        if descr.type.kind in ("primitive", "enum"):
            header[name] = getattr(begin, name)
        elif descr.type.kind == "array" and descr.type.item.cname == "char":
            header[name] = ffi.string(getattr(begin, name))
        else:
            raise TypeError("Unexpected field type in drr_begin: " + str(descr.type))
    return header, record


def lzc_receive_with_header(
    snapname: bytes,
    fd: int,
    begin_record: Any,
    force: bool = False,
    resumable: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
) -> None:
    """:func:`lzc_receive` of a stream whose begin record :func:`receive_header` already read from ``fd``."""
    snapname = _c_name(snapname)
    _c_optional_name(origin)
    opts = ReceiveOptions(force, resumable, raw, origin, props)
    _raise_receive_error(_lib().receive_with_header(snapname, fd, begin_record, opts), snapname, origin)


def _uncommitted(depends_on: Callable[..., Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function whose C function not every libzfs_core has: calling it raises NotImplementedError then.

    As in pyzfs, the wrapper keeps the C function's name (``__name__``), which
    is what :func:`is_supported` looks up; ``depends_on`` names another
    function of this module whose support decides instead.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if not is_supported(checked):
                raise NotImplementedError(func.__name__)
            return func(*args, **kwargs)

        if depends_on is not None:
            checked._check_func = depends_on  # type: ignore[attr-defined]
        return checked

    return decorate


@_uncommitted()
def lzc_receive_one(
    snapname: bytes,
    fd: int,
    begin_record: Any,
    force: bool = False,
    resumable: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
    cleanup_fd: int = -1,
    action_handle: int | None = 0,
) -> tuple[int, int | None]:
    """:func:`lzc_receive_with_header` that also reports property errors and returns (bytes read, action_handle).

    Properties the kernel refused raise ReceivePropertyFailure although the
    stream itself was received. As in pyzfs, the returned ``action_handle``
    is the one passed in, not the kernel's.
    """
    opts = ReceiveOptions(force, resumable, raw, origin, props, cleanup_fd=cleanup_fd, action_handle=action_handle)
    return _receive_one("lzc_receive_one", snapname, fd, begin_record, opts)


@_uncommitted()
def lzc_receive_with_cmdprops(
    snapname: bytes,
    fd: int,
    begin_record: Any,
    force: bool = False,
    resumable: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
    cmdprops: Mapping[bytes, Any] | None = None,
    key: bytes | None = None,
    cleanup_fd: int = -1,
    action_handle: int | None = 0,
) -> tuple[int, int | None]:
    """:func:`lzc_receive_one` with ``cmdprops`` (set locally, as ``zfs receive -o``; a bool value means
    ``-x``, inherit) and the wrapping ``key`` of an encrypted stream."""
    opts = ReceiveOptions(force, resumable, raw, origin, props, cmdprops, key, cleanup_fd, action_handle)
    return _receive_one("lzc_receive_with_cmdprops", snapname, fd, begin_record, opts)


@_uncommitted()
def lzc_receive_with_heal(
    snapname: bytes,
    fd: int,
    begin_record: Any,
    force: bool = False,
    corrective: bool = True,
    resumable: bool = False,
    raw: bool = False,
    origin: bytes | None = None,
    props: Mapping[bytes, Any] | None = None,
    cmdprops: Mapping[bytes, Any] | None = None,
    key: bytes | None = None,
    cleanup_fd: int = -1,
    action_handle: int | None = 0,
) -> tuple[int, int | None]:
    """:func:`lzc_receive_with_cmdprops` that, with ``corrective``, repairs damaged blocks of an existing
    snapshot from the stream instead of creating one (``zfs receive -c``; OpenZFS 2.2+)."""
    opts = ReceiveOptions(force, resumable, raw, origin, props, cmdprops, key, cleanup_fd, action_handle, corrective)
    return _receive_one("lzc_receive_with_heal", snapname, fd, begin_record, opts)


def _receive_one(
    function: str, snapname: bytes, fd: int, begin_record: Any, opts: ReceiveOptions
) -> tuple[int, int | None]:
    snapname = _c_name(snapname)
    _c_optional_name(opts.origin)
    ret, read_bytes, properrs = _lib().receive_one(function, snapname, fd, begin_record, opts)
    if ret == 0 and properrs:

        def mapper(err: int, name: bytes | None) -> ZFSError:
            if err in (errno.EINVAL, ZFS_ERR_BADPROP):
                return exc.PropertyInvalid(name)
            return generic_error(err, name, "Failed to set property")

        _raise_compound(errno.EINVAL, properrs, [snapname], exc.ReceivePropertyFailure, mapper)
    _raise_receive_error(ret, snapname, opts.origin)
    return read_bytes, opts.action_handle


lzc_recv = lzc_receive


def lzc_rollback(name: bytes) -> bytes:
    """Roll a file system or volume back to its newest snapshot; return that snapshot's name."""
    ret, snapname = _lib().rollback(_c_name(name))
    _raise_rollback_error(ret, name)
    return snapname


def _raise_rollback_error(ret: int, name: bytes) -> None:
    _raise_for(
        ret,
        name,
        "Failed to rollback",
        {
            errno.ESRCH: lambda: exc.SnapshotNotFound(name),
            errno.EINVAL: lambda: _checked(_check_fs_name, name, exc.NameInvalid(name)),
            errno.ENOENT: lambda: exc.FilesystemNotFound(name) if _valid_fs_name(name) else exc.NameInvalid(name),
        },
    )


def lzc_destroy(name: bytes) -> None:
    """Destroy a file system or volume (it must have no snapshots or children)."""
    ret = _lib().plain("lzc_destroy", _c_name(name))
    failed = "Failed to destroy dataset"
    _raise_for(
        ret,
        name,
        failed,
        {
            errno.EINVAL: lambda: _checked(_check_fs_name, name, generic_error(ret, name, failed)),
            errno.ENOENT: lambda: exc.FilesystemNotFound(name),
        },
    )


def lzc_clone(name: bytes, origin: bytes, props: Mapping[bytes, Any] | None = None) -> None:
    """Create the file system or volume ``name`` as a clone of the snapshot ``origin``, with ``props``.

    DatasetNotFound can mean a missing parent or a missing origin (the kernel
    does not say which).
    """
    ret = _lib().clone(_c_name(name), _c_name(origin), props or {})

    def invalid() -> ZFSError:
        _check_fs_name(name)
        _check_snap_name(origin)
        return exc.PropertyInvalid(name)

    def missing() -> ZFSError:
        return exc.SnapshotNameInvalid(origin) if not _valid_snap_name(origin) else exc.DatasetNotFound(name)

    _raise_for(
        ret,
        name,
        "Failed to create clone",
        {
            errno.EINVAL: invalid,
            errno.EXDEV: lambda: exc.PoolsDiffer(name),
            errno.EEXIST: lambda: exc.FilesystemExists(name),
            errno.ENOENT: missing,
        },
    )


@_uncommitted()
def lzc_promote(name: bytes) -> None:
    """Make the clone ``name`` independent of its origin (the origin's older snapshots move to it)."""
    ret = _lib().plain("lzc_promote", _c_name(name), None, 0)
    _raise_for(
        ret,
        name,
        "Failed to promote dataset",
        {
            errno.EINVAL: lambda: _checked(_check_fs_name, name, exc.NotClone(name)),
            errno.ENOTSOCK: lambda: exc.NotClone(name),
            errno.ENOENT: lambda: exc.FilesystemNotFound(name),
            errno.EEXIST: lambda: exc.SnapshotExists(name),
        },
    )


def lzc_rename(source: bytes, target: bytes) -> None:
    """Rename a file system or volume within its pool (``target``'s parent must exist)."""
    ret = _lib().plain("lzc_rename", _c_name(source), _c_name(target))
    failed = "Failed to rename dataset"

    def invalid() -> ZFSError:
        _check_fs_name(source)
        _check_fs_name(target)
        if _pool_name(source) != _pool_name(target):
            return exc.PoolsDiffer(source)
        return generic_error(ret, source, failed)

    _raise_for(
        ret,
        source,
        failed,
        {
            errno.EINVAL: invalid,
            errno.EEXIST: lambda: exc.FilesystemExists(target),
            errno.ENOENT: lambda: exc.FilesystemNotFound(source),
            ZFS_ERR_WRONG_PARENT: lambda: exc.WrongParent(target),
        },
    )


def lzc_rollback_to(name: bytes, snap: bytes) -> None:
    """Roll ``name`` back to ``snap``, which must be its newest snapshot (else SnapshotNotLatest)."""
    ret = _lib().plain("lzc_rollback_to", _c_name(name), _c_name(snap))
    if ret == errno.EEXIST:
        raise exc.SnapshotNotLatest(snap)
    _raise_rollback_error(ret, name)


def lzc_snaprange_space(firstsnap: bytes, lastsnap: bytes) -> int:
    """Bytes that destroying the snapshots from ``firstsnap`` to ``lastsnap`` (inclusive) would free."""
    ret, space = _lib().snaprange_space(_c_name(firstsnap), _c_name(lastsnap))
    if ret == 0:
        return space
    if ret == errno.EXDEV:
        raise (
            exc.PoolsDiffer(lastsnap)
            if _pool_name(firstsnap) != _pool_name(lastsnap)
            else exc.SnapshotMismatch(lastsnap)
        )
    if ret == errno.EINVAL:
        for name in (firstsnap, lastsnap):
            if not _valid_snap_name(name):
                raise exc.NameInvalid(name)
        for name in (firstsnap, lastsnap):
            if len(name) > MAXNAMELEN:
                raise exc.NameTooLong(name)
        if _pool_name(firstsnap) != _pool_name(lastsnap):
            raise exc.PoolsDiffer(lastsnap)
        raise exc.SnapshotMismatch(lastsnap)
    if ret == errno.ENOENT:
        raise exc.SnapshotNotFound(lastsnap)
    raise generic_error(ret, lastsnap, "Failed to calculate space used by range of snapshots")


# ---- encryption keys


def _key_errors(name: bytes, **more: Callable[[], ZFSError]) -> dict[int, Callable[[], ZFSError]]:
    """What the key functions share: EINVAL is a bad name or property, ENOENT a missing file system."""
    return {
        errno.EINVAL: lambda: _checked(_check_fs_name, name, exc.PropertyInvalid(name)),
        errno.ENOENT: lambda: exc.FilesystemNotFound(name),
        **{getattr(errno, code): factory for code, factory in more.items()},
    }


@_uncommitted()
def lzc_load_key(fsname: bytes, noop: bool, key: bytes) -> None:
    """Load the wrapping ``key`` of an encrypted file system (with ``noop``, only check that it is right)."""
    ret = _lib().load_key(_c_name(fsname), noop, key)
    failed = "Failed to load encryption key" if noop else "Failed to verify encryption key"
    errors = _key_errors(fsname, EACCES=exc.EncryptionKeyInvalid, EEXIST=exc.EncryptionKeyAlreadyLoaded)
    _raise_for(ret, fsname, failed, errors)


@_uncommitted()
def lzc_unload_key(fsname: bytes) -> None:
    """Unload the wrapping key of an encrypted file system (it must not be mounted)."""
    ret = _lib().plain("lzc_unload_key", _c_name(fsname))
    _raise_for(ret, fsname, "Failed to unload encryption key", _key_errors(fsname, EACCES=exc.EncryptionKeyNotLoaded))


@_uncommitted()
def lzc_change_key(
    fsname: bytes, crypt_cmd: str, props: Mapping[bytes, Any] | None = None, key: bytes | None = None
) -> None:
    """Change how an encrypted file system's key is wrapped.

    ``crypt_cmd``: ``"new_key"`` (``key`` and ``props`` such as keyformat and
    keylocation), ``"inherit"`` (use the parent's), or their ``"force_"``
    variants. The current key must be loaded (EncryptionKeyNotLoaded).
    """
    key = b"" if key is None else bytes(key)
    if crypt_cmd not in _CRYPT_COMMANDS:
        raise exc.UnknownCryptCommand(crypt_cmd)  # type: ignore[arg-type]
    ret = _lib().change_key(_c_name(fsname), _CRYPT_COMMANDS[crypt_cmd], props or {}, key)
    _raise_for(ret, fsname, "Failed to change encryption key", _key_errors(fsname, EACCES=exc.EncryptionKeyNotLoaded))


# ---- pools


@_uncommitted()
def lzc_sync(poolname: bytes, force: bool = False) -> None:
    """Wait until the pool's current transaction group is on disk (``force``: end it now, even if idle)."""
    ret = _lib().sync(_c_name(poolname), {b"force": force})
    _raise_for(ret, poolname, "Failed to sync pool", {errno.ENOENT: lambda: exc.PoolNotFound(poolname)})


@_uncommitted()
def lzc_reopen(poolname: bytes, restart: bool = True) -> None:
    """Reopen the pool's vdevs (``zpool reopen``); ``restart`` restarts a running scrub."""
    ret = _lib().plain("lzc_reopen", _c_name(poolname), int(bool(restart)))
    _raise_for(ret, poolname, "Failed to reopen pool", {errno.ENOENT: lambda: exc.PoolNotFound(poolname)})


@_uncommitted()
def lzc_pool_checkpoint(name: bytes) -> None:
    """Checkpoint the pool (``zpool checkpoint``): one rewind point for the whole pool."""
    _raise_checkpoint_error(_lib().plain("lzc_pool_checkpoint", _c_name(name)), name, "create")


@_uncommitted()
def lzc_pool_checkpoint_discard(name: bytes) -> None:
    """Discard the pool's checkpoint (``zpool checkpoint -d``); the space is freed in the background."""
    _raise_checkpoint_error(_lib().plain("lzc_pool_checkpoint_discard", _c_name(name)), name, "discard")


def _raise_checkpoint_error(ret: int, name: bytes, verb: str) -> None:
    _raise_for(
        ret,
        name,
        f"Failed to {verb} pool checkpoint",
        {
            errno.ENOENT: lambda: exc.PoolNotFound(name),
            ZFS_ERR_CHECKPOINT_EXISTS: exc.CheckpointExists,
            ZFS_ERR_NO_CHECKPOINT: exc.CheckpointNotFound,
            ZFS_ERR_DISCARDING_CHECKPOINT: exc.CheckpointDiscarding,
            ZFS_ERR_DEVRM_IN_PROGRESS: exc.DeviceRemovalRunning,
            ZFS_ERR_VDEV_TOO_BIG: exc.DeviceTooBig,
            ZFS_ERR_RAIDZ_EXPAND_IN_PROGRESS: exc.RaidzExpansionRunning,
        },
    )


# ---- ClusterHQ's property and listing extensions
#
# pyzfs wraps three C functions that only ClusterHQ's fork of ZFS had
# (lzc_inherit, lzc_set_props, lzc_list): no OpenZFS release exports them, so
# on OpenZFS every function below raises NotImplementedError and is_supported
# says False, in pyzfs and here alike.


@_uncommitted()
def lzc_inherit(name: bytes, prop: bytes) -> None:
    """Reset the property ``prop`` of ``name`` so that it is inherited (a user property is removed)."""
    ret = _lib().inherit(_c_name(name), _c_string(prop))
    _raise_for(
        ret,
        name,
        "Failed to inherit a property",
        {
            errno.EINVAL: lambda: _checked(_check_fs_name, name, exc.PropertyInvalid(prop)),
            errno.ENOENT: lambda: exc.DatasetNotFound(name),
        },
    )


lzc_inherit_prop = lzc_inherit


@_uncommitted()
def lzc_set_props(name: bytes, prop: bytes, val: Any) -> None:
    """Set one property of a dataset or snapshot (despite the plural: pyzfs's signature)."""
    ret = _lib().set_props(_c_name(name), {prop: val})
    _raise_for(
        ret,
        name,
        "Failed to set a property",
        {
            errno.EINVAL: lambda: _checked(_check_fs_or_snap_name, name, exc.PropertyInvalid(prop)),
            errno.ENOENT: lambda: exc.DatasetNotFound(name),
        },
    )


lzc_set_prop = lzc_set_props


@_uncommitted()
def lzc_list(name: bytes, options: Mapping[bytes, Any]) -> NoReturn:
    """ClusterHQ's listing call. Where the C function exists, pyzfs still cannot call it: it adds the
    option ``'fd'`` as a ``str`` key, which its own nvlist layer refuses with this TypeError."""
    raise TypeError("Unsupported key type str")


@_uncommitted(lzc_list)
def lzc_get_props(name: bytes) -> NoReturn:
    """pyzfs's property listing through :func:`lzc_list` (not 2.3's C lzc_get_props, which pyzfs does not use)."""
    lzc_list(name, {})


@_uncommitted(lzc_list)
def lzc_list_children(name: bytes) -> Iterator[bytes]:
    """The child file systems and volumes of ``name``, through :func:`lzc_list`."""
    lzc_list(name, {})


@_uncommitted(lzc_list)
def lzc_list_snaps(name: bytes) -> Iterator[bytes]:
    """The snapshots of ``name``, through :func:`lzc_list`."""
    lzc_list(name, {})


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
    """Whether the loaded libzfs_core has the C function behind ``func`` (one of this module's ``lzc_*``).

    The C function is the one named by ``func.__name__`` (an alias such as
    lzc_inherit_prop keeps its original's name), or for the functions built on
    lzc_list that one's; the answer is whether that symbol resolves in the
    loaded library.
    """
    fname = func.__name__
    if fname not in globals():
        raise ValueError(fname + " is not from libzfs_core")
    if not callable(func):
        raise ValueError(fname + " is not a function")
    if not fname.startswith("lzc_"):
        raise ValueError(fname + " is not a libzfs_core API function")
    check_func = getattr(func, "_check_func", None)
    if check_func is not None:
        return is_supported(check_func)
    return _lib().has_function(fname)
