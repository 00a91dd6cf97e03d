// SPDX-License-Identifier: Apache-2.0
// uvd xen-back: the blkif back end serving virtual disks to Xen front ends,
// through real Xen or the host-local hypervisor, until SIGINT or SIGTERM.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <optional>
#include <thread>
#include <string>
#include <vector>

#include "tools/uvd/commands.hpp"
#include "transports/xen/blkback.hpp"
#include "net/netback.hpp"
#include "transports/xen/local/local.hpp"
#include "transports/xen/vif_back.hpp"

namespace uvd::cli {

namespace {

constexpr const char* xen_back_footer = R"(Disks:
  FRONT/VDEV=URI[,ro]  serve URI (file:///img, cow:///overlay.cow, memory:64M or
                       a plain path) as virtual block device VDEV (51712 = xvda)
                       of domain FRONT. The back end writes both xenstore
                       directories (as `xl block-attach` would), advertises its
                       features and waits for the front end's handshake.

Network interfaces:
  --vif FRONT/HANDLE[=MAC]  a netif virtual interface HANDLE of domain FRONT,
                       a port of a switch (the netback learning switch, with
                       source-MAC validation) that joins every --vif of this
                       back end. With MAC, that MAC is the interface's (as
                       `xl network-attach mac=` sets it); without, the front end
                       declares its own. Front ends open
                         xen://DOMID/HANDLE?hub=PATH&domid=FRONT  (uvd veth)

Hypervisor:
  --hv local (default) runs the host-local hypervisor: a hub on --hub PATH that
  plays Xen's grant tables, event channels and xenstore for processes on this
  machine (or joins a running one with --join). Front ends then open
    xen://DOMID/VDEV?hub=PATH&domid=FRONT
  where DOMID is this back end's --domid (0 by default).
  --hv xen serves real Xen front ends from inside a domain (usually dom0),
  through /dev/xen/gntdev, /dev/xen/evtchn and xenstore.

Shutdown: SIGINT or SIGTERM disconnects every front end (their requests fail
rather than hang), flushes the disks and exits 0. Exit status 1 if a disk or
the hypervisor cannot be opened, 2 for a usage error.)";

struct xen_back_flags {
  std::string hv = "local";
  std::string hub;
  bool join = false;
  uint16_t domid = 0;
  std::vector<std::string> disks;
  std::vector<std::string> vifs;
  uint32_t ring_order = 4;
  uint32_t indirect = 256;
  bool no_persistent = false;
};

struct disk_spec {
  uint16_t front;
  uint32_t vdev;
  std::string uri;
  bool ro;
};

disk_spec parse_disk(const std::string& s) {
  auto eq = s.find('=');
  auto slash = s.find('/');
  if (eq == std::string::npos || slash == std::string::npos || slash > eq)
    die(2, "--disk " + s + ": expected FRONT/VDEV=URI[,ro]");
  disk_spec d{};
  try {
    unsigned long f = std::stoul(s.substr(0, slash));
    unsigned long v = std::stoul(s.substr(slash + 1, eq - slash - 1));
    if (f > 0x7fef || v > 0xffffffffu) throw std::out_of_range("id");
    d.front = static_cast<uint16_t>(f);
    d.vdev = static_cast<uint32_t>(v);
  } catch (const std::exception&) {
    die(2, "--disk " + s + ": FRONT and VDEV must be numbers (e.g. 1/51712=disk.img)");
  }
  d.uri = s.substr(eq + 1);
  if (d.uri.size() > 3 && d.uri.compare(d.uri.size() - 3, 3, ",ro") == 0) {
    d.ro = true;
    d.uri.resize(d.uri.size() - 3);
  }
  if (d.uri.empty()) die(2, "--disk " + s + ": no device");
  return d;
}

struct vif_spec {
  uint16_t front;
  uint32_t handle;
  std::optional<net::mac_addr> mac;
};

vif_spec parse_vif(const std::string& s) {
  auto eq = s.find('=');
  std::string ids = s.substr(0, eq);
  auto slash = ids.find('/');
  if (slash == std::string::npos) die(2, "--vif " + s + ": expected FRONT/HANDLE[=MAC]");
  vif_spec v{};
  try {
    unsigned long f = std::stoul(ids.substr(0, slash));
    unsigned long h = std::stoul(ids.substr(slash + 1));
    if (f > 0x7fef || h > 0xffffffffu) throw std::out_of_range("id");
    v.front = static_cast<uint16_t>(f);
    v.handle = static_cast<uint32_t>(h);
  } catch (const std::exception&) {
    die(2, "--vif " + s + ": FRONT and HANDLE must be numbers (e.g. 1/0)");
  }
  if (eq != std::string::npos) {
    auto m = net::parse_mac(s.substr(eq + 1));
    if (!m) die(2, "--vif " + s + ": " + m.err().what());
    v.mac = *m;
  }
  return v;
}

core::result<std::unique_ptr<xen::hypervisor>> open_hv(const xen_back_flags& f) {
  if (f.hv == "xen") return xen::open_real_hypervisor();
  return xen::open_local_hypervisor(f.hub, f.domid);
}

