"""zfsbackd: snapshot backups of ZFS, btrfs and XFS file systems to object storage.

The version is written once, in pyproject.toml; an installed zfsbackd (the
Debian package's venv, pip, pipx) reads it from its distribution metadata. A
checkout run without installing (``PYTHONPATH=.``) has no metadata, and reads
pyproject.toml next to the package instead, so that even then the one place is
the only place.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path


def _version() -> str:
    try:
        return metadata.version("zfsbackd")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
