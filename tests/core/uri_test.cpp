// SPDX-License-Identifier: Apache-2.0
#include "core/uri.hpp"

#include <gtest/gtest.h>

using namespace uvd::core;

TEST(ParseUri, SchemeWithSlashes) {
  auto u = parse_uri("file:///var/img.raw?direct=1&ro=1");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->transport, "file");
  EXPECT_EQ(u->target, "/var/img.raw");
  EXPECT_EQ(u->options, "direct=1&ro=1");
}

TEST(ParseUri, OpaqueForm) {
  auto u = parse_uri("memory:64M");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->transport, "memory");
  EXPECT_EQ(u->target, "64M");
  EXPECT_EQ(u->options, "");
}

TEST(ParseUri, HostForm) {
  auto u = parse_uri("rdma://10.0.0.1:7471/root");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->transport, "rdma");
  EXPECT_EQ(u->target, "10.0.0.1:7471/root");
}

TEST(ParseUri, BarePathNeedsTransport) {
  auto u = parse_uri("/var/img.raw");
  ASSERT_FALSE(u);
  EXPECT_NE(u.err().message.find("--transport"), std::string::npos);
  auto v = parse_uri("/var/img.raw", "file");
  ASSERT_TRUE(v);
  EXPECT_EQ(v->transport, "file");
  EXPECT_EQ(v->target, "/var/img.raw");
}

TEST(ParseUri, EmptyIsAnError) { EXPECT_FALSE(parse_uri("")); }

TEST(FindOption, FindsKeysAndBareFlags) {
  std::string v;
  EXPECT_TRUE(find_option("a=1&ro&b=xyz", "b", &v));
  EXPECT_EQ(v, "xyz");
  EXPECT_TRUE(find_option("a=1&ro&b=xyz", "ro", &v));
  EXPECT_EQ(v, "1");
  EXPECT_FALSE(find_option("a=1&ro&b=xyz", "r", &v));
  EXPECT_FALSE(find_option("", "a", &v));
}

TEST(ParseSize, Suffixes) {
  EXPECT_EQ(*parse_size("4096"), 4096u);
  EXPECT_EQ(*parse_size("64k"), 65536u);
  EXPECT_EQ(*parse_size("64M"), 64u << 20);
  EXPECT_EQ(*parse_size("2G"), 2ull << 30);
  EXPECT_EQ(*parse_size("1T"), 1ull << 40);
  EXPECT_FALSE(parse_size("12Q"));
  EXPECT_FALSE(parse_size("M"));
  EXPECT_FALSE(parse_size("99999999999999999999"));
  EXPECT_FALSE(parse_size("17179869184T"));
}
