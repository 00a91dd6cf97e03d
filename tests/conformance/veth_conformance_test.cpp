// SPDX-License-Identifier: Apache-2.0
// The veth conformance suite: every network transport runs the same cases
// through the generic front half (net::Veth). A new transport is done when it
// passes. Frames travel from pair.a to pair.b (see veth_targets.hpp).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "net/offload.hpp"
#include "tests/conformance/veth_targets.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/builtin.hpp"

using namespace uvd;
using namespace std::chrono_literals;
using test::veth_target;

namespace {

bool is_test_frame(const uint8_t* f, uint32_t len) {
  return len >= 14 && net::frame_ethertype(f) == test::test_ethertype;
}
bool is_tcp4(const uint8_t* f, uint32_t len) { return len >= 34 && net::frame_ethertype(f) == net::ethertype_ipv4 && f[23] == 6; }

class VethConformance : public ::testing::TestWithParam<veth_target> {
 protected:
  void SetUp() override {
    if (GetParam().needs_root && !test::require_net_privileges()) GTEST_FAIL();
    reg_ = transports::make_default_registry();
    open_pair({});
  }

  void open_pair(net::veth_options o) {
    pair_.reset();
    auto p = GetParam().make(dir_, *reg_, o);
    // ENODEV: this machine lacks what the target needs (an RDMA device); the
    // harness that has it runs the target for real.
    if (!p && p.err().errnum() == ENODEV) GTEST_SKIP() << GetParam().name << " skipped: " << p.err().what();
    ASSERT_TRUE(p) << GetParam().name << ": " << p.err().what();
    pair_ = std::move(*p);
    ASSERT_TRUE(pair_->a && pair_->b);
  }

  net::Veth& a() { return *pair_->a; }
  net::Veth& b() { return *pair_->b; }
  bool lossless() const { return GetParam().lossless; }
  // Where frames from a are addressed: b's own MAC, so learning switches deliver.
  net::mac_addr dst() { return b().mac(); }

  // Sends frames a -> b and returns what arrived (test frames only), sending
  // and receiving in turn so that a and b may be one Veth with small rings.
  std::vector<test::received_frame> transfer(std::vector<std::vector<uint8_t>> frames,
                                             std::chrono::milliseconds wait = 5s) {
    std::vector<test::received_frame> got;
    std::vector<core::veth_frame> desc(frames.size());
    std::vector<core::veth_frame*> ptrs(frames.size());
    for (size_t i = 0; i < frames.size(); ++i) {
      desc[i] = core::veth_frame{.data = frames[i].data(), .len = static_cast<uint32_t>(frames[i].size())};
      ptrs[i] = &desc[i];
    }
    std::vector<core::veth_frame> out(64);
    size_t sent = 0;
    auto last_progress = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - last_progress < wait) {
      if (sent < frames.size()) {
        uint32_t k = static_cast<uint32_t>(std::min<size_t>(32, frames.size() - sent));
        uint32_t took = a().tx_burst(0, ptrs.data() + sent, k);
        sent += took;
        if (took) last_progress = std::chrono::steady_clock::now();
      }
      uint32_t n = 0;
      for (uint32_t q = 0; q < b().nqueues(); ++q) {
        uint32_t k = b().rx_burst(q, out.data(), 64);
        for (uint32_t i = 0; i < k; ++i)
          if (is_test_frame(out[i].data, out[i].len))
            got.push_back(test::received_frame{std::vector<uint8_t>(out[i].data, out[i].data + out[i].len), out[i].flags});
        n += k;
      }
      if (n) last_progress = std::chrono::steady_clock::now();
      if (sent == frames.size() && got.size() >= frames.size()) break;
      if (!n && (sent == frames.size() || a().tx_stopped(0))) test::wait_veth(b(), 2ms);
    }
    EXPECT_EQ(sent, frames.size()) << "the front half did not take every frame";
    return got;
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<test::veth_pair> pair_;
};

TEST_P(VethConformance, OpensWithSaneDefaults) {
  EXPECT_EQ(a().mtu(), 1500u);
  EXPECT_LE(a().min_mtu(), 1280u);
  EXPECT_GE(a().max_mtu(), 1500u);
  EXPECT_FALSE(a().mac().is_multicast());
  EXPECT_TRUE(a().mac().is_local()) << a().mac().to_string();
  EXPECT_TRUE(a().link_up());
  EXPECT_GE(a().nqueues(), 1u);
}

TEST_P(VethConformance, FramesOfEverySizeRoundTripIntact) {
  std::vector<std::vector<uint8_t>> frames;
  uint32_t max = a().mtu() + net::eth_hlen;
  for (uint32_t len = net::eth_min_frame; len <= max; ++len) frames.push_back(test::make_test_frame(len, dst(), a().mac(), len));
  auto got = transfer(frames);
  ASSERT_EQ(got.size(), frames.size()) << "frames lost between " << net::eth_min_frame << " and " << max << " bytes";
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].bytes.size(), frames[i].size()) << "frame " << i;
    ASSERT_EQ(got[i].bytes, frames[i]) << "frame of " << frames[i].size() << " bytes changed on the way";
  }
}

