// SPDX-License-Identifier: Apache-2.0
// The generic front half over the loopback rings and over a scripted
// transport that stays full until reset.
#include "net/veth.hpp"

#include <gtest/gtest.h>
#include <poll.h>

#include <cstring>
#include <thread>

#include "net/loop_veth.hpp"
#include "tests/net/net_testutil.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

// A transport that takes three frames and then nothing until the watchdog resets it.
struct script_dev {
  uint32_t room = 0;
  uint32_t taken = 0;
  int resets = 0;
  const core::veth_host* host = nullptr;
};
int s_open(const core::veth_open_params* p, void** h) {
  auto* d = new script_dev();
  d->host = p->host;
  d->room = 3;
  *h = d;
  return 0;
}
void s_close(void* h) { delete static_cast<script_dev*>(h); }
int s_caps(void*, core::veth_caps* c) {
  *c = core::veth_caps{.min_mtu = 68, .max_mtu = 4000, .nqueues = 1};
  return 0;
}
int s_xmit(void* h, uint32_t, core::veth_frame* const*, uint32_t n) {
  auto* d = static_cast<script_dev*>(h);
  uint32_t k = std::min(n, d->room);
  d->room -= k;
  d->taken += k;
  return static_cast<int>(k);
}
int s_rx(void*, uint32_t, core::veth_frame*, uint32_t) { return 0; }
int s_timeout(void* h, uint32_t) {
  auto* d = static_cast<script_dev*>(h);
  ++d->resets;
  d->room = 100;
  return 0;
}
const core::veth_ops script_ops{.abi_version = core::VETH_ABI_VERSION, .struct_size = sizeof(core::veth_ops),
                                .name = "script", .description = "test", .open = s_open, .close = s_close,
                                .caps = s_caps, .xmit = s_xmit, .rx_poll = s_rx, .tx_timeout = s_timeout};

const net::mac_addr B{{0x02, 0, 0, 0, 0, 2}};

}  // namespace

TEST(Veth, RefusesBadOptions) {
  net::veth_options o;
  o.mtu = 60000;
  auto v = net::Veth::open(net::loop_veth_ops, "", o);
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("outside"), std::string::npos) << v.err().message;
  o = {};
  o.mac = net::broadcast_mac;
  EXPECT_FALSE(net::Veth::open(net::loop_veth_ops, "", o));
  o = {};
  o.nqueues = 0;
  EXPECT_FALSE(net::Veth::open(net::loop_veth_ops, "", o));
  o = {};
  o.options = "depth=abc";
  v = net::Veth::open(net::loop_veth_ops, "", o);
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("depth"), std::string::npos);
}

TEST(Veth, TakesTheMacItIsGiven) {
  net::veth_options o;
  o.mac = *net::parse_mac("02:11:22:33:44:55");
  auto v = net::Veth::open(net::loop_veth_ops, "", o);
  ASSERT_TRUE(v);
  EXPECT_EQ((*v)->mac().to_string(), "02:11:22:33:44:55");
}

TEST(Veth, QueueStopsWhenFullAndWatchdogResets) {
  net::veth_options o;
  o.tx_timeout = 50ms;
  auto v = net::Veth::open(script_ops, "", o);
  ASSERT_TRUE(v) << v.err().what();
  auto& veth = **v;
  std::vector<std::vector<uint8_t>> frames;
  for (int i = 0; i < 5; ++i) frames.push_back(test::make_test_frame(100, B, veth.mac(), i));
  std::vector<core::veth_frame> d(5);
  std::vector<core::veth_frame*> p(5);
  for (int i = 0; i < 5; ++i) {
    d[i] = {.data = frames[i].data(), .len = 100};
    p[i] = &d[i];
  }
  EXPECT_EQ(veth.tx_burst(0, p.data(), 5), 3u);
  EXPECT_TRUE(veth.tx_stopped(0));
  EXPECT_EQ(veth.tx_burst(0, p.data() + 3, 2), 0u);
  EXPECT_EQ(veth.stats().tx_queue_stops, 1u);
  std::this_thread::sleep_for(80ms);
  veth.watchdog();
  EXPECT_FALSE(veth.tx_stopped(0));
  EXPECT_EQ(veth.stats().tx_timeouts, 1u);
  EXPECT_EQ(veth.tx_burst(0, p.data() + 3, 2), 2u);
  auto s = veth.stats();
  EXPECT_EQ(s.tx_packets, 5u);
  EXPECT_EQ(s.tx_bytes, 500u);
}

