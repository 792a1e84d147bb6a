#!/bin/bash
# The end-to-end scenarios. Sourced by vm-tests/run. They run in order on one appliance, each
# continuing from the state the previous one left (as a box lives), and each asserts what it
# claims. Guest state lives on its disks under $WORK_DIR/box*.img.

# shellcheck disable=SC2034  # used by vm-tests/run
SCENARIOS=(boot layout upgrade revert broken fallback resume powercut prepfaults hang demote)

# Scenarios that start from where the previous one left the box.
scenario_needs_previous() { [ "$1" != boot ]; }

BOX_DISK=$WORK_DIR/box.img
BOX_POOL=$WORK_DIR/box-pool.img
SRV_POOL=$WORK_DIR/server-pool.img
SOURCE_DISK=$WORK_DIR/source.img
# The image server in the guest runs as the package ships it (upgradectl-serve.service, its
# own user, hardened; a drop-in from setup-image.sh names the zvol and the address). Its store
# and online keys live on the server pool, mounted where the unit expects them, so they
# outlive image switches; the release manager's offline keys are elsewhere, never in the store.
STORE=/var/lib/upgradectl-server
ONLINE_KEYS=/etc/upgradectl/server/online-keys
RM_KEYS=/srv/release-manager/keys

setup_artefacts() { with_cache_lock _setup_artefacts; }

# setup_base : the guest's base tree alone, as setup_artefacts would build it.
setup_base() { with_cache_lock build_base; }

