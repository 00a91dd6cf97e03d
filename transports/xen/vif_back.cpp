// SPDX-License-Identifier: Apache-2.0
// netif back end control plane: the xenbus state machine of each virtual
// interface, driven by store watches from one thread; connected interfaces
// are handed to the switch as ports.
#include "transports/xen/vif_back.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <map>
#include <mutex>

#include "transports/xen/netif.hpp"
#include "transports/xen/xenbus.hpp"
#include "transports/xen/vif_port.hpp"

namespace uvd::xen {

namespace {

struct vif {
  domid_t front;
  uint32_t handle;
  std::string bdir, fdir;
  std::optional<net::mac_addr> fixed_mac;
  bool watched = false;
  int state = XenbusStateInitWait;
  std::shared_ptr<vif_shared> shared;  // of the connected port, if any
  uint64_t retired_drops = 0;          // of ports before it
  vif_backend::offload_counts retired_offloads;
};

class vif_backend_impl final : public vif_backend {
 public:
  explicit vif_backend_impl(std::shared_ptr<hypervisor> hv) : hv_(std::move(hv)) {}
  ~vif_backend_impl() override {
    loop_.stop();
    std::lock_guard lk(mu_);
    for (auto& [k, v] : vifs_) {
      if (v.shared) v.shared->dead = true;
      if (st_) (void)write_state(*st_, v.bdir, XenbusStateClosed);
    }
    if (ready_fd_ >= 0) ::close(ready_fd_);
  }

  core::result<void> init() {
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    st_ = std::move(*s);
    ready_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ready_fd_ < 0) return core::fail(errno, "eventfd");
    return loop_.start(*st_, [this] { pass(); });
  }

  domid_t domid() const override { return hv_->self_domid(); }
  int fd() const override { return ready_fd_; }

  // On the switch thread: connected interfaces join.
  void service(net::Netback& nb) override {
    uint64_t v;
    (void)::read(ready_fd_, &v, sizeof v);
    std::vector<std::unique_ptr<vif_port>> ready;
    {
      std::lock_guard lk(mu_);
      ready.swap(ready_);
    }
    for (auto& p : ready) nb.add_port(std::move(p));
  }

  core::result<void> add_vif(domid_t front, uint32_t handle, std::optional<net::mac_addr> mac) override {
    if (mac && (mac->is_multicast() || mac->is_zero())) return core::fail(EINVAL, "a vif's MAC must be unicast");
    domid_t self = hv_->self_domid();
    std::string bdir = vif_backend_dir(self, front, handle), fdir = vif_frontend_dir(front, handle);
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    store& st = **s;
    auto r = with_transaction(st, [&](txn_t t) -> core::result<void> {
      std::vector<std::pair<std::string, std::string>> back = {
          {"frontend", fdir},
          {"frontend-id", std::to_string(front)},
          {"online", "1"},
          {"handle", std::to_string(handle)},
          {"type", "uvd"},
          {"feature-sg", "1"},
          {"feature-rx-copy", "1"},
          {"feature-rx-flip", "0"},
          // Frames from the front end may come with partial checksums and
          // as large TCP segments (tx); IPv4 partial checksums need no key.
          {"feature-gso-tcpv4", "1"},
          {"feature-gso-tcpv6", "1"},
          {"feature-ipv6-csum-offload", "1"},
          {"feature-multicast-control", "0"},
          {"mac-from-front", mac ? "0" : "1"},
          {"state", std::to_string(XenbusStateInitWait)},
      };
      if (mac) back.emplace_back("mac", mac->to_string());
      store_perm bperm[] = {{self, false, false}, {front, true, false}};
      if (auto w = st.mkdir(t, bdir); !w) return w;
      if (auto w = st.set_perms(t, bdir, bperm); !w) return w;
      for (auto& [k, v] : back) {
        if (auto w = st.write(t, bdir + "/" + k, v); !w) return w;
        if (auto w = st.set_perms(t, bdir + "/" + k, bperm); !w) return w;
      }
      std::vector<std::pair<std::string, std::string>> fr = {
          {"backend", bdir},
          {"backend-id", std::to_string(self)},
          {"handle", std::to_string(handle)},
          {"state", std::to_string(XenbusStateInitialising)},
      };
      if (mac) fr.emplace_back("mac", mac->to_string());
      store_perm fperm[] = {{front, false, false}, {self, true, false}};
      if (auto w = st.mkdir(t, fdir); !w) return w;
      if (auto w = st.set_perms(t, fdir, fperm); !w) return w;
      for (auto& [k, v] : fr) {
        if (auto w = st.write(t, fdir + "/" + k, v); !w) return w;
        if (auto w = st.set_perms(t, fdir + "/" + k, fperm); !w) return w;
      }
      return core::ok();
    });
    if (!r) return r;
    {
      std::lock_guard lk(mu_);
      auto key = std::make_pair(front, handle);
      if (vifs_.count(key)) return core::fail(EEXIST, "vif exists");
      vifs_[key] = vif{front, handle, bdir, fdir, mac};
    }
    kick();
    return core::ok();
  }

