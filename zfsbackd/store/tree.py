"""Tree blobs: one per directory, a sorted list of entry nodes serialised as canonical JSON.

Canonical (sorted keys, sorted entries, no white space) so that an unchanged
directory produces the very same bytes, hence the same blob id, as in the
parent backup: the difference between two backups is exactly their new blobs.

Node fields (absent when not applicable)::

    name | name_b64   entry name (b64 when not valid UTF-8)
    type            file | dir | symlink | chardev | blockdev
    mode uid gid    permission bits (incl. setuid/setgid/sticky) and owner
    mtime_ns ctime_ns inode   timestamps and the identity used for change detection
    size            file size in bytes
    xattrs          [[name, base64 value], …] incl. POSIX ACLs (system.posix_acl_*)
    chunks          files: [[offset, length, blob id hex], …] — gaps are holes (sparse)
    hardlink        files with nlink > 1: the inode number shared by the links
    subtree         dirs: tree blob id hex
    tree_files tree_bytes tree_dirs   dirs: regular files, their bytes and directories below (totals)
    target | target_b64  symlinks
    rdev            devices
"""

from __future__ import annotations

import base64
import heapq
import operator
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from zfsbackd import pools
from zfsbackd.errors import IntegrityError

Node = dict[str, Any]
ROOT_NAME = "."


def encode_name(name: bytes) -> dict[str, str]:
    try:
        return {"name": name.decode("utf-8")}
    except UnicodeDecodeError:
        return {"name_b64": base64.b64encode(name).decode()}


_TEXT_NAME = operator.itemgetter("name")


def node_name(node: Node) -> bytes:
    if "name" in node:
        return str(node["name"]).encode("utf-8")
    return base64.b64decode(node["name_b64"])


def nodes_by_name(nodes: list[Node]) -> dict[bytes, Node]:
    """A directory's nodes by raw name (for lookups with the names a listing gives).

    Built without a Python call per node when every name is text (the common case: an
    incremental backup builds one per changed directory of its parent).
    """
    try:
        return dict(zip(map(str.encode, map(_TEXT_NAME, nodes)), nodes, strict=True))
    except (KeyError, TypeError):  # a name that is not UTF-8 (name_b64), or not a string
        return {node_name(n): n for n in nodes}


def encode_target(target: bytes) -> dict[str, str]:
    try:
        return {"target": target.decode("utf-8")}
    except UnicodeDecodeError:
        return {"target_b64": base64.b64encode(target).decode()}


def node_target(node: Node) -> bytes:
    if "target" in node:
        return str(node["target"]).encode("utf-8")
    return base64.b64decode(node["target_b64"])


def encode_xattrs(pairs: list[tuple[str, bytes]]) -> list[list[str]]:
    return [[name, base64.b64encode(value).decode()] for name, value in sorted(pairs)]


def decode_xattrs(node: Node) -> list[tuple[str, bytes]]:
    return [(name, base64.b64decode(value)) for name, value in node.get("xattrs", ())]


def serialize_tree(nodes: list[Node]) -> bytes:
    """The canonical bytes of a directory's tree: the bytes of ``json.dumps(..., sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` (FORMAT.md), made by orjson, which writes exactly
    those bytes for everything a node holds (strings, integers within 64 bits, lists, objects) and
    is several times faster: every changed directory of every backup is serialized and parsed here."""
    try:  # UTF-8 keeps code point order: names that are all text sort as their bytes do
        nodes = sorted(nodes, key=_TEXT_NAME)
    except KeyError:  # a name that is not UTF-8 (name_b64)
        nodes = sorted(nodes, key=node_name)
    return orjson.dumps({"nodes": nodes}, option=orjson.OPT_SORT_KEYS)


def parse_tree(raw: bytes, *, what: str) -> list[Node]:
    try:
        data = orjson.loads(raw)
        nodes = data["nodes"]
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise TypeError("nodes is not a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what} is not a valid tree ({exc})") from None
    return nodes


