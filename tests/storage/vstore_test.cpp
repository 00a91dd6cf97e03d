// SPDX-License-Identifier: Apache-2.0
// The generic front half's own behaviour, over the memory transport and a
// recording transport that shows what reached the transport.
#include "storage/vstore.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "core/uri.hpp"
#include "tests/testutil.hpp"
#include "transports/memory/memory.hpp"

using namespace uvd;
using storage::open_options;
using storage::Vstore;
using storage::vstore_io;

namespace {

std::unique_ptr<Vstore> open_memory(const std::string& target, open_options o = {}) {
  auto v = Vstore::open(memory::memory_vstore_ops, target, o);
  EXPECT_TRUE(v) << v.err().what();
  return v ? std::move(*v) : nullptr;
}

// Forwards to the memory transport and records every request it is handed;
// reports the features given in option "features" (a number).
struct recorded {
  uint16_t opcode, flags;
  uint64_t offset, length;
  uint32_t iovcnt;
};
struct recorder {
  void* inner = nullptr;
  uint64_t features = 0;
  std::mutex mu;
  std::vector<recorded> log;
};

int rec_open(const core::vstore_open_params* p, void** handle) {
  auto r = std::make_unique<recorder>();
  std::string f;
  if (core::find_option(p->options, "features", &f)) r->features = std::stoull(f);
  int rc = memory::memory_vstore_ops.open(p, &r->inner);
  if (rc < 0) return rc;
  *handle = r.release();
  return 0;
}
void rec_release(void* h) {
  auto* r = static_cast<recorder*>(h);
  memory::memory_vstore_ops.release(r->inner);
  delete r;
}
int rec_info(void* h, core::vstore_info* out) {
  auto* r = static_cast<recorder*>(h);
  int rc = memory::memory_vstore_ops.info(r->inner, out);
  out->features = r->features;
  return rc;
}
int rec_submit(void* h, core::vstore_req* const* reqs, uint32_t n) {
  auto* r = static_cast<recorder*>(h);
  {
    std::lock_guard lk(r->mu);
    for (uint32_t i = 0; i < n; ++i)
      r->log.push_back({reqs[i]->opcode, reqs[i]->flags, reqs[i]->offset, reqs[i]->length, reqs[i]->iovcnt});
  }
  // The memory transport has no flush of its own; run flushes as no-ops.
  return memory::memory_vstore_ops.submit(r->inner, reqs, n);
}

recorder* last_recorder = nullptr;  // set by the test's open wrapper below

int rec_open_tracked(const core::vstore_open_params* p, void** handle) {
  int rc = rec_open(p, handle);
  if (rc == 0) last_recorder = static_cast<recorder*>(*handle);
  return rc;
}

const core::vstore_ops recorder_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "recorder",
    .description = "test transport that records requests",
    .open = rec_open_tracked,
    .release = rec_release,
    .info = rec_info,
    .submit = rec_submit,
};

struct async_waiter {
  std::atomic<int> left{0};
  std::atomic<int> errors{0};
  static void done(vstore_io* io, int status) {
    auto* w = static_cast<async_waiter*>(io->user);
    if (status < 0) w->errors.fetch_add(1);
    w->left.fetch_sub(1);
  }
  void wait() {
    while (left.load() > 0) std::this_thread::yield();
  }
};

}  // namespace

TEST(Vstore, ReadsBackWhatWasWritten) {
  auto v = open_memory("4M");
  ASSERT_TRUE(v);
  std::vector<std::byte> w(64 * 1024), r(64 * 1024);
  test::fill_pattern(w, 1, 8192);
  ASSERT_TRUE(v->write(8192, w.data(), w.size()));
  ASSERT_TRUE(v->read(8192, r.data(), r.size()));
  EXPECT_EQ(w, r);
  EXPECT_EQ(v->stats().writes, 1u);
  EXPECT_EQ(v->stats().read_bytes, r.size());
}

