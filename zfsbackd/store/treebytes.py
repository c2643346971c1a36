"""A tree blob's canonical bytes, read and edited by entry name without parsing the entries that stay.

An incremental backup guided by a change list rewrites every directory in which something
changed, and with scattered churn that is most of them — each for one or two changed entries
among hundreds. Parsing the parent backup's tree into a node per entry and serializing them
all again cost most of such a backup's time per directory (bench/change_list.py). A tree's
bytes are canonical (:func:`zfsbackd.store.tree.serialize_tree`: ``{"nodes":[...]}``, keys
sorted, nodes sorted by raw name, no white space), so the new tree is the parent's bytes with
the changed nodes cut out and the new ones put in at their place in name order: exactly the
bytes :func:`serialize_tree` would make of the same nodes, made with a few searches.

What the searches rest on: in canonical JSON the byte string ``"name":"`` (or
``"name_b64":"``) occurs only as a node's name key — inside a string every ``"`` is escaped,
and only object keys are followed by ``:`` — so each node has exactly one, and they come in
name order. Every node cut out, replaced or put in front of is located by its key, then
checked: parsed, canonical, the name asked for, standing between ``[``/``,`` and ``,``/``]``.
Anything unexpected (a node that does not check out, a tree not in this form) makes
:meth:`TreeBytes.splice` return None, and the caller parses and serializes the whole tree as
before; the nodes that stay are never parsed and never need to be.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable

import orjson

from zfsbackd.store.tree import Node, encode_name, node_name

_HEAD, _TAIL = b'{"nodes":[', b"]}"
_TEXT_KEY, _B64_KEY = b'"name":"', b'"name_b64":"'
#: the rest of a JSON string after its opening quote: its content (group 1) and the closing quote
_STRING_REST = re.compile(rb'((?:[^"\\]|\\.)*)"', re.DOTALL)
#: a name key whose name needs no escape (group 1: the name's UTF-8 bytes as they are)
_PLAIN_NAME = re.compile(rb'"name":"([^"\\]*)"')
#: the rest of a node (nodes hold no objects, only strings, numbers and lists) up to its closing brace
_NODE_REST = re.compile(rb'(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}', re.DOTALL)


def _canonical(node: Node) -> bytes:
    """A node's bytes inside a canonical tree (what :func:`serialize_tree` writes for it)."""
    return orjson.dumps(node, option=orjson.OPT_SORT_KEYS)


def _name_key(name: bytes) -> bytes:
    """The bytes of the node key that names *name*: ``"name":"…"`` or ``"name_b64":"…"``, as serialized."""
    return _canonical(encode_name(name))[1:-1]