def is_safe_name(name: bytes) -> bool:
    """A name that can only ever create an entry directly inside its parent directory."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


#: entries of trees read ahead of a walk and not yet used, at most (beyond it, reading ahead pauses)
READ_AHEAD_ENTRIES = 20_000


def expected_entries(node: Node) -> int:
    """The entries a directory's tree holds, known before reading it when the directory has no subdirectories.

    Its totals (``tree_files``, ``tree_dirs``) are then exactly its own files;
    for a directory with subdirectories, or a node without (valid) totals, 0:
    not known.
    """
    files, dirs = node.get("tree_files"), node.get("tree_dirs")
    if type(files) is int and type(dirs) is int and dirs == 0 and files >= 0:
        return files
    return 0


_Arg = TypeVar("_Arg")
_Result = TypeVar("_Result")
_Position = tuple[int, ...]


@dataclass(eq=False)
class _Ahead(Generic[_Arg, _Result]):
    """One tree the read-ahead knows of: waiting to be read (no future), being read, or read."""

    tree_id: str
    arg: _Arg
    expected: int = 0  # its entries if known before reading it (0: counted at the mean of the trees read)
    future: Future[_Result] | None = None
    size: int = 0  # entries it holds once read (counted in ``TreeReadAhead.held_entries``)
    dropped: bool = False  # the walk went past it: its read is for nothing, its subtrees are not wanted


class TreeReadAhead(Generic[_Arg, _Result]):
    """Reads a backup's trees ahead of a depth-first walk, in the walk's order, within a bound in entries.

    A walk (the archiver over its parent backup's trees, a restore over its backup's)
    needs one tree per directory, one after another; from S3 a request per directory in
    a row would dominate it. Reading them ahead on a few threads hides that, but reading
    *everything* ahead held a whole backup's trees in memory (about 1 KiB per file). So
    trees are read in the walk's own order — depth first, entries by name, which is the
    order trees store them in — and no read starts while the trees read but not yet taken,
    plus the reads under way, hold ``max_entries`` entries or more (each tree counts at
    least one, so empty trees are bounded too). A read under way counts as the entries
    its parent said it has (:func:`expected_entries`: exact for a directory without
    subdirectories) or else as the mean of the trees read so far; counting reads under
    way as nothing let each read thread add a tree past the bound. A tree larger than
    the bound is still read: a walk cannot do without the directory it is in. Subtrees
    known but not read yet cost only their id.

    Each tree has a position, the path of child indices from the start trees; positions
    compare in depth-first order. When the walk takes a tree, everything before it that
    it did not take (a directory deleted since, or passed over as clean) is dropped, so
    guessing wrong costs a read, never memory.

    ``read(tree_id, arg)`` reads one tree (on the read-ahead's threads; an exception is
    raised again by :meth:`take`), ``children(result, arg)`` lists its subtrees as
    ``(tree_id, arg, expected entries or 0)`` in walk order and ``size(result)`` its entries.
    """

    def __init__(
        self,
        read: Callable[[str, _Arg], _Result],
        children: Callable[[_Result, _Arg], Iterable[tuple[str, _Arg, int]]],
        size: Callable[[_Result], int],
        starts: Iterable[tuple[str, _Arg]],
        *,
        max_entries: int = READ_AHEAD_ENTRIES,
        workers: int = pools.TREE_READ_AHEAD_WORKERS,
    ) -> None:
        self._read, self._children, self._size = read, children, size
        self.max_entries = max_entries
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zfsbackd-tree")
        self._lock = threading.Lock()
        self._known: dict[_Position, _Ahead[_Arg, _Result]] = {}
        self._order: list[_Position] = []  # heap of known positions (stale ones skipped when popped)
        self._todo: list[_Position] = []  # heap of positions not submitted yet (stale ones skipped)
        self._by_id: dict[str, list[_Position]] = {}  # heaps: where each tree id is, first in walk order first
        self._in_flight = 0
        self._expected_in_flight = 0  # entries the reads under way are expected to bring
        self._entries_read = 0
        self._trees_read = 0
        self._closed = False
        self.held_entries = 0
        """Entries of trees read and not yet taken (what the bound is about)."""
        self.peak_entries = 0
        """The most entries held at once: for tests and the benchmark."""
        with self._lock:
            for index, (tree_id, arg) in enumerate(starts):
                self._learn((index,), tree_id, arg, 0)
            self._top_up()

    def take(self, tree_id: str) -> _Result | None:
        """The walk's next tree: read ahead (waiting for it if need be), or None if it was not foreseen.

        None means the caller reads the tree itself (a directory new since the parent
        backup, or one the read-ahead has not reached); an error of the read is raised here.
        """
        with self._lock:
            positions = self._by_id.get(tree_id)
            if self._closed or not positions:
                return None
            position = positions[0]
            self._drop_before(position)
            ahead = self._known[position]
            if ahead.future is None:  # the walk caught up with the read-ahead: this one first
                self._submit(position, ahead)
            future = ahead.future
        assert future is not None
        try:
            return future.result()
        finally:
            with self._lock:
                self._forget(position)
                self._top_up()

    def close(self) -> None:
        """Stop reading ahead (the walk is over or failed); reads under way are waited for."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TreeReadAhead[_Arg, _Result]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- lock held
    def _learn(self, position: _Position, tree_id: str, arg: _Arg, expected: int) -> None:
        self._known[position] = _Ahead(tree_id, arg, expected)
        heapq.heappush(self._order, position)
        heapq.heappush(self._todo, position)
        heapq.heappush(self._by_id.setdefault(tree_id, []), position)

    def _forget(self, position: _Position) -> None:
        ahead = self._known.pop(position, None)
        if ahead is None:
            return
        self.held_entries -= ahead.size
        ahead.size = 0
        positions = self._by_id[ahead.tree_id]
        if positions[0] == position:  # always, as the walk goes forward: taken or dropped, the first one goes
            heapq.heappop(positions)
        else:
            positions.remove(position)
            heapq.heapify(positions)
        if not positions:
            del self._by_id[ahead.tree_id]

    def _drop_before(self, position: _Position) -> None:
        """Everything before ``position`` in walk order was passed over by the walk."""
        while self._order and self._order[0] < position:
            stale = heapq.heappop(self._order)
            ahead = self._known.get(stale)
            if ahead is not None:
                ahead.dropped = True
                self._forget(stale)

    def _top_up(self) -> None:
        """Submit the next trees in walk order while the bound and the thread count allow."""
        while (
            not self._closed
            and self._todo
            and self._in_flight < self._workers
            and self.held_entries + self._expected_in_flight < self.max_entries
        ):
            position = heapq.heappop(self._todo)
            ahead = self._known.get(position)
            if ahead is not None and ahead.future is None:
                self._submit(position, ahead)

    def _expected(self, ahead: _Ahead[_Arg, _Result]) -> int:
        """What a read will bring: what its parent said, else the mean of the trees read so far (at least 1)."""
        if ahead.expected:
            return ahead.expected
        return max(1, self._entries_read // self._trees_read) if self._trees_read else 1

    def _submit(self, position: _Position, ahead: _Ahead[_Arg, _Result]) -> None:
        ahead.expected = self._expected(ahead)
        self._expected_in_flight += ahead.expected
        self._in_flight += 1
        ahead.future = self._pool.submit(self._run, position, ahead)

    # ----------------------------------------------------------- read threads
    def _run(self, position: _Position, ahead: _Ahead[_Arg, _Result]) -> _Result:
        """Read one tree; account for it and learn its subtrees before the walk can take it."""
        try:
            result = self._read(ahead.tree_id, ahead.arg)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
                self._expected_in_flight -= ahead.expected
                self._top_up()
            raise
        children = [] if ahead.dropped else list(self._children(result, ahead.arg))
        with self._lock:
            self._in_flight -= 1
            self._expected_in_flight -= ahead.expected
            size = max(1, self._size(result))
            self._entries_read += size
            self._trees_read += 1
            if not ahead.dropped and self._known.get(position) is ahead:
                ahead.size = size
                self.held_entries += ahead.size
                self.peak_entries = max(self.peak_entries, self.held_entries)
                for index, (tree_id, arg, expected) in enumerate(children):
                    self._learn((*position, index), tree_id, arg, expected)
            self._top_up()
        return result
