// SPDX-License-Identifier: Apache-2.0
// The daemon transport and its switch side: the handshake refuses malformed
// hellos, oversize messages are counted, a missing switch is a clear error,
// and front ends ride out a switch restart.
#include "transports/daemon/daemon.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "net/netback.hpp"
#include "net/veth.hpp"
#include "tests/net/net_testutil.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/daemon/daemon_proto.hpp"
#include "transports/daemon/daemon_shm.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

class running_switch {
 public:
  explicit running_switch(const std::string& path) {
    auto nb = net::Netback::create();
    EXPECT_TRUE(nb);
    nb_ = std::move(*nb);
    auto l = daemon::listen(path, {});
    EXPECT_TRUE(l) << l.err().what();
    nb_->add_source(std::move(*l));
    loop_ = std::thread([this] { (void)nb_->run(); });
  }
  ~running_switch() {
    nb_->stop();
    loop_.join();
  }

 private:
  std::unique_ptr<net::Netback> nb_;
  std::thread loop_;
};

int connect_to(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  return fd;
}

daemon::hello_msg good_hello() {
  daemon::hello_msg h{.type = daemon::msg_hello, .version = daemon::proto_version, .magic = daemon::proto_magic,
                      .mac = {0x02, 1, 2, 3, 4, 5}, .mtu = 1500};
  std::snprintf(h.name, sizeof h.name, "t");
  return h;
}

// Sends a hello (or anything) and returns the welcome's status, or -1 without one.
int hello_status(const std::string& path, const void* msg, size_t len, bool* closed) {
  int fd = connect_to(path);
  ::send(fd, msg, len, 0);
  daemon::welcome_msg w{};
  ssize_t n = ::recv(fd, &w, sizeof w, 0);
  char c;
  *closed = ::recv(fd, &c, 1, 0) == 0;
  ::close(fd);
  return n == sizeof w ? w.status : -1;
}

uint64_t field(const std::string& s, const std::string& key) {
  auto k = s.find(" " + key + "=");
  return k == std::string::npos ? UINT64_MAX : std::stoull(s.substr(k + key.size() + 2));
}

TEST(Daemon, RefusesMalformedHellos) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  running_switch sw(path);
  struct bad_case {
    const char* what;
    daemon::hello_msg h;
    size_t len;
    int status;
  };
  std::vector<bad_case> cases;
  auto h = good_hello();
  h.magic = 0x12345678;
  cases.push_back({"wrong magic", h, sizeof h, EPROTO});
  h = good_hello();
  h.version = 9;
  cases.push_back({"future version", h, sizeof h, EPROTONOSUPPORT});
  h = good_hello();
  h.mac[0] = 0x01;
  cases.push_back({"multicast MAC", h, sizeof h, EINVAL});
  h = good_hello();
  h.mtu = 20;
  cases.push_back({"MTU too small", h, sizeof h, EINVAL});
  h = good_hello();
  h.name[0] = '\n';
  cases.push_back({"unprintable name", h, sizeof h, EINVAL});
  h = good_hello();
  cases.push_back({"truncated hello", h, sizeof h - 5, EPROTO});
  h = good_hello();
  h.flags = 0x80;
  cases.push_back({"unknown flags", h, sizeof h, EINVAL});
  for (auto& c : cases) {
    bool closed = false;
    EXPECT_EQ(hello_status(path, &c.h, c.len, &closed), c.status) << c.what;
    EXPECT_TRUE(closed) << c.what << ": the connection stays open";
  }
  bool closed = false;
  auto ok = good_hello();
  int fd = connect_to(path);
  ::send(fd, &ok, sizeof ok, 0);
  daemon::welcome_msg w{};
  ASSERT_EQ(::recv(fd, &w, sizeof w, 0), static_cast<ssize_t>(sizeof w));
  EXPECT_EQ(w.status, 0);
  ::close(fd);
  (void)closed;
}

