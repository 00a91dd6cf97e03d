// SPDX-License-Identifier: Apache-2.0
// Net over RDMA without a device: the hello a switch accepts, how received
// messages are classified, and the credit rules (simulated: no end ever
// sends into a receive that is not posted, and neither end waits forever).
#include <gtest/gtest.h>

#include <algorithm>
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

// The peer can use only the receives we announced: one reposted but not yet
// returned is not its to fill.
TEST(RdmaNetProto, ReceivesBeyondTheAnnouncedAreAViolation) {
  credit_window w;
  w.reset(8, 8);
  EXPECT_TRUE(w.received(8));
  EXPECT_FALSE(w.received(1));
  w.reposted(2);
  EXPECT_EQ(w.announced(), 0u);
  EXPECT_FALSE(w.received(1)) << "a receive reposted but not yet returned";
  EXPECT_EQ(w.take(), 2u);
  EXPECT_EQ(w.announced(), 2u);
  EXPECT_TRUE(w.received(2));
}

// R2: a peer that may be unable to send (fewer than two receives announced)
// is answered with whatever was reposted, not after a whole batch.
TEST(RdmaNetProto, PeerThatMayBeStuckGetsCreditsBelowTheBatch) {
  credit_window w;
  w.reset(128, 32);  // a batch is 16
  ASSERT_TRUE(w.received(127));  // the peer sent 127 frames and has one credit left
  w.reposted(1);                 // our application took one
  EXPECT_EQ(w.announced(), 1u);
  EXPECT_TRUE(w.grant_due()) << "the peer waits for this credit";
  EXPECT_EQ(w.take(), 1u);
  EXPECT_FALSE(w.grant_due());
  // With plenty announced, returns wait for a batch.
  credit_window v;
  v.reset(128, 32);
  ASSERT_TRUE(v.received(20));
  v.reposted(15);
  EXPECT_FALSE(v.grant_due());
  v.reposted(1);
  EXPECT_TRUE(v.grant_due());
  // And never with the last credit gone.
  while (v.credits()) v.take();
  v.reposted(4);
  EXPECT_FALSE(v.grant_due());
}

// Two ends as the transports run them: both may send frames; a frame's
// receive stays taken until the application reads it (at random times, and
// for long stretches not at all); anything else is reposted by the
// transport at once; credits go out by the rules after every change (R3).
struct sim_end {
  credit_window w;
  uint32_t depth = 0, posted = 0;
  std::deque<uint64_t> held;  // frames received, not yet read by the application
  uint64_t next_seq = 0, got = 0;
  bool reads = true;          // the application reads at all
};
struct sim_msg {
  bool frame;
  uint16_t credits;
  uint64_t seq;
};

struct sim {
  std::mt19937 rng;
  sim_end e[2];
  std::deque<sim_msg> wire[2];  // wire[i]: towards end i
  uint64_t credit_msgs = 0;

  sim(uint32_t da, uint32_t db, uint32_t seed) : rng(seed) {
    e[0].depth = e[0].posted = da;
    e[1].depth = e[1].posted = db;
    e[0].w.reset(da, db);
    e[1].w.reset(db, da);
  }
  void grant(int i) {  // R2, checked after every change (R3)
    if (e[i].w.grant_due()) {
      wire[1 - i].push_back({false, e[i].w.take(), 0});
      ++credit_msgs;
    }
  }
  bool send_frame(int i) {
    if (!e[i].w.may_send_data()) return false;
    wire[1 - i].push_back({true, e[i].w.take(), e[i].next_seq++});
    return true;
  }
  void deliver(int to) {
    sim_msg m = wire[to].front();
    wire[to].pop_front();
    sim_end& r = e[to];
    ASSERT_GT(r.posted, 0u) << "a message arrived with no receive posted (RNR)";
    --r.posted;
    ASSERT_TRUE(r.w.received(1)) << "the sender used a receive it was not given";
    ASSERT_TRUE(r.w.granted(m.credits));
    if (m.frame) {
      ASSERT_EQ(m.seq, r.got + r.held.size()) << "a frame was lost or reordered";
      r.held.push_back(m.seq);
      ASSERT_LT(r.held.size(), r.depth) << "frames filled every receive: no room left for credits";
    } else {
      ++r.posted;  // the transport reposts a credit message's receive at once
      r.w.reposted(1);
    }
    grant(to);
  }
  void read(int i, uint32_t budget) {
    sim_end& r = e[i];
    for (uint32_t k = 0; k < budget && !r.held.empty(); ++k) {
      r.held.pop_front();
      ++r.got;
      ++r.posted;
      r.w.reposted(1);
    }
    grant(i);
  }
  void step() {
    int i = static_cast<int>(rng() % 2);
    switch (rng() % 4) {
      case 0:
        send_frame(i);
        break;
      case 1:
        if (!wire[i].empty()) deliver(i);
        break;
      case 2:
      case 3:
        if (e[i].reads) read(i, 1 + rng() % 64);
        break;
    }
  }
  // Everything on the wire arrives, both applications read everything.
  void settle() {
    for (int round = 0; round < 64; ++round) {
      while (!wire[0].empty()) deliver(0);
      while (!wire[1].empty()) deliver(1);
      read(0, UINT32_MAX);
      read(1, UINT32_MAX);
      if (wire[0].empty() && wire[1].empty()) return;
    }
  }
};

