#!/usr/bin/env python3
"""S3 mode of the benchmark: zfsbackd vs restic's S3 backend, same Ceph RGW on 127.0.0.1, same run.

    sudo /work/main/.venv/bin/python bench/s3.py                    # small at scale 0.1, large at 1 (~6 min)
    sudo /work/main/.venv/bin/python bench/s3.py --scale 0.1 --datasets small
    sudo python3 bench/run.py --s3 [same options]                   # the same thing

The source data, the generator, the churn, the measuring launcher and the restore
check are those of bench/run.py (a fresh loopback XFS per dataset); only the
stores move to S3 buckets. Per dataset and round it creates three new buckets on
the server — zfsbackd's home region, zfsbackd's copy region, restic's repository —
and deletes them afterwards (``--keep-buckets`` keeps them).

Steps: full, nochange and churn backups and a full restore for both tools, then,
zfsbackd only, ``copy-backup`` of the full backup from the home region to the copy
region and ``copy-backup`` of the churned backup (the second copy should move only
the new blobs). The bytes a copy moved are measured twice: zfsbackd's own
``Stats.BytesUploaded`` and the growth of the destination bucket (sum of object
sizes after minus before, listed by the bench: packs, index, record, everything).

The S3 server: ``../shared/s3/ceph-rgw.sh start`` (idempotent; its settings CEPH_DIR,
RGW_PORT, MON_PORT pass through). One that already answers is reused and left
running; one this run started is stopped at the end. ``--endpoint URL`` uses any
other S3 server instead, with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the
environment. See bench/README.md ("S3 mode").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
VENV_PYTHON = BENCH.parent / ".venv" / "bin" / "python"


def _reexec_with_boto3() -> None:
    """boto3 lives in the project's virtualenv; re-run this script with it when the current python lacks it."""
    try:
        import boto3  # noqa: F401
    except ImportError as exc:
        if VENV_PYTHON.exists() and Path(sys.executable).resolve() != VENV_PYTHON.resolve():
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
        hint = "run it with /work/main/.venv/bin/python (or pip install boto3)"
        raise SystemExit(f"bench/s3.py needs boto3: {hint}") from exc


_reexec_with_boto3()

import boto3  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402

sys.path.insert(0, str(BENCH))
import run as base  # noqa: E402  (bench/run.py: data, churn, launcher, restore check, loop file system)

MiB = base.MiB
CEPH_SCRIPT = BENCH.parent.parent / "shared" / "s3" / "ceph-rgw.sh"
S3_TOOLS = ("zfsbackd", "restic")
BACKUP_STEPS = ("full", "nochange", "churn")
MAIN_STEPS = (*BACKUP_STEPS, "restore")
COPY_STEPS = ("copy-full", "copy-churn")  # zfsbackd copy-backup of the full, then of the churned backup
HOME_REGION, COPY_REGION = "s3home", "s3copy"
DEFAULT_SCALE = "small=0.1,large=1,mix=0.25"
COPY_TARGET = 0.02  # the churned backup's copy moves at most 2 % of the first copy's bytes
log = base.log


# ============================================================ the S3 server
@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    kind: str = "ceph-rgw"
    started_here: bool = False
    script_env: dict[str, str] = field(default_factory=dict)  # ceph-rgw.sh settings of the cluster (to stop it)

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=BotoConfig(request_checksum_calculation="when_required",
                              response_checksum_validation="when_required",
                              s3={"addressing_style": "path"}, max_pool_connections=16,
                              retries={"max_attempts": 8, "mode": "standard"}),
        )

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("access_key", "secret_key")}


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means a server is there
    except OSError:
        return False


# --rgw-tcp-nodelay: a cluster of the bench's own (own state directory and ports, so the shared one on 7480
# is left alone) whose beast frontend sets TCP_NODELAY. Without it RGW 16 answers every request ~40 ms late
# (Nagle on the server against the client's delayed ACK): 48 ms per small GET instead of 5 ms on this machine.
NODELAY_ENV = {"CEPH_DIR": "/var/tmp/s3srv/ceph-bench-nodelay", "RGW_PORT": "7490", "MON_PORT": "3310",
               "RGW_EXTRA": "rgw_frontends = beast endpoint=127.0.0.1:7490 tcp_nodelay=1"}


