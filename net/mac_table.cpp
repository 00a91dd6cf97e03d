// SPDX-License-Identifier: Apache-2.0
#include "net/mac_table.hpp"

namespace uvd::net {

void mac_table::learn(const mac_addr& src, uint32_t port, clock::time_point now) {
  auto it = map_.find(src.key());
  if (it != map_.end()) {
    it->second = entry{port, now};
    return;
  }
  if (map_.size() >= capacity_) {
    ++full_misses_;
    return;
  }
  map_.emplace(src.key(), entry{port, now});
}

uint32_t mac_table::lookup(const mac_addr& dst, clock::time_point now) const {
  auto it = map_.find(dst.key());
  if (it == map_.end() || now - it->second.seen > ageing_) return no_port;
  return it->second.port;
}

size_t mac_table::age(clock::time_point now) {
  size_t n = 0;
  for (auto it = map_.begin(); it != map_.end();) {
    if (now - it->second.seen > ageing_) {
      it = map_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

void mac_table::forget_port(uint32_t port) {
  for (auto it = map_.begin(); it != map_.end();) {
    if (it->second.port == port)
      it = map_.erase(it);
    else
      ++it;
  }
}

}  // namespace uvd::net
