// SPDX-License-Identifier: Apache-2.0
// A hostile front end against the switch's RDMA ports: bad hellos, garbage
// messages, truncated, runt, oversize and forged frames, lies about credits,
// a message over the switch's buffers. Each is refused or dropped and
// counted; the port dies only when the queue pair cannot go on; two
// well-behaved front ends keep talking through the same switch throughout.
// Needs an RDMA device (the Soft-RoCE guest of tests/e2e/rdma_net, which sets
// $UVD_RDMA_PEER_ADDR for the switch and $UVD_RDMA_ADDR for the front ends);
// elsewhere it skips, saying so.
#include <gtest/gtest.h>
#include <netdb.h>

#include <cstdlib>
#include <random>
#include <thread>

#include "net/netback.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/rdma/net_proto.hpp"
#include "transports/rdma/net_rdma.hpp"
#include "transports/rdma/verbs.hpp"

using namespace uvd;
using namespace uvd::rdma;
using namespace std::chrono_literals;

namespace {

const net::mac_addr evil_mac{{0x02, 0x00, 0x00, 0x00, 0xee, 0x01}};
constexpr uint32_t evil_depth = 16, evil_msg = 2048, slot = 4096, nslots = 64;

// A front end that speaks the protocol by hand, saying whatever it likes.
class raw_peer {
 public:
  // 0 connected; a positive errno the switch refused with (why set); -errno otherwise.
  int connect(const std::string& host, const std::string& port, const std::string& src, const net_hello& h) {
    ch_.reset(rdma_create_event_channel());
    if (!ch_) return -errno;
    rdma_cm_id* id = nullptr;
    if (rdma_create_id(ch_.get(), &id, nullptr, RDMA_PS_TCP) != 0) return -errno;
    id_.reset(id);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo *dst = nullptr, *sa = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &dst) != 0) return -EHOSTUNREACH;
    if (!src.empty()) getaddrinfo(src.c_str(), nullptr, nullptr, &sa);
    int rc = rdma_resolve_addr(id, sa ? sa->ai_addr : nullptr, dst->ai_addr, 3000);
    freeaddrinfo(dst);
    if (sa) freeaddrinfo(sa);
    if (rc != 0 || !expect_cm_event(ch_.get(), RDMA_CM_EVENT_ADDR_RESOLVED, 5000)) return -EHOSTUNREACH;
    if (rdma_resolve_route(id, 3000) != 0 || !expect_cm_event(ch_.get(), RDMA_CM_EVENT_ROUTE_RESOLVED, 5000))
      return -ENETUNREACH;
    pd_.reset(ibv_alloc_pd(id->verbs));
    cq_.reset(ibv_create_cq(id->verbs, 256, nullptr, nullptr, 0));
    if (!pd_ || !cq_) return -ENOMEM;
    if (!create_rc_qp(id, pd_.get(), cq_.get(), nslots, evil_depth, 1)) return -EIO;
    auto b = registered_buffer::make(pd_.get(), evil_depth * evil_msg + nslots * slot, IBV_ACCESS_LOCAL_WRITE, "raw");
    if (!b) return -ENOMEM;
    buf_ = std::move(*b);
    for (uint32_t i = 0; i < evil_depth; ++i)
      if (post_recv(id->qp, i, buf_.data() + i * evil_msg, evil_msg, buf_.lkey()) != 0) return -EIO;
    rdma_conn_param cp{};
    cp.private_data = &h;
    cp.private_data_len = sizeof h;
    cp.retry_count = 7;
    cp.rnr_retry_count = 7;
    if (rdma_connect(id, &cp) != 0) return -errno;
    auto ev = next_cm_event(ch_.get(), 5000);
    if (!ev) return -ETIMEDOUT;
    if (ev->type == RDMA_CM_EVENT_REJECTED) {
      int st = 0;
      if (!parse_refusal(ev->private_data.data(), ev->private_data.size(), &st, &why)) return -ECONNREFUSED;
      return st;
    }
    if (ev->type != RDMA_CM_EVENT_ESTABLISHED) return -ECONNABORTED;
    if (parse_welcome(ev->private_data.data(), ev->private_data.size(), &welcome, &why) != 0) return -EPROTO;
    credits_ = welcome.depth;
    return 0;
  }

  // Posts one message as is; waits for credit first when `obey` (two
  // credits, the last kept for credit messages, as the protocol says).
  // Returns false when the connection broke.
  bool send(const void* m, uint32_t len, bool obey = true) {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (outstanding_ >= nslots || (obey && credits_ < 2)) {
      if (!pump() || std::chrono::steady_clock::now() > deadline) return false;
      if (obey && credits_ == 1 && pending_) grant();
    }
    std::byte* p = buf_.data() + evil_depth * evil_msg + (next_slot_++ % nslots) * slot;
    if (len) std::memcpy(p, m, std::min(len, slot));
    ibv_sge sge{reinterpret_cast<uintptr_t>(p), len, buf_.lkey()};
    ibv_send_wr wr{};
    wr.wr_id = 1000;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(id_->qp, &wr, &bad) != 0) return false;
    ++outstanding_;
    if (credits_) --credits_;
    if (obey && pending_ >= 4 && credits_ >= 2) grant();
    return true;
  }
  bool send(const std::vector<uint8_t>& m, bool obey = true) { return send(m.data(), static_cast<uint32_t>(m.size()), obey); }

  // Returns our reposted receives to the switch.
  void grant() {
    net_msg_hdr h = make_hdr(net_msg_credit);
    h.credits = static_cast<uint16_t>(pending_);
    pending_ = 0;
    send(&h, sizeof h, false);
  }

  // Reaps completions; receives are reposted at once and their credits
  // counted. False once a completion failed.
  bool pump() {
    ibv_wc wc[32];
    int n = ibv_poll_cq(cq_.get(), 32, wc);
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        failed_status = wc[i].status;
        return false;
      }
      if (wc[i].wr_id == 1000) {
        --outstanding_;
        continue;
      }
      net_rx_msg m;
      if (parse_msg(reinterpret_cast<const uint8_t*>(buf_.data()) + wc[i].wr_id * evil_msg, wc[i].byte_len, false, &m) ==
          net_rx_status::ok)
        credits_ += m.hdr.credits;
      post_recv(id_->qp, wc[i].wr_id, buf_.data() + wc[i].wr_id * evil_msg, evil_msg, buf_.lkey());
      ++pending_;
    }
    return n >= 0;
  }

  // Waits until every send completed; false when one failed.
  bool drain() {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (outstanding_ && std::chrono::steady_clock::now() < deadline)
      if (!pump()) return false;
    return outstanding_ == 0;
  }

  // The switch hung up on us.
  bool disconnected(std::chrono::milliseconds within) {
    auto deadline = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < deadline) {
      auto ev = next_cm_event(ch_.get(), 100);
      if (ev && ev->type == RDMA_CM_EVENT_DISCONNECTED) return true;
    }
    return false;
  }

  net_welcome welcome{};
  std::string why;
  int failed_status = 0;

 private:
  cm_channel_ptr ch_;
  pd_ptr pd_;
  cq_ptr cq_;
  registered_buffer buf_;
  cm_id_ptr id_;  // destroyed first (its queue pair with it)
  uint32_t credits_ = 0, pending_ = 0, outstanding_ = 0, next_slot_ = 0;
};

