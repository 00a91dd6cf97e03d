// SPDX-License-Identifier: Apache-2.0
// Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against a real
// `uvd serve` process. A missing client tool is a failure naming the Debian
// package to install, never a skip.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
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

#include "tests/testutil.hpp"

extern char** environ;

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

std::string uvd_binary() {
  if (const char* b = std::getenv("UVD_BIN"); b && *b) return b;
  return UVD_BINARY;
}

using run_result = cmd_result;
run_result run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout = 120s) {
  return run_cmd(argv, timeout);
}

std::string describe(const std::vector<std::string>& argv, const run_result& r) {
  std::string s;
  for (const auto& a : argv) s += a + " ";
  return s + "-> status " + std::to_string(r.status) + "\n" + r.output;
}

// A `uvd serve` process: started with the given arguments, ready once it has
// printed a "serving export" line for every export, stopped with SIGTERM.
class uvd_server {
 public:
  uvd_server(const temp_dir& dir, std::vector<std::string> args, size_t exports) : log_(dir.file("uvd-serve.log")) {
    std::vector<std::string> argv = {uvd_binary(), "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addopen(&fa, 2, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(s.data());
    a.push_back(nullptr);
    int rc = posix_spawn(&pid_, a[0], &fa, nullptr, a.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    if (rc != 0) {
      ::close(out[0]);
      pid_ = -1;
      ADD_FAILURE() << "cannot start " << argv[0] << ": " << std::strerror(rc);
      return;
    }
    out_fd_ = out[0];
    auto deadline = std::chrono::steady_clock::now() + 30s;
    size_t seen = 0;
    while (seen < exports && std::chrono::steady_clock::now() < deadline) {
      pollfd p{out_fd_, POLLIN, 0};
      if (::poll(&p, 1, 200) <= 0) continue;
      char buf[1024];
      ssize_t n = ::read(out_fd_, buf, sizeof buf);
      if (n <= 0) break;
      stdout_.append(buf, static_cast<size_t>(n));
      seen = 0;
      for (size_t pos = 0; (pos = stdout_.find("serving export", pos)) != std::string::npos; ++pos) ++seen;
    }
    ready_ = seen >= exports;
    if (!ready_) ADD_FAILURE() << "uvd serve did not come up:\n" << stdout_ << log();
  }

  ~uvd_server() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) ::close(out_fd_);
  }

  bool ready() const { return ready_; }
  const std::string& banner() const { return stdout_; }

  // SIGTERM and wait; returns the exit status (or -signal, -1000 on timeout).
  int stop(int sig = SIGTERM, std::chrono::seconds timeout = 60s) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    int st = 0;
    while (::waitpid(pid_, &st, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &st, 0);
        pid_ = -1;
        return -1000;
      }
      std::this_thread::sleep_for(20ms);
    }
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
  }

  std::string log() const {
    std::ifstream f(log_);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string stdout_;
  bool ready_ = false;
};

// A file of `size` bytes whose every 8-byte word depends on (seed, offset).
void write_file(const std::string& path, uint64_t size, uint64_t seed) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  std::vector<uint64_t> chunk(1 << 17);
  for (uint64_t off = 0; off < size; off += chunk.size() * 8) {
    for (size_t i = 0; i < chunk.size(); ++i) {
      uint64_t x = seed * 0x9e3779b97f4a7c15ull + off / 8 + i;
      x = (x ^ (x >> 31)) * 0xbf58476d1ce4e5b9ull;
      chunk[i] = x ^ (x >> 29);
    }
    f.write(reinterpret_cast<const char*>(chunk.data()),
            static_cast<std::streamsize>(std::min<uint64_t>(chunk.size() * 8, size - off)));
  }
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  std::vector<char> d(static_cast<size_t>(std::max<std::streamoff>(f.tellg(), 0)));
  f.seekg(0);
  f.read(d.data(), static_cast<std::streamsize>(d.size()));
  return d;
}

std::string nbd_unix(const std::string& name, const std::string& sock) { return "nbd+unix:///" + name + "?socket=" + sock; }

uint16_t free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  socklen_t len = sizeof sa;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  ::close(fd);
  return ntohs(sa.sin_port);
}

