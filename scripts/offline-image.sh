#!/usr/bin/env bash
# Builds the image geotrain-offline:latest with no registry (this machine and CI have none).
#
# The image is a tiny root file system made from a handful of host files (/etc/passwd, group,
# nsswitch.conf, the dynamic linker's cache, empty /tmp /root /run, and the same /bin /lib ...
# symlinks into /usr as the host has), imported with `docker import`. It holds no program: its
# containers bind-mount the host's /usr, its Python and this checkout with its .venv read-only
# (`geotrain compose --offline` renders those mounts), so `geotrain`, `python` and `etcd` run
# inside exactly as on the host. Building takes well under a second once the engine answers.
#
#   scripts/offline-image.sh [IMAGE]      (default geotrain-offline:latest; $GEOTRAIN_OFFLINE_IMAGE)
#
# Idempotent: rebuilt every time (it is cheap); the previous image is removed when unused.
set -euo pipefail
IMAGE=${1:-${GEOTRAIN_OFFLINE_IMAGE:-geotrain-offline:latest}}
start=$(date +%s.%N)

root=$(mktemp -d /tmp/geotrain-offline-root.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{etc,tmp,var/tmp,root,run,home,usr,dev,proc,sys,etcd-data}
chmod 1777 "$root/tmp" "$root/var/tmp"
# /bin, /lib, /lib64: the host's symlinks into /usr where it has them (merged /usr); otherwise
# an empty directory that the rendered deployment bind-mounts. /sbin stays a real, empty
# directory: the engine mounts its init (`init: true`) at /sbin/docker-init, which a symlink
# into the read-only /usr mount would hide (PATH has /usr/sbin).
for d in bin lib lib64; do
  if [ -L "/$d" ]; then
    ln -s "$(readlink "/$d")" "$root/$d"
  else
    mkdir -p "$root/$d"
  fi
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
for f in /etc/ld.so.cache /etc/ld.so.conf; do
  [ -e "$f" ] && cp "$f" "$root$f"
done
[ -d /etc/ld.so.conf.d ] && cp -r /etc/ld.so.conf.d "$root/etc/"
# hosts, hostname and resolv.conf are written by the engine into every container.

previous=$(docker image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
tar --numeric-owner -C "$root" -cf - . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV HOME=/root' \
  --change 'WORKDIR /' \
  --change 'LABEL org.geotrain.kind=offline org.geotrain.note=bind-mounts-host-usr-python-and-checkout' \
  - "$IMAGE" >/dev/null

# The tag moved to the new image: drop the old one unless a container still uses it.
current=$(docker image inspect "$IMAGE" --format '{{.Id}}')
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi

end=$(date +%s.%N)
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
printf 'offline-image: built %s (%s bytes) in %.2fs\n' "$IMAGE" "$size" "$(echo "$end - $start" | bc 2>/dev/null || python3 -c "print($end - $start)")" >&2
