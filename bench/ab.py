"""A/B of zfsbackd checkouts on the scale benchmark's small files: which commit is faster, and at what memory.

Sessions kept rebuilding this outside the repository to decide whether a change goes in
(a read-ahead hint, spans by gap): two or more checkouts (``git worktree add``) run the
same steps on the same generated files, alternately, round after round, so that a machine
that slows down or speeds up during the run hits every variant alike.

    sudo .venv/bin/python bench/ab.py --files 1000000 --rounds 2 A=/work/ab-A B=/work/ab-B
    sudo .venv/bin/python bench/ab.py --files 300000 --steps full,nochange,restore A=/work/ab-A B=.

Per round and variant: a fresh store, then each step with the page cache dropped before it —
``full`` and ``nochange`` are backups, ``restore`` restores the variant's last backup into a fresh
directory (and deletes it after). Every command runs with its checkout as both ``PYTHONPATH`` and
working directory (``python -m`` puts the working directory first on ``sys.path``), under run.py's
launcher: wall and CPU time, and the peak RSS of the whole process tree (archive and restore
workers included).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

if any(importlib.util.find_spec(module) is None for module in ("blake3", "boto3", "structlog")):
    # scale.py (the generator) imports blake3 and bench/s3.py (boto3), which would re-run *itself* without it
    raise SystemExit("bench/ab.py needs zfsbackd's dependencies and boto3: run it with the project's .venv/bin/python")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as base  # noqa: E402  (bench/run.py: loop file system, launcher)
from scale import generate_files  # noqa: E402  (bench/scale.py: the small files, deterministic by seed)

STEPS = ("full", "nochange", "restore")
FS_ID = base.FS_ID
log = base.log


def variant_config(work: Path, data: Path) -> Path:
    """A config with one local region in *work*, backing up *data* (the key is made by :func:`run_round`)."""
    (work / "store").mkdir(parents=True)
    config = work / "zfsbackd.yaml"
    config.write_text(
        f"state_dir: {work / 'state'}\nhome_region: local\n"
        f"regions: {{local: {{type: local, path: {work / 'store'}, create_if_missing: true}}}}\n"
        f"encryption: {{key_file: {work / 'key'}}}\n"
        f"file_systems:\n  - id: {FS_ID}\n    source: {{path: {data}}}\n"
    )
    return config


def run_round(runner: base.Runner, round_no: int, name: str, checkout: Path, mnt: Path, steps: list[str]) -> None:
    """One variant's steps on a fresh store; one line per step."""
    work = mnt / f"work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    config = variant_config(work, mnt / "data")
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cli = [sys.executable, "-m", "zfsbackd.cli"]
    runner.run_checked(f"{name}-key", [*cli, "key", "generate", "--key-file", str(work / "key")], env=env, cwd=checkout)
    backup_id = None
    for step in steps:
        if step == "restore":
            if backup_id is None:
                raise SystemExit("--steps: restore needs a backup step before it")
            target = mnt / "restore"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            argv = [*cli, "restore-backup", "--config", str(config), "--backup-id", backup_id, "--target", str(target)]
        else:
            argv = [*cli, "create-backup", "--config", str(config), "--file-system-id", FS_ID]
        base.settle(True)
        m = runner.run(f"{name}-{step}-r{round_no}", argv, env=env, cwd=checkout)
        if m.rc != 0:
            raise SystemExit(f"{name} {step} exited {m.rc}:\n{m.stderr_tail}")
        if step != "restore":
            backup_id = base.json_document(m.stdout)["Backup"]["BackupId"]
        else:
            shutil.rmtree(mnt / "restore", ignore_errors=True)
        log(f"round {round_no} {name:>8} {step:9} {m.wall_s:8.1f} s wall {m.cpu_s:8.1f} s CPU "
            f"{m.peak_rss_mib:6.0f} MiB peak (process tree)")
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=CHECKOUT", help="a name and a zfsbackd checkout")
    parser.add_argument("--files", type=int, default=300_000, help="small files to generate (default 300000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant, alternately (default 2)")
    parser.add_argument("--steps", default="full,nochange", help=f"comma list of: {', '.join(STEPS)}")
    parser.add_argument("--seed", type=int, default=1, help="data seed (same seed, same files)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the loopback image goes (default /var/tmp)")
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variants:
        name, sep, path = spec.partition("=")
        checkout = Path(path).resolve()
        if not sep or not name or not (checkout / "zfsbackd" / "cli.py").is_file():
            parser.error(f"{spec!r}: give NAME=CHECKOUT, a checkout with zfsbackd/cli.py")
        variants[name] = checkout
    steps = args.steps.split(",")
    if any(step not in STEPS for step in steps) or args.rounds < 1 or args.files < 1:
        parser.error(f"--steps: comma list of {', '.join(STEPS)}; --rounds and --files at least 1")
    if os.geteuid() != 0:
        parser.error("run as root (it creates and mounts a loopback file system)")
    base.ensure_tools("xfs")
    root = Path(args.workdir) / f"zfsbackd-ab-{os.getpid()}"
    fs = base.LoopFs(root, "xfs")
    runner = base.Runner(root / "logs")
    try:
        (root / "logs").mkdir(parents=True)
        fs.create(max(8 * base.GiB, args.files * 24 * base.KiB))
        (fs.mnt / "data").mkdir()
        info = generate_files(fs.mnt / "data", args.files, args.seed)
        log(f"generated {info.files:,} files in {info.seconds:.1f} s")
        for round_no in range(args.rounds):
            for name, checkout in variants.items():
                run_round(runner, round_no, name, checkout, fs.mnt, steps)
    finally:
        runner.stop_child()
        fs.destroy()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
