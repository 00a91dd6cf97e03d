// SPDX-License-Identifier: Apache-2.0
#pragma once
// net::Veth, the generic virtual NIC front half. Everything common to virtual
// NICs lives here, once, for every transport: the MAC address, the MTU within
// the transport's limits (changeable at run time), administrative link state
// and carrier, rx/tx queues with burst calls, NAPI-style budgeted rx polling,
// transmit back-pressure (a queue stops when the transport is full and wakes
// on tx_done), the tx-timeout watchdog, statistics, frame validation, and
// software checksum and TCP segmentation for transports that lack them.
//
// Threads: each queue's tx side and rx side are each used by one thread at a
// time (they may be different threads). Control calls (set_mtu, set_mac,
// set_admin_up) may come from any thread.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "core/veth_ops.hpp"
#include "net/eth.hpp"
#include "net/offload.hpp"
#include "net/veth_stats.hpp"

namespace uvd::net {

using core::veth_frame;

struct veth_options {
  std::optional<mac_addr> mac;  // default: a random locally administered address
  uint32_t mtu = 1500;
  uint32_t nqueues = 1;         // asked for; the transport may give fewer
  uint32_t rx_budget = 64;      // rx buffers per queue, the largest poll budget
  std::chrono::milliseconds tx_timeout{5000};
  std::string options;          // extra transport options "k=v&k=v", appended to the URI's
};

class Veth {
 public:
  // Open by URI ("loop:", "tap:uvd0?offload=1", "daemon:///run/uvd/switch.sock").
  static core::result<std::unique_ptr<Veth>> open(core::registry& reg, std::string_view uri,
                                                  const veth_options& opts = {});
  // Open with an ops table in hand.
  static core::result<std::unique_ptr<Veth>> open(const core::veth_ops& ops, std::string_view target,
                                                  const veth_options& opts);
  ~Veth();
  Veth(const Veth&) = delete;
  Veth& operator=(const Veth&) = delete;

  // ---- data path ----

  // Transmit a burst on queue q. Returns how many frames were taken (from the
  // front). Fewer than n means the transport is full: the queue stops, and
  // event_fd() fires when it wakes; the caller keeps the rest. Taken frames
  // are the front half's from then on (sent, or dropped and counted): frames
  // over the MTU, runts, bad offload metadata, and everything while the link
  // is down. May fill a CSUM_PARTIAL checksum in the caller's buffer.
  uint32_t tx_burst(uint32_t q, veth_frame* const* frames, uint32_t n);
  uint32_t tx_burst(uint32_t q, veth_frame* f) { return tx_burst(q, &f, 1); }
  bool tx_stopped(uint32_t q) const noexcept { return tq(q).stopped.load(std::memory_order_acquire); }
  // Pushes segments of an accepted GSO frame that the transport had no room
  // for (software segmentation only). Call after a wake; tx_burst does it
  // first too. True when nothing is left waiting.
  bool tx_flush(uint32_t q);
  bool tx_backlogged(uint32_t q) const noexcept { return tq(q).backlog_head < tq(q).backlog.size(); }

  // Budgeted receive on queue q: up to budget (at most rx_budget) good frames
  // into out. Their data lives in the Veth's rx buffers for queue q and stays
  // valid until the next rx_burst on q. Bad frames are dropped and counted.
  uint32_t rx_burst(uint32_t q, veth_frame* out, uint32_t budget);
  // NAPI: true while queue q may have more (the transport said so, or the
  // last poll used its whole budget); poll again before sleeping.
  bool rx_pending(uint32_t q) const noexcept;

  // Readable when an rx_ready, tx_done or link change arrived; drain with clear_events().
  int event_fd() const noexcept { return event_fd_; }
  void clear_events() noexcept;
  // The transport's own readiness fd for queue q (e.g. the tap fd), or -1.
  int rx_fd(uint32_t q) const noexcept;

  // The tx watchdog: a queue stopped for longer than tx_timeout is reset (the
  // transport's tx_timeout op) and restarted. tx_burst runs it too; a caller
  // whose queue is stopped should call it at least once per tx_timeout.
  // Call from the queue's tx thread.
  void watchdog();

  // ---- control ----
  const mac_addr& mac() const noexcept { return mac_; }
  core::result<void> set_mac(const mac_addr& m);
  uint32_t mtu() const noexcept { return mtu_.load(std::memory_order_relaxed); }
  uint32_t min_mtu() const noexcept { return caps_.min_mtu; }
  uint32_t max_mtu() const noexcept { return caps_.max_mtu; }
  core::result<void> set_mtu(uint32_t mtu);
  // Link is up when the administrator says so and the transport has carrier.
  bool link_up() const noexcept { return admin_up_.load(std::memory_order_relaxed) && carrier(); }
  bool carrier() const noexcept { return carrier_.load(std::memory_order_relaxed); }
  bool admin_up() const noexcept { return admin_up_.load(std::memory_order_relaxed); }
  core::result<void> set_admin_up(bool up);
  uint32_t nqueues() const noexcept { return nqueues_; }
  uint64_t features() const noexcept { return caps_.features; }
  const std::string& transport_name() const noexcept { return transport_; }
  const std::string& target() const noexcept { return target_; }

  veth_counters stats() const;

 private:
  struct rxq {
    std::unique_ptr<uint8_t[]> buf;
    std::atomic<bool> scheduled{true};
    bool last_full = false;
    veth_queue_counters st;
  };
  struct txq {
    std::atomic<bool> stopped{false};
    std::chrono::steady_clock::time_point stopped_at{};
    std::vector<veth_frame> desc;       // per-burst copies of the caller's descriptors
    std::vector<veth_frame*> ptrs;
    std::unique_ptr<uint8_t[]> arena;   // software GSO output
    uint32_t arena_len = 0;
    std::vector<veth_frame> backlog;    // segments the transport has not taken yet
    uint32_t backlog_head = 0;
    veth_queue_counters st;
  };

  Veth() = default;
  core::result<void> init(const core::veth_ops& ops, std::string_view target, const std::string& options,
                          const veth_options& opts);
  static void on_rx_ready(void* owner, uint32_t q);
  static void on_tx_done(void* owner, uint32_t q);
  static void on_link_changed(void* owner, int up);
  void signal() noexcept;
  void stop_queue(txq& t);
  // Hands descs to the transport; returns how many it took (a negative return is all dropped).
  uint32_t xmit(uint32_t q, txq& t, veth_frame** fs, uint32_t n);
  bool flush_backlog(uint32_t q, txq& t);
  // 0 ok; else the frame is refused and counted.
  int check_tx(txq& t, const veth_frame& f, frame_layout* l);

  core::veth_ops ops_{};
  void* handle_ = nullptr;
  core::veth_caps caps_{};
  core::veth_host host_{};
  std::string transport_, target_;
  mac_addr mac_{};
  std::atomic<uint32_t> mtu_{1500};
  std::atomic<bool> admin_up_{true};
  std::atomic<bool> carrier_{true};
  uint32_t nqueues_ = 0;
  uint32_t rx_budget_ = 64;
  uint32_t rx_buf_len_ = 0;
  std::chrono::milliseconds tx_timeout_{5000};
  std::vector<std::unique_ptr<rxq>> rxq_;
  std::vector<std::unique_ptr<txq>> txq_;
  std::mutex control_mu_;
  int event_fd_ = -1;
  std::atomic<bool> event_pending_{false};

  txq& tq(uint32_t q) const noexcept { return *txq_[q]; }
};

}  // namespace uvd::net