TEST_P(VethConformance, OversizeFramesRefused) {
  auto before = a().stats();
  std::vector<std::vector<uint8_t>> frames = {test::make_test_frame(a().mtu() + net::eth_hlen + 1, dst(), a().mac(), 1),
                                              test::make_test_frame(a().mtu() + net::eth_hlen + 4000, dst(), a().mac(), 2),
                                              test::make_test_frame(100, dst(), a().mac(), 3)};
  auto got = transfer(frames, 1s);
  auto after = a().stats();
  EXPECT_EQ(after.tx_length_errors - before.tx_length_errors, 2u);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].bytes, frames[2]);
}

TEST_P(VethConformance, MtuChangesAtRunTime) {
  uint32_t big = std::min<uint32_t>(9000, std::min(a().max_mtu(), b().max_mtu()));
  ASSERT_TRUE(a().set_mtu(big)) << "MTU " << big;
  if (&a() != &b()) {
    ASSERT_TRUE(b().set_mtu(big));
  }
  EXPECT_EQ(a().mtu(), big);
  auto got = transfer({test::make_test_frame(big + net::eth_hlen, dst(), a().mac(), 7)});
  ASSERT_EQ(got.size(), 1u) << "a frame of the new MTU did not arrive";
  EXPECT_TRUE(test::check_test_frame(got[0].bytes.data(), static_cast<uint32_t>(got[0].bytes.size()), 7));

  ASSERT_TRUE(a().set_mtu(1280));
  if (&a() != &b()) {
    ASSERT_TRUE(b().set_mtu(1280));
  }
  auto before = a().stats();
  got = transfer({test::make_test_frame(1500 + net::eth_hlen, dst(), a().mac(), 8),
                  test::make_test_frame(1280 + net::eth_hlen, dst(), a().mac(), 9)},
                 1s);
  EXPECT_EQ(a().stats().tx_length_errors - before.tx_length_errors, 1u);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].bytes.size(), 1280u + net::eth_hlen);

  auto r = a().set_mtu(a().max_mtu() + 1);
  EXPECT_FALSE(r);
  r = a().set_mtu(10);
  EXPECT_FALSE(r);
  EXPECT_EQ(a().mtu(), 1280u);
}

