"""Real S3 servers for tests: moto in-process, Ceph RGW from ../shared/s3, and a fault-injecting proxy.

Fixtures live here (not in conftest.py) and are imported by the S3 test
modules with ``from s3kit import ...``.

* ``moto_server`` (per module) and ``moto_bucket``: fast, but moto checks no
  signatures, so credential errors are tested against Ceph.
* ``ceph`` (per session) and ``ceph_bucket``: Ceph 16 RADOS Gateway started by
  ``../shared/s3/ceph-rgw.sh`` (its environment settings — CEPH_DIR, RGW_PORT,
  MON_PORT — pass through).  A cluster that already runs is reused and left
  running; one this fixture started is stopped at the end of the session.
* :class:`FaultProxy`: an HTTP proxy on 127.0.0.1 between the client and a
  server that, driven by a seeded RNG, answers some requests with 503
  SlowDown or 500 InternalError, resets some connections (before forwarding,
  after forwarding so the answer is lost, halfway through a response body, or
  halfway through a request body) and delays others.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from moto.server import ThreadedMotoServer

from zfsbackd.store.crypto import generate_key_file

REPO = Path(__file__).resolve().parent.parent
CEPH_SCRIPT = REPO.parent / "shared" / "s3" / "ceph-rgw.sh"
CEPH_START_TIMEOUT = 300

# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class S3Server:
    """Where a test S3 server listens and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """A plain boto3 client for test set-up and inspection (not the code under test)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=BotoConfig(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )


def new_bucket_name() -> str:
    return f"zfsbackd-test-{uuid.uuid4().hex[:16]}"


def empty_and_delete_bucket(client: Any, bucket: str) -> None:
    """Abort uploads, delete every object, delete the bucket (keeps a memstore Ceph small)."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