net_hello evil_hello() {
  net_hello h{};
  h.magic = net_magic;
  h.version = net_version;
  h.depth = evil_depth;
  std::memcpy(h.mac, evil_mac.data(), 6);
  h.mtu = 1500;
  h.max_msg = evil_msg;
  std::snprintf(h.name, sizeof h.name, "evil");
  return h;
}

std::vector<uint8_t> frame_msg(const std::vector<uint8_t>& frame, uint8_t flags = 0, uint16_t csum_start = 0) {
  net_msg_hdr h = make_hdr(net_msg_frame);
  h.flags = flags;
  h.csum_start = csum_start;
  std::vector<uint8_t> m(sizeof h);
  std::memcpy(m.data(), &h, sizeof h);
  m.insert(m.end(), frame.begin(), frame.end());
  return m;
}

std::vector<uint8_t> ctl_msg(net_msg_type t, std::vector<uint8_t> payload, uint8_t version = net_version,
                             uint32_t magic = net_magic) {
  net_msg_hdr h = make_hdr(t);
  h.version = version;
  h.magic = magic;
  std::vector<uint8_t> m(sizeof h);
  std::memcpy(m.data(), &h, sizeof h);
  m.insert(m.end(), payload.begin(), payload.end());
  return m;
}

uint64_t field(const std::string& text, const std::string& line_prefix, const std::string& key) {
  auto at = text.find(line_prefix);
  if (at == std::string::npos) return 0;
  auto k = text.find(" " + key + "=", at);
  if (k == std::string::npos || text.find('\n', at) < k) return 0;
  return std::stoull(text.substr(k + key.size() + 2));
}

