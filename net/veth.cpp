// SPDX-License-Identifier: Apache-2.0
#include "net/veth.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "core/uri.hpp"

namespace uvd::net {

namespace {

constexpr uint32_t tx_batch_max = 256;
constexpr uint32_t max_queues = 64;
constexpr uint32_t max_rx_budget = 1024;

bool tagged(const veth_frame& f) {
  if (f.len < eth_hlen) return false;
  uint16_t t = frame_ethertype(f.data);
  return t == ethertype_vlan || t == ethertype_qinq;
}

// Largest non-GSO frame for an MTU: one VLAN tag allowed on top.
bool over_mtu(const veth_frame& f, uint32_t mtu) {
  return f.len > mtu + eth_hlen + (tagged(f) ? vlan_hlen : 0);
}

}  // namespace

core::result<std::unique_ptr<Veth>> Veth::open(core::registry& reg, std::string_view uri, const veth_options& opts) {
  auto u = core::parse_uri(uri);
  if (!u) return core::fail(std::move(u).err());
  auto ops = reg.veth(u->transport);
  if (!ops) return core::fail(std::move(ops).err());
  std::string options = u->options;
  if (!opts.options.empty()) options += (options.empty() ? "" : "&") + opts.options;
  std::unique_ptr<Veth> v(new Veth());
  if (auto r = v->init(**ops, u->target, options, opts); !r) return core::fail(std::move(r).err());
  return v;
}

core::result<std::unique_ptr<Veth>> Veth::open(const core::veth_ops& ops, std::string_view target,
                                               const veth_options& opts) {
  std::unique_ptr<Veth> v(new Veth());
  if (auto r = v->init(ops, target, opts.options, opts); !r) return core::fail(std::move(r).err());
  return v;
}

core::result<void> Veth::init(const core::veth_ops& ops, std::string_view target, const std::string& options,
                              const veth_options& opts) {
  ops_ = ops;
  transport_ = ops.name ? ops.name : "?";
  target_ = std::string(target);
  if (opts.nqueues == 0 || opts.nqueues > max_queues)
    return core::fail(EINVAL, "a virtual NIC has 1 to " + std::to_string(max_queues) + " queues");
  if (opts.rx_budget == 0 || opts.rx_budget > max_rx_budget)
    return core::fail(EINVAL, "rx_budget must be 1 to " + std::to_string(max_rx_budget));
  mac_ = opts.mac ? *opts.mac : random_mac();
  if (mac_.is_multicast() || mac_.is_zero())
    return core::fail(EINVAL, "MAC " + mac_.to_string() + " is not a unicast address");
  mtu_ = opts.mtu;
  rx_budget_ = opts.rx_budget;
  tx_timeout_ = opts.tx_timeout;
  event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0) return core::fail(errno, "eventfd");

  // Queue state exists before open: a transport may raise events from inside it.
  for (uint32_t i = 0; i < opts.nqueues; ++i) {
    rxq_.push_back(std::make_unique<rxq>());
    txq_.push_back(std::make_unique<txq>());
  }
  host_ = core::veth_host{.owner = this, .rx_ready = on_rx_ready, .tx_done = on_tx_done,
                          .link_changed = on_link_changed};
  char errbuf[512] = "";
  std::string target_s(target), options_s(options);
  core::veth_open_params p{.target = target_s.c_str(), .options = options_s.c_str(), .mac = mac_.data(),
                           .mtu = opts.mtu, .nqueues = opts.nqueues, .host = &host_, .errbuf = errbuf,
                           .errbuf_len = sizeof errbuf};
  if (int rc = ops_.open(&p, &handle_); rc < 0) {
    handle_ = nullptr;
    return core::fail(-rc, transport_ + ":" + target_s + ": " + (errbuf[0] ? errbuf : "open failed"));
  }
  if (int rc = ops_.caps(handle_, &caps_); rc < 0) return core::fail(-rc, transport_ + ": caps failed");
  if (caps_.min_mtu == 0) caps_.min_mtu = eth_min_mtu;
  if (caps_.max_mtu < caps_.min_mtu) return core::fail(EPROTO, transport_ + ": transport reports no usable MTU");
  if (opts.mtu < caps_.min_mtu || opts.mtu > caps_.max_mtu)
    return core::fail(EINVAL, "MTU " + std::to_string(opts.mtu) + " is outside what " + transport_ + " carries (" +
                                  std::to_string(caps_.min_mtu) + ".." + std::to_string(caps_.max_mtu) + ")");
  // A transport that segments must also checksum: drop the contradiction.
  if ((caps_.features & core::VETH_F_TSO) && !(caps_.features & core::VETH_F_TX_CSUM))
    caps_.features &= ~uint64_t(core::VETH_F_TSO);
  nqueues_ = std::clamp<uint32_t>(caps_.nqueues, 1, opts.nqueues);
  if (ops_.link_state) {
    int ls = ops_.link_state(handle_);
    if (ls >= 0) carrier_ = ls == 1;
  }

