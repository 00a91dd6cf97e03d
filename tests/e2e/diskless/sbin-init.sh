#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# /sbin/init of the shared diskless root (busybox sh, PID 1 after switch_root). Says on the
# console that it got here and how, reports what this client's previous boots left, writes
# this client's own files, optionally runs a verified write workload, and powers off cleanly.
# Every line meant for the host starts with "uvd-diskless: "; the host parses them.
export PATH=/usr/sbin:/usr/bin
umask 022
me=unknown
say() { echo "uvd-diskless: $*" >/dev/console 2>/dev/null || echo "uvd-diskless: $*"; }
fail() {
  say "$me FAILED: $*"
  sync
  poweroff -f
  exit 1  # PID 1 exiting panics, which ends the machine too (panic=-1, -no-reboot)
}

# After switch_root these are already mounted (moved over from the initramfs).
grep -q '^proc /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc || fail "mount /proc"
grep -q ' /sys sysfs ' /proc/mounts || mount -t sysfs sysfs /sys || fail "mount /sys"
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
grep -q ' /tmp ' /proc/mounts || mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"
exec </dev/null >/dev/console 2>&1

up=$(cut -d' ' -f1 /proc/uptime)
me=$(hostname)
arg() {  # uvd.NAME=VALUE from the kernel command line
  for w in $(cat /proc/cmdline); do
    case $w in uvd."$1"=*) echo "${w#*=}"; return ;; esac
  done
}
transport=$(arg transport)
writes=$(arg writes)
dev=$(awk '$2 == "/" && $1 != "rootfs" { d = $1 } END { print d }' /proc/mounts)
blk=${dev#/dev/}
# sectors read: the third field of the block device's stat (512-byte units whatever the device)
read_bytes=$(( $(awk '{ print $3 }' "/sys/block/$blk/stat" 2>/dev/null || echo 0) * 512 ))
case $blk in nbd*) from="the server" ;; *) from="its disk" ;; esac
say "$me reached /sbin/init at $up s, root $dev over ${transport:-unknown}, read $read_bytes bytes from $from"
grep -q " / ext4 rw" /proc/mounts || fail "the root is not mounted read-write: $(grep ' / ' /proc/mounts)"

state=/var/lib/uvd-diskless
mkdir -p "$state"
boot=1
if [ -f "$state/$me.boots" ]; then
  last=$(tail -n 1 "$state/$me.boots")
  boot=$(( $(wc -l <"$state/$me.boots") + 1 ))
  # the marker of the previous boot must read back as it was written
  want=$(echo "$last" | sed -n 's/.*marker_sha256=\([0-9a-f]*\).*/\1/p')
  have=$(sha256sum "$state/$me.marker" 2>/dev/null | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$have" ] || fail "previous marker does not match its record ($want vs ${have:-missing})"
  say "$me previous boot found: $last; hostname file says $(cat /etc/hostname)"
else
  say "$me first boot: no previous files (hostname file says $(cat /etc/hostname))"
fi
for f in "$state"/*.marker "$state"/*.boots; do  # another client's files must never show up here
  [ -e "$f" ] || continue
  case ${f##*/} in "$me".*) ;; *) fail "sees another client's file $f" ;; esac
done

echo "$me" >/etc/hostname
head -c 4096 /dev/urandom >"$state/$me.marker"
sum=$(sha256sum "$state/$me.marker" | cut -d' ' -f1)
echo "boot=$boot uptime=$up root=$dev transport=${transport:-unknown} marker_sha256=$sum" >>"$state/$me.boots"
sync
say "$me boot $boot wrote /etc/hostname and $state/$me.marker (sha256 $sum)"

if [ -n "$writes" ] && [ "$writes" -gt 0 ]; then
  # Write, fsync, drop the page cache and read back, for $writes seconds: each file is
  # recorded only after it read back right, so every recorded file must survive.
  log="$state/$me.workload"
  : >"$log"
  end=$(( $(cut -d. -f1 /proc/uptime) + writes ))
  i=0
  while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    i=$((i + 1))
    f="$state/w-$me-$i"
    head -c 65536 /dev/urandom >/tmp/w
    dd if=/tmp/w of="$f" bs=65536 conv=fsync 2>/dev/null || fail "write $i: dd"
    s=$(sha256sum </tmp/w | cut -d' ' -f1)
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(sha256sum <"$f" | cut -d' ' -f1)" = "$s" ] || fail "write $i did not read back"
    echo "w-$me-$i $s" >>"$log"
    sync "$log" 2>/dev/null || sync
    [ $((i % 10)) -eq 0 ] && say "$me workload: $i writes verified"
  done
  sync
  say "$me workload: $i writes of 64 KiB in $writes s, each fsynced and read back"
fi

sync
mount -o remount,ro / || fail "remount / read-only"
say "$me done after $(cut -d' ' -f1 /proc/uptime) s, root read-only, powering off"
poweroff -f
