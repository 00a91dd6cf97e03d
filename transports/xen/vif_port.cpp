// SPDX-License-Identifier: Apache-2.0
// netback's data path for one virtual interface (see vif_port.hpp). Every
// request is copied off the ring once and checked before a byte moves.
#include "transports/xen/vif_port.hpp"

#include <spdlog/spdlog.h>

#include <cstring>

#include "net/offload.hpp"

namespace uvd::xen {

namespace {
constexpr size_t backlog_max = 1024;
}  // namespace

static_assert(sizeof(netif_extra_info) <= sizeof(netif_tx_request) && sizeof(netif_extra_info) == sizeof(netif_rx_response),
              "extra info overlays ring slots");

core::result<std::unique_ptr<vif_port>> vif_port::connect(std::shared_ptr<hypervisor> hv, domid_t front,
                                                          grant_ref_t tx_ref, grant_ref_t rx_ref, evtchn_port_t port,
                                                          std::shared_ptr<vif_shared> shared, std::string name,
                                                          bool persistent, const netif_features& front_features) {
  auto p = std::unique_ptr<vif_port>(new vif_port());
  p->persistent_ = persistent;
  p->feat_ = front_features;
  p->hv_ = std::move(hv);
  p->front_ = front;
  p->shared_ = std::move(shared);
  p->name_ = std::move(name);
  auto t = p->hv_->map_grants(front, std::span<const grant_ref_t>(&tx_ref, 1), true);
  if (!t) return core::fail(t.err().code.value(), "map tx-ring-ref: " + t.err().message);
  p->tx_map_ = std::move(*t);
  auto r = p->hv_->map_grants(front, std::span<const grant_ref_t>(&rx_ref, 1), true);
  if (!r) return core::fail(r.err().code.value(), "map rx-ring-ref: " + r.err().message);
  p->rx_map_ = std::move(*r);
  if (!p->tx_.attach(p->tx_map_->addr(), page_size) || !p->rx_.attach(p->rx_map_->addr(), page_size))
    return core::fail(EINVAL, "rings too small");
  auto e = p->hv_->bind_interdomain(front, port);
  if (!e) return core::fail(e.err().code.value(), "bind event-channel: " + e.err().message);
  p->evt_ = std::move(*e);
  p->chain_.reserve(net_ring_size);
  p->refs_.reserve(net_max_slots);
  p->rxreq_.reserve(net_max_slots);
  p->pages_.resize(net_max_slots);
  p->extra_.reserve(net_ring_size);
  // Room to finish one frame here: its segments, or a copy to checksum.
  p->seg_arena_len_ = net::gso_max_frame + net::gso_max_segs * 256;
  p->seg_arena_.reset(new uint8_t[p->seg_arena_len_]);
  p->scratch_.resize(net::gso_max_frame);
  return p;
}

bool vif_port::map_refs(bool writable, std::unique_ptr<foreign_mapping>* transient) {
  constexpr size_t cache_max = 2 * net_ring_size;
  auto& cache = writable ? rw_cache_ : ro_cache_;
  if (persistent_) {
    bool all = true;
    for (size_t i = 0; i < refs_.size(); ++i) {
      auto it = cache.find(refs_[i]);
      if (it == cache.end() && cache.size() < cache_max) {
        auto m = hv_->map_grants(front_, std::span<const grant_ref_t>(&refs_[i], 1), writable);
        if (!m) return false;
        it = cache.emplace(refs_[i], std::move(*m)).first;
      }
      if (it == cache.end()) {
        all = false;
        break;
      }
      pages_[i] = static_cast<uint8_t*>(it->second->addr());
    }
    if (all) return true;
  }
  auto m = hv_->map_grants(front_, refs_, writable);
  if (!m) return false;
  for (size_t i = 0; i < refs_.size(); ++i) pages_[i] = static_cast<uint8_t*>((*m)->addr()) + i * page_size;
  *transient = std::move(*m);
  return true;
}

std::optional<net::mac_addr> vif_port::owned_mac() const {
  uint64_t k = shared_->mac.load();
  net::mac_addr m;
  for (int i = 5; i >= 0; --i, k >>= 8) m.b[static_cast<size_t>(i)] = static_cast<uint8_t>(k);
  return m;  // all zeros until the MAC is known: matches no frame's source
}

void vif_port::respond_tx(uint16_t id, int16_t status) {
  netif_tx_response rsp;
  std::memset(&rsp, 0, sizeof rsp);
  rsp.id = id;
  rsp.status = status;
  tx_.put_response(rsp);
}


bool vif_port::finish_chain(std::vector<uint8_t>& buf, core::veth_frame& out, net::port_stats& st) {
  const netif_tx_request& first = chain_.front();
  uint32_t ndata = 0, rest = 0;
  bool ok = true, bad_offload = false, counted = false;
  // Extra info, one of each type at most; only GSO is offered (no multicast
  // control, no hash): anything else was never negotiated.
  netif_extra_info gso{};
  bool have_gso = false;
  uint32_t nextra = 0;
  for (size_t i = 0; i < chain_.size(); ++i) {
    if (!extra_[i]) {
      ++ndata;
      if (i > 0) {
        if (chain_[i].size == 0 || chain_[i].offset + uint32_t{chain_[i].size} > page_size) ok = false;
        rest += chain_[i].size;
      }
      continue;
    }
    netif_extra_info e;
    std::memcpy(&e, &chain_[i], sizeof e);
    if (++nextra > net_max_extras || e.type != XEN_NETIF_EXTRA_TYPE_GSO || have_gso) {
      ok = false;
      bad_offload = true;
      continue;
    }
    gso = e;
    have_gso = true;
  }
  if (ndata > net_max_slots) ok = false;
  if (have_gso && (gso.u.gso.size == 0 || (gso.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV4 &&
                                           gso.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV6))) {
    ok = false;
    bad_offload = true;
  }
  // The first slot's size is the whole frame's; what lies in the first page is the difference.
  uint32_t head = ok && first.size > rest ? first.size - rest : 0;
  uint32_t max = have_gso ? net_max_tx_gso_frame : net_max_frame;
  if (ok && (head == 0 || first.offset + head > page_size || first.size > max)) ok = false;
  if (ok) {
    refs_.clear();
    for (size_t i = 0; i < chain_.size(); ++i)
      if (!extra_[i]) refs_.push_back(chain_[i].gref);  // at most net_max_slots: checked above
    // The front end only needs us to read these pages.
    std::unique_ptr<foreign_mapping> m;
    if (!map_refs(false, &m)) {
      ++st.rx_truncated;
      ok = false;
      counted = true;
    } else {
      if (buf.size() < first.size) buf.resize(first.size);
      uint32_t off = 0;
      for (size_t i = 0, k = 0; i < chain_.size(); ++i) {
        if (extra_[i]) continue;
        uint32_t n = k == 0 ? head : chain_[i].size;
        std::memcpy(buf.data() + off, pages_[k] + chain_[i].offset, n);
        off += n;
        ++k;
      }
      out = {};
      out.data = buf.data();
      out.len = off;
    }
  }
  if (ok) {
    // Offloads only now, on our copy: the front end's pages may change under us.
    // A GSO frame is a partial checksum whether or not the front end said so
    // (netback recomputes the pseudo header when it did not).
    bool blank = first.flags & NETTXF_csum_blank;
    if ((blank || have_gso) && netif_csum_setup(out.data, out.len, !blank, &out) != 0) {
      ok = false;
      bad_offload = true;
    } else if (!blank && !have_gso && (first.flags & NETTXF_data_validated)) {
      out.flags |= core::VETH_FRAME_CSUM_VALID;
    }
    if (ok && have_gso) {
      out.flags |= core::VETH_FRAME_GSO;
      out.gso_size = gso.u.gso.size;
      out.gso_type = gso.u.gso.type == XEN_NETIF_GSO_TYPE_TCPV4 ? 1 : 2;
    }
    if (ok && (out.flags & (core::VETH_FRAME_GSO | core::VETH_FRAME_CSUM_PARTIAL)) &&
        net::check_offload(out, net_max_mtu, nullptr) != 0) {
      ok = false;
      bad_offload = true;
    }
  }
  if (!ok && !counted) ++(bad_offload ? st.rx_bad_offload : st.rx_bad_msg);
  // One response per slot, in ring order; extra-info slots get NETIF_RSP_NULL.
  for (size_t i = 0; i < chain_.size(); ++i)
    respond_tx(chain_[i].id, extra_[i] ? int16_t{NETIF_RSP_NULL} : ok ? int16_t{NETIF_RSP_OKAY} : int16_t{NETIF_RSP_ERROR});
  chain_.clear();
  extra_.clear();
  return ok;
}

uint32_t vif_port::rx_burst(core::veth_frame* frames, uint32_t n, net::port_stats& st) {
  (void)evt_->ack();
  flush_backlog();  // the event may be the front end posting rx buffers
  if (bufs_.size() < n) bufs_.resize(n, std::vector<uint8_t>(net_max_frame));
  uint32_t filled = 0;
  for (;;) {
    while (filled < n) {
      netif_tx_request req;
      auto t = tx_.take_request(&req);
      if (t == core::ring_take::broken) {
        spdlog::warn("netback: {}: tx producer index is impossible; dropping the port", name_);
        shared_->broken = true;
        return filled;
      }
      if (t == core::ring_take::empty) break;
      // netif.h's grammar: a first slot, extra-info slots while the one
      // before asked for more (the first by NETTXF_extra_info, each extra by
      // XEN_NETIF_EXTRA_FLAG_MORE), then data slots while NETTXF_more_data.
      // Checked only when the frame is whole. A chain is bounded by the
      // ring: it lets at most a ring's worth go unanswered.
      bool is_extra = !chain_.empty() && extra_next_;
      chain_.push_back(req);
      extra_.push_back(is_extra);
      if (chain_.size() == 1) {
        chain_more_ = req.flags & NETTXF_more_data;
        extra_next_ = req.flags & NETTXF_extra_info;
      } else if (is_extra) {
        netif_extra_info e;
        std::memcpy(&e, &req, sizeof e);
        extra_next_ = e.flags & XEN_NETIF_EXTRA_FLAG_MORE;
      } else {
        chain_more_ = req.flags & NETTXF_more_data;
      }
      if (extra_next_ || chain_more_) continue;
      if (finish_chain(bufs_[filled], frames[filled], st)) ++filled;
    }
    if (tx_.push_responses()) (void)evt_->notify();
    if (filled == n || !tx_.final_check_for_requests()) break;
  }
  return filled;
}

bool vif_port::deliver(const uint8_t* data, uint32_t len, uint16_t flags, uint16_t gso_size, uint8_t gso_type) {
  uint32_t dslots = static_cast<uint32_t>((len + page_size - 1) / page_size);
  uint32_t slots = dslots + (gso_size ? 1 : 0);
  if (rx_.available_requests() < slots) return false;
  rxreq_.clear();
  refs_.clear();
  for (uint32_t i = 0; i < slots; ++i) {
    netif_rx_request r;
    if (rx_.take_request(&r) != core::ring_take::item) break;
    rxreq_.push_back(r);
    // The extra-info slot (second, as netif.h orders them) uses no buffer:
    // its request only lends the ring slot, and the front end reposts it.
    if (!(gso_size && i == 1)) refs_.push_back(r.gref);
  }
  std::unique_ptr<foreign_mapping> m;
  // A buffer we cannot write goes back empty, with an error.
  bool ok = rxreq_.size() == slots && map_refs(true, &m);
  uint32_t off = 0;
  for (size_t i = 0, k = 0; i < rxreq_.size(); ++i) {
    netif_rx_response rsp;
    std::memset(&rsp, 0, sizeof rsp);
    rsp.id = rxreq_[i].id;
    if (!ok) {
      rsp.status = NETIF_RSP_ERROR;
    } else if (gso_size && i == 1) {
      netif_extra_info e;
      std::memset(&e, 0, sizeof e);
      e.type = XEN_NETIF_EXTRA_TYPE_GSO;
      e.u.gso.size = gso_size;
      e.u.gso.type = gso_type;
      std::memcpy(&rsp, &e, sizeof e);
    } else {
      uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(page_size), len - off);
      std::memcpy(pages_[k], data + off, n);
      off += n;
      rsp.status = static_cast<int16_t>(n);
      if (k == 0) rsp.flags = static_cast<uint16_t>(flags | (gso_size ? NETRXF_extra_info : 0));
      if (k + 1 < dslots) rsp.flags |= NETRXF_more_data;
      ++k;
    }
    rx_.put_response(rsp);
  }
  return true;
}

