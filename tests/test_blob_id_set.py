"""The on-disk blob id set that garbage collection and ``check`` mark into (zfsbackd/store/blobidset.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from zfsbackd.errors import StoreError
from zfsbackd.store import blobidset
from zfsbackd.store.blobidset import BlobIdSet


def _ids(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


def test_membership_count_and_order_across_buffer_flushes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(blobidset, "BUFFER_IDS", 1000)  # several sorted batches, not one
    ids = _ids(5000, 1)
    others = _ids(200, 2)
    with BlobIdSet(tmp_path) as marked:
        for i in range(0, len(ids), 7):
            marked.add_many(ids[i : i + 7])
        marked.add_many(ids[:100])  # again: a blob shared by several files
        marked.add(ids[0])
        assert len(marked) == 5000
        assert marked.present([ids[4999], others[0]]) == {ids[4999]}
        assert marked.present(ids[:600] + others) == set(ids[:600])
        listed = [blob_id for batch in marked.batches(333) for blob_id in batch]
        assert listed == sorted(ids)
        assert all(len(batch) <= 333 for batch in marked.batches(333))
        path = marked.path
        assert path.exists() and path.parent == tmp_path
    assert not path.exists()  # the file goes with the set


def test_a_killed_process_set_is_removed_by_the_next_one(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from zfsbackd.store.blobidset import BlobIdSet; "
        "s = BlobIdSet(Path(sys.argv[1])); s.add(b'x' * 32); len(s); print(s.path, flush=True); os._exit(0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [sys.executable, "-c", code, str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    orphan = Path(out.stdout.strip())
    assert orphan.exists()  # the process died without closing it
    foreign = tmp_path / "index.sqlite"
    foreign.write_bytes(b"not ours")
    with BlobIdSet(tmp_path) as fresh:
        assert not orphan.exists()
        assert foreign.exists()  # only sets are touched
        assert fresh.path.exists() and len(fresh) == 0


def test_a_full_file_system_is_a_store_error_naming_the_file(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        with BlobIdSet(small) as marked:
            with pytest.raises(StoreError) as raised:
                marked.add_many(_ids(20_000, 3))  # ~1 MiB of keys: does not fit
                len(marked)
            assert str(marked.path) in raised.value.message and "state_dir" in raised.value.message
        assert not any(small.iterdir())  # the scratch file is gone all the same
    finally:
        subprocess.run(["umount", str(small)], check=True)