TEST(Vstore, SplitsRequestsAtTheTransportLimit) {
  auto v = open_memory("8M", {.options = "max_transfer=64K"});
  ASSERT_TRUE(v);
  std::vector<std::byte> w(1 << 20), r(1 << 20);
  test::fill_pattern(w, 2, 0);
  ASSERT_TRUE(v->write(0, w.data(), w.size()));
  ASSERT_TRUE(v->read(0, r.data(), r.size()));
  EXPECT_EQ(w, r);
  EXPECT_GE(v->stats().splits, 2u * (16 - 1));
}

TEST(Vstore, SplitsAtTheSegmentLimitOnBlockBoundaries) {
  // 300-byte segments do not line up with 512-byte blocks: every child must be
  // cut back to a block boundary and continue mid-segment.
  auto v = open_memory("1M", {.options = "max_segments=5&async=1"});
  ASSERT_TRUE(v);
  std::vector<std::byte> w(300 * 512), r(300 * 512);
  test::fill_pattern(w, 3, 4096);
  std::vector<iovec> wi, ri;
  for (size_t off = 0; off < w.size(); off += 300) {
    wi.push_back({w.data() + off, 300});
    ri.push_back({r.data() + off, 300});
  }
  ASSERT_TRUE(v->writev(4096, wi));
  ASSERT_TRUE(v->readv(4096, ri));
  EXPECT_EQ(w, r);
  EXPECT_GT(v->stats().splits, 0u);
}

TEST(Vstore, QueueDepthBoundsRequestsInFlight) {
  // The transport holds 4; the front half may have 8 in flight; 64 are submitted.
  auto v = open_memory("4M", {.queue_depth = 8, .options = "async=1&depth=4"});
  ASSERT_TRUE(v);
  constexpr int n = 64;
  std::vector<std::vector<std::byte>> bufs(n, std::vector<std::byte>(4096));
  std::vector<iovec> iov(n);
  std::vector<vstore_io> ios(n);
  std::vector<vstore_io*> batch;
  async_waiter w;
  w.left = n;
  for (int i = 0; i < n; ++i) {
    test::fill_pattern(bufs[i], 4, uint64_t(i) * 4096);
    iov[i] = {bufs[i].data(), 4096};
    ios[i].opcode = core::VSTORE_OP_WRITE;
    ios[i].offset = uint64_t(i) * 4096;
    ios[i].length = 4096;
    ios[i].iov = &iov[i];
    ios[i].iovcnt = 1;
    ios[i].done = &async_waiter::done;
    ios[i].user = &w;
    batch.push_back(&ios[i]);
  }
  v->submit(batch);
  w.wait();
  EXPECT_EQ(w.errors.load(), 0);
  auto st = v->stats();
  EXPECT_LE(st.max_in_flight, 8u);
  EXPECT_GT(st.queue_full, 0u);
  std::vector<std::byte> r(n * 4096), expect(n * 4096);
  test::fill_pattern(expect, 4, 0);
  ASSERT_TRUE(v->read(0, r.data(), r.size()));
  EXPECT_EQ(r, expect);
}

TEST(Vstore, RejectsBadRequestsWithTheRightErrno) {
  auto v = open_memory("1M");
  ASSERT_TRUE(v);
  std::vector<std::byte> b(4096);
  auto err = [](const core::result<void>& r) { return r ? 0 : r.err().errnum(); };
  EXPECT_EQ(err(v->read(100, b.data(), 512)), EINVAL);            // unaligned offset
  EXPECT_EQ(err(v->read(0, b.data(), 100)), EINVAL);              // unaligned length
  EXPECT_EQ(err(v->read(1 << 20, b.data(), 512)), EINVAL);        // past the end
  EXPECT_EQ(err(v->write((1 << 20) - 512, b.data(), 1024)), ENOSPC);  // write past the end
  EXPECT_EQ(err(v->read(0, b.data(), 0)), EINVAL);                // empty
  vstore_io io;
  io.opcode = 99;
  io.length = 512;
  io.done = [](vstore_io*, int) {};
  EXPECT_EQ(v->validate(io), -EINVAL);
  iovec short_iov{b.data(), 512};
  vstore_io mism;
  mism.opcode = core::VSTORE_OP_READ;
  mism.length = 1024;
  mism.iov = &short_iov;
  mism.iovcnt = 1;
  mism.done = io.done;
  EXPECT_EQ(v->validate(mism), -EINVAL);  // iovec shorter than length
  EXPECT_GE(v->stats().rejected, 5u);
}