_setup_artefacts() {
  local deb base key
  # Side by side: the package (cargo: cargo-deb if missing, the release build) and the guest's
  # base tree (mmdebstrap, the ZFS module by DKMS), which does not need our binary.
  [ -n "${VMT_DEB:-}" ] || lane package build_deb
  lane guest-base build_base
  lanes_wait
  deb=$(deb_file)
  base=$(base_dir)
  if [ ! -f "$deb" ] || [ ! -d "$base" ]; then
    die "no .deb ($deb) or base tree ($base) after their lanes"
  fi
  BIN=$REPO_DIR/target/release/upgradectl
  [ -x "$BIN" ] || die "no $BIN after cargo deb"
  # The release manager's TUF repository and keys, made once per machine: every image ships
  # its first root; each run's server starts from a copy (its releases are signed in the run).
  TUF_DIR=$CACHE_DIR/tuf
  if [ ! -f "$TUF_DIR/repo/metadata/1.root.json" ]; then
    rm -rf "$TUF_DIR"
    "$BIN" repo init --repo "$TUF_DIR/repo" --keys "$TUF_DIR/keys" >&2
  fi
  export TUF_ROOT=$TUF_DIR/repo/metadata/1.root.json
  key=$( { cat "$deb" "$VMT_DIR"/guest/* "$TUF_ROOT"; echo "$base"; } | sha256sum | cut -c1-16)
  IMAGES=$CACHE_DIR/images-$key
  if [ ! -f "$IMAGES/done" ]; then
    stage "images 1.0 to 5.0 (base + .deb)" build_images "$base" "$deb"
  fi
  touch "$IMAGES"
}

# build_images BASE DEB : the image set into IMAGES.
build_images() {
  # Keep the two newest other image sets (other clones' branches), drop older ones.
  find "$CACHE_DIR" -maxdepth 1 -name 'images-*' -printf '%T@ %p\n' | sort -rn | tail -n +3 \
    | cut -d' ' -f2- | xargs -r rm -rf
  rm -rf "$IMAGES"
  mkdir -p "$IMAGES"
  build_image 1.0 good "$IMAGES/1.0.img" "$1" "$2"
  build_image 2.0 update-bundle "$IMAGES/2.0.img" "$1" "$2"
  build_image 3.0 broken "$IMAGES/3.0.img" "$1" "$2"
  build_image 4.0 big-update "$IMAGES/4.0.img" "$1" "$2"
  build_image 5.0 update "$IMAGES/5.0.img" "$1" "$2"
  touch "$IMAGES/done"
}

# A brand-new appliance: the factory image 1.0 on its host partition, empty pool disks.
fresh_box() {
  build_box_disk "$BOX_DISK" "$IMAGES/1.0.img" "$BIN"
  build_pool_disk "$BOX_POOL" 3072
  build_pool_disk "$SRV_POOL" 3072
  tar -C "$TUF_DIR" -cf "$WORK_DIR/tuf.tar" repo keys
  build_source_disk "$SOURCE_DISK" "$IMAGES"/*.img "$WORK_DIR/tuf.tar"
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

# status_json : `upgradectl status --json` in the guest. A query, so it is asked again while ssh
# itself fails (exit 255: sshd not answering yet, as after a boot on a starved machine; a
# campaign once stopped on it), for up to 2 minutes; the command's own failure is returned.
status_json() {
  local rc deadline=$((SECONDS + 120))
  while :; do
    rc=0
    vm_ssh "upgradectl status --json" || rc=$?
    [ "$rc" = 255 ] && [ "$SECONDS" -lt "$deadline" ] || return "$rc"
    log "ssh to the guest failed; asking for its status again"
    sleep 1
  done
}

# status_field EXPR : a field of `upgradectl status --json`, through python's json.
status_field() {
  status_json | python3 -c "import json,sys; s=json.loads(sys.stdin.readlines()[-1]); print($1)"
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

# A host partition on which GRUB cannot write its environment (here device-mapper, as under LVM
# or LUKS): `init` refuses it (exit 2, naming why) and writes nothing GRUB would read.
scenario_layout() {
  ensure_box || return 1
  local rc=0 out
  out=$(vm_ssh 'set -e
    d=/tmp/dmhost; mkdir -p $d/root/host
    truncate -s 64M $d/disk; dev=$(losetup -f --show $d/disk)
    dmsetup create upgradectl-test --table "0 $(blockdev --getsz $dev) linear $dev 0"
    mkfs.ext4 -q /dev/mapper/upgradectl-test
    mount /dev/mapper/upgradectl-test $d/root/host
    mkdir -p $d/root/host/images $d/root/host/boot/grub
    truncate -s 16M $d/root/host/images/1.0.img
    rc=0; upgradectl --root $d/root init --version 1.0 2>&1 || rc=$?
    ls $d/root/host/boot/grub
    umount $d/root/host; dmsetup remove upgradectl-test; losetup -d $dev
    exit $rc') || rc=$?
  log "init on device-mapper: exit $rc: $out"
  assert_eq "$rc" 2 "init's exit code on a host partition GRUB cannot save its environment on" || return 1
  grep -q "device-mapper" <<<"$out" || { log "the refusal does not say why"; return 1; }
  ! grep -q "grub.cfg\|grubenv" <<<"$out" || { log "init wrote GRUB files before refusing"; return 1; }
}

# The image GRUB points at is missing or corrupted: the initramfs records it, points GRUB at the
# fallback's own entry and reboots, so the fallback runs with its own kernel, and says so.
# Entries in custom.cfg (sourced by upgradectl's grub.cfg) load the kernel from the running
# image but name a missing / corrupted image for the initramfs.
scenario_fallback() {
  ensure_box || return 1
  local running
  running=$(status_field "s['booted']")
  vm_run "head -c 64M /dev/urandom > /host/images/corrupt.img" || return 1
  local entry bad
  for bad in missing corrupt; do
    vm_ssh "cat > /host/boot/grub/custom.cfg" <<CFG || return 1
menuentry 'test: $bad image' --id test-$bad {
  search --no-floppy --fs-uuid --set=root $HOST_UUID
  loopback loop /images/$running.img
  linux (loop)/vmlinuz root=UUID=$HOST_UUID rw upgradectl.image=/images/$bad.img upgradectl.fallback=/images/$running.img panic=5 console=ttyS0,115200
  initrd (loop)/initrd.img
}
CFG
    vm_run "grub-editenv /host/boot/grub/grubenv set next_entry=test-$bad" || return 1
    vm_reboot
    vm_wait "upgradectl: rebooting into /images/$running.img with its own kernel" 900 || return 1
    expect_boot "$running" || return 1
    # GRUB booted the fallback's own entry: its kernel, its command line.
    vm_ssh "cat /proc/cmdline" | grep -q "upgradectl.image=/images/$running.img " \
      || { log "the fallback did not boot through its own entry: $(vm_ssh "cat /proc/cmdline")"; return 1; }
    assert_eq "$(status_field "s['last_boot']['redirected']")" True "redirected ($bad)" || return 1
    entry=$(vm_ssh "cat /run/upgradectl/boot-report")
    log "boot report: $(tr '\n' ' ' <<<"$entry")"
    assert_eq "$(status_field "s['last_boot']['fallback']")" True "fallback flag ($bad)" || return 1
    # Random bytes are no ext4: e2fsck cannot even check them (exit 8) and they do not mount.
    assert_eq "$(status_field "s['last_boot']['reason']")" "$([ $bad = missing ] && echo missing || echo fsck-error)" "fallback reason ($bad)" || return 1
    assert_eq "$(status_field "s['last_boot']['requested']")" "/images/$bad.img" "requested image ($bad)" || return 1
    vm_run "upgradectl status" | grep -q "FELL BACK" || { log "status does not tell the fallback"; return 1; }
  done
  # A one-shot entry that fails inside GRUB (its kernel is missing): GRUB must go on to the
  # default (the trial's fallback chain: default, then previous), never to the previous image.
  local default
  default=$(status_field "s['default']")
  vm_ssh "cat > /host/boot/grub/custom.cfg" <<CFG || return 1
menuentry 'test: no kernel' --id test-nokernel {
  search --no-floppy --fs-uuid --set=root $HOST_UUID
  loopback loop /images/$running.img
  linux (loop)/no-such-vmlinuz root=UUID=$HOST_UUID rw upgradectl.image=/images/$running.img panic=5 console=ttyS0,115200
}
CFG
  vm_run "grub-editenv /host/boot/grub/grubenv set next_entry=test-nokernel" || return 1
  vm_reboot
  vm_wait "Falling back to" 900 || return 1
  expect_boot "$default" || return 1
  assert_eq "$(status_field "s['last_boot']['fallback']")" False "a GRUB-level fallback is not the initramfs's" || return 1
  vm_run "rm -f /host/boot/grub/custom.cfg /host/images/corrupt.img"
}

# The image server and the box's pool, in the same guest: pool srv (disk 3) holds the server's
# zvol and store, pool box (disk 2) is the appliance's; image files come from disk 4. Factory
# provisioning seeds the box's pool with image 1.0 so that later images arrive as diffs.
provision_delivery() {
  vm_run 'set -e
    zpool list srv >/dev/null 2>&1 || zpool create -f -O compression=lz4 -O mountpoint=none srv /dev/vdc1
    zpool list box >/dev/null 2>&1 || zpool create -f -O compression=lz4 -O mountpoint=none box /dev/vdb1
    mkdir -p /srv/source
    mountpoint -q /srv/source || mount -o ro /dev/vdd /srv/source
    zfs list srv/store >/dev/null 2>&1 || zfs create -o mountpoint=/var/lib/upgradectl-server srv/store
    zfs list srv/server-etc >/dev/null 2>&1 || zfs create -o mountpoint=/etc/upgradectl/server srv/server-etc
    zfs list srv/release-manager >/dev/null 2>&1 || zfs create -o mountpoint=/srv/release-manager srv/release-manager
    # The TUF repository: the offline keys stay with the release manager (in these tests in
    # the same guest); the server gets the repository and the four online keys, readable by
    # its group only.
    if [ ! -d /var/lib/upgradectl-server/repo ]; then
      tar -C /srv/release-manager -xf /srv/source/tuf.tar
      mv /srv/release-manager/repo /var/lib/upgradectl-server/repo
      install -d -m 750 -g _upgradectl-server /etc/upgradectl/server/online-keys
      for role in snapshot timestamp rollout artifacts; do
        install -m 640 -g _upgradectl-server /srv/release-manager/keys/$role.1.pk8 /etc/upgradectl/server/online-keys/
      done
    fi
    if [ ! -f /var/lib/upgradectl-server/releases.json ]; then
      upgradectl publish --store /var/lib/upgradectl-server --zvol srv/images/image --version 1.0 --from /srv/source/1.0.img
      upgradectl repo release --repo /var/lib/upgradectl-server/repo --keys /srv/release-manager/keys --version 1.0 --published /var/lib/upgradectl-server
      # What operations.md tells the operator: the service may send the image zvol, and reads
      # its snapshots as block devices (zstd-ref).
      zfs allow -u _upgradectl-server send srv/images/image
      zfs set snapdev=visible srv/images/image
    fi
    if ! zfs list box/upgradectl/image >/dev/null 2>&1; then
      zfs create -p box/upgradectl
      zfs send srv/images/image@1.0 | zfs receive box/upgradectl/image
    fi
    # The factory enrolls the box (its identity key is made on the host partition at the first
    # call): the server then keeps its reports.
    upgradectl --json identity > /tmp/identity.json
    upgradectl fleet enroll --store /var/lib/upgradectl-server --identity /tmp/identity.json >/dev/null
    # Diffs in frames of 24 MiB (the default is 1024): the diff of 2.0 is 31 MB of stream, so
    # the box (given 16 MiB of decoder memory by scenario_upgrade) decodes the first frame on
    # disk and the second in memory, into zfs receive (each frame loads the base again: frames
    # cost the build under TCG). Until a reboot.
    dropin=/run/systemd/system/upgradectl-serve.service.d/zz-frames.conf
    if [ ! -f $dropin ]; then
      mkdir -p "${dropin%/*}"
      args=$(sed -n "s/^Environment=\"UPGRADECTL_SERVE_ARGS=\(.*\)\"$/\1/p" \
        /etc/systemd/system/upgradectl-serve.service.d/vm-tests.conf)
      [ -n "$args" ]
      printf "[Service]\nEnvironment=\"UPGRADECTL_SERVE_ARGS=%s --zstd-ref-frame-mib 24\"\n" "$args" > $dropin
      systemctl daemon-reload
      systemctl stop upgradectl-serve.service
    fi
    systemctl start upgradectl-serve.service
    for i in $(seq 120); do
      curl -sf -o /dev/null http://127.0.0.1:8080/v1/metadata/timestamp.json && exit 0
      sleep 0.5
    done
    echo "the image server did not come up" >&2; exit 1'
}

publish() {
  vm_run "mkdir -p /srv/source && { mountpoint -q /srv/source || mount -o ro /dev/vdd /srv/source; }" || return 1
  vm_run "upgradectl publish --store $STORE --zvol srv/images/image --version $1 --from /srv/source/$1.img" || return 1
  sign_release "$1"
}

# sign_release VERSION : the release manager signs the published image of VERSION on stable
# with the channel's offline key; waits until the server has published it (its next sync)
# and the box sees it, verified, in `upgradectl releases`.
sign_release() {
  vm_run "upgradectl repo release --repo $STORE/repo --keys $RM_KEYS --version $1 --published $STORE" || return 1
  vm_run "for i in \$(seq 120); do
      upgradectl --json releases 2>/dev/null | tail -n1 | grep -q '\"version\":\"$1\"' && exit 0
      sleep 0.5
    done
    echo 'the server never published release $1' >&2; upgradectl releases; exit 1"
}

# ensure_box : the appliance is running (scenarios continue from the disks a previous one left).
ensure_box() {
  if ! vm_alive; then
    boot_box
    vm_wait_boot 900 >/dev/null || return 1
  fi
}

# json_field JSON EXPR
json_field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print($2)" "$1"; }

# upgrade_and_reboot ARGS... : runs `upgradectl upgrade ARGS` (which reboots the guest).
upgrade_and_reboot() {
  vm_mark
  vm_run "upgradectl --wait upgrade $*" || true
}

scenario_upgrade() {
  ensure_box || return 1
  provision_delivery || return 1
  publish 2.0 || return 1
  local rc=0 out conf=/host/var/lib/upgradectl/upgradectl.toml
  vm_ssh "upgradectl prepare --json" >/dev/null || rc=$?
  assert_eq "$rc" 4 "prepare's exit code while the server builds the diff (come back later)" || return 1
  # A box with the least decoder memory its configuration allows: the diff's first frame is
  # longer, so it is decoded through a file on the host partition.
  vm_run "cp $conf $conf.orig && printf '[download]\nmax_decoder_mib = 16\n' >>$conf" || return 1
  out=$(vm_ssh "upgradectl --wait prepare --json 2>/tmp/prepare.log" | tail -n1) || rc=$?
  vm_run "mv $conf.orig $conf" || return 1
  [ -n "$out" ] || { log "prepare failed: $(vm_ssh 'tail -n 5 /tmp/prepare.log')"; return 1; }
  log "prepare said: $(vm_ssh "grep -m1 'decoded through a file' /tmp/prepare.log")"
  assert_eq "$(vm_ssh "grep -c 'decoded through a file' /tmp/prepare.log")" 1 "frames decoded on disk" || return 1
  log "prepare: $out"
  assert_eq "$(json_field "$out" "d['base']")" 1.0 "diff base" || return 1
  assert_eq "$(json_field "$out" "d['artifact']")" 1.0-to-2.0 "artifact" || return 1
  assert_eq "$(json_field "$out" "d['downloaded_bytes'] == d['artifact_bytes']")" True "only the diff crossed the wire" || return 1
  assert_eq "$(json_field "$out" "d['downloaded_bytes'] * 10 < d['image_bytes']")" True "the diff is far smaller than the image" || return 1
  assert_eq "$(json_field "$out" "d['encoding']")" zstd-ref "the diff's encoding" || return 1
  # Frames of 24 MiB (provision_delivery): the largest frame's window and length.
  local descriptor
  descriptor=$(vm_ssh "cat $STORE/artifacts/1.0-to-2.0.descriptor") || return 1
  assert_eq "$(json_field "$descriptor" "d['window_log'], d['frame_bytes']")" "25 25165824" \
    "the diff's largest frame (24 MiB)" || return 1
  assert_eq "$(vm_ssh "ls -A /host/var/lib/upgradectl/downloads 2>/dev/null | wc -l")" 0 \
    "files left in the downloads directory" || return 1
  diff_sizes_against_xz "$(json_field "$out" "d['artifact_bytes']")" || return 1
  if vm_ssh "ls $STORE/artifacts" | grep -q '^full-'; then
    log "a full stream was built: the box did not get a diff"
    return 1
  fi
  vm_run "upgradectl status"
  upgrade_and_reboot
  expect_boot 2.0 || return 1
  assert_eq "$(status_field "s['default']")" 2.0 "default after confirm" || return 1
  assert_eq "$(status_field "s['previous']")" 1.0 "previous after confirm" || return 1
  assert_eq "$(vm_ssh "cat /etc/hostname")" appliance "migrated hostname" || return 1
  vm_run "upgradectl status"
}

# diff_sizes_against_xz BYTES : the server's build of 1.0-to-2.0 compressed the same stream as
# xz too (its log says both). 2.0's 2 MB of random payload costs both the same (nothing
# compresses it); beyond it, the zstd-ref diff the box got (BYTES) is at most half of xz.
diff_sizes_against_xz() {
  local line xz payload=2000000
  line=$(vm_ssh "journalctl -u upgradectl-serve -o cat | grep -m1 '1.0-to-2.0: stream'") || return 1
  log "server: $line"
  xz=$(sed -E 's/.*; xz ([0-9]+) bytes.*/\1/' <<<"$line")
  log "the diff: $1 bytes as zstd-ref, $xz bytes as xz ($((100 * $1 / xz))%);" \
    "beyond the random payload $(($1 - payload)) and $((xz - payload)) ($((100 * ($1 - payload) / (xz - payload)))%)"
  [ "$((2 * ($1 - payload)))" -le "$((xz - payload))" ] || { log "zstd-ref is not at most half of xz beyond the payload"; return 1; }
}

scenario_revert() {
  ensure_box || return 1
  vm_mark
  vm_run "upgradectl revert" || true
  expect_boot 1.0 || return 1
  assert_eq "$(status_field "s['default']")" 1.0 "default after revert" || return 1
  assert_eq "$(status_field "s['previous']")" 2.0 "previous after revert" || return 1
  inhibited_switch_waits 2.0 || return 1
  upgrade_and_reboot --version 2.0
  expect_boot 2.0 || return 1
  assert_eq "$(status_field "s['default']")" 2.0 "default after upgrading again" || return 1
}

# inhibited_switch_waits VERSION : while another program holds a blocking shutdown inhibitor
# (logind's, as a backup would take one), the switch to VERSION waits: exit 7, nothing armed,
# and it says who holds it; it goes ahead once the lock is released.
inhibited_switch_waits() {
  vm_ssh "setsid systemd-inhibit --what=shutdown --who=backup-agent --why='nightly backup' --mode=block sleep 600 </dev/null >/dev/null 2>&1 & echo \$! >/run/backup-inhibitor.pid" || return 1
  vm_run "for i in \$(seq 60); do systemd-inhibit --list --no-pager | grep -q backup-agent && exit 0; sleep 0.5; done; exit 1" || return 1
  local out
  out=$(vm_ssh "upgradectl upgrade --version $1 --no-reboot 2>&1; echo rc=\$?") || return 1
  log "upgrade while inhibited: $(tr '\n' ' ' <<<"$out")"
  assert_eq "${out##*rc=}" 7 "upgrade while a backup holds a shutdown inhibitor" || return 1
  assert_eq "$(status_field "s['trying']")" None "a trial armed while inhibited" || return 1
  case "$out" in *backup-agent*) ;; *) log "the refusal does not name the inhibitor"; return 1 ;; esac
  vm_run "kill \$(cat /run/backup-inhibitor.pid); for i in \$(seq 60); do systemd-inhibit --list --no-pager | grep -q backup-agent || exit 0; sleep 0.5; done; exit 1"
}

