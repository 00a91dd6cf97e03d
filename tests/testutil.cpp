// SPDX-License-Identifier: Apache-2.0
#include "tests/testutil.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace uvd::test {

namespace {

uint64_t mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::byte pattern_byte(uint64_t seed, uint64_t off) {
  return static_cast<std::byte>(mix(seed * 0x100000001b3ull ^ (off >> 3)) >> ((off & 7) * 8));
}

}  // namespace

temp_dir::temp_dir() {
  const char* base = std::getenv("UVD_TEST_TMPDIR");
  if (!base || !*base) base = std::getenv("TMPDIR");
  if (!base || !*base) base = "/tmp";
  std::string tmpl = std::string(base) + "/uvd-test-XXXXXX";
  if (!mkdtemp(tmpl.data())) {
    ADD_FAILURE() << "mkdtemp " << tmpl << ": " << std::strerror(errno);
  }
  path_ = tmpl;
}

temp_dir::~temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void fill_pattern(std::span<std::byte> buf, uint64_t seed, uint64_t offset) {
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern_byte(seed, offset + i);
}

int64_t find_pattern_mismatch(std::span<const std::byte> buf, uint64_t seed, uint64_t offset) {
  for (size_t i = 0; i < buf.size(); ++i)
    if (buf[i] != pattern_byte(seed, offset + i)) return static_cast<int64_t>(i);
  return -1;
}

uint64_t fnv1a(std::span<const std::byte> buf, uint64_t h) {
  for (std::byte b : buf) {
    h ^= static_cast<uint8_t>(b);
    h *= 1099511628211ull;
  }
  return h;
}

std::string make_sparse_file(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  EXPECT_GE(fd, 0) << path << ": " << std::strerror(errno);
  if (fd >= 0) {
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    ::close(fd);
  }
  return path;
}

std::string build_dir() {
  const char* d = std::getenv("UVD_BUILD_DIR");
  return d ? d : ".";
}

std::string source_dir() {
  const char* d = std::getenv("UVD_SOURCE_DIR");
  return d ? d : ".";
}

}  // namespace uvd::test