void run_xen_back(context& ctx, const xen_back_flags& f) {
  if (f.disks.empty() && f.vifs.empty()) die(2, "xen-back: give at least one --disk FRONT/VDEV=URI or --vif FRONT/HANDLE");
  std::vector<vif_spec> vspecs;
  for (const auto& s : f.vifs) vspecs.push_back(parse_vif(s));
  std::vector<disk_spec> specs;
  for (const auto& s : f.disks) specs.push_back(parse_disk(s));

  sigset_t stop_signals, old_mask;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &old_mask);

  std::unique_ptr<xen::local_hub> hub;
  std::unique_ptr<xen::hypervisor> hv;
  if (f.hv == "local") {
    if (f.hub.empty()) die(2, "xen-back: --hv local needs --hub PATH (the socket front ends connect to)");
    if (!f.join) {
      auto h = xen::local_hub::start(f.hub);
      if (!h) die(1, "xen-back: " + h.err().what());
      hub = std::move(*h);
    }
  } else if (f.hv != "xen") {
    die(2, "xen-back: --hv must be local or xen");
  }
  auto r = open_hv(f);
  if (!r) die(1, "xen-back: " + r.err().what());
  hv = std::move(*r);
  xen::domid_t self = hv->self_domid();
  xen::blkback_options o;
  o.max_ring_page_order = f.ring_order;
  o.max_indirect_segments = f.indirect;
  o.persistent = !f.no_persistent;
  auto bb = xen::blkback::start(std::move(hv), o);
  if (!bb) die(1, "xen-back: " + bb.err().what());
  auto& back = *bb;
  std::vector<std::shared_ptr<storage::Vstore>> disks;
  for (const auto& d : specs) {
    auto v = open_device(ctx, d.uri, {.read_only = d.ro});
    if (!v) die(1, "xen-back: " + d.uri + ": " + v.err().what());
    std::shared_ptr<storage::Vstore> disk(std::move(*v));
    disks.push_back(disk);
    if (auto r = back->add_device(d.front, d.vdev, disk, d.ro); !r) die(1, "xen-back: " + r.err().what());
    spdlog::info("xen-back: serving {} ({}) as vbd {} of domain {}{}", device_uri(d.uri), human_size(disk->size()),
                 d.vdev, d.front, d.ro ? ", read-only" : "");
    if (f.hv == "local")
      fmt::print("xen://{}/{}?hub={}&domid={}\n", self, d.vdev, f.hub, d.front);
  }
  // Network: one switch for every vif, on a thread of its own.
  std::unique_ptr<net::Netback> sw;
  std::thread sw_loop;
  if (!vspecs.empty()) {
    auto nhv = open_hv(f);
    if (!nhv) die(1, "xen-back: " + nhv.err().what());
    auto vb = xen::vif_backend::start(std::shared_ptr<xen::hypervisor>(std::move(*nhv)));
    if (!vb) die(1, "xen-back: " + vb.err().what());
    for (const auto& v : vspecs) {
      if (auto a = (*vb)->add_vif(v.front, v.handle, v.mac); !a) die(1, "xen-back: " + a.err().what());
      spdlog::info("xen-back: vif {} of domain {}{}", v.handle, v.front, v.mac ? " mac " + v.mac->to_string() : "");
      if (f.hv == "local") fmt::print("xen://{}/{}?hub={}&domid={}\n", self, v.handle, f.hub, v.front);
    }
    auto nb = net::Netback::create();
    if (!nb) die(1, "xen-back: " + nb.err().what());
    sw = std::move(*nb);
    sw->add_source(std::move(*vb));
    sw_loop = std::thread([&sw] { (void)sw->run(); });
  }
  std::fflush(stdout);

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  spdlog::info("xen-back: signal {}, disconnecting", sig);
  for (const auto& d : specs) {
    if (auto st = back->device_stats(d.front, d.vdev); st)
      spdlog::info("xen-back: vbd {}/{}: {} requests, {} errors, {} persistent grants", d.front, d.vdev,
                   st->requests, st->errors, st->persistent_maps);
    (void)back->remove_device(d.front, d.vdev);
  }
  back.reset();
  if (sw) {
    sw->stop();
    sw_loop.join();
    spdlog::info("xen-back: switch: {}", sw->stats_text());
    sw.reset();
  }
  for (auto& d : disks)
    if (auto r = d->flush(); !r) spdlog::warn("xen-back: flush {}: {}", d->target(), r.err().what());
  hub.reset();
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
}

}  // namespace

void add_xen_commands(CLI::App& app, context& ctx) {
  auto f = std::make_shared<xen_back_flags>();
  auto* cmd = app.add_subcommand("xen-back", "Serve virtual disks (blkif) and interfaces (netif) to Xen front ends until SIGINT or SIGTERM");
  cmd->add_option("--hv", f->hv, "Hypervisor: local (host-local, default) or xen")->check(CLI::IsMember({"local", "xen"}));
  cmd->add_option("--hub", f->hub, "host-local: the hub's unix socket");
  cmd->add_flag("--join", f->join, "host-local: join a running hub instead of starting one");
  cmd->add_option("--domid", f->domid, "host-local: this back end's domain id (default 0)");
  cmd->add_option("--disk,disks", f->disks, "FRONT/VDEV=URI[,ro] (repeatable)");
  cmd->add_option("--vif", f->vifs, "FRONT/HANDLE[=MAC]: a netif interface on the back end's switch (repeatable)");
  cmd->add_option("--max-ring-page-order", f->ring_order, "Largest ring offered, 2^N pages (0..4, default 4)")
      ->check(CLI::Range(0, 4));
  cmd->add_option("--max-indirect-segments", f->indirect, "Segments per indirect request offered (0..256, default 256)")
      ->check(CLI::Range(0, 256));
  cmd->add_flag("--no-persistent", f->no_persistent, "Do not offer persistent grants");
  cmd->footer(xen_back_footer);
  cmd->callback([&ctx, f] { run_xen_back(ctx, *f); });
}

}  // namespace uvd::cli
