// SPDX-License-Identifier: Apache-2.0
// The shared-memory frame ring: frames of every size cross intact through
// wrap-around, kicks come only when the other side asked, and a hostile peer's
// indices and records are caught as a broken ring, never followed.
#include "transports/daemon/frame_ring.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <vector>

using namespace uvd::daemon;

namespace {

struct ring_mem {
  static constexpr uint32_t order = ring_min_order;
  alignas(64) ring_ctl ctl{};
  std::unique_ptr<uint8_t[]> data{new uint8_t[size_t(1) << order]()};
  ring_producer prod() { return ring_producer(&ctl, data.get(), order); }
  ring_consumer cons() { return ring_consumer(&ctl, data.get(), order); }
};

std::vector<uint8_t> frame_of(uint32_t len, uint32_t seed) {
  std::vector<uint8_t> f(len);
  for (uint32_t i = 0; i < len; ++i) f[i] = static_cast<uint8_t>(seed * 131 + i * 7);
  return f;
}

TEST(FrameRing, FramesOfEverySizeCrossIntactThroughWrapAround) {
  ring_mem m;
  auto p = m.prod();
  auto c = m.cons();
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(70000);
  uint32_t sent = 0, got = 0;
  std::vector<std::vector<uint8_t>> inflight;
  for (int round = 0; round < 2000; ++round) {
    // Produce a few, consume a few: indices wrap many times.
    for (int k = 0; k < 3; ++k) {
      uint32_t len = std::uniform_int_distribution<uint32_t>(1, 65000)(rng);
      auto f = frame_of(len, sent);
      frame_hdr h{.type = msg_frame, .gso_size = static_cast<uint16_t>(sent)};
      if (!p.push(h, f.data(), len)) break;
      inflight.push_back(std::move(f));
      ++sent;
    }
    p.publish();
    for (int k = 0; k < 2 && got < sent; ++k) {
      uint32_t len = 0;
      frame_hdr h;
      ASSERT_EQ(c.pop(buf.data(), static_cast<uint32_t>(buf.size()), &len, &h), ring_consumer::status::ok);
      ASSERT_EQ(h.gso_size, static_cast<uint16_t>(got));
      ASSERT_EQ(len, inflight[got].size());
      ASSERT_EQ(0, std::memcmp(buf.data(), inflight[got].data(), len)) << "frame " << got;
      inflight[got].clear();
      ++got;
    }
    c.release();
  }
  EXPECT_GT(sent, 1000u);
  EXPECT_TRUE(p.sane());
}

TEST(FrameRing, KicksOnlyWhenAsked) {
  ring_mem m;
  auto p = m.prod();
  auto c = m.cons();
  uint8_t f[64] = {};
  frame_hdr h{.type = msg_frame};
  // The consumer has not asked: no kick.
  m.ctl.cons_event.store(1u << 31);
  ASSERT_TRUE(p.push(h, f, sizeof f));
  EXPECT_FALSE(p.publish());
  // It drains, arms, and the next frame kicks, once.
  uint8_t buf[64];
  uint32_t len;
  ASSERT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::ok);
  EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::empty);
  c.release();
  EXPECT_FALSE(c.arm_data());
  ASSERT_TRUE(p.push(h, f, sizeof f));
  EXPECT_TRUE(p.publish());
  ASSERT_TRUE(p.push(h, f, sizeof f));
  EXPECT_FALSE(p.publish());
  // Full producer: arms for room; the consumer's release kicks it.
  while (p.push(h, f, sizeof f)) {
  }
  p.publish();
  EXPECT_FALSE(p.arm_space(ring_producer::worst_case(sizeof f)));
  ASSERT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::ok);
  ASSERT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::ok);
  EXPECT_TRUE(c.release());
  EXPECT_TRUE(p.has_room(ring_producer::worst_case(sizeof f)));
}

TEST(FrameRing, FrameLargerThanTheBufferIsSkipped) {
  ring_mem m;
  auto p = m.prod();
  auto c = m.cons();
  auto big = frame_of(3000, 1), small = frame_of(100, 2);
  frame_hdr h{.type = msg_frame};
  ASSERT_TRUE(p.push(h, big.data(), 3000));
  ASSERT_TRUE(p.push(h, small.data(), 100));
  p.publish();
  uint8_t buf[1514];
  uint32_t len;
  EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::too_big);
  ASSERT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::ok);
  EXPECT_EQ(len, 100u);
  EXPECT_EQ(0, std::memcmp(buf, small.data(), 100));
}

TEST(FrameRing, HostileProducerIsCaught) {
  const uint32_t size = 1u << ring_mem::order;
  uint8_t buf[2048];
  uint32_t len;
  frame_hdr h;
  auto write_rec = [](ring_mem& m, uint32_t off, ring_rec r) { std::memcpy(m.data.get() + off, &r, sizeof r); };
  {  // producer index more than a ring ahead
    ring_mem m;
    m.ctl.prod.store(size + 64);
    auto c = m.cons();
    EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
  }
  {  // a record longer than what was produced
    ring_mem m;
    write_rec(m, 0, ring_rec{.len = 1000, .kind = rec_frame, .meta = {}});
    m.ctl.prod.store(64);
    auto c = m.cons();
    EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
  }
  {  // a record that would run past the end of the ring
    ring_mem m;
    m.ctl.prod.store(size - 64);
    m.ctl.cons.store(size - 64);
    write_rec(m, size - 64, ring_rec{.len = 100, .kind = rec_frame, .meta = {}});
    m.ctl.prod.store(size - 64 + 192);
    auto c = m.cons();
    EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
  }
  {  // a pad that does not end at the end of the ring
    ring_mem m;
    write_rec(m, 0, ring_rec{.len = 128, .kind = rec_pad, .meta = {}});
    m.ctl.prod.store(256);
    auto c = m.cons();
    EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
  }
  {  // an unknown record kind, and a gigantic length
    ring_mem m;
    write_rec(m, 0, ring_rec{.len = 64, .kind = 0xdead, .meta = {}});
    m.ctl.prod.store(128);
    auto c = m.cons();
    EXPECT_EQ(c.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
    ring_mem m2;
    write_rec(m2, 0, ring_rec{.len = 0xffffffc0u, .kind = rec_frame, .meta = {}});
    m2.ctl.prod.store(size);
    auto c2 = m2.cons();
    EXPECT_EQ(c2.pop(buf, sizeof buf, &len, &h), ring_consumer::status::broken);
  }
  {  // a consumer index ahead of the producer's is caught by the producer
    ring_mem m;
    m.ctl.cons.store(4096);
    auto p = m.prod();
    uint8_t f[64] = {};
    EXPECT_FALSE(p.push(frame_hdr{.type = msg_frame}, f, sizeof f));
    EXPECT_FALSE(p.sane());
  }
}

}  // namespace
