"""The exception classes of OpenZFS's pyzfs ``libzfs_core.exceptions``, same names and hierarchy.

Code written against pyzfs catches these by name (``except SnapshotExists``,
``except HoldFailure as e: e.errors``), so the shim must raise the same classes
with the same ``errno``, ``message`` and ``name`` attributes, and render them
the same way (``[Errno 17] Snapshot already exists: 'pool/fs@snap'``).

Every class of pyzfs 2.3 is defined, with its errno and message (2.1's are the
same minus RaidzExpansionRunning).

Deliberate differences from pyzfs 2.1-2.3, each a pyzfs bug that would lose
information:

- :class:`ZFSGenericError` gets ``name`` and ``message`` the right way round
  (pyzfs swaps them when it builds one for an unexpected errno).
- :class:`ZFSInitializationFailed` accepts an optional message, so that "the
  library is not installed" says which files were tried and what to install.
"""

from __future__ import annotations

import errno

# errno values that pyzfs takes from its _constants module (Linux values).
ECKSUM = errno.EBADE
"""ZFS reports checksum errors (e.g. a corrupt send stream) as EBADE on Linux."""

ZFS_ERR_BASE = 1024
"""OpenZFS's own error codes (``zfs_errno_t``) start here; the order is fixed across 2.1-2.3."""
ZFS_ERR_CHECKPOINT_EXISTS = ZFS_ERR_BASE
ZFS_ERR_DISCARDING_CHECKPOINT = ZFS_ERR_BASE + 1
ZFS_ERR_NO_CHECKPOINT = ZFS_ERR_BASE + 2
ZFS_ERR_DEVRM_IN_PROGRESS = ZFS_ERR_BASE + 3
ZFS_ERR_VDEV_TOO_BIG = ZFS_ERR_BASE + 4
ZFS_ERR_WRONG_PARENT = ZFS_ERR_BASE + 9
ZFS_ERR_BOOKMARK_SOURCE_NOT_ANCESTOR = ZFS_ERR_BASE + 15
ZFS_ERR_STREAM_TRUNCATED = ZFS_ERR_BASE + 16
ZFS_ERR_BADPROP = ZFS_ERR_BASE + 20
ZFS_ERR_RAIDZ_EXPAND_IN_PROGRESS = ZFS_ERR_BASE + 25
"""2.3 (raidz expansion); pyzfs 2.3 knows it, 2.1 has no such code."""


class ZFSError(Exception):
    """Base of every libzfs_core error: ``errno``, ``message`` and the ``name`` it concerns (or None)."""

    errno: int | None = None
    message: str | None = None
    name: bytes | None = None

    def __str__(self) -> str:
        # pyzfs formats with "%s", so a bytes name prints as b'pool/fs' inside the quotes.
        if self.name is not None:
            return "[Errno %d] %s: '%s'" % (self.errno, self.message, self.name)  # noqa: UP031
        return "[Errno %d] %s" % (self.errno, self.message)  # noqa: UP031

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.errno!r}, {self.message!r})"


class ZFSGenericError(ZFSError):
    """An errno that has no more specific class for the operation that failed."""

    def __init__(self, errno: int, name: bytes | None, message: str) -> None:
        self.errno = errno
        self.message = message
        self.name = name


class ZFSInitializationFailed(ZFSError):
    """libzfs_core could not be loaded or initialised (not installed, module not loaded, no /dev/zfs)."""

    message = "Failed to initialize libzfs_core"

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        if message is not None:
            self.message = message


class MultipleOperationsFailure(ZFSError):
    """A batch operation failed; ``errors`` holds one exception per failed item (at least one).

    ``errno`` is the first error's; ``suppressed_count`` is how many more the
    kernel reported without details (its ``N_MORE_ERRORS`` entry).
    """

    def __init__(self, errors: list[ZFSError], suppressed_count: int) -> None:
        self.errno = errors[0].errno
        self.errors = errors
        self.suppressed_count = suppressed_count

    def __str__(self) -> str:
        return f"{ZFSError.__str__(self)}, {len(self.errors)} errors included, {self.suppressed_count} suppressed"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.errno!r}, {self.message!r}, errors={self.errors!r}, "
            f"suppressed={self.suppressed_count!r})"
        )


class _NamedError(ZFSError):
    """An error about one dataset, snapshot, bookmark, hold or pool given by ``name``."""

    def __init__(self, name: bytes | None) -> None:
        self.name = name


class DatasetNotFound(_NamedError):
    """A snapshot or a file system is missing and the kernel does not say which."""

    errno = errno.ENOENT
    message = "Dataset not found"


class DatasetExists(_NamedError):
    """A snapshot or a file system already exists and the kernel does not say which."""

    errno = errno.EEXIST
    message = "Dataset already exists"


class NotClone(_NamedError):
    errno = errno.EINVAL
    message = "Filesystem is not a clone, can not promote"


class FilesystemExists(DatasetExists):
    message = "Filesystem already exists"


class FilesystemNotFound(DatasetNotFound):
    message = "Filesystem not found"


