// SPDX-License-Identifier: Apache-2.0
// Net over RDMA without a device: the hello a switch accepts, how received
// messages are classified, and the credit rules (simulated: no end ever
// sends into a receive that is not posted, and neither end waits forever).
#include <gtest/gtest.h>

#include <deque>
#include <random>

#include "transports/rdma/net_proto.hpp"

using namespace uvd;
using namespace uvd::rdma;

namespace {

net_hello good_hello() {
  net_hello h{};
  h.magic = net_magic;
  h.version = net_version;
  h.flags = net_hello_offload;
  h.depth = 32;
  const uint8_t mac[6] = {0x02, 0, 0, 0, 0, 1};
  std::memcpy(h.mac, mac, 6);
  h.mtu = 1500;
  h.max_msg = net_max_msg;
  std::snprintf(h.name, sizeof h.name, "vm1");
  return h;
}

int check(const net_hello& h, std::string* why = nullptr) {
  net_hello_view v;
  std::string w;
  int e = parse_hello(&h, sizeof h, net_hello_limits{.max_mtu = 9000}, &v, &w);
  if (why) *why = w;
  return e;
}

TEST(RdmaNetProto, GoodHelloParsed) {
  net_hello h = good_hello();
  net_hello_view v;
  std::string why;
  ASSERT_EQ(parse_hello(&h, sizeof h, {}, &v, &why), 0) << why;
  EXPECT_EQ(v.name, "vm1");
  EXPECT_EQ(v.mtu, 1500u);
  EXPECT_EQ(v.depth, 32u);
  EXPECT_TRUE(v.offload);
  // rdma_cm pads private data: longer is fine.
  uint8_t padded[92] = {};
  std::memcpy(padded, &h, sizeof h);
  EXPECT_EQ(parse_hello(padded, sizeof padded, {}, &v, &why), 0);
}

TEST(RdmaNetProto, BadHellosRefusedWithReason) {
  struct bad {
    const char* what;
    void (*spoil)(net_hello&);
    int err;
  };
  const bad cases[] = {
      {"magic", [](net_hello& h) { h.magic ^= 1; }, EPROTO},
      {"version", [](net_hello& h) { h.version = 2; }, EPROTONOSUPPORT},
      {"flags", [](net_hello& h) { h.flags |= 0x80; }, EINVAL},
      {"multicast mac", [](net_hello& h) { h.mac[0] = 0x01; }, EINVAL},
      {"zero mac", [](net_hello& h) { std::memset(h.mac, 0, 6); }, EINVAL},
      {"tiny mtu", [](net_hello& h) { h.mtu = 67; }, EINVAL},
      {"mtu over the switch's", [](net_hello& h) { h.mtu = 9001; }, EINVAL},
      {"depth 3", [](net_hello& h) { h.depth = 3; }, EINVAL},
      {"depth 5000", [](net_hello& h) { h.depth = 5000; }, EINVAL},
      {"buffers under the mtu", [](net_hello& h) { h.max_msg = 1000; }, EINVAL},
      {"buffers over the largest frame", [](net_hello& h) { h.max_msg = net_max_msg + 1; }, EINVAL},
      {"name with a space", [](net_hello& h) { std::snprintf(h.name, sizeof h.name, "a b"); }, EINVAL},
      {"unterminated name", [](net_hello& h) { std::memset(h.name, 'x', sizeof h.name); }, EINVAL},
  };
  for (const auto& c : cases) {
    net_hello h = good_hello();
    c.spoil(h);
    std::string why;
    EXPECT_EQ(check(h, &why), c.err) << c.what;
    EXPECT_FALSE(why.empty()) << c.what;
  }
  net_hello_view v;
  std::string why;
  net_hello h = good_hello();
  EXPECT_EQ(parse_hello(&h, sizeof h - 1, {}, &v, &why), EPROTO);
  EXPECT_EQ(parse_hello(nullptr, 0, {}, &v, &why), EPROTO);
}

TEST(RdmaNetProto, RefusalRoundTrips) {
  net_refusal r = make_refusal(EMFILE, "switch is full");
  int st = 0;
  std::string why;
  ASSERT_TRUE(parse_refusal(&r, sizeof r, &st, &why));
  EXPECT_EQ(st, EMFILE);
  EXPECT_EQ(why, "switch is full");
  r.magic = 0;
  EXPECT_FALSE(parse_refusal(&r, sizeof r, &st, &why));
}

std::vector<uint8_t> msg(net_msg_hdr h, std::vector<uint8_t> payload = {}) {
  std::vector<uint8_t> m(sizeof h);
  std::memcpy(m.data(), &h, sizeof h);
  m.insert(m.end(), payload.begin(), payload.end());
  return m;
}

net_rx_status classify(const std::vector<uint8_t>& m, bool to_switch = true) {
  net_rx_msg out;
  return parse_msg(m.data(), static_cast<uint32_t>(m.size()), to_switch, &out);
}

TEST(RdmaNetProto, MessagesClassified) {
  EXPECT_EQ(classify(msg(make_hdr(net_msg_frame), std::vector<uint8_t>(60))), net_rx_status::ok);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_credit))), net_rx_status::ok);
  EXPECT_EQ(classify(std::vector<uint8_t>(15)), net_rx_status::truncated);
  EXPECT_EQ(classify({}), net_rx_status::truncated);
  auto h = make_hdr(net_msg_frame);
  h.magic = 0x12345678;
  EXPECT_EQ(classify(msg(h)), net_rx_status::bad_msg);
  h = make_hdr(net_msg_frame);
  h.version = 9;
  EXPECT_EQ(classify(msg(h)), net_rx_status::bad_msg);
  EXPECT_EQ(classify(msg(make_hdr(static_cast<net_msg_type>(0)))), net_rx_status::bad_msg);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_hello))), net_rx_status::bad_msg) << "a hello is private data only";
  EXPECT_EQ(classify(msg(make_hdr(static_cast<net_msg_type>(99)))), net_rx_status::bad_msg);
  h = make_hdr(net_msg_frame);
  h.flags = 0x80;
  EXPECT_EQ(classify(msg(h, std::vector<uint8_t>(60))), net_rx_status::bad_msg);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_credit), {1})), net_rx_status::bad_msg);
  // mtu and link carry exactly a u32, and only towards the switch.
  EXPECT_EQ(classify(msg(make_hdr(net_msg_mtu), {0xdc, 5, 0, 0})), net_rx_status::ok);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_mtu), {0xdc, 5})), net_rx_status::truncated);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_mtu), {0xdc, 5, 0, 0, 0})), net_rx_status::bad_msg);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_mtu), {0xdc, 5, 0, 0}), false), net_rx_status::bad_msg);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_link), {1, 0, 0, 0})), net_rx_status::ok);
  EXPECT_EQ(classify(msg(make_hdr(net_msg_link), {2, 0, 0, 0})), net_rx_status::bad_msg);
}

