// SPDX-License-Identifier: Apache-2.0
// End to end with the Linux network stack: namespaces the test creates, each
// with an ordinary kernel interface (TAP) backed by a `uvd veth` front end,
// joined through a `uvd switch` daemon. Real peers: ping, iperf3, the
// kernel's TCP. No traffic leaves the namespaces.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "tests/net/net_testutil.hpp"
#include "tests/testutil.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/daemon/daemon_proto.hpp"

extern char** environ;

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

std::string uvd_binary() {
  if (const char* b = std::getenv("UVD_BIN"); b && *b) return b;
  return UVD_BINARY;
}

// A background process with its output in a log file.
class process {
 public:
  process(const std::vector<std::string>& argv, const std::string& log) : log_(log) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    if (posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
  }
  ~process() { stop(SIGKILL); }
  bool running() {
    if (pid_ <= 0) return false;
    int st;
    pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
      pid_ = -1;
      return false;
    }
    return true;
  }
  // Signals and reaps; returns the exit status (or -signal).
  int stop(int sig = SIGTERM) {
    if (pid_ <= 0) return status_;
    ::kill(pid_, sig);
    for (int i = 0; i < 100 && running(); ++i) std::this_thread::sleep_for(50ms);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int st;
      ::waitpid(pid_, &st, 0);
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
      pid_ = -1;
    }
    return status_;
  }
  std::string log() const {
    std::ifstream f(log_);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

 private:
  pid_t pid_ = -1;
  int status_ = -1;
  std::string log_;
};

bool wait_for(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return cond();
}

uint64_t stat_of(const std::string& stats, const std::string& line_prefix, const std::string& key) {
  std::istringstream in(stats);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(line_prefix, 0) != 0) continue;
    auto k = line.find(" " + key + "=");
    if (k == std::string::npos) return 0;
    return std::stoull(line.substr(k + key.size() + 2));
  }
  return 0;
}

double iperf_bps(const std::string& json) {
  auto s = json.find("\"sum_received\"");
  if (s == std::string::npos) return -1;
  auto b = json.find("\"bits_per_second\":", s);
  if (b == std::string::npos) return -1;
  return std::stod(json.substr(b + 18));
}

class NetE2e : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_net_privileges()) GTEST_FAIL();
    need_tool("ping", "iputils-ping");
    if (HasFailure()) GTEST_FAIL();
    sock_ = dir_.file("switch.sock");
  }
  void TearDown() override {
    veths_.clear();
    sw_.reset();
    ns_.clear();
  }

  void start_switch(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {uvd_binary(), "switch", "--socket", sock_};
    argv.insert(argv.end(), extra.begin(), extra.end());
    sw_ = std::make_unique<process>(argv, dir_.file("switch.log"));
    ASSERT_TRUE(wait_for([&] { return ::access(sock_.c_str(), F_OK) == 0; }, 10s))
        << "switch did not start:\n" << sw_->log();
  }

  // A namespace with interface uvd0 (IPv4 10.50.0.<host>/24) backed by a front end on the switch.
  netns& add_host(const std::string& port_name, int host, uint32_t mtu = 1500, std::vector<std::string> extra = {}) {
    auto ns = netns::create("uvde2e");
    EXPECT_TRUE(ns) << ns.err().what();
    netns& n = **ns;
    ns_.push_back(std::move(*ns));
    std::vector<std::string> argv = {uvd_binary(), "veth", "--switch", sock_, "--host", "tap:uvd0", "--mtu",
                                     std::to_string(mtu), "--name", port_name};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto v = std::make_unique<process>(n.exec(argv), dir_.file("veth-" + port_name + ".log"));
    bool up = wait_for([&] { return run_cmd({"ip", "-n", n.name(), "link", "show", "uvd0"}).status == 0; }, 10s);
    EXPECT_TRUE(up) << "uvd veth made no interface:\n" << v->log();
    veths_[port_name] = std::move(v);
    must_run({"ip", "-n", n.name(), "addr", "add", "10.50.0." + std::to_string(host) + "/24", "dev", "uvd0"});
    EXPECT_TRUE(wait_for([&] { return carrier(n); }, 5s)) << "no carrier on uvd0 in " << n.name();
    return n;
  }

  bool carrier(const netns& n) {
    auto r = run_cmd({"ip", "-n", n.name(), "link", "show", "uvd0"});
    return r.status == 0 && r.output.find("LOWER_UP") != std::string::npos &&
           r.output.find("NO-CARRIER") == std::string::npos;
  }

  bool ping(const netns& from, const std::string& to, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {"ping", "-c", "3", "-i", "0.2", "-W", "2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(to);
    auto r = run_cmd(from.exec(argv), 30s);
    EXPECT_EQ(r.status, 0) << r.output;
    return r.status == 0;
  }

  std::string stats() {
    auto t = daemon::query_stats(sock_);
    EXPECT_TRUE(t) << t.err().what();
    return t ? *t : "";
  }

  temp_dir dir_;
  std::string sock_;
  std::unique_ptr<process> sw_;
  std::vector<std::unique_ptr<netns>> ns_;
  std::map<std::string, std::unique_ptr<process>> veths_;
};

