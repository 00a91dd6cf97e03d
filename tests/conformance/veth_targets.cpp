// SPDX-License-Identifier: Apache-2.0
#include "tests/conformance/veth_targets.hpp"

#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "net/netback.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/xen/local/local.hpp"
#include "transports/xen/vif_back.hpp"

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
  // No IPv6 in the namespace: the kernel's own router and neighbour
  // solicitations would otherwise be dropped in the queues counted below
  // and pass for test frames lost outside the front halves.
  for (auto argv : std::vector<std::vector<std::string>>{
           {"ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1"},
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

// Two netif front ends (domains 1 and 2) through the netback switch, whose
// ports are the back end's virtual interfaces, over the host-local hypervisor.
struct xen_net_env {
  std::unique_ptr<xen::local_hub> hub;
  std::unique_ptr<net::Netback> nb;  // owns the vif back end (a port source)
  xen::vif_backend* vifs = nullptr;
  std::thread loop;
  ~xen_net_env() {
    if (nb) nb->stop();
    if (loop.joinable()) loop.join();
    nb.reset();
    hub.reset();
  }
};

core::result<std::unique_ptr<veth_pair>> xen_local_pair(const temp_dir& dir, core::registry& reg,
                                                        const net::veth_options& opts) {
  auto env = std::make_shared<xen_net_env>();
  auto hub = xen::local_hub::start(dir.file("xen-hub.sock"));
  if (!hub) return core::fail(std::move(hub).err());
  env->hub = std::move(*hub);
  auto hv = xen::open_local_hypervisor(env->hub->socket_path(), 0);
  if (!hv) return core::fail(std::move(hv).err());
  auto vb = xen::vif_backend::start(std::shared_ptr<xen::hypervisor>(std::move(*hv)));
  if (!vb) return core::fail(std::move(vb).err());
  for (xen::domid_t d : {1, 2})
    if (auto r = (*vb)->add_vif(d, 0, std::nullopt); !r) return core::fail(std::move(r).err());
  env->vifs = vb->get();
  auto nb = net::Netback::create();
  if (!nb) return core::fail(std::move(nb).err());
  env->nb = std::move(*nb);
  env->nb->add_source(std::move(*vb));
  env->loop = std::thread([e = env.get()] { (void)e->nb->run(); });
  auto p = std::make_unique<veth_pair>();
  p->env = env;
  std::string base = "xen://0/0?hub=" + env->hub->socket_path() + "&domid=";
  auto a = net::Veth::open(reg, base + "1", opts);
  if (!a) return core::fail(std::move(a).err());
  auto b = net::Veth::open(reg, base + "2", opts);
  if (!b) return core::fail(std::move(b).err());
  p->a = std::move(*a);
  p->b_owned = std::move(*b);
  p->b = p->b_owned.get();
  p->outside_drops = [e = env.get()] {
    auto d = e->vifs->dropped(2, 0);
    return d ? *d : 0;
  };
  return p;
}

// xen_real: the same two netif front ends and vif back end through real Xen
// (grants by gntalloc, mapped by gntdev, interdomain event channels, xenstore),
// all in this domain talking to itself: vif handles 0 and 1 of our own domid.
// Runs inside the nested-Xen harness (tests/e2e/xen); anywhere else there is
// no /dev/xen, and the target reports ENODEV (skipped).
struct xen_real_net_env {
  std::unique_ptr<net::Netback> nb;  // owns the vif back end
  xen::vif_backend* vifs = nullptr;
  xen::domid_t self = 0;
  std::thread loop;
  ~xen_real_net_env() {
    if (nb) nb->stop();
    if (loop.joinable()) loop.join();
    // xenstore outlives this process: the next pair attaches the same vifs afresh.
    if (vifs)
      for (uint32_t h : {0u, 1u}) (void)vifs->remove_vif(self, h);
    nb.reset();
  }
};

core::result<std::unique_ptr<veth_pair>> xen_real_pair(const temp_dir&, core::registry& reg,
                                                       const net::veth_options& opts) {
  auto hv = xen::open_real_hypervisor();
  if (!hv) return core::fail(ENODEV, "needs a Xen domain with gntdev, gntalloc, evtchn and xenstore: " + hv.err().what());
  auto env = std::make_shared<xen_real_net_env>();
  env->self = (*hv)->self_domid();
  auto vb = xen::vif_backend::start(std::shared_ptr<xen::hypervisor>(std::move(*hv)));
  if (!vb) return core::fail(std::move(vb).err());
  auto nb = net::Netback::create();
  if (!nb) return core::fail(std::move(nb).err());
  env->nb = std::move(*nb);
  env->vifs = vb->get();
  // The switch owns the back end from here on, so env->vifs stays valid until env goes.
  env->nb->add_source(std::move(*vb));
  for (uint32_t h : {0u, 1u})
    if (auto r = env->vifs->add_vif(env->self, h, std::nullopt); !r) return core::fail(std::move(r).err());
  env->loop = std::thread([e = env.get()] { (void)e->nb->run(); });
  auto p = std::make_unique<veth_pair>();
  p->env = env;
  std::string base = "xen://" + std::to_string(env->self) + "/";
  auto a = net::Veth::open(reg, base + "0?hv=xen", opts);
  if (!a) return core::fail(std::move(a).err());
  auto b = net::Veth::open(reg, base + "1?hv=xen", opts);
  if (!b) return core::fail(std::move(b).err());
  p->a = std::move(*a);
  p->b_owned = std::move(*b);
  p->b = p->b_owned.get();
  p->outside_drops = [e = env.get()] {
    auto d = e->vifs->dropped(e->self, 1);
    return d ? *d : 0;
  };
  return p;
}

// `uvd switch --rdma` in a child process: two front ends over the rdma
// transport (the plugin) on one Soft-RoCE device, the switch on another.
// Inside the guest harness (tests/e2e/rdma_net) $UVD_RDMA_PEER_ADDR is the
// switch's address and $UVD_RDMA_ADDR the front ends'; anywhere without an
// RDMA device this is ENODEV, which the suite turns into a loud skip.
struct switch_process {
  pid_t pid = -1;
  ~switch_process() {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 100 && waitpid(pid, &st, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (waitpid(pid, &st, WNOHANG) == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
    }
  }
};

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

core::result<std::unique_ptr<veth_pair>> rdma_pair(const temp_dir& dir, core::registry& reg, const std::string& options,
                                                   const net::veth_options& opts) {
  int devices = 0;
  if (DIR* d = opendir("/sys/class/infiniband")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++devices;
    closedir(d);
  }
  if (devices == 0)
    return core::fail(ENODEV, "no RDMA device here (/sys/class/infiniband is empty); the Soft-RoCE guest runs this "
                              "target (ctest -L e2e -R RdmaNet)");
  const char* server = std::getenv("UVD_RDMA_PEER_ADDR");
  const char* client = std::getenv("UVD_RDMA_ADDR");
  if (!server || !*server)
    return core::fail(ENODEV, "set UVD_RDMA_PEER_ADDR (switch) and UVD_RDMA_ADDR (front ends) to addresses of two "
                              "RDMA devices");
  // Each test's registry unloads the rdma plugin, and with it libibverbs and
  // librdmacm, whose device lists live in globals they never free: keep them
  // loaded for the life of the process (else LeakSanitizer reports those).
  static void* const pinned = dlopen("librdmacm.so.1", RTLD_NOW | RTLD_NODELETE);
  (void)pinned;
  auto proc = std::make_shared<switch_process>();
  std::string log = dir.file("switch.log"), sock = dir.file("switch.sock");
  std::vector<std::string> argv{build_dir() + "/uvd", "switch", "--socket", sock, "--rdma", std::string(server) + ":0"};
  pid_t pid = fork();
  if (pid < 0) return core::fail(errno, "fork");
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  proc->pid = pid;
  const std::regex line("rdma listening on [^ ]+:([0-9]+)");
  std::string port;
  for (int i = 0; i < 600 && port.empty(); ++i) {
    std::smatch m;
    std::string text = slurp(log);
    if (std::regex_search(text, m, line)) {
      port = m[1].str();
      break;
    }
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      proc->pid = -1;
      return core::fail(EIO, "uvd switch --rdma exited early: " + text);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port.empty()) return core::fail(ETIMEDOUT, "uvd switch --rdma did not come up in 30 s: " + slurp(log));
  auto p = std::make_unique<veth_pair>();
  p->env = proc;
  std::string base = "rdma://" + std::string(server) + ":" + port + "?" + options;
  if (client && *client) base += std::string("&src=") + client;
  auto a = net::Veth::open(reg, base + "&name=a", opts);
  if (!a) return core::fail(std::move(a).err());
  auto b = net::Veth::open(reg, base + "&name=b", opts);
  if (!b) return core::fail(std::move(b).err());
  p->a = std::move(*a);
  p->b_owned = std::move(*b);
  p->b = p->b_owned.get();
  // The switch drops what finds no credit towards b (a full egress queue).
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
      // netfront -> grant rings -> netback switch port -> grant rings -> netfront.
      {"xen_local", false, false, xen_local_pair},
      // The same through real Xen, both ends in one domain (the nested-Xen harness).
      {"xen_real", false, false, xen_real_pair},
      // Two front ends over RDMA (SEND/RECV with credits) through `uvd switch --rdma`.
      {"rdma", false, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) { return rdma_pair(d, reg, "offload=1", o); }},
      {"rdma_no_offload", false, false,
       [](const temp_dir& d, core::registry& reg, const net::veth_options& o) {
         return rdma_pair(d, reg, "offload=0", o);
       }},
  };
  return t;
}

}  // namespace uvd::test