TEST_P(VethConformance, LinkDownStopsTraffic) {
  ASSERT_TRUE(a().set_admin_up(false));
  EXPECT_FALSE(a().link_up());
  auto before = a().stats();
  std::vector<std::vector<uint8_t>> frames;
  for (uint32_t i = 0; i < 10; ++i) frames.push_back(test::make_test_frame(200, dst(), a().mac(), i));
  auto got = transfer(frames, 300ms);
  EXPECT_TRUE(got.empty()) << got.size() << " frames crossed a link that is down";
  EXPECT_EQ(a().stats().tx_dropped - before.tx_dropped, 10u);
  EXPECT_EQ(a().stats().tx_packets, before.tx_packets);

  ASSERT_TRUE(a().set_admin_up(true));
  // A kernel peer learns of carrier changes asynchronously (linkwatch may
  // take up to a second to move a bridge port back to forwarding), and drops
  // what arrives before then: resend until a whole burst crosses, for 5 s.
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  do {
    got = transfer(frames, 500ms);
  } while (got.size() != frames.size() && std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(got.size(), frames.size()) << "traffic did not resume within 5 s of link up";
}

TEST_P(VethConformance, StatisticsAddUp) {
  auto a0 = a().stats();
  auto b0 = b().stats();
  std::vector<std::vector<uint8_t>> frames;
  uint64_t bytes = 0;
  for (uint32_t i = 0; i < 200; ++i) {
    frames.push_back(test::make_test_frame(60 + i * 7, dst(), a().mac(), i));
    bytes += frames.back().size();
  }
  auto got = transfer(frames);
  ASSERT_EQ(got.size(), frames.size());
  auto a1 = a().stats();
  auto b1 = b().stats();
  EXPECT_EQ(a1.tx_packets - a0.tx_packets, 200u);
  EXPECT_EQ(a1.tx_bytes - a0.tx_bytes, bytes);
  EXPECT_EQ(a1.tx_errors, a0.tx_errors);
  EXPECT_EQ(a1.tx_dropped, a0.tx_dropped);
  if (lossless()) {
    EXPECT_EQ(b1.rx_packets - b0.rx_packets, 200u);
    EXPECT_EQ(b1.rx_bytes - b0.rx_bytes, bytes);
  } else {  // a kernel or a switch may add frames of its own, never fewer
    EXPECT_GE(b1.rx_packets - b0.rx_packets, 200u);
    EXPECT_GE(b1.rx_bytes - b0.rx_bytes, bytes);
  }
  EXPECT_EQ(b1.rx_errors, b0.rx_errors);
}

TEST_P(VethConformance, BurstLargerThanQueuesLosesNothingAccepted) {
  constexpr uint32_t total = 20000;
  const uint64_t outside0 = pair_->outside_drops ? pair_->outside_drops() : 0;
  std::atomic<bool> sending{true};
  std::vector<uint32_t> seqs;
  seqs.reserve(total);
  bool intact = true;
  std::thread rx([&] {
    std::vector<core::veth_frame> out(64);
    auto idle_since = std::chrono::steady_clock::now();
    for (;;) {
      uint32_t n = 0;
      for (uint32_t q = 0; q < b().nqueues(); ++q) {
        uint32_t k = b().rx_burst(q, out.data(), 64);
        for (uint32_t i = 0; i < k; ++i) {
          if (!is_test_frame(out[i].data, out[i].len)) continue;
          intact &= test::check_test_frame(out[i].data, out[i].len);
          seqs.push_back(static_cast<uint32_t>(test::test_frame_seq(out[i].data, out[i].len)));
        }
        n += k;
      }
      if (n) {
        idle_since = std::chrono::steady_clock::now();
        continue;
      }
      if (seqs.size() == total) break;
      if (!sending && std::chrono::steady_clock::now() - idle_since > 2s) break;
      test::wait_veth(b(), 2ms);
    }
  });
  // One burst far larger than any queue, pushed as fast as the front half takes it.
  std::vector<std::vector<uint8_t>> frames;
  frames.reserve(total);
  for (uint32_t i = 0; i < total; ++i) frames.push_back(test::make_test_frame(64 + (i % 9) * 100, dst(), a().mac(), i));
  std::vector<core::veth_frame> desc(total);
  std::vector<core::veth_frame*> ptrs(total);
  for (uint32_t i = 0; i < total; ++i) {
    desc[i] = core::veth_frame{.data = frames[i].data(), .len = static_cast<uint32_t>(frames[i].size())};
    ptrs[i] = &desc[i];
  }
  // A stall detector, not a speed limit: emulated transports (Soft-RoCE under
  // TCG) move a few hundred frames a second, and that is not a failure here.
  uint32_t accepted = 0;
  auto last_progress = std::chrono::steady_clock::now();
  while (accepted < total && std::chrono::steady_clock::now() - last_progress < 20s) {
    uint32_t k = a().tx_burst(0, ptrs.data() + accepted, total - accepted);
    if (k) last_progress = std::chrono::steady_clock::now();
    accepted += k;
    if (accepted < total && a().tx_stopped(0)) {
      if (&a() == &b())
        std::this_thread::yield();  // the receiver owns the shared event fd
      else
        test::wait_veth(a(), 1ms);
    }
  }
  sending = false;
  rx.join();
  EXPECT_EQ(accepted, total);
  EXPECT_TRUE(intact);
  for (size_t i = 1; i < seqs.size(); ++i) ASSERT_LT(seqs[i - 1], seqs[i]) << "reordered at " << i;
  // Every accepted frame arrived, or whatever sits between a and b counted
  // it as its own drop (a kernel queue); the front halves lost none.
  uint64_t outside = pair_->outside_drops ? pair_->outside_drops() - outside0 : 0;
  EXPECT_EQ(seqs.size() + outside, accepted) << outside << " dropped outside the front halves";
  EXPECT_GT(seqs.size(), 0u);
}

TEST_P(VethConformance, MulticastAndBroadcastDelivered) {
  std::vector<std::vector<uint8_t>> frames = {
      test::make_test_frame(100, net::broadcast_mac, a().mac(), 1),
      test::make_test_frame(100, net::mac_addr{{0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb}}, a().mac(), 2),
      test::make_test_frame(100, net::mac_addr{{0x33, 0x33, 0x00, 0x00, 0x00, 0x01}}, a().mac(), 3),
      test::make_test_frame(100, net::mac_addr{{0x03, 0x00, 0x00, 0x00, 0x00, 0x01}}, a().mac(), 4),
  };
  auto got = transfer(frames);
  ASSERT_EQ(got.size(), frames.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].bytes, frames[i]);
}

