"""Tree blobs keep their canonical bytes (FORMAT.md, "Trees") now that orjson writes them.

A tree's id is the hash of those bytes, so an unchanged directory is
deduplicated against its parent backup only while every version writes the
same bytes: the reference is ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``, which wrote them before.
"""

from __future__ import annotations

import json

import pytest

from zfsbackd.errors import IntegrityError
from zfsbackd.store.tree import encode_name, node_name, nodes_by_name, parse_tree, serialize_tree


def _reference(nodes: list[dict]) -> bytes:
    ordered = sorted(nodes, key=node_name)
    return json.dumps({"nodes": ordered}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_every_character_and_integer_limit_serializes_as_the_reference() -> None:
    code_points = (*range(0x800), 0x2028, 0x2029, 0xFEFF, 0xFFFF, 0x10FFFF)
    names = [f"n{chr(cp)}" for cp in code_points if not 0xD800 <= cp < 0xE000]
    nodes = [
        {
            **encode_name(name.encode()),
            "type": "file",
            "inode": 2**64 - 1,
            "mtime_ns": -(2**63),
            "xattrs": [["user.\x01\"\\", "AA=="]],
            "chunks": [[0, 1, "ab" * 32]],
        }
        for name in names
    ]
    assert serialize_tree(nodes) == _reference(nodes)


def test_names_sort_by_raw_bytes_and_round_trip() -> None:
    nodes = [{**encode_name(raw), "type": "file"} for raw in (b"b", b"\xff\xfe", b"a", "é".encode())]
    raw = serialize_tree(nodes)
    assert [n.get("name") or n.get("name_b64") for n in parse_tree(raw, what="t")] == ["a", "b", "é", "//4="]


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'{"nodes": 3}', b'{"nodes": [1]}', b'{"nodes": [{}]', b'{"nodes": [{"a": 1e999999}]}x']
)
def test_a_tree_that_is_not_a_tree_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(IntegrityError, match="is not a valid tree"):
        parse_tree(raw, what="tree t")


def test_nodes_by_name_keys_by_raw_name_text_or_not() -> None:
    text = [{**encode_name(raw), "type": "file"} for raw in (b"a", "é".encode())]
    assert list(nodes_by_name(text)) == [b"a", "é".encode()]
    mixed = [*text, {**encode_name(b"\xff"), "type": "file"}]
    assert list(nodes_by_name(mixed)) == [b"a", "é".encode(), b"\xff"]
