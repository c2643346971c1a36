"""A real daemon process for tests: started with a NOTIFY_SOCKET we read, logs we parse."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from enginekit import REPO, cli_command


class DaemonProcess:
    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        watchdog_usec: int | None = None,
        tick: float = 1.0,
        fault_point: str | None = None,
    ) -> None:
        """``fault_point`` arms ``ZFSBACKD_FAULT_POINT`` in the daemon (see zfsbackd/faults.py)."""
        self.config = config
        self.fault_point = fault_point
        self.workdir = workdir
        self.watchdog_usec = watchdog_usec
        self.tick = tick
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = workdir / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.log_path = workdir / "daemon.log"
        self.started_at = 0.0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(self.notify_path)}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        if self.fault_point:
            env["ZFSBACKD_FAULT_POINT"] = self.fault_point
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cli_command(self.config, "daemon", "--tick-seconds", str(self.tick)), env=env, stdout=log, stderr=log
        )

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        """The next notify message with a line starting with ``prefix`` (messages are kept)."""
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if any(line.startswith(prefix) for line in msg.splitlines()):
                self.messages.remove(msg)
                return msg
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"daemon exited: {self.log_text()[-3000:]}"
            self.notify.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
            try:
                msg = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            if any(line.startswith(prefix) for line in msg.splitlines()):
                return msg
            self.messages.append(msg)
        raise AssertionError(f"no {prefix!r} notification within {timeout} s; log:\n{self.log_text()[-3000:]}")

    def forget_notifications(self) -> None:
        """Drop every notification received so far, e.g. a killed earlier start's READY=1."""
        self.messages.clear()
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(65536)
        except BlockingIOError:
            pass

    def wait_ready(self, timeout: float = 60.0) -> float:
        self.wait_for("READY=1", timeout)
        return time.monotonic() - self.started_at

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def metrics_url(self, timeout: float = 10.0) -> str:
        # READY=1 is sent just before the daemon_ready line is written: right after wait_ready() it may lag.
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == "daemon_ready" for e in self.events()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (ready,) = [e for e in self.events() if e.get("event") == "daemon_ready"][-1:]
        return f"http://{ready['metrics']}/metrics"

    def thread_dump(self) -> str:
        """Every thread's stack (the daemon's SIGUSR1 handler writes them to its log)."""
        before = len(self.log_text())
        self.signal(signal.SIGUSR1)
        time.sleep(1)
        return self.log_text()[before:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def wait_killed(self, timeout: float = 120.0) -> None:
        """Wait for an armed fault point to SIGKILL the daemon."""
        assert self.proc is not None
        assert self.proc.wait(timeout) == -signal.SIGKILL, self.log_text()[-3000:]

    def close(self) -> None:
        self.kill()
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
