// SPDX-License-Identifier: Apache-2.0
#include "net/offload.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "net/eth.hpp"
#include "tests/net/net_testutil.hpp"

using namespace uvd;
using namespace uvd::net;

namespace {

const mac_addr A{{0x02, 0, 0, 0, 0, 1}}, B{{0x02, 0, 0, 0, 0, 2}};

}  // namespace

TEST(Offload, OnesSumMatchesRfc1071Example) {
  // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
  const uint8_t d[] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
  EXPECT_EQ(ones_sum(d, 8), 0xddf2);
  // Odd lengths pad with a zero byte on the right.
  const uint8_t o[] = {0x12, 0x34, 0x56};
  EXPECT_EQ(ones_sum(o, 3), 0x1234 + 0x5600);
  // Every split point gives the same sum as long as pieces start on even offsets.
  std::vector<uint8_t> big(1001);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<uint8_t>(i * 31 + 7);
  uint16_t whole = ones_sum(big.data(), 1001);
  for (uint32_t cut = 0; cut <= 1000; cut += 2)
    ASSERT_EQ(ones_sum(big.data() + cut, 1001 - cut, ones_sum(big.data(), cut)), whole) << cut;
}

TEST(Offload, FinishesPartialChecksum) {
  core::veth_frame d{};
  auto f = test::make_tcp4_frame(B, A, 333, 9, &d);
  EXPECT_FALSE(verify_csums(f.data(), d.len));
  ASSERT_EQ(finish_csum(f.data(), d.len, d.csum_start, d.csum_offset), 0);
  EXPECT_TRUE(verify_csums(f.data(), d.len));
  f[60] ^= 1;
  EXPECT_FALSE(verify_csums(f.data(), d.len));
  EXPECT_EQ(finish_csum(f.data(), d.len, static_cast<uint16_t>(d.len - 1), 16), -EINVAL);
}

TEST(Offload, ParsesLayouts) {
  core::veth_frame d{};
  auto f = test::make_tcp4_frame(B, A, 10, 1, &d);
  frame_layout l;
  ASSERT_EQ(parse_layout(f.data(), d.len, &l), 0);
  EXPECT_EQ(l.l3, 14u);
  EXPECT_EQ(l.l4, 34u);
  EXPECT_EQ(l.hdr_len, 54u);
  EXPECT_EQ(l.l4_proto, 6);
  EXPECT_EQ(parse_layout(f.data(), 40, &l), -EINVAL);
  auto arp = test::make_test_frame(60, B, A, 1);
  EXPECT_EQ(parse_layout(arp.data(), 60, &l), -EPROTONOSUPPORT);
}

TEST(Offload, SegmentsTcp4LikeTheKernel) {
  core::veth_frame d{};
  constexpr uint32_t payload = 10000;
  auto f = test::make_tcp4_frame(B, A, payload, 5000, &d, 1448);
  f[34 + 13] = 0x80 | 0x18 | 0x01;  // CWR PSH ACK FIN
  frame_layout l;
  ASSERT_EQ(check_offload(d, 1500, &l), 0);
  std::vector<uint8_t> arena(gso_segmented_bytes(d, l));
  core::veth_frame out[16];
  int n = gso_segment(d, l, arena.data(), static_cast<uint32_t>(arena.size()), out, 16);
  ASSERT_EQ(n, 7);
  std::vector<uint8_t> joined;
  for (int i = 0; i < n; ++i) {
    const uint8_t* s = out[i].data;
    EXPECT_TRUE(verify_csums(s, out[i].len)) << i;
    EXPECT_EQ(load_be16(s + 16), out[i].len - 14) << "IP total length";
    EXPECT_EQ(load_be16(s + 18), 0x1234 + i) << "IP id";
    EXPECT_EQ(load_be32(s + 38), 5000u + i * 1448) << "TCP seq";
    uint8_t fl = s[34 + 13];
    EXPECT_EQ((fl & 0x80) != 0, i == 0) << "CWR on the first only";
    EXPECT_EQ((fl & 0x09) != 0, i == n - 1) << "FIN/PSH on the last only";
    EXPECT_LE(out[i].len, 1514u);
    joined.insert(joined.end(), s + 54, s + out[i].len);
  }
  EXPECT_TRUE(std::equal(joined.begin(), joined.end(), f.begin() + 54));
  EXPECT_EQ(wire_bytes(d), 10000u + 7 * 54);
  EXPECT_EQ(gso_segment(d, l, arena.data(), 100, out, 16), -ENOSPC);
  EXPECT_EQ(gso_segment(d, l, arena.data(), static_cast<uint32_t>(arena.size()), out, 3), -ENOSPC);
}

TEST(Offload, RefusesBadMetadata) {
  core::veth_frame d{};
  auto f = test::make_tcp4_frame(B, A, 5000, 1, &d, 1448);
  frame_layout l;
  EXPECT_EQ(check_offload(d, 1500, &l), 0);
  EXPECT_EQ(check_offload(d, 1000, &l), -EMSGSIZE) << "segments larger than the MTU";
  auto x = d;
  x.gso_size = 0;
  EXPECT_EQ(check_offload(x, 1500, &l), -EINVAL);
  x = d;
  x.gso_type = 3;
  EXPECT_EQ(check_offload(x, 1500, &l), -EPROTONOSUPPORT);
  x = d;
  x.gso_type = 2;  // says IPv6, is IPv4
  EXPECT_EQ(check_offload(x, 1500, &l), -EINVAL);
  x = d;
  x.gso_size = 10;  // 500 segments
  EXPECT_EQ(check_offload(x, 1500, &l), -EINVAL);
  x = d;
  x.csum_start = 4;  // inside the Ethernet header
  EXPECT_EQ(check_offload(x, 1500, &l), -EINVAL);
  x = d;
  x.len = 50;  // headers cut short
  EXPECT_NE(check_offload(x, 1500, &l), 0);
}
