# SPDX-License-Identifier: Apache-2.0
# Runs in the nested-Xen dom0 (xenguest.py prologue done; $UVD_BIN is our uvd binary).
# The kernel pings across our netif ends on real Xen, domain 0 talking to itself:
#   ping in namespace n0 -> TAP uvd0 -> `uvd veth` (our netfront, vif 0/0) -> tx grant ring
#   -> `uvd xen-back --hv xen` (vif back end, a port of the netback switch) -> switch
#   -> rx grant ring of vif 0/1 -> `uvd veth` (netfront) -> TAP uvd1 in namespace n1.
# Every step that fails ends the script (sh -e) with a line saying which.
set -eu

say() { echo "netif: $*"; }
fail() { echo "netif: FAILED: $*"; for f in xen-back.log veth0.log veth1.log; do echo "--- $f"; cat $f || true; done; exit 1; }
# wait_for SECONDS COMMAND...: retries every 0.1 s
wait_for() {
  t=$(($1 * 10)); shift
  until "$@" >/dev/null 2>&1; do t=$((t - 1)); [ $t -gt 0 ] || return 1; sleep 0.1; done
}
state_is() { [ "$(xenstore-read "$1/state" 2>/dev/null)" = "$2" ]; }

test -c /dev/net/tun || insmod "$XEN_MODULES/tun.ko" || fail "cannot load tun"
[ -c /dev/net/tun ] || { mkdir -p /dev/net; mknod /dev/net/tun c 10 200; }

"$UVD_BIN" xen-back --hv xen --vif 0/0 --vif 0/1 > xen-back.log 2>&1 &
back=$!
B=/local/domain/0/backend/vif/0
wait_for 30 state_is $B/0 2 || fail "vif 0/0: back end never reached InitWait"
wait_for 30 state_is $B/1 2 || fail "vif 0/1: back end never reached InitWait"

pids=""
for i in 0 1; do
  ip netns add n$i
  ip -n n$i link set lo up
  # --offload 0: plain frames with whole checksums (netfront_interop.sh runs with offloads)
  # sh -c 'exec': $(cat veth$i.pid) is uvd itself, not a shell between it and this one
  ip netns exec n$i sh -c "echo \$\$ > veth$i.pid; exec \"$UVD_BIN\" veth --switch 'xen://0/$i?hv=xen' \
    --host tap:uvd$i --offload 0" > veth$i.log 2>&1 &
  pids="$pids $!"
done
for i in 0 1; do
  wait_for 30 ip -n n$i link show uvd$i || fail "no TAP uvd$i in n$i"
  ip -n n$i addr add 10.77.0.$((i + 1))/24 dev uvd$i
  ip -n n$i link set uvd$i up
  wait_for 30 state_is $B/$i 4 || fail "vif 0/$i: back end not Connected"
done
xenstore-ls -f /local/domain/0/device/vif > frontend.txt
xenstore-ls -f $B > backend.txt
say "both vifs Connected; pinging 10.77.0.2 from n0"
# The first echo may wait for ARP and the switch to learn both MACs.
ip netns exec n0 ping -c 5 -W 10 10.77.0.2 > ping.txt 2>&1 || { cat ping.txt; fail "ping n0 -> n1"; }
cat ping.txt
# Full-size frames the other way.
ip netns exec n1 ping -c 3 -s 1400 -W 10 10.77.0.1 > ping-large.txt 2>&1 || { cat ping-large.txt; fail "ping n1 -> n0 (1400 bytes)"; }
cat ping-large.txt
# SIGTERM: each uvd veth detaches cleanly and prints its counters.
for i in 0 1; do kill -TERM "$(cat veth$i.pid)"; done
for p in $pids; do wait $p || fail "uvd veth (job $p) exited $?"; done
for i in 0 1; do
  grep -q "^switch side:" veth$i.log || fail "uvd veth $i printed no counters"
  cat veth$i.log
done
kill -TERM $back
wait $back || fail "uvd xen-back did not stop cleanly"
cat xen-back.log
echo pass > ping.result
