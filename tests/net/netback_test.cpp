// SPDX-License-Identifier: Apache-2.0
// The switch with in-memory ports: learning, flooding, validation of what
// ports send, software offloads for ports without them, rate limiting.
#include "net/netback.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>

#include "net/offload.hpp"
#include "tests/net/net_testutil.hpp"

using namespace uvd;
using namespace uvd::net;
using namespace std::chrono_literals;

namespace {

// A port whose peer is the test: frames it queues enter the switch, frames
// the switch sends are recorded. Its fd is always readable.
class fake_port final : public port {
 public:
  fake_port(mac_addr m, bool offloads = true, bool trusted = false) : mac_(m), offloads_(offloads), trusted_(trusted) {
    fd_ = ::eventfd(1, EFD_CLOEXEC);
  }
  ~fake_port() override { ::close(fd_); }
  std::string name() const override { return mac_.to_string(); }
  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, port_stats&) override {
    uint32_t k = 0;
    held_.clear();
    while (k < n && !in.empty()) {
      held_.push_back(std::move(in.front().bytes));
      in.erase(in.begin());
      ++k;
    }
    for (uint32_t i = 0; i < k; ++i) {
      frames[i] = core::veth_frame{.data = held_[i].data(), .len = static_cast<uint32_t>(held_[i].size())};
      frames[i].flags = flags_.empty() ? 0 : flags_.front().flags;
      if (!flags_.empty()) {
        frames[i].gso_size = flags_.front().gso_size;
        frames[i].gso_type = flags_.front().gso_type;
        frames[i].csum_start = flags_.front().csum_start;
        frames[i].csum_offset = flags_.front().csum_offset;
        flags_.erase(flags_.begin());
      }
    }
    return k;
  }
  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override {
    uint32_t k = std::min(n, room);
    for (uint32_t i = 0; i < k; ++i) {
      out.push_back(test::received_frame{std::vector<uint8_t>(frames[i]->data, frames[i]->data + frames[i]->len),
                                         frames[i]->flags});
    }
    room -= k;
    return k;
  }
  void fds(std::vector<int>& o) const override { o.push_back(fd_); }
  bool alive() const override { return alive_; }
  bool offloads() const override { return offloads_; }
  uint32_t mtu() const override { return 1500; }
  std::optional<mac_addr> owned_mac() const override {
    if (trusted_) return std::nullopt;
    return mac_;
  }

  void send(std::vector<uint8_t> f, core::veth_frame meta = {}) {
    in.push_back(test::received_frame{std::move(f)});
    flags_.push_back(meta);
  }

  mac_addr mac_;
  bool offloads_, trusted_;
  bool alive_ = true;
  uint32_t room = UINT32_MAX;
  std::vector<test::received_frame> in, out;

 private:
  int fd_;
  std::vector<std::vector<uint8_t>> held_;
  std::vector<core::veth_frame> flags_;
};

mac_addr M(uint8_t i) { return mac_addr{{0x02, 0, 0, 0, 0, i}}; }

class NetbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto n = Netback::create();
    ASSERT_TRUE(n);
    nb_ = std::move(*n);
  }
  fake_port& add(mac_addr m, bool offloads = true, bool trusted = false, std::optional<rate_limit> lim = {}) {
    auto p = std::make_unique<fake_port>(m, offloads, trusted);
    auto* raw = p.get();
    nb_->add_port(std::move(p), lim);
    return *raw;
  }
  void run(int rounds = 3) {
    for (int i = 0; i < rounds; ++i) ASSERT_TRUE(nb_->run_once(0ms));
  }
  std::unique_ptr<Netback> nb_;
};

TEST_F(NetbackTest, LearnsThenForwardsUnicastOnly) {
  auto& p0 = add(M(1));
  auto& p1 = add(M(2));
  auto& p2 = add(M(3));
  p0.send(test::make_test_frame(100, M(2), M(1), 1));
  run();
  EXPECT_EQ(p1.out.size(), 1u) << "unknown unicast floods";
  EXPECT_EQ(p2.out.size(), 1u);
  EXPECT_EQ(p0.out.size(), 0u) << "never back out of the port it came in";
  p1.send(test::make_test_frame(100, M(1), M(2), 2));
  run();
  EXPECT_EQ(p0.out.size(), 1u);
  EXPECT_EQ(p2.out.size(), 1u) << "M(1) was learnt: no flood";
  p0.send(test::make_test_frame(100, M(2), M(1), 3));
  run();
  EXPECT_EQ(p1.out.size(), 2u);
  EXPECT_EQ(p2.out.size(), 1u) << "M(2) was learnt: no flood";
  EXPECT_TRUE(test::check_test_frame(p1.out[1].bytes.data(), 100, 3));
  EXPECT_EQ(nb_->macs().size(), 2u);
}

