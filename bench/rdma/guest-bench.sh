# SPDX-License-Identifier: Apache-2.0
# Runs inside a Soft-RoCE guest of bench/rdma/rdma-bench (tests/e2e/guest, --rdma-pair):
# one `uvd serve` exports one image over RDMA (rxe_b's address) and NBD over TCP (the same
# address); the client side reaches both from rxe_a's address across the veth pair. For each
# figure the RDMA client (rdma_bench, a Vstore on rdma://) and the NBD client (fio, nbd
# engine) run back to back, ROUNDS times. Then the multipath failover outage: mp_failover with
# two servers, SIGKILL and SIGSTOP. Results: JSON and text files in /out, read by rdma-bench.
# Environment: RUNTIME (s per job), ROUNDS, SIZE_MIB, CHECK (check_interval = io_timeout), MTU,
# MP_RUNS (failover runs per fault), RDMA_OPTS (URI options of the RDMA client, "busy_poll_us=0"),
# BASE_PLUGINS (a folder with another build of the rdma plugin: a second server on port 7473
# runs it, and its client is measured in the same rounds, interleaved, as "base"; it gets no
# RDMA_OPTS), RDMA_OPTS_ALT (a second set of URI options, measured as "alt"), ALT_SERVE_ARGS
# (the "alt" client talks to a second server, port 7475, started with these extra arguments).
A=$UVD_RDMA_PEER_ADDR
B=$UVD_RDMA_ADDR
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-2}
SIZE_MIB=${SIZE_MIB:-128}
CHECK=${CHECK:-250ms}
MTU=${MTU:-1500}
# RoCE runs with jumbo frames where it can: rxe's path MTU follows the netdev's (1024 at
# 1500, 4096 at 9000). TCP gets the same MTU on the same veth pair.
if [ "$MTU" != 1500 ]; then
  ip link set veth0 mtu "$MTU"
  ip link set veth1 mtu "$MTU"
  sleep 1
fi
ip link show veth0 > /out/links.txt
ibv_devinfo -v >> /out/links.txt 2>&1 || true
grep -B1 -A5 '^name *: crc32$' /proc/crypto > /out/crc32.txt || true
img=/tmp/bench.img
truncate -s "${SIZE_MIB}M" $img
size=$((SIZE_MIB * 1024 * 1024))

q=${RDMA_OPTS:+?$RDMA_OPTS}
wait_up() {  # uri: the server answers over RDMA
  for i in $(seq 1 60); do
    if rdma_bench --uri "$1" --probe 2>/out/probe.log; then return 0; fi
    sleep 0.5
  done
  echo "server does not answer over RDMA"; cat /out/serve*.log /out/probe.log; exit 1
}
uvd serve --rdma $A:7471 --tcp $A:10809 --export img=$img > /out/serve.log 2>&1 &
srv=$!
wait_up rdma://$A:7471/img
alt_port=7471
alt_srv=
if [ -n "${ALT_SERVE_ARGS:-}" ]; then
  alt_port=7475
  uvd serve --rdma $A:7475 --export img=$img $ALT_SERVE_ARGS > /out/serve-alt.log 2>&1 &
  alt_srv=$!
  wait_up rdma://$A:7475/img
fi
base_srv=
if [ -n "${BASE_PLUGINS:-}" ]; then
  UVD_PLUGIN_PATH=$BASE_PLUGINS uvd serve --rdma $A:7473 --export img=$img > /out/serve-base.log 2>&1 &
  base_srv=$!
  UVD_PLUGIN_PATH=$BASE_PLUGINS wait_up rdma://$A:7473/img
fi

# name rw bs qd (bs as fio writes it; rdma_bench gets bytes)
jobs="write1m:write:1m:8 read1m:read:1m:8 randread4k-qd1:randread:4k:1 randread4k-qd32:randread:4k:32"
for r in $(seq 1 "$ROUNDS"); do
  for j in $jobs; do
    IFS=: read name rw bs qd <<EOF
$j
EOF
    bytes=4096; [ "$bs" = 1m ] && bytes=1048576
    echo "round $r: $name over RDMA"
    rdma_bench --uri "rdma://$A:7471/img$q" --rw $rw --bs $bytes --qd $qd --seconds "$RUNTIME" --size $size \
      --json /out/rdma-$name-$r.json
    if [ -n "${RDMA_OPTS_ALT:-}${ALT_SERVE_ARGS:-}" ]; then
      echo "round $r: $name over RDMA, alt: ${RDMA_OPTS_ALT:-} ${ALT_SERVE_ARGS:-}"
      rdma_bench --uri "rdma://$A:$alt_port/img?${RDMA_OPTS_ALT:-}" --rw $rw --bs $bytes --qd $qd --seconds "$RUNTIME" \
        --size $size --json /out/alt-$name-$r.json
    fi
    if [ -n "$base_srv" ]; then
      echo "round $r: $name over RDMA, base plugin"
      UVD_PLUGIN_PATH=$BASE_PLUGINS rdma_bench --uri "rdma://$A:7473/img" --rw $rw --bs $bytes --qd $qd \
        --seconds "$RUNTIME" --size $size --json /out/base-$name-$r.json
    fi
    echo "round $r: $name over NBD/TCP"
    fio --name=$name --ioengine=nbd --uri=nbd://$A:10809/img --rw=$rw --bs=$bs --iodepth=$qd \
      --size=${SIZE_MIB}m --time_based --runtime="$RUNTIME" --output-format=json --output=/out/nbd-$name-$r.json
  done
done
kill -TERM $srv $base_srv $alt_srv
wait $srv $base_srv $alt_srv || true

# The failover outage, MP_RUNS times each: a fresh image per run, no long failback wait. Both
# servers open the image with fence=1, so they share its epoch record (/tmp/mp.img.fence).
MP_RUNS=${MP_RUNS:-3}
for fault in kill stop; do
  fence=auto
  [ $fault = stop ] && fence=required
  for r in $(seq 1 "$MP_RUNS"); do
    rm -f /tmp/mp.img /tmp/mp.img.fence
    truncate -s 16M /tmp/mp.img
    mkdir -p /out/mp-$fault-$r
    mp_failover --fault $fault --image /tmp/mp.img --blocks 512 --qd 16 --warm-ms 2000 --after-ms 2000 \
      --failback-max-ms 5000 --logs /out/mp-$fault-$r \
      --path rdma://$A:7471/img --path rdma://$B:7472/img \
      --server "uvd serve --rdma $A:7471 --export 'img=file:///tmp/mp.img?fence=1'" \
      --server "uvd serve --rdma $B:7472 --export 'img=file:///tmp/mp.img?fence=1'" \
      --options "check_interval=$CHECK&io_timeout=$CHECK&fence=$fence" > /out/mp-$fault-$r.txt 2>&1 || true
    grep '^RESULT' /out/mp-$fault-$r.txt || tail -n 5 /out/mp-$fault-$r.txt
  done
done
