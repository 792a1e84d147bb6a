#!/bin/bash
# Builds the VM tier's artefacts from nothing, each cached by a hash of its inputs:
# the ZFS module for the guest kernel, the base root filesystem, image files, the box's disks.
# Sourced after common.sh.

# dbus: logind runs (as on an Ubuntu appliance), so inhibitor locks are real.
BASE_PACKAGES=linux-image-amd64,grub-common,systemd-sysv,udev,initramfs-tools,busybox,e2fsprogs,kmod,zfsutils-linux,openssh-server,iproute2,procps,curl,xz-utils,rsync,util-linux,zstd,dmsetup,dbus

# The ZFS module, built by DKMS in a build chroot for the exact guest kernel: a tarball holding
# lib/modules/<kver>/updates/dkms/*.ko. zfs_modules_tar prints its path, build_zfs_modules
# builds it unless cached.
zfs_modules_tar() {
  echo "$CACHE_DIR/zfs-modules-$(echo "zfs-v1 $SUITE $MIRROR" | sha256sum | cut -c1-16).tar"
}

build_zfs_modules() {
  local out
  out=$(zfs_modules_tar)
  stage "ZFS module for the guest kernel (DKMS)" cached "$out" _build_zfs_modules "$out"
}

_build_zfs_modules() {
  local out=$1 chroot=$WORK_DIR/zfs-chroot
  remove_tree "$chroot"
  write_sources "$WORK_DIR/sources.list"
  log "building the ZFS module with DKMS (several minutes)"
  mmdebstrap --variant=apt --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --include=linux-headers-amd64,linux-image-amd64,zfs-dkms,build-essential,dkms \
    "$SUITE" "$chroot" "$WORK_DIR/sources.list"
  local kver
  kver=$(ls "$chroot/lib/modules")
  [ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel in the build chroot, got: $kver"
  # zfs-dkms builds for the chroot's kernel in its postinst; make sure it did.
  if ! ls "$chroot/lib/modules/$kver/updates/dkms/zfs.ko" >/dev/null 2>&1; then
    chroot "$chroot" dkms autoinstall -k "$kver"
  fi
  ls "$chroot/lib/modules/$kver/updates/dkms/zfs.ko" >/dev/null || die "DKMS did not build zfs.ko for $kver"
  tar -C "$chroot" -cf "$out.tmp" "lib/modules/$kver/updates/dkms"
  remove_tree "$chroot"
}

# The project's .deb (binary, man pages and completions, initramfs hooks, grub.d script,
# systemd units). gen-assets makes the release build and generates what cargo deb packages.
# deb_file prints VMT_DEB or else the newest .deb, build_deb builds it (cargo's own caching).
deb_file() {
  if [ -n "${VMT_DEB:-}" ]; then
    echo "$VMT_DEB"
  else
    ls -t "$REPO_DIR"/target/debian/upgradectl_*.deb | head -n1
  fi
}

build_deb() {
  if ! command -v cargo-deb >/dev/null; then
    # Debian (bookworm, trixie) does not package cargo-deb: compiled from crates.io, once, as
    # tools/install-deps would have.
    stage "cargo-deb (cargo install, once per machine)" cargo install --locked cargo-deb
  fi
  stage "release build, man pages, completions" "$REPO_DIR/tools/gen-assets"
  stage ".deb (cargo deb)" _cargo_deb
}

_cargo_deb() (
  cd "$REPO_DIR" || exit 1
  cargo deb --quiet
)

# The base root filesystem (a directory) shared by every image: kernel, systemd, ZFS, ssh,
# built on the ZFS module. base_dir prints its path (once the module is built), build_base
# builds both unless cached. Neither needs our binary: build_base runs beside build_deb.
base_dir() {
  local key
  key=$( { echo "base-v1 $BASE_PACKAGES"; cat "$(zfs_modules_tar)" "$SSH_KEY.pub" "$VMT_DIR/guest/setup-base.sh"; } | sha256sum | cut -c1-16)
  echo "$CACHE_DIR/base-$key"
}

build_base() {
  local out
  build_zfs_modules
  ssh_key
  out=$(base_dir)
  stage "base root filesystem (mmdebstrap)" cached "$out" _build_base "$out" "$(zfs_modules_tar)"
}

_build_base() {
  local out=$1 zfs=$2
  write_sources "$WORK_DIR/sources.list"
  log "building the base root filesystem with mmdebstrap"
  mmdebstrap --variant=minbase --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --include="$BASE_PACKAGES" \
    --customize-hook="tar -C \"\$1\" -xf '$zfs'" \
    --customize-hook="upload '$VMT_DIR/guest/setup-base.sh' /tmp/setup-base.sh" \
    --customize-hook='chroot "$1" sh /tmp/setup-base.sh && rm "$1/tmp/setup-base.sh"' \
    --customize-hook="upload '$SSH_KEY.pub' /root/.ssh/authorized_keys" \
    "$SUITE" "$out.tmp" "$WORK_DIR/sources.list"
}

ssh_key() {
  if [ ! -f "$SSH_KEY" ]; then
    mkdir -p "$(dirname "$SSH_KEY")"
    ssh-keygen -q -t ed25519 -N '' -f "$SSH_KEY" -C upgradectl-vm-tests
  fi
}

# build_image VERSION VARIANT OUT: an ext4 image file of the base + our .deb + VARIANT's change.
# VARIANT: good | update (a realistic small change on top of good) | broken (init fails).
build_image() {
  local version=$1 variant=$2 out=$3 base=$4 deb=$5
  local tree=$WORK_DIR/tree-$version
  remove_tree "$tree"
  mkdir -p "$tree"
  cp -a "$base/." "$tree/"
  cp "$deb" "$tree/tmp/upgradectl.deb"
  mkdir -p "$tree/usr/local/share/upgradectl-test"
  cp -a "$VMT_DIR/guest" "$tree/usr/local/share/upgradectl-test/"
  if [ -n "${TUF_ROOT:-}" ]; then
    cp "$TUF_ROOT" "$tree/usr/local/share/upgradectl-test/root.json"
  fi
  mount --bind /proc "$tree/proc"
  mount --bind /dev "$tree/dev"
  local rc=0
  chroot "$tree" sh /usr/local/share/upgradectl-test/guest/setup-image.sh "$version" "$variant" >&2 || rc=$?
  umount "$tree/dev" "$tree/proc"
  [ "$rc" = 0 ] || die "image $version: setup failed"
  local used size
  used=$(du -sxm "$tree" | cut -f1)
  size=$(( used + used / 4 + 64 ))
  rm -f "$out"
  mkfs.ext4 -q -F -L "img-$version" -d "$tree" "$out" "${size}M" || die "mkfs of $version failed"
  rm -rf "$tree"
  log "image $version ($variant): ${used} MiB of files, ${size} MiB file, $(du -m "$out" | cut -f1) MiB allocated"
}

# build_box_disk OUT IMAGE_FILE : the box's boot disk: MBR + BIOS GRUB + one ext4 host
# partition holding images/<v>.img, GRUB's files and upgradectl's state, provisioned by
# `upgradectl init` exactly as a factory would.
build_box_disk() {
  local out=$1 image=$2 bin=$3
  local version stage=$WORK_DIR/stage size_mib=6144
  version=$(basename "$image" .img)
  rm -rf "$stage"
  mkdir -p "$stage/host/images" "$stage/host/boot/grub/i386-pc" "$stage/host/var/lib/upgradectl"
  cp --sparse=always "$image" "$stage/host/images/"
  cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$stage/host/boot/grub/i386-pc/"
  # The box-specific override on the host partition.
  printf '[grub]\nkernel_args = "console=ttyS0,115200"\npanic_seconds = 5\ntimeout_seconds = 1\n' \
    > "$stage/host/var/lib/upgradectl/upgradectl.toml"
  "$bin" --root "$stage" init --version "$version" --host-uuid "$HOST_UUID" >&2
  grub-script-check "$stage/host/boot/grub/grub.cfg"

  rm -f "$out"
  truncate -s "${size_mib}M" "$out"
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$out"
  mkfs.ext4 -q -F -U "$HOST_UUID" -L host -d "$stage/host" -E offset=1048576 "$out" "$((size_mib - 1))M"

  grub-mkimage -O i386-pc -o "$WORK_DIR/core.img" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux loopback search search_fs_uuid configfile echo test \
    loadenv serial terminal
  dd if=/usr/lib/grub/i386-pc/boot.img of="$out" bs=440 count=1 conv=notrunc status=none
  # As grub-bios-setup does: NOP the jump that would skip the BIOS drive check.
  printf '\x90\x90' | dd of="$out" bs=1 seek=$((0x66)) conv=notrunc status=none
  dd if="$WORK_DIR/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none
  rm -rf "$stage"
}

# build_pool_disk OUT SIZE_MIB : a partitioned empty disk for a ZFS pool (zpool create needs a
# partition when there is no udev to probe a whole disk).
build_pool_disk() {
  rm -f "$1"
  truncate -s "$2M" "$1"
  printf 'label: dos\nstart=2048, type=bf\n' | sfdisk -q "$1"
}

# build_source_disk OUT FILE... : an ext4 disk (no partition table) carrying image files for
# the image server to publish.
build_source_disk() {
  local out=$1 dir=$WORK_DIR/source
  shift
  rm -rf "$dir"
  mkdir -p "$dir"
  cp --sparse=always "$@" "$dir/"
  rm -f "$out"
  local mib
  mib=$(( $(du -sm "$dir" | cut -f1) * 2 + 256 ))
  mkfs.ext4 -q -F -L source -d "$dir" "$out" "${mib}M"
  rm -rf "$dir"
}
