#!/usr/bin/env bash
# Run tests/zfsvm (real OpenZFS) inside the throw-away QEMU VM of ../shared/zfsvm.
#
#   scripts/zfsvm-tests.sh [PYTEST ARGS...]
#
# 1. builds the VM image if it is missing or stale (3-5 min the first time, 0 s after);
# 2. makes .venv-zfsvm with Debian's /usr/bin/python3 (the guest runs the same
#    3.11.2) and --system-site-packages, so the guest's python3-pyzfs (the
#    reference implementation the shim is compared with) is importable, and
#    installs the project into it (editable: the guest sees the checkout);
# 3. boots one VM for the whole suite with the checkout shared at the same path
#    (venvs hold absolute paths) and runs pytest there as root.
#
# Other OpenZFS: ZFSVM_CACHE=/var/cache/zfsvm-2.3 ZFSVM_ZFS_SUITE=bookworm-backports scripts/zfsvm-tests.sh
# Needs root (debootstrap, QEMU) and, for the first image build, a Debian mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

zfsvm=../shared/zfsvm
venv=.venv-zfsvm
timeout=${ZFSVM_TESTS_TIMEOUT:-2400}

stamp() { date +%s; }
took() { echo "zfsvm-tests: $1 took $(( $(stamp) - $2 )) s" >&2; }

if [ ! -x "$zfsvm/run-in-vm.sh" ]; then
  echo "zfsvm-tests: $zfsvm/run-in-vm.sh not found; the shared/ directory must sit beside the checkout" >&2
  exit 2
fi

t=$(stamp)
"$zfsvm/build-image.sh"
took "image check/build" "$t"

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
took "venv" "$t"

t=$(stamp)
status=0
"$zfsvm/run-in-vm.sh" -g "$PWD" -t "$timeout" . "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/zfsvm "$@" \
  || status=$?
took "VM run (boot + suite)" "$t"
exit "$status"
