"""Archive worker processes: whole subdirectories of one backup archived by other interpreters.

The processes themselves (spawning, the pipe, results, progress, logs, a worker that dies,
cancellation) are :mod:`zfsbackd.engine.workers`'; this module is what a backup gives them to do.

Shape: the backup's own :class:`~zfsbackd.engine.archiver.Archiver` walks the tree as always.
Once it has listed ``pools.PARALLEL_AFTER_ENTRIES`` entries it starts a :class:`~zfsbackd.engine.workers.WorkerPool`
of ``pools.ARCHIVE_PROCESSES - 1`` workers, and from then on a subdirectory it meets goes to a worker
as a :class:`ShardJob` whenever one has room (``WorkerPool.has_room``); otherwise the walk
enters it itself, as before. So this process works too, and the work balances itself: whoever is
free takes the next directory, at any depth (one bigger than a fair share by the parent backup is
never sent whole: the walk enters it and sends its children). A worker has its own
:class:`~zfsbackd.store.repository.Store` on the same ``state_dir`` (the SQLite index cache is
shared, WAL), its own :class:`~zfsbackd.store.writer.PackWriter` for all its jobs, and an Archiver
that walks each job's directory exactly as the parent would (same trees, same ids), returning the
subtree id and its totals; the parent puts the directory's node in its tree.

Commit order is kept: a worker's subtrees may name blobs still in its unfinished pack, so the parent
writes the backup's record only after ``WorkerPool.finish``, which returns when every worker has
flushed (packs, then an index naming them). A worker that dies before that fails the backup
(:class:`~zfsbackd.errors.WorkerProcessLost`): what it returned may not be durable. Its uploaded
packs are reused by the next backup, like those of any killed writer. A cancelled worker stops like
an in-process walk does (``BackupCancelled``, its writer flushed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from zfsbackd import pools
from zfsbackd.config import Config
from zfsbackd.engine.progress import Progress
from zfsbackd.engine.workers import Channel, Job
from zfsbackd.errors import WorkerProcessLost, ZfsbackdError
from zfsbackd.snapshot.base import Snapshot
from zfsbackd.store.records import BackupStats
from zfsbackd.store.tree import Node
from zfsbackd.store.writer import WriterStats


@dataclass(frozen=True)
class ShardContext:
    """What every worker of one backup needs, sent once when it starts (picklable)."""

    kind: ClassVar[str] = "archive"

    config: Config
    region: str
    snapshot: Snapshot  # pickled as a reader of the same snapshot (Snapshot.__reduce__)
    fs_id: str
    backup_id: str
    on_entry_error: str

    def serve(self, jobs: Iterator[Job], channel: Channel, cancel: threading.Event) -> tuple[BackupStats, WriterStats]:
        """Archive each job's directory; flush (also when cancelled); report the stats of it all (the
        backup's process adds every worker's to its own)."""
        from zfsbackd.engine.archiver import Archiver  # the archiver imports this module
        from zfsbackd.engine.engine import Engine
        from zfsbackd.store.writer import PackWriter

        store = Engine(self.config).store(self.region)
        progress = Progress(on_update=channel.report_progress)
        with (
            store.helping_writer(),
            PackWriter(
                store,
                upload_threads=pools.WORKER_UPLOAD_THREADS,
                max_packs_in_flight=pools.WORKER_PACKS_IN_FLIGHT,
                on_uploaded=progress.uploaded,
            ) as writer,
        ):
            store.load_index()
            archiver = Archiver(
                store,
                writer,
                self.snapshot,
                None,
                progress=progress,
                cancel=cancel,
                on_entry_error=self.on_entry_error,  # type: ignore[arg-type]
                fs_id=self.fs_id,
                backup_id=self.backup_id,
            )
            try:
                for job in jobs:
                    try:
                        outcome = archiver.archive_job(job.data)
                    except ZfsbackdError as exc:
                        channel.failed(job, exc)
                        continue
                    channel.done(job, outcome)
            finally:
                writer.flush()  # also when cancelled: a resumed backup reuses what was read
                store.flush_caches()
                channel.report_progress(progress)
        return archiver.counters.stats, writer.stats

    def lost(self, which: str, how: str) -> WorkerProcessLost:
        return WorkerProcessLost(
            f"{which} of this backup ended before its data was durable{how}; the backup failed. Run it "
            "again: the packs already uploaded are reused. If the system log shows the OOM killer, give the "
            "service more memory"
        )

    def cancelled(self) -> BaseException:
        from zfsbackd.engine.archiver import BackupCancelled  # the archiver imports this module

        return BackupCancelled()

    def release(self) -> None:
        self.snapshot.close()


@dataclass(frozen=True)
class ShardJob:
    """One subdirectory to archive: its path, device, node so far (metadata, xattrs) and parent node."""

    rel: bytes
    dev: int
    node: Node
    before: Node | None
    unchanged: bool  # the parent node still describes the directory itself (not necessarily its entries)


@dataclass(frozen=True)
class ShardOutcome:
    """A job's result: the directory's tree and what is below it; ``subtree`` None when it could not be
    listed (the worker reported the entry problem); ``reused``: the parent node stands for it whole."""

    subtree: str | None
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    reused: bool = False
