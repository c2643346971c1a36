"""Build the object store a configured region names."""

from __future__ import annotations

from zfsbackd.config import LocalRegion, Region, S3Region
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.local import LocalObjectStore


def open_object_store(region: Region) -> ObjectStore:
    """A local directory or an S3 bucket; nothing is contacted until the first request."""
    if isinstance(region, LocalRegion):
        return LocalObjectStore(region.path)
    if isinstance(region, S3Region):
        # Imported here so that local-only use does not pay for importing boto3.
        from zfsbackd.objectstore.s3 import S3ObjectStore

        return S3ObjectStore(region)
    raise TypeError(f"unknown region type {type(region).__name__}")