TEST(Veth, RxValidatesFramesFromTheTransport) {
  // A loop with offload off cannot carry GSO frames, but the rx checks are
  // the front half's: push frames of each kind through a loop Veth whose
  // MTU then shrinks, so they arrive larger than the MTU.
  auto v = net::Veth::open(net::loop_veth_ops, "", {});
  ASSERT_TRUE(v);
  auto& veth = **v;
  auto big = test::make_test_frame(1514, B, veth.mac(), 1);
  auto ok = test::make_test_frame(600, B, veth.mac(), 2);
  core::veth_frame d[2] = {{.data = big.data(), .len = 1514}, {.data = ok.data(), .len = 600}};
  core::veth_frame* p[2] = {&d[0], &d[1]};
  ASSERT_EQ(veth.tx_burst(0, p, 2), 2u);
  ASSERT_TRUE(veth.set_mtu(1000));
  core::veth_frame out[8];
  uint32_t n = veth.rx_burst(0, out, 8);
  ASSERT_EQ(n, 1u);
  EXPECT_EQ(out[0].len, 600u);
  auto s = veth.stats();
  EXPECT_EQ(s.rx_length_errors, 1u);
  EXPECT_EQ(s.rx_errors, 1u);
  EXPECT_EQ(s.rx_packets, 1u);
}

TEST(Veth, NapiBudgetLeavesWorkPending) {
  auto v = net::Veth::open(net::loop_veth_ops, "", {});
  ASSERT_TRUE(v);
  auto& veth = **v;
  std::vector<std::vector<uint8_t>> frames;
  for (int i = 0; i < 100; ++i) frames.push_back(test::make_test_frame(64, B, veth.mac(), i));
  ASSERT_EQ(test::send_frames(veth, frames), 100u);
  core::veth_frame out[64];
  EXPECT_EQ(veth.rx_burst(0, out, 30), 30u);
  EXPECT_TRUE(veth.rx_pending(0)) << "a poll that used its budget leaves the queue scheduled";
  EXPECT_EQ(veth.rx_burst(0, out, 64), 64u);
  EXPECT_EQ(veth.rx_burst(0, out, 64), 6u);
  EXPECT_FALSE(veth.rx_pending(0));
  EXPECT_EQ(veth.rx_burst(0, out, 64), 0u);
}

TEST(Veth, EventFdFiresOnRxAndTxWake) {
  net::veth_options o;
  o.options = "depth=2";
  auto v = net::Veth::open(net::loop_veth_ops, "", o);
  ASSERT_TRUE(v);
  auto& veth = **v;
  veth.clear_events();
  std::vector<std::vector<uint8_t>> frames;
  for (int i = 0; i < 3; ++i) frames.push_back(test::make_test_frame(64, B, veth.mac(), i));
  core::veth_frame d[3];
  core::veth_frame* p[3];
  for (int i = 0; i < 3; ++i) {
    d[i] = {.data = frames[i].data(), .len = 64};
    p[i] = &d[i];
  }
  EXPECT_EQ(veth.tx_burst(0, p, 3), 2u);
  EXPECT_TRUE(veth.tx_stopped(0));
  pollfd pf{veth.event_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&pf, 1, 0), 1) << "rx_ready signalled";
  veth.clear_events();
  core::veth_frame out[4];
  EXPECT_EQ(veth.rx_burst(0, out, 1), 1u);
  EXPECT_FALSE(veth.tx_stopped(0)) << "draining the ring wakes the queue";
  EXPECT_EQ(::poll(&pf, 1, 0), 1);
  EXPECT_EQ(veth.stats().tx_queue_wakes, 1u);
}
