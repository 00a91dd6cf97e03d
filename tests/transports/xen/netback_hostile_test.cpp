// SPDX-License-Identifier: Apache-2.0
// The netif back end against a front end that writes raw tx requests: every
// malformed one is answered NETIF_RSP_ERROR (its extra-info slots
// NETIF_RSP_NULL), counted, and nothing reaches the switch; an impossible
// ring index drops only that interface.
#include <poll.h>

#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "net/netback.hpp"
#include "net/veth.hpp"
#include "tests/net/net_testutil.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/xen/local/local.hpp"
#include "transports/xen/netif.hpp"
#include "transports/xen/vif_back.hpp"

using namespace uvd;
using namespace uvd::xen;

namespace {

const net::mac_addr raw_mac{{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}};

class NetbackHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    auto h = local_hub::start(dir_.file("hub.sock"));
    ASSERT_TRUE(h);
    hub_ = std::move(*h);
    auto hv0 = open_local_hypervisor(hub_->socket_path(), 0);
    ASSERT_TRUE(hv0);
    auto vb = vif_backend::start(std::shared_ptr<hypervisor>(std::move(*hv0)));
    ASSERT_TRUE(vb);
    ASSERT_TRUE((*vb)->add_vif(1, 0, std::nullopt));
    ASSERT_TRUE((*vb)->add_vif(2, 0, std::nullopt));
    ASSERT_TRUE((*vb)->add_vif(3, 0, std::nullopt));
    auto nb = net::Netback::create();
    ASSERT_TRUE(nb);
    nb_ = std::move(*nb);
    nb_->add_source(std::move(*vb));
    loop_ = std::thread([this] { (void)nb_->run(); });
    auto b = net::Veth::open(*reg_, "xen://0/0?hub=" + hub_->socket_path() + "&domid=2");
    ASSERT_TRUE(b) << b.err().what();
    peer_ = std::move(*b);
    auto c = net::Veth::open(*reg_, "xen://0/0?hub=" + hub_->socket_path() + "&domid=3");
    ASSERT_TRUE(c) << c.err().what();
    third_ = std::move(*c);
    auto hv1 = open_local_hypervisor(hub_->socket_path(), 1);
    ASSERT_TRUE(hv1);
    hv1_ = std::move(*hv1);
  }
  void TearDown() override {
    peer_.reset();
    third_.reset();
    if (nb_) nb_->stop();
    if (loop_.joinable()) loop_.join();
  }

  // A raw front end for vif 1/0, connected by hand.
  void connect_raw() {
    auto st = hv1_->open_store();
    ASSERT_TRUE(st);
    st_ = std::move(*st);
    fdir_ = vif_frontend_dir(1, 0);
    bdir_ = vif_backend_dir(0, 1, 0);
    auto txr = hv1_->grant_pages(0, 1, true), rxr = hv1_->grant_pages(0, 1, true);
    auto pages = hv1_->grant_pages(0, 32, true);
    ASSERT_TRUE(txr && rxr && pages);
    txr_ = std::move(*txr);
    rxr_ = std::move(*rxr);
    pages_ = std::move(*pages);
    ASSERT_TRUE(tx_.init(txr_->addr(), page_size));
    ASSERT_TRUE(rx_.init(rxr_->addr(), page_size));
    auto e = hv1_->alloc_unbound(0);
    ASSERT_TRUE(e);
    evt_ = std::move(*e);
    for (auto [k, v] : {std::pair<std::string, std::string>{"tx-ring-ref", std::to_string(txr_->ref(0))},
                        {"rx-ring-ref", std::to_string(rxr_->ref(0))},
                        {"event-channel", std::to_string(evt_->local_port())},
                        {"request-rx-copy", "1"},
                        {"mac", raw_mac.to_string()}})
      ASSERT_TRUE(st_->write(no_txn, fdir_ + "/" + k, v));
    ASSERT_TRUE(write_state(*st_, fdir_, XenbusStateConnected));
    ASSERT_EQ(wait_backend(XenbusStateConnected), XenbusStateConnected);
  }

  int wait_backend(int want) {
    int st = -1;
    for (int i = 0; i < 500 && st != want; ++i) {
      auto s = read_state(*st_, bdir_);
      st = s ? *s : -1;
      if (st != want) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return st;
  }

  void send(const std::vector<netif_tx_request>& reqs) {
    for (const auto& r : reqs) {
      std::memcpy(tx_.next_request(), &r, sizeof r);
      tx_.produce();
    }
    if (tx_.push_requests()) {
      ASSERT_TRUE(evt_->notify());
    }
  }

  std::vector<netif_tx_response> responses(size_t want) {
    std::vector<netif_tx_response> out;
    for (int i = 0; i < 500 && out.size() < want; ++i) {
      netif_tx_response r;
      while (out.size() < want && tx_.take_response(&r) == core::ring_take::item) out.push_back(r);
      if (out.size() < want) {
        pollfd p{evt_->fd(), POLLIN, 0};
        (void)::poll(&p, 1, 10);
        (void)evt_->ack();
      }
    }
    return out;
  }

  // An extra-info slot as it sits on the tx ring; id fills the padding so the
  // NETIF_RSP_NULL answer can be matched.
  netif_tx_request extra(uint8_t type, uint16_t gso_size, uint8_t gso_type, bool more, uint16_t id) {
    netif_extra_info e{};
    e.type = type;
    e.flags = more ? XEN_NETIF_EXTRA_FLAG_MORE : 0;
    e.u.gso.size = gso_size;
    e.u.gso.type = gso_type;
    netif_tx_request r{};
    std::memcpy(&r, &e, sizeof e);
    r.id = id;
    return r;
  }
  netif_extra_info gso_info(const netif_tx_request& r) {
    netif_extra_info e;
    std::memcpy(&e, &r, sizeof e);
    return e;
  }

  // A TCP/IPv4 frame from raw_mac to the peer in page i (its checksum partial).
  std::vector<uint8_t> write_tcp(size_t page, uint32_t payload, uint32_t seq) {
    auto f = test::make_tcp4_frame(peer_->mac(), raw_mac, payload, seq, nullptr);
    std::memcpy(static_cast<uint8_t*>(pages_->addr()) + page * page_size, f.data(), std::min<size_t>(f.size(), page_size));
    return f;
  }

  netif_tx_request req(uint16_t id, grant_ref_t g, uint16_t size, uint16_t offset = 0, uint16_t flags = 0) {
    netif_tx_request r{};
    r.gref = g;
    r.id = id;
    r.size = size;
    r.offset = offset;
    r.flags = flags;
    return r;
  }

  // A valid frame from raw_mac to the peer, in page i.
  void write_frame(size_t page, uint32_t len, uint32_t seq) {
    auto f = test::make_test_frame(len, peer_->mac(), raw_mac, seq);
    std::memcpy(static_cast<uint8_t*>(pages_->addr()) + page * page_size, f.data(), f.size());
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<local_hub> hub_;
  std::unique_ptr<net::Netback> nb_;
  std::thread loop_;
  std::unique_ptr<net::Veth> peer_, third_;
  std::unique_ptr<hypervisor> hv1_;
  std::unique_ptr<store> st_;
  std::string fdir_, bdir_;
  std::unique_ptr<granted_pages> txr_, rxr_, pages_;
  std::unique_ptr<event_channel> evt_;
  net_tx_front_ring tx_;
  net_rx_front_ring rx_;
};

TEST_F(NetbackHostile, MalformedTxRequestsAreAnsweredWithErrorsAndGoNowhere) {
  ASSERT_NO_FATAL_FAILURE(connect_raw());
  for (size_t i = 0; i < 32; ++i) write_frame(i, 200, 1000 + static_cast<uint32_t>(i));
  const grant_ref_t g0 = pages_->ref(0), g1 = pages_->ref(1);
  struct bad_case {
    const char* what;
    std::vector<netif_tx_request> reqs;
  };
  std::vector<bad_case> cases = {
      {"slot past its page", {req(1, g0, 200, 4000)}},
      {"grant never given", {req(2, 777777, 200)}},
      {"zero-size later slot", {req(3, g0, 200, 0, NETTXF_more_data), req(4, g1, 0)}},
      {"sizes that do not add up", {req(5, g0, 100, 0, NETTXF_more_data), req(6, g1, 200)}},
      {"partial checksum on a frame that is neither TCP nor UDP", {req(8, g0, 200, 0, NETTXF_csum_blank)}},
      {"frame larger than any MTU", {req(9, g0, 60000, 0, NETTXF_more_data), req(10, g1, 4096)}},
  };
  // Offload metadata that does not fit (page 4 holds a TCP/IPv4 frame, 1000 bytes of payload).
  write_tcp(4, 1000, 1);
  const grant_ref_t gt = pages_->ref(4);
  const uint16_t tl = 1054;
  const uint16_t x = NETTXF_extra_info | NETTXF_csum_blank;
  std::vector<bad_case> offload_cases = {
      {"extra info of type none", {req(60, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_NONE, 100, 1, false, 61)}},
      {"extra info of an unknown type", {req(62, gt, tl, 0, x), extra(9, 100, 1, false, 63)}},
      {"multicast control never offered", {req(64, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, 0, false, 65)}},
      {"hash never offered", {req(66, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_HASH, 0, 0, false, 67)}},
      {"GSO size 0", {req(68, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 0, XEN_NETIF_GSO_TYPE_TCPV4, false, 69)}},
      {"GSO type unknown", {req(70, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 7, false, 71)}},
      {"GSO TCPv6 on an IPv4 frame", {req(72, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 2, false, 73)}},
      {"GSO segments larger than the MTU", {req(74, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 9500, 1, false, 75)}},
      {"GSO into more than 128 segments", {req(76, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 4, 1, false, 77)}},
      {"GSO on a frame that is not TCP",
       {req(78, g0, 200, 0, NETTXF_extra_info), extra(XEN_NETIF_EXTRA_TYPE_GSO, 100, 1, false, 79)}},
      {"GSO twice",
       {req(80, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 1, true, 81),
        extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 1, false, 82)}},
      {"five extra-info slots",
       {req(83, gt, tl, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 1, true, 84), extra(2, 0, 0, true, 85),
        extra(3, 0, 0, true, 86), extra(4, 0, 0, true, 87), extra(4, 0, 0, false, 88)}},
      {"checksum field past the frame", {req(89, gt, 14 + 20 + 10, 0, NETTXF_csum_blank)}},
      {"TCP header cut short under GSO", {req(90, gt, 14 + 20 + 18, 0, x), extra(XEN_NETIF_EXTRA_TYPE_GSO, 500, 1, false, 91)}},
  };
  cases.insert(cases.end(), offload_cases.begin(), offload_cases.end());
  std::vector<netif_tx_request> long_chain;
  for (uint16_t i = 0; i < 19; ++i)
    long_chain.push_back(req(static_cast<uint16_t>(20 + i), pages_->ref(i), i == 0 ? 19 * 100 : 100, 0,
                             i < 18 ? NETTXF_more_data : 0));
  cases.push_back({"19 slots", long_chain});
  for (const auto& c : cases) {
    send(c.reqs);
    auto rsp = responses(c.reqs.size());
    ASSERT_EQ(rsp.size(), c.reqs.size()) << c.what;
    // Slots after a first one with NETTXF_extra_info are extra info while the one before said MORE.
    bool extra_next = false;
    for (size_t i = 0; i < rsp.size(); ++i) {
      bool is_extra = i > 0 && extra_next;
      extra_next = i == 0 ? (c.reqs[0].flags & NETTXF_extra_info) != 0
                          : is_extra && (gso_info(c.reqs[i]).flags & XEN_NETIF_EXTRA_FLAG_MORE);
      EXPECT_EQ(rsp[i].id, c.reqs[i].id) << c.what;
      EXPECT_EQ(rsp[i].status, is_extra ? NETIF_RSP_NULL : NETIF_RSP_ERROR) << c.what << " slot " << i;
    }
  }
  // None of it reached the peer; a well-formed frame (two slots) does.
  // 100 bytes at offset 96 of one page, the other 100 at offset 0 of the next.
  auto frame = test::make_test_frame(200, peer_->mac(), raw_mac, 4242);
  std::memcpy(static_cast<uint8_t*>(pages_->addr()) + 2 * page_size + 96, frame.data(), 100);
  std::memcpy(static_cast<uint8_t*>(pages_->addr()) + 3 * page_size, frame.data() + 100, 100);
  send({req(50, pages_->ref(2), 200, 96, NETTXF_more_data), req(51, pages_->ref(3), 100, 0)});
  auto ok = responses(2);
  ASSERT_EQ(ok.size(), 2u);
  EXPECT_EQ(ok[0].status, NETIF_RSP_OKAY);
  EXPECT_EQ(ok[1].status, NETIF_RSP_OKAY);
  auto got = test::receive_frames(*peer_, 1, std::chrono::seconds(5), nullptr);
  ASSERT_EQ(got.size(), 1u) << "only the valid frame crosses";
  EXPECT_EQ(got[0].bytes, frame);

  // And a well-formed large segment over two pages with its GSO slot: OKAY, NULL, OKAY.
  auto big = test::make_tcp4_frame(peer_->mac(), raw_mac, 6000, 9, nullptr);
  std::memcpy(static_cast<uint8_t*>(pages_->addr()) + 5 * page_size, big.data(), page_size);
  std::memcpy(static_cast<uint8_t*>(pages_->addr()) + 6 * page_size, big.data() + page_size, big.size() - page_size);
  send({req(92, pages_->ref(5), static_cast<uint16_t>(big.size()), 0, x | NETTXF_more_data),
        extra(XEN_NETIF_EXTRA_TYPE_GSO, 1448, XEN_NETIF_GSO_TYPE_TCPV4, false, 93),
        req(94, pages_->ref(6), static_cast<uint16_t>(big.size() - page_size))});
  auto okg = responses(3);
  ASSERT_EQ(okg.size(), 3u);
  EXPECT_EQ(okg[0].status, NETIF_RSP_OKAY);
  EXPECT_EQ(okg[1].status, NETIF_RSP_NULL);
  EXPECT_EQ(okg[2].status, NETIF_RSP_OKAY);
  auto gsoed = test::receive_frames(*peer_, 1, std::chrono::seconds(5), nullptr);
  ASSERT_EQ(gsoed.size(), 1u);
  EXPECT_EQ(gsoed[0].bytes, big);
  EXPECT_TRUE(gsoed[0].flags & core::VETH_FRAME_GSO);
  EXPECT_EQ(gsoed[0].gso_size, 1448);

  // Every refusal was counted by the switch (one per frame).
  nb_->stop();
  loop_.join();
  auto t = nb_->totals();
  EXPECT_EQ(t.rx_bad_offload, 15u) << nb_->stats_text();
  EXPECT_EQ(t.rx_bad_msg + t.rx_truncated, 6u) << nb_->stats_text();
}

TEST_F(NetbackHostile, ImpossibleRingIndexDropsOnlyThatInterface) {
  ASSERT_NO_FATAL_FAILURE(connect_raw());
  __atomic_store_n(&tx_.shared()->req_prod, 256u + 9, __ATOMIC_RELEASE);
  ASSERT_TRUE(evt_->notify());
  EXPECT_EQ(wait_backend(XenbusStateClosing), XenbusStateClosing);
  auto err = st_->read(no_txn, bdir_ + "/error");
  ASSERT_TRUE(err);
  EXPECT_NE(err->find("impossible"), std::string::npos) << *err;
  // The other interfaces on the switch never noticed.
  std::vector<std::vector<uint8_t>> frames = {test::make_test_frame(300, third_->mac(), peer_->mac(), 7)};
  ASSERT_EQ(test::send_frames(*peer_, frames, std::chrono::seconds(5)), 1u);
  auto got = test::receive_frames(*third_, 1, std::chrono::seconds(5), nullptr);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].bytes, frames[0]);
}

}  // namespace
