// SPDX-License-Identifier: Apache-2.0
// Processes that die without a word, over the host-local hypervisor:
//   - a blkif front end SIGKILLed with requests in flight leaves the back end
//     serving its other front ends, and its successor reconnects;
//   - a blkif back end SIGKILLed (stopped first, so requests are certainly on
//     its ring) makes the front end fail those requests and every new one with
//     an error within a bounded time instead of hanging.
// The children are this binary again, running one of the DISABLED_ tests below.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/xen/blkback.hpp"
#include "transports/xen/blkif.hpp"
#include "transports/xen/local/local.hpp"

using namespace uvd;
using namespace uvd::xen;
using namespace std::chrono_literals;

extern char** environ;

namespace {

constexpr uint32_t vdev = 51712;

std::string front_uri(const std::string& hub, int domid) {
  return "xen://0/" + std::to_string(vdev) + "?hub=" + hub + "&domid=" + std::to_string(domid) + "&timeout_ms=5000";
}

// This test binary running one disabled test, its stdout on a pipe.
struct child {
  pid_t pid = -1;
  int out = -1;
  ~child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    if (out >= 0) ::close(out);
  }
  // One line of the child's stdout within timeout ("" on timeout or EOF).
  std::string line(std::chrono::milliseconds timeout) {
    std::string l;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{out, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      char c;
      if (::read(out, &c, 1) != 1) break;
      if (c == '\n') return l;
      l += c;
    }
    return "";
  }
  // Reads lines (gtest prints its own) until `want`; false on timeout or EOF.
  bool expect(const std::string& want, std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (line(left) == want) return true;
    }
    return false;
  }
  int kill_and_reap(int sig) {
    int st = 0;
    ::kill(pid, sig);
    ::waitpid(pid, &st, 0);
    pid = -1;
    return st;
  }
};

void spawn_child(child& c, const std::string& test, const std::string& hub) {
  std::string self = "/proc/self/exe", filter = "--gtest_filter=XenRobustnessChild." + test,
              also = "--gtest_also_run_disabled_tests", env = "UVD_XEN_TEST_HUB=" + hub;
  std::vector<char*> argv{self.data(), filter.data(), also.data(), nullptr};
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e) envp.push_back(*e);
  envp.push_back(env.data());
  envp.push_back(nullptr);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, p[1], 1);
  ASSERT_EQ(posix_spawn(&c.pid, self.c_str(), &fa, nullptr, argv.data(), envp.data()), 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(p[1]);
  c.out = p[0];
}

void say(const char* what) {
  std::printf("%s\n", what);
  std::fflush(stdout);
}

// Child: a front end (domain 3) that keeps 32 reads and writes in flight
// forever: every completion submits the next request at once.
TEST(XenRobustnessChild, DISABLED_FrontEndBusyForever) {
  const char* hub = std::getenv("UVD_XEN_TEST_HUB");
  ASSERT_TRUE(hub);
  auto reg = transports::make_default_registry();
  auto v = storage::Vstore::open(*reg, front_uri(hub, 3));
  ASSERT_TRUE(v) << v.err().what();
  struct slot {
    storage::vstore_io io;
    iovec iov;
    std::vector<std::byte> buf = std::vector<std::byte>(64 << 10, std::byte{0x33});
  };
  static storage::Vstore* dev = v->get();
  static std::atomic<uint64_t> done{0};
  static std::vector<slot> slots(32);
  for (size_t i = 0; i < slots.size(); ++i) {
    auto& s = slots[i];
    s.iov = {s.buf.data(), s.buf.size()};
    s.io.opcode = i % 2 ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
    s.io.offset = i * s.buf.size();
    s.io.length = s.buf.size();
    s.io.iov = &s.iov;
    s.io.iovcnt = 1;
    s.io.done = [](storage::vstore_io* io, int) {
      done.fetch_add(1);
      dev->submit(io);
    };
  }
  for (auto& s : slots) dev->submit(&s.io);
  while (done.load() < 256) std::this_thread::sleep_for(1ms);
  say("busy");
  for (;;) std::this_thread::sleep_for(1s);  // until SIGKILL
}

// Child: the back end (domain 0) serving a 16 MiB memory disk to domain 1.
TEST(XenRobustnessChild, DISABLED_BackEnd) {
  const char* hub = std::getenv("UVD_XEN_TEST_HUB");
  ASSERT_TRUE(hub);
  auto reg = transports::make_default_registry();
  auto disk = storage::Vstore::open(*reg, "memory:16M");
  ASSERT_TRUE(disk);
  auto hv = open_local_hypervisor(hub, 0);
  ASSERT_TRUE(hv) << hv.err().what();
  auto bb = blkback::start(std::move(*hv));
  ASSERT_TRUE(bb) << bb.err().what();
  ASSERT_TRUE((*bb)->add_device(1, vdev, std::shared_ptr<storage::Vstore>(std::move(*disk))));
  say("serving");
  for (;;) std::this_thread::sleep_for(1s);  // until SIGKILL
}

class XenRobustness : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    auto h = local_hub::start(dir_.file("hub.sock"));
    ASSERT_TRUE(h) << h.err().what();
    hub_ = std::move(*h);
  }
  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<local_hub> hub_;
};

