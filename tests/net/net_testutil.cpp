// SPDX-License-Identifier: Apache-2.0
#include "tests/net/net_testutil.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <cstring>
#include <sstream>
#include <thread>


namespace uvd::test {

using namespace std::chrono_literals;

std::vector<uint8_t> make_test_frame(uint32_t len, const net::mac_addr& dst, const net::mac_addr& src, uint32_t seq) {
  std::vector<uint8_t> f(len);
  std::memcpy(f.data(), dst.data(), std::min<uint32_t>(6, len));
  if (len >= 12) std::memcpy(f.data() + 6, src.data(), 6);
  if (len >= 14) net::store_be16(f.data() + 12, test_ethertype);
  if (len >= 18) net::store_be32(f.data() + 14, seq);
  uint32_t x = seq * 2654435761u + len;
  for (uint32_t i = 18; i < len; ++i) {
    x = x * 1103515245u + 12345u;
    f[i] = static_cast<uint8_t>(x >> 16);
  }
  return f;
}

int64_t test_frame_seq(const uint8_t* f, uint32_t len) {
  if (len < 18 || net::frame_ethertype(f) != test_ethertype) return -1;
  return net::load_be32(f + 14);
}

bool check_test_frame(const uint8_t* f, uint32_t len, int64_t want_seq) {
  if (len < 14 || net::frame_ethertype(f) != test_ethertype) return false;
  uint32_t seq = len >= 18 ? net::load_be32(f + 14) : 0;
  if (want_seq >= 0 && len >= 18 && seq != want_seq) return false;
  auto ref = make_test_frame(len, net::frame_dst(f), net::frame_src(f), seq);
  return std::memcmp(ref.data(), f, len) == 0;
}

std::vector<uint8_t> make_tcp4_frame(const net::mac_addr& dst, const net::mac_addr& src, uint32_t payload,
                                     uint32_t seq, core::veth_frame* desc, uint16_t gso_size) {
  const uint32_t l3 = 14, l4 = 34, hdr = 54;
  std::vector<uint8_t> f(hdr + payload);
  std::memcpy(f.data(), dst.data(), 6);
  std::memcpy(f.data() + 6, src.data(), 6);
  net::store_be16(f.data() + 12, net::ethertype_ipv4);
  uint8_t* ip = f.data() + l3;
  ip[0] = 0x45;
  net::store_be16(ip + 2, static_cast<uint16_t>(std::min<uint32_t>(65535, 40 + payload)));
  net::store_be16(ip + 4, 0x1234);
  ip[6] = 0x40;  // DF
  ip[8] = 64;
  ip[9] = 6;
  uint8_t addrs[8] = {10, 9, 0, 1, 10, 9, 0, 2};
  std::memcpy(ip + 12, addrs, 8);
  net::store_be16(ip + 10, static_cast<uint16_t>(~net::ones_sum(ip, 20)));
  uint8_t* tcp = f.data() + l4;
  net::store_be16(tcp, 40000);
  net::store_be16(tcp + 2, 5001);
  net::store_be32(tcp + 4, seq);
  net::store_be32(tcp + 8, 1);
  tcp[12] = 5 << 4;
  tcp[13] = 0x18;  // PSH ACK
  net::store_be16(tcp + 14, 65535);
  for (uint32_t i = 0; i < payload; ++i) f[hdr + i] = static_cast<uint8_t>(i * 7 + seq);
  // Pseudo-header sum (not complemented) in the checksum field, as a stack leaves it.
  uint8_t ph[12];
  std::memcpy(ph, addrs, 8);
  ph[8] = 0;
  ph[9] = 6;
  net::store_be16(ph + 10, static_cast<uint16_t>(20 + payload));
  net::store_be16(tcp + 16, net::ones_sum(ph, 12));
  if (desc) {
    *desc = core::veth_frame{.data = f.data(), .len = static_cast<uint32_t>(f.size()),
                             .flags = core::VETH_FRAME_CSUM_PARTIAL, .csum_start = l4, .csum_offset = 16};
    if (gso_size) {
      desc->flags |= core::VETH_FRAME_GSO;
      desc->gso_size = gso_size;
      desc->gso_type = 1;
    }
  }
  return f;
}

void wait_veth(net::Veth& v, std::chrono::milliseconds timeout) {
  pollfd p[9];
  nfds_t n = 0;
  p[n++] = pollfd{v.event_fd(), POLLIN, 0};
  for (uint32_t q = 0; q < v.nqueues() && n < 9; ++q)
    if (int fd = v.rx_fd(q); fd >= 0) p[n++] = pollfd{fd, POLLIN, 0};
  ::poll(p, n, static_cast<int>(timeout.count()));
  v.clear_events();
}

size_t send_frames(net::Veth& v, std::vector<std::vector<uint8_t>>& frames, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  size_t sent = 0;
  std::vector<core::veth_frame> desc(frames.size());
  std::vector<core::veth_frame*> ptrs(frames.size());
  for (size_t i = 0; i < frames.size(); ++i) {
    desc[i] = core::veth_frame{.data = frames[i].data(), .len = static_cast<uint32_t>(frames[i].size())};
    ptrs[i] = &desc[i];
  }
  while (sent < frames.size() && std::chrono::steady_clock::now() < deadline) {
    uint32_t n = static_cast<uint32_t>(std::min<size_t>(frames.size() - sent, 64));
    sent += v.tx_burst(0, ptrs.data() + sent, n);
    if (sent < frames.size() && v.tx_stopped(0)) wait_veth(v, 5ms);
  }
  return sent;
}

std::vector<received_frame> receive_frames(net::Veth& v, size_t want, std::chrono::milliseconds timeout,
                                           bool (*keep)(const uint8_t*, uint32_t)) {
  std::vector<received_frame> got;
  std::vector<core::veth_frame> out(64);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (got.size() < want && std::chrono::steady_clock::now() < deadline) {
    bool any = false;
    for (uint32_t q = 0; q < v.nqueues(); ++q) {
      uint32_t n = v.rx_burst(q, out.data(), 64);
      for (uint32_t i = 0; i < n; ++i) {
        const auto& f = out[i];
        if (keep && !keep(f.data, f.len)) continue;
        got.push_back(received_frame{std::vector<uint8_t>(f.data, f.data + f.len), f.flags, f.gso_size,
                                     f.csum_start, f.csum_offset, f.gso_type});
      }
      any |= n > 0;
    }
    if (!any) wait_veth(v, 5ms);
  }
  return got;
}

bool must_run(const std::vector<std::string>& argv) {
  auto r = run_cmd(argv);
  if (r.status == 0) return true;
  std::string s;
  for (const auto& a : argv) s += a + " ";
  ADD_FAILURE() << s << "-> status " << r.status << "\n" << r.output;
  return false;
}


bool require_net_privileges() {
  if (::geteuid() != 0) {
    ADD_FAILURE() << "this test needs root (network namespaces and /dev/net/tun); run it as root, as CI does";
    return false;
  }
  if (::access("/dev/net/tun", R_OK | W_OK) != 0) {
    ADD_FAILURE() << "/dev/net/tun is missing or not usable (" << std::strerror(errno)
                  << "): load the tun module (modprobe tun) or create the node (mknod /dev/net/tun c 10 200)";
    return false;
  }
  if (::access("/proc/self/ns/net", R_OK) != 0) {
    ADD_FAILURE() << "this kernel has no network namespaces (/proc/self/ns/net missing)";
    return false;
  }
  return !need_tool("ip", "iproute2").empty();
}

core::result<std::unique_ptr<netns>> netns::create(const std::string& prefix) {
  auto ns = std::unique_ptr<netns>(new netns());
  std::random_device rd;
  ns->name_ = prefix + std::to_string(::getpid()) + "-" + std::to_string(rd() % 100000);
  auto r = run_cmd({"ip", "netns", "add", ns->name_});
  if (r.status != 0) {
    ns->name_.clear();
    return core::fail(EPERM, "ip netns add failed (needs root and network namespaces): " + r.output);
  }
  run_cmd({"ip", "-n", ns->name_, "link", "set", "lo", "up"});
  // Quiet kernels: no IPv6 autoconfiguration chatter on test links.
  run_cmd({"ip", "netns", "exec", ns->name_, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"});
  run_cmd({"ip", "netns", "exec", ns->name_, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"});
  return ns;
}

netns::~netns() {
  if (!name_.empty()) run_cmd({"ip", "netns", "del", name_});
}

netns::guard netns::enter() const {
  int old = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  int fd = ::open(("/run/netns/" + name_).c_str(), O_RDONLY | O_CLOEXEC);
  if (old < 0 || fd < 0 || ::setns(fd, CLONE_NEWNET) != 0) {
    ADD_FAILURE() << "cannot enter network namespace " << name_ << ": " << std::strerror(errno);
    if (fd >= 0) ::close(fd);
    if (old >= 0) ::close(old);
    return guard(-1);
  }
  ::close(fd);
  return guard(old);
}

netns::guard::~guard() {
  if (old_ < 0) return;
  if (::setns(old_, CLONE_NEWNET) != 0) ADD_FAILURE() << "cannot return to the original network namespace";
  ::close(old_);
}

std::vector<std::string> netns::exec(const std::vector<std::string>& argv) const {
  std::vector<std::string> v = {"ip", "netns", "exec", name_};
  v.insert(v.end(), argv.begin(), argv.end());
  return v;
}

}  // namespace uvd::test
