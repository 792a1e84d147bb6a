#!/bin/sh
# Runs inside an image's tree (chroot): installs upgradectl the way a user would (.deb), whose
# update-initramfs trigger puts our hooks in the initramfs (checked below), and makes the
# image's identity and its variant's change.
# Usage: setup-image.sh VERSION VARIANT   (VARIANT: good | update | broken)
set -eu
version=$1
variant=$2

dpkg -i /tmp/upgradectl.deb
rm -f /tmp/upgradectl.deb
# Nothing but the package's trigger rebuilt the initramfs: it must hold the boot code now.
for initrd in /boot/initrd.img-*; do
  if ! lsinitramfs "$initrd" | grep -qx 'scripts/local-bottom/upgradectl'; then
    echo "setup-image: $initrd lacks upgradectl's boot code after dpkg -i" >&2
    exit 1
  fi
done
# Delta-friendly, as docs/protocol.md advises image builders: the initramfs stored uncompressed.
# Every image rebuilds it; compressed, it is new bytes from end to end in every diff, while
# uncompressed nearly all of it is found in the base image by zstd-ref. (Bookworm's
# mkinitramfs has no COMPRESS=none: it falls back to gzip. The kernel takes a plain cpio.)
for initrd in /boot/initrd.img-*; do
  if gzip -t "$initrd" 2>/dev/null; then
    gzip -dc "$initrd" > "$initrd.cpio"
    mv "$initrd.cpio" "$initrd"
  fi
done
systemctl enable upgradectl-confirm.service upgradectl-trial-deadline.timer

mkdir -p /etc/upgradectl
echo "$version" > /etc/upgradectl/image-version
cp /usr/local/share/upgradectl-test/guest/upgradectl.toml /etc/upgradectl/upgradectl.toml
# The TUF root the image ships (provisioning puts it there): trust starts from it.
if [ -f /usr/local/share/upgradectl-test/root.json ]; then
  install -m 644 /usr/local/share/upgradectl-test/root.json /etc/upgradectl/root.json
  printf '\n[trust]\nroot = "/etc/upgradectl/root.json"\n' >> /etc/upgradectl/upgradectl.toml
fi

# The image server runs in the same guest, as the package ships it (upgradectl-serve.service:
# its own user, hardened), from the store the scenarios provision on the server pool (mounted
# at the unit's paths); this drop-in only names the zvol and the address, as operations.md
# tells an operator to, and waits for that store.
mkdir -p /etc/systemd/system/upgradectl-serve.service.d
cat > /etc/systemd/system/upgradectl-serve.service.d/vm-tests.conf <<'UNIT'
[Unit]
After=zfs-mount.service
ConditionPathExists=/var/lib/upgradectl-server/releases.json

[Service]
Environment="UPGRADECTL_SERVE_ARGS=--zvol srv/images/image --listen 127.0.0.1:8080 --repo-sync-seconds 2"
UNIT
systemctl enable upgradectl-serve.service

case "$variant" in
  good) ;;
  update)
    # A realistic small release: the appliance's own software changes, the rest stays.
    mkdir -p /opt/appliance
    echo "appliance software for image $version" > /opt/appliance/RELEASE
    head -c 2000000 /dev/urandom > /opt/appliance/payload.bin
    ;;
  update-bundle)
    # The same, plus 24.7 MB of bytes the base already has elsewhere (three copies of its
    # kernel, as an appliance bundles a rescue system): a stream longer than the 16 MiB the
    # upgrade scenario gives the box's decoder, while the zstd-ref diff stays small.
    mkdir -p /opt/appliance
    echo "appliance software for image $version" > /opt/appliance/RELEASE
    head -c 2000000 /dev/urandom > /opt/appliance/payload.bin
    cat /boot/vmlinuz-* /boot/vmlinuz-* /boot/vmlinuz-* > /opt/appliance/rescue.bin
    ;;
  big-update)
    # A release with a large new component: big enough to interrupt its download.
    mkdir -p /opt/appliance
    echo "appliance software for image $version" > /opt/appliance/RELEASE
    head -c 48000000 /dev/urandom > /opt/appliance/payload.bin
    ;;
  broken)
    # Its init fails: the kernel panics and panic=N reboots into GRUB's default. The marker
    # goes through the kernel's log: a write to the console tty can be lost in the panic (seen
    # on a loaded host: the marker never reached the serial log), printk is flushed by it.
    rm -f /sbin/init
    printf '#!/bin/sh\necho "UPGRADECTL-TEST broken init of image %s" >/dev/kmsg\nexit 1\n' "$version" > /sbin/init
    chmod 755 /sbin/init
    ;;
  *) echo "unknown variant $variant" >&2; exit 1 ;;
esac
