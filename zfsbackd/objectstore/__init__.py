"""Object-store backends: the small interface every store format operation is built on."""

from zfsbackd.objectstore.base import ObjectInfo, ObjectStore, ObjectStoreMetrics
from zfsbackd.objectstore.local import LocalObjectStore

__all__ = ["LocalObjectStore", "ObjectInfo", "ObjectStore", "ObjectStoreMetrics"]