scenario_broken() {
  ensure_box || return 1
  publish 3.0 || return 1
  # One wave that pauses at the first failure (one box here).
  vm_run "upgradectl release --store $STORE --version 3.0 --waves 100 --max-failures 1 --min-sample 1" || return 1
  # This host's grub.cfg is grub-mkconfig's (update-grub ran after the switch was armed): its
  # 00_header consumes the one-shot, and 09_upgradectl must still record the attempt and send
  # the failed trial back to the default.
  vm_run "upgradectl --wait upgrade --no-reboot" || return 1
  mkconfig_menu 3.0 || return 1
  vm_reboot
  vm_wait 'UPGRADECTL-TEST grub-mkconfig menu' 900 || return 1
  vm_wait 'broken init of image 3.0' 900 || return 1
  log "image 3.0's init failed; waiting for the box to come back on its own"
  expect_boot 2.0 || return 1
  assert_eq "$(status_field "[i['state'] for i in s['images'] if i['version'] == '3.0'][0]")" bad "state of 3.0" || return 1
  assert_eq "$(status_field "s['default']")" 2.0 "default after the failed trial" || return 1
  local rc=0
  vm_ssh "upgradectl upgrade --version 3.0 --no-reboot" || rc=$?
  assert_eq "$rc" 2 "upgrading to a bad image is refused" || return 1
  vm_run "upgradectl status"
  fleet_paused 3.0 || return 1
}

