#!/usr/bin/env bash
# The ZFS path of the benchmark, on real OpenZFS in the throw-away QEMU VM of ../shared/zfsvm.
#
#   bench/zfs.sh [bench/zfs_vm.py OPTIONS...]      e.g. bench/zfs.sh --files 5000
#
# 1. builds the VM image if it is missing or stale (3-5 min the first time, 0 s after);
# 2. makes .venv-zfsvm exactly like scripts/zfsvm-tests.sh (Debian's /usr/bin/python3,
#    --system-site-packages, the project installed editable), so both share one venv;
# 3. boots ONE VM with the checkout shared at the same path and runs bench/zfs_vm.py
#    there as root; the table goes to stdout, bench/results/<stamp>-zfs.json keeps everything.
#
# Environment: ZFSBENCH_TIMEOUT (seconds, default 5400), ZFSBENCH_MEM (guest MiB, default 4096),
# ZFSBENCH_CPUS (guest vCPUs, default: host CPUs), and run-in-vm.sh's own (ZFSVM_CACHE=... for
# another OpenZFS image). Needs root. Under software emulation (TCG) --files 50000 takes
# roughly half an hour; see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

zfsvm=../shared/zfsvm
venv=.venv-zfsvm
timeout=${ZFSBENCH_TIMEOUT:-5400}
mem=${ZFSBENCH_MEM:-4096}

stamp() { date +%s; }
took() { echo "zfs-bench: $1 took $(( $(stamp) - $2 )) s" >&2; }

if [ ! -x "$zfsvm/run-in-vm.sh" ]; then
  echo "zfs-bench: $zfsvm/run-in-vm.sh not found; the shared/ directory must sit beside the checkout" >&2
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
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  touch "$venv/.installed"
fi
took "venv" "$t"

host="$(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) at start"
opts=(-g "$PWD" -t "$timeout" -m "$mem" -e "ZFSBENCH_HOST=$host")
[ -n "${ZFSBENCH_CPUS:-}" ] && opts+=(-c "$ZFSBENCH_CPUS")

t=$(stamp)
status=0
"$zfsvm/run-in-vm.sh" "${opts[@]}" . "$venv/bin/python" bench/zfs_vm.py "$@" || status=$?
took "VM run (boot + benchmark)" "$t"
echo "zfs-bench: host load at end $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exit "$status"
