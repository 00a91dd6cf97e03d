// SPDX-License-Identifier: Apache-2.0
// netif's checksum and GSO flags end to end: netif front ends (the "xen" veth
// transport) on the netback switch through the vif back end, over the
// host-local hypervisor. One sender with offloads; one receiver that declared
// none (csum=0&gso=0: feature-no-csum-offload=1, no feature-gso-*) and one
// that takes them all. A frame to an address the switch has not learnt goes
// to both, so each test sees the same frame finished for one and whole for
// the other.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "net/netback.hpp"
#include "net/offload.hpp"
#include "net/veth.hpp"
#include "tests/net/net_testutil.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/xen/local/local.hpp"
#include "transports/xen/netif.hpp"
#include "transports/xen/vif_back.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

const net::mac_addr nowhere{{0x02, 0x00, 0x5e, 0x00, 0x00, 0x99}};  // never a source: flooded

bool is_tcp4(const uint8_t* f, uint32_t len) { return len >= 34 && net::frame_ethertype(f) == net::ethertype_ipv4 && f[23] == 6; }

bool is_tcp6(const uint8_t* f, uint32_t len) {
  return len >= 54 && net::frame_ethertype(f) == net::ethertype_ipv6 && f[20] == 6;
}

// A TCP/IPv6 frame whose checksum field holds the pseudo-header sum, as a
// stack leaves it for offload; desc as make_tcp4_frame fills it.
std::vector<uint8_t> make_tcp6_frame(const net::mac_addr& dst, const net::mac_addr& src, uint32_t payload,
                                     uint32_t seq, core::veth_frame* desc, uint16_t gso_size = 0) {
  const uint32_t l4 = 54, hdr = 74;
  std::vector<uint8_t> f(hdr + payload);
  std::memcpy(f.data(), dst.data(), 6);
  std::memcpy(f.data() + 6, src.data(), 6);
  net::store_be16(f.data() + 12, net::ethertype_ipv6);
  uint8_t* ip = f.data() + 14;
  ip[0] = 0x60;
  net::store_be16(ip + 4, static_cast<uint16_t>(20 + payload));
  ip[6] = 6;
  ip[7] = 64;
  for (int i = 0; i < 16; ++i) ip[8 + i] = static_cast<uint8_t>(i == 0 ? 0xfd : i == 15 ? 1 : 0);
  for (int i = 0; i < 16; ++i) ip[24 + i] = static_cast<uint8_t>(i == 0 ? 0xfd : i == 15 ? 2 : 0);
  uint8_t* tcp = f.data() + l4;
  net::store_be16(tcp, 40001);
  net::store_be16(tcp + 2, 5002);
  net::store_be32(tcp + 4, seq);
  net::store_be32(tcp + 8, 1);
  tcp[12] = 5 << 4;
  tcp[13] = 0x18;
  net::store_be16(tcp + 14, 65535);
  for (uint32_t i = 0; i < payload; ++i) f[hdr + i] = static_cast<uint8_t>(i * 13 + seq);
  uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 6};
  net::store_be32(tail, 20 + payload);
  net::store_be16(tcp + 16, net::ones_sum(tail, 8, net::ones_sum(ip + 8, 32)));
  *desc = core::veth_frame{.data = f.data(), .len = static_cast<uint32_t>(f.size()),
                           .flags = core::VETH_FRAME_CSUM_PARTIAL, .csum_start = l4, .csum_offset = 16};
  if (gso_size) {
    desc->flags |= core::VETH_FRAME_GSO;
    desc->gso_size = gso_size;
    desc->gso_type = 2;
  }
  return f;
}

