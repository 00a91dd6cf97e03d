// SPDX-License-Identifier: Apache-2.0
// Packets per second of the netback switch with 64-byte frames.
//  - core: in-memory ports (a generator that always has a full burst, a
//    sink that counts): the cost of switching itself
//  - daemon: one front end floods 64-byte frames through the switch daemon
//    to another front end (three threads: sender, switch, receiver), once
//    through the shared-memory rings and once through the Unix socket
// Prints one line per case.
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "net/netback.hpp"
#include "net/veth.hpp"
#include "transports/builtin.hpp"
#include "transports/daemon/daemon.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

net::mac_addr M(uint8_t i) { return net::mac_addr{{0x02, 0, 0, 0, 0, i}}; }

std::vector<uint8_t> frame64(const net::mac_addr& dst, const net::mac_addr& src) {
  std::vector<uint8_t> f(64, 0);
  std::memcpy(f.data(), dst.data(), 6);
  std::memcpy(f.data() + 6, src.data(), 6);
  net::store_be16(f.data() + 12, 0x88b5);
  return f;
}

class gen_port final : public net::port {
 public:
  gen_port(net::mac_addr me, net::mac_addr to) : me_(me), f_(frame64(to, me)) { fd_ = ::eventfd(1, EFD_CLOEXEC); }
  ~gen_port() override { ::close(fd_); }
  std::string name() const override { return "gen"; }
  uint32_t rx_burst(core::veth_frame* fr, uint32_t n, net::port_stats&) override {
    for (uint32_t i = 0; i < n; ++i) fr[i] = core::veth_frame{.data = f_.data(), .len = 64};
    return n;
  }
  uint32_t tx_burst(core::veth_frame* const*, uint32_t n) override { return n; }
  void fds(std::vector<int>& o) const override { o.push_back(fd_); }
  bool alive() const override { return true; }
  bool offloads() const override { return true; }
  uint32_t mtu() const override { return 1500; }
  std::optional<net::mac_addr> owned_mac() const override { return me_; }

 private:
  net::mac_addr me_;
  std::vector<uint8_t> f_;
  int fd_;
};

class sink_port final : public net::port {
 public:
  explicit sink_port(net::mac_addr me, std::atomic<uint64_t>* count) : me_(me), count_(count), f_(frame64(M(1), me)) {
    fd_ = ::eventfd(0, EFD_CLOEXEC);
  }
  ~sink_port() override { ::close(fd_); }
  std::string name() const override { return "sink"; }
  uint32_t rx_burst(core::veth_frame* fr, uint32_t, net::port_stats&) override {
    if (said_hello_) return 0;
    said_hello_ = true;  // one frame, so that the switch learns where the sink is
    fr[0] = core::veth_frame{.data = f_.data(), .len = 64};
    return 1;
  }
  uint32_t tx_burst(core::veth_frame* const*, uint32_t n) override {
    count_->fetch_add(n, std::memory_order_relaxed);
    return n;
  }
  void fds(std::vector<int>& o) const override { o.push_back(fd_); }
  bool alive() const override { return true; }
  bool offloads() const override { return true; }
  uint32_t mtu() const override { return 1500; }
  std::optional<net::mac_addr> owned_mac() const override { return me_; }

 private:
  net::mac_addr me_;
  std::atomic<uint64_t>* count_;
  std::vector<uint8_t> f_;
  bool said_hello_ = false;
  int fd_;
};

void core_case() {
  auto nb = net::Netback::create();
  std::atomic<uint64_t> count{0};
  (*nb)->add_port(std::make_unique<sink_port>(M(2), &count));
  (*nb)->add_port(std::make_unique<gen_port>(M(1), M(2)));
  for (int i = 0; i < 10; ++i) (void)(*nb)->run_once(0ms);
  count = 0;
  auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < 2s)
    for (int i = 0; i < 1000; ++i) (void)(*nb)->run_once(0ms);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("switch_pps core (in-memory ports, 64-byte frames): %.2f Mpps\n", count / s / 1e6);
}

void daemon_case(bool shm) {
  char tmpl[] = "/tmp/uvd-pps-XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  std::string sock = dir + "/sw.sock";
  auto nb = net::Netback::create();
  auto l = daemon::listen(sock, {});
  (*nb)->add_source(std::move(*l));
  std::thread sw([&] { (void)(*nb)->run(); });
  auto reg = transports::make_default_registry();
  net::veth_options oa, ob;
  oa.mac = M(1);
  ob.mac = M(2);
  std::string mode = shm ? "" : "&shm=0";
  auto a = net::Veth::open(*reg, "daemon://" + sock + "?name=a" + mode, oa);
  auto b = net::Veth::open(*reg, "daemon://" + sock + "?name=b" + mode, ob);
  if (!a || !b) {
    std::printf("switch_pps daemon: cannot attach\n");
    (*nb)->stop();
    sw.join();
    return;
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> got{0};
  // b says hello so the switch knows where M(2) is.
  auto hello = frame64(M(1), M(2));
  core::veth_frame hf{.data = hello.data(), .len = 64};
  (void)(*b)->tx_burst(0, &hf);
  std::thread rx([&] {
    std::vector<core::veth_frame> out(64);
    while (!stop) {
      uint32_t n = (*b)->rx_burst(0, out.data(), 64);
      got.fetch_add(n, std::memory_order_relaxed);
      if (!n) std::this_thread::yield();
    }
  });
  auto f = frame64(M(2), M(1));
  std::vector<core::veth_frame> d(64, core::veth_frame{.data = f.data(), .len = 64});
  std::vector<core::veth_frame*> p(64);
  for (int i = 0; i < 64; ++i) p[i] = &d[i];
  uint64_t sent = 0;
  std::this_thread::sleep_for(100ms);
  got = 0;
  auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < 3s) {
    uint32_t n = (*a)->tx_burst(0, p.data(), 64);
    sent += n;
    if (n < 64) {
      core::veth_frame out[64];
      (*a)->rx_burst(0, out, 64);  // lets the transport see the socket drain
      std::this_thread::yield();
    }
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::this_thread::sleep_for(200ms);
  stop = true;
  rx.join();
  std::printf("switch_pps daemon, %s (front end -> switch -> front end, 64-byte frames): %.2f Mpps delivered "
              "(%.2f Mpps offered)\n",
              shm ? "shared-memory rings" : "socket", got / s / 1e6, sent / s / 1e6);
  a->reset();
  b->reset();
  (*nb)->stop();
  sw.join();
  nb->reset();  // the listener removes its socket file
  ::rmdir(dir.c_str());
}

}  // namespace

int main() {
  spdlog::set_level(spdlog::level::warn);
  core_case();
  daemon_case(true);
  daemon_case(false);
  return 0;
}
