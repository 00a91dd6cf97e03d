// SPDX-License-Identifier: Apache-2.0
#pragma once
// The learning table of the switch: MAC -> port, with ageing. Bounded: when
// full, new addresses are not learnt (their frames flood) and counted.
#include <chrono>
#include <cstdint>
#include <unordered_map>

#include "net/eth.hpp"

namespace uvd::net {

class mac_table {
 public:
  using clock = std::chrono::steady_clock;
  static constexpr uint32_t no_port = UINT32_MAX;

  explicit mac_table(size_t capacity = 4096, std::chrono::seconds ageing = std::chrono::seconds(300))
      : capacity_(capacity), ageing_(ageing) {
    map_.reserve(capacity);
  }
  // Learns (or refreshes, or moves) src on port.
  void learn(const mac_addr& src, uint32_t port, clock::time_point now);
  // The port dst was last seen on, or no_port when unknown or aged out.
  uint32_t lookup(const mac_addr& dst, clock::time_point now) const;
  // Drops entries older than the ageing time.
  size_t age(clock::time_point now);
  // Drops every entry on a port (it went away).
  void forget_port(uint32_t port);
  size_t size() const { return map_.size(); }
  uint64_t full_misses() const { return full_misses_; }
  void set_ageing(std::chrono::seconds s) { ageing_ = s; }

 private:
  struct entry {
    uint32_t port;
    clock::time_point seen;
  };
  std::unordered_map<uint64_t, entry> map_;
  size_t capacity_;
  std::chrono::seconds ageing_;
  uint64_t full_misses_ = 0;
};

}  // namespace uvd::net
