"""Fixtures for the tests that run inside the zfsvm VM against real OpenZFS.

Run them with ``scripts/zfsvm-tests.sh``. Elsewhere (no /dev/zfs, not root)
every test here is skipped. One pool on a sparse file vdev in /var/tmp serves
the whole session; each test works below its own dataset.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from zfsvm_util import sh

HAVE_ZFS = Path("/dev/zfs").exists() and os.geteuid() == 0 and shutil.which("zpool") is not None


@pytest.fixture(scope="session", autouse=True)
def _require_zfs() -> None:
    """Session-scoped so that it runs before the session's pool fixture."""
    if not HAVE_ZFS:
        pytest.skip("needs real OpenZFS as root: run scripts/zfsvm-tests.sh")


@pytest.fixture(scope="session")
def pool() -> Iterator[str]:
    """A fresh pool on a 1 GiB sparse file, destroyed after the session."""
    name = "zbt" + uuid.uuid4().hex[:8]
    vdev = Path("/var/tmp") / f"{name}.img"
    with vdev.open("wb") as f:
        f.truncate(1 << 30)
    sh("zpool", "create", "-f", "-O", "xattr=on", "-O", "atime=off", name, str(vdev))
    try:
        yield name
    finally:
        sh("zpool", "destroy", "-f", name, check=False)
        vdev.unlink(missing_ok=True)


@pytest.fixture
def dataset(pool: str, request: pytest.FixtureRequest) -> str:
    """An empty file system ``POOL/<test name>``, mounted at /POOL/<test name>."""
    name = f"{pool}/{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)[:80]}"
    sh("zfs", "create", name)
    return name


@pytest.fixture(scope="session")
def shim() -> ModuleType:
    from zfsbackd.zfs import libzfs_core

    return libzfs_core


@pytest.fixture(scope="session")
def pyzfs() -> ModuleType:
    """Debian's python3-pyzfs: the reference implementation (from the system site-packages)."""
    try:
        import libzfs_core
    except ImportError:
        pytest.skip("python3-pyzfs is not installed (the venv needs --system-site-packages)")
    return libzfs_core
