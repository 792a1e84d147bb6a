#!/bin/bash
# What GRUB will boot, read the way GRUB reads it: its own ext4 driver (`grub-fstest`) on the
# box's disk as it is after a power cut, without the journal replay Linux would do. Sourced
# after common.sh.

# grub_cat DISK PATH OUT : copies PATH of the host partition (msdos1) out of DISK as GRUB reads it.
grub_cat() {
  grub-fstest "$1" cp "(loop0,msdos1)$2" "$3"
}

# scratch_dir : where to put GRUB's copy of a whole image (up to 1 GiB): RAM (/dev/shm) when it
# has 2 GiB free, else the work directory. On disk, four power cuts' copies once filled a CI
# machine's disk, and the scenario failed on "No space left on device".
scratch_dir() {
  if [ -w /dev/shm ] && [ "$(df --output=avail -B1G /dev/shm | tail -n1)" -ge 2 ]; then
    echo /dev/shm
  else
    echo "$WORK_DIR"
  fi
}

# grub_view_check DISK : the box, powered off, boots a complete image: GRUB finds a valid
# grub.cfg and grubenv, the entry it will pick (a redirect, next_entry, the default or, after
# the default's last counted boot, the previous image) names an image
# GRUB reads whole, and that image passes the initramfs's own check (`e2fsck -p`: the journal
# of an image that was mounted at the cut is replayed, errors left = bit 4 fail) and has a
# kernel. Prints the image path.
grub_view_check() {
  local disk=$1 dir entry image
  dir=$(mktemp -d "$(scratch_dir)/grubview.XXXXXX")
  # shellcheck disable=SC2064  # expand now: dir is local
  trap "rm -rf '$dir'" RETURN
  grub_cat "$disk" /boot/grub/grub.cfg "$dir/grub.cfg" || { log "GRUB cannot read grub.cfg"; return 1; }
  [ -s "$dir/grub.cfg" ] || { log "GRUB reads an empty grub.cfg"; return 1; }
  grub-script-check "$dir/grub.cfg" || { log "grub.cfg as GRUB reads it is not valid"; return 1; }
  grub_cat "$disk" /boot/grub/grubenv "$dir/grubenv" || { log "GRUB cannot read grubenv"; return 1; }
  [ "$(stat -c %s "$dir/grubenv")" = 1024 ] || { log "grubenv as GRUB reads it is not 1024 bytes"; return 1; }
  # As grub.cfg decides: an initramfs's redirect, else the one-shot trial, else the default,
  # or the previous image once the default's boot count is used up (the counting block's own
  # `set default`, indented).
  local env
  env=$(grub-editenv "$dir/grubenv" list)
  entry=$(sed -n 's/^upgradectl_redirect=//p' <<<"$env")
  [ -n "$entry" ] || entry=$(sed -n 's/^next_entry=//p' <<<"$env")
  if [ -z "$entry" ] && grep -qx 'upgradectl_boots=3' <<<"$env"; then
    entry=$(sed -n 's/^    set default="\(.*\)"$/\1/p' "$dir/grub.cfg" | head -n1)
  fi
  if [ -z "$entry" ]; then
    entry=$(sed -n 's/^set default="\(.*\)"$/\1/p' "$dir/grub.cfg" | head -n1)
  fi
  [ -n "$entry" ] || { log "GRUB has no entry to boot"; return 1; }
  image=$(awk -v id="$entry" '
    $1 == "menuentry" && $0 ~ ("--id " id " ") { inside = 1; next }
    inside && $1 == "loopback" { print $3; exit }
    inside && $1 == "}" { inside = 0 }' "$dir/grub.cfg")
  [ -n "$image" ] || { log "grub.cfg has no entry $entry"; return 1; }
  grub_cat "$disk" "$image" "$dir/image" || { log "GRUB cannot read $image"; return 1; }
  local rc=0
  e2fsck -fp "$dir/image" >"$dir/fsck.log" 2>&1 || rc=$?
  if [ $((rc & 4)) -ne 0 ] || [ "$rc" -ge 8 ]; then
    log "$image as GRUB reads it fails the initramfs's e2fsck -p (exit $rc):"
    tail -n 5 "$dir/fsck.log" >&2
    return 1
  fi
  debugfs -R 'stat /vmlinuz' "$dir/image" 2>/dev/null | grep -q 'Type: symlink\|Type: regular' \
    || { log "$image has no /vmlinuz"; return 1; }
  echo "$image"
}
