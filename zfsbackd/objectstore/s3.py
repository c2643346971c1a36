"""An S3-compatible bucket (AWS, Ceph RGW, MinIO) as an object store.

Same guarantees as the local backend: an object is either absent or complete
(S3 PUTs and CompleteMultipartUpload are atomic), and ``put_if_absent`` never
replaces an object someone else wrote — with one documented exception for
large, content-addressed objects (see :meth:`S3ObjectStore.put_if_absent`).

What S3-compatible servers disagree on, and how this module copes
(measurements in ../shared/s3/README.md):

* Create-only writes: AWS, Ceph RGW and moto answer ``If-None-Match: *`` on
  PutObject with 412; Swift answers 501 and some servers silently overwrite.
  Support is probed once per store, on the first create, and the backend falls
  back to HEAD-then-PUT where it is missing.
* Checksums: botocore ≥ 1.36 sends ``aws-chunked`` trailing checksums that
  Ceph 16 refuses (411), so for endpoints other than AWS the default is
  ``when_required``.
* Listing: servers may return fewer keys than asked for while more remain, so
  listing follows ``IsTruncated`` and continuation tokens, never key counts.

Retries are ours, not botocore's (see :mod:`zfsbackd.objectstore.retry`), so
each one is counted in :attr:`metrics`.  Credentials are handed to botocore
and never appear in a message or a log line.
"""

from __future__ import annotations

import errno
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.session
import structlog
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from zfsbackd import pools
from zfsbackd.config import S3Region
from zfsbackd.errors import StoreError
from zfsbackd.objectstore import quickack
from zfsbackd.objectstore.base import ObjectInfo, ObjectStore
from zfsbackd.objectstore.retry import (
    call_with_retries,
    describe_failure,
    error_code,
    http_status,
    is_certificate_error,
    is_retryable,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
#: Objects larger than this go up as multipart uploads.  Read when a store is built (not bound as a
#: default argument) so tests and benchmarks can lower it for every store the engine opens.
MULTIPART_THRESHOLD = 32 * MiB
#: Size of each multipart part; S3 refuses parts below 5 MiB except the last.
PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB
#: Parts of one upload sent at once.  The pack writer already runs several uploads in parallel.
DEFAULT_MAX_ATTEMPTS = 6
#: Multipart uploads of ours older than this are abandoned (their writer died) and are aborted.
STALE_UPLOAD_SECONDS = 86400
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
#: Where the If-None-Match probe writes (DESIGN.md reserves ``locks/`` for coordination objects).
PROBE_PREFIX = "locks/probe-"
#: Keys that receive the region's storage class: the packs, the bulk of the data.
DATA_PREFIX = "data/"

_ACCESS_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "InvalidSecurity", "AllAccessDisabled",
})
#: AWS answers these when the client signs for, or talks to, a region other than the bucket's.
_WRONG_REGION_CODES = frozenset({
    "AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException",
})
_NOT_IMPLEMENTED_CODES = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})


def _is_aws_endpoint(endpoint_url: str | None) -> bool:
    """No endpoint means AWS; otherwise AWS hosts end in amazonaws.com (or .com.cn)."""
    if endpoint_url is None:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def default_checksum_mode(region: S3Region) -> str | None:
    """The configured mode, else ``when_required`` off AWS, else None (botocore's own default)."""
    if region.checksum_mode is not None:
        return region.checksum_mode
    return None if _is_aws_endpoint(region.endpoint_url) else "when_required"


