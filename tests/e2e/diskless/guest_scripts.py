# SPDX-License-Identifier: Apache-2.0
"""Shell run by /init of each machine of the diskless scenario (busybox sh -e, in /out).
Every machine gets the same script and branches on $DISKLESS_ROLE:

  server   holds the shared base (/out/root.img) and the overlay folder (/out/overlays) on its
           9p result share, so the host checks them afterwards; runs `uvd serve` on rxe0 (and,
           with DISKLESS_MP=1, a second `uvd serve` on rxe1, and kills the first one once the
           client has worked on it for DISKLESS_KILL_AFTER seconds).
  client   diskless: attaches $DISKLESS_URI to /dev/nbd0 with `uvd attach`, mounts it, moves
           /dev /proc /sys over and asks /init to switch_root into it.
  disk     the same client booting the same image from a local virtio disk (/dev/vda).
"""

SCRIPT = r'''
say() { echo "uvd-diskless: $*"; }
newroot() {  # $1: the root device, mounted read-write and booted
  mkdir -p /newroot
  mount -t ext4 "$1" /newroot
  # Bound, not moved: the process serving the root keeps the initramfs as its root after
  # switch_root, and must still find /dev/infiniband/rdma_cm and /sys/class/infiniband_verbs
  # there when it reconnects a path.
  for d in dev proc sys; do mount --rbind /$d /newroot/$d; done
  echo "/newroot /sbin/init" >/etc/uvd-guest/switch-root
}

case $DISKLESS_ROLE in
server)
  mkdir -p /out/overlays
  serve() {  # $1 listen address, $2 log file; the pid goes to $2.pid
    uvd serve --rdma "$1:7171" --root root=/out/root.img --overlay-dir /out/overlays \
      </dev/null >"$2" 2>&1 &
    echo $! >"$2.pid"
  }
  serve "$UVD_GUEST_ADDR" /out/serve1.log
  say "server: uvd serve on $UVD_GUEST_ADDR:7171 (pid $(cat /out/serve1.log.pid))"
  # what an operator sees while the clients run: every overlay and the paths it is attached over
  (
    n=0
    while [ $n -lt 600 ]; do
      uvd overlay list /out/overlays >/tmp/list 2>&1 || true
      awk 'NR > 1 && $NF != "-"' /tmp/list | grep -q . && { cp /tmp/list /out/overlay-list.txt; break; }
      n=$((n + 1))
      sleep 1
    done
  ) &
  if [ "${DISKLESS_MP:-0}" = 1 ]; then
    a2=$(ip -4 -o addr show dev eth1 | awk '{ split($4, a, "/"); print a[1] }')
    serve "$a2" /out/serve2.log
    say "server: second uvd serve on $a2:7171 (pid $(cat /out/serve2.log.pid)) over rxe1"
    # the victim is the path the failover policy uses: the first one
    t=0
    until grep -q "opened export 'root/" /out/serve1.log; do
      t=$((t + 1))
      [ $t -le 1200 ] || { say "server: no client opened an export on path 1"; exit 1; }
      sleep 0.5
    done
    say "server: a client opened its root on path 1; killing that server in ${DISKLESS_KILL_AFTER:-20} s"
    sleep "${DISKLESS_KILL_AFTER:-20}"
    uvd overlay list /out/overlays >/out/overlay-list-before-kill.txt 2>&1 || true
    kill -KILL "$(cat /out/serve1.log.pid)"
    say "server: killed uvd serve on path 1 (SIGKILL) at $(cut -d' ' -f1 /proc/uptime) s"
    echo killed >/out/path1-killed
    sleep 5
    uvd overlay list /out/overlays >/out/overlay-list-after-kill.txt 2>&1 || true
  fi
  wait
  ;;
client)
  # the server boots at the same time: retry until its listener is there
  t=0
  while :; do
    t=$((t + 1))
    say "$UVD_GUEST_NAME: attach attempt $t at $(cut -d' ' -f1 /proc/uptime) s"
    uvd attach --nbd /dev/nbd0 "$DISKLESS_URI" </dev/null >/dev/console 2>&1 && break
    [ $t -lt 240 ] || { say "$UVD_GUEST_NAME: uvd attach kept failing"; exit 1; }
    sleep 0.5
  done
  say "$UVD_GUEST_NAME: $DISKLESS_URI on /dev/nbd0 ($(cat /sys/block/nbd0/size) sectors) at $(cut -d' ' -f1 /proc/uptime) s"
  newroot /dev/nbd0
  ;;
disk)
  newroot /dev/vda
  ;;
*)
  say "unknown DISKLESS_ROLE '$DISKLESS_ROLE'"
  exit 1
  ;;
esac
'''
