"""The Debian package (scripts/build-deb.sh): what it installs, with which modes, and that it runs.

The package is built once per content of the files that go into it and kept in
``$ZFSBACKD_DEB_CACHE`` (default /var/cache/zfsbackd-test/deb), so that the
suite pays for a build (about 20 s with a warm pip cache, a minute cold) only
when the sources changed. It is then read with ``dpkg-deb -I``/``-c`` and
extracted with ``dpkg-deb -x``; the packaged command runs from the extracted
tree through the packaged venv's interpreter (the scripts' shebangs name
/opt/zfsbackd, which is only right once installed). Installing it for real,
under systemd, is the VM's job (issue 10, item 2).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from enginekit import REPO

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CACHE = Path(os.environ.get("ZFSBACKD_DEB_CACHE", "/var/cache/zfsbackd-test/deb"))
#: what goes into the package besides the Python sources (bench/ and tests/ do not)
PACKAGED = ("zfsbackd/", "native/", "scripts/build-deb.sh", "scripts/build-manpage.py", "systemd/", "config/",
            "pyproject.toml", "README.md", "LICENSE")

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")


def _sources_digest() -> str:
    """A hash of every packaged file's path and content (git's view: tracked and new, not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode().split("\0")
    digest = hashlib.sha256()
    for name in sorted(n for n in listed if n.startswith(PACKAGED)):
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package for the current sources, built unless the cache has it."""
    out = CACHE / _sources_digest()
    built = sorted(out.glob("zfsbackd_*.deb"))
    if built:
        return built[0]
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-deb.sh"), str(tmp)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole or not at all: an interrupted build is never mistaken for a package
    # Keep the three newest builds (each ~35 MB): other checkouts on this machine may be using theirs.
    builds = [p for p in CACHE.iterdir() if p.is_dir() and ".tmp-" not in p.name]
    builds.sort(key=lambda p: p.stat().st_mtime)
    for old in builds[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    return out / Path(result.stdout.strip()).name


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _contents(deb: Path) -> dict[str, tuple[str, str]]:
    """``dpkg-deb -c`` as path -> (mode string, owner/group); symlinks as 'path -> target' keys too."""
    entries: dict[str, tuple[str, str]] = {}
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        mode, owner, _size, _date, _time, name = line.split(None, 5)
        entries[name.removeprefix(".").rstrip("/") or "/"] = (mode, owner)
    return entries


def test_control_fields_and_conffiles(deb: Path, tmp_path: Path) -> None:
    arch = subprocess.check_output(["dpkg", "--print-architecture"], text=True).strip()
    assert deb.name == f"zfsbackd_{VERSION}_{arch}.deb"

    def field(name: str) -> str:
        return subprocess.check_output(["dpkg-deb", "-f", str(deb), name], text=True).strip()

    assert field("Package") == "zfsbackd"
    assert field("Version") == VERSION  # the one version, from pyproject.toml
    assert "python3.11" in field("Depends")
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/zfsbackd/zfsbackd.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert path.stat().st_mode & 0o777 == 0o755, script
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0, script
    # Purge must never reach backups, the state directory or key files.
    code = [line for line in (control / "postrm").read_text().splitlines() if not line.lstrip().startswith("#")]
    for forbidden in ("/var/lib/zfsbackd", "store", ".key", "rm -r", "/etc/zfsbackd"):
        assert not any(forbidden in line for line in code), forbidden
    postinst = (control / "postinst").read_text()
    assert "systemd-sysusers zfsbackd.conf" in postinst and "systemctl enable" not in postinst


def test_files_and_modes(deb: Path) -> None:
    entries = _contents(deb)
    assert entries["/etc/zfsbackd"] == ("drwx------", "root/root")
    assert entries["/etc/zfsbackd/zfsbackd.yaml"] == ("-rw-------", "root/root")
    assert entries["/opt/zfsbackd/bin/zfsbackd"][0] == "-rwxr-xr-x"
    assert "/usr/bin/zfsbackd -> /opt/zfsbackd/bin/zfsbackd" in entries
    assert "/opt/zfsbackd/bin/python3 -> /usr/bin/python3.11" in entries
    for path in (
        "/lib/systemd/system/zfsbackd.service",
        "/usr/lib/sysusers.d/zfsbackd.conf",
        "/usr/share/man/man8/zfsbackd.8.gz",
        "/usr/share/bash-completion/completions/zfsbackd",
        "/usr/share/zsh/vendor-completions/_zfsbackd",
        "/usr/share/doc/zfsbackd/README.md",
        "/usr/share/doc/zfsbackd/copyright",
        "/usr/share/doc/zfsbackd/examples/zfsbackd.example.yaml",
    ):
        assert entries[path] == ("-rw-r--r--", "root/root"), path
    assert not any(p.startswith("/var/lib/zfsbackd") for p in entries)  # backups are never the package's files
    assert not any("/__pycache__/" in p and "/opt/zfsbackd/bin" in p for p in entries)


def test_packaged_command_runs(tree: Path) -> None:
    python, exe = tree / "opt/zfsbackd/bin/python3", tree / "opt/zfsbackd/bin/zfsbackd"
    assert exe.read_text().splitlines()[0] == "#!/opt/zfsbackd/bin/python3"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZFSBACKD_CONFIG")}
    version = subprocess.run([python, exe, "--version"], capture_output=True, text=True, env=env, check=False)
    assert version.returncode == 0 and version.stdout.strip() == f"zfsbackd {VERSION}", version.stderr
    config = tree / "etc/zfsbackd/zfsbackd.yaml"
    valid = subprocess.run(
        [python, exe, "config", "validate", "--config", config, "--query", "Config.Valid", "--output", "text"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert (valid.returncode, valid.stdout) == (0, "True\n"), valid.stderr
    # The code that ran is the packaged copy, not this checkout.
    where = subprocess.run(
        [python, "-c", "import zfsbackd; print(zfsbackd.__file__)"], capture_output=True, text=True, env=env, cwd="/"
    )
    assert where.stdout.startswith(str(tree / "opt/zfsbackd/lib/")), where.stdout + where.stderr
    assert config.read_bytes() == (REPO / "config/zfsbackd.example.yaml").read_bytes()
    # No file names the temporary build tree.
    leaked = subprocess.run(["grep", "-rlI", "zfsbackd-deb.", str(tree)], capture_output=True, text=True)
    assert leaked.stdout == ""


def test_unit_docs_man_page_and_completions(tree: Path) -> None:
    unit = (tree / "lib/systemd/system/zfsbackd.service").read_text()
    assert "ExecStart=/usr/bin/zfsbackd daemon" in unit and "/usr/local/bin" not in unit
    docs = [d for line in unit.splitlines() if line.startswith("Documentation=") for d in line.split("=", 1)[1].split()]
    assert docs == ["man:zfsbackd(8)", "file:///usr/share/doc/zfsbackd/README.md"]
    assert (tree / "usr/share/doc/zfsbackd/README.md").is_file()
    assert (tree / "usr/lib/sysusers.d/zfsbackd.conf").read_text().splitlines()[-1] == "g zfsbackd -"
    assert "Apache License" in (tree / "usr/share/doc/zfsbackd/copyright").read_text()
    page = gzip.decompress((tree / "usr/share/man/man8/zfsbackd.8.gz").read_bytes()).decode()
    assert page.startswith(".TH ZFSBACKD 8") and f"zfsbackd {VERSION}" in page
    for text in ("describe\\-backups", "\\-\\-filters", "\\-\\-query", "store init", "completion"):
        assert text in page, text
    bash = (tree / "usr/share/bash-completion/completions/zfsbackd").read_text()
    assert subprocess.run(["bash", "-n"], input=bash, text=True).returncode == 0
    assert "complete -F _zfsbackd zfsbackd" in bash
    zsh_script = (tree / "usr/share/zsh/vendor-completions/_zfsbackd").read_text()
    assert zsh_script.startswith("#compdef zfsbackd")
    assert subprocess.run(["zsh", "-n"], input=zsh_script, text=True).returncode == 0  # scripts/setup-env.sh


def test_man_page_renders_without_warnings(tree: Path) -> None:
    """What `man zfsbackd` shows on an installed system: man-db renders the packaged page with every groff
    warning on, and none may come (a broken macro or escape would show as garbage to the reader)."""
    page = tree / "usr/share/man/man8/zfsbackd.8.gz"
    shown = subprocess.run(
        ["man", "--warnings=all", "-E", "UTF-8", "-l", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "100", "PAGER": "cat"},
        check=False,
    )
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    text = re.sub(".\x08", "", shown.stdout)  # the terminal's bold and underline (overstrikes) off
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "FILES", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.MULTILINE), heading
    assert "zfsbackd describe-backups" in text and "--query" in text
