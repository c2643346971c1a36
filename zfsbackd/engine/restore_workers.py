"""Restore worker processes: batches of a restore's files written by other interpreters.

The processes themselves (spawning, the pipe, results, progress, logs, a worker that dies,
cancellation) are :mod:`zfsbackd.engine.workers`'; this module is what a restore gives them to do.

Why: restoring a small file is about 80 µs of CPU, half of it Python (create, write, metadata, a
blob read and authenticated) under one GIL; the system calls of two writer threads overlap the
Python of one, not of two. A second interpreter is the way to the second core.

Shape: the restore's own :class:`~zfsbackd.engine.restorer.Restorer` walks the backup's trees,
creates the directories and batches the files, as always. Once a restore has batched
``pools.PARALLEL_AFTER_ENTRIES`` files (20,000), it starts ``pools.RESTORE_PROCESSES - 1`` workers,
and from then on a batch it cuts goes to
a worker as a :class:`RestoreBatch` whenever one has room; otherwise its own threads write the
batch. A worker gets the batch's files (name, node, path in the restore) and, with them, a
descriptor of each of their directories (``SCM_RIGHTS``): it never opens a path of the target, so
the rules of restorer.py's docstring hold for it unchanged. It plans the batch's pack reads, writes
the files with its own :class:`~zfsbackd.engine.restore_files.FileWriter` (every blob authenticated
as it is read) and returns a :class:`BatchOutcome`. Hard links, symlinks and directory metadata
stay with the restore's process: they come after every file is in, and by then every batch is.

A worker that dies fails the restore (:class:`~zfsbackd.errors.WorkerProcessLost`), which is then
kept as ``zfsbackd-failed-restore_*`` like any failed restore: run it again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from zfsbackd import faults, pools
from zfsbackd.config import Config
from zfsbackd.engine.progress import Progress
from zfsbackd.engine.restore_files import BoundedJobs, FileWriter, RestoreTarget
from zfsbackd.engine.workers import Channel, Job
from zfsbackd.errors import RestoreError, WorkerProcessLost, ZfsbackdError
from zfsbackd.store.packcache import PackCache
from zfsbackd.store.tree import Node

#: a file of a batch: (index of its directory's descriptor among the batch's, name, node, path)
BatchFile = tuple[int, bytes, Node, bytes]


@dataclass(frozen=True)
class RestoreBatch:
    """Files to write, each into one of the descriptors sent with the batch; ``bytes_done``: the file data
    the restore had written when it sent them (for a "target full" message)."""

    files: list[BatchFile]
    bytes_done: int


@dataclass(frozen=True)
class BatchOutcome:
    """What a worker wrote of one batch, and the extended attributes it could not restore."""

    files: int
    bytes: int
    xattrs_not_restored: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestoreContext:
    """What every worker of one restore needs, sent once when it starts (picklable)."""

    kind: ClassVar[str] = "restore"

    config: Config
    region: str
    backup_id: str
    dest_path: Path
    target_path: Path
    planned_bytes: int

    def serve(self, jobs: Iterator[Job], channel: Channel, cancel: threading.Event) -> None:
        """Write each batch; a batch that fails is reported, and the restore's process decides."""
        from zfsbackd.engine.engine import Engine  # the engine imports the restorer, which imports this

        store = Engine(self.config).store(self.region)
        store.load_index(record_adopted=False)
        progress = Progress(on_update=channel.report_progress)
        target = RestoreTarget(self.backup_id, self.dest_path, self.target_path, planned_bytes=self.planned_bytes)
        with (
            ThreadPoolExecutor(max_workers=pools.RESTORE_WORKERS, thread_name_prefix="zfsbackd-restore") as pool,
            ThreadPoolExecutor(max_workers=pools.RESTORE_FETCH_WORKERS, thread_name_prefix="zfsbackd-fetch") as fetch,
        ):
            writer = FileWriter(store, target, progress, fetch)
            try:
                for job in jobs:
                    try:
                        outcome = _write_batch(writer, pool, job, cancel)
                    except ZfsbackdError as exc:
                        channel.failed(job, exc)
                        continue
                    finally:
                        for fd in job.fds:
                            os.close(fd)
                    if cancel.is_set():
                        raise self.cancelled()
                    faults.point("restore-batch-written")
                    channel.done(job, outcome)
            finally:
                channel.report_progress(progress)

    def lost(self, which: str, how: str) -> WorkerProcessLost:
        return WorkerProcessLost(
            f"{which} of this restore ended before its files were written{how}; the restore failed and what it "
            "wrote was kept as zfsbackd-failed-restore_*. Delete that and run the restore again. If the system "
            "log shows the OOM killer, give the service more memory"
        )

    def cancelled(self) -> BaseException:
        return RestoreError(f"restore of backup {self.backup_id}: stopped by its own process")

    def release(self) -> None:
        """Nothing to let go of: every batch's descriptors are closed with the batch."""


def _write_batch(writer: FileWriter, pool: ThreadPoolExecutor, job: Job, cancel: threading.Event) -> BatchOutcome:
    """Write one batch on the worker's threads (its reads planned first); what it wrote, once all is written."""
    batch: RestoreBatch = job.data
    target = writer.target
    target.space_fd = job.fds[0]
    target.bytes_done = max(target.bytes_done, batch.bytes_done)
    xattrs_before, warnings_before = writer.xattrs_not_restored, len(writer.warnings)
    packs = PackCache(writer.store, (bytes.fromhex(c[2]) for f in batch.files for c in f[2].get("chunks", ())))
    jobs = BoundedJobs(pool, stop=cancel)
    fds = job.fds
    writer.submit(jobs, packs, ((key, fds[key], name, node, rel) for key, name, node, rel in batch.files), _kept)
    written = jobs.wait()
    return BatchOutcome(
        len(batch.files),
        written,
        writer.xattrs_not_restored - xattrs_before,
        tuple(writer.warnings[warnings_before:]),
    )


def _kept(_key: int) -> None:
    """A worker's directories stay open until its whole batch is written (then the batch closes them)."""