void vif_port::flush_backlog() {
  auto slots = [](const rx_item& it) { return (it.data.size() + page_size - 1) / page_size + (it.gso_size ? 1 : 0); };
  while (!backlog_.empty()) {
    while (!backlog_.empty()) {
      rx_item& it = backlog_.front();
      if (!deliver(it.data.data(), static_cast<uint32_t>(it.data.size()), it.flags, it.gso_size, it.gso_type)) break;
      spare_.push_back(std::move(it.data));
      backlog_.pop_front();
    }
    // Frames still wait: be told when the front end posts buffers, and look
    // once more in case it did so meanwhile. Fewer buffers than the next frame
    // needs is not "more": looping on them would spin the switch thread forever.
    if (backlog_.empty() || !rx_.final_check_for_requests() || rx_.available_requests() < slots(backlog_.front()))
      break;
  }
  if (rx_.push_responses()) (void)evt_->notify();
}

void vif_port::emit(const uint8_t* data, uint32_t len, uint16_t flags, uint16_t gso_size, uint8_t gso_type) {
  // Without feature-sg the front end takes one slot per frame.
  if (!feat_.sg && len > page_size) {
    ++shared_->dropped;
    return;
  }
  if (backlog_.empty() && deliver(data, len, flags, gso_size, gso_type)) return;
  // Without feature-rx-notify the front end may never tell us it posted
  // buffers, so nothing waits for them (netif.h: the back end "cannot safely
  // queue packets"). The bound leaves room for one GSO frame's segments.
  if (!feat_.rx_notify || backlog_.size() >= backlog_max + net::gso_max_segs) {
    ++shared_->dropped;
    return;
  }
  rx_item it;
  if (!spare_.empty()) {
    it.data = std::move(spare_.back());
    spare_.pop_back();
  }
  it.data.assign(data, data + len);
  it.flags = flags;
  it.gso_size = gso_size;
  it.gso_type = gso_type;
  backlog_.push_back(std::move(it));
}

