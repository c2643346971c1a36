"""Soak test of a fleet (issue 12): three daemons share one store while the test kills them at random.

Three zfsbackd daemons (host-a, host-b, host-c: three state directories, three
host ids, three sources on the loopback XFS) back up into one home store
(``local``) and copy to a second region (``eu``), once on local directories
and once on a real Ceph RGW behind the fault-injecting proxy. A thread per host
mutates its source, asks for backups (with a client request token, so a
request whose answer a kill lost is asked again safely), deletes older ones and
requests copies; a chaos thread SIGKILLs daemons at random moments and restarts
them, sometimes armed with a ``ZFSBACKD_FAULT_POINT`` so the next one dies at
an exact step (mid-pack, mid-index, mid-GC).

At the end, every daemon is restarted and left to finish its work, then:
no record is left CREATING, PENDING or COPYING; no backup asked for is lost or
FAILED; garbage collection (grace 0) frees what deleted backups alone held;
``check --read-data`` is clean in both regions; every AVAILABLE backup of every
host, in both regions, restores identical (data and metadata) to the tree it
was taken of; the hosts deduplicated against each other.

``ZFSBACKD_SOAK_SECONDS`` sets the chaos time per variant (default 45; CI's
long suite sets 600); ``ZFSBACKD_SOAK_SEED`` replays a run's random choices
(the seed is printed, and named in every failure message). Thread timing is
not replayed, so a replay repeats the same workload and kill plan, not the
same interleaving.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemonkit import DaemonProcess
from enginekit import REPO, cli_command, write_host_config
from fsfixtures import remove_tree, tree_manifest
from s3kit import FaultPlan, FaultProxy, S3Server, ceph, ceph_bucket, write_credentials_file  # noqa: F401

from zfsbackd import errors, faults
from zfsbackd.config import load_config
from zfsbackd.daemon.client import DaemonClient, DaemonUnavailable
from zfsbackd.engine.engine import Engine
from zfsbackd.store.records import BackupRecord, Lifecycle

MiB = 1024 * 1024
KiB = 1024
HOSTS = ("host-a", "host-b", "host-c")
FS = "fs-home"
SOAK_SECONDS = float(os.environ.get("ZFSBACKD_SOAK_SECONDS", "45"))
LEASE_SECONDS = 9  # short, so the leases of killed daemons expire soon (renewed every 3 s)
COMMON_SIZE = 6 * MiB
SETTLE_TIMEOUT = 300.0
#: Where a restarted daemon may be told to kill itself (zfsbackd/faults.py); None: a plain restart.
FAULT_POINTS = (
    None, None, None, "pack-uploaded:1", "pack-uploaded:3", "index-written:1", "backup-data-durable:1",
    "gc-index-replaced:1", "gc-pack-deleted:1", "record-deleted:1", "index-cache-written:2",
)
UNFINISHED = (Lifecycle.CREATING, Lifecycle.PENDING, Lifecycle.COPYING)
TRANSIENT = (DaemonUnavailable, errors.DaemonUnresponsive, errors.DaemonBusy)


def _seed() -> int:
    return int(os.environ.get("ZFSBACKD_SOAK_SEED") or random.SystemRandom().randrange(1, 2**31))


class SoakDaemon(DaemonProcess):
    """A DaemonProcess whose start can arm a fault point, and which counts its starts and deaths."""

    def __init__(self, name: str, config: Path, workdir: Path) -> None:
        super().__init__(config, workdir)
        self.name = name
        self.socket = workdir / "control.sock"
        self.starts = 0
        self.ready_start = 0  # the start whose READY=1 was last seen
        self.armed: str | None = None

    def start(self, fault_point: str | None = None) -> None:  # type: ignore[override]
        env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
        env.update(PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(self.notify_path))
        if fault_point:
            env[faults.ENV_VAR] = fault_point
        self.armed = fault_point
        self.starts += 1
        self.forget_notifications()  # so that wait_ready() waits for this start's READY=1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== test: start {self.starts} fault_point={fault_point}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                cli_command(self.config, "daemon", "--tick-seconds", str(self.tick)), env=env, stdout=log, stderr=log
            )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for this start's READY=1, once (a daemon not restarted since is still ready)."""
        if self.ready_start != self.starts:
            super().wait_ready(timeout)
            self.ready_start = self.starts
        return time.monotonic() - self.started_at

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def gc_packs_deleted(self) -> int:
        return sum(int(e.get("PacksDeleted", 0)) for e in self.events() if e.get("event") == "garbage_collected")


