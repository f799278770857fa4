#!/bin/busybox sh
# /init of Polydev's initramfs: load the virtio modules, mount the root disk, hand over to init= on it.
# Replaces Debian's initramfs-tools image, whose udev cold-plug costs seconds on an emulated CPU; the VM's
# hardware is known (virtio-pci disk and NIC), so a fixed module list is all it needs.
bb=/bin/busybox
$bb mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
for m in $($bb cat /modules.order); do
    $bb insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed"
done
init=/sbin/init
for word in $($bb cat /proc/cmdline); do
    case "$word" in init=*) init="${word#init=}" ;; esac
done
# The virtio-blk probe finishes asynchronously after insmod: wait for the device node, bounded (10 s).
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 10000 ]; do
    tries=$((tries + 1))
    $bb usleep 1000
done
if ! $bb mount -t ext4 -o rw /dev/vda /newroot; then
    echo "initramfs: cannot mount /dev/vda; the VM stops"
    exit 1
fi
for fs in dev proc sys; do
    $bb mount --move "/$fs" "/newroot/$fs"
done
exec $bb switch_root /newroot "$init"
