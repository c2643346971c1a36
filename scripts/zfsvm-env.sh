#!/usr/bin/env bash
# Prepare what a run in the OpenZFS VM of ../shared/zfsvm needs (used by scripts/zfsvm-tests.sh and bench/zfs.sh):
# 1. the VM image, built if it is missing or stale (3-5 min the first time, 0 s after);
# 2. .venv-zfsvm with Debian's /usr/bin/python3 (the guest runs the same 3.11.2) and
#    --system-site-packages (so the guest's python3-pyzfs is importable), the project installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."

zfsvm=../shared/zfsvm
venv=.venv-zfsvm
stamp() { date +%s; }

if [ ! -x "$zfsvm/run-in-vm.sh" ]; then
  echo "zfsvm-env: $zfsvm/run-in-vm.sh not found; the shared/ directory must sit beside the checkout" >&2
  exit 2
fi

t=$(stamp)
"$zfsvm/build-image.sh"
echo "zfsvm-env: image check/build took $(( $(stamp) - t )) s" >&2

t=$(stamp)
if [ ! -x "$venv/bin/python" ] || [ "$(readlink -f "$venv/bin/python")" != "$(readlink -f /usr/bin/python3)" ]; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# Re-install only when the dependencies changed (an editable install sees code changes anyway).
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  touch "$venv/.installed"
fi
echo "zfsvm-env: venv took $(( $(stamp) - t )) s" >&2