  rx_buf_len_ = max_frame_for_mtu(caps_.max_mtu);
  if (caps_.features & core::VETH_F_TSO) rx_buf_len_ = std::max(rx_buf_len_, gso_max_frame);
  for (uint32_t i = 0; i < nqueues_; ++i) {
    rxq_[i]->buf.reset(new uint8_t[size_t(rx_buf_len_) * rx_budget_]);
    auto& t = *txq_[i];
    t.desc.resize(tx_batch_max);
    t.ptrs.resize(tx_batch_max);
    if (!(caps_.features & core::VETH_F_TSO)) {
      t.arena_len = gso_max_frame + gso_max_segs * 256;
      t.arena.reset(new uint8_t[t.arena_len]);
      t.backlog.reserve(gso_max_segs);
    }
  }
  spdlog::debug("veth {}:{} open: mac {} mtu {} ({}..{}) queues {} features {:#x}", transport_, target_,
                mac_.to_string(), mtu(), caps_.min_mtu, caps_.max_mtu, nqueues_, caps_.features);
  return core::ok();
}

Veth::~Veth() {
  if (handle_) ops_.close(handle_);
  if (event_fd_ >= 0) ::close(event_fd_);
}

void Veth::signal() noexcept {
  if (event_pending_.exchange(true, std::memory_order_acq_rel)) return;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t r = ::write(event_fd_, &one, sizeof one);
}

void Veth::clear_events() noexcept {
  // Only a signal() since the last clear wrote the eventfd: skip the syscall otherwise.
  if (!event_pending_.exchange(false, std::memory_order_acq_rel)) return;
  uint64_t v;
  [[maybe_unused]] ssize_t r = ::read(event_fd_, &v, sizeof v);
}

void Veth::on_rx_ready(void* owner, uint32_t q) {
  auto* v = static_cast<Veth*>(owner);
  if (q < v->rxq_.size()) v->rxq_[q]->scheduled.store(true, std::memory_order_release);
  v->signal();  // at most one eventfd write until the owner clears events
}

void Veth::on_tx_done(void* owner, uint32_t q) {
  auto* v = static_cast<Veth*>(owner);
  if (q < v->txq_.size() && v->txq_[q]->stopped.exchange(false, std::memory_order_acq_rel))
    veth_queue_counters::add(v->txq_[q]->st.tx_queue_wakes);
  v->signal();
}

void Veth::on_link_changed(void* owner, int up) {
  auto* v = static_cast<Veth*>(owner);
  bool was = v->carrier_.exchange(up != 0);
  if (was != (up != 0))
    spdlog::info("veth {}:{}: link {}", v->transport_, v->target_, up ? "up" : "down");
  v->signal();
}

int Veth::rx_fd(uint32_t q) const noexcept {
  if (!ops_.rx_fd || q >= nqueues_) return -1;
  return ops_.rx_fd(handle_, q);
}

bool Veth::rx_pending(uint32_t q) const noexcept {
  return rxq_[q]->scheduled.load(std::memory_order_acquire) || rxq_[q]->last_full;
}

void Veth::stop_queue(txq& t) {
  if (!t.stopped.exchange(true, std::memory_order_acq_rel)) {
    t.stopped_at = std::chrono::steady_clock::now();
    veth_queue_counters::add(t.st.tx_queue_stops);
  }
}

void Veth::watchdog() {
  auto now = std::chrono::steady_clock::now();
  for (uint32_t q = 0; q < nqueues_; ++q) {
    auto& t = tq(q);
    if (!t.stopped.load(std::memory_order_acquire) || now - t.stopped_at < tx_timeout_) continue;
    veth_queue_counters::add(t.st.tx_timeouts);
    spdlog::warn("veth {}:{}: tx queue {} stopped for over {} ms: resetting", transport_, target_, q,
                 tx_timeout_.count());
    if (ops_.tx_timeout) ops_.tx_timeout(handle_, q);
    // What the transport never took is lost with the reset; count it.
    veth_queue_counters::add(t.st.tx_dropped, t.backlog.size() - t.backlog_head);
    t.backlog.clear();
    t.backlog_head = 0;
    t.stopped.store(false, std::memory_order_release);
    veth_queue_counters::add(t.st.tx_queue_wakes);
    signal();
  }
}

uint32_t Veth::xmit(uint32_t q, txq& t, veth_frame** fs, uint32_t n) {
  if (n == 0) return 0;
  int rc = ops_.xmit(handle_, q, fs, n);
  if (rc < 0) {
    veth_queue_counters::add(t.st.tx_dropped, n);
    return n;
  }
  uint32_t took = std::min<uint32_t>(static_cast<uint32_t>(rc), n);
  for (uint32_t i = 0; i < took; ++i) veth_queue_counters::add(t.st.tx_bytes, fs[i]->len);
  veth_queue_counters::add(t.st.tx_packets, took);
  if (took < n) stop_queue(t);
  return took;
}

