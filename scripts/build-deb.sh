#!/usr/bin/env bash
# Build dist/zfsbackd_<version>_<arch>.deb from this checkout, for Debian 12, with dpkg-deb alone.
#
# Usage: scripts/build-deb.sh [OUTPUT_DIR]        (default: dist/; prints the .deb's path)
#
# The package carries its own Python environment: a venv under /opt/zfsbackd,
# made with the system python3 and filled from this checkout's files (tracked and
# new, not ignored ones) plus wheels from PyPI, so Debian's python3 stays as it is
# (PEP 668) and the versions are the ones tested. It installs:
#   /usr/bin/zfsbackd                        -> /opt/zfsbackd/bin/zfsbackd
#   /lib/systemd/system/zfsbackd.service     (not enabled: edit the config first)
#   /usr/lib/sysusers.d/zfsbackd.conf        the daemon.control_group of the example config
#   /etc/zfsbackd/ (0700), zfsbackd.yaml     the example config, 0600, a conffile
#   man page, bash and zsh completions       generated from the argparse parser
#   /usr/share/doc/zfsbackd/                 README.md (the unit's Documentation=), copyright, examples
# Purging removes the config file but never backups (/var/lib/zfsbackd) or keys.
#
# Needs: python3 with venv (python3-venv), dpkg-deb, and PyPI. No debhelper, no root.
set -euo pipefail
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=${PYTHON:-/usr/bin/python3}
prefix=/opt/zfsbackd

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$repo/pyproject.toml")
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
arch=$(dpkg --print-architecture)
deb=$out/zfsbackd_${version}_${arch}.deb

work=$(mktemp -d -t zfsbackd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
src=$work/src

# 1. The sources: what git would commit (tracked plus new, not ignored), so a dirty
#    .venv, build/ or egg-info in the checkout never leaks in and the checkout is not written to.
mkdir -p "$src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | (cd "$repo" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done' sh) \
    | tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
else
  tar -C "$repo" --exclude=.venv --exclude=.venv-zfsvm --exclude=dist --exclude=build -cf - . | tar -C "$src" -xf -
fi

# 2. The venv, at its final path inside the staging root; pip writes no .pyc (they would
#    name the staging path), they are compiled below with the installed path.
"$python" -m venv "$root$prefix"
"$root$prefix/bin/pip" install -q --disable-pip-version-check --no-compile --no-warn-script-location "$src"
"$root$prefix/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null
rm -f "$root$prefix"/bin/pip* "$root$prefix"/bin/activate* "$root$prefix"/bin/Activate.ps1
# The wheels are built for this minor version: pin the interpreter to it, not to whatever python3 becomes.
ln -sfn "/usr/bin/python$pyver" "$root$prefix/bin/python3"
# direct_url.json would name the temporary source tree (and means nothing once packaged).
for info in "$root$prefix"/lib/python*/site-packages/zfsbackd-*.dist-info; do
  rm -f "$info/direct_url.json" && sed -i '/direct_url\.json/d' "$info/RECORD"
done
# Scripts' shebangs, pyvenv.cfg and RECORDs name the staging root: make them name /opt/zfsbackd.
grep -rlI --null -F -- "$root" "$root$prefix" | xargs -0 -r sed -i "s|$root||g"
"$python" -m compileall -q -j 0 -s "$root" -p / "$root$prefix/lib" >/dev/null

# 3. Generated from the parser with the packaged code: man page and completions.
date=$(git -C "$repo" log -1 --format=%cs 2>/dev/null || date -u +%F)
install -d "$root/usr/share/man/man8" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions"
"$root$prefix/bin/python" "$src/scripts/build-manpage.py" --date "$date" | gzip -9n >"$root/usr/share/man/man8/zfsbackd.8.gz"
"$root$prefix/bin/python" -m zfsbackd.cli completion bash >"$root/usr/share/bash-completion/completions/zfsbackd"
"$root$prefix/bin/python" -m zfsbackd.cli completion zsh >"$root/usr/share/zsh/vendor-completions/_zfsbackd"

# 4. Everything else the package installs.
install -d "$root/usr/bin"
ln -s "$prefix/bin/zfsbackd" "$root/usr/bin/zfsbackd"
install -D -m 0644 "$src/systemd/zfsbackd.service" "$root/lib/systemd/system/zfsbackd.service"
install -d "$root/usr/lib/sysusers.d"
printf '# the group allowed on the control socket (daemon.control_group in /etc/zfsbackd/zfsbackd.yaml)\ng zfsbackd -\n' \
  >"$root/usr/lib/sysusers.d/zfsbackd.conf"
install -d -m 0700 "$root/etc/zfsbackd"
install -m 0600 "$src/config/zfsbackd.example.yaml" "$root/etc/zfsbackd/zfsbackd.yaml"
doc=$root/usr/share/doc/zfsbackd
install -D -m 0644 "$src/README.md" "$doc/README.md"
install -D -m 0644 "$src/LICENSE" "$doc/copyright"
install -D -m 0644 "$src/config/zfsbackd.example.yaml" "$doc/examples/zfsbackd.example.yaml"
install -D -m 0644 "$src/config/prometheus-alerts.yaml" "$doc/examples/prometheus-alerts.yaml"

# 5. Control files and maintainer scripts.
install -d "$root/DEBIAN"
echo /etc/zfsbackd/zfsbackd.yaml >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/control" <<EOF
Package: zfsbackd
Version: $version
Architecture: $arch
Maintainer: zfsbackd maintainers <root@localhost>
Installed-Size: $(du -sk "$root" | cut -f1)
Depends: python$pyver, libc6
Suggests: zfsutils-linux, btrfs-progs, xfsprogs, prometheus
Section: admin
Priority: optional
Description: snapshot backup daemon for ZFS, btrfs and XFS file systems
 zfsbackd snapshots every configured file system and backs it up
 incrementally, encrypted and deduplicated, to a local directory or S3
 regions, in the style of Amazon FSx backups: daily automatic backups with
 retention, user backups, cross-region copies, restores of whole file
 systems or single paths, Prometheus metrics and a systemd service.
EOF
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# zfsbackd postinst: the control group, and systemd told about the unit. The service is
# not enabled here: the config needs editing first (README, "Install").
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers zfsbackd.conf
    elif ! getent group zfsbackd >/dev/null; then
        addgroup --system zfsbackd
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade restarts a running daemon: running backups checkpoint and resume.
        if [ -n "$2" ]; then
            systemctl try-restart zfsbackd.service || true
        fi
    fi
fi
exit 0
EOF
cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# zfsbackd prerm: stop the daemon before its files go (SIGTERM: running backups checkpoint).
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop zfsbackd.service || true
fi
exit 0
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# zfsbackd postrm. Backups, the state directory and key files are never touched, not even
# by purge: they outlive the package (dpkg itself removes the config file on purge, and
# /etc/zfsbackd only if nothing else, such as a key file, is left in it).
set -e
case "$1" in
    remove)
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        ;;
    purge)
        # `systemctl enable` made this link; the unit it points to is gone.
        rm -f /etc/systemd/system/multi-user.target.wants/zfsbackd.service
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        ;;
esac
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
  >"$root/DEBIAN/md5sums"

dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