def remaining_uploads(client: Any, bucket: str) -> list[str]:
    """Keys of multipart uploads still open in ``bucket``."""
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.fixture(scope="module")
def moto_server() -> Iterator[S3Server]:
    """moto's S3 in this process, on a free port of 127.0.0.1."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", "moto-access-key", "moto-secret-key")
    finally:
        server.stop()


@pytest.fixture
def moto_bucket(moto_server: S3Server) -> Iterator[str]:
    client = moto_server.client()
    bucket = new_bucket_name()
    client.create_bucket(Bucket=bucket)
    yield bucket
    empty_and_delete_bucket(client, bucket)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means a server is there
    except OSError:
        return False


def _facility_missing(reason: str) -> NoReturn:
    """CI installs Ceph (scripts/setup-env.sh), so there a missing one is a failure; elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ceph() -> Iterator[S3Server]:
    """A Ceph RGW cluster on 127.0.0.1 for the session."""
    if not CEPH_SCRIPT.is_file():
        _facility_missing(f"{CEPH_SCRIPT} is missing: the S3 server scripts live in ../shared/s3 beside the repo")
    if shutil.which("radosgw") is None:
        _facility_missing("Ceph RGW is not installed (no radosgw): run scripts/setup-env.sh, which installs it "
                          "with ../shared/s3/ceph-rgw.sh install")
    endpoint = f"http://127.0.0.1:{os.environ.get('RGW_PORT', '7480')}"
    already_running = _answers_http(endpoint)
    proc = subprocess.run(["bash", str(CEPH_SCRIPT), "start"], capture_output=True, text=True,
                          timeout=CEPH_START_TIMEOUT, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{CEPH_SCRIPT} start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    server = S3Server(info["endpoint"], info["access_key"], info["secret_key"], info["region"])
    try:
        yield server
    finally:
        if not already_running:
            subprocess.run(["bash", str(CEPH_SCRIPT), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture
def ceph_bucket(ceph: S3Server) -> Iterator[str]:
    """A new empty bucket on Ceph, emptied and deleted afterwards."""
    client = ceph.client()
    bucket = new_bucket_name()
    client.create_bucket(Bucket=bucket)
    yield bucket
    empty_and_delete_bucket(client, bucket)


# --------------------------------------------------------------------------- config helpers


def write_credentials_file(path: Path, access_key: str, secret_key: str) -> Path:
    """An AWS shared-credentials file with profile ``default``, mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"[default]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n")
    return path


def write_s3_config(
    tmp_path: Path,
    sources: dict[str, Path],
    *,
    endpoint: str,
    bucket: str,
    credentials_file: Path,
    region_name: str = "s3home",
    prefix: str = "zfsbackd/",
) -> Path:
    """Like enginekit.write_config, with the home region in an S3 bucket instead of a directory."""
    key = tmp_path / "store.key"
    if not key.exists():
        generate_key_file(key)
    data = {
        "state_dir": str(tmp_path / "state"),
        "home_region": region_name,
        "regions": {
            region_name: {
                "type": "s3",
                "endpoint_url": endpoint,
                "bucket": bucket,
                "prefix": prefix,
                "credentials_file": str(credentials_file),
                "addressing_style": "path",
                "create_if_missing": True,
            }
        },
        "encryption": {"key_file": str(key)},
        "garbage_collection": {"grace_period_seconds": 0},
        "file_systems": [{"id": f"fs-{name}", "source": {"path": str(path)}} for name, path in sources.items()],
    }
    path = tmp_path / "zfsbackd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- fault-injecting proxy

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "expect",
})
_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
}
#: A FaultPlan rule: (method, path with query, request headers) → a status to answer instead of forwarding.
Rule = Callable[[str, str, Message], int | None]


@dataclass(frozen=True)
class FaultPlan:
    """Fractions of requests that fail in each way; each request draws once from a seeded RNG."""

    error_rate: float = 0.10  # answered 503 SlowDown or 500 InternalError (XML body), never forwarded
    reset_rate: float = 0.03  # connection reset (RST) at one of four points
    delay_rate: float = 0.10  # answered after a pause of up to max_delay seconds
    max_delay: float = 0.3
    seed: int = 1
    #: A flaky server, not a dead one: the same request line fails at most this many times, so a client
    #: with more attempts always gets through and the test cannot fail by bad luck.
    max_faults_per_request: int = 2
    rule: Rule | None = None
    #: Request headers removed before forwarding (only for servers that check no signatures, like moto).
    drop_headers: frozenset[str] = frozenset()


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that forwards to ``upstream`` and injects faults.

    ``stats`` counts requests and each fault injected, so a test can show the
    faults really happened.  The Host header is forwarded untouched because
    the client's SigV4 signature covers it.
    """

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.plan = plan
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(plan.seed)
        self._faults_by_request: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults(self) -> int:
        return sum(n for name, n in self.stats.items() if name != "requests")

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def choose(self, method: str, path: str, headers: Message) -> tuple[str, float]:
        """Pick the fate of one request: (fault name or "", delay in seconds)."""
        with self._lock:
            self.stats["requests"] += 1
            if self.plan.rule is not None:
                status = self.plan.rule(method, path, headers)
                if status is not None:
                    self.stats[f"rule_{status}"] += 1
                    return f"status_{status}", 0.0
            draw = self._rng.random()
            delay = self._rng.uniform(0, self.plan.max_delay) if self._rng.random() < self.plan.delay_rate else 0.0
            if delay:
                self.stats["delays"] += 1
            if self._faults_by_request[(method, path)] >= self.plan.max_faults_per_request:
                fault = ""
            elif draw < self.plan.error_rate:
                fault = f"status_{self._rng.choice((503, 500))}"
            elif draw < self.plan.error_rate + self.plan.reset_rate:
                fault = self._rng.choice(("reset_before", "reset_after", "reset_mid_response", "reset_mid_request"))
            else:
                fault = ""
            if fault:
                self.stats[fault] += 1
                self._faults_by_request[(method, path)] += 1
            return fault, delay


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 uses it

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes; without this, Nagle's algorithm and delayed
            # ACKs hold every response back by 40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: object) -> None:
            """Silence the per-request access log."""

        def _reset(self) -> None:
            """Close with SO_LINGER 0: the client sees a connection reset, not a clean end."""
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            fault, delay = proxy.choose(self.command, self.path, self.headers)
            if fault == "reset_mid_request" and length > 1:
                self.rfile.read(length // 2)
                self._reset()
                return
            body = self.rfile.read(length) if length else b""
            if delay:
                time.sleep(delay)
            if fault.startswith("status_"):
                self._send_error(int(fault.removeprefix("status_")))
                return
            if fault in ("reset_before", "reset_mid_request"):
                self._reset()
                return
            status, reason, headers, payload = self._forward(body)
            if fault == "reset_after":
                self._reset()
                return
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if fault == "reset_mid_response" and len(payload) > 1:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(payload)

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() not in proxy.plan.drop_headers:
                        conn.putheader(name, value)
                conn.endheaders(body or None)
                response = conn.getresponse()
                payload = response.read()
                headers = [(n, v) for n, v in response.getheaders()
                           if n.lower() not in _HOP_BY_HOP and n.lower() != "content-length"]
                if self.command == "HEAD" or response.status in (204, 304):
                    upstream_length = response.getheader("Content-Length")
                    if upstream_length is not None:
                        headers.append(("Content-Length", upstream_length))
                else:
                    headers.append(("Content-Length", str(len(payload))))
                return response.status, response.reason, headers, payload
            finally:
                conn.close()

        def _send_error(self, status: int) -> None:
            code, message = _ERRORS.get(status, (str(status), "Injected by the test proxy."))
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def part_number_rule(number: int, status: int = 500) -> Rule:
    """A FaultPlan rule that fails every upload of multipart part ``number`` with ``status``."""
    pattern = re.compile(rf"[?&]partNumber={number}(&|$)")

    def rule(method: str, path: str, headers: Message) -> int | None:
        return status if method == "PUT" and pattern.search(path) else None

    return rule


def conditional_put_rule(method: str, path: str, headers: Message) -> int | None:
    """A FaultPlan rule for a server that does not implement ``If-None-Match`` on PUT (Swift answers 501)."""
    return 501 if method == "PUT" and "If-None-Match" in headers else None
