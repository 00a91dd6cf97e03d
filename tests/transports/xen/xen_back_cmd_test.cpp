// SPDX-License-Identifier: Apache-2.0
// Two processes: `uvd xen-back` serves a file over blkif (host-local
// hypervisor); this process is the front end. Then SIGTERM: the back end
// disconnects, the front end's requests fail instead of hanging, and the data
// is in the file.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>

#include "net/veth.hpp"
#include "storage/vstore.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/xen/local/local.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

extern char** environ;

using namespace uvd;

namespace {

// Reads one line from fd within the timeout ("" on timeout or EOF).
std::string read_line(int fd, int timeout_ms) {
  std::string line;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char c;
    if (::read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return "";
}

// SIGSTOP takes effect asynchronously: wait until every thread of pid is stopped.
bool wait_stopped(pid_t pid) {
  for (int i = 0; i < 1000; ++i) {
    bool all = true;
    std::string dir = "/proc/" + std::to_string(pid) + "/task";
    std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
    if (!d) return false;
    while (dirent* e = ::readdir(d.get())) {
      if (e->d_name[0] == '.') continue;
      std::FILE* f = std::fopen((dir + "/" + e->d_name + "/stat").c_str(), "r");
      if (!f) continue;
      char buf[512] = {};
      size_t n = std::fread(buf, 1, sizeof buf - 1, f);
      std::fclose(f);
      const char* rp = std::strrchr(buf, ')');  // the state follows the command name
      if (n == 0 || !rp || rp[1] != ' ' || (rp[2] != 'T' && rp[2] != 't')) all = false;
    }
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

TEST(XenBackCommand, ServesAFileToAFrontEndInAnotherProcess) {
  test::temp_dir dir;
  std::string img = test::make_sparse_file(dir.file("disk.img"), 8 << 20);
  std::string hub = dir.file("hub.sock");
  std::string uvd = UVD_BINARY;
  ASSERT_EQ(::access(uvd.c_str(), X_OK), 0) << uvd;

  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  std::vector<std::string> args = {uvd, "xen-back", "--hub", hub, "--disk", "1/51712=file://" + img};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, uvd.c_str(), &fa, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  std::string uri = read_line(out[0], 20000);
  ASSERT_EQ(uri, "xen://0/51712?hub=" + hub + "&domid=1") << "uvd xen-back printed no URI";

  auto reg = transports::make_default_registry();
  auto v = storage::Vstore::open(*reg, uri);
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> w(300 << 10), r(w.size());
  test::fill_pattern(w, 3, 4096);
  ASSERT_TRUE((*v)->write(4096, w.data(), w.size()));
  ASSERT_TRUE((*v)->flush());
  ASSERT_TRUE((*v)->read(4096, r.data(), r.size()));
  EXPECT_EQ(r, w);

  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status " << st;
  // The back end said Closed on its way out: requests fail, none hangs.
  bool failed = false;
  for (int i = 0; i < 100 && !failed; ++i) {
    failed = !(*v)->read(0, r.data(), 4096);
    if (!failed) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(failed);
  v->reset();
  ::close(out[0]);

  int fd = ::open(img.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<std::byte> f(w.size());
  ASSERT_EQ(::pread(fd, f.data(), f.size(), 4096), static_cast<ssize_t>(f.size()));
  ::close(fd);
  EXPECT_EQ(test::find_pattern_mismatch(f, 3, 4096), -1);
}

// Two netif front ends in this process, the back end's switch in `uvd xen-back`.
TEST(XenBackCommand, SwitchesFramesBetweenTwoVifs) {
  test::temp_dir dir;
  std::string hub = dir.file("hub.sock");
  std::string uvd = UVD_BINARY;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  std::vector<std::string> args = {uvd, "xen-back", "--hub", hub, "--vif", "1/0", "--vif", "2/0"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, uvd.c_str(), &fa, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  std::string u1 = read_line(out[0], 20000), u2 = read_line(out[0], 20000);
  ASSERT_EQ(u1, "xen://0/0?hub=" + hub + "&domid=1");
  ASSERT_EQ(u2, "xen://0/0?hub=" + hub + "&domid=2");
  {
    auto reg = transports::make_default_registry();
    auto a = net::Veth::open(*reg, u1);
    auto b = net::Veth::open(*reg, u2);
    ASSERT_TRUE(a && b) << (a ? b.err().what() : a.err().what());
    std::vector<std::vector<uint8_t>> frames;
    for (uint32_t i = 0; i < 50; ++i) frames.push_back(test::make_test_frame(60 + i * 29, (*b)->mac(), (*a)->mac(), i));
    ASSERT_EQ(test::send_frames(**a, frames, std::chrono::seconds(5)), frames.size());
    auto got = test::receive_frames(**b, frames.size(), std::chrono::seconds(5));
    ASSERT_EQ(got.size(), frames.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].bytes, frames[i]) << i;
  }
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status " << st;
  ::close(out[0]);
}

// The hub here, the back end (`uvd xen-back --join`) in a child that is
// stopped with requests on its ring and then SIGKILLed: the hub removes the
// dead domain's backend directory, and the front end fails every request.
TEST(XenBackCommand, KilledBackEndFailsRequestsInsteadOfHanging) {
  test::temp_dir dir;
  auto hub = xen::local_hub::start(dir.file("hub.sock"));
  ASSERT_TRUE(hub) << hub.err().what();
  std::string uvd = UVD_BINARY;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  std::vector<std::string> args = {uvd, "xen-back", "--hub", (*hub)->socket_path(), "--join", "--disk",
                                   "1/51712=memory:16M"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, uvd.c_str(), &fa, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  std::string uri = read_line(out[0], 20000);
  ASSERT_FALSE(uri.empty()) << "uvd xen-back printed no URI";
  auto reg = transports::make_default_registry();
  auto v = storage::Vstore::open(*reg, uri);
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> b(1 << 16);
  ASSERT_TRUE((*v)->write(0, b.data(), b.size()));

  ASSERT_EQ(::kill(pid, SIGSTOP), 0);  // takes nothing off the ring from now on
  ASSERT_TRUE(wait_stopped(pid)) << "the back end did not stop";
  constexpr int n = 8;
  static std::atomic<int> finished, failed;
  finished = failed = 0;
  std::vector<storage::vstore_io> ios(n);
  std::vector<iovec> iov(n);
  for (int i = 0; i < n; ++i) {
    iov[i] = {b.data() + i * 4096, 4096};
    ios[i].opcode = core::VSTORE_OP_READ;
    ios[i].offset = uint64_t(i) * 4096;
    ios[i].length = 4096;
    ios[i].iov = &iov[i];
    ios[i].iovcnt = 1;
    ios[i].done = [](storage::vstore_io*, int status) {
      if (status != 0) failed.fetch_add(1);
      finished.fetch_add(1);
    };
    (*v)->submit(&ios[i]);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(finished.load(), 0) << "a stopped back end answered";
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int st;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (finished.load() < n && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(finished.load(), n) << "requests to a dead back end hang";
  EXPECT_EQ(failed.load(), n);
  EXPECT_FALSE((*v)->read(0, b.data(), 4096)) << "new requests must fail too";
  v->reset();
  ::close(out[0]);
}

}  // namespace