def start_ceph(nodelay: bool = False) -> S3Server:
    if not CEPH_SCRIPT.is_file():
        raise SystemExit(f"{CEPH_SCRIPT} is missing (the S3 server scripts live in ../shared/s3); "
                         "or give --endpoint URL of another S3 server")
    env = dict(os.environ, **NODELAY_ENV) if nodelay else dict(os.environ)
    endpoint = f"http://127.0.0.1:{env.get('RGW_PORT', '7480')}"
    running = _answers_http(endpoint)
    log(f"{'reusing the Ceph RGW at' if running else 'starting Ceph RGW on'} {endpoint}"
        f"{' (tcp_nodelay=1)' if nodelay else ''}")
    proc = subprocess.run(["bash", str(CEPH_SCRIPT), "start"], capture_output=True, text=True, timeout=600,
                          check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{CEPH_SCRIPT} start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return S3Server(info["endpoint"], info["access_key"], info["secret_key"], info.get("region") or "us-east-1",
                    kind="ceph-rgw, tcp_nodelay=1" if nodelay else "ceph-rgw", started_here=not running,
                    script_env={k: v for k, v in env.items() if k in NODELAY_ENV})


def stop_ceph(server: S3Server) -> None:
    """Stop a cluster this run started; the bench's own --rgw-tcp-nodelay cluster is purged (its memstore
    image is saved on every clean stop, ~3 GiB after a default run, and nothing else uses it)."""
    if server.started_here:
        verb = "purge" if server.script_env else "stop"
        log(f"{'purging' if server.script_env else 'stopping'} the Ceph RGW this run started")
        subprocess.run(["bash", str(CEPH_SCRIPT), verb], capture_output=True, timeout=300, check=False,
                       env=dict(os.environ, **server.script_env))


def bucket_usage(client: Any, bucket: str, prefix: str = "") -> tuple[int, int]:
    """(bytes, objects) under *prefix*; follows continuation tokens (Ceph may truncate below MaxKeys)."""
    size = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            size += item["Size"]
            count += 1
    return size, count


def record_bucket_usage(client: Any, r: dict[str, Any], tool: base.Tool) -> None:
    """A step's result measured the store as a local directory: replace that with the tool's bucket."""
    bucket, prefix = tool.store_location  # type: ignore[attr-defined]
    size, count = bucket_usage(client, bucket, prefix)
    r.update(store_bytes=size, store_objects=count, store_mib=round(size / MiB, 1), store_bucket=bucket)
    r.pop("store_allocated_bytes", None)


def drop_buckets(client: Any, buckets: list[str], keep: bool) -> None:
    """Empty and delete *buckets* (or only say they are kept); the list is cleared either way."""
    if keep:
        if buckets:
            log(f"keeping buckets {', '.join(buckets)}")
        buckets.clear()
        return
    for bucket in buckets:
        try:
            empty_and_delete_bucket(client, bucket)
        except Exception as exc:  # cleanup must go on
            log(f"could not delete bucket {bucket}: {exc}")
    buckets.clear()


def empty_and_delete_bucket(client: Any, bucket: str) -> None:
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)