bool is_test(const uint8_t* f, uint32_t len) { return len >= 14 && net::frame_ethertype(f) == test::test_ethertype; }

class RdmaNetHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!have_rdma_device(&why)) GTEST_SKIP() << "RdmaNetHostile needs an RDMA device: " << why
                                              << " (the Soft-RoCE guest runs it: ctest -L e2e -R RdmaNet)";
    const char* server = std::getenv("UVD_RDMA_PEER_ADDR");
    const char* client = std::getenv("UVD_RDMA_ADDR");
    if (!server || !*server) GTEST_SKIP() << "set UVD_RDMA_PEER_ADDR (switch) and UVD_RDMA_ADDR (front ends)";
    host_ = server;
    src_ = client ? client : "";
    auto nb = net::Netback::create();
    ASSERT_TRUE(nb);
    nb_ = std::move(*nb);
    sock_ = dir_.file("switch.sock");
    auto l = daemon::listen(sock_, {});  // for the statistics
    ASSERT_TRUE(l) << l.err().what();
    nb_->add_source(std::move(*l));
    net_listen_options o;
    o.listen = {host_ + ":0"};
    net::port_source* src = nullptr;
    uint16_t port = 0;
    char err[256] = "";
    ASSERT_EQ(net_entry()->listen(&o, &src, &port, 1, err, sizeof err), 0) << err;
    nb_->add_source(std::unique_ptr<net::port_source>(src));
    port_ = std::to_string(port);
    loop_ = std::thread([this] { (void)nb_->run(); });
    std::string base = host_ + ":" + port_;
    for (const char* name : {"a", "b"}) {
      net::veth_options vo;
      vo.options = std::string("name=") + name + (src_.empty() ? "" : "&src=" + src_);
      auto v = net::Veth::open(rdma_net_veth_ops, base, vo);
      ASSERT_TRUE(v) << v.err().what();
      (name[0] == 'a' ? a_ : b_) = std::move(*v);
    }
  }
  void TearDown() override {
    a_.reset();
    b_.reset();
    if (nb_) nb_->stop();
    if (loop_.joinable()) loop_.join();
  }

  std::string stats() {
    auto t = daemon::query_stats(sock_);
    return t ? *t : std::string();
  }
  // Waits until the switch's statistics satisfy ok (they trail the wire).
  std::string wait_stats(const std::function<bool(const std::string&)>& ok) {
    std::string t;
    for (int i = 0; i < 200; ++i) {
      t = stats();
      if (ok(t)) break;
      std::this_thread::sleep_for(50ms);
    }
    return t;
  }

  // The well-behaved pair still talks through the switch. The hostile
  // peer's frames to unknown destinations were flooded to both, as a
  // learning switch does: b reads its share first (a full rx ring rightly
  // stops delivery to it); a's stays unread, which must not stop a's
  // transmit (the switch keeps a receive free for its credits).
  void good_pair_delivers(uint32_t seq) {
    std::vector<core::veth_frame> junk(64);
    for (auto quiet = std::chrono::steady_clock::now(); std::chrono::steady_clock::now() - quiet < 300ms;) {
      if (b_->rx_burst(0, junk.data(), 64))
        quiet = std::chrono::steady_clock::now();
      else
        test::wait_veth(*b_, 5ms);
    }
    std::vector<std::vector<uint8_t>> frames;
    for (uint32_t i = 0; i < 20; ++i) frames.push_back(test::make_test_frame(100 + i * 50, b_->mac(), a_->mac(), seq + i));
    ASSERT_EQ(test::send_frames(*a_, frames), frames.size());
    auto got = test::receive_frames(*b_, frames.size(), 10s, is_test);
    ASSERT_EQ(got.size(), frames.size()) << "the good front ends lost frames\n" << stats();
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].bytes, frames[i]);
  }

  test::temp_dir dir_;
  std::string host_, src_, port_, sock_;
  std::unique_ptr<net::Netback> nb_;
  std::thread loop_;
  std::unique_ptr<net::Veth> a_, b_;
};

