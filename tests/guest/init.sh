#!/bin/busybox sh
# PID 1 of the user-mode-linux guest (tests/guest/uml.py boots it). The kernel mounted the host's
# root read-only over hostfs and passed IMAGED_GUEST_SHARE (a writable host directory, mounted at
# the same path here) and IMAGED_GUEST_MODULES (the kernel's module tree) in the environment.
# It makes a writable root, runs $IMAGED_GUEST_SHARE/run, writes its exit status beside it and
# powers off; given IMAGED_GUEST_INIT (systemd's path) it execs systemd instead, whose
# imaged-guest.service (tests/guest/systemd/) does the same. busybox runs it because nothing but
# the read-only root exists yet; every command is traced to the console, which the host shows
# when a guest gives no status.
set -eux
bb=/bin/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
trap '$bb sync; $bb poweroff -f' EXIT  # on any failure too: a guest never outlives its init

# The writable root: the host's root under an overlay whose upper layer is a tmpfs. devtmpfs,
# mounted by the kernel, is the only writable place for its scratch directory. Module
# autoloading cannot work yet (the kernel runs modprobe in init's root), so overlay is inserted.
scratch=/dev/.guest-root
$bb mkdir $scratch
$bb mount -t tmpfs -o mode=0755 tmpfs $scratch
$bb mkdir $scratch/upper $scratch/work $scratch/root
$bb insmod "$IMAGED_GUEST_MODULES/kernel/fs/overlayfs/overlay.ko"
$bb mount -t overlay overlay -o lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work \
  $scratch/root
# pivot_root, not chroot: the kernel's module autoloading runs modprobe in the root of the init
# task and kernel threads, which only pivot_root moves.
cd $scratch/root
$bb mkdir .old-root
$bb pivot_root . .old-root
cd /
$bb umount -l /.old-root
$bb rmdir /.old-root

$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
# The modules before /tmp is covered: the module tree may live under the host's /tmp.
version=$($bb uname -r)
$bb mkdir -p "/lib/modules/$version"
$bb mount --bind "$IMAGED_GUEST_MODULES" "/lib/modules/$version"
# The checkout too (a CI clone may live under /tmp): held aside, put back at its path below.
$bb mkdir -p /dev/.guest-tree
$bb mount --bind "$IMAGED_GUEST_TREE" /dev/.guest-tree
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
$bb mkdir -p "$IMAGED_GUEST_TREE"
$bb mount --move /dev/.guest-tree "$IMAGED_GUEST_TREE"
$bb mkdir -p /dev/shm /run
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$bb mount -t tmpfs -o mode=0755 tmpfs /run
$bb mkdir -p "$IMAGED_GUEST_SHARE"
$bb mount -t hostfs hostfs "$IMAGED_GUEST_SHARE" -o "$IMAGED_GUEST_SHARE"

# No udev: the links a shell expects, and the nodes whose first open loads their module
# (/dev/loop-control, /dev/mapper/control, /dev/fuse, ...) as listed in modules.devname.
$bb ln -s /proc/self/fd /dev/fd
$bb ln -s /proc/self/fd/0 /dev/stdin
$bb ln -s /proc/self/fd/1 /dev/stdout
$bb ln -s /proc/self/fd/2 /dev/stderr
kmod static-nodes --format=tmpfiles --output=/run/static-nodes
set +x  # the loop would fill the console's tail, which is what the host shows
while read -r type path mode _ _ _ dev; do
  case $type in
    d) $bb mkdir -p -m "$mode" "$path" ;;
    c!|b!) [ -e "$path" ] || $bb mknod -m "$mode" "$path" "${type%!}" "${dev%:*}" "${dev#*:}" ;;
  esac
done < /run/static-nodes
set -x

$bb ip link set lo up  # registries the tests start listen on 127.0.0.1
export IMAGED_GUEST=1  # tells tests they are in the guest
export DM_DISABLE_UDEV=1  # dmsetup makes its /dev/mapper nodes itself instead of waiting
cd /
if [ -n "${IMAGED_GUEST_INIT:-}" ]; then
  # systemd as PID 1 on the root made above, booting only imaged-guest.target: the run script
  # as a service (with the environment above), which powers the guest off when it ends.
  $bb mkdir -p /run/systemd/system
  $bb cp "$IMAGED_GUEST_TREE"/tests/guest/systemd/imaged-guest.* /run/systemd/system/
  $bb env | $bb grep -E '^(IMAGED_GUEST[A-Z_]*|DM_DISABLE_UDEV|HOME)=' > /run/imaged-guest.env
  trap - EXIT
  exec "$IMAGED_GUEST_INIT" systemd.unit=imaged-guest.target
fi
set +e
$bb sh "$IMAGED_GUEST_SHARE/run" > "$IMAGED_GUEST_SHARE/output" 2>&1 < /dev/null
echo $? > "$IMAGED_GUEST_SHARE/status"
