"""The systemd notify protocol (sd_notify(3)), spoken directly over $NOTIFY_SOCKET.

No libsystemd binding is needed: it is one datagram per state change. Without
$NOTIFY_SOCKET (not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket


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
        if not self._address:
            return
        # If systemd went away (or never listened) there is nothing useful to do.
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
            contextlib.suppress(OSError),
        ):
            sock.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        self.notify("RELOADING=1", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: checkpointing running backups")