@dataclass
class Soak:
    """What the host threads did and saw; shared by the threads (guarded by ``lock``)."""

    seed: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    manifests: dict[str, dict[bytes, dict[str, Any]]] = field(default_factory=dict)  # backup id → source tree
    owner: dict[str, str] = field(default_factory=dict)  # backup id → host
    requested: dict[str, list[str]] = field(default_factory=dict)  # host → its backup ids, in order
    deleted: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)  # the daemon died before answering: either is right
    copies: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    thread_errors: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    first_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # host → its first backup's Stats


def _call(daemon: SoakDaemon, stop: threading.Event, action: str, *, retry: bool = True, **params: Any) -> Any:
    """One control-socket request; while the daemon is down (killed), wait for it and ask again."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            with DaemonClient(daemon.socket, timeout=60) as client:
                return client.call(action, **params)
        except TRANSIENT:
            if not retry or time.monotonic() > deadline:
                raise
        if stop.is_set() and action != "CreateBackup":
            raise DaemonUnavailable("stopping")
        time.sleep(0.2)


def _mutate(src: Path, rng: random.Random, step: int) -> None:
    """Add, change and remove small files; now and then a big one (what deleted backups alone hold)."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "00-common.bin")
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.35 or not files:
            sub = src / f"d{rng.randrange(4)}"
            sub.mkdir(exist_ok=True)
            path = sub / f"f{step}-{rng.randrange(10**6)}.dat"
            path.write_bytes(rng.randbytes(rng.randint(0, 256 * KiB)))
            os.chmod(path, rng.choice((0o600, 0o640, 0o644, 0o755)))
            if rng.random() < 0.3:
                os.setxattr(path, b"user.soak", rng.randbytes(rng.randint(1, 64)))
        elif roll < 0.6:
            path = rng.choice(files)
            with path.open("r+b") as handle:
                handle.seek(rng.randrange(max(1, path.stat().st_size)))
                handle.write(rng.randbytes(rng.randint(1, 64 * KiB)))
        elif roll < 0.8:
            path = rng.choice(files)
            path.unlink()
            files.remove(path)
        elif roll < 0.9:
            (src / f"big-{step}.bin").write_bytes(rng.randbytes(rng.randint(1, 2) * MiB))
        else:
            path = rng.choice(files)
            os.utime(path, ns=(time.time_ns(), rng.randrange(10**18)))
    for big in sorted(src.glob("big-*.bin"))[:-1]:  # at most one big file lives on: the others die with deletes
        if rng.random() < 0.5:
            big.unlink()