bool Veth::flush_backlog(uint32_t q, txq& t) {
  while (t.backlog_head < t.backlog.size()) {
    uint32_t left = static_cast<uint32_t>(t.backlog.size()) - t.backlog_head;
    uint32_t k = std::min(left, tx_batch_max);
    for (uint32_t i = 0; i < k; ++i) t.ptrs[i] = &t.backlog[t.backlog_head + i];
    uint32_t took = xmit(q, t, t.ptrs.data(), k);
    t.backlog_head += took;
    if (took < k) return false;
  }
  t.backlog.clear();
  t.backlog_head = 0;
  return true;
}

int Veth::check_tx(txq& t, const veth_frame& f, frame_layout* l) {
  if (f.len < eth_min_frame || (!(f.flags & core::VETH_FRAME_GSO) && over_mtu(f, mtu()))) {
    veth_queue_counters::add(t.st.tx_length_errors);
    veth_queue_counters::add(t.st.tx_errors);
    return -EMSGSIZE;
  }
  if (f.flags & (core::VETH_FRAME_CSUM_PARTIAL | core::VETH_FRAME_GSO)) {
    if (int rc = check_offload(f, mtu(), l); rc < 0) {
      veth_queue_counters::add(t.st.tx_offload_errors);
      veth_queue_counters::add(t.st.tx_errors);
      return rc;
    }
  }
  return 0;
}

bool Veth::tx_flush(uint32_t q) {
  if (q >= nqueues_) return true;
  auto& t = tq(q);
  if (t.backlog_head == t.backlog.size()) return true;
  if (!link_up()) {
    veth_queue_counters::add(t.st.tx_dropped, t.backlog.size() - t.backlog_head);
    t.backlog.clear();
    t.backlog_head = 0;
    return true;
  }
  return flush_backlog(q, t);
}

uint32_t Veth::tx_burst(uint32_t q, veth_frame* const* frames, uint32_t n) {
  if (q >= nqueues_ || n == 0) return 0;
  auto& t = tq(q);
  if (t.stopped.load(std::memory_order_acquire)) watchdog();
  if (!link_up()) {
    veth_queue_counters::add(t.st.tx_dropped, n);
    return n;
  }
  if (!flush_backlog(q, t)) return 0;
  const bool hw_csum = caps_.features & core::VETH_F_TX_CSUM;
  const bool hw_tso = caps_.features & core::VETH_F_TSO;
  uint32_t done = 0;  // caller frames taken
  uint32_t batch = 0; // descriptors gathered, caller frames [done, done+batch)
  auto flush = [&]() -> bool {
    // Gathered frames map one to one onto caller frames, some of which were
    // refused (their descriptor has len 0 and is skipped).
    uint32_t k = 0;
    for (uint32_t i = 0; i < batch; ++i)
      if (t.desc[i].len) t.ptrs[k++] = &t.desc[i];
    uint32_t took = xmit(q, t, t.ptrs.data(), k);
    if (took == k) {
      done += batch;
      batch = 0;
      return true;
    }
    // Count caller frames up to the first one not taken.
    uint32_t seen = 0, i = 0;
    for (; i < batch; ++i) {
      if (!t.desc[i].len) continue;
      if (seen == took) break;
      ++seen;
    }
    done += i;
    batch = 0;
    return false;
  };
  for (uint32_t i = 0; i < n; ++i) {
    if (batch == tx_batch_max && !flush()) return done;
    veth_frame f = *frames[i];
    frame_layout l;
    if (check_tx(t, f, &l) < 0) {
      t.desc[batch++] = veth_frame{};  // refused: taken, never sent
      continue;
    }
    if ((f.flags & core::VETH_FRAME_GSO) && !hw_tso) {
      if (!flush()) return done;
      int nseg = gso_segment(f, l, t.arena.get(), t.arena_len, t.desc.data(), tx_batch_max);
      if (nseg < 0) {
        veth_queue_counters::add(t.st.tx_offload_errors);
        veth_queue_counters::add(t.st.tx_errors);
        ++done;
        continue;
      }
      veth_queue_counters::add(t.st.tx_sw_gso);
      for (int s = 0; s < nseg; ++s) t.ptrs[s] = &t.desc[s];
      uint32_t took = xmit(q, t, t.ptrs.data(), static_cast<uint32_t>(nseg));
      ++done;  // accepted: what the transport did not take waits in the backlog
      if (took < static_cast<uint32_t>(nseg)) {
        t.backlog.assign(t.desc.begin() + took, t.desc.begin() + nseg);
        t.backlog_head = 0;
        return done;
      }
      continue;
    }
    if ((f.flags & core::VETH_FRAME_CSUM_PARTIAL) && !hw_csum) {
      finish_csum(f.data, f.len, f.csum_start, f.csum_offset);  // bounds checked above
      f.flags = (f.flags & ~core::VETH_FRAME_CSUM_PARTIAL) | core::VETH_FRAME_CSUM_VALID;
      veth_queue_counters::add(t.st.tx_sw_csum);
    }
    t.desc[batch++] = f;
  }
  if (batch) flush();
  return done;
}

