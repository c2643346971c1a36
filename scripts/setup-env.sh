#!/usr/bin/env bash
# Install what zfsbackd and its tests need on Debian 12 (idempotent): system
# packages, then a virtualenv in .venv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# systemd: systemd-analyze verifies the unit; prometheus: promtool checks the alert rules; zsh: the
# generated zsh completion is loaded by a real zsh; man-db: the generated man page is rendered by man.
for pkg in xfsprogs btrfs-progs attr acl e2fsprogs util-linux python3-venv systemd prometheus zsh man-db; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v radosgw >/dev/null || { apt-get update -qq && bash ../shared/s3/ceph-rgw.sh install >/dev/null; }  # Ceph RGW for the S3 tests

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
