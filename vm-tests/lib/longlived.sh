#!/bin/bash
# The long-lived box: many successive releases published, prepared, upgraded and confirmed on
# one appliance, with a failed release, a revert and a lost image file among them, asserting
# that every step works and that the host partition's and the pool's usage stay bounded.
# Not in the default run (about 3 minutes a release under TCG):
#   LONGLIVED_RELEASES=12 vm-tests/run boot longlived
# Sourced by vm-tests/run after scenarios.sh.
# shellcheck disable=SC2154  # HOST_UUID etc. come from common.sh

# make_release VERSION VARIANT : an image for VERSION made in the guest from 2.0's image (its
# version stamp and a release file changed; `broken`: its init fails; `hang`: it never
# confirms, and its trial deadline is 60 s), published.
make_release() {
  local v=$1 variant=$2
  vm_run "set -e
    zfs list srv/work >/dev/null 2>&1 || zfs create -o mountpoint=/srv/work srv/work
    mkdir -p /srv/source /mnt/rel
    mountpoint -q /srv/source || mount -o ro /dev/vdd /srv/source
    cp --sparse=always /srv/source/2.0.img /srv/work/$v.img
    mount -o loop /srv/work/$v.img /mnt/rel
    echo $v > /mnt/rel/etc/upgradectl/image-version
    echo 'release $v' > /mnt/rel/opt/appliance/RELEASE
    if [ $variant = hang ]; then
      # Userspace never gets to confirm (as if it hung before); the deadline is 60 s.
      ln -sf /dev/null /mnt/rel/etc/systemd/system/upgradectl-confirm.service
      mkdir -p /mnt/rel/etc/systemd/system/upgradectl-trial-deadline.timer.d
      printf '[Timer]\nOnBootSec=\nOnBootSec=60s\n' > /mnt/rel/etc/systemd/system/upgradectl-trial-deadline.timer.d/test.conf
    fi
    if [ $variant = broken ]; then
      rm -f /mnt/rel/sbin/init
      # The marker through the kernel's log, which the panic flushes (setup-image.sh).
      printf '#!/bin/sh\necho \"UPGRADECTL-TEST broken init of image %s\" >/dev/kmsg\nexit 1\n' $v > /mnt/rel/sbin/init
      chmod 755 /mnt/rel/sbin/init
    fi
    umount /mnt/rel" || return 1
  vm_run "upgradectl publish --store $STORE --zvol srv/images/image --version $v --from /srv/work/$v.img && rm /srv/work/$v.img" || return 1
  sign_release "$v"
}

# usage_line : "host_used_mib pool_alloc_mib snapshots" of the box now.
usage_line() {
  vm_ssh "echo \$(( \$(df --output=used -B1M /host | tail -n1) )) \
    \$(( \$(zpool list -Hp -o allocated box) >> 20 )) \
    \$(zfs list -H -t snapshot -o name -d 1 box/upgradectl/image | wc -l)"
}

scenario_longlived() {
  ensure_box || return 1
  provision_delivery || return 1
  local n=${LONGLIVED_RELEASES:-12} i v variant before first last h p s h0 p0 max_host=0 max_pool=0
  local failed_at=3 revert_at=5 lost_at=6
  first=$(usage_line) || return 1
  log "usage before (host MiB, pool MiB, snapshots): $first"
  for i in $(seq 1 "$n"); do
    v="10.$i"
    variant=good
    [ "$i" = "$failed_at" ] && variant=broken
    before=$(status_field "s['default']") || return 1
    log "=== release $i of $n: $v ($variant), the box is on $before"
    make_release "$v" "$variant" || return 1
    vm_run "upgradectl --wait prepare --version $v --json" | tail -n1 || return 1
    if [ "$i" = "$lost_at" ]; then
      # The image file goes missing after prepare: prepare exports it again from the pool's
      # snapshot, downloading nothing.
      local out
      vm_run "rm /host/images/$v.img"
      out=$(vm_ssh "upgradectl --wait prepare --version $v --json" | tail -n1) || return 1
      assert_eq "$(json_field "$out" "d['artifact'] + ' ' + str(d['downloaded_bytes'])")" "local-snapshot 0" "export again from the pool" || return 1
    fi
    upgrade_and_reboot --version "$v"
    if [ "$variant" = broken ]; then
      vm_wait "broken init of image $v" 900 || return 1
      expect_boot "$before" || return 1
      assert_eq "$(status_field "[i['state'] for i in s['images'] if i['version'] == '$v'][0]")" bad "state of the failed release" || return 1
    else
      expect_boot "$v" || return 1
      assert_eq "$(status_field "s['default']")" "$v" "default after release $i" || return 1
    fi
    if [ "$i" = "$revert_at" ]; then
      vm_mark
      vm_run "upgradectl revert" || true
      expect_boot "$before" || return 1
      upgrade_and_reboot --version "$v"
      expect_boot "$v" || return 1
    fi
    vm_run "upgradectl cleanup >/dev/null; true"
    last=$(usage_line) || return 1
    log "usage after release $i (host MiB, pool MiB, snapshots): $last"
    read -r h p s <<<"$last"
    [ "$h" -gt "$max_host" ] && max_host=$h
    [ "$p" -gt "$max_pool" ] && max_pool=$p
    # Kept: booted, default, previous (+ the newest base): never more than 4 snapshots.
    [ "$s" -le 4 ] || { log "ASSERTION FAILED: $s snapshots in the box's pool"; return 1; }
  done
  read -r h0 p0 _ <<<"$first"
  log "longlived: $n releases; host partition used ${h0} -> max ${max_host} MiB, pool ${p0} -> max ${max_pool} MiB"
  # Bounded: at most three images and three snapshots' worth more than at the start.
  [ "$max_host" -le $((h0 + 3 * 600)) ] || { log "ASSERTION FAILED: the host partition grows"; return 1; }
  [ "$max_pool" -le $((p0 + 3 * 600)) ] || { log "ASSERTION FAILED: the pool grows"; return 1; }
  vm_run "upgradectl status"
}
