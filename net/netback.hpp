// SPDX-License-Identifier: Apache-2.0
#pragma once
// net::Netback, the back half of the network side: a learning Ethernet switch
// between ports (front ends over any transport, TAP uplinks into the host).
//   - MAC learning with ageing; broadcast, multicast and unknown unicast flood
//   - every frame a port sends is checked: runts, frames over the port's MTU,
//     VLAN tags on access ports, and source MACs the port does not own are
//     dropped and counted per port
//   - a credit-based rate limiter per port ("x bytes every y microseconds")
//     on what the port sends into the switch; the loop serves ports round
//     robin, each with a budget, skipping ports without credit (their frames
//     wait in their own queues: back-pressure, not loss)
//   - frames leave whole (GSO, partial checksums) to ports that take
//     offloads, and are finished in software for ports that do not
// One thread runs the switch (run()); stop() may come from any thread.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/result.hpp"
#include "net/mac_table.hpp"
#include "net/port.hpp"
#include "net/rate_limiter.hpp"

namespace uvd::net {

class Netback;

// Something that makes ports (a listening socket): its fd wakes the switch,
// service() accepts and calls add_port.
class port_source {
 public:
  virtual ~port_source() = default;
  virtual int fd() const = 0;
  virtual void service(Netback& nb) = 0;
};

struct rate_limit {
  uint64_t bytes = 0;
  std::chrono::microseconds interval{0};
};
// "12500/1000" (bytes/microseconds) or "100mbit" (per 1 ms); errors name the text.
core::result<rate_limit> parse_rate_limit(std::string_view text);

struct netback_options {
  std::chrono::seconds ageing{300};
  uint32_t budget = 64;           // frames per port per round
  size_t mac_table_size = 4096;
};

class Netback {
 public:
  static core::result<std::unique_ptr<Netback>> create(const netback_options& opts = {});
  ~Netback();
  Netback(const Netback&) = delete;
  Netback& operator=(const Netback&) = delete;

  // Takes a port; returns its id. Only from the switch thread, or before run().
  uint32_t add_port(std::unique_ptr<port> p, std::optional<rate_limit> limit = std::nullopt);
  void add_source(std::unique_ptr<port_source> s);

  // Switches frames until stop(). Returns early only on an epoll failure.
  core::result<void> run();
  // One round: wait at most timeout for work, then serve every ready port once.
  core::result<void> run_once(std::chrono::milliseconds timeout);
  void stop();

  // "port <id> name=... rx_frames=..." lines, then a "total" line that also
  // counts ports that have gone. From the switch thread (or when stopped).
  std::string stats_text() const;
  port_stats totals() const;
  size_t port_count() const;
  const mac_table& macs() const { return macs_; }

 private:
  struct slot;
  Netback() = default;
  void serve_port(slot& s, uint32_t id, rate_limiter::clock::time_point now);
  void throttle(slot& s, rate_limiter::clock::time_point now);
  void forward_one(uint32_t in, slot& src, core::veth_frame& f, rate_limiter::clock::time_point now);
  void deliver(uint32_t out, core::veth_frame* f);
  void flush_port(slot& s);
  void flush_out();
  void remove_dead();
  void watch(slot& s, bool on);

  netback_options opts_;
  int epfd_ = -1;
  int stop_fd_ = -1;
  std::vector<std::unique_ptr<slot>> ports_;  // index = port id; null once gone
  std::vector<std::unique_ptr<port_source>> sources_;
  mac_table macs_;
  port_stats gone_;  // counters of ports that left
  uint32_t rr_ = 0;
  rate_limiter::clock::time_point last_age_{};
  std::unique_ptr<uint8_t[]> seg_arena_;  // software GSO for ports without offloads
  uint32_t seg_arena_len_ = 0;
  bool stopping_ = false;
};

}  // namespace uvd::net
