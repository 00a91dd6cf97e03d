// SPDX-License-Identifier: Apache-2.0
// netback's data path for one virtual interface (see vif_port.hpp). Every
// request is copied off the ring once and checked before a byte moves.
#include "transports/xen/vif_port.hpp"

#include <spdlog/spdlog.h>

#include <cstring>

namespace uvd::xen {

core::result<std::unique_ptr<vif_port>> vif_port::connect(std::shared_ptr<hypervisor> hv, domid_t front,
                                                          grant_ref_t tx_ref, grant_ref_t rx_ref, evtchn_port_t port,
                                                          std::shared_ptr<vif_shared> shared, std::string name,
                                                          bool persistent) {
  auto p = std::unique_ptr<vif_port>(new vif_port());
  p->persistent_ = persistent;
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

bool vif_port::finish_chain(std::vector<uint8_t>& buf, uint32_t& len, net::port_stats& st) {
  bool ok = chain_len_ <= net_max_slots;
  const netif_tx_request& first = chain_.front();
  uint32_t rest = 0;
  if (ok && (first.flags & (NETTXF_extra_info | NETTXF_csum_blank))) {
    ++st.rx_bad_offload;  // neither extra info (GSO) nor partial checksums were offered
    ok = false;
  }
  for (size_t i = 1; ok && i < chain_.size(); ++i) {
    if (chain_[i].size == 0 || chain_[i].offset + uint32_t{chain_[i].size} > page_size) ok = false;
    rest += chain_[i].size;
  }
  // The first slot's size is the whole frame's; what lies in the first page is the difference.
  uint32_t head = ok && first.size > rest ? first.size - rest : 0;
  if (ok && (head == 0 || first.offset + head > page_size || first.size > net_max_frame)) ok = false;
  if (!ok) {
    if (chain_len_ > net_max_slots || !(first.flags & (NETTXF_extra_info | NETTXF_csum_blank))) ++st.rx_bad_msg;
  } else {
    refs_.clear();
    for (const auto& r : chain_) refs_.push_back(r.gref);  // at most net_max_slots: checked above
    // The front end only needs us to read these pages.
    std::unique_ptr<foreign_mapping> m;
    if (!map_refs(false, &m)) {
      ++st.rx_truncated;
      ok = false;
    } else {
      uint32_t off = 0;
      for (size_t i = 0; i < chain_.size(); ++i) {
        uint32_t k = i == 0 ? head : chain_[i].size;
        std::memcpy(buf.data() + off, pages_[i] + chain_[i].offset, k);
        off += k;
      }
      len = off;
    }
  }
  for (const auto& r : chain_) respond_tx(r.id, ok ? NETIF_RSP_OKAY : NETIF_RSP_ERROR);
  chain_.clear();
  chain_len_ = 0;
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
      ++chain_len_;
      chain_.push_back(req);  // bounded by the ring: it lets at most a ring's worth go unanswered
      if (req.flags & NETTXF_more_data) continue;
      uint32_t len = 0;
      if (finish_chain(bufs_[filled], len, st)) {
        frames[filled] = {};
        frames[filled].data = bufs_[filled].data();
        frames[filled].len = len;
        ++filled;
      }
    }
    if (tx_.push_responses()) (void)evt_->notify();
    if (filled == n || !tx_.final_check_for_requests()) break;
  }
  return filled;
}

bool vif_port::deliver(const uint8_t* data, uint32_t len) {
  uint32_t slots = static_cast<uint32_t>((len + page_size - 1) / page_size);
  if (rx_.available_requests() < slots) return false;
  rxreq_.clear();
  refs_.clear();
  for (uint32_t i = 0; i < slots; ++i) {
    netif_rx_request r;
    if (rx_.take_request(&r) != core::ring_take::item) break;
    rxreq_.push_back(r);
    refs_.push_back(r.gref);
  }
  std::unique_ptr<foreign_mapping> m;
  // A buffer we cannot write goes back empty, with an error.
  bool ok = rxreq_.size() == slots && map_refs(true, &m);
  uint32_t off = 0;
  for (size_t i = 0; i < rxreq_.size(); ++i) {
    netif_rx_response rsp;
    std::memset(&rsp, 0, sizeof rsp);
    rsp.id = rxreq_[i].id;
    if (!ok) {
      rsp.status = NETIF_RSP_ERROR;
    } else {
      uint32_t k = std::min<uint32_t>(static_cast<uint32_t>(page_size), len - off);
      std::memcpy(pages_[i], data + off, k);
      off += k;
      rsp.status = static_cast<int16_t>(k);
      if (i + 1 < rxreq_.size()) rsp.flags = NETRXF_more_data;
    }
    rx_.put_response(rsp);
  }
  return true;
}

void vif_port::flush_backlog() {
  while (!backlog_.empty()) {
    while (!backlog_.empty() && deliver(backlog_.front().data(), static_cast<uint32_t>(backlog_.front().size()))) {
      spare_.push_back(std::move(backlog_.front()));
      backlog_.pop_front();
    }
    // Frames still wait: be told when the front end posts buffers, and look
    // once more in case it did so meanwhile. Fewer buffers than the next frame
    // needs is not "more": looping on them would spin the switch thread forever.
    if (backlog_.empty() || !rx_.final_check_for_requests() ||
        rx_.available_requests() < (backlog_.front().size() + page_size - 1) / page_size)
      break;
  }
  if (rx_.push_responses()) (void)evt_->notify();
}

uint32_t vif_port::tx_burst(core::veth_frame* const* frames, uint32_t n) {
  constexpr size_t backlog_max = 1024;
  flush_backlog();
  uint32_t taken = 0;
  for (; taken < n; ++taken) {
    const core::veth_frame& f = *frames[taken];
    if (f.len == 0 || f.len > net_max_frame) {  // nothing the front end could take: dropped, not stuck
      ++shared_->dropped;
      continue;
    }
    if (backlog_.empty() && deliver(f.data, f.len)) continue;
    if (backlog_.size() >= backlog_max) break;
    std::vector<uint8_t> b;
    if (!spare_.empty()) {
      b = std::move(spare_.back());
      spare_.pop_back();
    }
    b.assign(f.data, f.data + f.len);
    backlog_.push_back(std::move(b));
  }
  if (!backlog_.empty()) (void)rx_.final_check_for_requests();  // arm req_event: wake us when buffers come
  if (rx_.push_responses()) (void)evt_->notify();
  // The switch counts what we did not take as its own drop; keep our side of it too.
  shared_->dropped += n - taken;
  return taken;
}

}  // namespace uvd::xen
