#!/usr/bin/env bash
# The Debian package under real systemd with real OpenZFS (issue 10, item 2): tests/zfsvm_systemd.
#
#   scripts/zfsvm-systemd-tests.sh [PYTEST ARGS...]
#
# 1. the VM image and .venv-zfsvm, as for scripts/zfsvm-tests.sh (scripts/zfsvm-env.sh);
# 2. the .deb of the current sources (scripts/build-deb.sh), built only when a packaged file
#    changed: the cache is tests/test_package.py's ($ZFSBACKD_DEB_CACHE, default
#    /var/cache/zfsbackd-test/deb), keyed by the same digest, so the host suite and this
#    script build it once between them;
# 3. a small XFS image (reflink=1) made here with the host's mkfs.xfs: the guest image has
#    the xfs module but no xfsprogs, and no network to get them;
# 4. ONE VM booted with systemd as PID 1 (run-in-vm.sh --systemd), the checkout shared at
#    the same path (the venv holds absolute paths); in it, .venv-zfsvm's pytest (only the
#    test runner: what is tested is the package installed with apt-get, under /opt/zfsbackd)
#    runs tests/zfsvm_systemd as root. About 4-6 minutes under software emulation.
#
# The .deb and the XFS image travel through a directory under dist/ (git-ignored, so
# neither git nor build-deb.sh see it), removed afterwards.
# Needs root, xfsprogs, and what scripts/zfsvm-env.sh and scripts/build-deb.sh need.
set -euo pipefail
cd "$(dirname "$0")/.."

zfsvm=../shared/zfsvm
venv=.venv-zfsvm
timeout=${ZFSVM_SYSTEMD_TESTS_TIMEOUT:-900}

stamp() { date +%s; }
took() { echo "zfsvm-systemd-tests: $1 took $(( $(stamp) - $2 )) s" >&2; }

command -v mkfs.xfs >/dev/null || { echo "zfsvm-systemd-tests: mkfs.xfs not found: apt-get install xfsprogs" >&2; exit 2; }
bash scripts/zfsvm-env.sh

t=$(stamp)
deb=$("$venv/bin/python" - <<'EOF'
"""Print the cached .deb for the current sources, building it first if the cache lacks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from test_package import CACHE, _sources_digest  # the host suite's cache key: one build serves both

out = CACHE / _sources_digest()
built = sorted(out.glob("zfsbackd_*.deb"))
if not built:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["bash", "scripts/build-deb.sh", str(tmp)], check=True, stdout=subprocess.DEVNULL, timeout=900)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole or not at all, as tests/test_package.py does
    builds = sorted((p for p in CACHE.iterdir() if p.is_dir() and ".tmp-" not in p.name), key=lambda p: p.stat().st_mtime)
    for old in builds[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    built = sorted(out.glob("zfsbackd_*.deb"))
print(built[0])
EOF
)
took "package ($deb)" "$t"

mkdir -p dist
run=$(mktemp -d "$PWD/dist/zfsvm-systemd.XXXXXX")
trap 'rm -rf "$run"' EXIT
cp "$deb" "$run/"
truncate -s 320M "$run/xfs.img"  # mkfs.xfs's minimum; sparse, so a few MiB on disk
mkfs.xfs -q -m reflink=1 "$run/xfs.img"

t=$(stamp)
status=0
"$zfsvm/run-in-vm.sh" --systemd -g "$PWD" -t "$timeout" \
  -e ZFSBACKD_SYSTEMD_VM=1 -e "ZFSBACKD_TEST_DEB=$run/$(basename "$deb")" -e "ZFSBACKD_TEST_XFS_IMAGE=$run/xfs.img" \
  -e PYTHONDONTWRITEBYTECODE=1 \
  . "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/zfsvm_systemd "$@" \
  || status=$?
took "VM run (boot + install + tests)" "$t"
exit "$status"
