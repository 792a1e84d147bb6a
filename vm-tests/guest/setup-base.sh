#!/bin/sh
# Runs inside the base root filesystem (chroot) while mmdebstrap builds it: the parts every
# test image shares. Keeps the image small: BIOS reads under TCG are slow.
set -eu

kver=$(ls /lib/modules)

# A small initramfs: only what a virtio guest needs to reach the host partition. gzip, which
# each image then stores uncompressed (setup-image.sh).
mkdir -p /etc/initramfs-tools/conf.d
printf 'MODULES=list\nCOMPRESS=gzip\n' > /etc/initramfs-tools/conf.d/upgradectl-test
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\nloop\n' > /etc/initramfs-tools/modules

# Drop kernel modules a virtio guest never loads (hundreds of MB), keep the ZFS ones.
cd "/lib/modules/$kver/kernel"
rm -rf sound drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet \
  drivers/infiniband drivers/staging drivers/bluetooth drivers/isdn drivers/iio \
  drivers/usb drivers/scsi drivers/hwmon drivers/input/touchscreen drivers/mtd \
  drivers/hid drivers/platform drivers/nfc drivers/thunderbolt net/wireless net/bluetooth \
  net/mac80211 fs/nls fs/ocfs2 fs/btrfs fs/xfs fs/nfs fs/nfsd fs/cifs fs/smb fs/ceph fs/gfs2
cd /
depmod -a "$kver"

# Network: DHCP on QEMU's user network.
mkdir -p /etc/systemd/network
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > /etc/systemd/network/10-dhcp.network
systemctl enable systemd-networkd.service
echo appliance > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 appliance\n' > /etc/hosts

# Root logs in with the test key only.
mkdir -p /root/.ssh
chmod 700 /root/.ssh
printf 'PermitRootLogin prohibit-password\nUseDNS no\n' > /etc/ssh/sshd_config.d/test.conf

# The root filesystem is mounted by the initramfs; nothing for fstab to do.
echo '# / is the image, loop-mounted by the initramfs; /host is the host partition' > /etc/fstab
mkdir -p /host

# Tell the test harness on the serial console when the box is up, and what it runs.
cat > /etc/systemd/system/upgradectl-test-marker.service <<'UNIT'
[Unit]
Description=Print a boot marker on the serial console for the VM tests
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target basic.target multi-user.target ssh.service systemd-networkd.service upgradectl-confirm.service
Wants=ssh.service
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "UPGRADECTL-TEST booted version=$(cat /etc/upgradectl/image-version) root=$(findmnt -n -o SOURCE /) confirm=$(systemctl show -p ActiveState --value upgradectl-confirm.service)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable upgradectl-test-marker.service

# ZFS: pools are imported from the cache file at boot; no ZED, no automatic mounting of
# datasets we never mount.
systemctl disable zfs-zed.service 2>/dev/null || true

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