TEST_F(NetE2e, PingAcrossTheSwitchIncludingJumboFrames) {
  start_switch();
  auto& a = add_host("a", 1, 9000);
  auto& b = add_host("b", 2, 9000);
  ASSERT_TRUE(ping(a, "10.50.0.2"));
  ASSERT_TRUE(ping(b, "10.50.0.1"));
  // 8972 bytes of ICMP payload + 28 of headers = one unfragmented 9000-byte packet.
  ASSERT_TRUE(ping(a, "10.50.0.2", {"-s", "8972", "-M", "do"}));
  auto s = stats();
  EXPECT_GT(stat_of(s, "port 0", "rx_frames"), 0u) << s;
  EXPECT_EQ(stat_of(s, "total", "rx_dropped"), 0u) << s;
}

// A TCP stream of total bytes from the kernel in a to 10.50.0.2:port in b,
// checked byte for byte by a hash of what arrived.
void verified_tcp_transfer(netns& a, netns& b, uint16_t port, size_t total) {
  std::atomic<bool> listening{false};
  uint64_t got_hash = 0, sent_hash = 0;
  size_t got = 0;
  std::thread server([&] {
    auto g = b.enter();
    int ls = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    ::bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    ::listen(ls, 1);
    listening = true;
    pollfd p{ls, POLLIN, 0};
    if (::poll(&p, 1, 20000) != 1) {
      ::close(ls);
      return;
    }
    int c = ::accept(ls, nullptr, nullptr);
    std::vector<std::byte> buf(1 << 20);
    uint64_t h = 14695981039346656037ull;
    for (;;) {
      ssize_t n = ::recv(c, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      h = fnv1a(std::span<const std::byte>(buf.data(), static_cast<size_t>(n)), h);
      got += static_cast<size_t>(n);
    }
    got_hash = h;
    ::close(c);
    ::close(ls);
  });
  struct joiner {  // also when an assertion returns early
    std::thread& t;
    ~joiner() {
      if (t.joinable()) t.join();
    }
  } join_server{server};
  ASSERT_TRUE(wait_for([&] { return listening.load(); }, 5s));
  {
    auto g = a.enter();
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, "10.50.0.2", &sa.sin_addr);
    ASSERT_EQ(::connect(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0) << std::strerror(errno);
    std::vector<std::byte> buf(1 << 20);
    uint64_t h = 14695981039346656037ull;
    for (size_t off = 0; off < total; off += buf.size()) {
      fill_pattern(buf, 0x7c9 + port, off);
      h = fnv1a(buf, h);
      size_t done = 0;
      while (done < buf.size()) {
        ssize_t n = ::send(s, buf.data() + done, buf.size() - done, MSG_NOSIGNAL);
        ASSERT_GT(n, 0) << std::strerror(errno);
        done += static_cast<size_t>(n);
      }
    }
    sent_hash = h;
    ::shutdown(s, SHUT_WR);
    ::close(s);
  }
  server.join();
  EXPECT_EQ(got, total) << "port " << port;
  EXPECT_EQ(got_hash, sent_hash) << "bytes changed between the kernels (port " << port << ")";
}

// A TCP stream from the kernel in A to the kernel in B, checked byte for byte.
TEST_F(NetE2e, TcpTransferVerifiedEndToEnd) {
  start_switch();
  auto& a = add_host("a", 1);
  auto& b = add_host("b", 2);
  verified_tcp_transfer(a, b, 7001, 64u << 20);
}

// A front end whose TAP has four queues (IFF_MULTI_QUEUE), each read by its
// own worker, talking to one that uses the switch's socket instead of the
// shared-memory rings: four streams at once, each checked byte for byte.
TEST_F(NetE2e, MultiQueueTapAndSocketFrontEndCarryParallelStreams) {
  start_switch();
  auto& a = add_host("a", 1, 1500, {"--queues", "4"});
  auto& b = add_host("b", 2, 1500, {"--shm", "0"});
  auto q = run_cmd(a.exec({"ls", "/sys/class/net/uvd0/queues"}));
  EXPECT_NE(q.output.find("tx-3"), std::string::npos) << "uvd0 has not four queues:\n" << q.output;
  ASSERT_TRUE(ping(a, "10.50.0.2"));
  std::vector<std::thread> streams;
  for (uint16_t i = 0; i < 4; ++i)
    streams.emplace_back([&, i] { verified_tcp_transfer(a, b, static_cast<uint16_t>(7100 + i), 16u << 20); });
  for (auto& t : streams) t.join();
  auto s = stats();
  EXPECT_EQ(stat_of(s, "total", "rx_dropped"), 0u) << s;
}

// A hostile front end: forged source MACs, VLAN tags, oversize, runt and
// truncated messages, 10^5 in all. None passes; all are counted; the
// honest front ends keep working meanwhile.
TEST_F(NetE2e, ForgedAndBadFramesDroppedAndCounted) {
  start_switch();
  auto& a = add_host("a", 1);
  auto& b = add_host("b", 2);
  ASSERT_TRUE(ping(a, "10.50.0.2"));
  auto rx_b = [&] {
    auto r = run_cmd(b.exec({"cat", "/sys/class/net/uvd0/statistics/rx_packets"}));
    return r.status == 0 ? std::stoull(r.output) : 0ull;
  };
  uint64_t b_before = rx_b();

  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, sock_.c_str(), sock_.size());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  const net::mac_addr mine{{0x02, 0xba, 0xd0, 0, 0, 1}}, forged{{0x02, 0x11, 0x11, 0x11, 0x11, 0x11}};
  daemon::hello_msg h{.type = daemon::msg_hello, .version = daemon::proto_version, .magic = daemon::proto_magic,
                      .mtu = 1500};
  std::memcpy(h.mac, mine.data(), 6);
  std::snprintf(h.name, sizeof h.name, "mallory");
  ASSERT_EQ(::send(fd, &h, sizeof h, 0), static_cast<ssize_t>(sizeof h));
  daemon::welcome_msg w{};
  ASSERT_EQ(::recv(fd, &w, sizeof w, 0), static_cast<ssize_t>(sizeof w));
  ASSERT_EQ(w.status, 0);
  auto frame = [&](uint32_t len, const net::mac_addr& src, uint16_t type) {
    std::vector<uint8_t> m(sizeof(daemon::frame_hdr) + len, 0x5a);
    std::memset(m.data(), 0, sizeof(daemon::frame_hdr));  // a well-formed header; the frame is the lie
    m[0] = daemon::msg_frame;
    uint8_t* f = m.data() + sizeof(daemon::frame_hdr);
    if (len >= 14) {
      std::memcpy(f, net::broadcast_mac.data(), 6);  // would flood everywhere if let through
      std::memcpy(f + 6, src.data(), 6);
      net::store_be16(f + 12, type);
    }
    return m;
  };
  std::vector<std::vector<uint8_t>> kinds = {
      frame(100, forged, net::ethertype_ipv4),      // forged source MAC
      frame(100, mine, net::ethertype_vlan),        // VLAN tagged
      frame(1500 + 14 + 100, mine, net::ethertype_ipv4),  // oversize for MTU 1500
      frame(10, mine, 0),                           // runt
      std::vector<uint8_t>{daemon::msg_frame, 0, 0},  // truncated: shorter than the frame header
  };
  constexpr int per_kind = 20000;
  std::thread pinger([&] { ping(a, "10.50.0.2"); });
  for (int i = 0; i < per_kind; ++i)
    for (auto& k : kinds) ASSERT_EQ(::send(fd, k.data(), k.size(), 0), static_cast<ssize_t>(k.size()));
  pinger.join();
  std::string s;
  ASSERT_TRUE(wait_for([&] {
    s = stats();
    return stat_of(s, "port 2", "rx_dropped") >= 5u * per_kind;
  }, 30s)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_bad_mac"), uint64_t(per_kind)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_vlan"), uint64_t(per_kind)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_oversize"), uint64_t(per_kind)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_runt"), uint64_t(per_kind)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_truncated"), uint64_t(per_kind)) << s;
  EXPECT_EQ(stat_of(s, "port 2", "rx_frames"), 0u) << "a bad frame was let through:\n" << s;
  EXPECT_LT(rx_b() - b_before, 1000u) << "B's interface saw the flood";
  ::close(fd);
  ASSERT_TRUE(ping(a, "10.50.0.2")) << "honest ports stopped working";
  ASSERT_TRUE(ping(b, "10.50.0.1"));
}