# ============================================================ the tools, on S3
class S3Zfsbackd(base.Zfsbackd):
    """zfsbackd with its home region in one bucket and a second S3 region (another bucket) for copies."""

    def __init__(self, runner: base.Runner, work: Path, data: Path, server: S3Server,
                 buckets: dict[str, str]) -> None:
        super().__init__(runner, work, data)
        self.server = server
        self.buckets = buckets  # {"s3home": ..., "s3copy": ...}
        self.store_location = (buckets[HOME_REGION], "zfsbackd/")
        self.backups: dict[str, str] = {}  # step -> backup id in the home region

    def setup(self) -> dict[str, Any]:
        self.runner.run_checked("zfsbackd-key", self.cli("key", "generate", "--key-file", str(self.key)),
                                env=self.env, cwd=base.PROJECT)
        credentials = self.work / "zfsbackd-s3.ini"
        fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"[default]\naws_access_key_id = {self.server.access_key}\n"
                    f"aws_secret_access_key = {self.server.secret_key}\n")
        regions = {
            name: {"type": "s3", "endpoint_url": self.server.endpoint, "bucket": bucket, "prefix": "zfsbackd/",
                   "region_name": self.server.region, "credentials_file": str(credentials),
                   "addressing_style": "path", "create_if_missing": True}
            for name, bucket in self.buckets.items()
        }
        config = {
            "state_dir": str(self.work / "state" / "zfsbackd"),
            "home_region": HOME_REGION,
            "regions": regions,
            "encryption": {"key_file": str(self.key)},
            "file_systems": [{"id": base.FS_ID, "source": {"path": str(self.data)}}],
        }
        self.config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        m = self.runner.run("zfsbackd-startup", self.cli("--version"), env=self.env, cwd=base.PROJECT)
        return {"version": m.stdout.strip(), "startup_wall_s": round(m.wall_s, 3),
                "regions": {n: {"bucket": b, "prefix": "zfsbackd/"} for n, b in self.buckets.items()}}

    def backup(self, step: str) -> tuple[base.Measure, dict[str, Any]]:
        m, stats = super().backup(step)
        if m.rc == 0:
            self.backups[step] = stats["BackupId"]
        return m, stats

    def copy(self, step: str, source_step: str) -> tuple[base.Measure, dict[str, Any]]:
        """``copy-backup`` of the home region's backup of *source_step* into the copy region."""
        source_id = self.backups.get(source_step)
        if source_id is None:
            raise RuntimeError(f"no zfsbackd {source_step} backup to copy")
        m = self.runner.run(f"zfsbackd-{step}", self.cli("copy-backup", "--config", str(self.config),
                                                         "--source-backup-id", source_id,
                                                         "--destination-region", COPY_REGION, profile=step),
                            env=self.env, cwd=base.PROJECT)
        stats: dict[str, Any] = {}
        if m.rc == 0:
            backup = base.json_document(m.stdout)["Backup"]
            stats = dict(backup.get("Stats") or {})
            stats.update(BackupId=backup["BackupId"], Lifecycle=backup.get("Lifecycle"),
                         SourceBackupId=backup.get("SourceBackupId"))
            if backup.get("Lifecycle") != "AVAILABLE":
                m.rc = m.rc or 1
        return m, stats


class S3Restic(base.Restic):
    """restic's S3 backend against the same server, its repository under restic/ in its own bucket."""

    def __init__(self, runner: base.Runner, work: Path, data: Path, server: S3Server, bucket: str) -> None:
        super().__init__(runner, work, data)
        self.store_location = (bucket, "restic/")
        self.env.update(RESTIC_REPOSITORY=f"s3:{server.endpoint}/{bucket}/restic",
                        AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                        AWS_DEFAULT_REGION=server.region)


# ============================================================ the table
def _throughput(r: dict[str, Any] | None, nbytes: int) -> str:
    if not r or not r.get("ok") or not r.get("wall_s"):
        return "—"
    return f"{nbytes / MiB / r['wall_s']:.1f}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def copy_ratios(steps: dict[str, Any]) -> dict[str, float | None]:
    """Second copy / first copy: by zfsbackd's BytesUploaded and by destination-bucket growth."""
    first = (steps.get("copy-full") or {}).get("zfsbackd") or {}
    second = (steps.get("copy-churn") or {}).get("zfsbackd") or {}
    out: dict[str, float | None] = {"uploaded": None, "bucket": None}
    if first.get("ok") and second.get("ok"):
        a, b = (first.get("tool_stats") or {}).get("BytesUploaded"), (second.get("tool_stats") or {}).get(
            "BytesUploaded")
        if a and b is not None:
            out["uploaded"] = b / a
        if first.get("bucket_growth_bytes") and second.get("bucket_growth_bytes") is not None:
            out["bucket"] = second["bucket_growth_bytes"] / first["bucket_growth_bytes"]
    return out


