// SPDX-License-Identifier: Apache-2.0
// blkback's control plane: the xenbus state machine over the store, one
// thread per back end, driven by watches.
#include "transports/xen/blkback.hpp"

#include <unistd.h>

#include <spdlog/spdlog.h>

#include <map>
#include <mutex>

#include "transports/xen/blkback_conn.hpp"
#include "transports/xen/blkif.hpp"
#include "transports/xen/xenbus.hpp"

namespace uvd::xen {

namespace {

struct device {
  domid_t front;
  uint32_t vdev;
  std::string bdir, fdir;
  std::shared_ptr<storage::Vstore> disk;
  bool read_only;
  bool watched = false;
  int state = XenbusStateInitialising;  // ours
  std::unique_ptr<blk_conn> conn;
};

class blkback_impl final : public blkback {
 public:
  blkback_impl(std::unique_ptr<hypervisor> hv, blkback_options o) : hv_(std::move(hv)), opts_(o) {
    if (opts_.max_ring_page_order > blk_max_ring_page_order) opts_.max_ring_page_order = blk_max_ring_page_order;
    if (opts_.max_indirect_segments > blk_max_indirect_segments) opts_.max_indirect_segments = blk_max_indirect_segments;
  }
  ~blkback_impl() override {
    loop_.stop();
    std::lock_guard lk(mu_);
    for (auto& [k, d] : devs_) {
      d.conn.reset();
      // Tell the front ends, so they fail their requests instead of waiting.
      if (st_) (void)write_state(*st_, d.bdir, XenbusStateClosed);
    }
  }

  core::result<void> init() {
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    st_ = std::move(*s);
    return loop_.start(*st_, [this] { pass(); });
  }

  domid_t domid() const override { return hv_->self_domid(); }

