"""Build the object store a configured region names."""

from __future__ import annotations

from zfsbackd.config import LocalRegion, Region
from zfsbackd.errors import StoreError
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.local import LocalObjectStore


def open_object_store(region: Region) -> ObjectStore:
    if isinstance(region, LocalRegion):
        return LocalObjectStore(region.path)
    raise StoreError(
        f"regions.{region.name}: type s3 is not supported by this version of zfsbackd yet; use a `type: local` region"
    )
