#!/usr/bin/env bash
# The ZFS path of the benchmark, on real OpenZFS in the throw-away QEMU VM of ../shared/zfsvm.
#
#   bench/zfs.sh [bench/zfs_vm.py OPTIONS...]      e.g. bench/zfs.sh --files 5000
#
# 1.-2. scripts/zfsvm-env.sh: the VM image and .venv-zfsvm (shared with scripts/zfsvm-tests.sh);
# 3. boots ONE VM with the checkout shared at the same path and runs bench/zfs_vm.py
#    there as root; the table goes to stdout, bench/results/<stamp>-zfs.json keeps everything.
#
# Environment: ZFSBENCH_TIMEOUT (seconds, default 5400), ZFSBENCH_MEM (guest MiB, default 4096),
# ZFSBENCH_CPUS (guest vCPUs, default: host CPUs), and run-in-vm.sh/build-image.sh's own (OpenZFS 2.3:
# ZFSVM_CACHE=/var/cache/zfsvm-2.3 ZFSVM_ZFS_SUITE=bookworm-backports). Needs root. Under TCG --files 50000 takes
# 9-16 minutes (boot included); see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

zfsvm=../shared/zfsvm
venv=.venv-zfsvm
timeout=${ZFSBENCH_TIMEOUT:-5400}
mem=${ZFSBENCH_MEM:-4096}

stamp() { date +%s; }
took() { echo "zfs-bench: $1 took $(( $(stamp) - $2 )) s" >&2; }

bash scripts/zfsvm-env.sh

host="$(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) at start"
opts=(-g "$PWD" -t "$timeout" -m "$mem" -e "ZFSBENCH_HOST=$host")
[ -n "${ZFSBENCH_CPUS:-}" ] && opts+=(-c "$ZFSBENCH_CPUS")

t=$(stamp)
status=0
"$zfsvm/run-in-vm.sh" "${opts[@]}" . "$venv/bin/python" bench/zfs_vm.py "$@" || status=$?
took "VM run (boot + benchmark)" "$t"
echo "zfs-bench: host load at end $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exit "$status"