void vif_port::offer(const core::veth_frame& f) {
  const bool gso = f.flags & core::VETH_FRAME_GSO;
  const bool partial = f.flags & core::VETH_FRAME_CSUM_PARTIAL;
  bool ipv6 = false;
  // netif names no checksum position: the front end finds it from the headers,
  // so a partial checksum goes as csum_blank only where that finds this one.
  const bool derivable = (gso || partial) && netif_csum_derivable(f, &ipv6);
  if (gso) {
    bool take = derivable && feat_.sg && ((f.gso_type & 0x7f) == 2 ? feat_.gso6 : feat_.gso4);
    if (take) {
      uint8_t t = (f.gso_type & 0x7f) == 2 ? XEN_NETIF_GSO_TYPE_TCPV6 : XEN_NETIF_GSO_TYPE_TCPV4;
      return emit(f.data, f.len, NETRXF_csum_blank | NETRXF_data_validated, f.gso_size, t);
    }
    // The front end takes no large segments of this kind: cut them here, as
    // netback's stack does for a vif without the GSO feature.
    net::frame_layout l;
    core::veth_frame segs[net::gso_max_segs];
    int ns = -1;
    if (net::check_offload(f, net_max_mtu, &l) == 0)
      ns = net::gso_segment(f, l, seg_arena_.get(), seg_arena_len_, segs, net::gso_max_segs);
    if (ns <= 0) {
      ++shared_->dropped;
      return;
    }
    ++shared_->sw_gso;
    for (int i = 0; i < ns; ++i) emit(segs[i].data, segs[i].len, NETRXF_data_validated);
    return;
  }
  if (partial) {
    if (derivable && (ipv6 ? feat_.csum6 : feat_.csum4))
      return emit(f.data, f.len, NETRXF_csum_blank | NETRXF_data_validated);
    // Filled here, in a copy: the switch may hand the same frame to other ports.
    if (f.len > scratch_.size() || (std::memcpy(scratch_.data(), f.data, f.len),
                                    net::finish_csum(scratch_.data(), f.len, f.csum_start, f.csum_offset) != 0)) {
      ++shared_->dropped;
      return;
    }
    ++shared_->sw_csum;
    return emit(scratch_.data(), f.len, NETRXF_data_validated);
  }
  emit(f.data, f.len, (f.flags & core::VETH_FRAME_CSUM_VALID) ? uint16_t{NETRXF_data_validated} : uint16_t{0});
}

uint32_t vif_port::tx_burst(core::veth_frame* const* frames, uint32_t n) {
  flush_backlog();
  uint32_t taken = 0;
  for (; taken < n; ++taken) {
    const core::veth_frame& f = *frames[taken];
    uint32_t max = (f.flags & core::VETH_FRAME_GSO) ? net::gso_max_frame : net_max_frame;
    if (f.len == 0 || f.len > max) {  // nothing the front end could take: dropped, not stuck
      ++shared_->dropped;
      continue;
    }
    // Full: the switch counts the rest as its own drops (a GSO frame's
    // segments may overrun the bound by one frame's worth).
    if (backlog_.size() >= backlog_max) break;
    offer(f);
  }
  // Frames wait: arm req_event so the front end wakes us when it posts
  // buffers, and deliver to any it posted before the event was armed (it
  // will not notify for those: checking once and moving on lost them).
  if (!backlog_.empty()) flush_backlog();
  if (rx_.push_responses()) (void)evt_->notify();
  // The switch counts what we did not take as its own drop; keep our side of it too.
  shared_->dropped += n - taken;
  return taken;
}

}  // namespace uvd::xen
