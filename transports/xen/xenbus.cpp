// SPDX-License-Identifier: Apache-2.0
#include "transports/xen/xenbus.hpp"

#include <poll.h>

#include <algorithm>
#include <chrono>

namespace uvd::xen {

namespace {

using clock_type = std::chrono::steady_clock;

// Sleeps on the watch fd until an event or the deadline (at most 100 ms at a
// time, so a missed event costs little). False when the deadline passed.
core::result<bool> sleep_on_watch(store& s, clock_type::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now()).count();
  if (left <= 0) return false;
  pollfd p{s.watch_fd(), POLLIN, 0};
  (void)::poll(&p, 1, static_cast<int>(std::min<long long>(left, 100)));
  if (!drain_watches(s)) return core::fail(EPIPE, "store connection lost");
  return true;
}

}  // namespace

bool drain_watches(store& s) {
  for (;;) {
    auto ev = s.read_watch();
    if (!ev) return false;
    if (!*ev) return true;
  }
}

core::result<int> wait_state(store& s, const std::string& dir, bool (*pred)(int), uint32_t timeout_ms,
                             const char* what) {
  auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto st = read_state(s, dir);
    if (st && pred(*st)) return *st;
    auto more = sleep_on_watch(s, deadline);
    if (!more) return core::fail(std::move(more).err());
    if (!*more)
      return core::fail(ETIMEDOUT, dir + " did not reach " + what + " (state " +
                                       (st ? state_name(*st) : st.err().what()) + ")");
  }
}

core::result<void> wait_value(store& s, const std::string& path, const std::string& value, uint32_t timeout_ms) {
  auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto v = s.read(no_txn, path);
    if (v && *v == value) return core::ok();
    auto more = sleep_on_watch(s, deadline);
    if (!more) return core::fail(std::move(more).err());
    if (!*more) return core::fail(ETIMEDOUT, path + " did not become " + value);
  }
}

}  // namespace uvd::xen