class NetifOffload : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    auto h = xen::local_hub::start(dir_.file("hub.sock"));
    ASSERT_TRUE(h);
    hub_ = std::move(*h);
    auto hv0 = xen::open_local_hypervisor(hub_->socket_path(), 0);
    ASSERT_TRUE(hv0);
    auto vb = xen::vif_backend::start(std::shared_ptr<xen::hypervisor>(std::move(*hv0)));
    ASSERT_TRUE(vb);
    for (xen::domid_t d : {1, 2, 3}) ASSERT_TRUE((*vb)->add_vif(d, 0, std::nullopt));
    vifs_ = vb->get();
    auto nb = net::Netback::create();
    ASSERT_TRUE(nb);
    nb_ = std::move(*nb);
    nb_->add_source(std::move(*vb));
    loop_ = std::thread([this] { (void)nb_->run(); });
    std::string base = "xen://0/0?hub=" + hub_->socket_path() + "&domid=";
    auto a = net::Veth::open(*reg_, base + "1");
    ASSERT_TRUE(a) << a.err().what();
    sender_ = std::move(*a);
    auto b = net::Veth::open(*reg_, base + "2&csum=0&gso=0");
    ASSERT_TRUE(b) << b.err().what();
    plain_ = std::move(*b);
    auto c = net::Veth::open(*reg_, base + "3");
    ASSERT_TRUE(c) << c.err().what();
    offl_ = std::move(*c);
  }
  void TearDown() override {
    sender_.reset();
    plain_.reset();
    offl_.reset();
    if (nb_) nb_->stop();
    if (loop_.joinable()) loop_.join();
  }

  xen::vif_backend::offload_counts done(xen::domid_t d) {
    auto c = vifs_->offloads_done(d, 0);
    EXPECT_TRUE(c);
    return c ? *c : xen::vif_backend::offload_counts{};
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<xen::local_hub> hub_;
  xen::vif_backend* vifs_ = nullptr;  // owned by nb_
  std::unique_ptr<net::Netback> nb_;
  std::thread loop_;
  std::unique_ptr<net::Veth> sender_, plain_, offl_;
};

TEST_F(NetifOffload, FeaturesAreNegotiated) {
  EXPECT_TRUE(sender_->features() & core::VETH_F_TX_CSUM);
  EXPECT_TRUE(sender_->features() & core::VETH_F_TSO);
  EXPECT_FALSE(plain_->features() & core::VETH_F_TX_CSUM);
  EXPECT_FALSE(plain_->features() & core::VETH_F_TSO);
  auto hv = xen::open_local_hypervisor(hub_->socket_path(), 0);
  ASSERT_TRUE(hv);
  auto st = (*hv)->open_store();
  ASSERT_TRUE(st);
  auto key = [&](const std::string& path) {
    auto v = (*st)->read(xen::no_txn, path);
    return v ? *v : std::string("(absent)");
  };
  for (const char* k : {"feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-ipv6-csum-offload",
                        "feature-rx-copy"})
    EXPECT_EQ(key(xen::vif_backend_dir(0, 1, 0) + "/" + k), "1") << k;
  EXPECT_EQ(key(xen::vif_frontend_dir(2, 0) + "/feature-no-csum-offload"), "1");
  EXPECT_EQ(key(xen::vif_frontend_dir(2, 0) + "/feature-gso-tcpv4"), "0");
  EXPECT_EQ(key(xen::vif_frontend_dir(3, 0) + "/feature-no-csum-offload"), "0");
  EXPECT_EQ(key(xen::vif_frontend_dir(3, 0) + "/feature-gso-tcpv4"), "1");
  EXPECT_EQ(key(xen::vif_frontend_dir(3, 0) + "/feature-rx-notify"), "1");
}