TEST_P(VethConformance, BadFramesCounted) {
  auto before = a().stats();
  std::vector<uint8_t> runt(10, 0xee);
  auto good = test::make_test_frame(300, dst(), a().mac(), 42);
  core::veth_frame bad_csum{};
  auto tcp = test::make_tcp4_frame(dst(), a().mac(), 100, 1, &bad_csum);
  bad_csum.csum_start = static_cast<uint16_t>(tcp.size() - 1);  // checksum field past the end
  core::veth_frame bad_gso{};
  auto tcp2 = test::make_tcp4_frame(dst(), a().mac(), 3000, 1, &bad_gso, 1448);
  bad_gso.gso_type = 9;  // no such type
  core::veth_frame fr[4] = {{.data = runt.data(), .len = 10}, bad_csum, bad_gso,
                            {.data = good.data(), .len = static_cast<uint32_t>(good.size())}};
  core::veth_frame* p[4] = {&fr[0], &fr[1], &fr[2], &fr[3]};
  uint32_t took = 0;
  for (int i = 0; i < 100 && took < 4; ++i) took += a().tx_burst(0, p + took, 4 - took);
  EXPECT_EQ(took, 4u) << "bad frames are taken (and counted), not left with the caller";
  auto got = test::receive_frames(b(), 1, 5s, is_test_frame);
  auto after = a().stats();
  EXPECT_EQ(after.tx_length_errors - before.tx_length_errors, 1u);
  EXPECT_EQ(after.tx_offload_errors - before.tx_offload_errors, 2u);
  EXPECT_EQ(after.tx_errors - before.tx_errors, 3u);
  EXPECT_EQ(after.tx_packets - before.tx_packets, 1u);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].bytes, good);
  auto stray = test::receive_frames(b(), 1, 200ms, is_tcp4);
  EXPECT_TRUE(stray.empty()) << "a refused frame was delivered";
}

