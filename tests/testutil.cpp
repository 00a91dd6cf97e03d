// SPDX-License-Identifier: Apache-2.0
#include "tests/testutil.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>

extern char** environ;

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

cmd_result run_cmd(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  cmd_result r;
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return r;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(pipefd[1]);
  if (rc != 0) {
    ::close(pipefd[0]);
    r.output = "cannot run " + argv[0] + ": " + std::strerror(rc);
    return r;
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  char buf[4096];
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    pollfd p{pipefd[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    ssize_t n = ::read(pipefd[0], buf, sizeof buf);
    if (n <= 0) break;
    r.output.append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  int st = 0;
  ::waitpid(pid, &st, 0);
  r.status = timed_out ? -1000 : WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
  return r;
}

std::string need_tool(const std::string& name, const std::string& package) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path && *path ? path : "/usr/sbin:/usr/bin:/sbin:/bin");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    std::string p = dir + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  for (const char* d : {"/usr/sbin", "/sbin", "/usr/bin"}) {
    std::string p = std::string(d) + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  ADD_FAILURE() << name << " is not installed: install the Debian package " << package << " (apt-get install "
                << package << ", or scripts/install-deps)";
  return {};
}

// The environment wins (a test run against another tree); else the tree
// this test was built in.
std::string build_dir() {
  const char* d = std::getenv("UVD_BUILD_DIR");
  return d ? d : UVD_TEST_BUILD_DIR;
}

std::string source_dir() {
  const char* d = std::getenv("UVD_SOURCE_DIR");
  return d ? d : UVD_TEST_SOURCE_DIR;
}

}  // namespace uvd::test
