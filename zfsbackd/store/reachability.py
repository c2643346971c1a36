"""Walk the trees of backups: which blobs do the live backups reference, and from which file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from zfsbackd.store.blobidset import BlobIdSet
from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import node_name, parse_tree


def walk_trees(
    store: Store,
    record: BackupRecord,
    seen_trees: set[bytes],
    *,
    on_error: Callable[[str], None] | None = None,
    cached: bool = True,
) -> Iterator[tuple[bytes, str, list[dict[str, Any]]]]:
    """``(tree id, path, nodes)`` of each directory of ``record`` whose tree is not in ``seen_trees``.

    ``seen_trees`` (one id per directory, shared by the walks of several
    backups) makes a tree that several directories or backups share be
    read once. When ``on_error`` is given, an unreadable tree is reported and
    skipped (its id is still yielded, with no nodes) instead of raising.
    ``cached`` False reads every tree from the store, never from the local
    tree cache (``check``: proving the store holds them).
    """
    if not record.root_tree:
        return
    stack: list[tuple[bytes, str]] = [(bytes.fromhex(record.root_tree), "")]
    while stack:
        tree_id, path = stack.pop()
        if tree_id in seen_trees:
            continue
        seen_trees.add(tree_id)
        what = f"backup {record.backup_id}: directory {path or '/'}"
        try:
            nodes = parse_tree(store.read_tree(tree_id, what=what, cached=cached), what=what)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(str(exc))
            nodes = []
        for node in nodes:
            if "subtree" in node:
                name = node_name(node)
                stack.append((bytes.fromhex(node["subtree"]), "" if name == b"." else f"{path}/{os.fsdecode(name)}"))
        yield tree_id, path, nodes


def chunk_ids(node: dict[str, Any]) -> Iterator[bytes]:
    """The data blobs a file node references."""
    return (bytes.fromhex(blob_hex) for _offset, _length, blob_hex in node.get("chunks", ()))


def mark_reachable(
    store: Store,
    records: Iterable[BackupRecord],
    into: BlobIdSet,
    *,
    on_error: Callable[[str], None] | None = None,
    from_store: bool = False,
) -> None:
    """Add every blob referenced by ``records``' trees (the trees too) to ``into``.

    Unchanged directories keep their tree ids, so the incremental backups of
    a file system cost little more to mark than one. ``on_error`` and
    ``from_store`` (read no tree from the local cache): see :func:`walk_trees`.
    Memory holds one id per directory; the blobs go to ``into``, on disk.
    """
    seen_trees: set[bytes] = set()
    for record in records:
        for tree_id, _path, nodes in walk_trees(store, record, seen_trees, on_error=on_error, cached=not from_store):
            into.add(tree_id)
            for node in nodes:
                into.add_many(chunk_ids(node))


def find_users(store: Store, records: Iterable[BackupRecord], wanted: set[bytes]) -> dict[bytes, tuple[str, str]]:
    """For each of ``wanted`` (blob ids), the first backup and path found to reference it.

    Errors name the file a damaged or missing blob belongs to; this second
    walk runs only when there are such errors, so that the walk that found
    them holds no path per blob. Unreadable trees are skipped.
    """
    users: dict[bytes, tuple[str, str]] = {}
    seen_trees: set[bytes] = set()
    for record in records:
        for tree_id, path, nodes in walk_trees(store, record, seen_trees, on_error=lambda _message: None):
            if tree_id in wanted:
                users.setdefault(tree_id, (record.backup_id, path or "/"))
            for node in nodes:
                for blob_id in chunk_ids(node):
                    if blob_id in wanted:
                        users.setdefault(blob_id, (record.backup_id, f"{path}/{os.fsdecode(node_name(node))}"))
            if len(users) == len(wanted):
                return users
    return users


def reachable_in_batches(store: Store, record: BackupRecord, *, batch_size: int) -> Iterator[list[bytes]]:
    """The blobs ``record``'s trees reference (the trees too), about ``batch_size`` at a time.

    For work that goes through a backup's blobs once (a copy) without holding the set of all of
    them: only the trees' ids are kept (one per directory). A data blob shared by several files
    may come in more than one batch: callers skip what they already handled.
    """
    batch: list[bytes] = []
    for tree_id, _path, nodes in walk_trees(store, record, set()):
        batch.append(tree_id)
        for node in nodes:
            batch.extend(chunk_ids(node))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