def _host_worker(
    name: str, daemon: SoakDaemon, src: Path, soak: Soak, rng: random.Random, stop: threading.Event,
    first_done: threading.Event,
) -> None:
    available: list[str] = []
    step = 0
    while not stop.is_set():
        step += 1
        if step > 1:
            _mutate(src, rng, step)
        manifest = tree_manifest(src)
        token = f"{name}-{soak.seed}-{step}"
        backup = _call(daemon, stop, "CreateBackup", FileSystemId=FS, ClientRequestToken=token)["Backup"]
        bid = backup["BackupId"]
        with soak.lock:
            soak.manifests[bid] = manifest
            soak.owner[bid] = name
            soak.requested.setdefault(name, []).append(bid)
            soak.counts["backups_requested"] += 1
        state = backup["Lifecycle"]
        while state in ("CREATING", "PENDING") and not stop.is_set():
            time.sleep(0.3)
            try:
                (backup,) = _call(daemon, stop, "DescribeBackups", BackupIds=[bid])["Backups"]
            except DaemonUnavailable:
                break
            state = backup["Lifecycle"]
        if state != "AVAILABLE":
            if state == "FAILED":
                with soak.lock:
                    soak.failed.append(f"{bid} ({name}): {backup.get('FailureDetails') or backup}")
            break  # stopping while it is CREATING: the end of the test waits for it; or it failed
        with soak.lock:
            soak.counts["backups_completed"] += 1
            soak.first_stats.setdefault(name, backup["Stats"])
        available.append(bid)
        first_done.set()
        if len(available) > 2 and rng.random() < 0.45:
            victim = rng.choice(available[:-1])
            try:
                _call(daemon, stop, "DeleteBackup", BackupId=victim)
                deleted = True
            except errors.BackupNotFound:
                deleted = True  # the first attempt did it before a kill lost its answer
            except (errors.BackupBeingCopied, errors.BackupInProgress):
                deleted = False
            except DaemonUnavailable:  # killed (or stopping) before it answered: it may have deleted it
                deleted = False
                with soak.lock:
                    soak.maybe_deleted.add(victim)
            if deleted:
                available.remove(victim)
                with soak.lock:
                    soak.deleted.add(victim)
                    soak.counts["deletes"] += 1
        if rng.random() < 0.35:
            source = rng.choice(available)
            try:
                copy = _call(daemon, stop, "CopyBackup", retry=False, SourceBackupId=source, DestinationRegion="eu")
                with soak.lock:
                    soak.copies.append(copy["Backup"]["BackupId"])
                    soak.counts["copies_requested"] += 1
            except (*TRANSIENT, errors.SourceBackupUnavailable):
                pass  # killed mid-request: the copy may exist anyway; it is checked like any other
        time.sleep(rng.uniform(0, 1.0))


def _guarded(soak: Soak, target: Any, *args: Any) -> None:
    try:
        target(*args)
    except BaseException as exc:  # reported by the test, with the seed
        with soak.lock:
            soak.thread_errors.append(f"{getattr(target, '__name__', target)}{args[:1]}: {exc!r}")


def _chaos(daemons: dict[str, SoakDaemon], soak: Soak, rng: random.Random, until: float) -> None:
    while time.monotonic() < until:
        time.sleep(rng.uniform(1.0, 6.0))
        for d in daemons.values():  # a daemon that killed itself at its fault point
            if not d.alive():
                soak.counts["fault_point_kills"] += 1
                d.start()
        victim = daemons[rng.choice(HOSTS)]
        if victim.alive():
            victim.kill()
            soak.counts["sigkills"] += 1
        time.sleep(rng.uniform(0.1, 2.0))
        point = rng.choice(FAULT_POINTS)
        victim.start(point)
        if point:
            soak.counts["armed_restarts"] += 1


def _records(engine: Engine, region: str) -> list[BackupRecord]:
    page = engine.describe_backups(region=region, all_hosts=True, filters={
        "lifecycle": [lc.value for lc in Lifecycle if lc != Lifecycle.DELETED]})
    assert page.unreadable == [], page.unreadable
    return page.records


def _data_bytes(engine: Engine, region: str) -> tuple[int, int]:
    infos = list(engine.store(region).objects.list("data/"))
    return sum(i.size for i in infos), len(infos)


def _distinct_file_bytes(manifests: list[dict[bytes, dict[str, Any]]]) -> int:
    sizes = {info["sha256"]: info["size"] for m in manifests for info in m.values() if info["type"] == "file"}
    return sum(sizes.values())


def _host_configs(
    tmp_path: Path, sources: dict[str, Path], s3: dict[str, Any] | None
) -> tuple[dict[str, Path], Path]:
    """Each host's config (grace 0, short leases, no automatic backups), and one for the verifying engine."""
    configs: dict[str, Path] = {}
    eu = tmp_path / "eu-store"
    for name in (*HOSTS, "verifier"):
        src = sources.get(name, tmp_path / "verifier-src")
        src.mkdir(exist_ok=True)
        shared = None if name == HOSTS[0] else tmp_path / HOSTS[0]
        config = write_host_config(tmp_path, name, {"home": src}, shared=shared, extra_regions={"eu": eu},
                                   extra_fs={"automatic_backup_retention_days": 0})
        data = yaml.safe_load(config.read_text())
        data["garbage_collection"] = {"grace_period_seconds": 0, "lease_seconds": LEASE_SECONDS}
        if s3 is not None:
            endpoint = s3["direct"] if name == "verifier" else s3["proxy"]
            for region, prefix in (("local", "home/"), ("eu", "eu/")):
                data["regions"][region] = {
                    "type": "s3", "endpoint_url": endpoint, "bucket": s3["bucket"], "prefix": prefix,
                    "credentials_file": str(s3["credentials"]), "addressing_style": "path",
                    "create_if_missing": True,
                }
        config.write_text(yaml.safe_dump(data))
        configs[name] = config
    verifier = configs.pop("verifier")
    return configs, verifier


