"""TreeBytes: a tree edited by name in its canonical bytes gives exactly the bytes serialize_tree makes."""

from __future__ import annotations

import random

import orjson
import pytest

from zfsbackd.store.tree import encode_name, encode_target, node_name, serialize_tree
from zfsbackd.store.treebytes import TreeBytes

#: names chosen to trip a byte search: quotes, backslashes, braces, key look-alikes, control bytes,
#: non-ASCII text, bytes that are not UTF-8 (name_b64), and prefixes of one another
AWKWARD_NAMES = [
    b"a",
    b"ab",
    b"a b",
    b'quote"d',
    b"back\\slash",
    b'x","name":"y',
    b'"name":"a"',
    b"brace}{",
    b"},{",
    b"tab\tnew\nline",
    b"\x01ctl",
    "é ünïcode".encode(),
    "日本".encode(),
    b"\xff\xfenot-utf8",
    b"\xc3",
    b"z" * 200,
]


def _node(name: bytes, rng: random.Random, *, kind: str | None = None) -> dict:
    kind = kind or rng.choice(["file", "file", "dir", "symlink"])
    node = {
        **encode_name(name),
        "type": kind,
        "mode": 0o644,
        "uid": 0,
        "gid": rng.choice([0, 1000]),
        "inode": rng.getrandbits(40),
        "mtime_ns": rng.getrandbits(60),
        "ctime_ns": rng.getrandbits(60),
    }
    if kind == "file":
        node.update(size=rng.randrange(1 << 20), chunks=[[0, 5, rng.randbytes(32).hex()]])
        if rng.random() < 0.3:
            node["xattrs"] = [['user.k"}{', "dmFs"], ["user.name", "eA=="]]
    elif kind == "dir":
        node.update(subtree=rng.randbytes(32).hex(), tree_files=3, tree_bytes=10, tree_dirs=0, xattrs=[])
    else:
        node.update(**encode_target(rng.choice([b'"name":"x"}', b"t\\{", b"\xfe\xff", b"plain"])))
    return node


def _tree(rng: random.Random, names: list[bytes]) -> dict[bytes, dict]:
    return {name: _node(name, rng) for name in names}


def _random_names(rng: random.Random, count: int) -> list[bytes]:
    names = set(rng.sample(AWKWARD_NAMES, k=min(len(AWKWARD_NAMES), count // 3)))
    while len(names) < count:
        names.add(f"f{rng.randrange(10_000):05d}.dat".encode())
    return sorted(names)


@pytest.mark.parametrize("seed", range(60))
def test_a_spliced_tree_is_the_serialized_tree(seed: int) -> None:
    rng = random.Random(seed)
    before = _tree(rng, _random_names(rng, rng.choice([1, 2, 5, 40, 200])))
    raw = serialize_tree(list(before.values()))
    names = list(before)
    removed = set(rng.sample(names, k=rng.randrange(0, min(len(names), 6) + 1)))
    replaced = {name: _node(name, rng) for name in rng.sample(sorted(removed), k=len(removed) // 2)}
    new_names = [n for n in _random_names(rng, len(names) + 8) if n not in before][: rng.randrange(0, 6)]
    added = {name: _node(name, rng) for name in new_names}
    after = {name: node for name, node in before.items() if name not in removed} | replaced | added

    tree = TreeBytes(raw)
    if seed % 2:  # as the archiver does: the changed nodes first, then the splice (from what was found)
        assert tree.nodes_named(sorted(removed)) == {name: before[name] for name in removed}
    spliced = tree.splice(removed, [*replaced.values(), *added.values()])

    assert spliced == serialize_tree(list(after.values()))


def test_a_node_found_is_not_parsed_again_by_the_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    before = _tree(rng, [b"a", b"b", b"c"])
    tree = TreeBytes(serialize_tree(list(before.values())))
    parsed: list[bytes] = []
    real_loads = orjson.loads
    monkeypatch.setattr(orjson, "loads", lambda data: parsed.append(bytes(data)) or real_loads(data))
    assert tree.nodes_named([b"b"]) == {b"b": before[b"b"]}
    changed = {**before[b"b"], "size": 1}
    assert tree.splice({b"b"}, [changed]) == serialize_tree([before[b"a"], changed, before[b"c"]])
    assert len(parsed) == 1


def test_an_empty_tree_takes_nodes_and_a_tree_can_lose_them_all() -> None:
    rng = random.Random(1)
    nodes = [_node(name, rng) for name in (b"b", b"a", b"\xff")]
    assert TreeBytes(serialize_tree([])).splice(set(), nodes) == serialize_tree(nodes)
    assert TreeBytes(serialize_tree(nodes)).splice({b"a", b"b", b"\xff"}, []) == serialize_tree([])


def test_nodes_are_found_by_name_and_counted() -> None:
    rng = random.Random(2)
    before = _tree(rng, AWKWARD_NAMES)
    tree = TreeBytes(serialize_tree(list(before.values())))
    assert tree.count() == len(AWKWARD_NAMES)
    wanted = [b'x","name":"y', b"\xff\xfenot-utf8", b"a", b"missing", b'"name":"a"']
    found = tree.nodes_named(wanted)
    assert found == {name: before[name] for name in wanted if name in before}
    assert tree.names() is None  # (names with escapes, and names that are not UTF-8: not read from keys alone)
    plain = [b"a", "é ünïcode".encode(), b"brace}{", b"z" * 200]
    assert TreeBytes(serialize_tree([_node(name, rng) for name in plain])).names() == set(plain)


@pytest.mark.parametrize(
    ("remove", "add_names"),
    [
        ({b"missing"}, []),  # a name to cut that the tree does not have
        (set(), [b"a"]),  # a name to add that a node that stays has
        (set(), [b"n", b"n"]),  # the same name added twice
    ],
)
def test_an_edit_that_does_not_fit_the_tree_is_refused(remove: set[bytes], add_names: list[bytes]) -> None:
    rng = random.Random(3)
    tree = TreeBytes(serialize_tree([_node(b"a", rng), _node(b"b", rng)]))
    assert tree.splice(remove, [_node(name, rng) for name in add_names]) is None


def test_bytes_not_in_the_canonical_form_are_left_to_the_parser() -> None:
    rng = random.Random(4)
    nodes = [_node(b"a", rng), _node(b"b", rng)]
    canonical = serialize_tree(nodes)
    spaced = orjson.dumps({"nodes": sorted(nodes, key=node_name)}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    unsorted_keys = b'{"nodes":[' + b",".join(orjson.dumps(n) for n in nodes) + b"]}"
    for raw in (spaced, unsorted_keys, b'{"other":[]}', canonical[:-1]):
        assert TreeBytes(raw).splice({b"a"}, [_node(b"c", rng)]) is None
    assert TreeBytes(canonical).splice({b"a"}, []) == serialize_tree(nodes[1:])
