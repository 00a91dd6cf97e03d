// SPDX-License-Identifier: Apache-2.0
// `uvd serve --root NAME=BASE --overlay-dir DIR` with real NBD clients
// (qemu-io, nbdinfo) and a raw one for the names real clients cannot send:
// provisioning on first attach, persistence across restarts, hostile client
// names, isolation, a read-only and unchanged base, two servers racing on a
// first attach, attachment records and `uvd overlay list|create|remove`.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/storage/nbd/nbd_test_client.hpp"
#include "tests/testutil.hpp"

extern char** environ;

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t base_size = 16ull << 20;

std::string uvd() { return UVD_BINARY; }

bool exists(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0;
}

std::string slurp(const std::string& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

uint64_t file_sum(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::string d((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return fnv1a({reinterpret_cast<const std::byte*>(d.data()), d.size()});
}

// Attachment records (visible ones: not dot-names) in an overlay's folder.
size_t records(const std::string& overlay) {
  size_t n = 0;
  if (DIR* d = ::opendir((overlay + ".attached").c_str())) {
    while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

bool wait_records(const std::string& overlay, size_t n, std::chrono::seconds limit = 20s) {
  for (auto deadline = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < deadline;) {
    if (records(overlay) == n) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

size_t count(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = 0; (pos = hay.find(needle, pos)) != std::string::npos; ++pos) ++n;
  return n;
}

// One `uvd serve` process, ready once its unix socket answers.
class server {
 public:
  server(std::vector<std::string> args, std::string sock, std::string log) : sock_(std::move(sock)), log_(std::move(log)) {
    std::vector<std::string> argv = {uvd(), "serve", "--unix", sock_};
    argv.insert(argv.end(), args.begin(), args.end());
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(s.data());
    a.push_back(nullptr);
    if (posix_spawn(&pid_, a[0], &fa, nullptr, a.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    for (auto deadline = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < deadline;) {
      if (slurp(log_).find("serving per-client overlays") != std::string::npos && exists(sock_)) {
        ready_ = true;
        break;
      }
      int st = 0;
      if (pid_ < 0 || ::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(20ms);
    }
  }
  ~server() { stop(SIGKILL); }
  bool ready() const { return ready_; }
  pid_t pid() const { return pid_; }
  std::string log() const { return slurp(log_); }
  int stop(int sig = SIGTERM) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
  }

 private:
  std::string sock_, log_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

class RootsE2e : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(exists(uvd())) << "build the uvd target first: " << uvd();
    qemu_io_ = need_tool("qemu-io", "qemu-utils");
    nbdinfo_ = need_tool("nbdinfo", "libnbd-bin");
    ASSERT_FALSE(qemu_io_.empty() || nbdinfo_.empty());
    base_ = dir_.file("base.img");
    std::vector<std::byte> buf(base_size);
    fill_pattern(buf, 11, 0);
    std::ofstream(base_, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), buf.size());
    base_sum_ = file_sum(base_);
    ovdir_ = dir_.file("overlays");
  }
  std::unique_ptr<server> start(const std::string& sock_name = "s.sock") {
    auto s = std::make_unique<server>(std::vector<std::string>{"--root", "deb=" + base_, "--overlay-dir", ovdir_},
                                      dir_.file(sock_name), dir_.file(sock_name + ".log"));
    EXPECT_TRUE(s->ready()) << s->log();
    return s;
  }
  std::string uri(const std::string& name, const std::string& sock_name = "s.sock") {
    return "nbd+unix:///" + name + "?socket=" + dir_.file(sock_name);
  }
  cmd_result io(const std::string& name, const std::vector<std::string>& cmds, const std::string& sock = "s.sock") {
    std::vector<std::string> argv = {qemu_io_, "-f", "raw"};
    for (auto& c : cmds) {
      argv.push_back("-c");
      argv.push_back(c);
    }
    argv.push_back(uri(name, sock));
    return run_cmd(argv, 60s);
  }
  // qemu-io reports a failed pattern check on stdout and still exits 0.
  static bool io_ok(const cmd_result& r) {
    return r.status == 0 && r.output.find("Pattern verification failed") == std::string::npos &&
           r.output.find("failed") == std::string::npos;
  }

  temp_dir dir_;
  std::string qemu_io_, nbdinfo_, base_, ovdir_;
  uint64_t base_sum_ = 0;
};

TEST_F(RootsE2e, RootWithoutOverlayDirIsAClearError) {
  auto r = run_cmd({uvd(), "serve", "--unix", dir_.file("x.sock"), "--root", "deb=" + base_});
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--root needs --overlay-dir"), std::string::npos) << r.output;
  r = run_cmd({uvd(), "serve", "--unix", dir_.file("x.sock"), "--root", "../x=" + base_, "--overlay-dir", ovdir_});
  EXPECT_EQ(r.status, 2) << r.output;
  r = run_cmd({uvd(), "serve", "--help"});
  EXPECT_NE(r.output.find("--overlay-dir"), std::string::npos);
  EXPECT_NE(r.output.find("NAME/CLIENT"), std::string::npos);
}

TEST_F(RootsE2e, FirstAttachProvisionsAndTheOverlayPersistsAcrossRestarts) {
  {
    auto s = start();
    auto w = io("deb/client-a", {"write -P 0xa1 1M 256k", "flush"});
    ASSERT_TRUE(io_ok(w)) << w.output << s->log();
    EXPECT_TRUE(exists(ovdir_ + "/deb/client-a.cow"));
    EXPECT_EQ(count(s->log(), "provisioned overlay deb/client-a"), 1u) << s->log();
    auto again = io("deb/client-a", {"read -P 0xa1 1M 256k"});
    EXPECT_TRUE(io_ok(again)) << again.output;
    EXPECT_EQ(count(s->log(), "provisioned overlay"), 1u) << "the second attach made a new overlay";
    EXPECT_EQ(s->stop(), 0) << s->log();
  }
  ::unlink(dir_.file("s.sock.log").c_str());  // the restarted server's log alone
  auto s = start();
  auto r = io("deb/client-a", {"read -P 0xa1 1M 256k", "read -P 0 0 4k"});
  // Block 0 comes from the base (pattern 11), not zeros: the second read must fail its check.
  EXPECT_NE(r.output.find("read 262144/262144 bytes at offset 1048576"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("Pattern verification failed at offset 1048576"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("Pattern verification failed at offset 0"), std::string::npos) << r.output;
  EXPECT_EQ(count(s->log(), "provisioned overlay"), 0u) << s->log();
  EXPECT_EQ(file_sum(base_), base_sum_);
}

TEST_F(RootsE2e, TheBaseExportIsReadOnlyAndClientsAreIsolated) {
  auto s = start();
  {
    auto c = nbd::raw_client::connect_unix(dir_.file("s.sock"));
    nbd::export_info info;
    ASSERT_TRUE(c.connect_export("deb", &info));
    EXPECT_TRUE(info.tflags & storage::nbd::NBD_FLAG_READ_ONLY);
    std::vector<uint8_t> junk(4096, 0x55);
    auto e = c.pwrite(junk.data(), 4096, 0);
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(*e, storage::nbd::NBD_EPERM) << "the shared base took a write";
  }
  ASSERT_TRUE(io_ok(io("deb/a", {"write -P 0xaa 0 64k"})));
  ASSERT_TRUE(io_ok(io("deb/b", {"write -P 0xbb 0 64k"})));
  EXPECT_TRUE(io_ok(io("deb/a", {"read -P 0xaa 0 64k"})));
  EXPECT_TRUE(io_ok(io("deb/b", {"read -P 0xbb 0 64k"})));
  // A third client sees the base, bytes for bytes.
  auto c = io("deb/c", {"read -v 0 16"});
  auto d = run_cmd({qemu_io_, "-r", "-f", "raw", "-c", "read -v 0 16", uri("deb")});
  ASSERT_EQ(c.status, 0);
  EXPECT_EQ(c.output.substr(0, c.output.find("read 16/16")), d.output.substr(0, d.output.find("read 16/16")));
  auto list = run_cmd({nbdinfo_, "--list", uri("")});
  EXPECT_NE(list.output.find("export=\"deb\""), std::string::npos) << list.output;
  for (const char* n : {"deb/a", "deb/b", "deb/c"})
    EXPECT_NE(list.output.find(std::string("export=\"") + n + "\""), std::string::npos) << list.output;
  EXPECT_EQ(s->stop(), 0);
  EXPECT_EQ(file_sum(base_), base_sum_) << "the base was written";
}

TEST_F(RootsE2e, HostileClientNamesAreRefused) {
  auto s = start();
  const std::string too_long = "deb/" + std::string(64, 'x');
  const std::vector<std::string> hostile = {"deb/",      "deb/../x", "deb/../../etc/passwd", "deb/a/b/c", too_long,
                                            std::string("deb/a\0b", 7), "deb/.hidden", "deb/-rf", "../deb/x"};
  for (const std::string& name : hostile) {
    auto c = nbd::raw_client::connect_unix(dir_.file("s.sock"));
    ASSERT_TRUE(c.start());
    nbd::export_info info;
    auto rep = c.go(name, &info);
    ASSERT_TRUE(rep.has_value()) << name;
    EXPECT_TRUE(*rep == storage::nbd::NBD_REP_ERR_POLICY || *rep == storage::nbd::NBD_REP_ERR_UNKNOWN)
        << "'" << name << "' got reply type " << *rep;
  }
  // The refusal says why.
  auto c = nbd::raw_client::connect_unix(dir_.file("s.sock"));
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(storage::nbd::NBD_OPT_GO, nbd::raw_client::info_request("deb/../x", {})));
  auto why = c.read_option_reply();
  ASSERT_TRUE(why.has_value());
  EXPECT_EQ(why->type, storage::nbd::NBD_REP_ERR_POLICY);
  EXPECT_NE(std::string(why->data.begin(), why->data.end()).find("client name '../x' must start with"), std::string::npos)
      << std::string(why->data.begin(), why->data.end());
  auto r = run_cmd({nbdinfo_, uri("deb/a/b/c")});
  EXPECT_NE(r.status, 0) << r.output;
  auto all = run_cmd({uvd(), "overlay", "list", ovdir_});
  EXPECT_NE(all.output.find("no overlays"), std::string::npos) << all.output;
  EXPECT_FALSE(exists(dir_.file("x.cow")));
  EXPECT_FALSE(exists(ovdir_ + "/x.cow"));
  ASSERT_TRUE(io_ok(io("deb/fine", {"write -P 1 0 4k"})));  // the server is still well
}

// Two servers of one DIR (as for a multipath client over two RDMA devices)
// race on a client's first attach: one overlay, made once, both serve it.
TEST_F(RootsE2e, TwoServersRacingOnAFirstAttachShareOneOverlay) {
  auto s1 = start("s1.sock");
  auto s2 = start("s2.sock");
  cmd_result r1, r2;
  std::thread t1([&] { r1 = io("deb/racer", {"read 0 4k", "sleep 300", "read 0 4k"}, "s1.sock"); });
  std::thread t2([&] { r2 = io("deb/racer", {"read 0 4k", "sleep 300", "read 0 4k"}, "s2.sock"); });
  t1.join();
  t2.join();
  EXPECT_EQ(r1.status, 0) << r1.output << s1->log();
  EXPECT_EQ(r2.status, 0) << r2.output << s2->log();
  EXPECT_EQ(count(s1->log(), "provisioned overlay") + count(s2->log(), "provisioned overlay"), 1u)
      << s1->log() << s2->log();
  auto list = run_cmd({uvd(), "overlay", "list", ovdir_});
  EXPECT_EQ(count(list.output, "racer"), 1u) << list.output;
  ASSERT_TRUE(io_ok(io("deb/racer", {"write -P 0x77 8M 64k"}, "s1.sock")));
  s1->stop();
  s2->stop();
  auto s = start("s1.sock");
  EXPECT_TRUE(io_ok(io("deb/racer", {"read -P 0x77 8M 64k"}, "s1.sock")));
}

TEST_F(RootsE2e, AttachmentRecordsShowEveryPathAndBlockRemoval) {
  auto s1 = start("s1.sock");
  auto s2 = start("s2.sock");
  // One client, two paths (one per server process), held open for a while
  // (long enough for two runs of the uvd tool on a loaded machine).
  const std::string overlay = ovdir_ + "/deb/node1.cow";
  std::thread t1([&] { io("deb/node1", {"read 0 4k", "sleep 10000"}, "s1.sock"); });
  std::thread t2([&] { io("deb/node1", {"read 0 4k", "sleep 10000"}, "s2.sock"); });
  EXPECT_TRUE(wait_records(overlay, 2)) << s1->log() << s2->log();
  cmd_result list = run_cmd({uvd(), "overlay", "list", ovdir_});
  EXPECT_EQ(count(list.output, "nbd unix:" + dir_.file("s1.sock")), 1u) << list.output;
  EXPECT_EQ(count(list.output, "nbd unix:" + dir_.file("s2.sock")), 1u) << list.output;
  EXPECT_NE(list.output.find("pid " + std::to_string(s1->pid())), std::string::npos) << list.output;
  EXPECT_NE(list.output.find("pid " + std::to_string(s2->pid())), std::string::npos) << list.output;
  EXPECT_NE(list.output.find("16 MiB"), std::string::npos) << list.output;
  auto rm = run_cmd({uvd(), "overlay", "remove", ovdir_, "deb", "node1"});
  EXPECT_EQ(rm.status, 1) << rm.output;
  EXPECT_NE(rm.output.find("is attached"), std::string::npos) << rm.output;
  EXPECT_TRUE(exists(ovdir_ + "/deb/node1.cow"));
  t1.join();
  t2.join();
  EXPECT_TRUE(wait_records(overlay, 0)) << "records outlived their connections";
  // A server killed while a client is attached leaves a record of a dead pid: ignored.
  std::thread t3([&] { io("deb/node1", {"read 0 4k", "sleep 10000"}, "s1.sock"); });
  EXPECT_TRUE(wait_records(overlay, 1));
  s1->stop(SIGKILL);
  EXPECT_EQ(records(overlay), 1u) << "the killed server's record should stay behind (and be ignored)";
  t3.join();
  list = run_cmd({uvd(), "overlay", "list", ovdir_});
  EXPECT_EQ(count(list.output, "nbd unix:"), 0u) << list.output;
  rm = run_cmd({uvd(), "overlay", "remove", ovdir_, "deb", "node1"});
  EXPECT_EQ(rm.status, 0) << rm.output;
  EXPECT_FALSE(exists(ovdir_ + "/deb/node1.cow"));
  EXPECT_FALSE(exists(ovdir_ + "/deb/node1.cow.attached"));
}

TEST_F(RootsE2e, OverlayCreateAndConfigFile) {
  auto c = run_cmd({uvd(), "overlay", "create", ovdir_, "deb", "pre", "--base", base_});
  ASSERT_EQ(c.status, 0) << c.output;
  c = run_cmd({uvd(), "overlay", "create", ovdir_, "deb", "pre", "--base", base_});
  EXPECT_EQ(c.status, 1) << c.output;
  c = run_cmd({uvd(), "overlay", "create", ovdir_, "deb", "../pre", "--base", base_});
  EXPECT_EQ(c.status, 2) << c.output;
  const std::string cfg = dir_.file("serve.conf");
  std::ofstream(cfg) << "[server]\noverlay-dir = " << ovdir_
                     << "\n\n[root deb]\nbase = " << base_ << "\n";
  server s({"--config", cfg}, dir_.file("c.sock"), dir_.file("c.log"));
  ASSERT_TRUE(s.ready()) << s.log();
  EXPECT_TRUE(io_ok(io("deb/pre", {"write -P 3 0 4k", "read -P 3 0 4k"}, "c.sock")));
  EXPECT_EQ(count(s.log(), "provisioned overlay"), 0u) << "the pre-made overlay was not used";
  auto list = run_cmd({uvd(), "overlay", "list", ovdir_});
  EXPECT_NE(list.output.find("pre"), std::string::npos) << list.output;
  EXPECT_NE(list.output.find("64 KiB"), std::string::npos) << list.output;  // one 64 KiB COW block
}

}  // namespace
}  // namespace uvd::test
