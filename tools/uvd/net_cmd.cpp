// SPDX-License-Identifier: Apache-2.0
// uvd switch, uvd switch-stats, uvd veth: the network side from the shell.
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "net/netback.hpp"
#include "net/pump.hpp"
#include "net/veth.hpp"
#include "net/veth_port.hpp"
#include "tools/uvd/commands.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/rdma/net_rdma.hpp"

namespace uvd::cli {

namespace {

// SIGINT/SIGTERM as a readable fd: blocked for the whole process, then read
// through a signalfd by the loop that must stop.
int stop_signals_fd() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigprocmask(SIG_BLOCK, &set, nullptr);
  return ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

class signal_source final : public net::port_source {
 public:
  explicit signal_source(int fd) : fd_(fd) {}
  ~signal_source() override { ::close(fd_); }
  int fd() const override { return fd_; }
  void service(net::Netback& nb) override {
    signalfd_siginfo si;
    while (::read(fd_, &si, sizeof si) == sizeof si) {
      spdlog::info("switch: signal {}, stopping", si.ssi_signo);
      nb.stop();
    }
  }

 private:
  int fd_;
};

// "path" or "daemon:///path" -> a daemon URI; other URIs pass through.
std::string switch_uri(const std::string& s) {
  if (!s.empty() && s[0] == '/') return "daemon://" + s;
  if (auto u = core::parse_uri(s); u) return s;
  return "daemon://" + s;
}

// The switch side of net over RDMA, from the rdma plugin.
const rdma::net_api* load_rdma_net(core::registry& reg) {
  using entry_fn = const rdma::net_api* (*)();
  const rdma::net_api* api = reinterpret_cast<entry_fn>(rdma_plugin_entry(reg, UVD_RDMA_NET_ENTRY_SYMBOL))();
  if (!api || api->abi_version != rdma::NET_API_VERSION || api->struct_size < sizeof(rdma::net_api))
    die(1, "uvd-transport-rdma.so does not carry the net-over-RDMA table of this uvd version");
  return api;
}

}  // namespace

void add_net_commands(CLI::App& app, context& ctx) {
  // ---- uvd switch ----
  auto* sw = app.add_subcommand("switch", "run the netback learning switch as a daemon on a Unix socket and/or RDMA");
  struct switch_args {
    std::string socket;
    std::vector<std::string> uplinks, limits;
    std::string default_limit;
    unsigned ageing = 300;
    unsigned budget = 64;
    std::vector<std::string> rdma;
    unsigned rdma_depth = 32;
  };
  auto sa = std::make_shared<switch_args>();
  sw->add_option("--socket,-s", sa->socket,
                 "Unix socket front ends connect to (uvd veth --switch PATH); required unless --rdma is given");
  sw->add_option("--rdma", sa->rdma,
                 "also attach RDMA front ends (rdma://ADDR:PORT) listening on ADDR[:PORT] (port 7172 by default, "
                 "0: any); the address picks the RDMA device (repeatable; needs the rdma plugin)");
  sw->add_option("--rdma-depth", sa->rdma_depth, "receive buffers per RDMA port: its credits (default 32)")
      ->check(CLI::Range(4, 1024));
  sw->add_option("--uplink", sa->uplinks, "a trusted port into the host kernel or elsewhere, e.g. tap:uvdup0 (repeatable)");
  sw->add_option("--limit", sa->limits,
                 "rate limit for the port of that name: NAME=BYTES/MICROSECONDS or NAME=100mbit (repeatable)");
  sw->add_option("--default-limit", sa->default_limit, "rate limit for ports without a --limit");
  sw->add_option("--ageing", sa->ageing, "seconds a learnt MAC address lives (default 300)");
  sw->add_option("--budget", sa->budget, "frames per port per round (default 64)");
  sw->callback([sa, &ctx] {
    daemon::listener_options lo;
    for (const auto& l : sa->limits) {
      auto eq = l.find('=');
      if (eq == std::string::npos || eq == 0) die(2, "--limit wants NAME=RATE, got '" + l + "'");
      auto r = net::parse_rate_limit(l.substr(eq + 1));
      if (!r) die(2, r.err().message);
      lo.limits[l.substr(0, eq)] = *r;
    }
    if (!sa->default_limit.empty()) {
      auto r = net::parse_rate_limit(sa->default_limit);
      if (!r) die(2, r.err().message);
      lo.default_limit = *r;
    }
    if (sa->socket.empty() && sa->rdma.empty()) die(2, "uvd switch needs --socket PATH or --rdma ADDR[:PORT]");
    net::netback_options no;
    no.ageing = std::chrono::seconds(sa->ageing);
    no.budget = sa->budget;
    auto nb = net::Netback::create(no);
    if (!nb) die(1, nb.err().what());
    int sig = stop_signals_fd();
    (*nb)->add_source(std::make_unique<signal_source>(sig));
    if (!sa->socket.empty()) {
      auto l = daemon::listen(sa->socket, lo);
      if (!l) die(1, l.err().what());
      (*nb)->add_source(std::move(*l));
    }
    if (!sa->rdma.empty()) {
      const rdma::net_api* api = load_rdma_net(*ctx.reg);
      rdma::net_listen_options ro;
      ro.listen = sa->rdma;
      ro.limits = lo.limits;
      ro.default_limit = lo.default_limit;
      ro.depth = sa->rdma_depth;
      ro.log_level = std::string(spdlog::level::to_string_view(spdlog::get_level()).data());
      std::vector<uint16_t> ports(sa->rdma.size());
      net::port_source* src = nullptr;
      char err[512] = "";
      if (int rc = api->listen(&ro, &src, ports.data(), ports.size(), err, sizeof err); rc < 0)
        die(1, std::string("--rdma: ") + err);
      (*nb)->add_source(std::unique_ptr<net::port_source>(src));
      for (size_t i = 0; i < sa->rdma.size(); ++i) {
        const std::string& l = sa->rdma[i];
        size_t colon = l.rfind(':'), bracket = l.rfind(']');
        std::string host = colon != std::string::npos && (bracket == std::string::npos || colon > bracket)
                               ? l.substr(0, colon)
                               : l;
        std::printf("switch: rdma listening on %s:%u (front ends: rdma://%s:%u?name=NAME)\n", host.c_str(), ports[i],
                    host.c_str(), ports[i]);
      }
    }
    for (const auto& u : sa->uplinks) {
      auto v = net::Veth::open(*ctx.reg, u);
      if (!v) die(1, "uplink " + u + ": " + v.err().what());
      (*nb)->add_port(net::make_veth_port(std::move(*v)));
    }
    if (!sa->socket.empty()) std::printf("switch: listening on %s\n", sa->socket.c_str());
    std::fflush(stdout);
    if (auto r = (*nb)->run(); !r) die(1, r.err().what());
    std::fputs((*nb)->stats_text().c_str(), stdout);
  });

  // ---- uvd switch-stats ----
  auto* st = app.add_subcommand("switch-stats", "print the per-port counters of a running switch");
  auto st_sock = std::make_shared<std::string>();
  st->add_option("--socket,-s", *st_sock, "the switch's socket")->required();
  st->callback([st_sock] {
    auto t = daemon::query_stats(*st_sock);
    if (!t) die(1, t.err().what());
    std::fputs(t->c_str(), stdout);
  });

  // ---- uvd veth ----
  auto* ve = app.add_subcommand(
      "veth", "attach a virtual NIC: its switch side through a transport, its host side as a kernel interface");
  struct veth_args {
    std::string sw, host = "tap:uvd0", mac, name;
    uint32_t mtu = 1500, queues = 1;
    int offload = 1;
    int shm = 1;
    bool wait = false;
  };
  auto va = std::make_shared<veth_args>();
  ve->add_option("--switch", va->sw, "switch side: a switch socket path or a URI (daemon:///run/uvd/sw.sock)")
      ->required();
  ve->add_option("--host", va->host, "host side: a URI, by default tap:uvd0 (a TAP interface in this namespace)");
  ve->add_option("--mac", va->mac, "the NIC's MAC (default: random, locally administered)");
  ve->add_option("--mtu", va->mtu, "MTU (default 1500)");
  ve->add_option("--name", va->name, "port name at the switch (rate limits use it)");
  ve->add_option("--queues", va->queues,
                 "host-side queues (TAP IFF_MULTI_QUEUE), each read by a worker thread of its own (default 1)")
      ->check(CLI::Range(1, 16));
  ve->add_option("--offload", va->offload, "1: checksum and TSO offload end to end (default); 0: plain frames");
  ve->add_option("--shm", va->shm,
                 "1: frames to the switch through shared-memory rings (default); 0: through its socket");
  ve->add_flag("--wait", va->wait, "start even if the switch is not up yet (link down until it is)");
  ve->callback([va, &ctx] {
    net::veth_options o;
    if (!va->mac.empty()) {
      auto m = net::parse_mac(va->mac);
      if (!m) die(2, m.err().message);
      o.mac = *m;
    } else {
      o.mac = net::random_mac();
    }
    o.mtu = va->mtu;
    std::string off = va->offload ? "offload=1" : "offload=0";
    net::veth_options fo = o;
    fo.options = off + (va->shm ? "" : "&shm=0") + (va->wait ? "&wait=1" : "") + (va->name.empty() ? "" : "&name=" + va->name);
    // Blocked before any transport starts threads of its own (the xen front
    // end does): they inherit the mask, so SIGTERM reaches the signalfd and
    // the pump detaches cleanly instead of killing the process.
    int sig = stop_signals_fd();
    auto front = net::Veth::open(*ctx.reg, switch_uri(va->sw), fo);
    if (!front) die(1, front.err().what());
    net::veth_options ho = o;
    ho.options = off;
    ho.nqueues = va->queues;
    auto host = net::Veth::open(*ctx.reg, va->host, ho);
    if (!host) die(1, host.err().what());
    std::printf("veth: %s:%s (%u queues) <-> %s:%s mac %s mtu %u\n", (*host)->transport_name().c_str(),
                (*host)->target().c_str(), (*host)->nqueues(), (*front)->transport_name().c_str(),
                (*front)->target().c_str(), o.mac->to_string().c_str(), o.mtu);
    std::fflush(stdout);
    net::pump_options po;
    po.queue_workers = (*host)->nqueues() > 1;
    auto r = net::pump(**front, **host, sig, po);
    ::close(sig);
    if (!r) die(1, r.err().what());
    auto fs = (*front)->stats(), hs = (*host)->stats();
    std::printf("switch side: %s\nhost side: %s\n", fs.to_string().c_str(), hs.to_string().c_str());
  });
}

}  // namespace uvd::cli
