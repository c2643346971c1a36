"""Worker processes of one operation: spawned interpreters that take jobs from it over a pipe.

Why processes: per-file Python work (a backup's walk, hash and seal; a restore's create, write and
metadata) runs under one interpreter's GIL, so threads only add contention; a second interpreter is
the way to a second core. Two operations use them, each with its own context and jobs:
backups (:mod:`zfsbackd.engine.shards`: whole subdirectories archived) and restores
(:mod:`zfsbackd.engine.restore_workers`: batches of files written). This module is what they share:
starting the processes, handing out jobs, receiving results, progress and log events, noticing a
worker that died, and stopping them all.

A worker is a ``multiprocessing`` *spawn* process (never a fork of a threaded daemon) with one
duplex pipe to the operation's process. The operation's context (:class:`WorkerContext`, picklable)
is sent once; :meth:`WorkerContext.serve` runs in the worker over the jobs the parent sends until
the parent says finish, and what it returns goes back as the worker's final report. A job may come
with open file descriptors (a restore's directories), passed over the pipe with ``SCM_RIGHTS``.

Cancellation has one path: the parent stops waiting and SIGTERMs its workers (:meth:`WorkerPool.close`);
a worker's SIGTERM handler sets its cancel event, which its ``serve`` watches like the parent's own
code watches the parent's. Workers ignore SIGINT (Ctrl-C reaches the whole process group; the parent
decides) and die with the parent (``PR_SET_PDEATHSIG``), so a SIGKILLed operation leaves no process
behind. Workers log through the parent (their events are sent to it and logged there, with its
configuration and redaction), and report progress the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recvfds, sendfds
from socket import AF_UNIX, SOCK_STREAM, socket
from typing import Any, ClassVar, Protocol

import structlog

from zfsbackd import faults
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import WorkerProcessLost, ZfsbackdError
from zfsbackd.runtime import tune_process

log = structlog.get_logger(__name__)

#: jobs given to one worker at once: one it works on and one waiting in its pipe, so it never idles
#: for a round trip to the parent; while every worker has this many, the parent does the next job itself
JOBS_PER_WORKER = 2
#: seconds a worker has to stop after SIGTERM (a backup's worker flushes its pack) before it is killed
STOP_SECONDS = 60.0
#: how often a wait for workers looks at its cancel event
CANCEL_POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


class WorkerContext(Protocol):
    """What every worker of one operation needs (picklable: sent once when a worker starts)."""

    kind: ClassVar[str]
    """"archive" or "restore": names the processes, their log events and fault points."""

    def serve(self, jobs: Iterator[Job], channel: Channel, cancel: threading.Event) -> object:
        """In the worker: do every job of *jobs* (``channel.done`` or ``channel.failed`` each), stop early
        when *cancel* is set (raising what a cancelled operation raises); return the final report."""

    def lost(self, which: str, how: str) -> WorkerProcessLost:
        """The error the operation fails with when worker *which* died before its final report."""

    def cancelled(self) -> BaseException:
        """What a wait for the workers raises when the operation is cancelled (and a worker's jobs, too)."""

    def release(self) -> None:
        """In the worker, at its end: let go of what the context opened there."""


@dataclass(frozen=True)
class Job:
    """One job as a worker receives it: its id (for ``Channel.done``), its data and the descriptors that
    came with it (the worker's own copies, closed by whoever uses them)."""

    job_id: int
    data: Any
    fds: Sequence[int] = ()


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess (spawn context)
    conn: Connection
    jobs: dict[int, Future[Any]] = field(default_factory=dict)
    finished: bool = False
    report: object = None  # what serve() returned
    error: BaseException | None = None  # why it stopped before finishing, when it could say
    alive: bool = True


class WorkerPool:
    """The worker processes of one operation; :meth:`submit` jobs, :meth:`finish`, always :meth:`close`.

    Raises OSError when a process cannot be started (the ones already started are stopped first).
    """

    def __init__(self, context: WorkerContext, workers: int, progress: Progress, **about: str) -> None:
        """*about* names the operation in the log (``backup_id=``)."""
        spawn = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._context = context
        self._kind = context.kind
        self._progress = progress
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, object, list[int], Future[Any]]] = deque()
        self._next_id = 0
        self._workers: list[_Worker] = []
        self._closed = False
        try:
            for number in range(workers):
                parent_end, worker_end = spawn.Pipe(duplex=True)
                process = spawn.Process(
                    target=_worker_main, args=(worker_end, context), name=f"zfsbackd-{self._kind}-{number}", daemon=True
                )
                process.start()
                worker_end.close()
                self._workers.append(_Worker(process, parent_end))
        except BaseException:
            self.close()
            raise
        log.info(f"{self._kind}_workers_started", pids=[w.process.pid for w in self._workers], **about)
        self._receiver = threading.Thread(target=self._receive, name=f"zfsbackd-{self._kind}-workers", daemon=True)
        self._receiver.start()

    # ------------------------------------------------------------------ jobs
    def has_room(self) -> bool:
        """Whether a worker would start a job submitted now without waiting (else do it yourself)."""
        return any(w.alive and len(w.jobs) < JOBS_PER_WORKER for w in self._workers)

    def submit(self, job: object, fds: Sequence[int] = ()) -> Future[Any]:
        """Hand *job* to the first worker with room (queued until one has). The pool owns *fds* (duplicates
        of the caller's): they are passed with the job and closed here once sent, or if they never are."""
        future: Future[Any] = Future()
        with self._lock:
            self._next_id += 1
            self._queue.append((self._next_id, job, list(fds), future))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Give queued jobs to workers with room (under the lock)."""
        while self._queue:
            idle = [w for w in self._workers if w.alive and len(w.jobs) < JOBS_PER_WORKER]
            if not idle:
                if not any(w.alive for w in self._workers):
                    while self._queue:
                        _job_id, _job, fds, future = self._queue.popleft()
                        _close_all(fds)
                        future.set_exception(self._lost_error())
                return
            worker = min(idle, key=lambda w: len(w.jobs))
            job_id, job, fds, future = self._queue.popleft()
            worker.jobs[job_id] = future
            try:
                worker.conn.send(("job", job_id, job, len(fds)))
                if fds:
                    with socket(AF_UNIX, SOCK_STREAM, fileno=os.dup(worker.conn.fileno())) as sock:
                        sendfds(sock, fds)
            except OSError:
                pass  # it died: its jobs fail when the receiver sees it go
            finally:
                _close_all(fds)

    def finish(self, cancel: threading.Event | None = None) -> list[object]:
        """Every worker ends its jobs and reports; returns the reports. Call when every job's result has
        been used. Waits as long as *cancel* is not set (then the context's cancelled error: :meth:`close`
        stops the workers). A worker that died or broke down raises its error here."""
        with self._lock:
            for worker in self._workers:
                with contextlib.suppress(OSError):
                    worker.conn.send(("finish",))
        while self._receiver.is_alive():
            if cancel is not None and cancel.is_set():
                raise self._context.cancelled()
            self._receiver.join(CANCEL_POLL_SECONDS)
        reports = []
        for worker in self._workers:
            if not worker.finished:
                raise worker.error or self._lost_error(worker)
            reports.append(worker.report)
        return reports

    def close(self) -> None:
        """Stop the workers (SIGTERM: they stop like a cancelled operation) and wait for them; idempotent."""
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
        with self._lock:
            while self._queue:
                _close_all(self._queue.popleft()[2])

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
            faults.point(f"{self._kind}-result-received")
            with self._lock:
                future = worker.jobs.pop(job_id)
                self._dispatch()
            if kind == "done":
                future.set_result(result)
            else:
                future.set_exception(result)
        elif kind == "finished":
            worker.finished, worker.report = True, message[1]
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
            log.error(f"{self._kind}_worker_lost", pid=worker.process.pid, exitcode=worker.process.exitcode)
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
        which = f"{self._kind} worker process {worker.process.pid}" if worker else f"every {self._kind} worker process"
        code = worker.process.exitcode if worker else None
        how = f" (killed by signal {-code})" if code is not None and code < 0 else ""
        return self._context.lost(which, how)


def start_workers(context: WorkerContext, workers: int, progress: Progress, **about: str) -> WorkerPool | None:
    """A pool of *workers* processes, or None (with a warning) when the system gives no process (EAGAIN
    from a pids limit, ENOMEM): the operation is slower in one process, not wrong."""
    try:
        return WorkerPool(context, workers, progress, **about)
    except OSError as exc:
        log.warning(
            f"{context.kind}_workers_not_started",
            error=f"{errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc.strerror or exc}",
            consequence="it goes on in this process alone",
            **about,
        )
        return None


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------------- worker side
class Channel:
    """The worker's end of its pipe; sends from any of its threads (job results, progress, logs)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)

    def done(self, job: Job, outcome: object) -> None:
        self.send(("done", job.job_id, outcome))

    def failed(self, job: Job, error: ZfsbackdError) -> None:
        """The job failed with an ordinary error; the parent decides what that means for the operation."""
        self.send(("failed", job.job_id, transferable(error)))

    def report_progress(self, progress: Progress) -> None:
        """Send what *progress* counted since the last report (an ``on_update`` callback)."""
        self.send(("progress", *progress.take_unreported()))

    def log_processor(self, _logger: object, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor that hands the event to the parent, which logs it (then drops it here)."""
        event = str(event_dict.pop("event", ""))
        values = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in event_dict.items()}
        self.send(("log", method, event, values))
        raise structlog.DropEvent


def _worker_main(conn: Connection, context: WorkerContext) -> None:
    """A worker process: serve the parent's jobs until told to finish, then report."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a killed operation leaves no worker behind
    tune_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cancel = _Cancel()
    signal.signal(signal.SIGTERM, cancel.on_sigterm)
    channel = Channel(conn)
    structlog.configure(
        processors=[channel.log_processor],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # INFO and up cross the pipe
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    if os.getppid() == 1:  # the parent died before the death signal was armed
        return
    try:
        report = context.serve(_jobs(conn, cancel, context), channel, cancel)
        channel.send(("finished", report))
    except BaseException as exc:  # reported to the parent, which fails the operation with it
        with contextlib.suppress(OSError):
            channel.send(("broken", transferable(exc)))
    finally:
        context.release()


class _Stopped(Exception):
    """SIGTERM while the worker waited for a job: nothing to interrupt, it ends."""


class _Cancel(threading.Event):
    """The worker's cancel event, set by SIGTERM; while it waits for a job, SIGTERM also ends the wait."""

    waiting = False

    def on_sigterm(self, _signum: int, _frame: object) -> None:
        self.set()
        if self.waiting:
            raise _Stopped()


def _jobs(conn: Connection, cancel: _Cancel, context: WorkerContext) -> Iterator[Job]:
    """The parent's jobs, until it says finish; a SIGTERM meanwhile raises the context's cancelled error.

    A thread takes them off the pipe as soon as they come: a job can be megabytes (a restore's batch
    of files), more than the pipe holds, and the parent must not wait for this worker to finish one job
    before it can send the next (it has other work to do meanwhile). At most JOBS_PER_WORKER are sent.
    """
    arrived: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    threading.Thread(target=_take_jobs, args=(conn, arrived), name="zfsbackd-jobs", daemon=True).start()
    while not cancel.is_set():
        cancel.waiting = True
        try:
            job = arrived.get()
        except _Stopped:
            break
        finally:
            cancel.waiting = False
        if job is None:
            return
        yield job
    raise context.cancelled()


def _take_jobs(conn: Connection, arrived: queue.SimpleQueue[Job | None]) -> None:
    """Runs on its own thread in a worker: each job off the pipe (with its descriptors), then None at
    "finish" or when the parent is gone."""
    try:
        while True:
            message = conn.recv()
            if message[0] != "job":
                break
            fds: list[int] = []
            if message[3]:
                with socket(AF_UNIX, SOCK_STREAM, fileno=os.dup(conn.fileno())) as sock:
                    fds = recvfds(sock, message[3])
            arrived.put(Job(message[1], message[2], fds))
    except (EOFError, OSError):
        pass  # the parent is gone: this process dies with it (PR_SET_PDEATHSIG)
    arrived.put(None)


def transferable(exc: BaseException) -> BaseException:
    """*exc* if it survives pickling (the parent raises it as it is), else a ZfsbackdError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any exception that cannot cross the pipe is re-made
        if isinstance(exc, ZfsbackdError):
            made = ZfsbackdError(exc.message)
            made.code, made.exit_code = exc.code, exc.exit_code
            return made
        return ZfsbackdError(f"worker process: {type(exc).__name__}: {exc}")
    return exc
