"""Parity of the rest of pyzfs's API: the shim and Debian's pyzfs on real OpenZFS, step by step.

Same method as test_lzc_parity.py (whose helpers these tests use): each
scenario runs once per implementation below its own dataset, the logs of
results and exceptions must be identical, and key outcomes are asserted
outright. Where OpenZFS 2.1 and 2.3 differ (lzc_receive_with_heal exists only
in 2.2+), the expectation is per version.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pytest
from test_lzc_parity import _send_to_bytes, _write, mountpoint, ok, raised, run_both
from zfsvm_util import Recorder, openzfs_version, sh, zfs_get

# ---------------------------------------------------------------------------
# The surface itself


def test_same_public_names_exceptions_and_constants(shim: ModuleType, pyzfs: ModuleType) -> None:
    import libzfs_core.exceptions as pyzfs_exceptions

    missing = [name for name in pyzfs.__all__ if not hasattr(shim, name)]
    assert missing == []
    extra = set(shim.__all__) - set(pyzfs.__all__)
    # pyzfs 2.1 lacks only lzc_receive_with_heal (new in 2.2), which the shim offers as 2.3 does
    assert extra == (set() if hasattr(pyzfs, "lzc_receive_with_heal") else {"lzc_receive_with_heal"})
    for name, cls in vars(pyzfs_exceptions).items():
        if isinstance(cls, type) and issubclass(cls, Exception):
            mine = getattr(shim.exceptions, name)
            assert (mine.errno, mine.message) == (cls.errno, cls.message), name
            assert [b.__name__ for b in mine.__mro__ if not b.__name__.startswith("_")] == [
                b.__name__ for b in cls.__mro__
            ], name
    assert shim.WRAPPING_KEY_LEN == pyzfs.WRAPPING_KEY_LEN == 32
    for enum in ("zfs_key_location", "zfs_keyformat", "zio_encrypt"):
        theirs = {k: v for k, v in vars(getattr(pyzfs, enum)).items() if not k.startswith("_")}
        mine = {k: v for k, v in vars(getattr(shim, enum)).items() if not k.startswith("_")}
        assert mine == theirs, enum


def test_is_supported_agrees_for_every_function(shim: ModuleType, pyzfs: ModuleType) -> None:
    answers = {}
    for name in pyzfs.__all__:
        if name.startswith("lzc_"):
            answers[name] = (shim.is_supported(getattr(shim, name)), pyzfs.is_supported(getattr(pyzfs, name)))
    differ = {name: pair for name, pair in answers.items() if pair[0] != pair[1]}
    assert differ == {}
    unsupported = sorted(name for name, (mine, _) in answers.items() if not mine)
    # ClusterHQ's extensions are in no OpenZFS libzfs_core
    assert unsupported == ["lzc_get_props", "lzc_inherit_prop", "lzc_list_children", "lzc_list_snaps", "lzc_set_props"]
    assert shim.is_supported(shim.lzc_receive_with_heal) is (openzfs_version() >= (2, 2))
    with pytest.raises(ValueError, match="not a libzfs_core API function"):
        shim.is_supported(shim.receive_header)


# ---------------------------------------------------------------------------
# Datasets: clone, promote, rename, rollback_to, snaprange_space


def scenario_clone_promote_rename(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs = root + b"/fs"
    lzc.lzc_create(fs)
    _write(mountpoint(fs) / "f", b"x" * 300_000)
    lzc.lzc_snapshot([fs + b"@a"])
    _write(mountpoint(fs) / "g", b"y" * 300_000)
    lzc.lzc_snapshot([fs + b"@b"])
    rec("clone", lzc.lzc_clone, root + b"/clone", fs + b"@a")
    rec("clone-origin", zfs_get, "origin", root + b"/clone")
    rec("clone-props", lzc.lzc_clone, root + b"/clone2", fs + b"@a", {b"user:c": b"v"})
    rec("clone-props-set", zfs_get, "user:c", root + b"/clone2")
    rec("clone-exists", lzc.lzc_clone, root + b"/clone", fs + b"@a")
    rec("clone-missing-origin", lzc.lzc_clone, root + b"/c3", fs + b"@nope")
    rec("clone-missing-parent", lzc.lzc_clone, root + b"/no/c3", fs + b"@a")
    rec("clone-bad-name", lzc.lzc_clone, root + b"/bad!", fs + b"@a")
    rec("clone-origin-not-snapshot", lzc.lzc_clone, root + b"/c4", fs)
    rec("clone-bad-prop", lzc.lzc_clone, root + b"/c5", fs + b"@a", {b"nosuchprop": 1})
    rec("clone-other-pool", lzc.lzc_clone, b"nopool/c", fs + b"@a")
    rec("destroy-cloned-origin", lzc.lzc_destroy_snaps, [fs + b"@a"], False)
    rec("promote", lzc.lzc_promote, root + b"/clone")
    rec("promoted-origin", zfs_get, "origin", fs)
    rec("promote-not-clone", lzc.lzc_promote, root + b"/clone")
    rec("promote-missing", lzc.lzc_promote, root + b"/nope")
    rec("promote-bad-name", lzc.lzc_promote, root + b"/bad!")
    rec("rename", lzc.lzc_rename, root + b"/clone2", root + b"/renamed")
    rec("renamed", lambda: (lzc.lzc_exists(root + b"/clone2"), lzc.lzc_exists(root + b"/renamed")))
    rec("rename-exists", lzc.lzc_rename, root + b"/renamed", fs)
    rec("rename-missing", lzc.lzc_rename, root + b"/nope", root + b"/nope2")
    rec("rename-no-parent", lzc.lzc_rename, root + b"/renamed", root + b"/no/x")
    rec("rename-bad-target", lzc.lzc_rename, root + b"/renamed", root + b"/bad!")
    rec("rename-other-pool", lzc.lzc_rename, root + b"/renamed", b"nopool/x")
    lzc.lzc_create(root + b"/vol", ds_type="zvol", props={b"volsize": 8 << 20})
    rec("rename-under-zvol", lzc.lzc_rename, root + b"/renamed", root + b"/vol/x")
    lzc.lzc_snapshot([root + b"/clone@c"])
    rec("rollback-to-latest", lzc.lzc_rollback_to, fs, fs + b"@b")
    rec("rollback-to-not-latest", lzc.lzc_rollback_to, root + b"/clone", root + b"/clone@a")
    rec("rollback-to-missing-snap", lzc.lzc_rollback_to, fs, fs + b"@nope")
    rec("rollback-to-missing-fs", lzc.lzc_rollback_to, root + b"/nope", root + b"/nope@a")
    rec("rollback-to-bad-name", lzc.lzc_rollback_to, root + b"/bad!", root + b"/bad!@a")
    rec("snaprange", lambda: lzc.lzc_snaprange_space(root + b"/clone@a", fs + b"@b") >= 0)
    rec("snaprange-one", lambda: lzc.lzc_snaprange_space(fs + b"@b", fs + b"@b") >= 0)
    rec("snaprange-reversed", lzc.lzc_snaprange_space, fs + b"@b", root + b"/clone@a")
    rec("snaprange-missing", lzc.lzc_snaprange_space, fs + b"@b", fs + b"@nope")
    rec("snaprange-bad-name", lzc.lzc_snaprange_space, fs + b"@b", fs + b"@bad!")
    rec("snaprange-not-snapshot", lzc.lzc_snaprange_space, fs, fs + b"@b")
    rec("snaprange-other-pool", lzc.lzc_snaprange_space, b"nopool/x@a", fs + b"@b")


def test_clone_promote_rename(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_clone_promote_rename)
    ok(rec, "clone")
    ok(rec, "clone-origin", ("ROOT/fs@a", "-"))
    ok(rec, "clone-props-set", ("v", "local"))
    raised(rec, "clone-exists", "FilesystemExists")
    raised(rec, "clone-missing-origin", "DatasetNotFound")
    raised(rec, "clone-missing-parent", "DatasetNotFound")
    raised(rec, "clone-bad-name", "FilesystemNameInvalid")
    raised(rec, "destroy-cloned-origin", "SnapshotDestructionFailure", ["SnapshotIsCloned"])
    ok(rec, "promote")
    ok(rec, "promoted-origin", ("ROOT/clone@a", "-"))
    raised(rec, "promote-not-clone", "NotClone")
    raised(rec, "promote-missing", "FilesystemNotFound")
    ok(rec, "rename")
    ok(rec, "renamed", (False, True))
    raised(rec, "rename-exists", "FilesystemExists")
    raised(rec, "rename-missing", "FilesystemNotFound")
    raised(rec, "rename-bad-target", "FilesystemNameInvalid")
    raised(rec, "rename-under-zvol", "WrongParent")
    ok(rec, "rollback-to-latest")
    raised(rec, "rollback-to-not-latest", "SnapshotNotLatest")
    ok(rec, "snaprange-one", True)
    raised(rec, "snaprange-missing", "SnapshotNotFound")


# ---------------------------------------------------------------------------
# Encryption keys


def scenario_keys(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    enc = root + b"/enc"
    with tempfile.TemporaryDirectory() as tmp:
        key, new_key, wrong = os.urandom(32), os.urandom(32), os.urandom(32)
        keyfile = Path(tmp) / "key"
        keyfile.write_bytes(key)
        sh(
            "zfs",
            "create",
            "-o",
            "encryption=on",
            "-o",
            "keyformat=raw",
            "-o",
            f"keylocation=file://{keyfile}",
            enc.decode(),
        )
        rec("unload-mounted", lzc.lzc_unload_key, enc)
        sh("zfs", "unmount", enc.decode())
        rec("unload", lzc.lzc_unload_key, enc)
        rec("keystatus-unloaded", zfs_get, "keystatus", enc)
        rec("unload-again", lzc.lzc_unload_key, enc)
        rec("change-key-unloaded", lzc.lzc_change_key, enc, "new_key", key=new_key)
        rec("verify-wrong", lzc.lzc_load_key, enc, True, wrong)
        rec("verify-right", lzc.lzc_load_key, enc, True, key)
        rec("keystatus-after-verify", zfs_get, "keystatus", enc)
        rec("load-wrong", lzc.lzc_load_key, enc, False, wrong)
        rec("load", lzc.lzc_load_key, enc, False, key)
        rec("load-again", lzc.lzc_load_key, enc, False, key)
        rec("load-missing", lzc.lzc_load_key, root + b"/nope", False, key)
        rec("load-unencrypted", lzc.lzc_load_key, root, False, key)
        rec("load-bad-name", lzc.lzc_load_key, root + b"/bad!", False, key)
        rec("load-short-key", lzc.lzc_load_key, enc, True, key[:16])
        rec("change-key-bad-command", lzc.lzc_change_key, enc, "rotate", key=new_key)
        keyformat = {b"keyformat": lzc.zfs_keyformat.ZFS_KEYFORMAT_RAW}
        rec("change-key", lzc.lzc_change_key, enc, "new_key", keyformat, new_key)
        sh("zfs", "unmount", enc.decode(), check=False)
        lzc.lzc_unload_key(enc)
        rec("load-old-key", lzc.lzc_load_key, enc, False, key)
        rec("load-new-key", lzc.lzc_load_key, enc, False, new_key)
        rec("change-key-inherit-no-parent-key", lzc.lzc_change_key, enc, "inherit")
        rec("change-key-missing", lzc.lzc_change_key, root + b"/nope", "new_key", keyformat, new_key)
        rec("unload-missing", lzc.lzc_unload_key, root + b"/nope")
        rec("unload-unencrypted", lzc.lzc_unload_key, root)
        child = enc + b"/child"
        lzc.lzc_create(child)
        rec("child-encryptionroot", zfs_get, "encryptionroot", child)
        own = {**keyformat, b"keylocation": b"prompt"}  # a new encryption root needs its own keylocation
        rec("child-new-key-no-location", lzc.lzc_change_key, child, "new_key", keyformat, key)
        rec("child-new-key", lzc.lzc_change_key, child, "new_key", own, key)
        rec("child-own-root", zfs_get, "encryptionroot", child)
        rec("child-inherit", lzc.lzc_change_key, child, "inherit")
        rec("child-inherited-root", zfs_get, "encryptionroot", child)
        rec(
            "create-with-key",
            lzc.lzc_create,
            root + b"/enc2",
            props={
                b"encryption": lzc.zio_encrypt.ZIO_CRYPT_AES_256_GCM,
                b"keyformat": keyformat[b"keyformat"],
                b"keylocation": b"prompt",
            },
            key=key,
        )
        rec("created-encryption", zfs_get, "encryption", root + b"/enc2")
        sh("zfs", "destroy", "-r", enc.decode())


def test_encryption_keys(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_keys)
    for step in rec.log:
        print(step)
    raised(rec, "unload-mounted", "DatasetBusy")
    ok(rec, "unload")
    ok(rec, "keystatus-unloaded", ("unavailable", "-"))
    raised(rec, "unload-again", "EncryptionKeyNotLoaded")
    raised(rec, "change-key-unloaded", "PropertyInvalid")  # the kernel answers EINVAL, not EACCES
    raised(rec, "verify-wrong", "EncryptionKeyInvalid")
    ok(rec, "verify-right")
    ok(rec, "keystatus-after-verify", ("unavailable", "-"))
    raised(rec, "load-wrong", "EncryptionKeyInvalid")
    ok(rec, "load")
    raised(rec, "load-again", "EncryptionKeyAlreadyLoaded")
    raised(rec, "load-missing", "FilesystemNotFound")
    raised(rec, "load-bad-name", "FilesystemNameInvalid")
    raised(rec, "load-unencrypted", "PropertyInvalid")
    raised(rec, "load-short-key", "PropertyInvalid")
    raised(rec, "unload-unencrypted", "EncryptionKeyNotLoaded")
    raised(rec, "change-key-inherit-no-parent-key", "PropertyInvalid")
    raised(rec, "child-new-key-no-location", "PropertyInvalid")
    raised(rec, "change-key-bad-command", "UnknownCryptCommand")
    ok(rec, "change-key")
    raised(rec, "load-old-key", "EncryptionKeyInvalid")
    ok(rec, "load-new-key")
    raised(rec, "change-key-missing", "FilesystemNotFound")
    ok(rec, "child-encryptionroot", ("ROOT/enc", "-"))
    ok(rec, "child-new-key")
    ok(rec, "child-own-root", ("ROOT/enc/child", "-"))
    ok(rec, "child-inherit")
    ok(rec, "child-inherited-root", ("ROOT/enc", "-"))
    ok(rec, "created-encryption", ("aes-256-gcm", "-"))


# ---------------------------------------------------------------------------
# Pools: sync, reopen, checkpoints (on a pool of their own)

CHECKPOINT_POOL = "lzcckpt"


def scenario_pools(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    pool = root.split(b"/")[0]
    rec("sync", lzc.lzc_sync, pool)
    rec("sync-force", lzc.lzc_sync, pool, True)
    rec("sync-missing", lzc.lzc_sync, b"nosuchpool")
    rec("reopen", lzc.lzc_reopen, pool)
    rec("reopen-no-restart", lzc.lzc_reopen, pool, False)
    rec("reopen-missing", lzc.lzc_reopen, b"nosuchpool")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        vdev = Path(tmp) / "ckpt.img"
        with vdev.open("wb") as f:
            f.truncate(128 << 20)
        sh("zpool", "create", "-f", CHECKPOINT_POOL, str(vdev))
        name = CHECKPOINT_POOL.encode()
        try:
            rec("discard-none", lzc.lzc_pool_checkpoint_discard, name)
            rec("checkpoint", lzc.lzc_pool_checkpoint, name)
            rec("zpool-sees-checkpoint", lambda: "checkpoint" in sh("zpool", "status", CHECKPOINT_POOL))
            rec("checkpoint-again", lzc.lzc_pool_checkpoint, name)
            rec("discard", lzc.lzc_pool_checkpoint_discard, name)
            sh("zpool", "wait", "-t", "discard", CHECKPOINT_POOL)
            rec("discard-again", lzc.lzc_pool_checkpoint_discard, name)
            rec("checkpoint-after-discard", lzc.lzc_pool_checkpoint, name)
            rec("checkpoint-missing-pool", lzc.lzc_pool_checkpoint, b"nosuchpool")
            rec("discard-missing-pool", lzc.lzc_pool_checkpoint_discard, b"nosuchpool")
        finally:
            sh("zpool", "destroy", "-f", CHECKPOINT_POOL, check=False)


def test_pools(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_pools)
    for label in ("sync", "sync-force", "reopen", "reopen-no-restart", "checkpoint", "discard"):
        ok(rec, label)
    raised(rec, "sync-missing", "PoolNotFound")
    raised(rec, "reopen-missing", "PoolNotFound")
    raised(rec, "discard-none", "CheckpointNotFound")
    ok(rec, "zpool-sees-checkpoint", True)
    raised(rec, "checkpoint-again", "CheckpointExists")
    raised(rec, "discard-again", "CheckpointNotFound")
    ok(rec, "checkpoint-after-discard")
    raised(rec, "checkpoint-missing-pool", "PoolNotFound")


# ---------------------------------------------------------------------------
# The receive family with a header, resumable receives and send_resume


@contextmanager
def _stream_file(stream: bytes) -> Iterator[IO[bytes]]:
    with tempfile.TemporaryFile() as f:
        f.write(stream)
        f.seek(0)
        yield f


def _receive_after_header(lzc: ModuleType, function: str, snap: bytes, stream: bytes, **kwargs: Any) -> Any:
    """receive_header then one of the receives that take its record, on the same fd."""
    with _stream_file(stream) as f:
        _, record = lzc.receive_header(f.fileno())
        return getattr(lzc, function)(snap, f.fileno(), record, **kwargs)


def _header_summary(lzc: ModuleType, stream: bytes) -> tuple[Any, ...]:
    with _stream_file(stream) as f:
        header, _ = lzc.receive_header(f.fileno())
    return (
        sorted(header),
        header["drr_magic"],
        header["drr_type"],
        header["drr_toname"],
        header["drr_toguid"] != 0,
        header["drr_fromguid"],
    )


def _resume_position(token: str) -> tuple[int, int]:
    """(object, offset) of a receive_resume_token, as `zfs send -nv -t` prints them."""
    out = sh("zfs", "send", "-nv", "-t", token)
    obj = re.search(r"\bobject = (\S+)", out)
    off = re.search(r"\boffset = (\S+)", out)
    assert obj and off, out
    return int(obj.group(1), 0), int(off.group(1), 0)


def scenario_receives(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    fs = root + b"/fs"
    lzc.lzc_create(fs)
    data = os.urandom(3 << 20)
    _write(mountpoint(fs) / "data", data)
    lzc.lzc_snapshot([fs + b"@s1"])
    _write(mountpoint(fs) / "more", b"more\n")
    lzc.lzc_snapshot([fs + b"@s2"])
    full = _send_to_bytes(lzc, fs + b"@s1", None)
    incr = _send_to_bytes(lzc, fs + b"@s2", fs + b"@s1")
    rec("header", _header_summary, lzc, full)
    rec("header-incremental-has-from", lambda: _header_summary(lzc, incr)[5] != 0)
    rec("header-short", _header_summary, lzc, full[:100])
    rec("with-header", _receive_after_header, lzc, "lzc_receive_with_header", root + b"/h@s1", full)
    rec("with-header-content", lambda: (mountpoint(root + b"/h") / "data").read_bytes() == data)
    rec("with-header-exists", _receive_after_header, lzc, "lzc_receive_with_header", root + b"/h@s1", full)
    rec("with-header-no-parent", _receive_after_header, lzc, "lzc_receive_with_header", root + b"/x/y@s1", full)
    rec(
        "with-header-incr",
        _receive_after_header,
        lzc,
        "lzc_receive_with_header",
        root + b"/h@s2",
        incr,
        props={b"user:p": b"1"},
    )
    rec("with-header-props", zfs_get, "user:p", root + b"/h")
    one = _receive_after_header(lzc, "lzc_receive_one", root + b"/one@s1", full, props={b"user:o": b"1"})
    rec("one", lambda: (one[0] > len(data), one[1]))
    rec("one-props", zfs_get, "user:o", root + b"/one")
    rec(
        "one-bad-prop",
        _receive_after_header,
        lzc,
        "lzc_receive_one",
        root + b"/one2@s1",
        full,
        props={b"nosuchprop": b"x"},
    )
    rec("one-bad-prop-received-anyway", lzc.lzc_exists, root + b"/one2@s1")
    rec("one-exists", _receive_after_header, lzc, "lzc_receive_one", root + b"/one@s1", full)
    rec(
        "one-no-handle",
        lambda: _receive_after_header(lzc, "lzc_receive_one", root + b"/one3@s1", full, action_handle=None)[1],
    )
    cmdprops = {b"compression": 1, b"user:c": b"local"}
    cmd = _receive_after_header(
        lzc, "lzc_receive_with_cmdprops", root + b"/cmd@s1", full, props={b"user:r": b"received"}, cmdprops=cmdprops
    )
    rec("cmdprops", lambda: (cmd[0] > len(data), cmd[1]))
    rec("cmdprops-set", lambda: [zfs_get(p, root + b"/cmd") for p in ("compression", "user:c", "user:r")])
    rec(
        "cmdprops-missing-origin",
        _receive_after_header,
        lzc,
        "lzc_receive_with_cmdprops",
        root + b"/cmd2@s2",
        incr,
        origin=fs + b"@nope",
    )
    # A stream cut short, kept for resuming, then completed by lzc_send_resume.
    rec("resumable-cut", _receive_bytes_resumable, lzc, root + b"/res@s1", full[: len(full) // 2])
    token = zfs_get("receive_resume_token", root + b"/res")[0]
    rec("resume-token", lambda: token not in ("", "-"))
    obj, off = _resume_position(token)
    rest = _send_resume_to_bytes(lzc, fs + b"@s1", obj, off)
    rec("resume-stream-shorter", lambda: 0 < len(rest) < len(full))
    rec("resumed", _receive_bytes_resumable, lzc, root + b"/res@s1", rest)
    rec("resumed-content", lambda: (mountpoint(root + b"/res") / "data").read_bytes() == data)
    rec("resumable-garbage", _receive_bytes_resumable, lzc, root + b"/junk@s", b"\0junk" * 1000)
    with tempfile.TemporaryFile() as f:
        rec("send-resume-missing", lzc.lzc_send_resume, fs + b"@nope", None, f.fileno(), None, 1, 0)
        rec("send-resume-bad-flag", lzc.lzc_send_resume, fs + b"@s1", None, f.fileno(), ["bogus"])
        rec("send-resume-not-ancestor", lzc.lzc_send_resume, fs + b"@s1", fs + b"@s2", f.fileno())
        rec("send-resume-negative", lzc.lzc_send_resume, fs + b"@s1", None, f.fileno(), None, -1, 0)
    if openzfs_version() >= (2, 2):  # pyzfs 2.1 has no such function (see test_receive_with_heal_needs_openzfs_2_2)
        rec("heal", lambda: _receive_after_header(lzc, "lzc_receive_with_heal", fs + b"@s1", full)[1])
        rec("heal-missing-snapshot", _receive_after_header, lzc, "lzc_receive_with_heal", root + b"/nope@s1", full)


def _receive_bytes_resumable(lzc: ModuleType, snap: bytes, stream: bytes) -> None:
    with _stream_file(stream) as f:
        lzc.lzc_receive_resumable(snap, f.fileno())


def _send_resume_to_bytes(lzc: ModuleType, snap: bytes, obj: int, off: int) -> bytes:
    with tempfile.TemporaryFile() as f:
        lzc.lzc_send_resume(snap, None, f.fileno(), None, obj, off)
        f.seek(0)
        return f.read()


def test_receives_with_header_and_resume(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_receives)
    for step in rec.log:
        print(step)
    fields = [
        "drr_creation_time",
        "drr_flags",
        "drr_fromguid",
        "drr_magic",
        "drr_toguid",
        "drr_toname",
        "drr_type",
        "drr_versioninfo",
    ]
    ok(rec, "header", (fields, 0x2F5BACBAC, 2, b"ROOT/fs@s1", True, 0))
    ok(rec, "header-incremental-has-from", True)
    raised(rec, "header-short", "ValueError")
    ok(rec, "with-header-content", True)
    raised(rec, "with-header-exists", "DatasetExists")
    raised(rec, "with-header-no-parent", "DatasetNotFound")
    ok(rec, "with-header-props", ("1", "received"))
    ok(rec, "one", (True, 0))
    ok(rec, "one-props", ("1", "received"))
    raised(rec, "one-bad-prop", "ReceivePropertyFailure", ["PropertyInvalid"])
    ok(rec, "one-bad-prop-received-anyway", True)
    raised(rec, "one-exists", "DatasetExists")
    ok(rec, "one-no-handle", None)
    ok(rec, "cmdprops", (True, 0))
    ok(rec, "cmdprops-set", [("on", "local"), ("local", "local"), ("received", "received")])
    ok(rec, "resume-token", True)
    ok(rec, "resume-stream-shorter", True)
    ok(rec, "resumed")
    ok(rec, "resumed-content", True)
    raised(rec, "resumable-cut", "StreamTruncated")
    raised(rec, "resumable-garbage", "BadStream")
    raised(rec, "cmdprops-missing-origin", "DatasetNotFound")
    raised(rec, "send-resume-missing", "SnapshotNotFound")
    raised(rec, "send-resume-bad-flag", "UnknownStreamFeature")
    raised(rec, "send-resume-negative", "OverflowError")
    if openzfs_version() >= (2, 2):
        ok(rec, "heal", 0)


def test_receive_with_heal_needs_openzfs_2_2(shim: ModuleType, pyzfs: ModuleType) -> None:
    if openzfs_version() >= (2, 2):
        assert shim.is_supported(shim.lzc_receive_with_heal) and pyzfs.is_supported(pyzfs.lzc_receive_with_heal)
    else:
        assert not hasattr(pyzfs, "lzc_receive_with_heal")
        assert shim.is_supported(shim.lzc_receive_with_heal) is False
        with pytest.raises(NotImplementedError, match="lzc_receive_with_heal"):
            shim.lzc_receive_with_heal(b"p/a@s", 0, None)


# ---------------------------------------------------------------------------
# pyzfs's stubs and typed nvlist values


def scenario_stubs(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    rec("inherit-prop", lzc.lzc_inherit_prop, root, b"user:x")
    rec("set-props", lzc.lzc_set_props, root, b"user:x", b"v")
    rec("get-props", lzc.lzc_get_props, root)
    rec("list-children", lzc.lzc_list_children, root)
    rec("list-snaps", lzc.lzc_list_snaps, root)
    rec("names", lambda: [f.__name__ for f in (lzc.lzc_inherit_prop, lzc.lzc_set_props, lzc.lzc_get_props)])


def test_clusterhq_functions_are_not_implemented(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_stubs)
    for label in ("inherit-prop", "set-props", "get-props", "list-children", "list-snaps"):
        raised(rec, label, "NotImplementedError")
    ok(rec, "names", ["lzc_inherit", "lzc_set_props", "lzc_get_props"])


def scenario_typed_values(lzc: ModuleType, root: bytes, rec: Recorder) -> None:
    pool = root.split(b"/")[0]
    c = lzc.ctypes
    # A channel program's argv takes int64, not uint64 (what a plain int becomes): only a typed value passes
    params = {b"i64": c.int64_t(-5), b"bool": c.boolean_t(1)}
    rec("typed-argv", lzc.lzc_channel_program_nosync, pool, b'return (...)["argv"]', params=params)
    rec("plain-int-argv", lzc.lzc_channel_program_nosync, pool, b"return 1", params={b"n": 7})
    # zcp refuses other nvpair types in argv (EINVAL with a message): the same for both
    rec("typed-int32-argv", lzc.lzc_channel_program_nosync, pool, b"return 1", params={b"i": c.int32_t(5)})
    rec("typed-array-argv", lzc.lzc_channel_program_nosync, pool, b"return 1", params={b"a": [c.int64_t(-1)]})
    rec("sync-typed-boolean", lzc.lzc_sync, pool, c.boolean_t(1))
    rec("sync-typed-wrong-type", _class_and_errno, lzc.lzc_sync, pool, c.int32_t(1))
    rec("overflow", c.uint8_t, 256)
    rec("negative-unsigned", c.uint32_t, -1)
    rec("bad-boolean", c.boolean_t, 2)
    rec("mixed-c-types", lzc.lzc_channel_program_nosync, pool, b"return 1", params={b"x": [c.int8_t(1), c.int16_t(1)]})
    rec("names", lambda: [f.__name__ for f in (c.int8_t, c.uchar_t, c.boolean_t)])


def _class_and_errno(fn: Any, *args: Any) -> tuple[str, int | None] | None:
    """What ``fn`` raised, as (class name, errno): pyzfs swaps a ZFSGenericError's name and message
    (a difference the shim keeps on purpose), so the whole exception would not compare."""
    try:
        fn(*args)
    except Exception as err:
        return type(err).__name__, getattr(err, "errno", None)
    return None


def test_typed_nvlist_values(shim: ModuleType, pyzfs: ModuleType, dataset: str) -> None:
    rec = run_both(shim, pyzfs, dataset, scenario_typed_values)
    kind, result = rec.outcome("typed-argv")
    assert kind == "ok", result
    assert result == {b"i64": -5, b"bool": True}
    raised(rec, "plain-int-argv", "ZCPSyntaxError")  # "Unhandled nvpair type 8"
    raised(rec, "typed-int32-argv", "ZCPSyntaxError")
    ok(rec, "sync-typed-boolean")
    ok(rec, "sync-typed-wrong-type", ("ZFSGenericError", 1024 + 8))  # ZFS_ERR_IOC_ARG_BADTYPE
    raised(rec, "overflow", "OverflowError")
    raised(rec, "negative-unsigned", "OverflowError")
    raised(rec, "bad-boolean", "OverflowError")
    raised(rec, "mixed-c-types", "TypeError")
    ok(rec, "names", ["int8_t", "uchar_t", "boolean_t"])


def test_typed_values_round_trip_through_real_libnvpair(shim: ModuleType) -> None:
    """Each C type arrives as that nvpair type: the decoder gives the same numbers back."""
    codec = shim._lib()._nv
    c = shim.ctypes
    value = {
        b"i8": c.int8_t(-128),
        b"u16": c.uint16_t(65535),
        b"i64": c.int64_t(-1),
        b"u64": c.uint64_t(2**64 - 1),
        b"bool": c.boolean_t(0),
        b"u32s": [c.uint32_t(0), c.uint32_t(2**32 - 1)],
        b"i8s": [c.int8_t(-1)],
        b"N_MORE_ERRORS": -3,
        b"rewind-request": [1, 2],
    }
    with codec.nvlist_in(value) as nvl:
        assert codec.to_dict(nvl) == {
            b"i8": -128,
            b"u16": 65535,
            b"i64": -1,
            b"u64": 2**64 - 1,
            b"bool": False,
            b"u32s": [0, 2**32 - 1],
            b"i8s": [-1],
            b"N_MORE_ERRORS": -3,
            b"rewind-request": [1, 2],
        }
