"""Shared pytest fixtures: real loop-mounted XFS and btrfs file systems (root required)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemonkit import DaemonProcess
from fsfixtures import FsKind, LoopFs, btrfs_subvolume, make_loop_fs, remove_tree

LOOP_FS_MIB = 1024


def _loop_fs(
    kind: FsKind, tool: str, tmp_path_factory: pytest.TempPathFactory, size_mib: int = LOOP_FS_MIB
) -> Iterator[LoopFs]:
    if os.geteuid() != 0:
        pytest.skip("loop-mounted file systems need root")
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    fs = make_loop_fs(kind, size_mib, tmp_path_factory.mktemp(kind) / "mnt")
    try:
        yield fs
    finally:
        fs.cleanup()


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Every test starts with structlog's defaults: one that configures logging (``main()`` run in-process
    sets WARNING) would otherwise hide INFO events from a later test's ``capture_logs``."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def xfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    """A 1 GiB XFS (reflink=1) mounted for the whole session."""
    yield from _loop_fs("xfs", "mkfs.xfs", tmp_path_factory)


@pytest.fixture(scope="session")
def btrfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    """A 1 GiB btrfs mounted for the whole session."""
    yield from _loop_fs("btrfs", "mkfs.btrfs", tmp_path_factory)


@pytest.fixture(scope="session")
def ext4_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    """A 64 MiB ext4 (no reflinks, no snapshots) mounted for the whole session."""
    yield from _loop_fs("ext4", "mkfs.ext4", tmp_path_factory, size_mib=64)


def _unique_name(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60] + "-" + uuid.uuid4().hex[:8]


@pytest.fixture
def xfs_dir(xfs_fs: LoopFs, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty directory on the session's XFS, removed afterwards."""
    path = xfs_fs.mountpoint / _unique_name(request)
    path.mkdir()
    yield path
    remove_tree(path)


@pytest.fixture
def btrfs_subvol(btrfs_fs: LoopFs, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty subvolume on the session's btrfs, removed (with nested subvolumes) afterwards."""
    path = btrfs_subvolume(btrfs_fs.mountpoint / _unique_name(request))
    yield path
    remove_tree(path)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemon processes a test starts; each is stopped (and its logs kept) afterwards."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.close()