  core::result<void> remove_vif(domid_t front, uint32_t handle) override {
    std::string bdir, fdir;
    {
      std::lock_guard lk(mu_);
      auto it = vifs_.find({front, handle});
      if (it == vifs_.end()) return core::fail(ENOENT, "no such vif");
      if (it->second.shared) it->second.shared->dead = true;
      bdir = it->second.bdir;
      fdir = it->second.fdir;
      vifs_.erase(it);
    }
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    (void)write_state(**s, bdir, XenbusStateClosed);
    (void)(*s)->rm(no_txn, bdir);
    (void)(*s)->rm(no_txn, fdir);
    return core::ok();
  }

  core::result<uint64_t> dropped(domid_t front, uint32_t handle) override {
    std::lock_guard lk(mu_);
    auto it = vifs_.find({front, handle});
    if (it == vifs_.end()) return core::fail(ENOENT, "no such vif");
    return it->second.retired_drops + (it->second.shared ? it->second.shared->dropped.load() : 0);
  }

  core::result<offload_counts> offloads_done(domid_t front, uint32_t handle) override {
    std::lock_guard lk(mu_);
    auto it = vifs_.find({front, handle});
    if (it == vifs_.end()) return core::fail(ENOENT, "no such vif");
    offload_counts c = it->second.retired_offloads;
    if (auto& sh = it->second.shared) {
      c.sw_csum += sh->sw_csum;
      c.sw_gso += sh->sw_gso;
    }
    return c;
  }

 private:
  void kick() { loop_.kick(); }

  void pass() {
    std::lock_guard lk(mu_);
    for (auto& [k, v] : vifs_) {
      if (!v.watched) {
        // The state, and the MAC a front end may declare, live under its directory.
        if (auto w = st_->watch(v.fdir, v.fdir); !w && w.err().errnum() != EEXIST)
          spdlog::warn("netback: watch {}: {}", v.fdir, w.err().what());
        v.watched = true;
      }
      evaluate(v);
    }
  }

  void set_state(vif& v, int st) {
    if (v.state == st) return;
    v.state = st;
    if (auto w = write_state(*st_, v.bdir, st); !w) spdlog::warn("netback: {}: {}", v.bdir, w.err().what());
  }

  void disconnect(vif& v) {
    if (v.shared) {
      v.shared->dead = true;  // the switch drops the port and unmaps
      v.retired_drops += v.shared->dropped;
      v.retired_offloads.sw_csum += v.shared->sw_csum;
      v.retired_offloads.sw_gso += v.shared->sw_gso;
    }
    v.shared.reset();
  }

  void fatal(vif& v, const std::string& why) {
    spdlog::warn("netback: vif {}/{}: {}", v.front, v.handle, why);
    (void)st_->write(no_txn, v.bdir + "/error", why);
    disconnect(v);
    set_state(v, XenbusStateClosing);
  }

  std::optional<net::mac_addr> declared_mac(vif& v) {
    auto s = st_->read(no_txn, v.fdir + "/mac");
    if (!s) return std::nullopt;
    auto m = net::parse_mac(*s);
    if (!m || m->is_multicast() || m->is_zero()) return std::nullopt;
    return *m;
  }

  void evaluate(vif& v) {
    if (v.shared && v.shared->broken) return fatal(v, "front end produced an impossible ring index");
    auto fs = read_state(*st_, v.fdir);
    int f = fs ? *fs : XenbusStateClosed;
    switch (f) {
      case XenbusStateInitialising:
        if (v.state == XenbusStateClosed || v.state == XenbusStateClosing) {
          disconnect(v);
          (void)st_->rm(no_txn, v.bdir + "/error");
          set_state(v, XenbusStateInitWait);
        }
        break;
      case XenbusStateInitialised:
      case XenbusStateConnected:
        if (v.state == XenbusStateInitWait) connect(v);
        if (v.state == XenbusStateConnected && !v.fixed_mac) adopt_mac(v);
        break;
      case XenbusStateClosing:
        disconnect(v);
        set_state(v, XenbusStateClosing);
        break;
      default:
        disconnect(v);
        if (v.state != XenbusStateInitWait) set_state(v, XenbusStateClosed);
        break;
    }
  }

