"""ZFS access for zfsbackd: a pyzfs-compatible libzfs_core binding and a strict ``zfs`` command wrapper.

- :mod:`zfsbackd.zfs.libzfs_core`: snapshots, holds, bookmarks, send/receive
  through libzfs_core (cffi ABI mode; the same API and exceptions as OpenZFS's
  pyzfs), with its exceptions in :mod:`zfsbackd.zfs.exceptions`.
- :mod:`zfsbackd.zfs.command`: what libzfs_core does not offer (listing,
  properties, mounts, ``zfs diff``) through the ``zfs``/``zpool`` commands.

Importing either works on hosts without ZFS; only calling needs it.
"""