TEST(Daemon, CountsOversizeTruncatedAndNonsenseMessages) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  running_switch sw(path);
  int fd = connect_to(path);
  auto h = good_hello();
  ::send(fd, &h, sizeof h, 0);
  daemon::welcome_msg w{};
  ASSERT_EQ(::recv(fd, &w, sizeof w, 0), static_cast<ssize_t>(sizeof w));
  int sz = 1 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
  std::vector<uint8_t> huge(daemon::max_msg + 100, 0);
  huge[0] = daemon::msg_frame;
  ASSERT_EQ(::send(fd, huge.data(), huge.size(), 0), static_cast<ssize_t>(huge.size()));
  uint8_t trunc[5] = {daemon::msg_frame};
  ::send(fd, trunc, sizeof trunc, 0);
  uint8_t nonsense[20] = {0x77};
  ::send(fd, nonsense, sizeof nonsense, 0);
  daemon::mtu_msg bad_mtu{.type = daemon::msg_mtu, .mtu = 1u << 30};
  ::send(fd, &bad_mtu, sizeof bad_mtu, 0);
  std::string s;
  for (int i = 0; i < 100; ++i) {
    auto t = daemon::query_stats(path);
    ASSERT_TRUE(t) << t.err().what();
    s = *t;
    if (field(s, "rx_dropped") >= 4) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(field(s, "rx_oversize"), 1u) << s;
  EXPECT_EQ(field(s, "rx_truncated"), 1u) << s;
  EXPECT_EQ(field(s, "rx_bad_msg"), 2u) << s;
  ::close(fd);
}

TEST(Daemon, MissingSwitchIsAClearError) {
  auto reg = transports::make_default_registry();
  auto v = net::Veth::open(*reg, "daemon:///nonexistent/uvd/switch.sock");
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("no switch at /nonexistent/uvd/switch.sock"), std::string::npos) << v.err().message;
  EXPECT_NE(v.err().message.find("uvd switch --socket"), std::string::npos) << v.err().message;
}

bool wait_link(net::Veth& v, bool up, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  core::veth_frame out[8];
  while (std::chrono::steady_clock::now() < deadline) {
    v.rx_burst(0, out, 8);  // the transport reconnects from its poll
    if (v.link_up() == up) return true;
    test::wait_veth(v, 20ms);
  }
  return false;
}

TEST(Daemon, WaitsForTheSwitchAndRidesOutARestart) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  auto reg = transports::make_default_registry();
  auto a = net::Veth::open(*reg, "daemon://" + path + "?wait=1&reconnect_ms=20&name=a");
  ASSERT_TRUE(a) << a.err().what();
  EXPECT_FALSE((*a)->link_up()) << "no switch yet";
  std::unique_ptr<net::Veth> b;
  {
    running_switch sw(path);
    ASSERT_TRUE(wait_link(**a, true, 5s)) << "did not find the switch once it started";
    auto bv = net::Veth::open(*reg, "daemon://" + path + "?reconnect_ms=20&name=b");
    ASSERT_TRUE(bv) << bv.err().what();
    b = std::move(*bv);
    std::vector<std::vector<uint8_t>> f = {test::make_test_frame(300, b->mac(), (*a)->mac(), 1)};
    ASSERT_EQ(test::send_frames(**a, f), 1u);
    EXPECT_EQ(test::receive_frames(*b, 1, 3s).size(), 1u);
  }
  EXPECT_TRUE(wait_link(**a, false, 5s)) << "link stayed up with the switch gone";
  EXPECT_TRUE(wait_link(*b, false, 5s));
  running_switch sw2(path);
  ASSERT_TRUE(wait_link(**a, true, 5s));
  ASSERT_TRUE(wait_link(*b, true, 5s));
  std::vector<std::vector<uint8_t>> f = {test::make_test_frame(300, b->mac(), (*a)->mac(), 2)};
  ASSERT_EQ(test::send_frames(**a, f), 1u);
  auto got = test::receive_frames(*b, 1, 3s);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_TRUE(test::check_test_frame(got[0].bytes.data(), 300, 2));
}

TEST(Daemon, SecondSwitchOnALiveSocketIsRefused) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  running_switch sw(path);
  auto l = daemon::listen(path, {});
  ASSERT_FALSE(l);
  EXPECT_NE(l.err().message.find("already listening"), std::string::npos) << l.err().message;
}

// Sends a hello asking for rings with the given descriptors; returns the
// welcome's status (and its flags), or -1 without one.
int ring_hello_status(const std::string& path, daemon::hello_msg h, const int* fds, int nfds, uint16_t* flags = nullptr,
                      int* keep_fd = nullptr) {
  int fd = connect_to(path);
  h.flags |= daemon::hello_shm;
  EXPECT_EQ(daemon::send_with_fds(fd, &h, sizeof h, fds, nfds), 0);
  daemon::welcome_msg w{};
  ssize_t n = ::recv(fd, &w, sizeof w, 0);
  if (flags) *flags = w.flags;
  if (keep_fd)
    *keep_fd = fd;
  else
    ::close(fd);
  return n == sizeof w ? w.status : -1;
}