class S3ObjectStore(ObjectStore):
    """One region's bucket and prefix; thread-safe (one boto3 client, shared by every thread).

    :attr:`metrics` counts every HTTP attempt under ``put`` (PutObject,
    UploadPart), ``multipart`` (create, complete, abort), ``get``, ``head``
    (objects and the bucket), ``list`` and ``delete``; ``retries`` and
    ``errors`` (final failures) use the same names.
    """

    location_settings = ("bucket", "prefix")
    span_gap_bytes = 1024 * 1024  # a request is a round trip

    def __init__(
        self,
        region: S3Region,
        *,
        multipart_threshold: int | None = None,
        part_size: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """``None`` sizes mean the module defaults :data:`MULTIPART_THRESHOLD` and :data:`PART_SIZE`."""
        super().__init__()
        self.region = region
        self.bucket = region.bucket
        self.prefix = region.prefix
        self.multipart_threshold = MULTIPART_THRESHOLD if multipart_threshold is None else multipart_threshold
        self.part_size = PART_SIZE if part_size is None else part_size
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {self.part_size} is below the S3 minimum of {MIN_PART_SIZE} bytes")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.endpoint = region.endpoint_url or "AWS S3"
        self.location = f"s3://{self.bucket}/{self.prefix} at {self.endpoint} (region {region.name})"
        self._conditional_put: bool | None = None
        self._probe_lock = threading.Lock()
        self._client = self._make_client()

    # ------------------------------------------------------------------ set-up
    def _make_client(self) -> Any:
        region = self.region
        session = botocore.session.Session()
        if region.credentials_file is not None:
            self._use_credentials_file(session, region.credentials_file)
        options: dict[str, Any] = {
            "region_name": region.region_name or "us-east-1",
            "signature_version": "s3v4",
            # One attempt per botocore call: tenacity retries, and counts them.  (botocore's `max_attempts`
            # counts retries, not attempts — `max_attempts: 1` would still retry once, uncounted.)
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": max(16, pools.MULTIPART_THREADS * 4),
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "tcp_keepalive": True,
            "s3": {"addressing_style": region.addressing_style},
            "user_agent_extra": "zfsbackd",
        }
        mode = default_checksum_mode(region)
        if mode is not None:
            options["request_checksum_calculation"] = mode
            options["response_checksum_validation"] = mode
        client = boto3.session.Session(botocore_session=session).client(
            "s3",
            endpoint_url=region.endpoint_url,
            verify=str(region.ca_bundle) if region.ca_bundle is not None else None,
            config=BotoConfig(**options),
        )
        if not quickack.install(client):
            log.info("s3_quick_ack_unavailable", region=region.name,
                     consequence="replies from servers that delay them (Ceph RGW) take ~40 ms longer per request")
        return client

    def _use_credentials_file(self, session: botocore.session.Session, path: Path) -> None:
        """Take credentials from profile ``default`` of ``path`` only.

        Setting the profile explicitly takes the environment variables out of
        botocore's chain, so the file the admin configured is the one used.
        """
        fix = (f"write [default] with aws_access_key_id and aws_secret_access_key into {path}, or remove "
               f"regions.{self.region.name}.credentials_file to use the AWS credential chain")
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise StoreError(f"region {self.region.name}: cannot read credentials_file {path}: "
                             f"{exc.strerror or exc}; {fix}") from None
        session.set_config_variable("credentials_file", str(path))
        session.set_config_variable("profile", "default")
        try:
            credentials = session.get_credentials()
        except (ProfileNotFound, PartialCredentialsError):
            credentials = None
        if credentials is None or credentials.method != "shared-credentials-file":
            raise StoreError(f"region {self.region.name}: credentials_file {path} has no complete [default] "
                             f"profile; {fix}")

    # ----------------------------------------------------------------- helpers
    def _full_key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid object key {key!r}")
        return self.prefix + key

    def _where(self, full_key: str | None) -> str:
        return f"region {self.region.name}: s3://{self.bucket}/{full_key if full_key is not None else self.prefix}"

    def _extra_args(self, key: str) -> dict[str, str]:
        """Storage class for packs only: records and indexes are small and read often."""
        if self.region.storage_class and key.startswith(DATA_PREFIX):
            return {"StorageClass": self.region.storage_class}
        return {}

    def _call(
        self,
        operation: str,
        full_key: str | None,
        attempt: Callable[[], T],
        *,
        written: int = 0,
        measure: Callable[[T], int] | None = None,
    ) -> T:
        """Run one request with retries; count every attempt; turn a final failure into a StoreError.

        FileNotFoundError (a missing key on ``get``) passes through: it is an
        answer, not a failure of the store.
        """

        def counted() -> T:
            read = 0
            try:
                result = attempt()
                read = measure(result) if measure else 0
                return result
            finally:
                self.metrics.count(operation, written=written, read=read)

        context: dict[str, object] = {"region": self.region.name, "bucket": self.bucket}
        if full_key is not None:
            context["object_key"] = full_key
        try:
            return call_with_retries(
                counted, operation=operation, metrics=self.metrics, max_attempts=self.max_attempts, context=context
            )
        except FileNotFoundError:
            raise
        except (ClientError, BotoCoreError) as exc:
            self.metrics.count_error(operation)
            raise self._store_error(operation, full_key, exc) from exc

    def _store_error(self, operation: str, full_key: str | None, exc: BaseException) -> StoreError:
        """Say what failed, where (region, bucket, key) and how to fix it — without any credential."""
        where = self._where(full_key)
        name = self.region.name
        code, status = error_code(exc), http_status(exc)
        if isinstance(exc, ClientError):
            if code == "NoSuchBucket" or (status == 404 and full_key is None):
                return StoreError(f"region {name}: bucket {self.bucket} does not exist at {self.endpoint} — "
                                  f"create it or fix regions.{name}.bucket")
            if status == 403 or code in _ACCESS_DENIED_CODES:
                detail = code if code and not code.isdigit() else "Forbidden"
                return StoreError(f"{where}: access denied ({status} {detail}) — {self._credentials_hint()}"
                                  + (f" and that they may use bucket {self.bucket}" if detail == "AccessDenied"
                                     else ""))
            if code in _WRONG_REGION_CODES or status == 301:
                return StoreError(f"{where}: the bucket is in another region ({status} {code}) — set "
                                  f"regions.{name}.region_name to the bucket's region")
            if code == "InvalidStorageClass":
                return StoreError(f"{where}: the server refuses storage class {self.region.storage_class} — fix "
                                  f"regions.{name}.storage_class or remove it")
            if is_retryable(exc):
                return StoreError(f"{where}: {operation} failed after {self.max_attempts} attempts ({status} "
                                  f"{code}) — the server is overloaded or failing; try again later")
            message = str(exc.response.get("Error", {}).get("Message") or "")[:200]
            return StoreError(f"{where}: {operation} refused ({status} {code}{': ' + message if message else ''})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(f"{where}: no usable credentials — {self._credentials_hint()}")
        if is_certificate_error(exc):
            return StoreError(f"{where}: the TLS certificate of {self.endpoint} is not trusted — set "
                              f"regions.{name}.ca_bundle to the CA that signed it")
        if isinstance(exc, ConnectionError):
            return StoreError(f"{where}: cannot connect to {self.endpoint} after {self.max_attempts} attempts "
                              f"({describe_failure(exc)}) — check regions.{name}.endpoint_url and that the "
                              "server is up")
        return StoreError(f"{where}: {operation} failed after {self.max_attempts} attempts ({describe_failure(exc)}) "
                          f"— check the network and the server at {self.endpoint}")

    def _credentials_hint(self) -> str:
        name, path = self.region.name, self.region.credentials_file
        if path is not None:
            return f"check the credentials in regions.{name}.credentials_file ({path})"
        return (f"check the credentials (set regions.{name}.credentials_file, or the AWS credential chain: "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role)")

    # ------------------------------------------------------------------- writes
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Create ``key`` unless it exists.

        Small objects: one PutObject with ``If-None-Match: *`` where the server
        honours it (probed once), else HEAD then PUT, whose window between the
        two is the best such a server allows.

        Objects above the multipart threshold: HEAD then a multipart upload,
        because servers ignore ``If-None-Match`` on CompleteMultipartUpload.
        That is safe for the only large objects the store writes — packs,
        whose keys are the hash of their content: two writers racing on one
        pack key upload identical bytes, so whichever completes last replaces
        the object with itself.  Callers must not create large objects under
        keys that do not name their content.

        After a retry, False can also mean that our own earlier attempt landed
        (its answer was lost); either way the object now exists.
        """
        full_key = self._full_key(key)
        if len(data) > self.multipart_threshold:
            if self.head(key) is not None:
                return False
            self._multipart_upload(key, full_key, memoryview(data))
            return True
        body = bytes(data)
        if self.conditional_put_supported:
            return self._call("put", full_key, lambda: self._put_unless_exists(full_key, body, self._extra_args(key)),
                              written=len(body))
        if self.head(key) is not None:
            return False
        self._put_object(key, full_key, body)
        return True

    def _put_unless_exists(self, full_key: str, body: bytes, extra: dict[str, str]) -> bool:
        """One conditional PutObject: True if created, False if the key already existed (412)."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=body, IfNoneMatch="*", **extra)
        except ClientError as exc:
            if http_status(exc) == 412:
                return False
            raise
        return True

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Create or replace ``key``; S3 replaces whole objects atomically."""
        full_key = self._full_key(key)
        if len(data) > self.multipart_threshold:
            self._multipart_upload(key, full_key, memoryview(data))
        else:
            self._put_object(key, full_key, bytes(data))

    def _put_object(self, key: str, full_key: str, body: bytes) -> None:
        extra = self._extra_args(key)
        self._call("put", full_key,
                   lambda: self._client.put_object(Bucket=self.bucket, Key=full_key, Body=body, **extra),
                   written=len(body))

    @property
    def conditional_put_supported(self) -> bool:
        """Whether the server refuses ``If-None-Match: *`` PUTs onto existing keys (probed on first use)."""
        with self._probe_lock:
            if self._conditional_put is None:
                self._conditional_put = self._probe_conditional_put()
            return self._conditional_put

    def _probe_conditional_put(self) -> bool:
        """Write a fresh probe key twice with ``If-None-Match: *``; support means the second answers 412.

        An error that means "I do not know this header" (501, 400, NotImplemented)
        or a second write that succeeds (a silent overwrite) means no support.
        A 412 already on the first write can only come from our own first
        attempt whose answer was lost before a retry — which shows support too.
        """
        full_key = self._full_key(f"{PROBE_PREFIX}{secrets.token_hex(8)}")
        try:
            first = self._probe_put(full_key)
            supported = first is False or (first is True and self._probe_put(full_key) is False)
        finally:
            self._delete_full_key(full_key)
        log.info("object_store_conditional_put", region=self.region.name, bucket=self.bucket, supported=supported)
        return supported

    def _probe_put(self, full_key: str) -> bool | None:
        """One probe write: True created, False refused with 412, None if the server rejects the header.

        A rejection is an answer here, not a store failure, so it is not counted as an error.
        """

        def attempt() -> bool | None:
            try:
                return self._put_unless_exists(full_key, b"probe", {})
            except ClientError as exc:
                if http_status(exc) in (400, 501) or error_code(exc) in _NOT_IMPLEMENTED_CODES:
                    return None
                raise

        return self._call("put", full_key, attempt, written=5)

    # --------------------------------------------------------------- multipart
    def _multipart_upload(self, key: str, full_key: str, data: memoryview) -> None:
        """Upload ``data`` in parts, in parallel; abort the upload on any failure so no parts linger."""
        extra = self._extra_args(key)
        upload_id = self._call(
            "multipart", full_key,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full_key, **extra)["UploadId"],
        )
        completed = False
        try:
            bounds = [(number, start, min(start + self.part_size, len(data)))
                      for number, start in enumerate(range(0, len(data), self.part_size), start=1)]
            pool = ThreadPoolExecutor(max_workers=min(pools.MULTIPART_THREADS, len(bounds)),
                                      thread_name_prefix="zfsbackd-s3-part")
            try:
                futures = [pool.submit(self._upload_part, full_key, upload_id, number, data[start:end])
                           for number, start, end in bounds]
                parts = [{"PartNumber": number, "ETag": future.result()}
                         for (number, _, _), future in zip(bounds, futures, strict=True)]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # no part may still be running when we abort
            self._call("multipart", full_key, lambda: self._complete_upload(full_key, upload_id, parts, len(data)))
            completed = True
        finally:
            if not completed:
                self._abort_upload(full_key, upload_id)

    def _upload_part(self, full_key: str, upload_id: str, number: int, body: memoryview) -> str:
        """Upload one part (retried on its own) and return its ETag."""
        payload = bytes(body)
        return self._call(
            "put", full_key,
            lambda: self._client.upload_part(Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                                             Body=payload)["ETag"],
            written=len(payload),
        )

    def _complete_upload(self, full_key: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> None:
        """Complete; a NoSuchUpload answer to a retry means our earlier attempt completed (answer lost)."""
        try:
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except ClientError as exc:
            if error_code(exc) == "NoSuchUpload":
                head = self._head_full(full_key)
                if head is not None and int(head["ContentLength"]) == size:
                    return
            raise

    def _abort_upload(self, full_key: str, upload_id: str) -> bool:
        """Abort, tolerating an upload already gone; a failure is logged (False), never raised over the real error.

        Parts of an upload that cannot be aborted now are aborted later by
        :meth:`remove_stale_writes`.
        """

        def abort() -> None:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            except ClientError as exc:
                if error_code(exc) != "NoSuchUpload":
                    raise

        try:
            self._call("multipart", full_key, abort)
        except StoreError as exc:
            log.warning("object_store_abort_failed", region=self.region.name, bucket=self.bucket,
                        object_key=full_key, error=exc.message)
            return False
        return True

    def _stale_uploads(self, older_than: float) -> Iterator[tuple[str, str, float]]:
        """(full key, upload id, initiated) of each multipart upload under our prefix started before ``older_than``."""
        markers: dict[str, str] = {}
        while True:
            page = self._call(
                "list", None,
                lambda markers=markers: self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix,
                                                                            **markers),
            )
            for upload in page.get("Uploads", []):
                initiated = upload["Initiated"].timestamp()
                if initiated < older_than:
                    yield upload["Key"], upload["UploadId"], initiated
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
            if not markers["KeyMarker"]:
                raise StoreError(f"{self._where(None)}: the server said more multipart uploads follow but gave no "
                                 "marker to continue from")

    def _uploaded_bytes(self, full_key: str, upload_id: str) -> int:
        """Bytes held by the parts of an incomplete upload (what aborting it frees); 0 if it is gone."""
        total = 0
        marker: dict[str, int] = {}
        while True:

            def attempt(marker: dict[str, int] = marker) -> dict[str, Any] | None:
                try:
                    return self._client.list_parts(Bucket=self.bucket, Key=full_key, UploadId=upload_id, **marker)
                except ClientError as exc:
                    if error_code(exc) == "NoSuchUpload":
                        return None
                    raise

            page = self._call("list", full_key, attempt)
            if page is None:
                return total
            total += sum(int(part["Size"]) for part in page.get("Parts", []))
            if not page.get("IsTruncated") or not page.get("NextPartNumberMarker"):
                return total
            marker = {"PartNumberMarker": int(page["NextPartNumberMarker"])}

    def stale_writes(self, older_than: float) -> list[ObjectInfo]:
        """Incomplete multipart uploads initiated before ``older_than``: their parts cost storage until aborted.

        ``key`` is the object key the upload was for, ``size`` the bytes of its
        parts, ``mtime`` when it was initiated.
        """
        return [
            ObjectInfo(full_key[len(self.prefix):], self._uploaded_bytes(full_key, upload_id), initiated)
            for full_key, upload_id, initiated in self._stale_uploads(older_than)
        ]

    def remove_stale_writes(self, older_than: float) -> int:
        """Abort every multipart upload under our prefix initiated before ``older_than``; return how many."""
        aborted = sum(
            1 for full_key, upload_id, _ in list(self._stale_uploads(older_than))
            if self._abort_upload(full_key, upload_id)
        )
        if aborted:
            log.info("object_store_stale_uploads_aborted", region=self.region.name, bucket=self.bucket, count=aborted)
        return aborted

    def sweep_stale_uploads(self, older_than_seconds: float = STALE_UPLOAD_SECONDS) -> int:
        """Abort multipart uploads under our prefix started more than ``older_than_seconds`` ago.

        An upload interrupted by a crash (no abort could run), or one whose
        CreateMultipartUpload answer was lost before a retry, keeps its parts —
        and their storage cost — forever; no writer takes a day over one pack,
        so anything older is abandoned.  Returns how many were aborted.
        """
        return self.remove_stale_writes(time.time() - older_than_seconds)

    # -------------------------------------------------------------------- reads
    def get(self, key: str) -> bytes:
        full_key = self._full_key(key)
        return self._call("get", full_key, lambda: self._read(full_key, {}), measure=len)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """A negative ``offset`` becomes a suffix range (``bytes=-N``): no HEAD needed to find the end."""
        full_key = self._full_key(key)
        if length <= 0:
            return b""
        byte_range = f"bytes={offset}" if offset < 0 else f"bytes={offset}-{offset + length - 1}"
        return self._call("get", full_key, lambda: self._read(full_key, {"Range": byte_range})[:length], measure=len)

    def _read(self, full_key: str, extra: dict[str, str]) -> bytes:
        """One GetObject including its body, so a connection lost mid-body is retried like any other failure."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full_key, **extra)
        except ClientError as exc:
            if error_code(exc) == "NoSuchKey":
                raise FileNotFoundError(errno.ENOENT, f"{self._where(full_key)}: no such object", full_key) from None
            if http_status(exc) == 416:  # a range that starts at or past the end, as pread gives
                return b""
            raise
        return response["Body"].read()

    def head(self, key: str) -> ObjectInfo | None:
        full_key = self._full_key(key)
        response = self._call("head", full_key, lambda: self._head_full(full_key))
        if response is None:
            return None
        return ObjectInfo(
            key, int(response["ContentLength"]), response["LastModified"].timestamp(), response.get("ETag", "")
        )

    def _head_full(self, full_key: str) -> dict[str, Any] | None:
        """One HeadObject: its response, or None if the key is absent."""
        try:
            return self._client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if http_status(exc) == 404:
                return None
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """ListObjectsV2 page by page, each page retried on its own.

        botocore's paginator cannot resume after a failed page, so the loop is
        written out: it follows ``IsTruncated`` and ``NextContinuationToken``
        and never infers the end from the number of keys (Ceph returned 993 of
        1000 with more to come).
        """
        full_prefix = self._full_key(prefix) if prefix else self.prefix
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "list", full_prefix,
                lambda token=token: self._client.list_objects_v2(Bucket=self.bucket, Prefix=full_prefix, **token),
            )
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    item["Key"][len(self.prefix):], int(item["Size"]), item["LastModified"].timestamp(),
                    item.get("ETag", ""),
                )
            if not page.get("IsTruncated"):
                return
            next_token = page.get("NextContinuationToken")
            if not next_token:
                raise StoreError(f"{self._where(full_prefix)}: the server said the listing is truncated but gave no "
                                 "continuation token")
            token = {"ContinuationToken": next_token}

    # ------------------------------------------------------------------- delete
    def delete(self, key: str) -> None:
        self._delete_full_key(self._full_key(key))

    def _delete_full_key(self, full_key: str) -> None:
        """DeleteObject; S3 answers 204 for absent keys too, so deleting twice is not an error."""

        def attempt() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=full_key)
            except ClientError as exc:
                if error_code(exc) != "NoSuchKey":
                    raise

        self._call("delete", full_key, attempt)

    # ------------------------------------------------------------------- health
    def check_reachable(self) -> None:
        """HEAD the bucket (clear errors for a dead endpoint, bad credentials, a missing bucket), then sweep.

        HEAD answers carry no error code, so a 403 or 404 is asked again as a
        one-key listing, whose body says which: InvalidAccessKeyId,
        SignatureDoesNotMatch, AccessDenied or NoSuchBucket.
        """

        def attempt() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if http_status(exc) in (403, 404):
                    self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
                raise

        self._call("head", None, attempt)
        self.sweep_stale_uploads()
