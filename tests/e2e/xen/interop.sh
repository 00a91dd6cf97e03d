# SPDX-License-Identifier: Apache-2.0
# Runs in the nested-Xen dom0 (xenguest.py prologue done; $UVD_BIN is our uvd binary).
# Linux's own blkif drivers as the peer of ours, through real grants, event channels and
# xenstore, domain 0 talking to itself:
#   A. Linux xen-blkfront <- our back end (uvd xen-back --hv xen) serving a file:
#      mke2fs/e2fsck on /dev/xvda, a pattern written with dd, then the backing file checked.
#   B. our front end (xen://0/VDEV?hv=xen, exported over NBD by uvd serve) -> Linux
#      xen-blkback on a loop device, xenstore keys written by hand as the toolstack does:
#      a populated ext4 image copied in with nbdcopy, read back, e2fsck and debugfs on
#      the loop device that blkback served.
# Every step that fails ends the script (sh -e) with a line saying which.
set -eu

say() { echo "interop: $*"; }
fail() { echo "interop: FAILED: $*"; exit 1; }
# wait_for SECONDS COMMAND...: retries every 0.1 s
wait_for() {
  t=$(($1 * 10)); shift
  until "$@" >/dev/null 2>&1; do t=$((t - 1)); [ $t -gt 0 ] || return 1; sleep 0.1; done
}
state_is() { [ "$(xenstore-read "$1/state" 2>/dev/null)" = "$2" ]; }

mkdir -p /tmp/content
dd if=/dev/urandom of=/tmp/content/random.bin bs=1k count=3000 2>/dev/null
echo "written through a Xen block ring" > /tmp/content/hello.txt
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null

# ---------------------------------------------------------------- A: Linux blkfront
say "A: our back end serving Linux xen-blkfront"
truncate -s 64M /tmp/a.img
# XEN_BACK_INDIRECT: segments per indirect request our back end offers (0: none).
"$UVD_BIN" xen-back --hv xen --max-indirect-segments "${XEN_BACK_INDIRECT:-256}" \
  --disk 0/51712=/tmp/a.img > xen-back.log 2>&1 &
back=$!
BA=/local/domain/0/backend/vbd/0/51712
wait_for 30 state_is $BA 2 || { cat xen-back.log; fail "A: our back end never reached InitWait"; }
insmod "$XEN_MODULES/xen-blkfront.ko"
wait_for 30 test -b /dev/xvda || { xenstore-ls -f /local/domain/0 || true; dmesg | tail -20; fail "A: no /dev/xvda"; }
wait_for 30 state_is $BA 4 || fail "A: back end not Connected"
say "A: /dev/xvda is $(cat /sys/block/xvda/size) sectors; $(dmesg | grep 'blkfront: xvda' | tail -1)"
xenstore-ls -f /local/domain/0/device/vbd/51712 > a-frontend.txt
xenstore-ls -f $BA > a-backend.txt
mke2fs -q -F -t ext4 -d /tmp/content -L xenblk /dev/xvda 48M || { dmesg | tail; fail "A: mke2fs through blkfront"; }
e2fsck -fn /dev/xvda > a-fsck-xvda.txt 2>&1 || { cat a-fsck-xvda.txt; fail "A: e2fsck through blkfront"; }
timeout 120 dd if=/tmp/pattern of=/dev/xvda bs=1M seek=52 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
timeout 60 blockdev --flushbufs /dev/xvda
timeout 120 dd if=/dev/xvda of=/tmp/a-back bs=1M skip=52 count=8 2>/dev/null
cmp /tmp/pattern /tmp/a-back || fail "A: pattern read back through blkfront differs"
# Detach as a toolstack would: the back end closes, blkfront lets go of the disk.
kill -TERM $back
wait $back || { cat xen-back.log; fail "A: uvd xen-back did not stop cleanly"; }
cat xen-back.log
wait_for 10 sh -c '! test -b /dev/xvda' || say "A: /dev/xvda still present after the back end closed"
rmmod xen_blkfront || rmmod xen-blkfront || say "A: xen-blkfront stays loaded"
# What Linux wrote went through our back end into the file.
e2fsck -fn /tmp/a.img > a-fsck-file.txt 2>&1 || { cat a-fsck-file.txt; fail "A: backing file not a clean ext4"; }
debugfs -R "dump /random.bin /tmp/a-random" /tmp/a.img 2>/dev/null
cmp /tmp/content/random.bin /tmp/a-random || fail "A: file in the filesystem differs"
dd if=/tmp/a.img of=/tmp/a-file bs=1M skip=52 count=8 2>/dev/null
cmp /tmp/pattern /tmp/a-file || fail "A: pattern in the backing file differs"
say "A: PASS (ext4 made and checked through Linux xen-blkfront; backing file clean and matching)"
echo pass > a.result

