// SPDX-License-Identifier: Apache-2.0
#include "core/errors.hpp"

#include <gtest/gtest.h>

#include <cerrno>

using namespace uvd::core;

TEST(ClassifyError, PathErrorsFailOver) {
  for (int e : {ENOTCONN, ECONNRESET, ETIMEDOUT, ENODEV, ESHUTDOWN, EPIPE, EHOSTUNREACH}) {
    EXPECT_EQ(classify_error(e), error_class::path) << e;
    EXPECT_EQ(classify_error(-e), error_class::path) << e;
    EXPECT_TRUE(is_path_error(-e));
  }
}

TEST(ClassifyError, MediaErrorsGoToTheCaller) {
  for (int e : {EIO, EINVAL, ENOSPC, EROFS, EOPNOTSUPP, EPERM})
    EXPECT_EQ(classify_error(-e), error_class::request) << e;
  EXPECT_EQ(classify_error(0), error_class::none);
}
