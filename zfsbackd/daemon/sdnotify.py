"""The systemd notify protocol (sd_notify(3)), spoken directly over $NOTIFY_SOCKET.

No libsystemd binding is needed: it is one datagram per state change. Without
$NOTIFY_SOCKET (not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

#: how long a message may wait for room in the listener's queue before it is dropped
SEND_TIMEOUT_SECONDS = 1.0


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = ("\0" + address[1:]) if address and address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog_for_us = usec and (not pid or pid == str(os.getpid()))
        #: seconds between WATCHDOG=1 pings (half the configured timeout), or None
        self.watchdog_interval = int(usec) / 2_000_000 if watchdog_for_us and usec else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> None:
        """Send one message; never blocks the caller for long.

        A datagram to a receiver whose queue is full blocks until it reads;
        the caller is the daemon's main loop, so a listener that stopped
        reading must cost a message, not every tick (and with them the metrics
        and the watchdog). If systemd went away (or never listened) there is
        nothing useful to do either.
        """
        if not self._address:
            return
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
            contextlib.suppress(OSError),  # TimeoutError included
        ):
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        """Start a reload. systemd ≥ 253 (``Type=notify-reload`` semantics) matches the reload to the
        ``systemctl reload`` request by ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, as sd_notify(3) says) and
        fails the request without it."""
        self.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            "STATUS=reloading configuration",
        )

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: checkpointing running backups")

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask systemd for ``seconds`` more before it kills us (``EXTEND_TIMEOUT_USEC``).

        The unit's ``TimeoutStopSec`` is a fixed number in a file while
        ``daemon.stop_timeout_seconds`` (up to an hour) is the admin's promise
        of how long a checkpoint may take: sent repeatedly while stopping,
        this keeps systemd from SIGKILLing a checkpoint that is within its
        bound. Each message replaces the previous extension, counted from now.
        """
        self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}", f"STATUS={status}")