# mkconfig_menu VERSION : grub.cfg made by grub-mkconfig, as on a host that runs update-grub
# (its GRUB directory at /boot/grub: here the host partition's, bind-mounted): GRUB_DEFAULT
# unset (0, the first entry: the newest image), 00_header, then grub.d/09_upgradectl's images
# (VERSION among them) with the one-shot recorded and upgradectl's default. A script before 09
# makes GRUB print a marker, so a test knows GRUB read this menu and not the one before. GRUB
# reads it after a clean reboot (the read-only remount at shutdown checkpoints the host
# partition's journal).
mkconfig_menu() {
  vm_run "set -e
    mkdir -p /boot/grub
    mountpoint -q /boot/grub || mount --bind /host/boot/grub /boot/grub
    printf 'GRUB_TIMEOUT=1\nGRUB_TERMINAL=\"serial console\"\nGRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n' >/etc/default/grub
    printf '#!/bin/sh\necho \"echo UPGRADECTL-TEST grub-mkconfig menu\"\n' >/etc/grub.d/05_vmtest
    chmod 755 /etc/grub.d/05_vmtest
    grub-mkconfig -o /boot/grub/grub.cfg
    grep -q -- '--id upgradectl-$1 ' /boot/grub/grub.cfg
    grep -q 'set upgradectl_attempted=' /boot/grub/grub.cfg"
}

# fleet_paused VERSION : the box's failure report reaches the server (the prepare timer's runs
# send what is spooled), which pauses VERSION's rollout by itself; the box reads the pause in
# the rollout document the online key signed.
fleet_paused() {
  local i paused
  vm_ssh "upgradectl prepare >/dev/null 2>&1" || true
  for i in $(seq 120); do
    paused=$(vm_ssh "upgradectl --json releases" | python3 -c "import json,sys
r = json.loads(sys.stdin.readlines()[-1])
print(any(x['version'] == '$1' and x['paused'] for x in r['releases']))") || return 1
    [ "$paused" = True ] && break
    sleep 0.5
  done
  vm_run "upgradectl fleet status --store $STORE"
  assert_eq "$paused" True "$1 paused for the boxes by the server, from this box's report" || return 1
  local reason
  reason=$(vm_ssh "upgradectl --json fleet status --store $STORE" | python3 -c "import json,sys
f = json.loads(sys.stdin.readlines()[-1])
print(next(r['paused'] for r in f['rollouts'] if r['version'] == '$1'))") || return 1
  log "the server paused $1: $reason"
  case "$reason" in *failed*) ;; *) log "no failure in the pause reason"; return 1 ;; esac
  # A second box (another identity, its own trust state, the same shipped root) is no longer
  # offered it.
  local second
  second=$(vm_ssh 'set -e; r=/tmp/second-box; mkdir -p $r/etc/upgradectl $r/host
    printf "server = \"http://127.0.0.1:8080\"\nchannel = \"stable\"\nbox_id = \"second-box\"\n[trust]\nroot = \"/etc/upgradectl/root.json\"\n" >$r/etc/upgradectl/upgradectl.toml
    cp /etc/upgradectl/root.json $r/etc/upgradectl/
    upgradectl --root $r --json releases' | python3 -c "import json,sys
r = json.loads(sys.stdin.readlines()[-1])
print(r['next'], [x['paused'] for x in r['releases'] if x['version'] == '$1'])") || return 1
  log "a second box: next ${second% *}, $1 paused: ${second#* }"
  case "$second" in "$1 "*) log "the second box is offered $1"; return 1 ;; *"[True]") ;; *) return 1 ;; esac
}

