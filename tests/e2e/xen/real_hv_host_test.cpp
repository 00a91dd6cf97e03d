// SPDX-License-Identifier: Apache-2.0
// The real-Xen hypervisor outside Xen (the build and CI hosts): opening it must fail
// cleanly, naming what is missing, so `hv=xen` on a plain Linux machine is a clear error
// and never a crash or a hang. Inside Xen it runs for real in xen_e2e_test.
#include <gtest/gtest.h>
#include <unistd.h>

#include "transports/xen/hv.hpp"

namespace uvd::xen {
namespace {

TEST(XenRealHost, OpenOutsideXenNamesTheMissingDevice) {
  if (::access("/dev/xen/gntalloc", F_OK) == 0) GTEST_SKIP() << "running inside Xen: xen_e2e_test covers this host";
  auto hv = open_real_hypervisor();
  ASSERT_FALSE(hv);
  EXPECT_EQ(hv.err().errnum(), ENOENT) << hv.err().what();
  EXPECT_NE(hv.err().what().find("/dev/xen/gntalloc"), std::string::npos) << hv.err().what();
  EXPECT_NE(hv.err().what().find("xen-gntalloc"), std::string::npos) << hv.err().what();
}

}  // namespace
}  // namespace uvd::xen
