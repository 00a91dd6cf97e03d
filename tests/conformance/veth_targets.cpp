// SPDX-License-Identifier: Apache-2.0
#include "tests/conformance/veth_targets.hpp"

#include <thread>

#include "net/netback.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/daemon/daemon.hpp"

namespace uvd::test {

namespace {

core::result<std::unique_ptr<veth_pair>> loop_pair(core::registry& reg, const std::string& uri,
                                                   const net::veth_options& opts) {
  auto p = std::make_unique<veth_pair>();
  auto v = net::Veth::open(reg, uri, opts);
  if (!v) return core::fail(std::move(v).err());
  p->a = std::move(*v);
  p->b = p->a.get();
  return p;
}

// Two TAP interfaces joined by a kernel bridge in a namespace of their own:
// what a transmits, the Linux bridge forwards to b. keep_mac: the Veths are
// hosts on the bridge's links, not the interfaces themselves.
core::result<std::unique_ptr<veth_pair>> tap_pair(core::registry& reg, const std::string& options,
                                                  const net::veth_options& opts) {
  auto ns = netns::create("uvdconf");
  if (!ns) return core::fail(std::move(ns).err());
  auto p = std::make_unique<veth_pair>();
  {
    auto g = (*ns)->enter();
    if (!g.ok()) return core::fail(EPERM, "cannot enter namespace " + (*ns)->name());
    auto a = net::Veth::open(reg, "tap:uvca?keep_mac=1&" + options, opts);
    if (!a) return core::fail(std::move(a).err());
    auto b = net::Veth::open(reg, "tap:uvcb?keep_mac=1&" + options, opts);
    if (!b) return core::fail(std::move(b).err());
    p->a = std::move(*a);
    p->b_owned = std::move(*b);
    p->b = p->b_owned.get();
  }
  const std::string& n = (*ns)->name();
  for (auto argv : std::vector<std::vector<std::string>>{
           {"ip", "-n", n, "link", "add", "br0", "type", "bridge", "stp_state", "0"},
           {"ip", "-n", n, "link", "set", "uvca", "master", "br0"},
           {"ip", "-n", n, "link", "set", "uvcb", "master", "br0"},
           {"ip", "-n", n, "link", "set", "br0", "up"}}) {
    auto r = run_cmd(argv);
    if (r.status != 0) return core::fail(EIO, argv[3] + " " + argv[4] + ": " + r.output);
  }
  // tun's queue towards b drops when b reads slower than a writes; the rx
  // side of a drops when the kernel's backlog is full.
  p->outside_drops = [n] {
    uint64_t sum = 0;
    for (const char* f : {"/sys/class/net/uvcb/statistics/tx_dropped", "/sys/class/net/uvca/statistics/rx_dropped",
                          "/sys/class/net/br0/statistics/tx_dropped"}) {
      auto r = run_cmd({"ip", "netns", "exec", n, "cat", f});
      if (r.status == 0) sum += std::stoull(r.output);
    }
    return sum;
  };
  p->env = std::shared_ptr<void>(ns->release(), [](void* x) { delete static_cast<netns*>(x); });
  return p;
}

// A netback switch on a thread of its own, listening on a socket in dir.
struct switch_env {
  std::unique_ptr<net::Netback> nb;
  std::thread loop;
  ~switch_env() {
    if (nb) nb->stop();
    if (loop.joinable()) loop.join();
  }
};

uint64_t stat_field(const std::string& text, const std::string& line_prefix, const std::string& key) {
  auto at = text.find(line_prefix);
  if (at == std::string::npos) return 0;
  auto k = text.find(" " + key + "=", at);
  if (k == std::string::npos) return 0;
  return std::stoull(text.substr(k + key.size() + 2));
}

// Two front ends joined through the switch daemon: a -> switch -> b.
core::result<std::unique_ptr<veth_pair>> daemon_pair(const temp_dir& dir, core::registry& reg,
                                                     const std::string& options, const net::veth_options& opts) {
  auto env = std::make_shared<switch_env>();
  auto nb = net::Netback::create();
  if (!nb) return core::fail(std::move(nb).err());
  env->nb = std::move(*nb);
  std::string sock = dir.file("switch.sock");
  auto l = daemon::listen(sock, {});
  if (!l) return core::fail(std::move(l).err());
  env->nb->add_source(std::move(*l));
  env->loop = std::thread([e = env.get()] { (void)e->nb->run(); });
  auto p = std::make_unique<veth_pair>();
  p->env = env;
  auto a = net::Veth::open(reg, "daemon://" + sock + "?name=a&" + options, opts);
  if (!a) return core::fail(std::move(a).err());
  auto b = net::Veth::open(reg, "daemon://" + sock + "?name=b&" + options, opts);
  if (!b) return core::fail(std::move(b).err());
  p->a = std::move(*a);
  p->b_owned = std::move(*b);
  p->b = p->b_owned.get();
  p->outside_drops = [sock] {
    auto t = daemon::query_stats(sock);
    return t ? stat_field(*t, "total", "tx_dropped") : 0;
  };
  return p;
}

}  // namespace

std::vector<veth_target> veth_conformance_targets() {
  std::vector<veth_target> t = {
      {"loop", true, false,
       [](const temp_dir&, core::registry& reg, const net::veth_options& o) { return loop_pair(reg, "loop:", o); }},
      // Offloads claimed: checksums and large segments cross whole.
      {"loop_offload", true, false,
       [](const temp_dir&, core::registry& reg, const net::veth_options& o) {
         return loop_pair(reg, "loop:?offload=1", o);
       }},
      // Tiny rings: the queue stops and wakes all the time.
      {"loop_depth4", true, false,
       [](const temp_dir&, core::registry& reg, const net::veth_options& o) {
         return loop_pair(reg, "loop:?depth=4", o);
       }},
      // Through the Linux kernel: TAP, a kernel bridge, TAP.
      {"tap", false, true,
       [](const temp_dir&, core::registry& reg, const net::veth_options& o) { return tap_pair(reg, "offload=1", o); }},
      {"tap_no_offload", false, true,
       [](const temp_dir&, core::registry& reg, const net::veth_options& o) { return tap_pair(reg, "offload=0", o); }},
      // Two front ends through the netback switch daemon's socket.
      {"daemon", false, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) { return daemon_pair(d, reg, "offload=1", o); }},
      {"daemon_no_offload", false, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) { return daemon_pair(d, reg, "offload=0", o); }},
      // The same over the socket alone (no shared-memory rings).
      {"daemon_socket", false, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) {
         return daemon_pair(d, reg, "offload=1&shm=0", o);
       }},
      // Through a capture file: a writes it, b replays it as it grows.
      {"pcap", true, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) -> core::result<std::unique_ptr<veth_pair>> {
         auto p = std::make_unique<veth_pair>();
         std::string file = d.file("wire.pcap");
         auto a = net::Veth::open(reg, "pcap://" + file, o);
         if (!a) return core::fail(std::move(a).err());
         auto b = net::Veth::open(reg, "pcap:?follow=1&in=" + file, o);
         if (!b) return core::fail(std::move(b).err());
         p->a = std::move(*a);
         p->b_owned = std::move(*b);
         p->b = p->b_owned.get();
         return p;
       }},
  };
  return t;
}

}  // namespace uvd::test
