#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# /init of a uvd guest initramfs (busybox sh). Brings the machine up from
# /etc/uvd-guest/*, runs the caller's script, reports its exit status on the console
# and in /out/exit-status, and powers off. Any failure here powers off with a message;
# the host side then shows the console.
export PATH=/usr/sbin:/usr/bin
export HOME=/root
umask 022
. /etc/uvd-guest/commands.sh

say() { echo "uvd-guest: $*"; }
die() {
  say "SETUP FAILED: $*"
  echo "setup failed: $*" >/out/setup-error 2>/dev/null
  sync
  poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
[ -d /sys/kernel/config ] && mount -t configfs configfs /sys/kernel/config 2>/dev/null

. /etc/uvd-guest/guest.env
say "guest $UVD_GUEST_NAME ($(uname -r)) up after $(cut -d' ' -f1 /proc/uptime) s"
hostname "$UVD_GUEST_NAME"

while read -r m; do
  [ -n "$m" ] || continue
  insmod "$m" 2>/tmp/insmod.err || {
    grep -q 'File exists' /tmp/insmod.err || die "insmod $m: $(cat /tmp/insmod.err)"
  }
done </etc/uvd-guest/modules
[ -d /sys/kernel/config ] && ! grep -q ' /sys/kernel/config ' /proc/mounts &&
  mount -t configfs configfs /sys/kernel/config

if [ "${UVD_GUEST_OUT_SHARE:-0}" = 1 ]; then
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out || die "cannot mount the 9p result share"
fi
for s in $UVD_GUEST_SHARES; do  # tag:guest-path, read-only host folders
  mkdir -p "${s#*:}"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro "${s%%:*}" "${s#*:}" ||
    die "cannot mount share ${s%%:*} at ${s#*:}"
done

ip link set lo up
# NICs are matched by the MAC the host gave them, then named eth0, eth1... in that order.
i=0
for n in $UVD_GUEST_NICS; do  # mac=address/prefix
  mac=${n%%=*}
  addr=${n#*=}
  dev=
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address")" = "$mac" ] && dev=${d##*/}
  done
  [ -n "$dev" ] || die "no NIC with MAC $mac"
  [ "$dev" = "eth$i" ] || ip link set "$dev" name "eth$i" || die "rename $dev"
  ip addr add "$addr" dev "eth$i" || die "address $addr on eth$i"
  ip link set "eth$i" up || die "eth$i up"
  i=$((i + 1))
done

wait_rxe() {  # rxe device ACTIVE, or die after 20 s
  t=0
  until rdma link show "$1/1" 2>/dev/null | grep -q 'state ACTIVE'; do
    t=$((t + 1))
    [ $t -le 200 ] || die "$1 not ACTIVE: $(rdma link show 2>&1)"
    sleep 0.1
  done
}

if [ "${UVD_GUEST_RDMA:-0}" = 1 ]; then
  i=0
  for n in $UVD_GUEST_NICS; do
    rdma link add "rxe$i" type rxe netdev "eth$i" || die "rdma link add rxe$i on eth$i"
    i=$((i + 1))
  done
  if [ "${UVD_GUEST_RDMA_PAIR:-0}" = 1 ]; then
    # Two rxe devices in one guest, on the two ends of a veth pair. Between two local
    # addresses the kernel would route through lo, where no rxe device listens (and
    # Linux 6.1's rxe only listens in the initial network namespace, so a namespace
    # does not help): policy rules send locally generated packets for each address out
    # of the other end of the pair, and the local table, moved after them, still
    # delivers what arrives.
    a=$UVD_RDMA_ADDR b=$UVD_RDMA_PEER_ADDR
    ip link add veth0 type veth peer name veth1 || die "veth pair"
    ip addr add "$a/24" dev veth0 && ip addr add "$b/24" dev veth1 || die "veth addresses"
    ip link set veth0 up && ip link set veth1 up || die "veth up"
    for c in all default veth0 veth1; do
      echo 1 >/proc/sys/net/ipv4/conf/$c/accept_local
      echo 0 >/proc/sys/net/ipv4/conf/$c/rp_filter
    done
    ip rule add pref 10 iif lo to "$b" lookup 10 &&
      ip rule add pref 11 iif lo to "$a" lookup 11 &&
      ip rule add pref 100 lookup local &&
      ip rule del pref 0 &&
      ip route add "$b" dev veth0 src "$a" table 10 &&
      ip route add "$a" dev veth1 src "$b" table 11 || die "policy routing for the veth pair"
    rdma link add rxe_a type rxe netdev veth0 || die "rdma link add rxe_a"
    rdma link add rxe_b type rxe netdev veth1 || die "rdma link add rxe_b"
    wait_rxe rxe_a
    wait_rxe rxe_b
  fi
  i=0
  for n in $UVD_GUEST_NICS; do wait_rxe "rxe$i"; i=$((i + 1)); done
  say "rdma: $(rdma link show | tr '\n' ';')"
fi

[ -f /etc/uvd-guest/hosts ] && cat /etc/uvd-guest/hosts >>/etc/hosts
set -a
. /etc/uvd-guest/env
set +a
export UVD_GUEST_OUT=/out
say "running the script after $(cut -d' ' -f1 /proc/uptime) s"
cd /out
PATH=$(cat /etc/uvd-guest/path)
# -e and pipefail: a failing command anywhere fails the script (and so the test)
{ sh -ec 'set -o pipefail; . /etc/uvd-guest/commands.sh; . /etc/uvd-guest/script'; echo $? >/tmp/script-status; } 2>&1 |
  tee /out/script.log
rc=$(cat /tmp/script-status 2>/dev/null || echo 255)
echo "$rc" >/out/exit-status
if [ "$rc" = 0 ] && [ -s /etc/uvd-guest/switch-root ]; then
  # The script mounted a new root and asked to boot it ("NEWROOT [INIT]"): what it left
  # running stays (a process serving that root, say), and its init becomes PID 1. The
  # script may have moved /proc, /sys and /dev into NEWROOT already.
  read -r newroot newinit </etc/uvd-guest/switch-root
  newinit=${newinit:-/sbin/init}
  up=$(cut -d' ' -f1 /proc/uptime 2>/dev/null || cut -d' ' -f1 "$newroot/proc/uptime" 2>/dev/null)
  say "exit status 0 after $up s, switch_root to $newroot ($newinit)"
  sync
  cd /
  [ "${UVD_GUEST_OUT_SHARE:-0}" = 1 ] && umount /out
  exec switch_root "$newroot" "$newinit"
fi
# whatever the script left running goes now, so /out can be unmounted cleanly
kill -TERM -1 2>/dev/null
sleep 0.2
kill -KILL -1 2>/dev/null
sync
say "exit status $rc after $(cut -d' ' -f1 /proc/uptime) s"
cd /
[ "${UVD_GUEST_OUT_SHARE:-0}" = 1 ] && umount /out
poweroff -f
