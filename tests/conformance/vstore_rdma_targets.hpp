// SPDX-License-Identifier: Apache-2.0
#pragma once
// Storage conformance targets over the rdma transport (see the .cpp). Each
// fails with ENODEV where there is no RDMA device: the suite skips loudly.
#include <memory>
#include <string>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "tests/testutil.hpp"

namespace uvd::test {

// uvd serve --rdma exporting a raw file.
core::result<std::string> rdma_file_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep);
// uvd serve --rdma exporting a COW overlay over a shared base file.
core::result<std::string> rdma_cow_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep);
// A local COW overlay whose read-only base is served over RDMA.
core::result<std::string> cow_over_rdma_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep);

}  // namespace uvd::test