# A prepare killed in the middle (download or receive) and rerun completes without
# downloading again what it had.
# rotate_keys : keys rotate between two releases: a new root (3 keys, 2 needed to sign the
# next) and a new online timestamp key. Until the operator gives the server the new timestamp
# key, what it serves is signed by the revoked one: the box refuses it (exit 2). Then the box
# follows the new root (kept on its host partition: the images it boots ship the first one).
rotate_keys() {
  vm_run "upgradectl repo rotate-root --repo $STORE/repo --keys $RM_KEYS --roles root,timestamp --root-keys 3 --root-threshold 2" || return 1
  local rc
  rc=$(vm_ssh "upgradectl --json releases >/tmp/releases.json 2>&1; echo \$?") || return 1
  log "on the revoked timestamp key: $(vm_ssh "tail -n1 /tmp/releases.json")"
  assert_eq "$rc" 2 "releases on metadata signed by the revoked timestamp key" || return 1
  vm_run "rm -f $ONLINE_KEYS/timestamp.*.pk8
    install -m 640 -g _upgradectl-server \"\$(ls $RM_KEYS/timestamp.*.pk8 | sort -V | tail -n1)\" $ONLINE_KEYS/" || return 1
}

scenario_resume() {
  ensure_box || return 1
  rotate_keys || return 1
  publish 4.0 || return 1
  vm_run "upgradectl --wait prepare --version 4.0 --json >/tmp/p1.json 2>&1 & pid=\$!
    d=/host/var/lib/upgradectl/downloads
    for i in \$(seq 12000); do
      s=\$(cat \$d/*.partial 2>/dev/null | wc -c)
      if [ \"\$s\" -ge 8000000 ] || ls \$d/*-to-* 2>/dev/null | grep -qv '\\.partial\$'; then break; fi
      kill -0 \$pid 2>/dev/null || break
      sleep 0.05
    done
    kill -9 \$pid && echo \"killed prepare with \$s bytes of the download on disk\"" || return 1
  local out
  out=$(vm_ssh "upgradectl --wait prepare --version 4.0 --json" | tail -n1) || return 1
  log "rerun: $out"
  assert_eq "$(json_field "$out" "d['version']")" 4.0 "prepared version" || return 1
  assert_eq "$(json_field "$out" "d['resumed_bytes'] > 0 and d['downloaded_bytes'] + d['resumed_bytes'] == d['artifact_bytes']")" True "the rerun only downloaded what was missing" || return 1
  # The pool keeps only the snapshots of images the box keeps, plus the newest base: 3.0 (bad,
  # removed from the host partition) goes.
  local snaps
  snaps=$(vm_ssh "zfs list -H -t snapshot -o name -d 1 box/upgradectl/image" | sed 's/.*@//' | sort -V | tr '\n' ' ')
  assert_eq "$snaps" "1.0 2.0 4.0 " "snapshots in the box's pool after prepare" || return 1
  assert_eq "$(status_field "s['pool']['name']")" box "pool usage in status" || return 1
  assert_eq "$(status_field "s['trusted_root'] >= 2")" True "the box follows the rotated root (status)" || return 1
  # A host that runs grub-mkconfig, whose GRUB_DEFAULT=0 is the first entry, the newest image:
  # 4.0, prepared and never tried, must not become the default. The box boots its default.
  local default
  default=$(status_field "s['default']")
  mkconfig_menu 4.0 || return 1
  vm_reboot
  vm_wait 'UPGRADECTL-TEST grub-mkconfig menu' 900 || return 1
  expect_boot "$default" || return 1
  assert_eq "$(status_field "next(i['state'] for i in s['images'] if i['version'] == '4.0')")" prepared "4.0 after a reboot on grub-mkconfig's menu" || return 1
}

# install_failpoints_binary : upgradectl built with its fail points (the debug build `cargo
# test` makes; built here when missing), stripped, as /usr/local/bin/upgradectl-fp in the guest.
install_failpoints_binary() {
  (cd "$REPO_DIR" && cargo build --locked --quiet --features failpoints --bin upgradectl) || return 1
  grep -q 'prepare::planned' "$REPO_DIR/target/debug/upgradectl" \
    || { log "target/debug/upgradectl has no fail points compiled in"; return 1; }
  objcopy --strip-debug "$REPO_DIR/target/debug/upgradectl" "$WORK_DIR/upgradectl-fp" || return 1
  vm_ssh "cat > /usr/local/bin/upgradectl-fp && chmod 755 /usr/local/bin/upgradectl-fp" <"$WORK_DIR/upgradectl-fp"
}

# assert_prepare_invariants WHAT : after a prepare was killed or failed: status works, the lock
# is free, no loop device or mount besides the root's, grub.cfg valid and naming no image that
# is not registered whole.
assert_prepare_invariants() {
  vm_ssh "upgradectl status --json >/dev/null" || { log "$1: status fails"; return 1; }
  vm_ssh "flock -n /host/var/lib/upgradectl/lock true" || { log "$1: the lock is held"; return 1; }
  local loops
  loops=$(vm_ssh "losetup -n -O BACK-FILE | grep -vc '/host/images/$(status_field "s['booted']").img'" || true)
  assert_eq "$loops" 0 "$1: loop devices besides the root's" || return 1
  # upgradectl mounts images at /tmp/upgradectl-mnt-* (ImageMount); the server's datasets at
  # /var/lib/upgradectl-server and /etc/upgradectl/server are the guest's own, not leaks.
  vm_ssh "findmnt -rn -o TARGET | grep -q '^/tmp/\|upgradectl-mnt-'" && { log "$1: a mount leaked: $(vm_ssh 'findmnt -rn -o TARGET | grep "^/tmp/\|upgradectl-mnt-"')"; return 1; }
  vm_ssh "grub-script-check /host/boot/grub/grub.cfg" || { log "$1: grub.cfg is invalid"; return 1; }
  local listed
  for listed in $(vm_ssh "sed -n 's|^  loopback [^ ]* /images/\(.*\)\.img$|\1|p' /host/boot/grub/grub.cfg"); do
    [ "$(status_field "next((i['state'] for i in s['images'] if i['version'] == '$listed'), 'none')")" != none ] \
      || { log "$1: grub.cfg names $listed, which is not registered"; return 1; }
  done
}

# prepare_on_a_full_disk VERSION : with no removable image left (cleanup) and the host
# partition full but for 64 MiB, prepare exits 6 (no space) before writing anything: no download, no
# partial image, no leftovers, nothing removed; with the space back, the box is as before.
prepare_on_a_full_disk() {
  local rc=0 before after
  # Nothing removable left: prepare cannot make room by removing images.
  vm_ssh "upgradectl cleanup >/dev/null" || true
  # As on a box that never downloaded: no downloads directory (`boot prepfaults` found prepare
  # creating it before it refused; after other scenarios it existed and hid that).
  vm_ssh "rmdir /host/var/lib/upgradectl/downloads 2>/dev/null" || true
  before=$(vm_ssh "ls /host/images /host/var/lib/upgradectl/downloads 2>/dev/null | sort | tr '\n' ' '")
  vm_run "fallocate -l \$(( \$(df --output=avail -B1 /host | tail -n1) - 64 * 1048576 )) /host/filler" || return 1
  vm_ssh "upgradectl --wait prepare --version $1 --json" >/tmp/full.json 2>&1 || rc=$?
  vm_run "rm -f /host/filler" || return 1
  assert_eq "$rc" 6 "prepare's exit code on a full host partition" || { tail -n 3 /tmp/full.json; return 1; }
  after=$(vm_ssh "ls /host/images /host/var/lib/upgradectl/downloads 2>/dev/null | sort | tr '\n' ' '")
  assert_eq "$after" "$before" "the host partition after a prepare that did not fit" || return 1
  assert_eq "$(status_field "len(s['leftovers'])")" 0 "leftovers after a prepare that did not fit" || return 1
}

# Prepare killed (SIGKILL) and failed (an error) at its fail points: after each, the invariants
# hold; each rerun gets past the point the run before stopped at (the next point is reached),
# and a plain rerun completes. CI runs one chain on 5.0 that alternates the faults (kill, error,
# kill...: every point once); PREPFAULTS=full runs an error chain on 5.0 and a kill chain on a
# release 6.0 made for it (every point × both faults). First, a prepare that does not fit.
scenario_prepfaults() {
  ensure_box || return 1
  provision_delivery || return 1
  install_failpoints_binary || return 1
  publish 5.0 || return 1
  prepare_on_a_full_disk 5.0 || return 1
  local chains=("5.0 mixed")
  if [ "${PREPFAULTS:-}" = full ]; then
    make_release 6.0 good || return 1
    chains=("5.0 return" "6.0 return(kill)")
  fi
  local chain v faults fault point rc i cases=0
  local points=(prepare::planned prepare::downloaded prepare::received prepare::exported prepare::renamed)
  for chain in "${chains[@]}"; do
    v=${chain%% *}
    faults=${chain#* }
    i=0
    for point in "${points[@]}"; do
      case "$faults" in
        mixed) fault=$([ $((i % 2)) = 0 ] && echo "return(kill)" || echo return) ;;
        *) fault=$faults ;;
      esac
      i=$((i + 1))
      rc=0
      vm_ssh "FAILPOINTS='$point=$fault' upgradectl-fp --wait prepare --version $v >/tmp/fp.log 2>&1" || rc=$?
      # Stopped by the fail point, not by anything else: killed (128 + SIGKILL) or its error.
      if { [ "$fault" = "return(kill)" ] && [ "$rc" != 137 ]; } \
        || { [ "$fault" = return ] && ! vm_ssh "grep -q 'fail point $point' /tmp/fp.log"; }; then
        log "prepare $v with $point=$fault did not stop there (exit $rc): $(vm_ssh 'tail -n 3 /tmp/fp.log')"
        return 1
      fi
      assert_prepare_invariants "$point=$fault ($v, exit $rc)" || return 1
      cases=$((cases + 1))
    done
    vm_run "upgradectl --wait prepare --version $v" || return 1
    assert_eq "$(status_field "next(i['state'] for i in s['images'] if i['version'] == '$v')")" prepared "state of $v after the chain" || return 1
    assert_eq "$(status_field "len(s['leftovers'])")" 0 "leftovers after the chain ($v)" || return 1
  done
  log "prepare fail points: $cases cases (${chains[*]}), invariants held, reruns completed"
  if [ "${PREPFAULTS:-}" = full ]; then
    make_release 6.1 good || return 1
    prepare_from_a_foreign_base 6.1 || return 1
  fi
}

# prepare_from_a_foreign_base VERSION : the box's newest snapshot (the diff's base) replaced by
# a copy of its bytes under another GUID, as a factory that seeds pools by copying the image
# makes it: `zfs receive` refuses the server's diff (not its source), on every run. prepare
# takes the full stream instead and VERSION ends prepared; the next diffs start from it.
# Long mode only: the server builds a full stream (minutes under TCG).
prepare_from_a_foreign_base() {
  local base out
  base=$(vm_ssh "zfs list -H -t snapshot -o name -s createtxg -d 1 box/upgradectl/image | tail -n1 | sed 's/.*@//'") || return 1
  vm_run "set -e
    zfs set snapdev=visible box/upgradectl/image
    udevadm settle
    size=\$(zfs get -Hp -o value volsize box/upgradectl/image)
    zfs create -V \$size box/foreign
    udevadm settle
    dd if=/dev/zvol/box/upgradectl/image@$base of=/dev/zvol/box/foreign bs=1M status=none conv=fsync
    zfs snapshot box/foreign@$base
    zfs destroy -r box/upgradectl/image
    zfs rename box/foreign box/upgradectl/image" || return 1
  # A first run that gives up while the server builds the full stream (come back later, as a
  # timer's run would end), then one that waits: the diff is downloaded and refused once in
  # all (each run, and each retry of a run, had downloaded and failed it again).
  local rc=0 conf=/host/var/lib/upgradectl/upgradectl.toml
  vm_run "cp $conf $conf.orig && printf '[download]\nmax_wait_seconds = 300\n' >>$conf" || return 1
  vm_ssh "upgradectl --wait prepare --version $1 --json >/dev/null 2>/tmp/foreign.log" || rc=$?
  vm_run "mv $conf.orig $conf" || return 1
  assert_eq "$rc" 4 "exit code of the prepare that stopped waiting for the full stream" || return 1
  out=$(vm_ssh "upgradectl --wait prepare --version $1 --json 2>>/tmp/foreign.log" | tail -n1) || {
    log "prepare from a foreign base failed: $(vm_ssh 'tail -n 5 /tmp/foreign.log')"
    return 1
  }
  log "prepare from a foreign base $base: $out; it said: $(vm_ssh "grep -m1 'taking the full stream' /tmp/foreign.log")"
  assert_eq "$(vm_ssh "grep -c 'taking the full stream' /tmp/foreign.log")" 1 "diffs downloaded and refused in two runs" || return 1
  assert_eq "$(json_field "$out" "d['base']")" None "the base of $1's artifact" || return 1
  assert_eq "$(json_field "$out" "d['artifact']")" "full-$1" "$1's artifact" || return 1
  assert_eq "$(status_field "next(i['state'] for i in s['images'] if i['version'] == '$1')")" prepared "state of $1" || return 1
}

# Power cuts at random instants of switches between images: after each, the disk is first
# judged as GRUB reads it (no journal replay), then booted: the box runs the old or the new
# image, settled (no trial pending). After the last cut, one more upgrade must work. POWERCUTS
# cuts (default 4), instants drawn from POWERCUT_SEED (default 1; printed, so any run can be
# replayed), in the phases POWERCUT_PHASES names:
# - `edge` (the default, for CI's few cuts): upgrades to the newest image the box accepted
#   (edge_target: reverted from first, whole, when the box runs it; no new release), cut at
#   instants searched around the switch's commit point so that cuts land on both sides of
#   it: from 1.5 s, doubled while cuts leave the old image, then halfway between the latest cut
#   that left the old image and the earliest that left the new one (it was 1.5 to 3.3 s after
#   the ssh command under TCG);
# - `switch`: a random instant within 4 s of `upgrade`/`revert --no-reboot` (next_switch);
# - `reboot`: a random instant within 40 s of a whole upgrade or revert with its reboot
#   (shutdown, GRUB, initramfs, confirm).
# The campaign (its figures in the README's fault table):
#   POWERCUTS=100 POWERCUT_PHASES="switch reboot" POWERCUT_SEED=2026 \
#     vm-tests/run boot upgrade powercut
scenario_powercut() {
  ensure_box || return 1
  local seed=${POWERCUT_SEED:-1} n=${POWERCUTS:-4} phases
  read -r -a phases <<<"${POWERCUT_PHASES:-edge}"
  log "power cuts: $n, seed $seed, phases ${phases[*]}"
  RANDOM=$seed
  local i phase op ms old target image booted tally="" lo=0 hi=0 before=0 after=0
  for i in $(seq "$n"); do
    old=$(status_field "s['booted']") || return 1
    phase=${phases[RANDOM % ${#phases[@]}]}
    # The edge search compares instants of one operation, an upgrade; the campaign's phases
    # take whichever switch costs no new release (next_switch).
    if [ "$phase" = edge ]; then
      op=upgrade
      target=$(edge_target "$old" "$i") || return 1
      old=$(status_field "s['booted']") || return 1
    else
      read -r op target < <(next_switch "$old" "$i") || return 1
      [ -n "$target" ] || return 1
    fi
    case "$phase" in
      switch) ms=$((RANDOM % 4000)) ;;
      edge)
        if [ "$hi" = 0 ]; then ms=$((lo > 0 ? 2 * lo : 1500)); else ms=$(((lo + hi) / 2)); fi
        ms=$((ms + RANDOM % 101 - 50))
        ;;
      reboot) ms=$((RANDOM % 40000)) ;;
      *) log "unknown power-cut phase $phase"; return 1 ;;
    esac
    local cmd="upgradectl upgrade --version $target"
    [ "$op" = revert ] && cmd="upgradectl revert"
    [ "$phase" = reboot ] || cmd+=" --no-reboot"
    vm_ssh "nohup $cmd >/dev/null 2>&1 &" || return 1
    # The cut itself is at a chosen instant: a sleep, not a wait for an event.
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
    vm_kill
    # Judge the disk as GRUB will read it (no journal replay) before Linux touches it.
    image=$(grub_view_check "$BOX_DISK") || return 1
    boot_box
    booted=$(vm_wait_boot 900) || return 1
    log "cut $i/$n: $op, $phase at ${ms}ms ($old -> $target): GRUB reads $image whole; the box booted $booted"
    booted=$(settled_boot) || return 1
    case "$booted" in "$old"|"$target") ;; *) log "booted $booted: neither $old nor $target"; return 1 ;; esac
    assert_eq "$(status_field "s['trying']")" None "a trial left pending after cut $i" || return 1
    assert_eq "$(status_field "s['default']")" "$booted" "the default after cut $i" || return 1
    if [ "$phase" = edge ]; then
      if [ "$booted" = "$old" ]; then lo=$ms; else hi=$ms; fi
    fi
    tally+="$booted "
    if [ "$booted" = "$old" ]; then before=$((before + 1)); else after=$((after + 1)); fi
  done
  log "after $n cuts the box booted: $tally($before before the switch's commit point, $after after)"
  old=$(status_field "s['booted']") || return 1
  target=$(edge_target "$old" "$((n + 1))") || return 1
  upgrade_and_reboot --version "$target"
  expect_boot "$target" || return 1
  vm_run "upgradectl status"
}

# settled_boot : the image the box runs once a boot has settled: the one that booted unless
# confirm there rebooted: a revert cut before GRUB's files said so boots the
# image it was leaving, and confirm finishes it with its reboot. Its boot marker may or may not
# have been printed before the reboot (the shutdown cancels it), and a status query may land
# on either boot: a box not yet on its default has another boot coming, waited for by its
# marker.
settled_boot() {
  local booted default _
  for _ in 1 2; do
    read -r booted default < <(status_field "s['booted'] + ' ' + str(s['default'])") || return 1
    [ "$booted" != "$default" ] || break
    log "the box runs $booted, its default is $default: waiting for the reboot into it"
    booted=$(vm_wait_boot 900) || return 1
  done
  echo "$booted"
}

# next_switch BOOTED N : "OP TARGET", the campaign's next switch that needs no new release:
# `revert PREVIOUS` on the newest version the box accepted (an upgrade to an older one is a
# refused downgrade), else `upgrade NEWEST`; when the one it needs is bad or gone, `upgrade`
# to other_target's choice (which may make a release 4.N). An image a cut left half-migrated
# is a fine target: `upgrade` exports it again from its snapshot first, as a box would.
next_switch() {
  local pick
  pick=$(status_json | python3 -c '
import json, sys
s = json.loads(sys.stdin.readlines()[-1])
images = {i["version"]: i for i in s["images"]}
def usable(v):
    return v in images and images[v]["state"] != "bad"
newest, previous = s["newest_accepted"], s["previous"]
if s["booted"] == newest and usable(previous):
    print("revert", previous)
elif newest and s["booted"] != newest and usable(newest):
    print("upgrade", newest)
') || return 1
  if [ -z "$pick" ]; then
    pick="upgrade $(other_target "$1" "$2")" || return 1
  fi
  echo "$pick"
}

# edge_target BOOTED N : the target of an upgrade from an older image, at the cost of a whole
# revert (one reboot) rather than a new release (4 minutes under TCG): when the box runs the
# newest image it accepted, it reverts first, uncut, and the image it left is the target.
edge_target() {
  local op target
  read -r op target < <(next_switch "$1" "$2") || return 1
  [ -n "$target" ] || return 1
  if [ "$op" = revert ]; then
    log "reverting to $target first (no cut), to upgrade to $1 again" >&2
    vm_mark
    vm_run "upgradectl revert" >&2 || true
    expect_boot "$target" >&2 || return 1
    target=$1
  fi
  echo "$target"
}

# other_target BOOTED N : the image to upgrade to next: 2.0 or 4.0, whichever is not running,
# unless a cut made it bad (or it is gone), or it is older than the newest version the box
# accepted (a cut after the switch confirmed 4.0: 2.0 is a downgrade, which upgrade refuses,
# and the next cut would cut nothing; the newest itself is fine, prepare accepted it): then a
# new release 4.N, made, published, prepared. 4.N stays below 5.0 and 7.0, which the scenarios
# after this one publish (a 30.N here made their publish a refused downgrade: failed cold CI).
other_target() {
  local t state newest
  t=$([ "$1" = 4.0 ] && echo 2.0 || echo 4.0)
  state=$(status_field "next((i['state'] for i in s['images'] if i['version'] == '$t'), 'none')")
  newest=$(status_field "s['newest_accepted'] or '0'")
  if [ "$state" = bad ] || [ "$state" = none ] \
    || [ "$(printf '%s\n%s\n' "$t" "$newest" | sort -V | tail -n1)" != "$t" ]; then
    t="4.$2"
    log "the next target is a new release, $t" >&2
    make_release "$t" good >&2 || return 1
    vm_run "upgradectl --wait prepare --version $t" >&2 || return 1
  fi
  echo "$t"
}

# A trial that boots but never confirms (userspace hangs before the confirm unit): its deadline
# timer marks it bad and reboots into the default, with nobody at the console.
scenario_hang() {
  ensure_box || return 1
  local default
  default=$(status_field "s['default']")
  make_release 7.0 hang || return 1
  vm_run "upgradectl --wait prepare --version 7.0" || return 1
  upgrade_and_reboot --version 7.0
  vm_wait "UPGRADECTL-TEST booted version=7.0 .*confirm=inactive" 900 || return 1
  log "7.0 is up and will never confirm; waiting for its deadline"
  expect_boot "$default" || return 1
  assert_eq "$(status_field "next(i['state'] for i in s['images'] if i['version'] == '7.0')")" bad "state of the trial that never confirmed" || return 1
  assert_eq "$(status_field "s['default']")" "$default" "default after the deadline" || return 1
}

# The default image breaks on disk (random bytes over its start, then a power cut). GRUB cannot
# read it (no kernel): each boot GRUB counts the default's attempt and falls back to the previous
# image's own entry (a loop device of its own per entry: with a shared one the fallback failed
# too, and GRUB looped forever); confirm there keeps the count, and at the third it demotes the
# default: the box converges on a good image by itself. The last scenario: it leaves the box
# without its default.
scenario_demote() {
  ensure_box || return 1
  local default previous n
  default=$(status_field "s['default']")
  previous=$(status_field "s['previous']")
  [ -n "$previous" ] && [ "$previous" != None ] || { log "no previous image to fall back to"; return 1; }
  # The default is the running root: break it on disk (dd makes it durable itself: nothing can
  # be run from the broken root after it) and cut the power (no clean shutdown is possible).
  vm_ssh "dd if=/dev/urandom of=/host/images/$default.img bs=1M count=64 conv=notrunc,fsync status=none" || true
  vm_kill
  boot_box
  for n in 1 2 3; do
    [ "$n" = 1 ] || vm_reboot
    vm_wait "Falling back to .Image $previous" 900 || return 1
    expect_boot "$previous" || return 1
    log "boot $n: GRUB fell back from $default to $previous"
  done
  assert_eq "$(status_field "s['default']")" "$previous" "default after three boots GRUB could not make of $default" || return 1
  assert_eq "$(status_field "[i['state'] for i in s['images'] if i['version'] == '$default'][0]")" bad "state of the broken default" || return 1
  vm_run "upgradectl status"
}

demo() {
  local step=0
  say() {
    step=$((step + 1))
    printf '\n=== %d. %s\n' "$step" "$*"
    step "demo $step. $*"
  }
  say "a fresh appliance boots the factory image 1.0 through GRUB loopback"
  fresh_box
  boot_box
  expect_boot 1.0 || return 1
  vm_run "upgradectl status"
  say "the image server (same guest, its own ZFS pool) publishes 1.0 and 2.0"
  provision_delivery || return 1
  publish 2.0 || return 1
  say "the box prepares 2.0 in the background: a ZFS diff from 1.0, verified, exported"
  vm_run "upgradectl --wait prepare" || return 1
  vm_run "upgradectl status"
  say "upgrade: migrate configuration, arm GRUB to try 2.0 once, reboot"
  upgrade_and_reboot
  expect_boot 2.0 || return 1
  say "2.0 came up and passed its health checks: it is the default now"
  vm_run "upgradectl status"
  vm_poweroff
  step_end
}