class NbdE2e : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st{};
    ASSERT_EQ(::stat(uvd_binary().c_str(), &st), 0) << "the uvd binary is not at " << uvd_binary()
                                                     << " (build the uvd target, or set UVD_BIN)";
    sock_ = dir_.file("nbd.sock");
  }
  temp_dir dir_;
  std::string sock_;
};

TEST_F(NbdE2e, QemuIoWritesAndVerifiesPatterns) {
  std::string qemu_io = need_tool("qemu-io", "qemu-utils");
  ASSERT_FALSE(qemu_io.empty());
  uvd_server srv(dir_, {"--unix", sock_, "--export", "mem=memory:64M"}, 1);
  ASSERT_TRUE(srv.ready());
  EXPECT_NE(srv.banner().find("serving export 'mem' (64 MiB, memory:64M) on " + nbd_unix("mem", sock_)),
            std::string::npos)
      << srv.banner();
  std::vector<std::string> argv = {qemu_io, "-f", "raw", nbd_unix("mem", sock_),
                                   "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
                                   "-c", "write -P 0xcd 4M 64k", "-c", "read -P 0xcd 4M 64k",
                                   "-c", "write -z 8M 1M", "-c", "read -P 0 8M 1M",
                                   "-c", "write -f -P 0x5a 12M 128k", "-c", "write -z -u 9M 64k", "-c", "read -P 0 9M 64k", "-c", "flush",
                                   "-c", "aio_write -P 0x77 20M 256k", "-c", "aio_write -P 0x78 21M 256k",
                                   "-c", "aio_flush", "-c", "read -P 0x77 20M 256k", "-c", "read -P 0x78 21M 256k",
                                   "-c", "discard 30M 1M", "-c", "read -P 0xab 0 1M"};
  auto r = run(argv);
  EXPECT_EQ(r.status, 0) << describe(argv, r);
  EXPECT_EQ(r.output.find("verification failed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("error"), std::string::npos) << r.output;
  // A second connection sees what the first wrote.
  argv = {qemu_io, "-r", "-f", "raw", nbd_unix("mem", sock_), "-c", "read -P 0xcd 4M 64k", "-c", "read -P 0x5a 12M 128k"};
  r = run(argv);
  EXPECT_EQ(r.status, 0) << describe(argv, r);
  EXPECT_EQ(r.output.find("verification failed"), std::string::npos) << r.output;
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

TEST_F(NbdE2e, QemuImgConvertAndCompareAgainstARawCopy) {
  std::string qemu_img = need_tool("qemu-img", "qemu-utils");
  ASSERT_FALSE(qemu_img.empty());
  std::string disk = dir_.file("disk.img"), src = dir_.file("src.img"), copy = dir_.file("copy.img");
  write_file(disk, 32 << 20, 1);
  write_file(src, 32 << 20, 2);
  uvd_server srv(dir_, {"-u", sock_, "-e", "disk=file://" + disk}, 1);
  ASSERT_TRUE(srv.ready());
  std::string uri = nbd_unix("disk", sock_);

  auto info = run({qemu_img, "info", "--output=json", uri});
  EXPECT_EQ(info.status, 0) << info.output;
  EXPECT_NE(info.output.find("\"virtual-size\": 33554432"), std::string::npos) << info.output;

  // Export -> raw file, then compare both ways.
  std::vector<std::string> argv = {qemu_img, "convert", "-f", "raw", "-O", "raw", uri, copy};
  auto r = run(argv);
  ASSERT_EQ(r.status, 0) << describe(argv, r);
  EXPECT_EQ(read_file(copy), read_file(disk));
  argv = {qemu_img, "compare", "-f", "raw", "-F", "raw", uri, copy};
  r = run(argv);
  EXPECT_EQ(r.status, 0) << describe(argv, r);

  // Raw file -> export (many requests in flight), then compare.
  argv = {qemu_img, "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", src, uri};
  r = run(argv);
  ASSERT_EQ(r.status, 0) << describe(argv, r);
  argv = {qemu_img, "compare", "-f", "raw", "-F", "raw", src, uri};
  r = run(argv);
  EXPECT_EQ(r.status, 0) << describe(argv, r);
  // A different image compares different.
  argv = {qemu_img, "compare", "-q", "-f", "raw", "-F", "raw", copy, uri};
  r = run(argv);
  EXPECT_EQ(r.status, 1) << describe(argv, r);

  EXPECT_EQ(srv.stop(), 0) << srv.log();
  // After the server is gone, the file holds exactly what was written.
  EXPECT_EQ(read_file(disk), read_file(src));
}

TEST_F(NbdE2e, NbdinfoAndNbdcopy) {
  std::string nbdinfo = need_tool("nbdinfo", "libnbd-bin");
  std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  ASSERT_FALSE(nbdinfo.empty());
  ASSERT_FALSE(nbdcopy.empty());
  std::string src = dir_.file("src.img"), back = dir_.file("back.img");
  write_file(src, 48 << 20, 3);
  std::string cfg = dir_.file("serve.conf");
  {
    std::ofstream c(cfg);
    c << "# two disks\n[server]\nunix = " << sock_ << "\nmax-in-flight = 32\n\n"
      << "[export scratch]\nuri = memory:48M\ndescription = scratch space\n\n"
      << "[export golden]\nuri = file://" << src << "\nread-only = yes\n";
  }
  uvd_server srv(dir_, {"--config", cfg}, 2);
  ASSERT_TRUE(srv.ready());

  auto r = run({nbdinfo, "--list", "nbd+unix:///?socket=" + sock_});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("scratch"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("golden"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("scratch space"), std::string::npos) << r.output;

  r = run({nbdinfo, "--json", nbd_unix("golden", sock_)});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("\"export-size\": 50331648"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"is_read_only\": true"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"can_multi_conn\": true"), std::string::npos) << r.output;
  r = run({nbdinfo, "--size", nbd_unix("scratch", sock_)});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "50331648\n");

  // golden -> scratch over NBD (several connections, many requests each), scratch -> file.
  std::vector<std::string> argv = {nbdcopy, "--connections=4", "--requests=32", nbd_unix("golden", sock_),
                                   nbd_unix("scratch", sock_)};
  r = run(argv);
  ASSERT_EQ(r.status, 0) << describe(argv, r);
  argv = {nbdcopy, nbd_unix("scratch", sock_), back};
  r = run(argv);
  ASSERT_EQ(r.status, 0) << describe(argv, r);
  EXPECT_EQ(read_file(back), read_file(src));
  EXPECT_EQ(srv.stop(), 0) << srv.log();
  EXPECT_NE(srv.log().find("export 'scratch'"), std::string::npos) << "per-export statistics are logged at shutdown";
}

TEST_F(NbdE2e, ReadOnlyExportRefusesWrites) {
  std::string qemu_io = need_tool("qemu-io", "qemu-utils");
  std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  ASSERT_FALSE(qemu_io.empty());
  ASSERT_FALSE(nbdcopy.empty());
  std::string disk = dir_.file("ro.img"), other = dir_.file("other.img");
  write_file(disk, 8 << 20, 4);
  write_file(other, 8 << 20, 5);
  auto before = read_file(disk);
  uvd_server srv(dir_, {"-u", sock_, "-e", "ro=" + disk + ",ro"}, 1);
  ASSERT_TRUE(srv.ready());
  EXPECT_NE(srv.banner().find("read-only"), std::string::npos) << srv.banner();
  std::vector<std::string> argv = {qemu_io, "-f", "raw", nbd_unix("ro", sock_), "-c", "write -P 0x11 0 64k"};
  auto r = run(argv);
  EXPECT_NE(r.status, 0) << describe(argv, r);
  argv = {nbdcopy, other, nbd_unix("ro", sock_)};
  r = run(argv);
  EXPECT_NE(r.status, 0) << describe(argv, r);
  argv = {qemu_io, "-r", "-f", "raw", nbd_unix("ro", sock_), "-c", "read 0 64k"};
  r = run(argv);
  EXPECT_EQ(r.status, 0) << describe(argv, r);
  EXPECT_EQ(srv.stop(), 0) << srv.log();
  EXPECT_EQ(read_file(disk), before);
}

TEST_F(NbdE2e, SigtermWhileAClientIsConnectedFlushesAndExitsCleanly) {
  std::string qemu_io = need_tool("qemu-io", "qemu-utils");
  ASSERT_FALSE(qemu_io.empty());
  std::string disk = dir_.file("disk.img");
  write_file(disk, 16 << 20, 6);
  uvd_server srv(dir_, {"-u", sock_, "-e", "d=file://" + disk}, 1);
  ASSERT_TRUE(srv.ready());
  // The client writes, then stays connected while the server is told to stop.
  run_result client;
  std::thread t([&] {
    client = run({qemu_io, "-f", "raw", nbd_unix("d", sock_), "-c", "write -P 0x42 1M 2M", "-c", "sleep 3000"});
  });
  std::this_thread::sleep_for(1500ms);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(srv.stop(SIGTERM), 0) << srv.log();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
  t.join();
  EXPECT_NE(client.output.find("wrote 2097152/2097152 bytes"), std::string::npos) << client.output;
  auto data = read_file(disk);
  ASSERT_EQ(data.size(), 16u << 20);
  for (size_t i = 1 << 20; i < 3u << 20; ++i) ASSERT_EQ(data[i], 0x42) << "acknowledged write lost at " << i;
  std::string log = srv.log();
  EXPECT_NE(log.find("SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("export 'd' flushed"), std::string::npos) << log;
}

TEST_F(NbdE2e, TcpListener) {
  std::string nbdinfo = need_tool("nbdinfo", "libnbd-bin");
  std::string qemu_io = need_tool("qemu-io", "qemu-utils");
  ASSERT_FALSE(nbdinfo.empty());
  ASSERT_FALSE(qemu_io.empty());
  std::string hp = "127.0.0.1:" + std::to_string(free_tcp_port());
  uvd_server srv(dir_, {"--tcp", hp, "t=memory:16M"}, 1);
  ASSERT_TRUE(srv.ready());
  EXPECT_NE(srv.banner().find("nbd://" + hp + "/t"), std::string::npos) << srv.banner();
  auto r = run({nbdinfo, "--size", "nbd://" + hp + "/t"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "16777216\n");
  r = run({qemu_io, "-f", "raw", "nbd://" + hp + "/t", "-c", "write -P 0x9 0 1M", "-c", "read -P 0x9 0 1M"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("verification failed"), std::string::npos) << r.output;
  EXPECT_EQ(srv.stop(SIGINT), 0) << srv.log();
}

TEST_F(NbdE2e, HelpAndErrorsTellTheTruth) {
  auto r = run({uvd_binary(), "serve", "--help"});
  EXPECT_EQ(r.status, 0) << r.output;
  for (const char* s : {"--export", "--unix", "--tcp", "--config", "--read-only", "--queue-depth", "--max-in-flight",
                        "127.0.0.1:10809", "SIGTERM", "[export", "flushes every export"})
    EXPECT_NE(r.output.find(s), std::string::npos) << "help does not mention " << s << ":\n" << r.output;

  r = run({uvd_binary(), "serve", "--unix", sock_});
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("nothing to serve"), std::string::npos) << r.output;

  r = run({uvd_binary(), "serve", "--unix", sock_, "--export", "justaname"});
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("NAME=URI"), std::string::npos) << r.output;

  std::string missing = dir_.file("no-such.img");
  r = run({uvd_binary(), "serve", "--unix", sock_, "--export", "x=file://" + missing});
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("no-such.img"), std::string::npos) << r.output;

  r = run({uvd_binary(), "serve", "--unix", sock_, "-e", "a=memory:1M", "-e", "a=memory:2M"});
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("two exports"), std::string::npos) << r.output;

  std::string cfg = dir_.file("bad.conf");
  std::ofstream(cfg) << "[server]\nbogus = 1\n";
  r = run({uvd_binary(), "serve", "--config", cfg});
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("bad.conf:2"), std::string::npos) << r.output;

  // A socket path in use by a live server is refused, not stolen.
  uvd_server srv(dir_, {"--unix", sock_, "a=memory:1M"}, 1);
  ASSERT_TRUE(srv.ready());
  r = run({uvd_binary(), "serve", "--unix", sock_, "b=memory:1M"});
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("in use"), std::string::npos) << r.output;
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

}  // namespace
}  // namespace uvd::test