TEST_F(RdmaNetHostile, BadHellosRefusedWithReasons) {
  struct bad {
    const char* what;
    void (*spoil)(net_hello&);
    int err;
  };
  const bad cases[] = {
      {"bad magic", [](net_hello& h) { h.magic = 0x3346'4c33; }, EPROTO},
      {"version 2", [](net_hello& h) { h.version = 2; }, EPROTONOSUPPORT},
      {"multicast MAC", [](net_hello& h) { h.mac[0] = 0x01; }, EINVAL},
      {"zero MAC", [](net_hello& h) { std::memset(h.mac, 0, 6); }, EINVAL},
      {"MTU 70000", [](net_hello& h) { h.mtu = 70000; }, EINVAL},
      {"depth 1", [](net_hello& h) { h.depth = 1; }, EINVAL},
      {"buffers under the MTU", [](net_hello& h) { h.max_msg = 200; }, EINVAL},
      {"unprintable name", [](net_hello& h) { h.name[0] = '\n'; }, EINVAL},
  };
  for (const auto& c : cases) {
    raw_peer p;
    net_hello h = evil_hello();
    c.spoil(h);
    EXPECT_EQ(p.connect(host_, port_, src_, h), c.err) << c.what << ": " << p.why;
    EXPECT_FALSE(p.why.empty()) << c.what;
  }
  good_pair_delivers(0);
  EXPECT_NE(stats().find("total ports=2 "), std::string::npos) << stats();
}

TEST_F(RdmaNetHostile, BadMessagesDroppedAndCounted) {
  raw_peer p;
  ASSERT_EQ(p.connect(host_, port_, src_, evil_hello()), 0) << p.why;
  const net::mac_addr dst = b_->mac();
  auto good = test::make_test_frame(200, dst, evil_mac, 777);
  auto forged = test::make_test_frame(200, dst, a_->mac(), 778);
  auto mcast_src = test::make_test_frame(200, dst, net::broadcast_mac, 779);
  auto vlan = test::make_test_frame(200, dst, evil_mac, 780);
  vlan[12] = 0x81;
  vlan[13] = 0x00;
  const std::vector<std::vector<uint8_t>> msgs = {
      std::vector<uint8_t>(8, 0x55),                                        // truncated: under a header
      ctl_msg(net_msg_frame, std::vector<uint8_t>(60), net_version, 0xdead),  // bad magic
      ctl_msg(net_msg_frame, std::vector<uint8_t>(60), 2),                  // bad version
      ctl_msg(static_cast<net_msg_type>(99), {}),                           // unknown type
      frame_msg(good, 0x80),                                                // unknown frame flags
      ctl_msg(net_msg_mtu, {1, 2}),                                         // truncated mtu
      ctl_msg(net_msg_mtu, {10, 0, 0, 0}),                                  // MTU 10
      ctl_msg(net_msg_link, {7, 0, 0, 0}),                                  // link 7
      ctl_msg(net_msg_credit, {1, 2, 3}),                                   // credit with a body
      frame_msg(std::vector<uint8_t>(10, 0xee)),                            // runt
      frame_msg(test::make_test_frame(1500 + 14 + 1, dst, evil_mac, 781)),  // over its MTU
      frame_msg(forged),                                                    // someone else's MAC
      frame_msg(mcast_src),                                                 // multicast source
      frame_msg(vlan),                                                      // tagged on an access port
      frame_msg(good, net_frame_csum_partial, 199),                         // checksum past the end
      frame_msg(good),                                                      // and one good frame
  };
  for (const auto& m : msgs) ASSERT_TRUE(p.send(m)) << "status " << p.failed_status;
  ASSERT_TRUE(p.drain());
  auto got = test::receive_frames(*b_, 1, 10s, is_test);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].bytes, good);
  auto t = wait_stats([](const std::string& s) { return field(s, "name=evil ", "rx_dropped") >= 15; });
  const std::string evil = "name=evil ";
  EXPECT_EQ(field(t, evil, "rx_truncated"), 2u) << t;
  EXPECT_EQ(field(t, evil, "rx_bad_msg"), 7u) << t;
  EXPECT_EQ(field(t, evil, "rx_runt"), 1u) << t;
  EXPECT_EQ(field(t, evil, "rx_oversize"), 1u) << t;
  EXPECT_EQ(field(t, evil, "rx_bad_mac"), 2u) << t;
  EXPECT_EQ(field(t, evil, "rx_vlan"), 1u) << t;
  EXPECT_EQ(field(t, evil, "rx_bad_offload"), 1u) << t;
  EXPECT_EQ(field(t, evil, "rx_frames"), 1u) << t;
  EXPECT_EQ(field(t, evil, "rx_dropped"), 15u) << t;
  good_pair_delivers(100);

  // A sweep of random messages, within the credits: every one is dropped and
  // counted or switched, and the port stays.
  std::mt19937 rng(5);
  constexpr uint32_t sweep = 3000;
  for (uint32_t i = 0; i < sweep; ++i) {
    std::vector<uint8_t> m(rng() % 200);
    for (auto& c : m) c = static_cast<uint8_t>(rng());
    if (m.size() >= sizeof(net_msg_hdr) && rng() % 2) {  // a plausible header, hostile fields
      net_msg_hdr h = make_hdr(rng() % 3 ? net_msg_frame : static_cast<net_msg_type>(6 + rng() % 250));
      h.flags = static_cast<uint8_t>(rng() % 2 ? 0 : rng());
      h.gso_type = static_cast<uint8_t>(rng());
      h.gso_size = static_cast<uint16_t>(rng());
      h.csum_start = static_cast<uint16_t>(rng() % 256);
      h.csum_offset = static_cast<uint16_t>(rng() % 64);
      std::memcpy(m.data(), &h, sizeof h);
      if (m.size() >= sizeof h + 14 && rng() % 2) {  // from its own MAC, not a test frame
        std::memcpy(m.data() + sizeof h + 6, evil_mac.data(), 6);
        m[sizeof h + 12] = 0x08;
        m[sizeof h + 13] = 0x00;
      }
    }
    ASSERT_TRUE(p.send(m)) << "message " << i << ", status " << p.failed_status;
  }
  ASSERT_TRUE(p.drain());
  t = wait_stats([&](const std::string& s) {
    return field(s, evil, "rx_dropped") + field(s, evil, "rx_frames") >= 16 + sweep;
  });
  EXPECT_EQ(field(t, evil, "rx_dropped") + field(t, evil, "rx_frames"), 16 + sweep) << t;
  good_pair_delivers(200);
}