TEST_F(NetifOffload, BlankChecksumIsFilledForAReceiverWithoutChecksumOffload) {
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(nowhere, sender_->mac(), 1000, 77, &d);
  const auto sent = tcp;  // the pseudo-header sum still in the checksum field
  auto before = sender_->stats();
  ASSERT_EQ(sender_->tx_burst(0, &d), 1u);
  EXPECT_EQ(sender_->stats().tx_sw_csum - before.tx_sw_csum, 0u) << "crossed netif as csum_blank";

  auto plain = test::receive_frames(*plain_, 1, 5s, is_tcp4);
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_FALSE(plain[0].flags & core::VETH_FRAME_CSUM_PARTIAL);
  EXPECT_TRUE(plain[0].flags & core::VETH_FRAME_CSUM_VALID);
  EXPECT_TRUE(net::verify_csums(plain[0].bytes.data(), static_cast<uint32_t>(plain[0].bytes.size())));
  EXPECT_EQ(done(2).sw_csum, 1u) << "the back end filled it, not the sender";
  // Only the checksum field differs from what was sent.
  ASSERT_EQ(plain[0].bytes.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    if (i != 50 && i != 51) {
      ASSERT_EQ(plain[0].bytes[i], sent[i]) << "byte " << i;
    }
  }

  // The same frame reached the receiver that takes partial checksums as it was sent.
  auto offl = test::receive_frames(*offl_, 1, 5s, is_tcp4);
  ASSERT_EQ(offl.size(), 1u);
  ASSERT_TRUE(offl[0].flags & core::VETH_FRAME_CSUM_PARTIAL);
  EXPECT_EQ(offl[0].csum_start, 34u);
  EXPECT_EQ(offl[0].csum_offset, 16u);
  EXPECT_EQ(offl[0].bytes, sent);
  EXPECT_EQ(done(3).sw_csum, 0u);
  auto& f = offl[0].bytes;
  ASSERT_EQ(net::finish_csum(f.data(), static_cast<uint32_t>(f.size()), 34, 16), 0);
  EXPECT_EQ(f, plain[0].bytes);
}

TEST_F(NetifOffload, LargeSegmentIsCutForANonGsoReceiverAndWholeForAGsoOne) {
  constexpr uint32_t payload = 65535 - 54 - 1;  // the largest a netif tx slot's 16-bit size allows
  constexpr uint16_t mss = 1448;
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(nowhere, sender_->mac(), payload, 5000, &d, mss);
  std::vector<uint8_t> want(tcp.begin() + 54, tcp.end());
  auto before = sender_->stats();
  ASSERT_EQ(sender_->tx_burst(0, &d), 1u);
  EXPECT_EQ(sender_->stats().tx_sw_gso - before.tx_sw_gso, 0u) << "crossed netif whole";

  // Whole, with its GSO metadata, for the receiver that asked for large segments.
  auto whole = test::receive_frames(*offl_, 1, 5s, is_tcp4);
  ASSERT_EQ(whole.size(), 1u);
  EXPECT_TRUE(whole[0].flags & core::VETH_FRAME_GSO);
  EXPECT_TRUE(whole[0].flags & core::VETH_FRAME_CSUM_PARTIAL);
  EXPECT_EQ(whole[0].gso_size, mss);
  EXPECT_EQ(whole[0].gso_type, 1);
  EXPECT_EQ(whole[0].bytes, tcp);
  EXPECT_EQ(done(3).sw_gso, 0u);

  // Cut into MSS-sized segments with complete checksums for the one that did not.
  std::vector<uint8_t> seen;
  uint32_t frames = 0;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (seen.size() < payload && std::chrono::steady_clock::now() < deadline) {
    for (auto& f : test::receive_frames(*plain_, 1, 1s, is_tcp4)) {
      uint32_t len = static_cast<uint32_t>(f.bytes.size());
      EXPECT_FALSE(f.flags & (core::VETH_FRAME_GSO | core::VETH_FRAME_CSUM_PARTIAL));
      EXPECT_LE(len, 54u + mss);
      EXPECT_TRUE(net::verify_csums(f.bytes.data(), len)) << "segment " << frames;
      EXPECT_EQ(net::load_be32(f.bytes.data() + 38), 5000 + seen.size()) << "TCP sequence of segment " << frames;
      seen.insert(seen.end(), f.bytes.begin() + 54, f.bytes.end());
      ++frames;
    }
  }
  EXPECT_EQ(frames, (payload + mss - 1) / mss);
  EXPECT_TRUE(seen == want) << "payload changed on the way";
  EXPECT_EQ(done(2).sw_gso, 1u);
}