def render_s3_table(name: str, ds: dict[str, Any], tools: list[str]) -> str:
    g = ds.get("generated", {})
    nbytes = g.get("bytes", 0)
    loads = [r["loadavg_1m_after"] for rnd in ds.get("rounds", [ds]) for step in rnd.get("steps", {}).values()
             for r in step.values() if "loadavg_1m_after" in r]
    load = f", load avg {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores" if loads else ""
    repeat = f", median of {ds['repeat']} runs" if ds.get("repeat", 1) > 1 else ""
    s3 = ds.get("s3", {})
    lines = [f"### {name} on S3 ({s3.get('kind', 'S3')} at {s3.get('endpoint', '?')}): {g.get('files', 0):,} files, "
             f"{nbytes / MiB:,.0f} MiB data ({g.get('apparent_bytes', 0) / MiB:,.0f} MiB apparent) — source on "
             f"{ds.get('fs')}, {'cold' if ds.get('cold') else 'warm'} cache, scale {ds.get('scale')}{repeat}{load}",
             ""]
    head = ["step"]
    for t in tools:
        head += [f"{t} wall s", f"{t} CPU s", f"{t} RSS MiB", f"{t} store MiB", f"{t} MiB/s"]
    ratio = "zfsbackd" in tools and "restic" in tools
    if ratio:
        head.append("zfsbackd/restic wall")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    steps = ds.get("steps", {})
    for step in MAIN_STEPS:
        row = [step]
        for t in tools:
            r = steps.get(step, {}).get(t)
            rate = _throughput(r, nbytes) if step in ("full", "restore") else "—"
            if not r:
                row += ["—"] * 5
            elif not r.get("ok"):
                row += ["FAILED", base.fmt(r.get("cpu_s")), base.fmt(r.get("peak_rss_mib"), 0),
                        base.fmt(r.get("store_mib")), "—"]
            else:
                row += [base.fmt(r["wall_s"], 2), base.fmt(r["cpu_s"], 2), base.fmt(r["peak_rss_mib"], 0),
                        base.fmt(r["store_mib"]), rate]
        if ratio:
            row.append(base.ratio_cell(steps, step))
        lines.append("| " + " | ".join(row) + " |")
    row = ["restore identical"]
    for t in tools:
        cell = base.identical_cell(steps, t)
        row += [cell, "", "", "", ""]
    if ratio:
        row.append("")
    lines.append("| " + " | ".join(row) + " |")

    lines += ["", "What each backup read / added (tool's own statistics):", ""]
    lines.append("| step | zfsbackd FilesRead | zfsbackd MiB read | zfsbackd MiB uploaded | restic new+changed files "
                 "| restic MiB added |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for step in BACKUP_STEPS:
        s = steps.get(step, {})
        z = (s.get("zfsbackd") or {}).get("tool_stats") or {}
        r = (s.get("restic") or {}).get("tool_stats") or {}
        cells = [
            str(z.get("FilesRead", "—")),
            base.fmt(z["BytesRead"] / MiB) if "BytesRead" in z else "—",
            base.fmt(z["BytesUploaded"] / MiB) if "BytesUploaded" in z else "—",
            str(r.get("files_new", 0) + r.get("files_changed", 0)) if r else "—",
            base.fmt(r["data_added"] / MiB) if "data_added" in r else "—",
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")

    ratios = copy_ratios(steps)
    if any(steps.get(c, {}).get("zfsbackd") for c in COPY_STEPS):
        lines += ["", f"zfsbackd copy-backup, region {HOME_REGION} → {COPY_REGION} (another bucket, same server):",
                  ""]
        lines.append("| copy | wall s | CPU s | RSS MiB | MiB uploaded (Stats) | bucket growth MiB | objects added "
                     "| MiB/s uploaded | bytes vs first copy (Stats / bucket) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for step in COPY_STEPS:
            r = steps.get(step, {}).get("zfsbackd")
            label = {"copy-full": "full backup (first copy)", "copy-churn": "churned backup"}[step]
            if not r:
                lines.append(f"| {label} | " + " | ".join(["—"] * 8) + " |")
                continue
            st = r.get("tool_stats") or {}
            up = st.get("BytesUploaded")
            growth = r.get("bucket_growth_bytes")
            if step == "copy-full":
                rel = "100 %" if r.get("ok") else "—"
            else:
                u, b = ratios["uploaded"], ratios["bucket"]
                rel = f"{u * 100:.2f} % / {b * 100:.2f} %" if u is not None and b is not None else "—"
            lines.append("| " + " | ".join([
                label,
                base.fmt(r["wall_s"], 2) if r.get("ok") else "FAILED",
                base.fmt(r.get("cpu_s"), 2),
                base.fmt(r.get("peak_rss_mib"), 0),
                base.fmt(up / MiB, 2) if up is not None else "—",
                base.fmt(growth / MiB, 2) if growth is not None else "—",
                str(r.get("bucket_objects_added", "—")),
                base.fmt(up / MiB / r["wall_s"], 1) if up and r.get("ok") and r["wall_s"] else "—",
                rel,
            ]) + " |")

    # The targets, checked against this run.
    def wall_ratio(step: str) -> float | None:
        z, rs = steps.get(step, {}).get("zfsbackd"), steps.get(step, {}).get("restic")
        if z and rs and z.get("ok") and rs.get("ok") and rs["wall_s"] > 0:
            return z["wall_s"] / rs["wall_s"]
        return None

    lines += ["", "Targets (issue 4):", ""]
    for step, what in (("full", "full backup to S3"), ("restore", "full restore from S3")):
        q = wall_ratio(step)
        lines.append(f"- {what}: zfsbackd at least as fast as restic — zfsbackd/restic wall "
                     f"{'—' if q is None else f'{q:.2f}'} → {_verdict(None if q is None else q <= 1.0)}")
    worst = max((v for v in ratios.values() if v is not None), default=None)
    z_full = ((steps.get("full") or {}).get("zfsbackd") or {}).get("tool_stats") or {}
    z_churn = ((steps.get("churn") or {}).get("zfsbackd") or {}).get("tool_stats") or {}
    floor = ""
    if z_full.get("BytesUploaded") and "BytesUploaded" in z_churn:
        # What the churn backup itself added: no incremental copy can move less than that.
        floor = (f"; the churn backup itself uploaded {z_churn['BytesUploaded'] / z_full['BytesUploaded'] * 100:.2f} %"
                 " of the full backup's bytes")
    lines.append(f"- copy of the 1 %-churned backup moves ≤ {COPY_TARGET:.0%} of the first copy's bytes — "
                 f"{'—' if worst is None else f'{worst * 100:.2f} %'} (the larger of Stats and bucket growth{floor}) "
                 f"→ {_verdict(None if worst is None else worst <= COPY_TARGET)}")
    return "\n".join(lines)


# ============================================================ orchestration
class S3Bench(base.Bench):
    def __init__(self, args: argparse.Namespace, server: S3Server) -> None:
        super().__init__(args)
        with contextlib.suppress(OSError):
            self.logdir.rmdir()  # the base class made <stamp>-logs; the S3 mode writes <stamp>-s3-logs
        self.result_path = base.RESULTS / f"{self.stamp}-s3.json"
        self.logdir = base.RESULTS / f"{self.stamp}-s3-logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.runner = base.Runner(self.logdir)
        self.server = server
        self.client = server.client()
        self.results["mode"] = "s3"
        self.results["s3"] = server.public()
        self._buckets: list[str] = []

    def table(self, name: str) -> str:
        return render_s3_table(name, self.results["datasets"][name], self.tools)

    def _record(self, ds: dict[str, Any], step: str, tool: base.Tool, m: base.Measure,
                stats: dict[str, Any]) -> dict[str, Any]:
        r = super()._record(ds, step, tool, m, stats)
        record_bucket_usage(self.client, r, tool)
        self.save()
        return r

    def cleanup(self) -> None:
        self.runner.stop_child()
        drop_buckets(self.client, self._buckets, self.args.keep_buckets)
        super().cleanup()

    def run_dataset(self, name: str, earlier_rounds: list[dict[str, Any]], round_no: int = 1) -> dict[str, Any]:
        args = self.args
        scale = args.scales[name]
        data_bytes, apparent = base.expected_sizes(name, scale)
        image = int((2 * data_bytes + apparent) * 1.4) + 2 * base.GiB  # data, restores and caches; stores are in S3
        free = shutil.disk_usage(self.base.parent).free
        log(f"=== dataset {name} (S3): ~{data_bytes / MiB:,.0f} MiB; image {image / base.GiB:.1f} GiB (sparse) on "
            f"{self.base.parent} ({free / base.GiB:.0f} GiB free)")
        if free < 2 * data_bytes + apparent + base.GiB:
            raise SystemExit(f"not enough space under {self.base.parent} for dataset {name}")
        self.fs.create(image)
        mnt = self.fs.mnt
        ds: dict[str, Any] = {"fs": args.fs, "cold": args.cold, "scale": scale, "seed": args.seed,
                              "s3": self.server.public(), "steps": {}}
        self._current = (name, earlier_rounds, ds)
        stem = f"zb-{self.stamp.lower()}-{name}-r{round_no}"
        buckets = {"zfsbackd": f"{stem}-zfsbackd", "zfsbackd-copy": f"{stem}-zfsbackd-copy",
                   "restic": f"{stem}-restic"}
        try:
            for bucket in buckets.values():
                self.client.create_bucket(Bucket=bucket)
                self._buckets.append(bucket)
            ds["buckets"] = buckets
            data = mnt / f"data-{name}"
            self.fs.make_data_dir(data)
            log(f"generating {name} in {data}")
            info = base.generate(name, data, scale, args.seed)
            ds["generated"] = asdict(info)
            log(f"generated {info.files:,} files, {info.bytes / MiB:,.0f} MiB in {info.seconds:.1f} s")
            work = mnt / "work"
            tools: list[base.Tool] = []
            for t in self.tools:
                if t == "zfsbackd":
                    z = S3Zfsbackd(self.runner, work, data, self.server,
                                   {HOME_REGION: buckets["zfsbackd"], COPY_REGION: buckets["zfsbackd-copy"]})
                    if args.profile:
                        z.profile_dir = self.logdir / "profiles" / name
                    tools.append(z)
                else:
                    tools.append(S3Restic(self.runner, work, data, self.server, buckets["restic"]))
            for tool in tools:
                self.results["tools"][tool.name] = tool.setup()
            for step in BACKUP_STEPS:
                if step == "churn":
                    base.settle(False)
                    ds["churn"] = base.apply_churn(name, data, scale, args.seed)
                    log(f"churn applied: {ds['churn']}")
                for tool in tools:
                    base.settle(args.cold)
                    m, stats = tool.backup(step)
                    r = self._record(ds, step, tool, m, stats)
                    log(f"{name} {step:10s} {tool.name:8s} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU "
                        f"{r['peak_rss_mib']:7.0f} MiB RSS  store {r['store_mib']:9.1f} MiB")
            base.restore_and_verify(self, ds, name, tools, data, mnt, args.cold)
            z = next((t for t in tools if isinstance(t, S3Zfsbackd)), None)
            if z is not None:
                for step, source_step in zip(COPY_STEPS, ("full", "churn"), strict=True):
                    self._copy(ds, z, step, source_step)
            print("\n" + render_s3_table(name, ds, self.tools) + "\n", flush=True)
        finally:
            self.save()
            self._current = None
            self.runner.stop_child()
            drop_buckets(self.client, self._buckets, self.args.keep_buckets)
            self.fs.destroy()
        return ds

    def _copy(self, ds: dict[str, Any], z: S3Zfsbackd, step: str, source_step: str) -> None:
        bucket = z.buckets[COPY_REGION]
        before, before_n = bucket_usage(self.client, bucket)
        base.settle(self.args.cold)
        try:
            m, stats = z.copy(step, source_step)
        except RuntimeError as exc:
            log(f"zfsbackd {step} skipped: {exc}")
            return
        after, after_n = bucket_usage(self.client, bucket)
        home, _ = bucket_usage(self.client, z.buckets[HOME_REGION])
        r = base.Bench._record(self, ds, step, z, m, stats)  # not ours: the store columns are set here
        r.pop("store_allocated_bytes", None)
        r.update(store_bytes=after, store_objects=after_n, store_mib=round(after / MiB, 1), store_bucket=bucket,
                 bucket_growth_bytes=after - before, bucket_objects_added=after_n - before_n,
                 source_bucket_bytes=home)
        self.save()
        up = stats.get("BytesUploaded")
        log(f"{step:10s} zfsbackd {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU "
            f"{r['peak_rss_mib']:7.0f} MiB RSS  uploaded {0 if up is None else up / MiB:.2f} MiB, bucket +"
            f"{(after - before) / MiB:.2f} MiB in {after_n - before_n} objects")


def parse_scales(text: str, datasets: list[str]) -> dict[str, float]:
    """``0.1`` → that for every dataset; ``small=0.1,large=1`` → per dataset (each one run needs a value)."""
    scales: dict[str, float] = {}
    default: float | None = None
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        if sep and name not in base.DATASETS:
            raise ValueError(f"unknown dataset {name!r}")
        number = float(value)
        if not 0 < number <= 4:
            raise ValueError(f"{part!r}: a scale must be in (0, 4]")
        if sep:
            scales[name] = number
        else:
            default = number
    for name in datasets:
        if name not in scales:
            if default is None:
                raise ValueError(f"no scale for dataset {name!r}")
            scales[name] = default
    return scales


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default=DEFAULT_SCALE,
                        help="a factor for every dataset (0.1), or per dataset (small=0.1,large=1); default "
                             f"{DEFAULT_SCALE}: the large dataset's churn is ~1 %% only near scale 1 (see README)")
    parser.add_argument("--datasets", default="small,large", help="comma list of: small, large, mix")
    parser.add_argument("--tools", default=",".join(S3_TOOLS), help="comma list of: zfsbackd, restic")
    parser.add_argument("--fs", choices=("xfs", "btrfs"), default="xfs", help="file system of the source image")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every step")
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (same seed, same bytes)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the loopback image goes (default /var/tmp)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each dataset N times (fresh file system and buckets); the table shows medians")
    parser.add_argument("--profile", action="store_true",
                        help="run zfsbackd's steps (copies too) under py-spy; see bench/README.md")
    parser.add_argument("--endpoint", metavar="URL",
                        help="use this S3 server (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                             "region AWS_DEFAULT_REGION) instead of starting Ceph RGW with ../shared/s3/ceph-rgw.sh")
    parser.add_argument("--rgw-tcp-nodelay", action="store_true",
                        help="run against a Ceph RGW of the bench's own (state /var/tmp/s3srv/ceph-bench-nodelay, "
                             "port 7490) with tcp_nodelay=1 in its beast frontend, instead of the shared one on 7480")
    parser.add_argument("--keep-buckets", action="store_true", help="leave the buckets (and their data) behind")
    args = parser.parse_args(argv)
    for name in args.datasets.split(","):
        if name not in base.DATASETS:
            parser.error(f"--datasets: unknown dataset {name!r}; use {', '.join(base.DATASETS)}")
    for name in args.tools.split(","):
        if name not in S3_TOOLS:
            parser.error(f"--tools: unknown tool {name!r}; the S3 mode runs {', '.join(S3_TOOLS)} (borg has no S3)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        args.scales = parse_scales(args.scale, args.datasets.split(","))
    except ValueError as exc:
        parser.error(f"--scale: {exc}")
    if os.geteuid() != 0:
        parser.error("run as root (it creates and mounts a loopback file system)")
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy: pip install py-spy")
    if args.endpoint and not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        parser.error("--endpoint needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
    base.ensure_tools(args.fs)
    if args.endpoint:
        server = S3Server(args.endpoint.rstrip("/"), os.environ["AWS_ACCESS_KEY_ID"],
                          os.environ["AWS_SECRET_ACCESS_KEY"], os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                          kind="S3")
    else:
        server = start_ceph(nodelay=args.rgw_tcp_nodelay)
    try:
        return base.run_bench(S3Bench(args, server))
    except KeyboardInterrupt:
        log("interrupted before the benchmark started")
        return 130
    finally:
        stop_ceph(server)

if __name__ == "__main__":
    sys.exit(main())
