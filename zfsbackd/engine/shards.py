"""Archive worker processes: whole subdirectories of one backup archived by other interpreters.

Why processes: a backup of many small files costs about 100 µs of Python per file (walk, node,
hash, seal, pack, tree), all under one interpreter's GIL; threads only add contention (measured,
bench/README.md). A second interpreter is the way to the second core.

Shape: the backup's own :class:`~zfsbackd.engine.archiver.Archiver` walks the tree as always.
Once it has listed ``pools.PARALLEL_AFTER_ENTRIES`` entries it starts a :class:`ShardPool` of
``pools.ARCHIVE_PROCESSES - 1`` workers, and from then on a subdirectory it meets goes to a worker
as a :class:`ShardJob` whenever one has room (:meth:`ShardPool.has_room`); otherwise the walk
enters it itself, as before. So this process works too, and the work balances itself: whoever is
free takes the next directory, at any depth (one bigger than a fair share by the parent backup is
never sent whole: the walk enters it and sends its children). A worker is a spawned process with
its own :class:`~zfsbackd.store.repository.Store` on the same ``state_dir`` (the SQLite index cache is
shared, WAL), its own :class:`~zfsbackd.store.writer.PackWriter` for all its jobs, and an Archiver
that walks each job's directory exactly as the parent would (same trees, same ids), returning the
subtree id and its totals; the parent puts the directory's node in its tree.

Commit order is kept: a worker's subtrees may name blobs still in its unfinished pack, so the parent
writes the backup's record only after :meth:`ShardPool.finish`, which returns when every worker has
flushed (packs, then an index naming them). A worker that dies before that fails the backup
(:class:`~zfsbackd.errors.WorkerProcessLost`): what it returned may not be durable. Its uploaded
packs are reused by the next backup, like those of any killed writer.

Cancellation has one path: the parent's cancel event. The parent stops waiting and SIGTERMs its
workers (:meth:`ShardPool.close`); a worker's SIGTERM handler sets its own archiver's cancel event,
so it stops like an in-process walk does (``BackupCancelled``, its writer flushed). Workers ignore
SIGINT (Ctrl-C reaches the whole process group; the parent decides) and die with the parent
(``PR_SET_PDEATHSIG``), so a SIGKILLed backup leaves no process behind.

Workers log through the parent (their events are sent to it and logged there, with its
configuration), and report progress the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import structlog

from zfsbackd import faults, pools
from zfsbackd.config import Config
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import WorkerProcessLost, ZfsbackdError
from zfsbackd.runtime import tune_process
from zfsbackd.snapshot.base import Snapshot
from zfsbackd.store.records import BackupStats
from zfsbackd.store.tree import Node
from zfsbackd.store.writer import WriterStats

log = structlog.get_logger(__name__)

#: jobs given to one worker at once: one it works on and one waiting in its pipe, so it never idles
#: for a round trip to the parent; while every worker has this many, the walk archives the next
#: directories itself
JOBS_PER_WORKER = 2
#: seconds a worker has to stop after SIGTERM (it flushes its pack) before it is killed
STOP_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ShardContext:
    """What every worker of one backup needs, sent once when it starts (picklable)."""

    config: Config
    region: str
    snapshot: Snapshot  # pickled as a reader of the same snapshot (Snapshot.__reduce__)
    fs_id: str
    backup_id: str
    on_entry_error: str


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


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess (spawn context)
    conn: Connection
    jobs: dict[int, Future[ShardOutcome]] = field(default_factory=dict)
    finished: tuple[BackupStats, WriterStats] | None = None
    error: BaseException | None = None  # why it stopped before finishing, when it could say
    alive: bool = True


class ShardPool:
    """The worker processes of one backup; :meth:`submit` jobs, :meth:`finish`, always :meth:`close`."""

    def __init__(self, context: ShardContext, workers: int, progress: Progress) -> None:
        spawn = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._progress = progress
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, ShardJob, Future[ShardOutcome]]] = deque()
        self._next_id = 0
        self._workers: list[_Worker] = []
        self._closed = False
        try:
            for number in range(workers):
                parent_end, worker_end = spawn.Pipe(duplex=True)
                process = spawn.Process(
                    target=_worker_main, args=(worker_end, context), name=f"zfsbackd-archive-{number}", daemon=True
                )
                process.start()
                worker_end.close()
                self._workers.append(_Worker(process, parent_end))
        except BaseException:
            self.close()
            raise
        log.info("archive_workers_started", pids=[w.process.pid for w in self._workers], backup_id=context.backup_id)
        self._receiver = threading.Thread(target=self._receive, name="zfsbackd-shards", daemon=True)
        self._receiver.start()

    # ------------------------------------------------------------------ jobs
    def has_room(self) -> bool:
        """Whether a worker would start a job submitted now without waiting (else archive it yourself)."""
        return any(w.alive and len(w.jobs) < JOBS_PER_WORKER for w in self._workers)

    def submit(self, job: ShardJob) -> Future[ShardOutcome]:
        future: Future[ShardOutcome] = Future()
        with self._lock:
            self._next_id += 1
            self._queue.append((self._next_id, job, future))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Give queued jobs to workers with room (under the lock)."""
        while self._queue:
            idle = [w for w in self._workers if w.alive and len(w.jobs) < JOBS_PER_WORKER]
            if not idle:
                if not any(w.alive for w in self._workers):
                    while self._queue:
                        self._queue.popleft()[2].set_exception(self._lost_error())
                return
            worker = min(idle, key=lambda w: len(w.jobs))
            job_id, job, future = self._queue.popleft()
            worker.jobs[job_id] = future
            with contextlib.suppress(OSError):  # it died: its jobs fail when the receiver sees it go
                worker.conn.send(("job", job_id, job))

    def finish(self, cancel: threading.Event) -> tuple[BackupStats, WriterStats]:
        """Every worker flushes (its packs and an index naming them are durable) and reports its
        statistics; returns them added up. Call when every job's result has been used. Waits as long
        as *cancel* is not set (then BackupCancelled: :meth:`close` stops the workers)."""
        from zfsbackd.engine.archiver import CANCEL_POLL_SECONDS, SKIPPED_ENTRIES_KEPT, BackupCancelled  # a cycle

        with self._lock:
            for worker in self._workers:
                with contextlib.suppress(OSError):
                    worker.conn.send(("finish",))
        while self._receiver.is_alive():
            if cancel.is_set():
                raise BackupCancelled()
            self._receiver.join(CANCEL_POLL_SECONDS)
        stats, writer_stats = BackupStats(), WriterStats()
        for worker in self._workers:
            if worker.finished is None:
                raise worker.error or self._lost_error(worker)
            stats.add(worker.finished[0], entries_kept=SKIPPED_ENTRIES_KEPT)
            writer_stats.add(worker.finished[1])
        return stats, writer_stats

    def close(self) -> None:
        """Stop the workers (SIGTERM: they stop like a cancelled walk) and wait for them; idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    # --------------------------------------------------------------- receiving
    def _receive(self) -> None:
        """Runs on its own thread until every worker finished or died: results, progress, logs."""
        waiting = {w.conn: w for w in self._workers}
        while waiting:
            for conn in wait(list(waiting)):
                worker = waiting[conn]  # type: ignore[index]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    del waiting[conn]  # type: ignore[arg-type]
                    self._worker_gone(worker)
                    continue
                if self._handle(worker, message):
                    del waiting[conn]  # type: ignore[arg-type]

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> bool:
        """Act on one message; True when the worker has finished."""
        kind = message[0]
        if kind == "progress":
            _kind, files, nbytes, uploaded = message
            self._progress.advance(files=files, nbytes=nbytes)
            self._progress.uploaded(uploaded)
        elif kind == "log":
            _kind, method, event, values = message
            getattr(log, method)(event, worker_pid=worker.process.pid, **values)
        elif kind in ("done", "failed"):
            _kind, job_id, result = message
            faults.point("shard-received")
            with self._lock:
                future = worker.jobs.pop(job_id)
                self._dispatch()
            if kind == "done":
                future.set_result(result)
            else:
                future.set_exception(result)
        elif kind == "finished":
            worker.finished = message[1], message[2]
            return True
        elif kind == "broken":  # the worker stopped: cancelled, its store unusable, or a bug
            worker.error = message[1]
            self._stopped(worker, worker.error)
            return True
        return False

    def _worker_gone(self, worker: _Worker) -> None:
        """The worker's pipe closed without its report: it died (SIGKILL, the OOM killer)."""
        worker.process.join(5)
        if not self._closed:
            log.error("archive_worker_lost", pid=worker.process.pid, exitcode=worker.process.exitcode)
        self._stopped(worker, self._lost_error(worker))

    def _stopped(self, worker: _Worker, error: BaseException) -> None:
        """No more results come from *worker*: its jobs fail with *error*, the others' go on."""
        with self._lock:
            worker.alive = False
            orphans = list(worker.jobs.values())
            worker.jobs.clear()
            self._dispatch()
        for future in orphans:
            future.set_exception(error)

    def _lost_error(self, worker: _Worker | None = None) -> WorkerProcessLost:
        which = f"archive worker process {worker.process.pid}" if worker else "every archive worker process"
        code = worker.process.exitcode if worker else None
        how = f" (killed by signal {-code})" if code is not None and code < 0 else ""
        return WorkerProcessLost(
            f"{which} of this backup ended before its data was durable{how}; the backup failed. Run it "
            "again: the packs already uploaded are reused. If the system log shows the OOM killer, give the "
            "service more memory"
        )