class TreeBytes:
    """The canonical bytes of one tree blob (already authenticated by the store), looked into by name."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._first, self._end = len(_HEAD), len(raw) - len(_TAIL)
        self.canonical_frame = raw.startswith(_HEAD) and raw.endswith(_TAIL) and self._first <= self._end
        """Whether the bytes are ``{"nodes":[…]}`` at all (else nothing here applies: parse them)."""
        self._b64_names = _B64_KEY in raw  # (rare: names that are not UTF-8; else never searched for)
        # What the searches found, by name and by key: a spliced directory's changed nodes are looked for
        # twice, by the archiver (nodes_named) and by the splice that replaces them.
        self._keys: dict[bytes, int | None] = {}
        self._nodes: dict[int, tuple[int, int, Node]] = {}

    def count(self) -> int:
        """How many nodes the tree holds (one name key each)."""
        return self.raw.count(_TEXT_KEY) + (self.raw.count(_B64_KEY) if self._b64_names else 0)

    def names(self) -> set[bytes] | None:
        """Every node's name, read from the keys alone; None unless every name is text needing no escape."""
        if self._b64_names:
            return None
        found = _PLAIN_NAME.findall(self.raw)
        names = set(found)
        return names if len(names) == len(found) == self.count() else None

    def nodes_named(self, names: Iterable[bytes]) -> dict[bytes, Node] | None:
        """The parsed nodes of those *names* the tree has, by name; None if one cannot be read here."""
        found: dict[bytes, Node] = {}
        for name in names:
            key = self._find_key(name)
            if key is None:
                continue
            span = self._node_at(key, name)
            if span is None:
                return None
            found[name] = span[2]
        return found

    def splice(self, remove: Collection[bytes], add: Iterable[Node]) -> bytes | None:
        """The canonical bytes of this tree without the nodes named *remove* (each must be there) and with
        the nodes *add* (each named neither by a node that stays nor by another one added).

        Exactly ``serialize_tree(nodes that stay + add)``; None when the tree is not in the form this
        relies on (see the module docstring): then parse and serialize it instead.
        """
        if not self.canonical_frame:
            return None
        edits: list[tuple[int, int, int, bytes, bytes]] = []  # (start, order, end, name, bytes or b"")
        for name in remove:
            key = self._find_key(name)
            located = None if key is None else self._node_at(key, name)
            if located is None:
                return None
            start, end, _node = located
            edits.append((start, 1, end, name, b""))
        removed = set(remove)
        added: set[bytes] = set()
        for node in add:
            name = node_name(node)
            if name in added:
                return None
            added.add(name)
            if name in removed:  # in its old place (same name, same rank)
                index = next(i for i, edit in enumerate(edits) if edit[3] == name)
                start, order, end, _name, _gone = edits[index]
                edits[index] = (start, order, end, name, _canonical(node))
                continue
            if self._find_key(name) is not None:
                return None  # a node that stays already has the name
            at = self._insertion_point(name)
            if at is None:
                return None
            edits.append((at, 0, at, name, _canonical(node)))
        edits.sort()  # by place; at one place the new nodes (by name) before the node that is cut there
        return self._apply(edits)

    # ------------------------------------------------------------------ internals
    def _apply(self, edits: list[tuple[int, int, int, bytes, bytes]]) -> bytes:
        """The tree with *edits* made: runs of nodes that stay are copied whole, commas between the pieces."""
        raw, pieces, cursor = self.raw, [], self._first
        for start, _order, end, _name, data in edits:
            if start > cursor:
                pieces.append(raw[cursor : start - 1 if start < self._end else start])  # (without the comma)
                cursor = start
            if data:
                pieces.append(data)
            if end > start:  # a node cut out (or replaced): go past it and its comma
                cursor = min(end + 1, self._end)
        if cursor < self._end:
            pieces.append(raw[cursor : self._end])
        return b"".join((_HEAD, b",".join(pieces), _TAIL))

    def _find_key(self, name: bytes) -> int | None:
        """Where the key naming *name* is, or None if no node has that name."""
        if name in self._keys:
            return self._keys[name]
        key = _name_key(name)
        found = None
        for after in (b",", b"}"):
            at = self.raw.find(key + after, self._first, self._end)
            if at >= 0:
                found = at
                break
        self._keys[name] = found
        return found

    def _node_at(self, key: int, name: bytes) -> tuple[int, int, Node] | None:
        """The node whose name key is at *key*: (start, end, node), checked to be *name*'s and canonical.
        The node is shared by every caller (nobody changes one: a changed entry gets a new node)."""
        located = self._nodes.get(key)
        if located is None or node_name(located[2]) != name:
            located = self._read_node_at(key, name)
            if located is not None:
                self._nodes[key] = located
        return located

    def _read_node_at(self, key: int, name: bytes) -> tuple[int, int, Node] | None:
        raw = self.raw
        start = raw.rfind(b"{", self._first, key)
        if start < 0 or raw[start - 1 : start] not in (b"[", b","):
            return None
        rest = _NODE_REST.match(raw, key)
        if rest is None:
            return None
        end = rest.end()
        if raw[end : end + 1] not in (b",", b"]") or (end == self._end) != (raw[end : end + 1] == b"]"):
            return None
        data = raw[start:end]
        try:
            node = orjson.loads(data)
            if not isinstance(node, dict) or node_name(node) != name or _canonical(node) != data:
                return None
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return start, end, node

    def _name_after(self, position: int) -> tuple[int, bytes] | None:
        """The first name key at or after *position*: (where, the name it gives); None past the last node."""
        raw = self.raw
        text = raw.find(_TEXT_KEY, position, self._end)
        b64 = raw.find(_B64_KEY, position, self._end) if self._b64_names else -1
        if text < 0 and b64 < 0:
            return None
        if text >= 0 and (b64 < 0 or text < b64):
            at, value_at = text, text + len(_TEXT_KEY)
        else:
            at, value_at = b64, b64 + len(_B64_KEY)
        value = _STRING_REST.match(raw, value_at)
        if value is None:
            raise ValueError("a name key without its string")
        content = value.group(1)
        if at == b64:
            return at, base64.b64decode(content, validate=True)
        if b"\\" in content:
            return at, str(orjson.loads(b'"' + content + b'"')).encode("utf-8")
        return at, content

    def _insertion_point(self, name: bytes) -> int | None:
        """Where a node named *name* goes in name order: the start of the first node whose name is greater,
        or the end of the last node; None if the tree is not as expected."""
        low, high = self._first, self._end  # keys before low name less than *name*, keys from high more
        try:
            while low < high:
                middle = (low + high) // 2
                found = self._name_after(middle)
                if found is None or found[0] >= high or found[1] > name:
                    high = middle
                elif found[1] < name:
                    low = found[0] + 1
                else:
                    return None  # the name is there
            successor = self._name_after(low)
        except (ValueError, binascii.Error):
            return None
        if successor is None or successor[0] >= self._end:
            return self._end
        located = self._node_at(successor[0], successor[1])
        return None if located is None else located[0]
