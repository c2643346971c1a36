"""Walk the trees of backups: which blobs do the live backups reference, and from which file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import node_name, parse_tree


@dataclass
class Reachable:
    blobs: set[bytes] = field(default_factory=set)
    # blob id → (backup id, path) of its first user, to name it in errors
    users: dict[bytes, tuple[str, str]] = field(default_factory=dict)


def mark_reachable(
    store: Store,
    records: Iterable[BackupRecord],
    *,
    on_error: Callable[[str], None] | None = None,
    track_users: bool = False,
    from_store: bool = False,
) -> Reachable:
    """Every blob referenced by ``records``' trees.

    A tree shared by several backups is walked once (unchanged directories
    reuse their tree ids, so incremental backups cost little to mark). When
    ``on_error`` is given, unreadable trees are reported and skipped instead
    of raising. ``from_store`` reads every tree from the store, never from the
    local tree cache (``check``: proving the store holds them).
    """
    found = Reachable()
    for record in records:
        if not record.root_tree:
            continue
        stack: list[tuple[bytes, str]] = [(bytes.fromhex(record.root_tree), "")]
        while stack:
            tree_id, path = stack.pop()
            if tree_id in found.blobs:
                continue
            found.blobs.add(tree_id)
            if track_users:
                found.users.setdefault(tree_id, (record.backup_id, path or "/"))
            what = f"backup {record.backup_id}: directory {path or '/'}"
            try:
                nodes = parse_tree(store.read_tree(tree_id, what=what, cached=not from_store), what=what)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(str(exc))
                continue
            for node in nodes:
                child = f"{path}/{os.fsdecode(node_name(node))}" if path else f"/{os.fsdecode(node_name(node))}"
                if "subtree" in node:
                    stack.append((bytes.fromhex(node["subtree"]), child if node_name(node) != b"." else ""))
                for _offset, _length, blob_hex in node.get("chunks", ()):
                    blob_id = bytes.fromhex(blob_hex)
                    found.blobs.add(blob_id)
                    if track_users:
                        found.users.setdefault(blob_id, (record.backup_id, child))
    return found


def reachable_in_batches(store: Store, record: BackupRecord, *, batch_size: int) -> Iterator[list[bytes]]:
    """The blobs ``record``'s trees reference (the trees too), about ``batch_size`` at a time.

    For work that goes through a backup's blobs once (a copy) without holding the set of all of
    them, which grows with the backup (~100 B per blob): only the trees' ids are kept (one per
    directory), so that a tree shared by several directories is walked once. A data blob shared
    by several files may come in more than one batch: callers skip what they already handled.
    """
    if not record.root_tree:
        return
    seen_trees: set[bytes] = set()
    stack: list[tuple[bytes, str]] = [(bytes.fromhex(record.root_tree), "")]
    batch: list[bytes] = []
    while stack:
        tree_id, path = stack.pop()
        if tree_id in seen_trees:
            continue
        seen_trees.add(tree_id)
        batch.append(tree_id)
        what = f"backup {record.backup_id}: directory {path or '/'}"
        for node in parse_tree(store.read_tree(tree_id, what=what), what=what):
            if "subtree" in node:
                name = node_name(node)
                child = "" if name == b"." else f"{path}/{os.fsdecode(name)}"
                stack.append((bytes.fromhex(node["subtree"]), child))
            batch.extend(bytes.fromhex(blob_hex) for _offset, _length, blob_hex in node.get("chunks", ()))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
