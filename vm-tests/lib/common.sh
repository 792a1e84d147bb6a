#!/bin/bash
# Shared settings and helpers of the VM tier. Sourced, never run.
# shellcheck disable=SC2034  # variables used by the scripts that source this file

VMT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$VMT_DIR/.." && pwd)
# Artefacts (ZFS module, base tree, images) are keyed by a hash of their inputs and shared by
# every clone on the machine, so a second CI run on the same machine is warm; a run's disks and
# logs (work) belong to the clone.
CACHE_DIR=${VMT_CACHE:-/var/cache/upgradectl-vm-tests}
WORK_DIR=${VMT_WORK:-$VMT_DIR/work}
SUITE=bookworm
MIRROR=${VMT_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VMT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Fixed UUID of the box's host partition: GRUB searches for it, the kernel mounts it.
HOST_UUID=5c1f0a3e-7d2b-4e55-9a61-0b7e2f4c8d10
SSH_KEY=$CACHE_DIR/ssh/id_ed25519

mkdir -p "$CACHE_DIR" "$WORK_DIR"

log() { printf '[vm-tests %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# The sources every guest and build chroot uses: main + contrib (ZFS), with security updates so
# that the kernel and its headers always match.
write_sources() {
  cat > "$1" <<SRC
deb $MIRROR $SUITE main contrib
deb $MIRROR $SUITE-updates main contrib
deb $SECURITY_MIRROR $SUITE-security main contrib
SRC
}

# cache_key NAME FILE... : a short hash of the given files' contents and of NAME.
cache_key() {
  local name=$1
  shift
  { echo "$name"; cat "$@"; } | sha256sum | cut -c1-16
}

# cached OUT CMD... : runs CMD (which must write OUT.tmp) unless OUT exists; renames on success.
cached() {
  local out=$1
  shift
  if [ -e "$out" ]; then
    log "cached: $(basename "$out")"
    return 0
  fi
  local start=$SECONDS
  remove_tree "$out.tmp"
  "$@"
  mv "$out.tmp" "$out"
  log "built $(basename "$out") in $((SECONDS - start))s"
}

# remove_tree DIR : unmounts whatever an interrupted build left mounted under DIR, then removes it.
remove_tree() {
  local m
  [ -e "$1" ] || return 0
  for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do
    umount -l "$m" || die "cannot unmount $m"
  done
  rm -rf "$1"
}
