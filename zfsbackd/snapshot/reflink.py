"""Per-file reflink clones on XFS (reflink=1) and btrfs directories that are not subvolumes.

Each file is cloned (``FICLONE``) into an ``O_TMPFILE`` when the archiver opens it:
the clone shares extents with the original, costs no data copy, and is immune to
later writes, so every file is read at one point in time. The tree as a whole is
not (``atomic = False``). An ``O_TMPFILE`` has no name, so nothing ever appears in
the user's tree, and the kernel frees it when the fd closes — even after a crash.
"""

from __future__ import annotations

import errno
import fcntl
import os

from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot.base import (
    BTRFS_MAGIC,
    NO_SPACE_ERRNOS,
    XFS_MAGIC,
    FileChangedError,
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
    fs_type,
    fs_type_name,
    no_space_error,
    read_only_error,
    same_version,
    snapshot_name,
    source_dir,
)

FICLONE = 0x40049409
CLONE_ATTEMPTS = 5
#: files up to this size are read directly (one pread, stat checked before and after) instead of cloned
DIRECT_READ_MAX = 1024 * 1024
_TMPFILE_FLAGS = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
# Clone failures after which the file is read live instead: btrfs refuses to clone
# between nodatacow (chattr +C) and normal files (EINVAL); a file on another file
# system mounted inside the tree gives EXDEV; a source that filled up since the
# snapshot was taken (its probe clone worked) has no room for the clone's inode or
# metadata (ENOSPC, EDQUOT) — failing the backup for want of an optimisation would
# be worse than reading the file live, with ``changed()`` watching it.
_CANNOT_CLONE_THIS_FILE = frozenset({errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP} | NO_SPACE_ERRNOS)


def reflink_probe(dir_fd: int) -> OSError | None:
    """Clone one byte between two nameless temporary files in *dir_fd*; None if that works."""
    fds: list[int] = []
    try:
        fds.append(os.open(".", _TMPFILE_FLAGS, 0o600, dir_fd=dir_fd))
        os.write(fds[0], b"z")
        fds.append(os.open(".", _TMPFILE_FLAGS, 0o600, dir_fd=dir_fd))
        fcntl.ioctl(fds[1], FICLONE, fds[0])
    except OSError as exc:
        return exc
    finally:
        for fd in fds:
            os.close(fd)
    return None


def reflink_problem(path: os.PathLike[str] | str, *, fs_id: str) -> str | None:
    """Why *path* cannot use reflink clones, or None if it can.

    A full file system fails the probe too, but that is no reason to pick another
    provider (or to tell the administrator to move the data): it raises the
    :class:`SnapshotError` of :func:`no_space_error` instead.
    """
    ftype = fs_type(path)
    if ftype not in (XFS_MAGIC, BTRFS_MAGIC):
        return fs_type_name(ftype)
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        err = reflink_probe(dir_fd)
    finally:
        os.close(dir_fd)
    if err is None:
        return None
    if err.errno in NO_SPACE_ERRNOS:
        raise no_space_error(fs_id, path, "take a reflink snapshot (a test clone failed)")
    if err.errno == errno.EROFS:
        # Not a reason to fall back to a copy (allow_copy_snapshots): the file system can clone,
        # it is only not writable here, most often because of the unit's sandbox; say how to fix that.
        raise read_only_error(fs_id, path, "take a reflink snapshot (clones are made on the source file system)")
    hint = " (created without reflink=1)" if ftype == XFS_MAGIC and err.errno == errno.EOPNOTSUPP else ""
    return f"{fs_type_name(ftype)} without working reflink{hint}: {err.strerror}"


class ReflinkSnapshot(Snapshot):
    provider = "reflink"
    atomic = False

    def open_file(self, relpath: bytes) -> FrozenFile:
        """Clone the file and return the clone; the stat is the original's, taken after cloning.

        Files up to ``DIRECT_READ_MAX`` are returned live instead: they are read in
        one ``pread``, and ``changed()`` (size, mtime, ctime before and after) tells
        the archiver to read again if one moved meanwhile. Cloning them would cost
        more than reading them (a clone is a new inode, outside the page cache:
        50,000 small files took 21.7 s cloned and read, 0.8 s read directly).

        The clone is retried while the source's (size, mtime, ctime) moves during the
        clone, so content and metadata always agree; a file that keeps changing raises
        :class:`FileChangedError`. A file that cannot be cloned at all is returned live,
        and its ``changed()`` then tells whether it moved while being read.
        """
        src, st = self._open_regular(relpath)
        if st.st_size <= DIRECT_READ_MAX:
            return FrozenFile(src, st, live=True)
        try:
            for _ in range(CLONE_ATTEMPTS):
                tmp = -1
                try:
                    tmp = os.open(".", _TMPFILE_FLAGS, 0o600, dir_fd=self._root_fd)
                    fcntl.ioctl(tmp, FICLONE, src)
                    after = os.fstat(src)
                except OSError as exc:
                    if tmp >= 0:
                        os.close(tmp)
                    if exc.errno in _CANNOT_CLONE_THIS_FILE:
                        live = FrozenFile(src, st, live=True)
                        src = -1  # owned by the FrozenFile now
                        return live
                    raise
                if same_version(st, after):
                    return FrozenFile(tmp, after, live=False, clone=True)
                os.close(tmp)
                st = after
            why = f"kept changing during {CLONE_ATTEMPTS} clone attempts"
            raise FileChangedError(errno.EAGAIN, why, self._display_path(relpath))
        finally:
            if src >= 0:
                os.close(src)


class ReflinkProvider(SnapshotProvider):
    name = "reflink"

    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        """A view of the live source; files are cloned one by one as they are opened."""
        src = source_dir(fs)
        problem = reflink_problem(src, fs_id=fs.id)
        if problem is not None:
            raise SnapshotError(f"file_systems[{fs.id}]: cannot use reflink clones for {src}: it is on {problem}")
        return ReflinkSnapshot(snapshot_name(backup_id), src)

    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        """Nothing to find: a reflink snapshot is a fresh view of the live source, taken anew (with its
        hooks) on every attempt. Returning one here would skip the hooks of a first attempt too."""
        return None
