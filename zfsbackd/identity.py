"""Who this process is, in a store shared by a fleet: host name, host id, boot, process.

``host_name`` (config) is what people read and what records carry. The host
id is what leases carry to tell hosts apart when names collide: a random id
made once and kept in ``state_dir/host-id``, so it survives restarts and
reinstalls of the package but not a new ``state_dir`` (a new host). The boot
id (``/proc/sys/kernel/random/boot_id``) and the pid tell a crashed
predecessor on this machine (same boot, process gone) from a live process or
another machine that uses a copy of this ``state_dir`` (a cloned VM).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from zfsbackd.statedir import ensure_state_dir, unusable

HOST_ID_FILE = "host-id"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class HostIdentity:
    host_name: str
    host_id: str
    boot_id: str
    pid: int

    @classmethod
    def of(cls, host_name: str, state_dir: Path) -> HostIdentity:
        return cls(host_name, host_id(state_dir), boot_id(), os.getpid())

    @classmethod
    def anonymous(cls) -> HostIdentity:
        """A process with no state_dir (a tool opening a store directly): a host id of its own."""
        return cls(socket.gethostname().split(".")[0] or "localhost", secrets.token_hex(16), boot_id(), os.getpid())

    def predecessor_is_dead(self, other_boot_id: str, other_pid: int) -> bool:
        """True when a process of this host id ran on this machine and is gone (a crash, a reboot)."""
        if other_boot_id != self.boot_id:
            return False  # another boot of this machine, or another machine: not ours to judge
        try:
            os.kill(other_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def host_id(state_dir: Path) -> str:
    """This host's id, made on first use (32 hex digits; a lost ``state_dir`` makes a new host).

    A ``state_dir`` this process cannot use is StateDirUnusable, naming it.
    """
    try:
        return _host_id(state_dir)
    except OSError as exc:
        raise unusable(state_dir, exc) from exc


def _host_id(state_dir: Path) -> str:
    path = state_dir / HOST_ID_FILE
    existing = _read_host_id(path)
    if existing is not None:
        return existing
    ensure_state_dir(state_dir)
    temp = path.with_name(f".{HOST_ID_FILE}.{os.getpid()}")
    temp.write_text(secrets.token_hex(16) + "\n")
    try:
        if path.exists():  # damaged (not 32 hex digits): replaced, as a lost file would be
            os.replace(temp, path)
        else:
            os.link(temp, path)  # first writer wins: two processes starting at once agree on one id
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    value = _read_host_id(path)
    assert value is not None
    return value


def _read_host_id(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else None


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:  # not Linux, or /proc not mounted: a process can still not be judged dead
        return "unknown"
