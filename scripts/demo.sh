#!/usr/bin/env bash
# The main job on the embedded defaults (config/zfsbackd.yaml): a local
# directory store and copy-on-write (reflink) snapshots of a sample directory
# on a small loopback XFS file system mounted at /srv/zfsbackd-demo.
#
#   sudo bash scripts/demo.sh          # set up, back up twice, restore one file, verify
#
# It never touches an existing /etc/zfsbackd/zfsbackd.yaml: it uses the
# repository's config/zfsbackd.yaml through $ZFSBACKD_CONFIG.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh

export ZFSBACKD_CONFIG="$PWD/config/zfsbackd.yaml"
zfsbackd=(.venv/bin/zfsbackd)
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

"${zfsbackd[@]}" config validate
echo "== first backup (full)"
"${zfsbackd[@]}" create-backup --file-system-id fs-demo --name "demo full" --output table
date >> "$demo/projects/beta/changelog.txt"
echo "== second backup (incremental: only the changed file is read)"
"${zfsbackd[@]}" create-backup --file-system-id fs-demo --name "demo incremental"
echo "== backups"
"${zfsbackd[@]}" describe-backups --filter file-system-id=fs-demo --output table
latest=$("${zfsbackd[@]}" describe-backups --filter file-system-id=fs-demo |
  .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["Backups"][-1]["BackupId"])')
mkdir -p /var/tmp/zfsbackd-demo-restores
echo "== restore one file from $latest"
"${zfsbackd[@]}" restore-backup --backup-id "$latest" --target /var/tmp/zfsbackd-demo-restores --path projects/beta/changelog.txt
echo "== verify every byte in the store"
"${zfsbackd[@]}" check --read-data --output table
