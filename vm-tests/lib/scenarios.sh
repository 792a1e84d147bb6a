#!/bin/bash
# The end-to-end scenarios. Sourced by vm-tests/run. They run in order on one appliance, each
# continuing from the state the previous one left (as a box lives), and each asserts what it
# claims. Guest state lives on its disks under $WORK_DIR/box*.img.

# shellcheck disable=SC2034  # used by vm-tests/run
SCENARIOS=(boot fallback)

# Scenarios that start from where the previous one left the box.
scenario_needs_previous() { [ "$1" != boot ]; }

BOX_DISK=$WORK_DIR/box.img
BOX_POOL=$WORK_DIR/box-pool.img
SRV_POOL=$WORK_DIR/server-pool.img
SOURCE_DISK=$WORK_DIR/source.img

setup_artefacts() {
  local deb base key
  deb=$(build_deb)
  base=$(build_base)
  BIN=$REPO_DIR/target/release/upgradectl
  [ -x "$BIN" ] || die "no $BIN after cargo deb"
  key=$( { cat "$deb" "$VMT_DIR"/guest/*; echo "$base"; } | sha256sum | cut -c1-16)
  IMAGES=$CACHE_DIR/images-$key
  if [ ! -f "$IMAGES/done" ]; then
    rm -rf "$CACHE_DIR"/images-*
    mkdir -p "$IMAGES"
    build_image 1.0 good "$IMAGES/1.0.img" "$base" "$deb"
    build_image 2.0 update "$IMAGES/2.0.img" "$base" "$deb"
    build_image 3.0 broken "$IMAGES/3.0.img" "$base" "$deb"
    touch "$IMAGES/done"
  fi
}

# A brand-new appliance: the factory image 1.0 on its host partition, empty pool disks.
fresh_box() {
  build_box_disk "$BOX_DISK" "$IMAGES/1.0.img" "$BIN"
  build_pool_disk "$BOX_POOL" 3072
  build_pool_disk "$SRV_POOL" 3072
  build_source_disk "$SOURCE_DISK" "$IMAGES/1.0.img" "$IMAGES/2.0.img" "$IMAGES/3.0.img"
}

boot_box() {
  vm_start box "$BOX_DISK" "$BOX_POOL" "$SRV_POOL" "$SOURCE_DISK"
}

# expect_boot VERSION : waits for the next boot marker and checks the version.
expect_boot() {
  local got
  got=$(vm_wait_boot 900) || return 1
  [ "$got" = "$1" ] || { log "expected image $1 to boot, got $got"; return 1; }
  log "booted image $got"
}

# status_field EXPR : a field of `upgradectl status --json`, through python's json.
status_field() {
  vm_ssh "upgradectl status --json" | python3 -c "import json,sys; s=json.loads(sys.stdin.readlines()[-1]); print($1)"
}

assert_eq() {
  if [ "$1" != "$2" ]; then
    log "ASSERTION FAILED: $3: expected '$2', got '$1'"
    return 1
  fi
}

scenario_boot() {
  fresh_box
  boot_box
  expect_boot 1.0 || return 1
  local src backing host
  src=$(vm_ssh "findmnt -n -o SOURCE /")
  [[ $src == /dev/loop* ]] || { log "root is $src, not a loop device"; return 1; }
  backing=$(vm_ssh "cat /sys/block/$(basename "$src")/loop/backing_file")
  assert_eq "$backing" /host/images/1.0.img "loop backing file" || return 1
  host=$(vm_ssh "findmnt -n -o SOURCE /host")
  assert_eq "$host" /dev/vda1 "/host source" || return 1
  assert_eq "$(status_field "s['booted']")" 1.0 "status booted" || return 1
  assert_eq "$(status_field "s['default']")" 1.0 "status default" || return 1
  assert_eq "$(status_field "s['last_boot']['fallback']")" False "boot report fallback" || return 1
  vm_run "upgradectl status"
}

# The image GRUB points at is missing or corrupted: the initramfs boots the fallback image and
# says so. Entries in custom.cfg (sourced by upgradectl's grub.cfg) load the kernel from 1.0 but
# name a missing / corrupted image for the initramfs.
scenario_fallback() {
  vm_alive || { boot_box; expect_boot 1.0 || return 1; }
  vm_run "head -c 64M /dev/urandom > /host/images/corrupt.img" || return 1
  local entry bad
  for bad in missing corrupt; do
    vm_ssh "cat > /host/boot/grub/custom.cfg" <<CFG || return 1
menuentry 'test: $bad image' --id test-$bad {
  search --no-floppy --fs-uuid --set=root $HOST_UUID
  loopback loop /images/1.0.img
  linux (loop)/vmlinuz root=UUID=$HOST_UUID rw upgradectl.image=/images/$bad.img upgradectl.fallback=/images/1.0.img panic=5 console=ttyS0,115200
  initrd (loop)/initrd.img
}
CFG
    vm_run "grub-editenv /host/boot/grub/grubenv set next_entry=test-$bad" || return 1
    vm_reboot
    expect_boot 1.0 || return 1
    entry=$(vm_ssh "cat /run/upgradectl/boot-report")
    log "boot report: $(tr '\n' ' ' <<<"$entry")"
    assert_eq "$(status_field "s['last_boot']['fallback']")" True "fallback flag ($bad)" || return 1
    assert_eq "$(status_field "s['last_boot']['reason']")" "$([ $bad = missing ] && echo missing || echo fsck)" "fallback reason ($bad)" || return 1
    assert_eq "$(status_field "s['last_boot']['requested']")" "/images/$bad.img" "requested image ($bad)" || return 1
    vm_run "upgradectl status" | grep -q "FELL BACK" || { log "status does not tell the fallback"; return 1; }
  done
  vm_run "rm -f /host/boot/grub/custom.cfg /host/images/corrupt.img"
}

demo() {
  die "the demo needs the delivery pipeline (publish/serve/prepare); not wired yet"
}
