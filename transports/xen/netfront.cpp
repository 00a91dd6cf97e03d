// SPDX-License-Identifier: Apache-2.0
// The netif front end (like Linux xen-netfront) as a veth_ops transport:
// xen://<backend-domid>/<handle>?hv=local&hub=PATH&domid=N. A tx and an rx
// ring of one page each, one event channel, rx-copy: the front end posts all
// 256 rx pages at once and the back end copies frames into them. Frames up to
// 9018 bytes, over several slots (feature-sg); with offloads (the default;
// csum=0 / gso=0 turn them off) partial checksums (NETTXF/NETRXF_csum_blank)
// and TCP large segments up to 64 KiB (XEN_NETIF_EXTRA_TYPE_GSO) both ways,
// finished here in software for what the back end does not take. Responses
// are untrusted: an id that is not the one posted in that ring slot, a size
// outside its page, an error status, extra info we never asked for or
// checksum flags on a frame whose checksum cannot be found drop the frame
// and are counted.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "core/uri.hpp"
#include "net/eth.hpp"
#include "net/offload.hpp"
#include "transports/xen/hv_open.hpp"
#include "transports/xen/netif.hpp"
#include "transports/xen/xen.hpp"
#include "transports/xen/xenbus.hpp"

namespace uvd::xen {

namespace {

using core::veth_frame;

constexpr uint16_t no_id = 0xffff;

struct netfront {
  std::unique_ptr<hypervisor> hv;
  std::unique_ptr<store> st;      // the event thread's, after open
  std::unique_ptr<store> ctl_st;  // control ops (set_mac)
  domid_t back = 0;
  uint32_t handle = 0;
  std::string fdir, bdir;
  uint32_t timeout_ms = 10000;
  bool mac_from_front = false;
  net::mac_addr mac;
  const core::veth_host* host = nullptr;
  bool csum = true, gso = true;  // offloads we take and give (URI options csum, gso)
  netif_features back_feat;      // what the back end takes from us

  std::unique_ptr<granted_pages> tx_ring_pg, rx_ring_pg, tx_pool, rx_pool;
  std::unique_ptr<event_channel> evt;

  std::mutex mu;  // everything below
  net_tx_front_ring tx;
  net_rx_front_ring rx;
  std::vector<uint16_t> tx_next;  // tx id freelist (ids index tx_pool pages)
  std::vector<bool> tx_busy;
  uint16_t tx_free = no_id;
  uint32_t tx_free_count = 0;
  bool tx_stopped = false;
  // Rx buffer ids follow ring slots (id = slot index mod ring size, as Linux
  // netfront): an extra-info response overlays its id, so the slot is all
  // that says which buffer it used. Every response reposts its slot's buffer.
  uint32_t rx_prod = 0, rx_cons = 0;
  std::vector<uint8_t> stage;      // a multi-slot frame being assembled
  uint32_t stage_len = 0;
  bool stage_bad = false;
  bool in_chain = false;
  bool rx_more = false, rx_extra_next = false;
  uint16_t rx_first_flags = 0;
  uint32_t rx_extras = 0;
  netif_extra_info rx_gso{};
  bool rx_have_gso = false;
  bool connected = false;
  // Tx frames finished here: a checksum the back end cannot find or take,
  // segments of a large frame it does not take.
  std::vector<uint8_t> tx_stage;
  std::unique_ptr<uint8_t[]> seg_arena;
  uint32_t seg_arena_len = 0;
  std::vector<core::veth_frame> segs;

  std::atomic<uint64_t> rx_errors{0}, rx_dropped{0}, tx_errors{0}, tx_dropped{0};
  int stop_fd = -1;
  std::thread events;