# ---------------------------------------------------------------- B: Linux blkback
say "B: our front end driving Linux xen-blkback"
truncate -s 64M /tmp/b.img
losetup /dev/loop0 /tmp/b.img
insmod "$XEN_MODULES/xen-blkback.ko"
BB=/local/domain/0/backend/vbd/0/51728
FB=/local/domain/0/device/vbd/51728
# What libxl writes for a phy disk (the hotplug script's physical-device included).
xenstore-write $BB/frontend $FB $BB/frontend-id 0 $BB/online 1 $BB/removable 0 $BB/bootable 1 \
  $BB/state 1 $BB/dev xvdb $BB/type phy $BB/mode w $BB/device-type disk $BB/params /dev/loop0 \
  $BB/discard-enable 1
xenstore-write $FB/backend $BB $FB/backend-id 0 $FB/state 1 $FB/virtual-device 51728 $FB/device-type disk
xenstore-write $BB/physical-device 7:0
wait_for 30 state_is $BB 2 || { xenstore-ls -f $BB || true; dmesg | tail; fail "B: xen-blkback never reached InitWait"; }
mke2fs -q -F -t ext4 -d /tmp/content -L blkback /tmp/fs.img 48M
"$UVD_BIN" serve --unix /tmp/nbd.sock --export "xvdb=xen://0/51728?hv=xen" > serve.log 2>&1 &
srv=$!
wait_for 30 test -S /tmp/nbd.sock || { cat serve.log; fail "B: uvd serve did not listen"; }
nbdcopy /tmp/fs.img "nbd+unix:///xvdb?socket=/tmp/nbd.sock" || { cat serve.log; fail "B: nbdcopy into the device"; }
state_is $BB 4 || fail "B: xen-blkback not Connected"
say "B: $(dmesg | grep 'xen-blkback: backend/vbd/0/51728' | tail -1)"
xenstore-ls -f $FB > b-frontend.txt
xenstore-ls -f $BB > b-backend.txt
nbdcopy "nbd+unix:///xvdb?socket=/tmp/nbd.sock" /tmp/b-read
head -c $((48 << 20)) /tmp/b-read | cmp - /tmp/fs.img || fail "B: read back through our front end differs"
kill -TERM $srv
wait $srv || { cat serve.log; fail "B: uvd serve did not stop cleanly"; }
wait_for 10 state_is $FB 6 || say "B: front end state $(xenstore-read $FB/state) after close"
# What our front end wrote went through Linux's blkback onto the loop device.
e2fsck -fn /dev/loop0 > b-fsck-loop.txt 2>&1 || { cat b-fsck-loop.txt; fail "B: loop device not a clean ext4"; }
debugfs -R "dump /random.bin /tmp/b-random" /dev/loop0 2>/dev/null
cmp /tmp/content/random.bin /tmp/b-random || fail "B: file in the filesystem differs"
debugfs -R "cat /hello.txt" /dev/loop0 2>/dev/null > b-hello.txt
say "B: PASS (ext4 image written through our front end into Linux xen-blkback, clean on the loop device)"
echo pass > b.result