class ParentNotFound(_NamedError):
    errno = errno.ENOENT
    message = "Parent not found"


class WrongParent(_NamedError):
    errno = ZFS_ERR_WRONG_PARENT
    message = "Parent dataset is not a filesystem"


class SnapshotExists(DatasetExists):
    message = "Snapshot already exists"


class SnapshotNotFound(DatasetNotFound):
    message = "Snapshot not found"


class SnapshotNotLatest(_NamedError):
    errno = errno.EEXIST
    message = "Snapshot is not the latest"


class SnapshotIsCloned(_NamedError):
    errno = errno.EEXIST
    message = "Snapshot is cloned"


class SnapshotIsHeld(_NamedError):
    errno = errno.EBUSY
    message = "Snapshot is held"


class DuplicateSnapshots(_NamedError):
    errno = errno.EXDEV
    message = "Requested multiple snapshots of the same filesystem"


class SnapshotFailure(MultipleOperationsFailure):
    message = "Creation of snapshot(s) failed for one or more reasons"


class SnapshotDestructionFailure(MultipleOperationsFailure):
    message = "Destruction of snapshot(s) failed for one or more reasons"


class BookmarkExists(_NamedError):
    errno = errno.EEXIST
    message = "Bookmark already exists"


class BookmarkNotFound(_NamedError):
    errno = errno.ENOENT
    message = "Bookmark not found"


class BookmarkMismatch(_NamedError):
    errno = errno.EINVAL
    message = "source is not an ancestor of the new bookmark's dataset"


class BookmarkSourceInvalid(_NamedError):
    errno = errno.EINVAL
    message = "Bookmark source is not a valid snapshot or existing bookmark"


class BookmarkNotSupported(_NamedError):
    errno = errno.ENOTSUP
    message = "Bookmark feature is not supported"


class BookmarkFailure(MultipleOperationsFailure):
    message = "Creation of bookmark(s) failed for one or more reasons"


class BookmarkDestructionFailure(MultipleOperationsFailure):
    message = "Destruction of bookmark(s) failed for one or more reasons"


class BadHoldCleanupFD(ZFSError):
    errno = errno.EBADF
    message = "Bad file descriptor as cleanup file descriptor"


class HoldExists(_NamedError):
    errno = errno.EEXIST
    message = "Hold with a given tag already exists on snapshot"


class HoldNotFound(_NamedError):
    errno = errno.ENOENT
    message = "Hold with a given tag does not exist on snapshot"


class HoldFailure(MultipleOperationsFailure):
    message = "Placement of hold(s) failed for one or more reasons"


class HoldReleaseFailure(MultipleOperationsFailure):
    message = "Release of hold(s) failed for one or more reasons"


class SnapshotMismatch(_NamedError):
    errno = errno.ENODEV
    message = "Snapshot is not descendant of source snapshot"


class StreamMismatch(_NamedError):
    errno = errno.ENODEV
    message = "Stream is not applicable to destination dataset"


class DestinationModified(_NamedError):
    errno = errno.ETXTBSY
    message = "Destination dataset has modifications that can not be undone"


class BadStream(ZFSError):
    errno = ECKSUM
    message = "Bad backup stream"


class StreamFeatureNotSupported(ZFSError):
    errno = errno.ENOTSUP
    message = "Stream contains unsupported feature"


class UnknownStreamFeature(ZFSError):
    """Raised as ``UnknownStreamFeature(flag)``: the flag is in ``args``, ``name`` stays None (as in pyzfs)."""

    errno = errno.ENOTSUP
    message = "Unknown feature requested for stream"


class StreamFeatureInvalid(ZFSError):
    errno = errno.EINVAL
    message = "Kernel modules must be upgraded to receive this stream"


class StreamFeatureIncompatible(ZFSError):
    errno = errno.EINVAL
    message = "Incompatible embedded feature with encrypted receive"


class StreamTruncated(ZFSError):
    errno = ZFS_ERR_STREAM_TRUNCATED
    message = "incomplete stream"


class ReceivePropertyFailure(MultipleOperationsFailure):
    """The stream was received but some of its properties were not set; ``errors`` has one per property."""

    message = "Receiving of properties failed for one or more reasons"


class StreamIOError(ZFSError):
    """Reading or writing the stream's file descriptor failed (``errno`` says why)."""

    message = "I/O error while writing or reading stream"

    def __init__(self, errno: int) -> None:
        self.errno = errno


class ZIOError(_NamedError):
    errno = errno.EIO
    message = "I/O error"


class NoSpace(_NamedError):
    errno = errno.ENOSPC
    message = "No space left"


class QuotaExceeded(_NamedError):
    errno = errno.EDQUOT
    message = "Quota exceeded"


class DatasetBusy(_NamedError):
    errno = errno.EBUSY
    message = "Dataset is busy"


class NameTooLong(_NamedError):
    errno = errno.ENAMETOOLONG
    message = "Dataset name is too long"


class NameInvalid(_NamedError):
    errno = errno.EINVAL
    message = "Invalid name"