def _log_tails(daemons: dict[str, SoakDaemon], chars: int = 4000) -> str:
    return "\n".join(f"----- {n} (starts {d.starts}):\n{d.log_text()[-chars:]}" for n, d in daemons.items())


@pytest.fixture(params=["local", "ceph"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any] | None]:
    """None for local directories; for Ceph, a bucket and the proxy's and Ceph's endpoints."""
    if request.param == "local":
        yield None
        return
    server: S3Server = request.getfixturevalue("ceph")
    bucket = request.getfixturevalue("ceph_bucket")
    plan = FaultPlan(error_rate=0.05, reset_rate=0.02, delay_rate=0.10, max_delay=0.3,
                     seed=int(os.environ.get("ZFSBACKD_SOAK_SEED") or 5))
    with FaultProxy(server.endpoint, plan) as proxy:
        credentials = write_credentials_file(tmp_path / "s3.ini", server.access_key, server.secret_key)
        yield {"proxy": proxy.url, "direct": server.endpoint, "bucket": bucket, "credentials": credentials,
               "fault_proxy": proxy}


def test_three_daemons_share_one_store(xfs_dir: Path, tmp_path: Path, backend: dict[str, Any] | None) -> None:
    seed = _seed()
    variant = "local" if backend is None else "ceph"
    print(f"\nsoak {variant}: ZFSBACKD_SOAK_SEED={seed} ZFSBACKD_SOAK_SECONDS={SOAK_SECONDS:g}")
    rng = random.Random(seed)
    started = time.monotonic()
    common = rng.randbytes(COMMON_SIZE)
    sources: dict[str, Path] = {}
    for name in HOSTS:
        src = sources[name] = xfs_dir / name
        src.mkdir()
        (src / "00-common.bin").write_bytes(common)  # the same on every host: deduplicated across hosts
        (src / "own.bin").write_bytes(rng.randbytes(2 * MiB))
        _mutate(src, rng, 0)
    configs, verifier_config = _host_configs(tmp_path, sources, backend)
    verifier = Engine(load_config(verifier_config))
    for region in ("local", "eu"):
        verifier.store(region)  # the stores exist before the daemons start (they never create one themselves)
    soak = Soak(seed)
    stop = threading.Event()
    daemons = {name: SoakDaemon(name, configs[name], configs[name].parent) for name in HOSTS}
    why = f"(seed {seed}, variant {variant})"
    with ExitStack() as cleanup:
        for d in daemons.values():
            cleanup.callback(d.close)
            d.start()
        for d in daemons.values():
            d.wait_ready(120)
        # host-a's first backup lands before the others start, so theirs deduplicate the common file against it.
        first_done = {name: threading.Event() for name in HOSTS}
        workers = {
            name: threading.Thread(
                target=_guarded, name=f"soak-{name}", daemon=True,
                args=(soak, _host_worker, name, daemons[name], sources[name], soak, random.Random(f"{seed}-{name}"),
                      stop, first_done[name]),
            )
            for name in HOSTS
        }
        workers[HOSTS[0]].start()
        assert first_done[HOSTS[0]].wait(120), f"host-a's first backup did not finish {why}\n{_log_tails(daemons)}"
        for name in HOSTS[1:]:
            workers[name].start()
        chaos_started = time.monotonic()
        chaos = threading.Thread(target=_guarded, name="soak-chaos", daemon=True,
                                 args=(soak, _chaos, daemons, soak, random.Random(f"{seed}-chaos"),
                                       chaos_started + SOAK_SECONDS))
        chaos.start()
        chaos.join(SOAK_SECONDS + 120)
        assert not chaos.is_alive(), f"chaos thread hangs {why}"
        stop.set()
        for d in daemons.values():  # from now on no fault point is armed: restart the armed and the dead
            if not d.alive():
                soak.counts["fault_point_kills"] += 1
                d.start()
            elif d.armed:
                d.kill()
                soak.counts["sigkills"] += 1
                d.start()
        for w in workers.values():
            w.join(SETTLE_TIMEOUT)
            assert not w.is_alive(), f"{w.name} hangs {why}\n{_log_tails(daemons)}"
        chaos_seconds = time.monotonic() - chaos_started
        for d in daemons.values():
            if not d.alive():
                d.start()
        for d in daemons.values():  # SIGTERM before its handler is installed would kill it, not stop it
            d.wait_ready(120)
        assert soak.thread_errors == [], f"{soak.thread_errors} {why}\n{_log_tails(daemons)}"

        # --- the restarted daemons finish every backup and copy left unfinished
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            assert all(d.alive() for d in daemons.values()), f"a daemon died {why}\n{_log_tails(daemons)}"
            stuck = [(r.region, r.host_name, r.backup_id, r.lifecycle.value)
                     for region in ("local", "eu") for r in _records(verifier, region) if r.lifecycle in UNFINISHED]
            if not stuck:
                break
            assert time.monotonic() < deadline, f"records stuck {why}: {stuck}\n{_log_tails(daemons)}"
            time.sleep(1)
        for d in daemons.values():
            d.signal(signal.SIGTERM)
        for d in daemons.values():
            assert d.wait_exit(120) == 0, f"{d.name} did not stop cleanly {why}\n{d.log_text()[-4000:]}"
        daemon_gc_deleted = sum(d.gc_packs_deleted() for d in daemons.values())

        local_records, eu_records = _records(verifier, "local"), _records(verifier, "eu")
        states = {r.backup_id: r.lifecycle for r in local_records}
        failed = [f"{r.region} {r.host_name} {r.backup_id}: {r.failure_message}"
                  for r in (*local_records, *eu_records) if r.lifecycle == Lifecycle.FAILED]
        assert soak.failed == [] and failed == [], f"failed backups {why}: {soak.failed} {failed}"
        lost = [
            bid
            for bid in soak.manifests
            if bid not in soak.deleted
            and states.get(bid) != Lifecycle.AVAILABLE
            and not (bid in soak.maybe_deleted and verifier.get_backup(bid).lifecycle == Lifecycle.DELETED)
        ]
        assert lost == [], f"backups lost {why}: {[(b, states.get(b)) for b in lost]}\n{_log_tails(daemons)}"
        resurrected = [bid for bid in soak.deleted if bid in states]
        assert resurrected == [], f"deleted backups still listed {why}: {resurrected}"
        unknown = [r.backup_id for r in local_records if r.backup_id not in soak.manifests]
        assert unknown == [], f"backups nobody asked for {why}: {unknown}"
        orphans = [r.backup_id for r in eu_records if r.source_backup_id not in soak.manifests]
        assert orphans == [], f"copies of unknown sources {why}: {orphans}"

        # --- garbage collection (grace 0) frees what only deleted backups held
        before = {region: _data_bytes(verifier, region) for region in ("local", "eu")}
        final_gc_deleted = 0
        for region in ("local", "eu"):
            gc_deadline = time.monotonic() + 4 * LEASE_SECONDS + 60
            while True:
                result = verifier.collect_garbage(region, grace_seconds=0)
                final_gc_deleted += result.packs_deleted
                assert result.skipped_reason is None, f"gc of {region} skipped {why}: {result.skipped_reason}"
                if result.packs_waiting == 0 and result.packs_marked == 0:
                    break
                assert time.monotonic() < gc_deadline, f"gc of {region} keeps waiting {why}: {result}"
                time.sleep(min(3.0, result.retry_after_seconds or 1.0))
        after = {region: _data_bytes(verifier, region) for region in ("local", "eu")}

        for region in ("local", "eu"):
            result = verifier.check(region=region, read_data=True)
            assert result.errors == [], f"check --read-data of {region} {why}: {result.errors[:20]}"

        # --- every AVAILABLE backup of every host, in both regions, restores as its source was
        restore_root = xfs_dir / "restores"
        restore_root.mkdir()
        restored = 0
        for region, records in (("local", local_records), ("eu", eu_records)):
            for record in records:
                assert record.lifecycle == Lifecycle.AVAILABLE, (region, record.backup_id, record.lifecycle)
                expected = soak.manifests[record.source_backup_id if region == "eu" else record.backup_id]
                target = restore_root / f"{region}-{record.backup_id}"
                target.mkdir()
                path = verifier.restore_backup(record.backup_id, target, region=region).path
                got = tree_manifest(path)
                if got != expected:
                    diff = sorted(k.decode(errors="replace") for k in got.keys() ^ expected.keys())
                    diff += [k.decode(errors="replace") for k in got.keys() & expected.keys() if got[k] != expected[k]]
                    pytest.fail(f"{region} backup {record.backup_id} of {record.host_name} restores different "
                                f"{why}: {diff[:20]}")
                remove_tree(target)
                restored += 1
        shutil.rmtree(restore_root, ignore_errors=True)

        # --- the store holds no more than what live backups reference
        # Bound: the distinct file contents (by SHA-256) of the live backups of a region, stored whole,
        # plus 3 % and 32 KiB per backup for blob framing, trees and pack headers, plus 512 KiB. It is an
        # upper bound of what must be kept (sub-file deduplication only lowers it) and far below what the
        # store held if the data only deleted backups held (their 1-2 MiB big files) were still there.
        bounds = {}
        for region, records in (("local", local_records), ("eu", eu_records)):
            ids = [r.source_backup_id if region == "eu" else r.backup_id for r in records]
            distinct = _distinct_file_bytes([soak.manifests[i] for i in ids])
            bounds[region] = int(distinct * 1.03) + 32 * KiB * len(records) + 512 * KiB
            assert after[region][0] <= bounds[region], (
                f"{region} holds {after[region][0]} bytes of packs, more than the {bounds[region]} its live "
                f"backups can need (distinct file data {distinct}) {why}")
        live_files = {i["sha256"] for r in local_records for i in soak.manifests[r.backup_id].values() if "sha256" in i}
        deleted_data = sum({i["sha256"]: i["size"] for b in soak.deleted for i in soak.manifests[b].values()
                            if "sha256" in i and i["sha256"] not in live_files}.values())
        packs_deleted = daemon_gc_deleted + final_gc_deleted
        assert soak.counts["deletes"] > 0 and packs_deleted > 0, f"no delete freed a pack {why}: {soak.counts}"

        # --- the hosts deduplicated against each other: their first backups did not upload the common file
        for name in HOSTS[1:]:
            stats = soak.first_stats[name]
            assert stats["BytesDeduplicated"] >= COMMON_SIZE * 0.9, f"{name} did not deduplicate {why}: {stats}"
        cross_dedup = sum(soak.first_stats[n]["BytesDeduplicated"] for n in HOSTS[1:])

        copies_available = len(eu_records)
        assert soak.counts["backups_completed"] >= 3 and soak.counts["sigkills"] > 0, soak.counts
        proxy = backend["fault_proxy"] if backend else None
        print(
            f"soak {variant} seed={seed}: chaos {chaos_seconds:.0f} s, total {time.monotonic() - started:.0f} s; "
            f"backups requested {soak.counts['backups_requested']}, completed while watched "
            f"{soak.counts['backups_completed']}, live {len(local_records)}; copies requested "
            f"{soak.counts['copies_requested']}, available {copies_available}; deletes {soak.counts['deletes']}; "
            f"kills {soak.counts['sigkills']} SIGKILL + {soak.counts['fault_point_kills']} at fault points "
            f"({soak.counts['armed_restarts']} armed restarts); proxy faults "
            f"{proxy.faults if proxy else 0} of {proxy.stats['requests'] if proxy else 0} requests "
            f"{dict(proxy.stats) if proxy else ''}; cross-host dedup {cross_dedup} bytes; packs deleted by GC "
            f"{daemon_gc_deleted} (daemons) + {final_gc_deleted} (final); pack bytes local {before['local'][0]} -> "
            f"{after['local'][0]} (bound {bounds['local']}), eu {before['eu'][0]} -> {after['eu'][0]} "
            f"(bound {bounds['eu']}); data only deleted backups held {deleted_data}; restores {restored}"
        )
