"""Build the object store a configured region names."""

from __future__ import annotations

from zfsbackd.config import LocalRegion, Region, S3Region
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.local import LocalObjectStore

#: The store's ``config`` object (zfsbackd.store.repository.CONFIG_KEY): a local directory without it no
#: longer holds the store, so no directories are created in it (see LocalObjectStore).
STORE_MARKER = "config"


def open_object_store(region: Region, *, create_root: bool = False) -> ObjectStore:
    """A local directory or an S3 bucket; nothing is contacted until the first request.

    ``create_root`` creates a local region's directory (``zfsbackd store init`` only); buckets are never
    created.
    """
    if isinstance(region, LocalRegion):
        return LocalObjectStore(region.path, region=region.name, create=create_root, store_marker=STORE_MARKER)
    if isinstance(region, S3Region):
        # Imported here so that local-only use does not pay for importing boto3.
        from zfsbackd.objectstore.s3 import S3ObjectStore

        return S3ObjectStore(region)
    raise TypeError(f"unknown region type {type(region).__name__}")
