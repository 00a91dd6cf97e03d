// SPDX-License-Identifier: Apache-2.0
#pragma once
// Shared test helpers: scratch folders, deterministic data patterns, checksums.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace uvd::test {

// A fresh folder removed (with its contents) at scope exit. Under $UVD_TEST_TMPDIR,
// else $TMPDIR, else /tmp.
class temp_dir {
 public:
  temp_dir();
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Bytes that depend on (seed, absolute offset), so a misplaced or stale block
// is caught, not only a wrong one.
void fill_pattern(std::span<std::byte> buf, uint64_t seed, uint64_t offset);
// Offset into buf of the first byte that differs from the pattern, or -1.
int64_t find_pattern_mismatch(std::span<const std::byte> buf, uint64_t seed, uint64_t offset);

uint64_t fnv1a(std::span<const std::byte> buf, uint64_t h = 14695981039346656037ull);

// Creates a file of `size` bytes (sparse) and returns its path.
std::string make_sparse_file(const std::string& path, uint64_t size);

// Runs argv (no shell, stdin from /dev/null), returns its exit status
// (-signal if killed, -1000 on timeout) and its stdout and stderr together.
struct cmd_result {
  int status = -1;
  std::string output;
};
cmd_result run_cmd(const std::vector<std::string>& argv, std::chrono::milliseconds timeout = std::chrono::seconds(60));

// Full path of a tool, or a test failure naming the Debian package to install.
std::string need_tool(const std::string& name, const std::string& package);

// Folders of the build and source trees (from the test environment).
std::string build_dir();
std::string source_dir();

}  // namespace uvd::test
