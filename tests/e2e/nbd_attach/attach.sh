# SPDX-License-Identifier: Apache-2.0
# Runs inside a qemu guest (tests/e2e/guest, --rdma-pair --feature nbd --package e2fsprogs):
# `uvd attach` hands a file-backed and an rdma-backed device to the kernel's nbd driver; an
# ext4 made on each, written, unmounted, detached and attached again keeps its content and
# fscks clean. The serving process outlives the shell that started it and its own root
# (emptied under it, as switch_root does), ignores the console's signals, and ends on
# `uvd detach` or SIGTERM. Errors (no driver, busy device, bad URI, mounted) are clear.
step() { echo "=== $*"; }
fail() { echo "FAIL: $*"; exit 1; }

# A process that has not finished (a zombie has: init reaps it when it gets to it).
alive() { [ -e /proc/$1/stat ] && ! grep -q ') [ZX] ' /proc/$1/stat; }

# The serving process of /dev/nbdN (the kernel names the thread running NBD_DO_IT).
server_pid() {
  t=$(cat /sys/block/$1/pid) || return 1
  sed -n 's/^Tgid:[[:space:]]*//p' /proc/$t/status
}

# attach URI DEV BYTES [auto]: attach on DEV (auto: let uvd take the first free one, which
# must be DEV), check the line it prints and the size the kernel shows.
attach() {
  if [ "${4:-}" = auto ]; then
    out=$(uvd attach "$1") || fail "uvd attach $1 failed"
  else
    out=$(uvd attach --nbd /dev/$2 "$1") || fail "uvd attach $1 failed"
  fi
  echo "$out"
  want="uvd attach: $1 on /dev/$2 ($3 bytes)"
  [ "$out" = "$want" ] || fail "attach printed '$out', not '$want'"
  [ "$(cat /sys/block/$2/size)" = $(($3 / 512)) ] || fail "/sys/block/$2/size is $(cat /sys/block/$2/size)"
}

detach() {
  pid=$(server_pid $1)
  uvd detach /dev/$1 || fail "uvd detach /dev/$1 failed"
  [ ! -e /sys/block/$1/pid ] || fail "/dev/$1 still attached after detach"
  ! alive $pid || fail "serving process $pid of /dev/$1 still runs after detach"
}

# fill_and_check URI DEV TAG: mkfs, write files of known content, detach, re-attach, check.
fill_and_check() {
  uri=$1 dev=$2 tag=$3 bytes=$4
  step "$tag: attach, mkfs.ext4, write"
  attach "$uri" $dev $bytes ${5:-}
  mkfs.ext4 -q -F -E nodiscard /dev/$dev
  mkdir -p /mnt/$tag
  mount -t ext4 /dev/$dev /mnt/$tag
  head -c 3000000 /dev/urandom > /mnt/$tag/random.bin
  mkdir /mnt/$tag/sub
  i=0
  while [ $i -lt 50 ]; do echo "$tag file $i" > /mnt/$tag/sub/f$i; i=$((i + 1)); done
  (cd /mnt/$tag && md5sum random.bin sub/f0 sub/f49) > /tmp/$tag.md5
  sync
  if uvd detach /dev/$dev 2> /tmp/err; then fail "$tag: detach of a mounted device succeeded"; fi
  grep -q "in use" /tmp/err || fail "$tag: no clear error for detaching a mounted device: $(cat /tmp/err)"
  umount /mnt/$tag
  step "$tag: detach, attach again, fsck, read back"
  detach $dev
  attach "$uri" $dev $bytes
  e2fsck -fn /dev/$dev || fail "$tag: e2fsck -fn found problems"
  mount -t ext4 -o ro /dev/$dev /mnt/$tag
  (cd /mnt/$tag && md5sum -c /tmp/$tag.md5) || fail "$tag: content changed across detach/attach"
  [ "$(cat /mnt/$tag/sub/f37)" = "$tag file 37" ] || fail "$tag: sub/f37 wrong"
  [ "$(ls /mnt/$tag/sub | wc -l)" = 50 ] || fail "$tag: files missing"
  umount /mnt/$tag
  detach $dev
}