TEST(Vstore, ReadOnlyRefusesEveryWrite) {
  auto v = open_memory("1M", {.read_only = true});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->read_only());
  std::vector<std::byte> b(4096);
  EXPECT_EQ(v->write(0, b.data(), b.size()).err().errnum(), EROFS);
  EXPECT_EQ(v->discard(0, 4096).err().errnum(), EROFS);
  EXPECT_EQ(v->write_zeroes(0, 4096).err().errnum(), EROFS);
  EXPECT_TRUE(v->read(0, b.data(), b.size()));
  EXPECT_TRUE(v->flush());
}

TEST(Vstore, EmulatesWriteZeroesAsWrites) {
  auto v = Vstore::open(recorder_ops, "1M", {.options = "features=" + std::to_string(core::VSTORE_F_FLUSH)});
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> ones(256 * 1024, std::byte{0xff}), r(256 * 1024);
  ASSERT_TRUE((*v)->write(0, ones.data(), ones.size()));
  last_recorder->log.clear();
  ASSERT_TRUE((*v)->write_zeroes(0, ones.size()));
  ASSERT_TRUE((*v)->read(0, r.data(), r.size()));
  EXPECT_EQ(r, std::vector<std::byte>(r.size()));
  ASSERT_FALSE(last_recorder->log.empty());
  for (const auto& e : last_recorder->log) EXPECT_NE(e.opcode, core::VSTORE_OP_WRITE_ZEROES);
  EXPECT_EQ(last_recorder->log[0].opcode, core::VSTORE_OP_WRITE);
}

TEST(Vstore, EmulatesFuaWithAFlushAfterTheWrite) {
  auto v = Vstore::open(recorder_ops, "1M", {.options = "features=" + std::to_string(core::VSTORE_F_FLUSH)});
  ASSERT_TRUE(v);
  std::vector<std::byte> b(8192);
  ASSERT_TRUE((*v)->write(0, b.data(), b.size(), core::VSTORE_REQ_FUA));
  auto& log = last_recorder->log;
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].opcode, core::VSTORE_OP_WRITE);
  EXPECT_EQ(log[0].flags & core::VSTORE_REQ_FUA, 0);
  EXPECT_EQ(log[1].opcode, core::VSTORE_OP_FLUSH);
}

TEST(Vstore, EmulatesFuaOnDiscardWithAFlush) {
  auto v = Vstore::open(recorder_ops, "1M",
                        {.options = "features=" + std::to_string(core::VSTORE_F_FLUSH | core::VSTORE_F_DISCARD)});
  ASSERT_TRUE(v);
  ASSERT_TRUE((*v)->discard(0, 8192, core::VSTORE_REQ_FUA));
  auto& log = last_recorder->log;
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].opcode, core::VSTORE_OP_DISCARD);
  EXPECT_EQ(log[0].flags & core::VSTORE_REQ_FUA, 0);
  EXPECT_EQ(log[1].opcode, core::VSTORE_OP_FLUSH);
}

TEST(Vstore, PassesFuaThroughWhenTheTransportHasIt) {
  auto v = Vstore::open(recorder_ops, "1M",
                        {.options = "features=" + std::to_string(core::VSTORE_F_FLUSH | core::VSTORE_F_FUA)});
  ASSERT_TRUE(v);
  std::vector<std::byte> b(8192);
  ASSERT_TRUE((*v)->write(0, b.data(), b.size(), core::VSTORE_REQ_FUA));
  auto& log = last_recorder->log;
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].opcode, core::VSTORE_OP_WRITE);
  EXPECT_NE(log[0].flags & core::VSTORE_REQ_FUA, 0);
}