TEST(RdmaNetProto, FrameMetadataRoundTrips) {
  core::veth_frame f{};
  f.flags = core::VETH_FRAME_CSUM_PARTIAL | core::VETH_FRAME_GSO;
  f.csum_start = 34;
  f.csum_offset = 16;
  f.gso_size = 1448;
  f.gso_type = 1;
  net_msg_hdr h;
  frame_to_hdr(f, &h);
  EXPECT_EQ(h.type, net_msg_frame);
  core::veth_frame g{};
  hdr_to_frame(h, &g);
  EXPECT_EQ(g.flags, f.flags);
  EXPECT_EQ(g.csum_start, 34);
  EXPECT_EQ(g.csum_offset, 16);
  EXPECT_EQ(g.gso_size, 1448);
  EXPECT_EQ(g.gso_type, 1);
}

TEST(RdmaNetProto, CreditsBeyondDepthAreAViolation) {
  credit_window w;
  w.reset(16, 8);
  EXPECT_EQ(w.credits(), 8u);
  EXPECT_FALSE(w.granted(1)) << "8 credits of a depth of 8 is all there is";
  w.take();
  EXPECT_TRUE(w.granted(1));
  EXPECT_FALSE(w.granted(1));
}

// Two ends, both always wanting to send, with messages delivered, held by
// the receiver and reposted in random order and at random times.
struct sim_end {
  credit_window w;
  uint32_t depth = 0, posted = 0;
  std::deque<bool> held;  // consumed receives not yet reposted
  uint64_t sent_data = 0, got_data = 0;
};
struct sim_msg {
  bool data;
  uint16_t credits;
};

void run_sim(uint32_t da, uint32_t db, bool b_sends, uint32_t seed) {
  std::mt19937 rng(seed);
  sim_end e[2];
  e[0].depth = e[0].posted = da;
  e[1].depth = e[1].posted = db;
  e[0].w.reset(da, db);
  e[1].w.reset(db, da);
  std::deque<sim_msg> wire[2];  // wire[i]: towards end i
  auto deliver = [&](int to) {
    sim_msg m = wire[to].front();
    wire[to].pop_front();
    ASSERT_GT(e[to].posted, 0u) << "a message arrived with no receive posted";
    --e[to].posted;
    ASSERT_TRUE(e[to].w.granted(m.credits));
    if (m.data) {
      ++e[to].got_data;
      e[to].held.push_back(true);
    } else {
      ++e[to].posted;  // a credit message's buffer goes straight back
      e[to].w.reposted(1);
    }
  };
  auto service = [&](int i) {  // what an end does whenever it runs
    while (!e[i].held.empty()) {
      e[i].held.pop_front();
      ++e[i].posted;
      e[i].w.reposted(1);
    }
    if (e[i].w.grant_due()) wire[1 - i].push_back({false, e[i].w.take()});
  };
  for (int step = 0; step < 50000; ++step) {
    int i = static_cast<int>(rng() % 2);
    switch (rng() % 4) {
      case 0:
        if ((i == 0 || b_sends) && e[i].w.may_send_data()) {
          wire[1 - i].push_back({true, e[i].w.take()});
          ++e[i].sent_data;
        }
        break;
      case 1:
        if (!wire[i].empty()) deliver(i);
        break;
      case 2:
        if (!e[i].held.empty() && rng() % 2) {
          e[i].held.pop_front();
          ++e[i].posted;
          e[i].w.reposted(1);
        }
        break;
      case 3:
        service(i);
        break;
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Liveness: from wherever it stopped, the ends serving each other must let
  // both send again (neither waits on the other forever).
  for (int round = 0; round < 64; ++round) {
    while (!wire[0].empty()) deliver(0);
    while (!wire[1].empty()) deliver(1);
    service(0);
    service(1);
    if (e[0].w.may_send_data() && (!b_sends || e[1].w.may_send_data())) break;
  }
  EXPECT_TRUE(e[0].w.may_send_data()) << "end A starved (seed " << seed << ")";
  if (b_sends) {
    EXPECT_TRUE(e[1].w.may_send_data()) << "end B starved (seed " << seed << ")";
  }
  EXPECT_GT(e[1].got_data, 200u);
  EXPECT_EQ(e[1].got_data, e[0].sent_data) << "every frame sent was delivered";
}

TEST(RdmaNetProto, CreditsNeverOverrunAndNeverDeadlock) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    run_sim(4, 4, true, seed);
    run_sim(32, 4, true, seed + 100);
    run_sim(4, 64, false, seed + 200);
    run_sim(32, 32, false, seed + 300);
    if (HasFailure()) return;
  }
}

}  // namespace