TEST_F(NetE2e, RateLimitedPortWithinTenPercentNeighbourNotSlowed) {
  std::string iperf = need_tool("iperf3", "iperf3");
  ASSERT_FALSE(iperf.empty());
  start_switch({"--limit", "slow=100mbit"});
  auto& a = add_host("slow", 1);
  auto& c = add_host("fast", 3);
  auto& b = add_host("sink", 2);
  process s1(b.exec({iperf, "-s", "-p", "5201"}), dir_.file("iperf-s1.log"));
  process s2(b.exec({iperf, "-s", "-p", "5202"}), dir_.file("iperf-s2.log"));
  std::this_thread::sleep_for(500ms);
  auto client = [&](const netns& n, const std::string& port, int secs) {
    auto r = run_cmd(n.exec({iperf, "-c", "10.50.0.2", "-p", port, "-t", std::to_string(secs), "-J"}), 60s);
    EXPECT_EQ(r.status, 0) << r.output;
    return iperf_bps(r.output);
  };
  double fast_alone = client(c, "5202", 2);
  double slow = 0, fast = 0;
  std::thread t1([&] { slow = client(a, "5201", 4); });
  std::thread t2([&] { fast = client(c, "5202", 4); });
  t1.join();
  t2.join();
  std::printf("rate limit: slow port %.1f Mbit/s (limit 100), fast port %.1f Mbit/s beside it, %.1f alone\n",
              slow / 1e6, fast / 1e6, fast_alone / 1e6);
  EXPECT_GT(slow, 90e6);
  EXPECT_LT(slow, 110e6);
  EXPECT_GT(fast, 300e6) << "the unlimited port was held to the limit";
  EXPECT_GT(fast, 0.5 * fast_alone) << "the unlimited port was slowed by its limited neighbour";
  auto st = stats();
  EXPECT_GT(stat_of(st, "port 0", "throttled"), 0u) << st;
  EXPECT_EQ(stat_of(st, "port 1", "throttled"), 0u) << st;
}

