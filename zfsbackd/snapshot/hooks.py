"""``pre_snapshot`` / ``post_snapshot`` commands, and taking a snapshot between them.

The hooks let an application pause (flush, lock, freeze) for the instant of the
snapshot, as AWS recommends for FSx. Once ``pre_snapshot`` has been started,
``post_snapshot`` always runs — also when the pre hook or the snapshot failed —
because a half-done pause must still be undone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from typing import IO, Literal

from zfsbackd.errors import SnapshotError, ZfsbackdError
from zfsbackd.snapshot.base import FileSystemSource, Snapshot, SnapshotProvider
from zfsbackd.snapshot.detect import choose_provider

HookPhase = Literal["pre_snapshot", "post_snapshot"]
STDERR_TAIL_LINES = 20
_STDERR_TAIL_BYTES = 64 * 1024


def run_hook(argv: tuple[str, ...], *, fs_id: str, backup_id: str, phase: HookPhase, timeout: int) -> None:
    """Run one hook (no shell: *argv* is exactly what to execute) and wait for it.

    The hook gets ``ZFSBACKD_FS_ID``, ``ZFSBACKD_BACKUP_ID`` and ``ZFSBACKD_HOOK`` in its
    environment, no stdin, and its stdout is discarded (our stdout is the JSON log).
    Its stderr goes to a temporary file rather than a pipe, so a hook that leaves a
    background process behind cannot keep us waiting for EOF. A hook that runs past
    *timeout* is killed with its whole process group.
    """
    hook = f"file_systems[{fs_id}].{phase}"
    if not argv:
        raise SnapshotError(f"{hook} is empty; give the command and its arguments as a list")
    env = {**os.environ, "ZFSBACKD_FS_ID": fs_id, "ZFSBACKD_BACKUP_ID": backup_id, "ZFSBACKD_HOOK": phase}
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise SnapshotError(f"{hook}: cannot run {argv[0]!r}: {exc.strerror}") from None
        try:
            status = proc.wait(timeout=timeout)
        except BaseException as exc:  # the timeout, or we are being interrupted: leave nothing running
            _kill_group(proc)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise SnapshotError(
                    f"{hook} ({argv[0]}) did not finish within {timeout} s and was killed "
                    f"(raise hook_timeout_seconds if it needs longer){_tail(stderr)}"
                ) from None
            raise
        if status != 0:
            raise SnapshotError(f"{hook} ({argv[0]}) failed with {_how(status)}{_tail(stderr)}")


def _how(status: int) -> str:
    """Popen's returncode in words: positive is an exit status, negative a signal number."""
    if status > 0:
        return f"exit status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-status}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone, group and all
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(f: IO[bytes]) -> str:
    """The last lines the hook wrote to stderr, ready to append to an error message."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _STDERR_TAIL_BYTES))
    lines = f.read().decode("utf-8", "replace").splitlines()[-STDERR_TAIL_LINES:]
    return "; stderr:\n" + "\n".join(lines) if lines else " (no stderr output)"


def take_snapshot(fs: FileSystemSource, backup_id: str, provider: SnapshotProvider | None = None) -> Snapshot:
    """Run ``pre_snapshot``, take the snapshot, run ``post_snapshot``.

    *provider* defaults to :func:`choose_provider`, which runs before any hook, so an
    unsupported source never runs hooks. If ``post_snapshot`` fails after a good
    snapshot, the snapshot is released and the error raised: the application may still
    be paused and somebody has to look.
    """
    if provider is None:
        provider = choose_provider(fs)

    def hook(phase: HookPhase, argv: tuple[str, ...]) -> None:
        run_hook(argv, fs_id=fs.id, backup_id=backup_id, phase=phase, timeout=fs.hook_timeout_seconds)

    def post_after_failure() -> SnapshotError | None:
        if fs.post_snapshot:
            try:
                hook("post_snapshot", fs.post_snapshot)
            except SnapshotError as post_exc:
                return post_exc
        return None

    try:
        if fs.pre_snapshot:
            hook("pre_snapshot", fs.pre_snapshot)
        snap = provider.take(fs, backup_id)
    except BaseException as exc:
        post_exc = post_after_failure()
        if post_exc is not None:
            if isinstance(exc, Exception):
                first = exc.message if isinstance(exc, ZfsbackdError) else str(exc)
                raise SnapshotError(f"{first}; then {post_exc.message}") from exc
            exc.add_note(post_exc.message)
        raise
    if fs.post_snapshot:
        try:
            hook("post_snapshot", fs.post_snapshot)
        except BaseException:
            snap.release()
            raise
    return snap


def find_or_take_snapshot(fs: FileSystemSource, backup_id: str, provider: SnapshotProvider | None = None) -> Snapshot:
    """The snapshot of *backup_id*: the one an interrupted attempt left behind, else a new one.

    The hooks run exactly once per snapshot taken, so only around a new one: a
    resumed backup whose snapshot survived (ZFS, btrfs) reads the point in time
    the application was paused for then, and pausing it again would be for
    nothing. Providers whose snapshot is the live tree (reflink, copy) find
    nothing, so each attempt takes it anew — hooks included.
    """
    if provider is None:
        provider = choose_provider(fs)
    return provider.find(fs, backup_id) or take_snapshot(fs, backup_id, provider)