uint32_t Veth::rx_burst(uint32_t q, veth_frame* out, uint32_t budget) {
  if (q >= nqueues_) return 0;
  auto& r = *rxq_[q];
  budget = std::min(budget, rx_budget_);
  // Clear before polling, so an rx_ready that races with this poll re-arms.
  r.scheduled.store(false, std::memory_order_release);
  for (uint32_t i = 0; i < budget; ++i)
    out[i] = veth_frame{.data = r.buf.get() + size_t(i) * rx_buf_len_, .len = rx_buf_len_};
  int rc = ops_.rx_poll(handle_, q, out, budget);
  if (rc <= 0) {
    r.last_full = false;
    if (rc < 0) veth_queue_counters::add(r.st.rx_errors);
    return 0;
  }
  uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(rc), budget);
  r.last_full = n == budget;
  if (!admin_up_.load(std::memory_order_relaxed)) {
    veth_queue_counters::add(r.st.rx_dropped, n);
    return 0;
  }
  const uint32_t cur_mtu = mtu();
  uint32_t k = 0;
  uint64_t bytes = 0;
  for (uint32_t i = 0; i < n; ++i) {
    veth_frame f = out[i];
    if (f.len < eth_min_frame || f.len > rx_buf_len_ || (!(f.flags & core::VETH_FRAME_GSO) && over_mtu(f, cur_mtu))) {
      veth_queue_counters::add(r.st.rx_length_errors);
      veth_queue_counters::add(r.st.rx_errors);
      continue;
    }
    if ((f.flags & (core::VETH_FRAME_CSUM_PARTIAL | core::VETH_FRAME_GSO)) && check_offload(f, cur_mtu, nullptr) < 0) {
      veth_queue_counters::add(r.st.rx_offload_errors);
      veth_queue_counters::add(r.st.rx_errors);
      continue;
    }
    bytes += f.len;
    out[k++] = f;
  }
  veth_queue_counters::add(r.st.rx_packets, k);
  veth_queue_counters::add(r.st.rx_bytes, bytes);
  return k;
}

core::result<void> Veth::set_mac(const mac_addr& m) {
  if (m.is_multicast() || m.is_zero()) return core::fail(EINVAL, "MAC " + m.to_string() + " is not a unicast address");
  std::lock_guard lk(control_mu_);
  if (ops_.set_mac)
    if (int rc = ops_.set_mac(handle_, m.data()); rc < 0)
      return core::fail(-rc, transport_ + ": cannot set MAC " + m.to_string());
  mac_ = m;
  return core::ok();
}

core::result<void> Veth::set_mtu(uint32_t m) {
  if (m < caps_.min_mtu || m > caps_.max_mtu)
    return core::fail(EINVAL, "MTU " + std::to_string(m) + " is outside what " + transport_ + " carries (" +
                                  std::to_string(caps_.min_mtu) + ".." + std::to_string(caps_.max_mtu) + ")");
  std::lock_guard lk(control_mu_);
  if (ops_.set_mtu)
    if (int rc = ops_.set_mtu(handle_, m); rc < 0)
      return core::fail(-rc, transport_ + ": cannot set MTU " + std::to_string(m));
  mtu_ = m;
  return core::ok();
}

core::result<void> Veth::set_admin_up(bool up) {
  std::lock_guard lk(control_mu_);
  if (ops_.set_link)
    if (int rc = ops_.set_link(handle_, up ? 1 : 0); rc < 0)
      return core::fail(-rc, transport_ + ": cannot set link " + (up ? "up" : "down"));
  admin_up_ = up;
  signal();
  return core::ok();
}

veth_counters Veth::stats() const {
  veth_counters s;
  for (uint32_t i = 0; i < rxq_.size(); ++i) rxq_[i]->st.add_to(s);
  for (uint32_t i = 0; i < txq_.size(); ++i) txq_[i]->st.add_to(s);
  if (ops_.stats) {
    core::veth_stats_extra x{};
    if (ops_.stats(handle_, &x) == 0) {
      s.rx_dropped += x.rx_dropped;
      s.rx_errors += x.rx_errors;
      s.tx_dropped += x.tx_dropped;
      s.tx_errors += x.tx_errors;
    }
  }
  return s;
}

}  // namespace uvd::net
