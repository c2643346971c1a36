"""The daemon's backup jobs: one per file system, and a retried request gets the job it already started.

A fake engine holds each backup before its record exists (where a restarted daemon's
resumed backup waits for its lease), so the retry lands in exactly that window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from zfsbackd.daemon.jobs import JobRunner
from zfsbackd.engine.engine import BackupRequest
from zfsbackd.errors import BackupInProgress, IncompatibleParameterError
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle


class HeldEngine:
    """create_backup waits for ``release`` before it makes the record, as the lease wait does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[BackupRequest] = []

    def create_backup(
        self, request: BackupRequest, *, on_record: Callable[[BackupRecord], None], **_kwargs: Any
    ) -> BackupRecord:
        self.calls.append(request)
        assert self.release.wait(30), "the test never released the backup"
        record = BackupRecord(
            backup_id=f"backup-{len(self.calls):017x}",
            file_system_id=request.file_system_id,
            region="local",
            backup_type=request.backup_type,
            lifecycle=Lifecycle.CREATING,
            creation_time=datetime(2026, 12, 1, tzinfo=UTC),
            name=request.name,
            tags=request.tags,
            client_request_token=request.client_request_token,
        )
        on_record(record)
        return record


Held = tuple[HeldEngine, JobRunner]


@pytest.fixture
def held() -> Iterator[Held]:
    engine = HeldEngine()
    runner = JobRunner(lambda: engine, max_parallel=2)  # type: ignore[arg-type, return-value]
    yield engine, runner
    engine.release.set()
    assert runner.wait_idle(30)
    runner.shutdown()


def test_a_retry_before_the_record_exists_gets_the_running_job(held: Held) -> None:
    engine, runner = held
    first = runner.submit(BackupRequest("fs-home", name="nightly", client_request_token="tok-1"))
    again = runner.submit(BackupRequest("fs-home", name="nightly", client_request_token="tok-1"))
    assert again is first
    engine.release.set()
    assert again.wait_started(30).backup_id == first.wait_started(30).backup_id
    assert len(engine.calls) == 1  # one backup, not two


def test_a_resumed_backup_is_found_by_the_retry_that_gives_no_tags(held: Held) -> None:
    """The daemon resumes with the record's tags (the file system's); the client's retry sends none."""
    _engine, runner = held
    resumed = runner.submit(BackupRequest("fs-home", name="n", tags={"team": "x"}, client_request_token="tok-2"))
    assert runner.submit(BackupRequest("fs-home", name="n", client_request_token="tok-2")) is resumed


@pytest.mark.parametrize(
    "other",
    [
        BackupRequest("fs-home", name="other-name", client_request_token="tok-3"),
        BackupRequest("fs-home", name="n", tags={"team": "y"}, client_request_token="tok-3"),
        BackupRequest("fs-home", BackupType.AUTOMATIC, name="n", client_request_token="tok-3"),
    ],
    ids=["name", "tags", "type"],
)
def test_a_token_reused_with_other_parameters_is_refused(held: Held, other: BackupRequest) -> None:
    _engine, runner = held
    runner.submit(BackupRequest("fs-home", name="n", tags={"team": "x"}, client_request_token="tok-3"))
    with pytest.raises(IncompatibleParameterError, match="tok-3 was already used for a backup of fs-home"):
        runner.submit(other)


@pytest.mark.parametrize("token", [None, "tok-other"])
def test_another_request_for_a_busy_file_system_is_refused(held: Held, token: str | None) -> None:
    _engine, runner = held
    runner.submit(BackupRequest("fs-home", name="n", client_request_token="tok-4"))
    with pytest.raises(BackupInProgress, match=r"a backup of fs-home \(one\) is already running"):
        runner.submit(BackupRequest("fs-home", name="n", client_request_token=token))
    runner.submit(BackupRequest("fs-other", name="n", client_request_token="tok-4"))  # tokens are per file system