step "errors are clear"
dd if=/dev/zero of=/tmp/f.img bs=1M count=0 seek=48 2>/dev/null
if rmmod nbd; then
  if uvd attach /tmp/f.img 2> /tmp/err; then fail "attach without the nbd driver succeeded"; fi
  cat /tmp/err; grep -q "modprobe nbd" /tmp/err || fail "no clear error without the nbd driver"
  modprobe nbd
  [ -e /sys/block/nbd0 ] || fail "modprobe nbd brought no /dev/nbd0"
else
  echo "SKIPPED: the no-driver error (nbd cannot be unloaded here)"
fi
if uvd attach /tmp/no-such.img 2> /tmp/err; then fail "attach of a missing file succeeded"; fi
cat /tmp/err; grep -q "cannot open file:///tmp/no-such.img" /tmp/err || fail "no clear open error"
[ ! -e /sys/block/nbd0/pid ] || fail "a failed attach left /dev/nbd0 attached"
if uvd detach /dev/nbd3 2> /tmp/err; then fail "detach of an idle device succeeded"; fi
grep -q "not attached" /tmp/err || fail "no clear detach error"

fill_and_check file:///tmp/f.img nbd0 file $((48 << 20)) auto

step "--foreground: serves until SIGINT, then disconnects"
uvd attach --foreground --nbd /dev/nbd0 -r /tmp/f.img > /tmp/fg.log 2>&1 &
fg=$!
n=0
until grep -q "on /dev/nbd0" /tmp/fg.log; do
  n=$((n + 1)); [ $n -lt 300 ] || { cat /tmp/fg.log; fail "foreground attach did not come up"; }
  sleep 0.1
done
[ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "-r did not make /dev/nbd0 read-only"
e2fsck -fn /dev/nbd0 > /dev/null || fail "e2fsck through the read-only attach"
kill -INT $fg
wait $fg || fail "foreground attach exited $? after SIGINT"
[ ! -e /sys/block/nbd0/pid ] || fail "/dev/nbd0 still attached after SIGINT to the foreground attach"

if ! uvd transports | grep -q '^rdma '; then
  # Loud: the rdma half is most of what this test is for.
  echo "SKIPPED: the rdma half (no uvd-transport-rdma.so plugin: build with libibverbs-dev and librdmacm-dev)"
  exit 0
fi
step "rdma: uvd serve on rxe_b, attach over rxe_a"
dd if=/dev/zero of=/tmp/d.img bs=1M count=0 seek=40 2>/dev/null
uvd serve --rdma $UVD_RDMA_PEER_ADDR:7471 --export d=/tmp/d.img > /tmp/serve.log 2>&1 &
serve=$!
n=0
until grep -q "serving export 'd'" /tmp/serve.log; do
  n=$((n + 1)); [ $n -lt 300 ] || { cat /tmp/serve.log; fail "uvd serve did not come up"; }
  kill -0 $serve 2>/dev/null || { cat /tmp/serve.log; fail "uvd serve died"; }
  sleep 0.1
done
fill_and_check rdma://$UVD_RDMA_PEER_ADDR:7471/d nbd1 rdma $((40 << 20))

step "the serving process outlives its shell, its root and the console's signals"
# As under switch_root: the rdma-backed one starts in a root (a chroot of bind mounts) that is
# emptied under it once it runs; from then on it reaches no path at all, not even its own
# binary, plugins, /dev, /proc or /sys. (LeakSanitizer's exit check reads /proc/self/maps,
# which such a process cannot: off for it.)
r=/tmp/oldroot
binds="usr dev sys proc etc"
for p in "$(command -v uvd)" $(echo "${UVD_PLUGIN_PATH:-}" | tr ':' ' '); do
  t=$(echo "$p" | cut -d/ -f2)  # where the build tree is
  case " $binds " in *" $t "*) ;; *) binds="$binds $t" ;; esac
