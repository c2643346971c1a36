#!/usr/bin/env bash
# The main job on the embedded defaults (config/zfsbackd.yaml): the zfsbackd
# daemon with a local directory store and copy-on-write (reflink) snapshots of
# a sample directory on a small loopback XFS file system at /srv/zfsbackd-demo.
#
#   sudo bash scripts/demo.sh          # set up, then run the daemon in the foreground (Ctrl-C stops it)
#   sudo bash scripts/demo.sh --tour   # set up, start the daemon, walk through backup/restore/metrics, stop it
#
# The daemon takes the file system's first automatic backup as soon as it
# starts (then daily at 02:30 UTC), serves metrics on 127.0.0.1:9810 and
# listens on /run/zfsbackd/control.sock. It never touches an existing
# /etc/zfsbackd/zfsbackd.yaml: it uses this repository's config/zfsbackd.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh

export ZFSBACKD_CONFIG="$PWD/config/zfsbackd.yaml"
zfsbackd=("$PWD/.venv/bin/zfsbackd")
demo=/srv/zfsbackd-demo
image=/var/lib/zfsbackd/demo-xfs.img

mkdir -p /var/lib/zfsbackd "$demo"
if ! mountpoint -q "$demo"; then
  [ -f "$image" ] || { truncate -s 1G "$image"; mkfs.xfs -q -m reflink=1 "$image"; }
  mount -o loop "$image" "$demo"
fi
if [ ! -e "$demo/README.txt" ]; then
  echo "Sample data for the zfsbackd demo." > "$demo/README.txt"
  mkdir -p "$demo/projects/alpha" "$demo/projects/beta" "$demo/media"
  for i in $(seq 1 200); do seq "$i" 1000 > "$demo/projects/alpha/notes-$i.txt"; done
  head -c 20000000 /dev/urandom > "$demo/media/video.bin"
  ln -sf ../README.txt "$demo/projects/readme-link"
fi
[ -f /etc/zfsbackd/store.key ] || "${zfsbackd[@]}" key generate --key-file /etc/zfsbackd/store.key
"${zfsbackd[@]}" config validate --output table
# Stores are only ever created deliberately: this creates /var/lib/zfsbackd/store on the first run
# and reports the existing store (Created: false) on later ones.
"${zfsbackd[@]}" store init --output table

if [ "${1:-}" != "--tour" ]; then
  cat <<HELP

Starting the daemon (Ctrl-C stops it gracefully). In another terminal:
  export ZFSBACKD_CONFIG=$ZFSBACKD_CONFIG
  ${zfsbackd[*]} describe-backups --output table
  ${zfsbackd[*]} create-backup --file-system-id fs-demo --wait
  curl -s http://127.0.0.1:9810/metrics | grep ^zfsbackd_

HELP
  exec "${zfsbackd[@]}" daemon
fi

"${zfsbackd[@]}" daemon > /var/tmp/zfsbackd-demo-daemon.log 2>&1 &
daemon_pid=$!
trap 'kill -TERM $daemon_pid 2>/dev/null; wait $daemon_pid' EXIT
for _ in $(seq 1 100); do [ -S /run/zfsbackd/control.sock ] && break; sleep 0.2; done
"${zfsbackd[@]}" status
echo "== a user backup through the daemon"
"${zfsbackd[@]}" create-backup --file-system-id fs-demo --name "demo" --wait --output table
date >> "$demo/projects/beta/changelog.txt"
echo "== an incremental one: only the changed file is read"
"${zfsbackd[@]}" create-backup --file-system-id fs-demo --name "demo incremental" --wait
echo "== backups"
"${zfsbackd[@]}" describe-backups --filter file-system-id=fs-demo --output table
latest=$("${zfsbackd[@]}" describe-backups --filter file-system-id=fs-demo |
  .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["Backups"][-1]["BackupId"])')
mkdir -p /var/tmp/zfsbackd-demo-restores
echo "== restore one file from $latest"
"${zfsbackd[@]}" restore-backup --backup-id "$latest" --target /var/tmp/zfsbackd-demo-restores --path projects/beta/changelog.txt
echo "== metrics"
.venv/bin/python -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9810/metrics").read().decode())' |
  grep -E '^zfsbackd_(backups|last_successful|bytes_uploaded)'
echo "== verify every byte in the store"
"${zfsbackd[@]}" check --read-data --output table
echo "daemon log: /var/tmp/zfsbackd-demo-daemon.log"