TEST(Vstore, FlushAndDiscardWithoutTransportSupportNeverReachIt) {
  auto v = Vstore::open(recorder_ops, "1M", {.options = "features=0"});
  ASSERT_TRUE(v);
  ASSERT_TRUE((*v)->flush());
  ASSERT_TRUE((*v)->discard(0, 4096));
  EXPECT_TRUE(last_recorder->log.empty());
}

TEST(Vstore, MediaErrorFailsOnlyTheRequestThatHitIt) {
  auto v = open_memory("1M", {.options = "fail_offset=65536&max_transfer=16K"});
  ASSERT_TRUE(v);
  std::vector<std::byte> b(128 * 1024);
  auto bad = v->read(0, b.data(), b.size());
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.err().errnum(), EIO);
  EXPECT_NE(bad.err().message.find("read of 131072 bytes at offset 0"), std::string::npos) << bad.err().message;
  EXPECT_TRUE(v->read(0, b.data(), 65536));
  EXPECT_EQ(v->stats().errors, 1u);
}

TEST(Vstore, DoneMaySubmitTheNextRequest) {
  // A chain of 100 writes, each submitted from the previous one's completion,
  // inside a transport that completes during submit.
  auto v = open_memory("1M");
  ASSERT_TRUE(v);
  struct chain {
    Vstore* v;
    std::vector<std::byte> buf = std::vector<std::byte>(512);
    iovec iov{};
    vstore_io io;
    int remaining = 100;
    std::atomic<bool> finished{false};
  } c;
  c.v = v.get();
  c.iov = {c.buf.data(), 512};
  c.io.opcode = core::VSTORE_OP_WRITE;
  c.io.length = 512;
  c.io.iov = &c.iov;
  c.io.iovcnt = 1;
  c.io.user = &c;
  c.io.done = [](vstore_io* io, int status) {
    auto* ch = static_cast<chain*>(io->user);
    ASSERT_EQ(status, 0);
    if (--ch->remaining == 0) {
      ch->finished = true;
      return;
    }
    io->offset += 512;
    ch->v->submit(io);
  };
  v->submit(&c.io);
  while (!c.finished) std::this_thread::yield();
  EXPECT_EQ(v->stats().writes, 100u);
}

TEST(Vstore, CloseWaitsForRequestsInFlight) {
  auto v = open_memory("4M", {.queue_depth = 4, .options = "async=1&depth=2"});
  ASSERT_TRUE(v);
  constexpr int n = 32;
  std::vector<std::byte> buf(n * 4096);
  std::vector<iovec> iov(n);
  std::vector<vstore_io> ios(n);
  async_waiter w;
  w.left = n;
  for (int i = 0; i < n; ++i) {
    iov[i] = {buf.data() + i * 4096, 4096};
    ios[i].opcode = core::VSTORE_OP_READ;
    ios[i].offset = uint64_t(i) * 4096;
    ios[i].length = 4096;
    ios[i].iov = &iov[i];
    ios[i].iovcnt = 1;
    ios[i].done = &async_waiter::done;
    ios[i].user = &w;
    v->submit(&ios[i]);
  }
  v.reset();
  EXPECT_EQ(w.left.load(), 0);
  EXPECT_EQ(w.errors.load(), 0);
}

TEST(Vstore, OpenErrorsCarryTheTransportsWords) {
  auto v = Vstore::open(memory::memory_vstore_ops, "lots", {});
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("memory:64M"), std::string::npos) << v.err().message;
  auto q = Vstore::open(memory::memory_vstore_ops, "1M", {.queue_depth = 0});
  ASSERT_FALSE(q);
  EXPECT_NE(q.err().message.find("queue depth"), std::string::npos);
}
