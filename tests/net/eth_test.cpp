// SPDX-License-Identifier: Apache-2.0
#include "net/eth.hpp"

#include <gtest/gtest.h>

using namespace uvd::net;

TEST(Eth, ParsesAndFormatsMacs) {
  auto m = parse_mac("02:0A:bc:00:ff:1");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->to_string(), "02:0a:bc:00:ff:01");
  EXPECT_TRUE(parse_mac("02-00-00-00-00-01"));
  for (const char* bad : {"", "02:00:00:00:00", "02:00:00:00:00:01:02", "0g:00:00:00:00:01", "020:00:00:00:00:01",
                          "02:00:00:00:00:01 "})
    EXPECT_FALSE(parse_mac(bad)) << bad;
}

TEST(Eth, RandomMacIsLocalUnicastAndVaries) {
  auto a = random_mac(), b = random_mac();
  EXPECT_FALSE(a.is_multicast());
  EXPECT_TRUE(a.is_local());
  EXPECT_NE(a, b);
}

TEST(Eth, ClassifiesAddresses) {
  EXPECT_TRUE(broadcast_mac.is_broadcast());
  EXPECT_TRUE(broadcast_mac.is_multicast());
  EXPECT_TRUE((mac_addr{{0x01, 0, 0x5e, 0, 0, 1}}).is_multicast());
  EXPECT_FALSE((mac_addr{{0x02, 0, 0, 0, 0, 1}}).is_multicast());
  EXPECT_TRUE(mac_addr{}.is_zero());
  EXPECT_EQ((mac_addr{{0, 0, 0, 0, 1, 2}}).key(), 0x102u);
}

TEST(Eth, FrameLimitsFollowMtu) {
  EXPECT_EQ(max_frame_for_mtu(1500), 1518u);
  EXPECT_GT(gso_max_frame, 65536u);
}