  core::result<void> add_device(domid_t front, uint32_t vdev, std::shared_ptr<storage::Vstore> disk,
                                bool read_only) override {
    if (!disk) return core::fail(EINVAL, "no disk");
    domid_t self = hv_->self_domid();
    std::string bdir = blk_backend_dir(self, front, vdev), fdir = blk_frontend_dir(front, vdev);
    read_only = read_only || disk->read_only();
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    store& st = **s;
    bool discard = disk->has(core::VSTORE_F_DISCARD) && !read_only;
    // What a toolstack writes for `xl block-attach`, plus the features we offer
    // (blkback writes these before it goes InitWait), in one transaction.
    auto r = with_transaction(st, [&](txn_t t) -> core::result<void> {
      std::pair<std::string, std::string> back[] = {
          {"frontend", fdir},
          {"frontend-id", std::to_string(front)},
          {"online", "1"},
          {"removable", "0"},
          {"bootable", "1"},
          {"type", "uvd"},
          {"mode", read_only ? "r" : "w"},
          {"device-type", "disk"},
          {"dev", std::to_string(vdev)},
          {"feature-flush-cache", "1"},
          {"feature-discard", discard ? "1" : "0"},
          {"discard-granularity", std::to_string(disk->block_size())},
          {"discard-alignment", "0"},
          {"discard-secure", "0"},
          {"feature-max-indirect-segments", std::to_string(opts_.max_indirect_segments)},
          {"feature-persistent", opts_.persistent ? "1" : "0"},
          {"max-ring-page-order", std::to_string(opts_.max_ring_page_order)},
          {"multi-queue-max-queues", "1"},
          {"state", std::to_string(XenbusStateInitWait)},
      };
      for (auto& [k, v] : back)
        if (auto w = st.write(t, bdir + "/" + k, v); !w) return w;
      store_perm bperm[] = {{self, false, false}, {front, true, false}};
      if (auto w = st.set_perms(t, bdir, bperm); !w) return w;
      for (auto& [k, v] : back)
        if (auto w = st.set_perms(t, bdir + "/" + k, bperm); !w) return w;
      std::pair<std::string, std::string> fr[] = {
          {"backend", bdir},
          {"backend-id", std::to_string(self)},
          {"virtual-device", std::to_string(vdev)},
          {"device-type", "disk"},
          {"state", std::to_string(XenbusStateInitialising)},
      };
      if (auto w = st.mkdir(t, fdir); !w) return w;
      store_perm fperm[] = {{front, false, false}, {self, true, false}};
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
      auto key = std::make_pair(front, vdev);
      if (devs_.count(key)) return core::fail(EEXIST, "vbd " + std::to_string(vdev) + " of domain " +
                                                          std::to_string(front) + " exists");
      devs_[key] = device{front, vdev, bdir, fdir, std::move(disk), read_only};
      devs_[key].state = XenbusStateInitWait;
    }
    kick();
    return core::ok();
  }

  core::result<void> remove_device(domid_t front, uint32_t vdev) override {
    std::string bdir, fdir;
    {
      std::lock_guard lk(mu_);
      auto it = devs_.find({front, vdev});
      if (it == devs_.end()) return core::fail(ENOENT, "no such vbd");
      it->second.conn.reset();
      bdir = it->second.bdir;
      fdir = it->second.fdir;
      devs_.erase(it);
    }
    auto s = hv_->open_store();
    if (!s) return core::fail(std::move(s).err());
    (void)(*s)->write(no_txn, bdir + "/state", std::to_string(XenbusStateClosed));
    (void)(*s)->rm(no_txn, bdir);
    (void)(*s)->rm(no_txn, fdir);
    return core::ok();
  }

  core::result<blkback_device_stats> device_stats(domid_t front, uint32_t vdev) override {
    std::lock_guard lk(mu_);
    auto it = devs_.find({front, vdev});
    if (it == devs_.end()) return core::fail(ENOENT, "no such vbd");
    blkback_device_stats s;
    if (it->second.conn) it->second.conn->fill_stats(s);
    return s;
  }

 private:
  void kick() { loop_.kick(); }

  void pass() {
    std::lock_guard lk(mu_);
    for (auto& [k, d] : devs_) {
      if (!d.watched) {
        if (auto w = st_->watch(d.fdir + "/state", d.fdir); !w && w.err().errnum() != EEXIST)
          spdlog::warn("blkback: watch {}: {}", d.fdir, w.err().what());
        d.watched = true;
      }
      evaluate(d);
    }
  }

  void set_state(device& d, int st) {
    if (d.state == st) return;
    spdlog::debug("blkback: vbd {}/{}: {} -> {}", d.front, d.vdev, state_name(d.state), state_name(st));
    d.state = st;
    if (auto w = write_state(*st_, d.bdir, st); !w) spdlog::warn("blkback: {}: {}", d.bdir, w.err().what());
  }

  void fatal(device& d, const std::string& why) {
    spdlog::warn("blkback: vbd {}/{}: {}", d.front, d.vdev, why);
    (void)st_->write(no_txn, d.bdir + "/error", why);
    d.conn.reset();
    set_state(d, XenbusStateClosing);
  }

  void evaluate(device& d) {
    if (d.conn && d.conn->broken()) {
      fatal(d, "front end produced an impossible ring index");
      return;
    }
    auto fs = read_state(*st_, d.fdir);
    int f = fs ? *fs : XenbusStateClosed;  // a missing or garbled state counts as gone
    switch (f) {
      case XenbusStateInitialising:
        if (d.state == XenbusStateClosed || d.state == XenbusStateClosing) {
          d.conn.reset();
          (void)st_->rm(no_txn, d.bdir + "/error");
          set_state(d, XenbusStateInitWait);
        }
        break;
      case XenbusStateInitialised:
      case XenbusStateConnected:
        if (d.state == XenbusStateInitWait) connect(d);
        break;
      case XenbusStateClosing:
        d.conn.reset();
        set_state(d, XenbusStateClosing);
        break;
      case XenbusStateClosed:
      default:
        d.conn.reset();
        if (d.state != XenbusStateInitWait) set_state(d, XenbusStateClosed);
        break;
    }
  }

  // The front end's keys are hostile: bounds on every number, refusal of anything we do not speak.
  void connect(device& d) {
    store& s = *st_;
    blk_conn_params p{hv_.get(), d.front, {}, 0, false, d.read_only, d.disk, opts_};
    uint32_t order = 0;
    bool multi_page = false;  // ring-page-order present: refs are ring-ref0..N-1, else one "ring-ref"
    if (auto o = read_uint(s, no_txn, d.fdir + "/ring-page-order"); o) {
      if (*o > opts_.max_ring_page_order) return fatal(d, "ring-page-order " + std::to_string(*o) + " too large");
      order = static_cast<uint32_t>(*o);
      multi_page = true;
    } else if (o.err().errnum() != ENOENT) {
      return fatal(d, "ring-page-order: " + o.err().what());
    }
    for (uint32_t i = 0; i < (1u << order); ++i) {
      auto r = read_uint(s, no_txn, d.fdir + (multi_page ? "/ring-ref" + std::to_string(i) : std::string("/ring-ref")));
      if (!r || *r > UINT32_MAX) return fatal(d, "reading ring-ref: " + (r ? std::string("out of range") : r.err().what()));
      p.ring_refs.push_back(static_cast<grant_ref_t>(*r));
    }
    auto port = read_uint(s, no_txn, d.fdir + "/event-channel");
    if (!port || *port > UINT32_MAX) return fatal(d, "reading event-channel");
    p.port = static_cast<evtchn_port_t>(*port);
    if (auto proto = s.read(no_txn, d.fdir + "/protocol"); proto && *proto != XEN_IO_PROTO_ABI_NATIVE)
      return fatal(d, "protocol " + *proto + " not supported (only " XEN_IO_PROTO_ABI_NATIVE ")");
    if (auto q = read_uint(s, no_txn, d.fdir + "/multi-queue-num-queues"); q && *q != 1)
      return fatal(d, "multi-queue-num-queues must be 1");
    auto pers = read_uint(s, no_txn, d.fdir + "/feature-persistent");
    p.persistent = opts_.persistent && pers && *pers == 1;
    auto c = blk_conn::start(std::move(p));
    if (!c) return fatal(d, "connecting ring: " + c.err().what());
    d.conn = std::move(*c);
    const uint32_t bs = d.disk->block_size();
    auto r = with_transaction(s, [&](txn_t t) -> core::result<void> {
      if (auto w = s.write(t, d.bdir + "/sectors", std::to_string(d.disk->size() / blk_sector)); !w) return w;
      if (auto w = s.write(t, d.bdir + "/info", std::to_string(d.read_only ? VDISK_READONLY : 0)); !w) return w;
      if (auto w = s.write(t, d.bdir + "/sector-size", std::to_string(bs)); !w) return w;
      return s.write(t, d.bdir + "/physical-sector-size", std::to_string(bs));
    });
    if (!r) return fatal(d, "writing disk geometry: " + r.err().what());
    set_state(d, XenbusStateConnected);
  }

  std::unique_ptr<hypervisor> hv_;
  blkback_options opts_;
  std::unique_ptr<store> st_;  // control thread only
  std::mutex mu_;
  std::map<std::pair<domid_t, uint32_t>, device> devs_;
  backend_loop loop_;  // last: its thread ends before the members it uses go
};

}  // namespace

core::result<std::unique_ptr<blkback>> blkback::start(std::unique_ptr<hypervisor> hv, blkback_options opts) {
  if (!hv) return core::fail(EINVAL, "no hypervisor");
  auto b = std::make_unique<blkback_impl>(std::move(hv), opts);
  if (auto r = b->init(); !r) return core::fail(std::move(r).err());
  return std::unique_ptr<blkback>(std::move(b));
}

}  // namespace uvd::xen
