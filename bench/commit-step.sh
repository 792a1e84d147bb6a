#!/bin/bash
# The commit step of an upgrade, `upgradectl upgrade --no-reboot` (migrate configuration into
# the prepared image file through a loop mount, arm GRUB's one-shot entry, record the state),
# against the plain shell equivalent on the same data: losetup + mount + cp -a of the same
# paths + umount + grub-editenv set next_entry. Target: under 1 s.
#
# Usage (as root): bench/commit-step.sh [UPGRADECTL] [RUNS]
#   UPGRADECTL  the binary to measure (default: a release build, built when missing)
#   RUNS        runs per command (default 20)
# BENCH_KEEP=1 keeps the box in /tmp for a closer look (strace, perf).
# Needs hyperfine, e2fsprogs, util-linux, grub-common.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
bin=${1:-$target/release/upgradectl}
runs=${2:-20}
if [ ! -x "$bin" ]; then
  cargo build --release
fi
for tool in hyperfine mkfs.ext4 losetup grub-editenv; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing" >&2; exit 1; }
done

work=$(mktemp -d /tmp/upgradectl-bench.XXXXXX)
cleanup() {
  mountpoint -q "$work/mnt" && umount "$work/mnt"
  if [ -n "${BENCH_KEEP:-}" ]; then echo "bench: box kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
root=$work/root
host=$root/host
mkdir -p "$root/proc" "$root/etc/upgradectl" "$host/images" "$work/mnt" "$work/src"

# The running image's configuration: what a box really migrates.
paths=(/etc/hostname /etc/hosts /etc/machine-id /etc/passwd /etc/shadow /etc/group
  /etc/gshadow /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub
  /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_rsa_key.pub /etc/netplan /etc/upgradectl/box.toml)
mkdir -p "$root/etc/ssh" "$root/etc/netplan"
echo box-17 >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 box-17\n' >"$root/etc/hosts"
echo 0123456789abcdef0123456789abcdef >"$root/etc/machine-id"
for f in passwd group; do cp /etc/$f "$root/etc/$f"; done
for f in shadow gshadow; do cp /etc/$f "$root/etc/$f"; chmod 640 "$root/etc/$f"; done
for k in ed25519 rsa; do
  head -c 2048 /dev/urandom | base64 >"$root/etc/ssh/ssh_host_${k}_key"
  chmod 600 "$root/etc/ssh/ssh_host_${k}_key"
  echo "ssh-$k AAAA box-17" >"$root/etc/ssh/ssh_host_${k}_key.pub"
done
for i in 1 2 3; do echo "network: {version: 2, id: $i}" >"$root/etc/netplan/1$i-box.yaml"; done
ln -s 11-box.yaml "$root/etc/netplan/current.yaml"
echo 'serial = "B17"' >"$root/etc/upgradectl/box.toml"
{
  echo '[migrate]'
  printf 'paths = ['
  printf '"%s", ' "${paths[@]}"
  printf ']\n'
} >"$root/etc/upgradectl/upgradectl.toml"
echo "root=UUID=0f4d5a1e-1234-4c5b-9a3d-2f0e7d1c6b5a rw upgradectl.image=/images/1.0.img panic=10" \
  >"$root/proc/cmdline"

# Two images of a realistic shape: 1 GiB ext4 files holding a copy of this machine's /usr/share
# subset and /etc, as an image build would leave them (sparse).
mkdir -p "$work/src/etc" "$work/src/host" "$work/src/usr"
cp -a /etc/. "$work/src/etc/" 2>/dev/null || true
cp -a /usr/share/doc "$work/src/usr/" 2>/dev/null || true
echo factory >"$work/src/etc/hostname"
mkfs.ext4 -q -F -d "$work/src" "$host/images/1.0.img" 1G
mkfs.ext4 -q -F -d "$work/src" "$work/2.0.pristine.img" 1G
cp --sparse=always "$work/2.0.pristine.img" "$host/images/2.0.img"

"$bin" --root "$root" init --version 1.0 >/dev/null
state=$host/var/lib/upgradectl/state.json
# What `prepare` leaves behind: 2.0 registered as prepared.
python3 - "$state" <<'PY'
import json, sys
p = sys.argv[1]
s = json.load(open(p))
s["images"]["2.0"] = {"state": "prepared"}
s["prepared"] = "2.0"
json.dump(s, open(p, "w"))
PY
cp "$state" "$work/state.pristine.json"
cp "$host/boot/grub/grubenv" "$work/grubenv.pristine"

# Every run starts from the same box: pristine image 2.0, nothing armed.
reset="cp --sparse=always $work/2.0.pristine.img $host/images/2.0.img && cp $work/state.pristine.json $state && cp $work/grubenv.pristine $host/boot/grub/grubenv && sync"

rel=()
for p in "${paths[@]}"; do rel+=("${p#/}"); done
shell="dev=\$(losetup -f --show $host/images/2.0.img) && mount \$dev $work/mnt && (cd $root && cp -a --parents ${rel[*]} $work/mnt/) && umount $work/mnt && losetup -d \$dev 2>/dev/null; grub-editenv $host/boot/grub/grubenv set next_entry=upgradectl-2.0"

# upgradectl fsyncs the image, grub.cfg, grubenv and its state; the plain shell syncs nothing.
shell_durable="$shell && sync $host/images/2.0.img $host/boot/grub/grubenv"

# One checked run: the configuration lands, GRUB is armed.
eval "$reset"
report=$("$bin" --root "$root" --json upgrade --no-reboot)
echo "upgradectl's own timing of one run: $(echo "$report" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["seconds"])') s"
grub-editenv "$host/boot/grub/grubenv" list | grep -qx next_entry=upgradectl-2.0
debugfs -R 'cat /etc/hostname' "$host/images/2.0.img" 2>/dev/null | grep -qx box-17

hyperfine --runs "$runs" --warmup 2 --shell=bash --prepare "$reset" \
  --export-markdown "$work/result.md" \
  -n "upgradectl upgrade --no-reboot" "$bin --root $root upgrade --no-reboot" \
  -n "shell: losetup+mount+cp -a+umount+grub-editenv" "$shell" \
  -n "same shell + sync of the image file (durable, like upgradectl)" "$shell_durable"
cat "$work/result.md"
