// SPDX-License-Identifier: Apache-2.0
#include "tests/conformance/vstore_targets.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "storage/cow/cow.hpp"

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

// A base image full of a known pattern (so reads that fall through to it are
// checked) and a fresh overlay over it.
core::result<std::string> cow_uri(const temp_dir& dir, core::registry& reg) {
  std::string base = dir.file("base.img");
  int fd = ::open(base.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return core::fail(errno, "create " + base);
  std::vector<std::byte> chunk(1 << 20);
  for (uint64_t off = 0; off < device_size; off += chunk.size()) {
    fill_pattern(chunk, 0xba5e, off);
    if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size())) {
      int e = errno;
      ::close(fd);
      return core::fail(e, "write " + base);
    }
  }
  ::close(fd);
  std::string overlay = dir.file("guest.cow");
  auto h = storage::create_cow_file(reg, overlay, "file://" + base);
  if (!h) return core::fail(std::move(h).err());
  return "cow://" + overlay;
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
      {"cow_over_file", device_size, true, cow_uri},
  };
}

}  // namespace uvd::test
