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

bash scripts/zfsvm-env.sh

t=$(stamp)
status=0
"$zfsvm/run-in-vm.sh" -g "$PWD" -t "$timeout" . "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/zfsvm "$@" \
  || status=$?
took "VM run (boot + suite)" "$t"
exit "$status"
