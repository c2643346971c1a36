"""Connections to S3 that acknowledge the server's replies at once (Linux ``TCP_QUICKACK``).

Why: on a kept-alive connection Linux soon decides the exchange is interactive
and delays its ACKs by ~40 ms, hoping to piggyback them on the next request.
A server that writes a reply's headers and body separately with Nagle's
algorithm on (Ceph RGW does, for every GET and listing) then holds the body
until that ACK arrives: every request after a connection's first costs 40 ms
more than the server takes (measured against Ceph RGW on 127.0.0.1: a
listing or a small GET 44 ms, with quick ACKs 1.2 to 1.7 ms; a no-change backup
of 5,000 files to S3 makes ~15 requests). ``TCP_QUICKACK`` is not sticky —
the kernel leaves quick-ACK mode again — so it is set each time a response is
about to be read, which costs one system call per request and nothing on the
wire a client should mind.

botocore builds its connection pools from the URLLib3Session's
``_pool_classes_by_scheme`` and has no public way to choose them;
:func:`install` swaps in the subclasses below and reports whether it could,
so a botocore that changed shape costs speed, never a request (the test
suite checks that it still applies).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)

QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _ack_replies_at_once(sock: socket.socket | None) -> None:
    """Leave delayed-ACK mode for the reply about to be read; a socket that refuses it just stays slower."""
    if sock is None or QUICKACK is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


class _QuickAck:
    """Mixed into botocore's connections: each reply's segments are acknowledged as they arrive."""

    sock: socket.socket | None

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _ack_replies_at_once(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class QuickAckHTTPConnection(_QuickAck, AWSHTTPConnection):
    """botocore's plain-HTTP connection with quick ACKs."""


class QuickAckHTTPSConnection(_QuickAck, AWSHTTPSConnection):
    """botocore's TLS connection with quick ACKs."""


class QuickAckHTTPConnectionPool(AWSHTTPConnectionPool):
    """botocore's plain-HTTP pool, opening quick-ACK connections."""

    ConnectionCls = QuickAckHTTPConnection


class QuickAckHTTPSConnectionPool(AWSHTTPSConnectionPool):
    """botocore's TLS pool, opening quick-ACK connections."""

    ConnectionCls = QuickAckHTTPSConnection


POOLS = {"http": QuickAckHTTPConnectionPool, "https": QuickAckHTTPSConnectionPool}


def install(client: Any) -> bool:
    """Make *client* (a botocore S3 client, before its first request) open quick-ACK connections.

    Returns False, changing nothing, when the platform has no ``TCP_QUICKACK``
    or botocore no longer keeps its pool classes where this looks for them.
    """
    if QUICKACK is None:
        return False
    http_session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    pools = getattr(http_session, "_pool_classes_by_scheme", None)
    if not isinstance(pools, dict) or set(pools) != set(POOLS):
        return False
    # The pool managers (direct and proxied) share this dict: pools made from now on use these classes.
    pools.update(POOLS)
    return True


def installed(client: Any) -> bool:
    """Whether *client* opens quick-ACK connections (for tests and the startup log)."""
    http_session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    return getattr(http_session, "_pool_classes_by_scheme", None) == POOLS
