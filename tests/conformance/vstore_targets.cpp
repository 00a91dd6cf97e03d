// SPDX-License-Identifier: Apache-2.0
#include "tests/conformance/vstore_targets.hpp"

namespace uvd::test {

namespace {

constexpr uint64_t device_size = 64ull << 20;

core::result<std::string> memory_uri(const std::string& options) {
  return std::string("memory:64M") + (options.empty() ? "" : "?" + options);
}

core::result<std::string> file_uri(const temp_dir& dir, const std::string& options) {
  std::string path = make_sparse_file(dir.file("disk.img"), device_size);
  return "file://" + path + (options.empty() ? "" : "?" + options);
}

}  // namespace

std::vector<conformance_target> conformance_targets() {
  return {
      {"memory", device_size, false, [](const temp_dir&, core::registry&) { return memory_uri(""); }},
      // Completions from another thread, a transport that fills up, and
      // requests split at 64 KiB and 4 segments.
      {"memory_async_split", device_size, false,
       [](const temp_dir&, core::registry&) { return memory_uri("async=1&depth=8&max_transfer=64K&max_segments=4"); }},
      {"file_uring", device_size, true, [](const temp_dir& d, core::registry&) { return file_uri(d, "engine=uring"); }},
      {"file_threads", device_size, true,
       [](const temp_dir& d, core::registry&) { return file_uri(d, "engine=threads"); }},
  };
}

}  // namespace uvd::test
