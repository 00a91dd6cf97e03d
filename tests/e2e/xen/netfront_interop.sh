# SPDX-License-Identifier: Apache-2.0
# Runs in the nested-Xen dom0 (xenguest.py prologue done; $UVD_BIN is our uvd binary).
# Linux's own xen-netfront as the peer of our vif back end, through real grants, event
# channels and xenstore, domain 0 talking to itself:
#   namespace n0: Linux xen-netfront (vif 0/0) -> tx/rx grant rings
#   -> `uvd xen-back --hv xen` (vif back end, ports of the netback switch)
#   -> vif 0/1 -> Linux xen-netfront in namespace n1.
# Both vifs are Linux's: Linux's xenbus binds xen-netfront to every vif of the domain
# still Initialising when the module loads, and waits (up to 300 s) for each to connect,
# so a vif of our own user-space netfront cannot share the domain with it.
# Linux netfront uses checksum offload and GSO (csum_blank, GSO extra-info slots) both
# ways. Pings, then a 4 MiB TCP transfer each way (busybox nc), compared by checksum.
# Every step that fails ends the script (sh -e) with a line saying which.
set -eu
: > steps.txt

say() { echo "netfront: $*"; echo "$*" >> steps.txt; }
fail() {
  echo "netfront: FAILED: $*"
  # The switch prints its per-port counters when it stops.
  [ -z "${back:-}" ] || { kill -TERM $back; wait $back || true; }
  echo "--- xen-back.log"; cat xen-back.log || true
  for i in 0 1; do
    ip netns exec n$i sh -c "ip -s -s link; grep -h . /sys/class/net/xn$i/statistics/*errors*; cat /proc/net/snmp" \
      2>/dev/null || true
  done
  dmesg | tail -30
  exit 1
}
# wait_for SECONDS COMMAND...: retries every 0.1 s
wait_for() {
  t=$(($1 * 10)); shift
  until "$@" >/dev/null 2>&1; do t=$((t - 1)); [ $t -gt 0 ] || return 1; sleep 0.1; done
}
state_is() { [ "$(xenstore-read "$1/state" 2>/dev/null)" = "$2" ]; }
# The interface with a given MAC, in this namespace.
iface_with_mac() {
  for d in /sys/class/net/*; do
    [ "$(cat $d/address 2>/dev/null)" = "$1" ] && { basename $d; return 0; }
  done
  return 1
}

# A step that hangs (a driver waiting on xenstore) still leaves evidence behind.
( sleep 200; dmesg > dmesg-200s.txt; xenstore-ls -f /local/domain/0 > xenstore-200s.txt ) > /dev/null 2>&1 &
watchdog=$!

# The toolstack's part: two vifs with fixed MACs (Linux netfront reads them from xenstore).
"$UVD_BIN" xen-back --hv xen --vif 0/0=02:16:3e:00:00:0a --vif 0/1=02:16:3e:00:00:0b > xen-back.log 2>&1 &
back=$!
B=/local/domain/0/backend/vif/0
wait_for 30 state_is $B/0 2 || fail "vif 0/0: back end never reached InitWait"
wait_for 30 state_is $B/1 2 || fail "vif 0/1: back end never reached InitWait"

say "loading xen-netfront"
insmod "$XEN_MODULES/xen-netfront.ko" || fail "cannot load xen-netfront"
for i in 0 1; do
  mac=02:16:3e:00:00:0$(printf %x $((10 + i)))
  wait_for 30 state_is $B/$i 4 || { xenstore-ls -f /local/domain/0/device/vif || true; fail "vif 0/$i: back end not Connected to Linux netfront"; }
  wait_for 30 iface_with_mac $mac || fail "no netfront interface with $mac"
  IF=$(iface_with_mac $mac)
  say "vif 0/$i is Linux interface $IF ($mac)"
  ip netns add n$i
  ip link set "$IF" netns n$i
  ip -n n$i link set lo up
  ip -n n$i link set "$IF" name xn$i
  ip -n n$i addr add 10.77.0.$((i + 1))/24 dev xn$i
  ip -n n$i link set xn$i up
done
xenstore-ls -f /local/domain/0/device/vif > frontend.txt
xenstore-ls -f $B > backend.txt

ip netns exec n0 ping -c 5 -W 10 10.77.0.2 > ping.txt 2>&1 || { cat ping.txt; fail "ping n0 -> n1"; }
cat ping.txt
# A fourth echo keeps busybox ping waiting for the third reply: after its last echo it
# waits only max(2 x the slowest RTT, 1 s), and TCG stalls a second now and then.
ip netns exec n1 ping -c 4 -s 1400 -W 10 10.77.0.1 > ping-large.txt 2>&1 || { cat ping-large.txt; fail "ping n1 -> n0 (1400 bytes)"; }
cat ping-large.txt

# TCP both ways: each kernel hands its netfront large segments with partial checksums.
dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null
want=$(md5sum < /tmp/blob)
# busybox nc half-closes when its stdin ends, and the sender then stops: the
# listener reads a fifo this shell holds open, so its stdin never ends.
mkfifo /tmp/hold
exec 3<>/tmp/hold
for dir in "0 1 5001" "1 0 5002"; do
  set -- $dir
  ip netns exec n$2 timeout 60 nc -l -p $3 < /tmp/hold > /tmp/got &
  l=$!
  sleep 1
  ip netns exec n$1 timeout 60 nc -w 5 10.77.0.$(($2 + 1)) $3 < /tmp/blob || fail "nc n$1 -> n$2"
  wait $l || true
  [ "$(md5sum < /tmp/got)" = "$want" ] || fail "4 MiB n$1 -> n$2 arrived changed ($(wc -c < /tmp/got) bytes)"
  say "4 MiB n$1 -> n$2 intact"
done
for i in 0 1; do ip -n n$i -s link show xn$i; done > netfront-stats.txt

kill -TERM $back
wait $back || fail "uvd xen-back did not stop cleanly"
cat xen-back.log
kill $watchdog 2>/dev/null || true
exec 3>&-
echo pass > netfront.result
