// SPDX-License-Identifier: Apache-2.0
#include "core/result.hpp"

#include <gtest/gtest.h>

#include <memory>

using namespace uvd::core;

namespace {
result<int> half(int x) {
  if (x % 2) return fail(EINVAL, std::to_string(x) + " is odd");
  return x / 2;
}
}  // namespace

TEST(Result, ValueAndError) {
  auto a = half(8);
  ASSERT_TRUE(a);
  EXPECT_EQ(*a, 4);
  auto b = half(3);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.err().errnum(), EINVAL);
  EXPECT_EQ(b.err().what(), "3 is odd: Invalid argument");
}

TEST(Result, MoveOnlyValues) {
  result<std::unique_ptr<int>> r = std::make_unique<int>(7);
  ASSERT_TRUE(r);
  auto p = std::move(r).value();
  EXPECT_EQ(*p, 7);
}

TEST(Result, VoidAndNegativeErrno) {
  result<void> ok_r = ok();
  EXPECT_TRUE(ok_r);
  result<void> bad = fail(-ENOSPC, "disk full");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.err().errnum(), ENOSPC);
  EXPECT_EQ(bad.err().what(), "disk full: No space left on device");
}