TEST_F(RdmaNetHostile, CreditLieDropsOnlyThatPort) {
  raw_peer p;
  ASSERT_EQ(p.connect(host_, port_, src_, evil_hello()), 0) << p.why;
  auto before = stats();
  net_msg_hdr h = make_hdr(net_msg_credit);
  h.credits = 1000;  // it posted 16
  ASSERT_TRUE(p.send(&h, sizeof h));
  EXPECT_TRUE(p.disconnected(10s)) << "the switch kept a port that lied about its credits";
  auto t = wait_stats([](const std::string& s) { return s.find("total ports=2 ") != std::string::npos; });
  EXPECT_EQ(field(t, "total", "rx_bad_msg"), field(before, "total", "rx_bad_msg") + 1) << t;
  good_pair_delivers(300);
}

TEST_F(RdmaNetHostile, MessageOverTheBuffersDropsOnlyThatPort) {
  raw_peer p;
  ASSERT_EQ(p.connect(host_, port_, src_, evil_hello()), 0) << p.why;
  ASSERT_LE(p.welcome.max_msg + 100, slot);
  auto m = frame_msg(test::make_test_frame(p.welcome.max_msg + 100 - sizeof(net_msg_hdr), b_->mac(), evil_mac, 1));
  ASSERT_TRUE(p.send(m));
  EXPECT_FALSE(p.drain()) << "a message over the switch's receive buffers completed";
  auto t = wait_stats([](const std::string& s) { return s.find("total ports=2 ") != std::string::npos; });
  EXPECT_NE(t.find("total ports=2 "), std::string::npos) << t;
  EXPECT_EQ(field(t, "total", "rx_oversize"), 1u) << t;
  good_pair_delivers(400);
}

TEST_F(RdmaNetHostile, FrontEndsComeAndGo) {
  // Connect-and-vanish many times; the switch neither leaks ports nor stops.
  for (int i = 0; i < 20; ++i) {
    raw_peer p;
    net_hello h = evil_hello();
    h.mac[5] = static_cast<uint8_t>(0x10 + i);
    ASSERT_EQ(p.connect(host_, port_, src_, h), 0) << p.why;
  }
  auto t = wait_stats([](const std::string& s) { return s.find("total ports=2 ") != std::string::npos; });
  EXPECT_NE(t.find("total ports=2 "), std::string::npos) << t;
  good_pair_delivers(500);
}

}  // namespace