# ---------------------------------------------------------------------- worker side
class _Channel:
    """The worker's end of its pipe; sends from any of its threads (read pool, progress, logs)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)

    def log_processor(self, _logger: object, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor that hands the event to the parent, which logs it (then drops it here)."""
        event = str(event_dict.pop("event", ""))
        values = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in event_dict.items()}
        self.send(("log", method, event, values))
        raise structlog.DropEvent


def _worker_main(conn: Connection, context: ShardContext) -> None:
    """A worker process: archive the jobs the parent sends until told to finish, then flush and report."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a killed backup leaves no worker behind
    tune_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cancel = _Cancel()
    signal.signal(signal.SIGTERM, cancel.on_sigterm)
    channel = _Channel(conn)
    structlog.configure(
        processors=[channel.log_processor],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # INFO and up cross the pipe
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    if os.getppid() == 1:  # the parent died before the death signal was armed
        return
    try:
        stats, writer_stats = _archive_jobs(conn, channel, context, cancel)
        channel.send(("finished", stats, writer_stats))
    except BaseException as exc:  # reported to the parent, which fails the backup with it
        with contextlib.suppress(OSError):
            channel.send(("broken", _transferable(exc)))
    finally:
        context.snapshot.close()


class _Stopped(Exception):
    """SIGTERM while the worker waited for a job: nothing to interrupt, it flushes and ends."""


class _Cancel(threading.Event):
    """The worker's cancel event, set by SIGTERM; while it waits for a job, SIGTERM also ends the wait."""

    waiting = False

    def on_sigterm(self, _signum: int, _frame: object) -> None:
        self.set()
        if self.waiting:
            raise _Stopped()