TEST_F(NetifOffload, Ipv6ChecksumsAndLargeSegmentsTooUnderTheirOwnFeatures) {
  core::veth_frame d{};
  auto small = make_tcp6_frame(nowhere, sender_->mac(), 500, 3, &d);
  ASSERT_EQ(sender_->tx_burst(0, &d), 1u);
  auto plain = test::receive_frames(*plain_, 1, 5s, is_tcp6);
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_TRUE(plain[0].flags & core::VETH_FRAME_CSUM_VALID);
  EXPECT_TRUE(net::verify_csums(plain[0].bytes.data(), static_cast<uint32_t>(plain[0].bytes.size())));
  auto offl = test::receive_frames(*offl_, 1, 5s, is_tcp6);
  ASSERT_EQ(offl.size(), 1u);
  EXPECT_TRUE(offl[0].flags & core::VETH_FRAME_CSUM_PARTIAL) << "feature-ipv6-csum-offload";
  EXPECT_EQ(offl[0].csum_start, 54u);
  EXPECT_EQ(offl[0].bytes, small);

  constexpr uint32_t payload = 30000;
  auto big = make_tcp6_frame(nowhere, sender_->mac(), payload, 100, &d, 1400);
  ASSERT_EQ(sender_->tx_burst(0, &d), 1u);
  auto whole = test::receive_frames(*offl_, 1, 5s, is_tcp6);
  ASSERT_EQ(whole.size(), 1u);
  EXPECT_TRUE(whole[0].flags & core::VETH_FRAME_GSO);
  EXPECT_EQ(whole[0].gso_type, 2) << "XEN_NETIF_GSO_TYPE_TCPV6 both ways";
  EXPECT_EQ(whole[0].bytes, big);
  size_t bytes = 0;
  uint32_t frames = 0;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (bytes < payload && std::chrono::steady_clock::now() < deadline) {
    for (auto& f : test::receive_frames(*plain_, 1, 1s, is_tcp6)) {
      EXPECT_TRUE(net::verify_csums(f.bytes.data(), static_cast<uint32_t>(f.bytes.size())));
      EXPECT_EQ(net::load_be32(f.bytes.data() + 58), 100 + bytes);
      bytes += f.bytes.size() - 74;
      ++frames;
    }
  }
  EXPECT_EQ(bytes, payload);
  EXPECT_EQ(frames, (payload + 1399) / 1400);
  EXPECT_EQ(done(2).sw_gso, 1u);
  EXPECT_EQ(done(2).sw_csum, 1u);
}

TEST_F(NetifOffload, LargeSegmentFromANonGsoSenderIsCutBeforeTheRing) {
  // The plain front end declared no TSO: the veth front half cuts, and the
  // segments cross as ordinary frames to the receiver that takes GSO.
  constexpr uint32_t payload = 20000;
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(nowhere, plain_->mac(), payload, 1, &d, 1000);
  ASSERT_EQ(plain_->tx_burst(0, &d), 1u);
  uint32_t frames = 0;
  size_t bytes = 0;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (bytes < payload && std::chrono::steady_clock::now() < deadline) {
    plain_->tx_flush(0);
    for (auto& f : test::receive_frames(*offl_, 1, 1s, is_tcp4)) {
      EXPECT_FALSE(f.flags & core::VETH_FRAME_GSO);
      EXPECT_TRUE(net::verify_csums(f.bytes.data(), static_cast<uint32_t>(f.bytes.size())));
      bytes += f.bytes.size() - 54;
      ++frames;
    }
  }
  EXPECT_EQ(bytes, payload);
  EXPECT_EQ(frames, 20u);
}

}  // namespace