void run_sim(uint32_t da, uint32_t db, uint32_t seed) {
  SCOPED_TRACE("depths " + std::to_string(da) + "/" + std::to_string(db) + ", seed " + std::to_string(seed));
  sim s(da, db, seed);
  for (int step = 0; step < 40000 && !::testing::Test::HasFatalFailure(); ++step) s.step();
  if (::testing::Test::HasFatalFailure()) return;
  // B's application stops reading. B's own frames must keep flowing (its
  // unread receives stop only what is sent to it), and A must never overrun it.
  s.e[1].reads = false;
  uint64_t b_sent = s.e[1].next_seq;
  for (int step = 0; step < 40000 && !::testing::Test::HasFatalFailure(); ++step) s.step();
  if (::testing::Test::HasFatalFailure()) return;
  EXPECT_GT(s.e[1].next_seq - b_sent, 50u) << "an end that does not read could not transmit";
  auto frames_on_wire = std::count_if(s.wire[1].begin(), s.wire[1].end(), [](const sim_msg& m) { return m.frame; });
  EXPECT_EQ(s.e[1].held.size() + frames_on_wire + s.e[1].got, s.e[0].next_seq) << "frames to B went missing";
  // It reads again: from wherever things stopped, both ends must be able to
  // send again, and every frame sent arrives.
  s.e[1].reads = true;
  s.settle();
  if (::testing::Test::HasFatalFailure()) return;
  EXPECT_TRUE(s.e[0].w.may_send_data()) << "end A starved";
  EXPECT_TRUE(s.e[1].w.may_send_data()) << "end B starved";
  EXPECT_EQ(s.e[1].got, s.e[0].next_seq) << "every frame A sent was read by B";
  EXPECT_EQ(s.e[0].got, s.e[1].next_seq) << "every frame B sent was read by A";
  EXPECT_GT(s.e[1].got, 50u) << "hardly anything went from A to B";
}

TEST(RdmaNetProto, CreditsNeverOverrunNeverLoseAndNeverDeadlock) {
  const uint32_t depths[][2] = {{4, 4}, {4, 128}, {128, 4}, {32, 128}, {128, 32}, {5, 7}, {1024, 4}};
  for (uint32_t seed = 1; seed <= 3; ++seed)
    for (const auto& d : depths) {
      run_sim(d[0], d[1], seed * 100 + d[0] + d[1]);
      if (HasFailure()) return;
    }
}

// A sender that only transmits, against a receiver whose application reads
// in bursts (the conformance suite's burst): the sender is never left
// without credit for longer than the receiver takes to read once.
TEST(RdmaNetProto, BulkSenderKeepsGoingWhileTheReaderReads) {
  for (const auto& d : {std::pair{128u, 32u}, std::pair{32u, 128u}, std::pair{4u, 4u}}) {
    sim s(d.first, d.second, 7);
    uint64_t stuck = 0, worst = 0;
    for (int step = 0; step < 20000 && !HasFatalFailure(); ++step) {
      if (s.send_frame(0)) {
        stuck = 0;
      } else {
        worst = std::max(worst, ++stuck);
      }
      if (!s.wire[1].empty()) s.deliver(1);
      if (!s.wire[0].empty()) s.deliver(0);
      if (step % 8 == 0) s.read(1, 64);
    }
    if (HasFatalFailure()) return;
    EXPECT_LE(worst, 16u) << "depths " << d.first << "/" << d.second;
    EXPECT_GT(s.e[0].next_seq, 5000u);
  }
}

}  // namespace