class SnapshotNameInvalid(NameInvalid):
    message = "Invalid name for snapshot"


class FilesystemNameInvalid(NameInvalid):
    message = "Invalid name for filesystem or volume"


class BookmarkNameInvalid(NameInvalid):
    message = "Invalid name for bookmark"


class ReadOnlyPool(_NamedError):
    errno = errno.EROFS
    message = "Pool is read-only"


class SuspendedPool(_NamedError):
    errno = errno.EAGAIN
    message = "Pool is suspended"


class PoolNotFound(_NamedError):
    errno = errno.EXDEV
    message = "No such pool"


class PoolsDiffer(_NamedError):
    errno = errno.EXDEV
    message = "Source and target belong to different pools"


class FeatureNotSupported(_NamedError):
    errno = errno.ENOTSUP
    message = "Feature is not supported in this version"


class PropertyNotSupported(_NamedError):
    errno = errno.ENOTSUP
    message = "Property is not supported in this version"


class PropertyInvalid(_NamedError):
    errno = errno.EINVAL
    message = "Invalid property or property value"


class DatasetTypeInvalid(_NamedError):
    errno = errno.EINVAL
    message = "Specified dataset type is unknown"


class UnknownCryptCommand(_NamedError):
    """Raised as ``UnknownCryptCommand(crypt_cmd)``: the ``name`` is the unknown command (a ``str``)."""

    errno = errno.EINVAL
    message = "Specified crypt command is invalid"


class EncryptionKeyNotLoaded(ZFSError):
    """The key must be loaded first (lzc_receive: pyzfs 2.3; pyzfs 2.1 raised StreamIOError(EACCES) there)."""

    errno = errno.EACCES
    message = "Encryption key is not currently loaded"


class EncryptionKeyAlreadyLoaded(ZFSError):
    errno = errno.EEXIST
    message = "Encryption key is already loaded"


class EncryptionKeyInvalid(ZFSError):
    errno = errno.EACCES
    message = "Incorrect encryption key provided"


class CheckpointExists(ZFSError):
    errno = ZFS_ERR_CHECKPOINT_EXISTS
    message = "Pool already has a checkpoint"


class CheckpointNotFound(ZFSError):
    errno = ZFS_ERR_NO_CHECKPOINT
    message = "Pool does not have a checkpoint"


class CheckpointDiscarding(ZFSError):
    errno = ZFS_ERR_DISCARDING_CHECKPOINT
    message = "Pool checkpoint is being discarded"


class DeviceRemovalRunning(ZFSError):
    errno = ZFS_ERR_DEVRM_IN_PROGRESS
    message = "A vdev is currently being removed"


class DeviceTooBig(ZFSError):
    errno = ZFS_ERR_VDEV_TOO_BIG
    message = "One or more top-level vdevs exceed the maximum vdev size"


class RaidzExpansionRunning(ZFSError):
    errno = ZFS_ERR_RAIDZ_EXPAND_IN_PROGRESS
    message = "A raidz device is currently expanding"


# pyzfs's fallback for an errno an operation does not expect: these classes
# are used whatever the operation, everything else becomes ZFSGenericError.
_BY_ERRNO: dict[int, type[_NamedError]] = {
    cls.errno: cls  # type: ignore[misc]
    for cls in (
        ZIOError,
        NoSpace,
        QuotaExceeded,
        DatasetBusy,
        NameTooLong,
        ReadOnlyPool,
        SuspendedPool,
        PoolsDiffer,
        PropertyNotSupported,
    )
}


def generic_error(err: int, name: bytes | None, message: str) -> ZFSError:
    """The exception for an errno that the failed operation has no special meaning for."""
    cls = _BY_ERRNO.get(err)
    if cls is not None:
        return cls(name)
    return ZFSGenericError(err, name, message)


class ZCPError(ZFSError):
    """A channel program (``lzc_channel_program``) failed; the subclass says how."""

    errno: int | None = None
    message: str | None = None


class _ZCPDetailedError(ZCPError):
    """A channel-program failure the kernel explains: Lua's message is kept in ``details``."""

    def __init__(self, details: bytes | None) -> None:
        self.details = details


class ZCPSyntaxError(_ZCPDetailedError):
    errno = errno.EINVAL
    message = "Channel program contains syntax errors"


class ZCPRuntimeError(_ZCPDetailedError):
    errno = errno.ECHRNG
    message = "Channel programs encountered a runtime error"


class ZCPLimitInvalid(ZCPError):
    errno = errno.EINVAL
    message = "Channel program called with invalid limits"


class ZCPTimeout(ZCPError):
    errno = errno.ETIME
    message = "Channel program timed out"


class ZCPSpaceError(ZCPError):
    errno = errno.ENOSPC
    message = "Channel program exhausted the memory limit"


class ZCPMemoryError(ZCPError):
    errno = errno.ENOMEM
    message = "Channel program return value too large"


class ZCPPermissionError(ZCPError):
    errno = errno.EPERM
    message = "Channel programs must be run as root"
