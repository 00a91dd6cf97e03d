// SPDX-License-Identifier: Apache-2.0
// The storage server's checks of hostile RPCs, without an RDMA device: every
// refusal reason, forged and foreign handles, the fencing epoch record, and
// export UUIDs that survive a restart.
#include <gtest/gtest.h>

#include <random>
#include <set>
#include <thread>

#include "transports/rdma/server_check.hpp"

using namespace uvd::rdma;

namespace {

constexpr uint32_t seg_size = 128 * 1024;
constexpr uint32_t nsegs = 16;

export_geometry geom(bool ro = false) {
  export_geometry g;
  g.size = 64ull << 20;
  g.block_size = 512;
  g.max_transfer = seg_size * 8;
  g.read_only = ro;
  return g;
}

handle_table fresh_handles() {
  handle_table h;
  EXPECT_TRUE(h.assign(nsegs));
  return h;
}

io_rpc io(uint16_t op, uint64_t id, uint64_t off, uint64_t len, const handle_table& h, uint32_t seg = 0) {
  io_rpc r;
  r.hdr.opcode = op;
  r.hdr.id = id;
  r.offset = off;
  r.length = len;
  if (op == OP_READ || op == OP_WRITE) {
    uint64_t left = len;
    while (left) {
      uint32_t k = static_cast<uint32_t>(std::min<uint64_t>(left, seg_size));
      r.segs[r.nseg++] = {h.handle_of(seg++), 0, k};
      left -= k;
    }
  }
  return r;
}

TEST(RdmaServerCheck, HandlesAreUniqueNonzeroAndLookUp) {
  handle_table h = fresh_handles();
  std::set<uint64_t> seen;
  for (uint32_t i = 0; i < nsegs; ++i) {
    uint64_t t = h.handle_of(i);
    EXPECT_NE(t, 0u);
    EXPECT_TRUE(seen.insert(t).second);
    EXPECT_EQ(h.lookup(t), i);
  }
  // Tokens are not indexes or addresses: they do not step by a constant.
  EXPECT_NE(h.handle_of(1) - h.handle_of(0), h.handle_of(2) - h.handle_of(1));
  h.revoke();
  for (uint64_t t : seen) EXPECT_EQ(h.lookup(t), -1);
}

TEST(RdmaServerCheck, WellFormedRpcsPassAndFillTheCheckedIo) {
  rpc_gate g(seg_size, geom(), false, fresh_handles());
  checked_io out;
  io_rpc w = io(OP_WRITE, 1, 4096, 3 * seg_size, g.handles(), 2);
  ASSERT_EQ(g.check_io(w, 0, &out), refusal::none);
  EXPECT_EQ(out.nseg, 3);
  EXPECT_EQ(out.segs[0].segment, 2u);
  EXPECT_EQ(out.segs[2].segment, 4u);
  EXPECT_EQ(out.length, 3ull * seg_size);
  EXPECT_EQ(g.in_flight(), 1u);
  EXPECT_EQ(g.check_io(io(OP_FLUSH, 2, 0, 0, g.handles()), 0, &out), refusal::none);
  EXPECT_EQ(g.check_io(io(OP_DISCARD, 3, 0, 1 << 20, g.handles()), 0, &out), refusal::none);
  EXPECT_EQ(g.check_io(io(OP_WRITE_ZEROES, 4, 512, 512, g.handles()), 0, &out), refusal::none);
  EXPECT_EQ(g.check_io(io(OP_READ, 5, (64ull << 20) - 512, 512, g.handles()), 0, &out), refusal::none);
  EXPECT_EQ(g.in_flight(), 5u);
  g.done(1);
  EXPECT_EQ(g.in_flight(), 4u);
}

TEST(RdmaServerCheck, EveryHostileRpcIsRefusedForItsReason) {
  rpc_gate g(seg_size, geom(), false, fresh_handles());
  const handle_table& h = g.handles();
  checked_io out;
  auto check = [&](io_rpc r, uint32_t epoch_now = 0) { return g.check_io(r, epoch_now, &out); };

  io_rpc r = io(OP_READ, 10, 0, 4096, h);
  r.hdr.opcode = 42;
  EXPECT_EQ(check(r), refusal::unknown_opcode);

  ASSERT_EQ(check(io(OP_READ, 11, 0, 4096, h)), refusal::none);
  EXPECT_EQ(check(io(OP_WRITE, 11, 8192, 4096, h, 1)), refusal::duplicate_id);

  r = io(OP_WRITE, 12, 0, 4096, h);
  r.hdr.epoch = 2;
  EXPECT_EQ(check(r, 3), refusal::stale_epoch);
  EXPECT_EQ(check(r, 2), refusal::none);
  r = io(OP_WRITE, 27, 0, 4096, h);  // epoch 0: unfenced, never stale
  EXPECT_EQ(check(r, 9), refusal::none);

  r = io(OP_WRITE, 13, 0, 4096, h);
  r.segs[0].handle ^= 1;  // forged
  EXPECT_EQ(check(r), refusal::bad_handle);

  r = io(OP_WRITE, 14, 0, 4096, h);
  r.segs[0].offset = seg_size - 2048;  // runs past the segment
  EXPECT_EQ(check(r), refusal::segment_range);
  r.segs[0].offset = 0xffffffffu;  // would wrap
  EXPECT_EQ(check(r), refusal::segment_range);
  r = io(OP_WRITE, 15, 0, 4096, h);
  r.segs[0].length = 0;
  EXPECT_EQ(check(r), refusal::segment_range);

  r = io(OP_WRITE, 16, 0, 8192, h);
  r.length = 4096;  // segments carry more than the RPC says
  EXPECT_EQ(check(r), refusal::length_mismatch);
  r = io(OP_READ, 17, 0, 4096, h);
  r.nseg = 0;
  EXPECT_EQ(check(r), refusal::length_mismatch);

  EXPECT_EQ(check(io(OP_READ, 18, 100, 512, h)), refusal::misaligned);
  EXPECT_EQ(check(io(OP_READ, 19, 0, 100, h)), refusal::misaligned);

  EXPECT_EQ(check(io(OP_READ, 20, 64ull << 20, 512, h)), refusal::sector_range);      // at the end
  EXPECT_EQ(check(io(OP_DISCARD, 21, ~0ull - 511, 1024, h)), refusal::sector_range);  // would wrap
  EXPECT_EQ(check(io(OP_DISCARD, 22, 0, 0, h)), refusal::sector_range);
  EXPECT_EQ(check(io(OP_READ, 23, 0, seg_size * 9ull, h)), refusal::sector_range);    // past max transfer

  r = io(OP_WRITE, 24, 0, 4096, h);
  r.flags = 0x80;
  EXPECT_EQ(check(r), refusal::bad_flags);

  r = io(OP_FLUSH, 25, 0, 0, h);
  r.length = 512;
  EXPECT_EQ(check(r), refusal::malformed);
  r = io(OP_DISCARD, 26, 0, 4096, h);
  r.nseg = 1;
  r.segs[0] = {h.handle_of(0), 0, 4096};
  EXPECT_EQ(check(r), refusal::malformed);

  // Nothing refused was left in flight.
  EXPECT_EQ(g.in_flight(), 3u);  // ids 11, 12 and 27
}

TEST(RdmaServerCheck, ReadOnlyExportOrConnectionRefusesWrites) {
  rpc_gate ro_export(seg_size, geom(true), false, fresh_handles());
  rpc_gate ro_conn(seg_size, geom(false), true, fresh_handles());
  checked_io out;
  for (rpc_gate* g : {&ro_export, &ro_conn}) {
    EXPECT_EQ(g->check_io(io(OP_WRITE, 1, 0, 4096, g->handles()), 0, &out), refusal::read_only);
    EXPECT_EQ(g->check_io(io(OP_DISCARD, 2, 0, 4096, g->handles()), 0, &out), refusal::read_only);
    EXPECT_EQ(g->check_io(io(OP_WRITE_ZEROES, 3, 0, 4096, g->handles()), 0, &out), refusal::read_only);
    EXPECT_EQ(g->check_io(io(OP_READ, 4, 0, 4096, g->handles()), 0, &out), refusal::none);
    EXPECT_EQ(g->check_io(io(OP_FLUSH, 5, 0, 0, g->handles()), 0, &out), refusal::none);
  }
}

TEST(RdmaServerCheck, AnotherClientsHandlesAndASweepOfForgedOnesAreRefused) {
  rpc_gate a(seg_size, geom(), false, fresh_handles());
  rpc_gate b(seg_size, geom(), false, fresh_handles());
  checked_io out;
  // Every one of b's handles, presented to a.
  for (uint32_t i = 0; i < nsegs; ++i) {
    io_rpc r = io(OP_WRITE, 100 + i, 0, 4096, b.handles(), i);
    EXPECT_EQ(a.check_io(r, 0, &out), refusal::bad_handle);
  }
  // 10^5 forged handles: random, near-misses of real ones, small integers.
  std::mt19937_64 rng(7);
  int refused = 0;
  const int sweep = 100000;
  for (int i = 0; i < sweep; ++i) {
    io_rpc r = io(OP_WRITE, 1000 + i, 0, 4096, a.handles());
    switch (i % 3) {
      case 0: r.segs[0].handle = rng(); break;
      case 1: r.segs[0].handle = a.handles().handle_of(i % nsegs) + 1 + (rng() % 1000); break;
      case 2: r.segs[0].handle = static_cast<uint64_t>(i); break;
    }
    if (a.check_io(r, 0, &out) == refusal::bad_handle) ++refused;
  }
  EXPECT_EQ(refused, sweep);
  EXPECT_EQ(a.in_flight(), 0u);
  // Revoked handles (the client disconnected) are refused too.
  io_rpc good = io(OP_WRITE, 1, 0, 4096, a.handles());
  a.revoke();
  EXPECT_EQ(a.check_io(good, 0, &out), refusal::bad_handle);
}

TEST(RdmaServerCheck, RefusalsMapToErrnosAndCount) {
  refusal_counters c;
  c.add(refusal::bad_handle);
  c.add(refusal::bad_handle);
  c.add(refusal::stale_epoch);
  EXPECT_EQ(c.total(), 3u);
  EXPECT_EQ(c.to_string(), "stale_epoch=1 bad_handle=2");
  EXPECT_EQ(refusal_errno(refusal::stale_epoch), -ESTALE);
  EXPECT_EQ(refusal_errno(refusal::read_only), -EROFS);
  EXPECT_EQ(refusal_errno(refusal::bad_handle), -EBADF);
  for (size_t i = 1; i < refusal_kinds; ++i) EXPECT_LT(refusal_errno(static_cast<refusal>(i)), 0);
}

TEST(RdmaServerCheck, EpochRecordRefusesStaleIoAndFencesWaitForOlderIo) {
  epoch_record e;
  EXPECT_TRUE(e.admit(1));  // an old-path write in flight
  EXPECT_TRUE(e.admit(1));
  EXPECT_EQ(e.fence(2, 77), 0);  // must wait for both
  EXPECT_EQ(e.current(), 2u);
  EXPECT_FALSE(e.admit(1));      // late write through the fenced path
  EXPECT_TRUE(e.admit(2));       // the new path works at once
  EXPECT_TRUE(e.admit(0));       // epoch 0: unfenced, always admitted
  EXPECT_TRUE(e.finish(0).empty());  // 0 is below 2: still one epoch-1 write out
  EXPECT_TRUE(e.finish(2).empty());
  EXPECT_TRUE(e.finish(1).empty());
  EXPECT_EQ(e.in_flight_below(2), 1u);
  auto fired = e.finish(1);
  ASSERT_EQ(fired.size(), 1u);
  EXPECT_EQ(fired[0], 77u);
  EXPECT_EQ(e.fence(3, 78), 1);         // nothing older in flight: complete at once
  EXPECT_EQ(e.fence(3, 79), -ESTALE);   // not newer: refused, nothing changed
  EXPECT_EQ(e.fence(2, 80), -ESTALE);   // never lowers
  EXPECT_EQ(e.fence(0, 81), -ESTALE);
  EXPECT_EQ(e.current(), 3u);
}

TEST(RdmaServerCheck, NoStaleIoIsAdmittedOnceAFenceCompleted) {
  epoch_record e;
  std::atomic<bool> stop{false}, fence_done{false};
  std::atomic<uint64_t> admitted{0}, late{0};
  std::thread io([&] {
    while (!stop) {
      bool fenced_before = fence_done.load();
      if (e.admit(1)) {
        ++admitted;
        if (fenced_before) ++late;  // a write through the old path after the fence
        e.finish(1);
      }
    }
  });
  while (admitted.load() < 1000) std::this_thread::yield();
  if (e.fence(2, 1) == 0)
    while (e.in_flight_below(2) != 0) std::this_thread::yield();
  fence_done = true;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop = true;
  io.join();
  EXPECT_EQ(late.load(), 0u);
  EXPECT_EQ(e.in_flight_below(2), 0u);
}

TEST(RdmaServerCheck, ExportUuidsAreStableWellFormedAndDistinct) {
  std::string a = export_uuid("file:dev=2049:ino=1234", "disk0");
  EXPECT_EQ(a, export_uuid("file:dev=2049:ino=1234", "disk0"));  // a restart gives the same
  EXPECT_TRUE(looks_like_uuid(a)) << a;
  EXPECT_EQ(a[14], '8');  // version 8
  EXPECT_TRUE(a[19] == '8' || a[19] == '9' || a[19] == 'a' || a[19] == 'b');
  EXPECT_NE(a, export_uuid("file:dev=2049:ino=1235", "disk0"));
  EXPECT_NE(a, export_uuid("file:dev=2049:ino=1234", "disk1"));
  EXPECT_NE(export_uuid("ab", "c"), export_uuid("a", "bc"));
  EXPECT_FALSE(looks_like_uuid("not-a-uuid"));
  EXPECT_FALSE(looks_like_uuid("01234567-89AB-8def-8123-456789abcdef"));
}

}  // namespace