def _archive_jobs(
    conn: Connection, channel: _Channel, context: ShardContext, cancel: _Cancel
) -> tuple[BackupStats, WriterStats]:
    from zfsbackd.engine.archiver import Archiver  # the archiver imports this module
    from zfsbackd.engine.engine import Engine
    from zfsbackd.store.writer import PackWriter

    store = Engine(context.config).store(context.region)

    def report(progress: Progress) -> None:
        channel.send(("progress", *progress.take_unreported()))

    progress = Progress(on_update=report)
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
            context.snapshot,
            None,
            progress=progress,
            cancel=cancel,
            on_entry_error=context.on_entry_error,  # type: ignore[arg-type]
            fs_id=context.fs_id,
            backup_id=context.backup_id,
        )
        try:
            for job_id, job in _jobs(conn, cancel):
                try:
                    outcome = archiver.archive_job(job)
                except ZfsbackdError as exc:
                    channel.send(("failed", job_id, _transferable(exc)))
                    continue
                channel.send(("done", job_id, outcome))
        finally:
            writer.flush()  # also when cancelled: a resumed backup reuses what was read
            if store.tree_cache is not None:
                store.tree_cache.flush()
            report(progress)
    return archiver.counters.stats, writer.stats


def _jobs(conn: Connection, cancel: _Cancel) -> Iterator[tuple[int, ShardJob]]:
    """The parent's jobs, until it says finish; a SIGTERM meanwhile is a cancellation (BackupCancelled)."""
    from zfsbackd.engine.archiver import BackupCancelled

    while not cancel.is_set():
        cancel.waiting = True
        try:
            message = conn.recv()
        except _Stopped:
            break
        finally:
            cancel.waiting = False
        if message[0] != "job":
            return
        yield message[1], message[2]
    raise BackupCancelled()


def _transferable(exc: BaseException) -> BaseException:
    """*exc* if it survives pickling (the parent raises it as it is), else a ZfsbackdError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any exception that cannot cross the pipe is re-made
        if isinstance(exc, ZfsbackdError):
            made = ZfsbackdError(exc.message)
            made.code, made.exit_code = exc.code, exc.exit_code
            return made
        return ZfsbackdError(f"archive worker: {type(exc).__name__}: {exc}")
    return exc