TEST_F(XenRobustness, FrontEndKilledMidRequestLeavesTheOthersServed) {
  auto disk = storage::Vstore::open(*reg_, "memory:16M");
  ASSERT_TRUE(disk);
  std::shared_ptr<storage::Vstore> shared(std::move(*disk));
  auto hv = open_local_hypervisor(hub_->socket_path(), 0);
  ASSERT_TRUE(hv);
  auto bb = blkback::start(std::move(*hv));
  ASSERT_TRUE(bb) << bb.err().what();
  auto& back = *bb;
  ASSERT_TRUE(back->add_device(1, vdev, shared));
  ASSERT_TRUE(back->add_device(3, vdev, shared));
  auto other = storage::Vstore::open(*reg_, front_uri(hub_->socket_path(), 1));
  ASSERT_TRUE(other) << other.err().what();

  // The other guest does verified I/O the whole time, in its own region.
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> good{0}, bad{0};
  struct joiner {
    std::atomic<bool>& stop;
    std::thread t;
    ~joiner() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } worker{stop, std::thread([&] {
    std::vector<std::byte> w(32 << 10), r(w.size());
    for (uint64_t i = 0; !stop.load(); ++i) {
      uint64_t off = (8 << 20) + (i % 64) * w.size();
      test::fill_pattern(w, w.size(), i);
      bool ok = (*other)->write(off, w.data(), w.size()) && (*other)->read(off, r.data(), r.size()) && r == w;
      (ok ? good : bad).fetch_add(1);
    }
  })};

  for (int round = 0; round < 3; ++round) {
    child c;
    ASSERT_NO_FATAL_FAILURE(spawn_child(c, "DISABLED_FrontEndBusyForever", hub_->socket_path()));
    ASSERT_TRUE(c.expect("busy", 30s)) << "the front end child never got going";
    // Kill it at a different moment each round, while it is certainly busy.
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + 37 * round));
    uint64_t before = back->device_stats(3, vdev)->requests, during = before;
    for (int i = 0; i < 1000 && during == before; ++i) {
      std::this_thread::sleep_for(1ms);
      during = back->device_stats(3, vdev)->requests;
    }
    EXPECT_GT(during, before) << "the child had stopped submitting before it was killed";
    int st = c.kill_and_reap(SIGKILL);
    ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << "status " << st;

    // The other front end keeps being served.
    uint64_t g = good.load();
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (good.load() < g + 20 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
    EXPECT_GE(good.load(), g + 20) << "the survivor stalled after round " << round;

    // The dead guest's successor connects to the same device and is served.
    auto again = storage::Vstore::open(*reg_, front_uri(hub_->socket_path(), 3));
    ASSERT_TRUE(again) << again.err().what();
    std::vector<std::byte> b(64 << 10);
    ASSERT_TRUE((*again)->read(0, b.data(), b.size()));
    ASSERT_TRUE((*again)->write(b.size(), b.data(), b.size()));
  }
  stop = true;
  worker.t.join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GT(good.load(), 60u);
}

TEST_F(XenRobustness, BackEndKilledFailsRequestsWithinBoundedTime) {
  child c;
  ASSERT_NO_FATAL_FAILURE(spawn_child(c, "DISABLED_BackEnd", hub_->socket_path()));
  ASSERT_TRUE(c.expect("serving", 30s)) << "the back end child never started";
  auto v = storage::Vstore::open(*reg_, front_uri(hub_->socket_path(), 1));
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> b(1 << 20);
  ASSERT_TRUE((*v)->write(0, b.data(), b.size()));
  ASSERT_TRUE((*v)->read(0, b.data(), b.size()));

  // Stopped, the back end takes nothing off the ring: these stay in flight.
  ASSERT_EQ(::kill(c.pid, SIGSTOP), 0);
  int stopped = 0;
  ASSERT_EQ(::waitpid(c.pid, &stopped, WUNTRACED), c.pid);  // kill() returns before the stop takes hold
  ASSERT_TRUE(WIFSTOPPED(stopped)) << "status " << stopped;
  constexpr int n = 16;
  static std::atomic<int> finished{0}, failed{0};
  finished = failed = 0;
  std::vector<storage::vstore_io> ios(n);
  std::vector<iovec> iov(n);
  for (int i = 0; i < n; ++i) {
    iov[i] = {b.data() + i * 4096, 4096};
    ios[i].opcode = i % 2 ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
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
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(finished.load(), 0) << "a stopped back end answered";
  int st = c.kill_and_reap(SIGKILL);
  ASSERT_TRUE(WIFSIGNALED(st)) << "status " << st;
  auto t0 = std::chrono::steady_clock::now();

  auto deadline = t0 + 10s;
  while (finished.load() < n && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  if (finished.load() != n) {
    (void)v->release();  // its close would wait for them forever too
    FAIL() << "requests in flight to a dead back end hang: " << finished.load() << " of " << n << " finished in "
           << took.count() << " ms";
  }
  EXPECT_EQ(failed.load(), n) << "requests to a dead back end succeeded";

  // New requests fail at once, too.
  auto t1 = std::chrono::steady_clock::now();
  EXPECT_FALSE((*v)->read(0, b.data(), 4096));
  EXPECT_LT(std::chrono::steady_clock::now() - t1, 5s);
  std::printf("in-flight requests failed %lld ms after the back end died\n", static_cast<long long>(took.count()));
}

}  // namespace