TEST_F(NetbackTest, FloodsBroadcastAndMulticast) {
  auto& p0 = add(M(1));
  auto& p1 = add(M(2));
  auto& p2 = add(M(3));
  p1.send(test::make_test_frame(60, M(1), M(2), 0));  // teach the switch where M(2) is
  run();
  p0.send(test::make_test_frame(100, broadcast_mac, M(1), 1));
  p0.send(test::make_test_frame(100, mac_addr{{0x01, 0, 0x5e, 0, 0, 1}}, M(1), 2));
  run();
  EXPECT_EQ(p1.out.size(), 2u);
  EXPECT_EQ(p2.out.size(), 3u);
}

TEST_F(NetbackTest, DropsAndCountsWhatPortsMustNotSend) {
  auto& p0 = add(M(1));
  auto& p1 = add(M(2));
  p0.send(test::make_test_frame(100, M(2), M(9), 1));  // forged source
  p0.send(test::make_test_frame(100, M(2), broadcast_mac, 2));  // multicast source
  auto tagged = test::make_test_frame(100, M(2), M(1), 3);
  store_be16(tagged.data() + 12, ethertype_vlan);
  p0.send(tagged);
  p0.send(test::make_test_frame(1500 + 14 + 1, M(2), M(1), 4));  // over the MTU
  p0.send(std::vector<uint8_t>(9, 0xff));                          // runt
  core::veth_frame bad{};
  auto tcp = test::make_tcp4_frame(M(2), M(1), 3000, 1, &bad, 1448);
  bad.gso_size = 1;  // 3000 segments
  p0.send(tcp, bad);
  p0.send(test::make_test_frame(100, M(2), M(1), 5));  // the only good one
  run();
  ASSERT_EQ(p1.out.size(), 1u);
  EXPECT_TRUE(test::check_test_frame(p1.out[0].bytes.data(), 100, 5));
  auto t = nb_->totals();
  EXPECT_EQ(t.rx_bad_mac, 2u);
  EXPECT_EQ(t.rx_vlan, 1u);
  EXPECT_EQ(t.rx_oversize, 1u);
  EXPECT_EQ(t.rx_runt, 1u);
  EXPECT_EQ(t.rx_bad_offload, 1u);
  EXPECT_EQ(t.rx_frames, 1u);
  EXPECT_EQ(nb_->macs().size(), 1u) << "nothing learnt from dropped frames";
}

TEST_F(NetbackTest, TrustedUplinkMaySendAnySource) {
  auto& up = add(M(1), true, true);
  auto& p1 = add(M(2));
  up.send(test::make_test_frame(100, M(2), M(77), 1));
  up.send(test::make_test_frame(100, M(2), M(78), 2));
  run();
  EXPECT_EQ(p1.out.size(), 2u);
  EXPECT_EQ(nb_->macs().size(), 2u);
}

TEST_F(NetbackTest, FinishesOffloadsForPortsWithout) {
  auto& p0 = add(M(1), true);
  auto& whole = add(M(2), true);
  auto& plain = add(M(3), false);
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(broadcast_mac, M(1), 10000, 7, &d, 1448);
  p0.send(tcp, d);
  run();
  ASSERT_EQ(whole.out.size(), 1u) << "an offloading port gets the segment whole";
  ASSERT_EQ(plain.out.size(), 7u) << "a plain port gets MSS-sized frames";
  size_t payload = 0;
  for (auto& f : plain.out) {
    EXPECT_TRUE(verify_csums(f.bytes.data(), static_cast<uint32_t>(f.bytes.size())));
    payload += f.bytes.size() - 54;
  }
  EXPECT_EQ(payload, 10000u);
}