int sealed_memfd(size_t len, bool seal) {
  int fd = ::memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(len)), 0);
  if (seal) ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
  return fd;
}

TEST(Daemon, RingHelloNeedsASealedMemfdOfTheRightSizeAndEventfds) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  running_switch sw(path);
  const uint32_t order = daemon::ring_min_order;
  const size_t len = daemon::shm_layout::total(order);
  auto h = good_hello();
  h.ring_order = static_cast<uint16_t>(order);
  int e1 = ::eventfd(0, EFD_CLOEXEC), e2 = ::eventfd(0, EFD_CLOEXEC);
  int pipefd[2];
  ASSERT_EQ(::pipe2(pipefd, O_CLOEXEC), 0);

  EXPECT_EQ(ring_hello_status(path, h, nullptr, 0), EINVAL) << "no descriptors";
  int unsealed = sealed_memfd(len, false);
  int fds[3] = {unsealed, e1, e2};
  EXPECT_EQ(ring_hello_status(path, h, fds, 3), EPERM) << "a memfd that can still shrink";
  int small = sealed_memfd(len - 4096, true);
  fds[0] = small;
  EXPECT_EQ(ring_hello_status(path, h, fds, 3), EINVAL) << "a memfd of the wrong size";
  int good = sealed_memfd(len, true);
  fds[0] = good;
  fds[1] = pipefd[1];
  EXPECT_EQ(ring_hello_status(path, h, fds, 3), EINVAL) << "a pipe as doorbell";
  fds[1] = e1;
  auto bad_order = h;
  bad_order.ring_order = 40;
  EXPECT_EQ(ring_hello_status(path, bad_order, fds, 3), EINVAL) << "ring order 40";
  uint16_t flags = 0;
  EXPECT_EQ(ring_hello_status(path, h, fds, 3, &flags), 0);
  EXPECT_TRUE(flags & daemon::hello_shm) << "the switch declined the rings";
  for (int fd : {e1, e2, pipefd[0], pipefd[1], unsealed, small, good}) ::close(fd);
}

TEST(Daemon, CorruptRingDropsThePortAndTheSwitchGoesOn) {
  test::temp_dir dir;
  std::string path = dir.file("sw.sock");
  running_switch sw(path);
  auto conn = daemon::shm_conn::create(daemon::ring_min_order);
  ASSERT_TRUE(conn) << conn.err().what();
  int fds[3];
  (*conn)->fds(fds);
  auto h = good_hello();
  h.ring_order = static_cast<uint16_t>(daemon::ring_min_order);
  int sock = -1;
  ASSERT_EQ(ring_hello_status(path, h, fds, 3, nullptr, &sock), 0);

  // One good broadcast frame from the port's own MAC goes through.
  auto frame = test::make_test_frame(200, net::broadcast_mac, net::mac_addr::from(h.mac), 1);
  ASSERT_TRUE((*conn)->out().push(daemon::frame_hdr{.type = daemon::msg_frame}, frame.data(),
                                  static_cast<uint32_t>(frame.size())));
  (*conn)->out().publish();
  (*conn)->kick_peer();
  std::string s;
  for (int i = 0; i < 100 && field(s, "rx_frames") != 1; ++i) {
    std::this_thread::sleep_for(20ms);
    auto t = daemon::query_stats(path);
    ASSERT_TRUE(t) << t.err().what();
    s = *t;
  }
  ASSERT_EQ(field(s, "rx_frames"), 1u) << s;

  // Then the producer index jumps two rings ahead.
  size_t len = daemon::shm_layout::total(daemon::ring_min_order);
  void* base = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  ASSERT_NE(base, MAP_FAILED);
  auto* ctl = daemon::shm_layout::tx_ctl(base);
  ctl->prod.store(ctl->prod.load() + (2u << daemon::ring_min_order));
  (*conn)->kick_peer();
  for (int i = 0; i < 100; ++i) {
    std::this_thread::sleep_for(20ms);
    auto t = daemon::query_stats(path);
    ASSERT_TRUE(t) << "the switch stopped answering: " << t.err().what();
    s = *t;
    if (s.find("total ports=0") != std::string::npos) break;
  }
  EXPECT_NE(s.find("total ports=0"), std::string::npos) << "the port with a corrupt ring is still there:\n" << s;
  EXPECT_EQ(field(s.substr(s.find("total")), "rx_bad_msg"), 1u) << s;
  ::munmap(base, len);
  char c;
  EXPECT_EQ(::recv(sock, &c, 1, 0), 0) << "the switch should hang up on the port";
  ::close(sock);
}

}  // namespace
