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
import json
from typing import Any

from zfsbackd.errors import IntegrityError

Node = dict[str, Any]
ROOT_NAME = "."


def encode_name(name: bytes) -> dict[str, str]:
    try:
        return {"name": name.decode("utf-8")}
    except UnicodeDecodeError:
        return {"name_b64": base64.b64encode(name).decode()}


def node_name(node: Node) -> bytes:
    if "name" in node:
        return str(node["name"]).encode("utf-8")
    return base64.b64decode(node["name_b64"])


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
    nodes = sorted(nodes, key=node_name)
    return json.dumps({"nodes": nodes}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_tree(raw: bytes, *, what: str) -> list[Node]:
    try:
        data = json.loads(raw)
        nodes = data["nodes"]
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise TypeError("nodes is not a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what} is not a valid tree ({exc})") from None
    return nodes


def is_safe_name(name: bytes) -> bool:
    """A name that can only ever create an entry directly inside its parent directory."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name
