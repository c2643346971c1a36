"""Deterministic fault points: kill this process at an exact step, for crash-safety tests.

Crash-safety claims ("a SIGKILL at any moment leaves only unreferenced objects,
and the next run resumes") are only as good as the moments they were tested at.
Waiting for a file count and then sending a signal races the process being
killed; a fault point does not. Set

    ZFSBACKD_FAULT_POINT=<point>:<n>

in the environment of a zfsbackd process and it SIGKILLs itself the *n*-th time
(1-based) it reaches ``<point>``, exactly as an OOM kill or a power cut would
stop it: no cleanup, no ``finally``. Unset (always, in production) it costs one
comparison per call. ``<point>:delay=<seconds>`` instead sleeps that long at
every hit: a backup of N packs then lasts at least N times as long on any
machine, so a test that must stop it midway (``systemctl stop``) does not race
its end. ``<point>:<n>:pause=<path>`` holds the thread that reaches the n-th
hit: it creates ``<path>.paused`` and waits until ``<path>`` exists (a test
holds a daemon's backup after its second pack while another host collects).

The points, where they are, and what is durable when they fire:

- ``pack-uploaded``: a pack is in the store (any writer: backup, copy, garbage
  collection); maybe no index names it yet.
- ``index-written``: an index object (checkpoint or consolidated) is in the
  store, with every pack it names.
- ``index-cache-written``: the local index cache (``state_dir/cache``, not the
  store) has the rows of a sync or of an index object this process wrote in
  its file, inside the write transaction, not committed yet: a kill here must
  leave the cache as it was (WAL rollback), and the next open reads those index
  objects again.
- ``listing-cache-written``: the local listing cache (``state_dir/cache``,
  zfsbackd.store.listingcache) has a batch of rows in its file, inside the write
  transaction, not committed yet: a kill here must leave the cache valid and without
  them (WAL rollback); the next backup compares those directories entry by entry.
- ``shard-archived``: an archive worker process (zfsbackd.engine.shards) archived one
  subdirectory; its blobs may still be in the worker's unwritten pack. Reached in the
  worker only: a kill here is a worker lost mid-backup.
- ``archive-result-received`` / ``restore-result-received``: the operation's own process
  received one job's result from a worker process (zfsbackd.engine.workers: a backup's
  subdirectory, a restore's batch of files); a kill here kills the operation while its
  workers run.
- ``restore-batch-written``: a restore worker process (zfsbackd.engine.restore_workers)
  wrote one batch of files, before it reports it. Reached in the worker only: a kill here
  is a worker lost mid-restore.
- ``backup-data-durable``: a backup's packs and index are durable; its record
  is not AVAILABLE yet.
- ``gc-index-replaced``: garbage collection wrote its new packs and the
  consolidated index and has deleted nothing yet.
- ``gc-pack-deleted``: garbage collection deleted one obsolete pack.
- ``record-deleted``: ``delete-backup`` marked the record DELETED, before
  collection.
- ``restore-file-written``: a restore wrote one file (its data and metadata);
  the restore directory still has its ``zfsbackd-incomplete-restore_`` name.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "ZFSBACKD_FAULT_POINT"


@dataclass(frozen=True)
class _Armed:
    name: str
    kill_at: int = 0  # the n-th hit SIGKILLs the process (0: never)
    delay: float = 0.0  # seconds slept at every hit
    pause_at: int = 0  # the n-th hit waits for ``pause_path`` (0: never)
    pause_path: str = ""


def _parse(value: str | None) -> _Armed | None:
    if not value:
        return None
    name, _, arg = value.partition(":")
    if arg.startswith("delay="):
        return _Armed(name, delay=float(arg.removeprefix("delay=")))
    count, _, mode = arg.partition(":")
    if mode.startswith("pause="):
        return _Armed(name, pause_at=int(count or "1"), pause_path=mode.removeprefix("pause="))
    return _Armed(name, kill_at=int(count or "1"))


_armed = _parse(os.environ.get(ENV_VAR))
_hits = 0
_lock = threading.Lock()


_hooks: dict[str, Callable[[int], None]] = {}
_hook_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Mark one step; SIGKILL the process if this is the armed point's n-th hit."""
    global _hits
    if _hooks and name in _hooks:
        _call_hook(name)
    if _armed is None or _armed.name != name:
        return
    if _armed.delay:
        time.sleep(_armed.delay)
        return
    with _lock:
        _hits += 1
        hit = _hits
    if hit == _armed.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if hit == _armed.pause_at:
        Path(f"{_armed.pause_path}.paused").touch()
        while not os.path.exists(_armed.pause_path):
            time.sleep(0.05)


def _call_hook(name: str) -> None:
    with _lock:
        _hook_hits[name] = hit = _hook_hits.get(name, 0) + 1
        callback = _hooks.get(name)
    if callback is not None:
        callback(hit)


@contextmanager
def hooked(name: str, callback: Callable[[int], None]) -> Iterator[None]:
    """In-process tests: call ``callback(n)`` at the n-th hit of point ``name`` in any thread, e.g. to hold
    a backup still right after its second pack while another host collects garbage."""
    with _lock:
        _hooks[name] = callback
        _hook_hits[name] = 0
    try:
        yield
    finally:
        with _lock:
            _hooks.pop(name, None)