TEST_F(NetE2e, SwitchKilledMidTransferFrontEndsReconnect) {
  std::string iperf = need_tool("iperf3", "iperf3");
  ASSERT_FALSE(iperf.empty());
  start_switch();
  auto& a = add_host("a", 1);
  auto& b = add_host("b", 2);
  ASSERT_TRUE(ping(a, "10.50.0.2"));
  process server(b.exec({iperf, "-s", "-p", "5201", "-1"}), dir_.file("iperf-s.log"));
  std::this_thread::sleep_for(300ms);
  process client(a.exec({iperf, "-c", "10.50.0.2", "-p", "5201", "-t", "6"}), dir_.file("iperf-c.log"));
  std::this_thread::sleep_for(1500ms);
  sw_->stop(SIGKILL);  // mid-transfer
  EXPECT_TRUE(wait_for([&] { return !carrier(a) && !carrier(b); }, 5s))
      << "front ends did not report link down:\n" << run_cmd({"ip", "-n", a.name(), "link"}).output;
  std::this_thread::sleep_for(500ms);
  for (auto& [name, v] : veths_) EXPECT_TRUE(v->running()) << name << " died:\n" << v->log();
  start_switch();
  EXPECT_TRUE(wait_for([&] { return carrier(a) && carrier(b); }, 10s)) << "front ends did not come back";
  EXPECT_TRUE(ping(a, "10.50.0.2"));
  client.stop(SIGTERM);
  server.stop(SIGTERM);
  for (auto& [name, v] : veths_) {
    EXPECT_TRUE(v->running()) << name << " died:\n" << v->log();
    EXPECT_EQ(v->stop(SIGTERM), 0) << name << ":\n" << v->log();
    auto log = v->log();
    EXPECT_NE(log.find("link down"), std::string::npos) << log;
    EXPECT_NE(log.find("reconnected"), std::string::npos) << log;
  }
}

}  // namespace
}  // namespace uvd::test
