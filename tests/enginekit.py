"""Helpers for engine and CLI tests: a config per test, and the CLI as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zfsbackd.config import Config, load_config
from zfsbackd.store.crypto import generate_key_file

REPO = Path(__file__).resolve().parent.parent


def write_config(
    tmp_path: Path,
    sources: dict[str, Path],
    *,
    encrypted: bool = True,
    grace: int = 0,
    extra_fs: dict[str, Any] | None = None,
    extra_regions: dict[str, Path] | None = None,
    max_copies: int = 5,
) -> Path:
    """A config with a local store in ``tmp_path`` and one file system per source (``fs-<name>``).

    Every region says ``create_if_missing: true`` and its directory is made
    here, because zfsbackd never creates a store or its directory implicitly
    (tests/test_store_security.py proves the refusal without it).
    """
    key = tmp_path / "store.key"
    if encrypted and not key.exists():
        generate_key_file(key)
    paths = {"local": tmp_path / "store", **(extra_regions or {})}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    data = {
        "state_dir": str(tmp_path / "state"),
        "home_region": "local",
        "regions": {
            name: {"type": "local", "path": str(path), "create_if_missing": True} for name, path in paths.items()
        },
        "copies": {"max_in_flight_per_region": max_copies},
        "encryption": {"key_file": str(key)} if encrypted else {"mode": "none"},
        "garbage_collection": {"grace_period_seconds": grace},
        "daemon": {"control_socket": str(tmp_path / "control.sock"), "metrics_listen": "127.0.0.1:0"},
        "file_systems": [
            {"id": f"fs-{name}", "source": {"path": str(path)}, **(extra_fs or {})} for name, path in sources.items()
        ],
    }
    path = tmp_path / "zfsbackd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_host_config(
    tmp_path: Path,
    name: str,
    sources: dict[str, Path],
    *,
    shared: Path | None = None,
    home: Path | None = None,
    **kwargs: Any,
) -> Path:
    """Host ``name``'s config in ``tmp_path/name`` (its own state_dir), ``host_name: name``.

    ``shared`` is another host's directory: this host uses that host's key
    file (a fleet shares one) and, unless ``home`` says otherwise, its store
    as home region ``local``. ``home`` is the path of this host's home store.
    """
    host_dir = tmp_path / name
    host_dir.mkdir()
    if shared is not None:
        shutil.copy2(shared / "store.key", host_dir / "store.key")
    config = write_config(host_dir, sources, **kwargs)
    data = yaml.safe_load(config.read_text())
    data["host_name"] = name
    if home is not None or shared is not None:
        data["regions"]["local"]["path"] = str(home if home is not None else shared / "store")  # type: ignore[operator]
    config.write_text(yaml.safe_dump(data))
    return config


def make_config(tmp_path: Path, sources: dict[str, Path], **kwargs: Any) -> Config:
    return load_config(write_config(tmp_path, sources, **kwargs))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error(self) -> dict[str, str]:
        # stderr may hold log lines before the error document, which is always last.
        start = self.stderr.rfind('{\n  "Error"')
        return json.loads(self.stderr[start:])["Error"]


def cli_command(config: Path | None, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "zfsbackd.cli", *args]
    if config is not None:
        argv += ["--config", str(config)]
    return argv


def run_cli(config: Path | None, *args: str, timeout: float = 300) -> CliResult:
    """Run ``zfsbackd ARGS --config CONFIG`` as a separate process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cli_command(config, *args), capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def store_bytes(store_dir: Path) -> int:
    """Bytes of the packs in a local store (not the writers' temporary files, which come and go)."""
    return sum(p.stat().st_size for p in pack_files(store_dir))


def pack_files(store_dir: Path) -> list[Path]:
    data = store_dir / "data"
    return sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith(".")) if data.exists() else []