  std::byte* tx_page(uint16_t id) const { return static_cast<std::byte*>(tx_pool->addr()) + size_t{id} * page_size; }
  const std::byte* rx_page(uint16_t id) const {
    return static_cast<const std::byte*>(rx_pool->addr()) + size_t{id} * page_size;
  }
  void post_rx_locked() {
    auto id = static_cast<uint16_t>(rx_prod++ & (net_ring_size - 1));
    netif_rx_request* r = rx.next_request();
    std::memset(r, 0, sizeof *r);
    r->id = id;
    r->gref = rx_pool->ref(id);
    rx.produce();
  }
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

core::result<void> handshake(netfront& f) {
  store& s = *f.st;
  auto b = s.read(no_txn, f.fdir + "/backend");
  if (!b) return core::fail(ENOENT, "netfront: no virtual interface at " + f.fdir + " (" + b.err().what() + ")");
  f.bdir = *b;
  auto bid = read_uint(s, no_txn, f.fdir + "/backend-id");
  if (!bid || *bid != f.back)
    return core::fail(EINVAL, "netfront: " + f.fdir + "/backend-id is not " + std::to_string(f.back));
  if (auto w = s.watch(f.bdir, "backend"); !w) return w;
  auto cur = read_state(s, f.bdir);
  if (!cur || *cur != XenbusStateInitWait) {  // a back end still bound to a dead predecessor
    if (auto w = write_state(s, f.fdir, XenbusStateClosed); !w) return w;
    auto c = wait_state(s, f.bdir, [](int st) { return st == XenbusStateClosed || st == XenbusStateInitWait; },
                        f.timeout_ms, "Closed");
    if (!c) return core::fail(std::move(c).err());
  }
  if (auto w = write_state(s, f.fdir, XenbusStateInitialising); !w) return w;
  if (auto c = wait_state(s, f.bdir, [](int st) { return st == XenbusStateInitWait; }, f.timeout_ms, "InitWait"); !c)
    return core::fail(std::move(c).err());

  auto copy = read_uint(s, no_txn, f.bdir + "/feature-rx-copy");
  if (!copy || *copy != 1) return core::fail(EPROTO, "netfront: back end does not offer feature-rx-copy");
  auto sg = read_uint(s, no_txn, f.bdir + "/feature-sg");
  if (!sg || *sg != 1) return core::fail(EPROTO, "netfront: back end does not offer feature-sg");
  auto be = [&](const char* key) {
    auto x = read_uint(s, no_txn, f.bdir + "/" + key);
    return x && *x == 1;
  };
  f.back_feat.sg = true;
  f.back_feat.csum4 = true;  // netif.h: every back end takes IPv4 partial checksums
  f.back_feat.csum6 = be("feature-ipv6-csum-offload");
  f.back_feat.gso4 = be("feature-gso-tcpv4");
  f.back_feat.gso6 = be("feature-gso-tcpv6");
  auto mff = read_uint(s, no_txn, f.bdir + "/mac-from-front");
  f.mac_from_front = mff && *mff == 1;
  if (!f.mac_from_front) {
    auto m = s.read(no_txn, f.fdir + "/mac");
    auto assigned = m ? net::parse_mac(*m) : core::result<net::mac_addr>(core::fail(ENOENT, "no mac"));
    if (!assigned) return core::fail(EINVAL, "netfront: " + f.fdir + "/mac: the toolstack assigned no usable MAC");
    if (*assigned != f.mac)
      return core::fail(EINVAL, "netfront: this interface's MAC is " + assigned->to_string() +
                                    " (assigned by the toolstack); open it with that MAC");
  }

  auto txr = f.hv->grant_pages(f.back, 1, true);
  auto rxr = f.hv->grant_pages(f.back, 1, true);
  if (!txr || !rxr) return core::fail(txr ? std::move(rxr).err() : std::move(txr).err());
  f.tx_ring_pg = std::move(*txr);
  f.rx_ring_pg = std::move(*rxr);
  // Frames we send the back end only reads; pages it fills must be writable.
  auto txp = f.hv->grant_pages(f.back, net_ring_size, false);
  auto rxp = f.hv->grant_pages(f.back, net_ring_size, true);
  if (!txp || !rxp) return core::fail(txp ? std::move(rxp).err() : std::move(txp).err());
  f.tx_pool = std::move(*txp);
  f.rx_pool = std::move(*rxp);
  auto e = f.hv->alloc_unbound(f.back);
  if (!e) return core::fail(std::move(e).err());
  f.evt = std::move(*e);
  if (!f.tx.init(f.tx_ring_pg->addr(), page_size) || !f.rx.init(f.rx_ring_pg->addr(), page_size) ||
      f.tx.size() != net_ring_size || f.rx.size() != net_ring_size)
    return core::fail(EINVAL, "netfront: unexpected ring size");
  f.tx_next.resize(net_ring_size);
  f.tx_busy.assign(net_ring_size, false);
  for (uint32_t i = 0; i < net_ring_size; ++i) f.tx_next[i] = static_cast<uint16_t>(i + 1 < net_ring_size ? i + 1 : no_id);
  f.tx_free = 0;
  f.tx_free_count = net_ring_size;
  f.stage.resize(f.gso ? net::gso_max_frame : net_max_frame);
  f.tx_stage.resize(net::gso_max_frame);
  f.seg_arena_len = net::gso_max_frame + net::gso_max_segs * 256;
  f.seg_arena.reset(new uint8_t[f.seg_arena_len]);
  f.segs.resize(net::gso_max_segs);
  f.rx_prod = f.rx_cons = 0;
  for (uint32_t i = 0; i < net_ring_size; ++i) f.post_rx_locked();
  (void)f.rx.push_requests();

  auto r = with_transaction(s, [&](txn_t t) -> core::result<void> {
    std::pair<const char*, std::string> keys[] = {
        {"tx-ring-ref", std::to_string(f.tx_ring_pg->ref(0))},
        {"rx-ring-ref", std::to_string(f.rx_ring_pg->ref(0))},
        {"event-channel", std::to_string(f.evt->local_port())},
        {"request-rx-copy", "1"},
        {"feature-rx-notify", "1"},
        {"feature-sg", "1"},
        // What we take on rx: netif.h assumes IPv4 partial checksums unless told not to.
        {"feature-no-csum-offload", f.csum ? "0" : "1"},
        {"feature-ipv6-csum-offload", f.csum ? "1" : "0"},
        {"feature-gso-tcpv4", f.gso ? "1" : "0"},
        {"feature-gso-tcpv6", f.gso ? "1" : "0"},
        // Our pools stay granted while connected: the back end may keep them mapped (uvd extension).
        {"feature-persistent", "1"},
    };
    for (auto& [k, v] : keys)
      if (auto w = s.write(t, f.fdir + "/" + k, v); !w) return w;
    if (f.mac_from_front)
      if (auto w = s.write(t, f.fdir + "/mac", f.mac.to_string()); !w) return w;
    return s.write(t, f.fdir + "/state", std::to_string(XenbusStateConnected));
  });
  if (!r) return r;
  auto c = wait_state(s, f.bdir, [](int st) { return st >= XenbusStateConnected; }, f.timeout_ms, "Connected");
  if (!c) return core::fail(std::move(c).err());
  if (*c != XenbusStateConnected) {
    auto why = s.read(no_txn, f.bdir + "/error");
    return core::fail(ECONNREFUSED, std::string("netfront: back end went ") + state_name(*c) +
                                        (why ? ": " + *why : std::string()));
  }
  if (f.mac_from_front)
    if (auto w = wait_value(s, f.bdir + "/mac", f.mac.to_string(), f.timeout_ms); !w) return w;
  f.connected = true;
  return core::ok();
}

// Frees the tx slots the back end answered. True if any were freed.
bool reap_tx_locked(netfront& f) {
  bool freed = false;
  netif_tx_response rsp;
  core::ring_take t;
  while ((t = f.tx.take_response(&rsp)) == core::ring_take::item) {
    if (rsp.status == NETIF_RSP_NULL) continue;  // an extra-info slot's: it held no page
    if (rsp.id >= net_ring_size || !f.tx_busy[rsp.id]) {
      ++f.tx_errors;  // an id we have not sent: ignore it
      continue;
    }
    if (rsp.status == NETIF_RSP_ERROR || rsp.status == NETIF_RSP_DROPPED) ++f.tx_errors;
    f.tx_busy[rsp.id] = false;
    f.tx_next[rsp.id] = f.tx_free;
    f.tx_free = rsp.id;
    ++f.tx_free_count;
    freed = true;
  }
  if (t == core::ring_take::broken && f.connected) {
    spdlog::warn("netfront: {}: tx response index is impossible; link down", f.bdir);
    f.connected = false;
  }
  return freed;
}

void run_events(netfront* f) {
  pollfd p[3] = {{f->evt->fd(), POLLIN, 0}, {f->stop_fd, POLLIN, 0}, {f->st->watch_fd(), POLLIN, 0}};
  for (;;) {
    if (::poll(p, 3, -1) < 0 && errno != EINTR) return;
    if (p[1].revents) return;
    if (p[0].revents) {
      (void)f->evt->ack();
      bool wake_tx = false;
      {
        std::lock_guard lk(f->mu);
        bool freed = reap_tx_locked(*f);
        while (f->tx.final_check_for_responses()) freed = reap_tx_locked(*f) || freed;
        if (freed && f->tx_stopped) {
          f->tx_stopped = false;
          wake_tx = true;
        }
      }
      if (wake_tx) f->host->tx_done(f->host->owner, 0);
      f->host->rx_ready(f->host->owner, 0);
    }
    if (p[2].revents) {
      if (!drain_watches(*f->st)) p[2].fd = -1;  // the store went away; the state read below fails
      auto s = read_state(*f->st, f->bdir);
      bool down = !s || *s == XenbusStateClosing || *s == XenbusStateClosed;
      bool was;
      {
        std::lock_guard lk(f->mu);
        was = f->connected;
        if (down) f->connected = false;
      }
      if (down && was) {
        spdlog::warn("netfront: back end {} went {}; link down", f->bdir, s ? state_name(*s) : "away");
        if (f->host->link_changed) f->host->link_changed(f->host->owner, 0);
      }
    }
  }
}

// ---- veth_ops ----

int xen_veth_open(const core::veth_open_params* p, void** handle) {
  auto f = std::make_unique<netfront>();
  unsigned long back = 0, h = 0;
  char extra;
  std::string target = p->target;
  auto slash = target.find('/');
  if (slash == std::string::npos ||
      std::sscanf(target.substr(0, slash).c_str(), "%lu%c", &back, &extra) != 1 || back > 0x7fef ||
      std::sscanf(target.substr(slash + 1).c_str(), "%lu%c", &h, &extra) != 1 || h > 0xffffffffu) {
    set_err(p, "xen: target must be <backend-domid>/<vif handle>, e.g. xen://0/0?hub=PATH");
    return -EINVAL;
  }
  f->back = static_cast<domid_t>(back);
  f->handle = static_cast<uint32_t>(h);
  f->mac = net::mac_addr::from(p->mac);
  for (auto [key, flag] : {std::pair<const char*, bool*>{"csum", &f->csum}, {"gso", &f->gso}}) {
    std::string v;
    if (!core::find_option(p->options, key, &v)) continue;
    if (v != "0" && v != "1") {
      set_err(p, std::string("xen: option ") + key + " must be 0 or 1");
      return -EINVAL;
    }
    *flag = v == "1";
  }
  f->gso = f->gso && f->csum;  // large segments always carry partial checksums
  auto hv = open_hypervisor_from_options(p->options);
  if (!hv) {
    set_err(p, hv.err().what());
    return -hv.err().errnum();
  }
  f->hv = std::move(*hv);
  f->fdir = vif_frontend_dir(f->hv->self_domid(), f->handle);
  auto st = f->hv->open_store();
  auto ctl = f->hv->open_store();
  if (!st || !ctl) {
    set_err(p, "xen: " + (st ? ctl.err().what() : st.err().what()));
    return -EIO;
  }
  f->st = std::move(*st);
  f->ctl_st = std::move(*ctl);
  if (auto r = handshake(*f); !r) {
    set_err(p, r.err().what());
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
    return -r.err().errnum();
  }
  if (f->mac_from_front)
    if (auto w = f->ctl_st->watch(f->bdir + "/mac", "mac"); !w) {
      set_err(p, w.err().what());
      return -w.err().errnum();
    }
  f->host = p->host;
  f->stop_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (f->stop_fd < 0) return -errno;
  netfront* raw = f.get();
  f->events = std::thread([raw] { run_events(raw); });
  *handle = f.release();
  return 0;
}

void xen_veth_close(void* handle) {
  std::unique_ptr<netfront> f(static_cast<netfront*>(handle));
  uint64_t one = 1;
  (void)::write(f->stop_fd, &one, sizeof one);
  if (f->events.joinable()) f->events.join();
  if (!f->connected) {  // the back end is gone: nothing to wait for
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
  } else if (write_state(*f->st, f->fdir, XenbusStateClosing)) {
    uint32_t t = std::min<uint32_t>(f->timeout_ms, 3000);
    (void)wait_state(*f->st, f->bdir, [](int st) { return st == XenbusStateClosing || st == XenbusStateClosed; }, t,
                     "Closing");
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
    (void)wait_state(*f->st, f->bdir, [](int st) { return st == XenbusStateClosed || st == XenbusStateInitWait; }, t,
                     "Closed");
  }
  ::close(f->stop_fd);
}

int xen_veth_caps(void* handle, core::veth_caps* out) {
  auto* f = static_cast<netfront*>(handle);
  *out = {};
  out->min_mtu = 68;
  out->max_mtu = net_max_mtu;
  out->nqueues = 1;
  out->features = core::VETH_F_LINK_STATE | core::VETH_F_SG;
  if (f->csum) out->features |= core::VETH_F_TX_CSUM | core::VETH_F_RX_CSUM;
  if (f->gso) out->features |= core::VETH_F_TSO;
  return 0;
}

// Ring slots and tx pages a frame of len bytes takes.
uint32_t data_slots(uint32_t len) { return static_cast<uint32_t>((len + page_size - 1) / page_size); }

bool room_locked(const netfront& f, uint32_t pages, uint32_t slots) {
  return f.tx_free_count >= pages && f.tx.free_requests() >= slots;
}

// Puts one frame on the tx ring (room checked): its pages, NETTXF flags and,
// for a large segment, a GSO extra-info slot after the first.
void put_frame_locked(netfront& f, const uint8_t* data, uint32_t len, uint16_t flags, uint16_t gso_size,
                      uint8_t gso_type) {
  uint32_t slots = data_slots(len);
  for (uint32_t i = 0; i < slots; ++i) {
    uint16_t id = f.tx_free;
    f.tx_free = f.tx_next[id];
    --f.tx_free_count;
    f.tx_busy[id] = true;
    uint32_t off = i * static_cast<uint32_t>(page_size);
    uint32_t k = std::min<uint32_t>(static_cast<uint32_t>(page_size), len - off);
    std::memcpy(f.tx_page(id), data + off, k);
    netif_tx_request* r = f.tx.next_request();
    std::memset(r, 0, sizeof *r);
    r->gref = f.tx_pool->ref(id);
    r->offset = 0;
    r->id = id;
    r->size = static_cast<uint16_t>(i == 0 ? len : k);  // the first slot carries the frame's length
    uint16_t fl = i + 1 < slots ? NETTXF_more_data : 0;
    if (i == 0) fl = static_cast<uint16_t>(fl | flags | (gso_size ? NETTXF_extra_info : 0));
    r->flags = fl;
    f.tx.produce();
    if (i == 0 && gso_size) {
      netif_extra_info e;
      std::memset(&e, 0, sizeof e);
      e.type = XEN_NETIF_EXTRA_TYPE_GSO;
      e.u.gso.size = gso_size;
      e.u.gso.type = gso_type;
      auto* slot = f.tx.next_request();
      std::memset(slot, 0, sizeof *slot);
      std::memcpy(slot, &e, sizeof e);
      f.tx.produce();
    }
  }
}

// One frame from the front half onto the ring, its offloads mapped onto
// netif's or finished here where the back end does not take them. False:
// no room (nothing taken).
bool send_frame_locked(netfront& f, const veth_frame& fr) {
  const bool gso = fr.flags & core::VETH_FRAME_GSO;
  const bool partial = fr.flags & core::VETH_FRAME_CSUM_PARTIAL;
  bool ipv6 = false;
  const bool derivable = (gso || partial) && netif_csum_derivable(fr, &ipv6);
  if (gso) {
    bool v6 = (fr.gso_type & 0x7f) == 2;
    if (derivable && fr.len <= net_max_tx_gso_frame && (v6 ? f.back_feat.gso6 : f.back_feat.gso4)) {
      uint32_t slots = data_slots(fr.len);
      if (!room_locked(f, slots, slots + 1)) return false;
      put_frame_locked(f, fr.data, fr.len, NETTXF_csum_blank | NETTXF_data_validated, fr.gso_size,
                       v6 ? XEN_NETIF_GSO_TYPE_TCPV6 : XEN_NETIF_GSO_TYPE_TCPV4);
      return true;
    }
    // Cut here; every segment or none goes on the ring.
    net::frame_layout l;
    int ns = -1;
    if (net::check_offload(fr, net_max_mtu, &l) == 0)
      ns = net::gso_segment(fr, l, f.seg_arena.get(), f.seg_arena_len, f.segs.data(), net::gso_max_segs);
    if (ns <= 0) {
      ++f.tx_errors;
      return true;
    }
    uint32_t pages = 0;
    for (int i = 0; i < ns; ++i) pages += data_slots(f.segs[i].len);
    if (!room_locked(f, pages, pages)) return false;
    for (int i = 0; i < ns; ++i) put_frame_locked(f, f.segs[i].data, f.segs[i].len, NETTXF_data_validated, 0, 0);
    return true;
  }
  const uint8_t* data = fr.data;
  uint16_t flags = (fr.flags & core::VETH_FRAME_CSUM_VALID) ? NETTXF_data_validated : 0;
  if (partial) {
    if (derivable && (ipv6 ? f.back_feat.csum6 : f.back_feat.csum4)) {
      flags = NETTXF_csum_blank | NETTXF_data_validated;
    } else {
      // netif could not say where this checksum goes: fill it in a copy.
      std::memcpy(f.tx_stage.data(), fr.data, fr.len);
      if (net::finish_csum(f.tx_stage.data(), fr.len, fr.csum_start, fr.csum_offset) != 0) {
        ++f.tx_errors;
        return true;
      }
      data = f.tx_stage.data();
      flags = NETTXF_data_validated;
    }
  }
  uint32_t slots = data_slots(fr.len);
  if (!room_locked(f, slots, slots)) return false;
  put_frame_locked(f, data, fr.len, flags, 0, 0);
  return true;
}

int xen_veth_xmit(void* handle, uint32_t, veth_frame* const* frames, uint32_t n) {
  auto* f = static_cast<netfront*>(handle);
  uint32_t taken = 0;
  bool notify = false;
  {
    std::lock_guard lk(f->mu);
    (void)reap_tx_locked(*f);
    for (; taken < n; ++taken) {
      const veth_frame& fr = *frames[taken];
      if (!f->connected) {
        ++f->tx_dropped;  // link down: taken and dropped, like a NIC without carrier
        continue;
      }
      uint32_t max = (fr.flags & core::VETH_FRAME_GSO) ? net::gso_max_frame : net_max_frame;
      if (fr.len < net::eth_min_frame || fr.len > max) {
        ++f->tx_errors;
        continue;
      }
      if (!send_frame_locked(*f, fr)) {
        f->tx_stopped = true;
        break;
      }
    }
    notify = f->tx.push_requests();
  }
  if (notify) (void)f->evt->notify();
  return static_cast<int>(taken);
}

// A whole received frame from the stage into out, its netif flags made veth
// metadata. False: dropped (counted).
bool complete_rx_locked(netfront& f, veth_frame& buf) {
  // Described in a copy: a refused frame leaves the buffer's capacity as it was.
  veth_frame out = buf;
  if (f.stage_bad) {
    ++f.rx_errors;
    return false;
  }
  if (out.len < f.stage_len) {
    ++f.rx_dropped;
    return false;
  }
  std::memcpy(out.data, f.stage.data(), f.stage_len);
  out.len = f.stage_len;
  out.flags = 0;
  const bool blank = f.rx_first_flags & NETRXF_csum_blank;
  if (f.rx_have_gso) {
    // Only if we asked for large segments, of a kind we know.
    uint8_t t = f.rx_gso.u.gso.type;
    if (!f.gso || f.rx_gso.u.gso.size == 0 || (t != XEN_NETIF_GSO_TYPE_TCPV4 && t != XEN_NETIF_GSO_TYPE_TCPV6)) {
      ++f.rx_errors;
      return false;
    }
    out.flags |= core::VETH_FRAME_GSO;
    out.gso_size = f.rx_gso.u.gso.size;
    out.gso_type = t == XEN_NETIF_GSO_TYPE_TCPV4 ? 1 : 2;
  }
  if (blank || f.rx_have_gso) {
    // A large segment without csum_blank gets its pseudo header here, as netback does.
    if (netif_csum_setup(out.data, out.len, !blank, &out) != 0) {
      ++f.rx_errors;
      return false;
    }
    if (!f.csum && !f.rx_have_gso) {  // a partial checksum we said we do not take: filled here
      (void)net::finish_csum(out.data, out.len, out.csum_start, out.csum_offset);
      out.flags = core::VETH_FRAME_CSUM_VALID;
    }
  } else if (f.rx_first_flags & NETRXF_data_validated) {
    out.flags |= core::VETH_FRAME_CSUM_VALID;
  }
  buf = out;
  return true;
}

int xen_veth_rx_poll(void* handle, uint32_t, veth_frame* frames, uint32_t budget) {
  auto* f = static_cast<netfront*>(handle);
  uint32_t filled = 0;
  bool notify = false;
  {
    std::lock_guard lk(f->mu);
    for (;;) {
      netif_rx_response rsp;
      core::ring_take t = core::ring_take::empty;
      while (filled < budget && (t = f->rx.take_response(&rsp)) == core::ring_take::item) {
        auto id = static_cast<uint16_t>(f->rx_cons++ & (net_ring_size - 1));
        // netif.h's grammar, as on tx: a first response, extra info while
        // the one before asked for more, then data while NETRXF_more_data.
        bool first = !f->in_chain;
        bool extra = !first && f->rx_extra_next;
        if (first) {
          f->in_chain = true;
          f->stage_len = 0;
          f->stage_bad = false;
          f->rx_first_flags = rsp.flags;
          f->rx_extra_next = rsp.flags & NETRXF_extra_info;
          f->rx_extras = 0;
          f->rx_have_gso = false;
        }
        if (extra) {
          netif_extra_info e;
          std::memcpy(&e, &rsp, sizeof e);
          f->rx_extra_next = e.flags & XEN_NETIF_EXTRA_FLAG_MORE;
          if (++f->rx_extras > net_max_extras || e.type != XEN_NETIF_EXTRA_TYPE_GSO || f->rx_have_gso) {
            f->stage_bad = true;  // we asked for no other kind
          } else {
            f->rx_gso = e;
            f->rx_have_gso = true;
          }
        } else {
          f->rx_more = rsp.flags & NETRXF_more_data;
          if (rsp.id != id || rsp.status <= 0 || rsp.offset + static_cast<uint32_t>(rsp.status) > page_size ||
              f->stage_len + static_cast<uint32_t>(rsp.status) > f->stage.size()) {
            f->stage_bad = true;
          } else {
            std::memcpy(f->stage.data() + f->stage_len, f->rx_page(id) + rsp.offset, static_cast<size_t>(rsp.status));
            f->stage_len += static_cast<uint32_t>(rsp.status);
          }
        }
        f->post_rx_locked();  // the slot's page goes straight back to the back end
        if (f->rx_extra_next || f->rx_more) continue;
        f->in_chain = false;
        if (complete_rx_locked(*f, frames[filled])) ++filled;
      }
      if (t == core::ring_take::broken && f->connected) {
        spdlog::warn("netfront: {}: rx response index is impossible; link down", f->bdir);
        f->connected = false;
      }
      if (filled == budget || !f->rx.final_check_for_responses()) break;
    }
    notify = f->rx.push_requests();
  }
  if (notify) (void)f->evt->notify();
  return static_cast<int>(filled);
}

int xen_veth_link_state(void* handle) {
  auto* f = static_cast<netfront*>(handle);
  std::lock_guard lk(f->mu);
  return f->connected ? 1 : 0;
}

int xen_veth_set_mac(void* handle, const uint8_t* mac) {
  auto* f = static_cast<netfront*>(handle);
  auto m = net::mac_addr::from(mac);
  if (m == f->mac) return 0;
  if (!f->mac_from_front) return -EPERM;  // the toolstack's MAC is the only one the back end lets through
  if (auto w = f->ctl_st->write(no_txn, f->fdir + "/mac", m.to_string()); !w) return -w.err().errnum();
  // Frames with the new source pass the switch only once the back end has adopted it.
  if (auto w = wait_value(*f->ctl_st, f->bdir + "/mac", m.to_string(), f->timeout_ms); !w) return -w.err().errnum();
  f->mac = m;
  return 0;
}

int xen_veth_rx_fd(void*, uint32_t) { return -1; }

int xen_veth_stats(void* handle, core::veth_stats_extra* out) {
  auto* f = static_cast<netfront*>(handle);
  out->rx_dropped = f->rx_dropped;
  out->rx_errors = f->rx_errors;
  out->tx_dropped = f->tx_dropped;
  out->tx_errors = f->tx_errors;
  return 0;
}

}  // namespace

const core::veth_ops xen_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "xen",
    .description = "Xen netif front end: xen://BACKEND-DOMID/HANDLE?hv=local&hub=SOCKET&domid=N (or hv=xen); "
                   "csum=0 / gso=0 decline checksum offload / large segments",
    .open = xen_veth_open,
    .close = xen_veth_close,
    .caps = xen_veth_caps,
    .xmit = xen_veth_xmit,
    .rx_poll = xen_veth_rx_poll,
    .link_state = xen_veth_link_state,
    .set_mtu = nullptr,
    .set_mac = xen_veth_set_mac,
    .rx_fd = xen_veth_rx_fd,
    .stats = xen_veth_stats,
    .set_link = nullptr,
    .tx_timeout = nullptr,
};

}  // namespace uvd::xen