  // A front end that declares its MAC may change it; the port owns one at a time.
  void adopt_mac(vif& v) {
    auto m = declared_mac(v);
    if (!m || !v.shared || v.shared->mac.load() == m->key()) return;
    v.shared->mac = m->key();
    (void)st_->write(no_txn, v.bdir + "/mac", m->to_string());
  }

  // What the front end takes on its rx ring. A key that is absent or not a
  // number counts as absent: netif.h's default (IPv4 checksum offload on,
  // the rest off). Large segments need scatter-gather and partial checksums
  // of their IP version, as Linux's netdev features do.
  netif_features front_features(vif& v) {
    auto flag = [&](const char* key, bool absent) {
      auto x = read_uint(*st_, no_txn, v.fdir + "/" + key);
      return x ? *x != 0 : absent;
    };
    netif_features f;
    f.sg = flag("feature-sg", false);
    f.csum4 = !flag("feature-no-csum-offload", false);
    f.csum6 = flag("feature-ipv6-csum-offload", false);
    f.gso4 = flag("feature-gso-tcpv4", false) && f.sg && f.csum4;
    f.gso6 = flag("feature-gso-tcpv6", false) && f.sg && f.csum6;
    f.rx_notify = flag("feature-rx-notify", false);
    return f;
  }

  void connect(vif& v) {
    store& s = *st_;
    auto tx = read_uint(s, no_txn, v.fdir + "/tx-ring-ref");
    auto rx = read_uint(s, no_txn, v.fdir + "/rx-ring-ref");
    auto port = read_uint(s, no_txn, v.fdir + "/event-channel");
    if (!tx || !rx || *tx > UINT32_MAX || *rx > UINT32_MAX) return fatal(v, "reading tx-ring-ref/rx-ring-ref");
    if (!port || *port > UINT32_MAX) return fatal(v, "reading event-channel (split event channels are not offered)");
    auto copy = read_uint(s, no_txn, v.fdir + "/request-rx-copy");
    if (!copy || *copy != 1) return fatal(v, "request-rx-copy must be 1 (page flipping is not supported)");
    if (auto q = read_uint(s, no_txn, v.fdir + "/multi-queue-num-queues"); q && *q != 1)
      return fatal(v, "multi-queue-num-queues must be 1");
    net::mac_addr mac;
    if (v.fixed_mac) {
      mac = *v.fixed_mac;
    } else {
      auto m = declared_mac(v);
      if (!m) return fatal(v, "no usable unicast mac in " + v.fdir + "/mac");
      mac = *m;
    }
    auto shared = std::make_shared<vif_shared>();
    shared->mac = mac.key();
    std::string name = "xen-vif" + std::to_string(v.front) + "." + std::to_string(v.handle);
    auto pers = read_uint(s, no_txn, v.fdir + "/feature-persistent");
    auto p = vif_port::connect(hv_, v.front, static_cast<grant_ref_t>(*tx), static_cast<grant_ref_t>(*rx),
                               static_cast<evtchn_port_t>(*port), shared, name, pers && *pers == 1,
                               front_features(v));
    if (!p) return fatal(v, "connecting rings: " + p.err().what());
    v.shared = shared;
    (void)s.write(no_txn, v.bdir + "/mac", mac.to_string());
    {
      // mu_ is held by run(); ready_ is only touched under it.
      ready_.push_back(std::move(*p));
    }
    uint64_t one = 1;
    (void)::write(ready_fd_, &one, sizeof one);
    set_state(v, XenbusStateConnected);
  }

  std::shared_ptr<hypervisor> hv_;
  std::unique_ptr<store> st_;  // control thread only
  std::mutex mu_;              // vifs_, ready_
  std::map<std::pair<domid_t, uint32_t>, vif> vifs_;
  std::vector<std::unique_ptr<vif_port>> ready_;
  int ready_fd_ = -1;
  backend_loop loop_;  // last: its thread ends before the members it uses go
};

}  // namespace

core::result<std::unique_ptr<vif_backend>> vif_backend::start(std::shared_ptr<hypervisor> hv) {
  if (!hv) return core::fail(EINVAL, "no hypervisor");
  auto b = std::make_unique<vif_backend_impl>(std::move(hv));
  if (auto r = b->init(); !r) return core::fail(std::move(r).err());
  return std::unique_ptr<vif_backend>(std::move(b));
}

}  // namespace uvd::xen