done
mkdir -p $r/tmp
for d in $binds; do mkdir -p $r/$d; mount -o bind /$d $r/$d; done
for d in bin sbin lib lib64; do [ -e $r/$d ] || ln -s usr/$d $r/$d; done
ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" chroot $r sh -c \
  "uvd attach --connections 2 --nbd /dev/nbd2 rdma://$UVD_RDMA_PEER_ADDR:7471/d > /tmp/attach2.log 7> /tmp/fd7" ||
  fail "attach from a subshell in a chroot"
cat $r/tmp/attach2.log
pid=$(server_pid nbd2)
[ -n "$pid" ] || fail "no serving process for /dev/nbd2"
for fd in /proc/$pid/fd/*; do
  l=$(readlink $fd)
  case "$l" in
    /dev/*|$r/dev/*|socket:*|pipe:*|anon_inode:*) ;;
    *) fail "serving process holds $l open (fd $fd): it must keep no file of its caller or its root" ;;
  esac
done
for d in $binds; do umount -l $r/$d; done
rm -rf $r
root=$(readlink /proc/$pid/root)
echo "its root now: $root"
case "$root" in *deleted*) ;; *) fail "the serving process's root was not emptied: $root" ;; esac
if uvd attach --nbd /dev/nbd2 /tmp/f.img 2> /tmp/err; then fail "attach on a busy device succeeded"; fi
grep -q "busy" /tmp/err || fail "no clear busy error: $(cat /tmp/err)"
ppid=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$pid/status)
[ "$ppid" = 1 ] || fail "serving process $pid has parent $ppid, not init: it was not daemonized"
# setsid: the console's hangup and job-control signals do not reach it.
[ "$(cut -d' ' -f6 /proc/$pid/stat)" = "$pid" ] || fail "serving process $pid did not setsid"
[ "$(cat /proc/$pid/oom_score_adj)" = -1000 ] || fail "oom_score_adj is $(cat /proc/$pid/oom_score_adj)"
# PR_SET_IO_FLUSHER is PF_MEMALLOC_NOIO (0x80000 in Linux 6.1) on every thread: the ones
# serving the kernel's requests must have it, not only the one that asked.
for t in /proc/$pid/task/*; do
  flags=$(sed 's/.*) //' $t/stat | cut -d' ' -f7)
  [ $((flags & 0x80000)) != 0 ] || fail "thread $(basename $t) ($(cat $t/comm)) of $pid is no IO_FLUSHER"
done
echo "$(ls /proc/$pid/task | wc -l) threads, all IO_FLUSHER"
kill -HUP $pid; kill -INT $pid
sleep 1
alive $pid || fail "SIGHUP/SIGINT ended the serving process"
head -c 2097152 /dev/urandom > /tmp/w.bin
dd if=/tmp/w.bin of=/dev/nbd2 bs=1M seek=3 conv=fsync 2>/dev/null || fail "write to /dev/nbd2"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd2 of=/tmp/r.bin bs=1M skip=3 count=2 2>/dev/null || fail "/dev/nbd2 unreadable after SIGHUP/SIGINT"
cmp /tmp/w.bin /tmp/r.bin || fail "/dev/nbd2 read back other data"
mkfs.ext4 -q -F -E nodiscard /dev/nbd2
mount -t ext4 /dev/nbd2 /mnt/rdma
echo "written after the root was gone" > /mnt/rdma/late
umount /mnt/rdma
e2fsck -fn /dev/nbd2 > /dev/null || fail "e2fsck of /dev/nbd2 after its server lost its root"
step "SIGTERM disconnects and ends it"
kill -TERM $pid
n=0
while alive $pid; do n=$((n + 1)); [ $n -lt 300 ] || fail "SIGTERM did not end $pid"; sleep 0.1; done
[ ! -e /sys/block/nbd2/pid ] || fail "/dev/nbd2 still attached after SIGTERM"

kill $serve
wait $serve || true
step "all passed"