TEST_P(VethConformance, ChecksumOffloadDoneSomewhere) {
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(dst(), a().mac(), 777, 5, &d);
  auto before = a().stats();
  ASSERT_EQ(a().tx_burst(0, &d), 1u);
  auto got = test::receive_frames(b(), 1, 5s, is_tcp4);
  ASSERT_EQ(got.size(), 1u);
  auto& f = got[0];
  if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {  // carried partial: the receiver's stack finishes it
    ASSERT_EQ(net::finish_csum(f.bytes.data(), static_cast<uint32_t>(f.bytes.size()), f.csum_start, f.csum_offset), 0);
  }
  EXPECT_TRUE(net::verify_csums(f.bytes.data(), static_cast<uint32_t>(f.bytes.size())));
  if (!(a().features() & core::VETH_F_TX_CSUM)) {
    EXPECT_EQ(a().stats().tx_sw_csum - before.tx_sw_csum, 1u);
  }
}

TEST_P(VethConformance, LargeSegmentsCrossWholeOrCut) {
  constexpr uint32_t payload = 40000;
  core::veth_frame d{};
  auto tcp = test::make_tcp4_frame(dst(), a().mac(), payload, 1000, &d, 1448);
  std::vector<uint8_t> want(tcp.begin() + 54, tcp.end());
  ASSERT_EQ(a().tx_burst(0, &d), 1u);
  std::vector<uint8_t> seen;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  uint32_t frames = 0;
  while (seen.size() < payload && std::chrono::steady_clock::now() < deadline) {
    a().tx_flush(0);  // segments the transport had no room for yet
    auto got = test::receive_frames(b(), 1, 1s, is_tcp4);
    for (auto& f : got) {
      ++frames;
      uint32_t len = static_cast<uint32_t>(f.bytes.size());
      if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) net::finish_csum(f.bytes.data(), len, f.csum_start, f.csum_offset);
      if (!(f.flags & core::VETH_FRAME_GSO)) {
        EXPECT_LE(len, 1500u + 14u);
        EXPECT_TRUE(net::verify_csums(f.bytes.data(), len)) << "segment " << frames;
      }
      EXPECT_EQ(net::load_be32(f.bytes.data() + 38), 1000 + seen.size()) << "TCP sequence of a segment";
      seen.insert(seen.end(), f.bytes.begin() + 54, f.bytes.end());
    }
  }
  ASSERT_EQ(seen.size(), want.size());
  EXPECT_TRUE(seen == want) << "payload changed on the way";
  if (!(a().features() & core::VETH_F_TSO)) {
    EXPECT_EQ(frames, (payload + 1447) / 1448) << "cut in software into MSS-sized segments";
  }
}

TEST_P(VethConformance, MacIsSettable) {
  auto m = net::parse_mac("02:aa:bb:cc:dd:ee");
  ASSERT_TRUE(m);
  ASSERT_TRUE(a().set_mac(*m));
  EXPECT_EQ(a().mac(), *m);
  EXPECT_FALSE(a().set_mac(net::broadcast_mac));
  EXPECT_EQ(a().mac(), *m);
  auto got = transfer({test::make_test_frame(80, dst(), a().mac(), 3)});
  ASSERT_EQ(got.size(), 1u);
}

std::string target_name(const ::testing::TestParamInfo<veth_target>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Transports, VethConformance, ::testing::ValuesIn(test::veth_conformance_targets()),
                         target_name);

}  // namespace
