"""``state_dir``: made on first use, and refused with a clear error when this process cannot use it.

Everything a process keeps between runs lives there (locks, the host id, the
index, record and tree caches, the stores it knows). A directory owned by
another user, on a read-only or full file system, used to surface as a
``PermissionError`` deep inside whichever of those was touched first; every
such failure now becomes one :class:`StateDirUnusable` that names the
directory, the user and the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from zfsbackd.errors import StateDirUnusable


def ensure_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (0700) if missing; raise StateDirUnusable unless this process can write it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise unusable(state_dir, exc) from exc
    if not state_dir.is_dir():
        raise StateDirUnusable(f"state_dir {state_dir} is not a directory; point state_dir at a directory")
    if not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK):
        raise unusable(state_dir, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(state_dir)))


def unusable(state_dir: Path, exc: OSError) -> StateDirUnusable:
    """The classified error for an OSError met while using ``state_dir`` (or a file in it)."""
    where = exc.filename or state_dir
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            f"run zfsbackd as the user that owns it (uid {_owner(state_dir)}; this process runs as uid "
            f"{os.geteuid()}), e.g. with sudo, or set state_dir to a directory this user can write"
        )
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on its file system"
    elif exc.errno == errno.EROFS:
        fix = "mount its file system read-write, or set state_dir to a writable directory"
    else:
        fix = "check the directory and its file system"
    return StateDirUnusable(f"state_dir {state_dir} cannot be used ({where}: {exc.strerror or exc}); {fix}")


def _owner(state_dir: Path) -> str:
    for path in (state_dir, *state_dir.parents):
        try:
            return str(path.stat().st_uid)
        except OSError:
            continue
    return "unknown"