TEST_F(NetbackTest, FullPortDropsAreCountedAndDoNotBlockOthers) {
  auto& p0 = add(M(1));
  auto& full = add(M(2));
  auto& p2 = add(M(3));
  full.room = 0;
  for (int i = 0; i < 10; ++i) p0.send(test::make_test_frame(100, broadcast_mac, M(1), i));
  run();
  EXPECT_EQ(p2.out.size(), 10u);
  EXPECT_EQ(nb_->totals().tx_dropped, 10u);
}

TEST_F(NetbackTest, GonePortIsDetachedAndForgotten) {
  auto& p0 = add(M(1));
  auto& p1 = add(M(2));
  p1.send(test::make_test_frame(100, M(1), M(2), 1));
  run();
  EXPECT_EQ(nb_->macs().size(), 1u);
  p1.alive_ = false;
  run();
  EXPECT_EQ(nb_->port_count(), 1u);
  EXPECT_EQ(nb_->macs().size(), 0u);
  EXPECT_EQ(nb_->totals().rx_frames, 1u) << "counters of a gone port stay in the totals";
  (void)p0;
}

TEST_F(NetbackTest, RateLimitedPortIsThrottledOthersAreNot) {
  // 3000 bytes per second: three 1000-byte frames use the first second up.
  auto& slow = add(M(1), true, false, rate_limit{3000, std::chrono::microseconds(1000000)});
  auto& fast = add(M(2));
  auto& sink = add(M(3));
  for (int i = 0; i < 20; ++i) {
    slow.send(test::make_test_frame(1000, M(3), M(1), i));
    fast.send(test::make_test_frame(1000, M(3), M(2), 100 + i));
  }
  run(5);
  size_t from_slow = 0, from_fast = 0;
  for (auto& f : sink.out) (test::test_frame_seq(f.bytes.data(), 1000) >= 100 ? from_fast : from_slow)++;
  EXPECT_EQ(from_fast, 20u);
  EXPECT_GE(from_slow, 3u);
  EXPECT_LE(from_slow, 4u) << "credit is checked before every frame";
  EXPECT_LT(from_slow, 20u);
  EXPECT_GT(nb_->totals().throttled, 0u);
}

TEST(RateLimiter, LongRunRateIsExactWhateverTheFrameSize) {
  using clock = rate_limiter::clock;
  auto t0 = clock::time_point{};
  // 100 Mbit/s as 12500 bytes per millisecond.
  rate_limiter rl(12500, std::chrono::microseconds(1000), t0);
  uint64_t sent = 0;
  auto t = t0;
  const uint32_t sizes[] = {64, 1514, 65000, 9014};
  int i = 0;
  while (t < t0 + std::chrono::seconds(1)) {
    if (rl.has_credit(t)) {
      uint32_t s = sizes[i++ % 4];
      rl.charge(s);
      sent += s;
    } else {
      t = rl.next_credit(t);
    }
  }
  EXPECT_NEAR(static_cast<double>(sent), 12.5e6, 65000 + 12500);
}

TEST(RateLimiter, ParsesLimits) {
  auto r = parse_rate_limit("12500/1000");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->bytes, 12500u);
  EXPECT_EQ(r->interval.count(), 1000);
  r = parse_rate_limit("100mbit");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->bytes, 12500u);
  EXPECT_EQ(r->interval.count(), 1000);
  for (const char* bad : {"", "0/10", "10/0", "10/", "abc", "100mb", "5/5x"}) EXPECT_FALSE(parse_rate_limit(bad)) << bad;
}

TEST(MacTable, AgesOutAndForgetsPorts) {
  using clock = mac_table::clock;
  mac_table t(2, std::chrono::seconds(10));
  auto t0 = clock::time_point{} + std::chrono::hours(1);
  t.learn(M(1), 0, t0);
  t.learn(M(2), 1, t0 + 5s);
  t.learn(M(3), 1, t0);  // full
  EXPECT_EQ(t.full_misses(), 1u);
  EXPECT_EQ(t.lookup(M(1), t0 + 9s), 0u);
  EXPECT_EQ(t.lookup(M(1), t0 + 11s), mac_table::no_port) << "aged out on lookup";
  EXPECT_EQ(t.age(t0 + 11s), 1u);
  EXPECT_EQ(t.lookup(M(2), t0 + 11s), 1u);
  t.learn(M(2), 0, t0 + 12s);
  EXPECT_EQ(t.lookup(M(2), t0 + 12s), 0u) << "a moved host is relearnt";
  t.forget_port(0);
  EXPECT_EQ(t.size(), 0u);
}

}  // namespace
