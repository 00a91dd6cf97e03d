// SPDX-License-Identifier: Apache-2.0
#pragma once
// xenbus steps every front end repeats (built on hv.hpp).
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "core/result.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

// Waits until dir/state satisfies pred and returns that state. The caller has
// a watch on dir/state (or above it) on s, whose events wake the wait.
core::result<int> wait_state(store& s, const std::string& dir, bool (*pred)(int), uint32_t timeout_ms,
                             const char* what);

// Waits until path reads `value` (same watch rule).
core::result<void> wait_value(store& s, const std::string& path, const std::string& value, uint32_t timeout_ms);

// Drains every queued watch event; false if the store connection is gone.
bool drain_watches(store& s);

// The thread of a back end's control plane (blkback, netback): it runs `pass`
// at start, after store watch events and kicks, and at least every 200 ms, so
// a ring the data path found broken is noticed even while the store is quiet.
class backend_loop {
 public:
  backend_loop() = default;
  backend_loop(const backend_loop&) = delete;
  backend_loop& operator=(const backend_loop&) = delete;
  ~backend_loop();

  core::result<void> start(store& s, std::function<void()> pass);
  void kick();
  // Returns once the thread has ended (its last pass finished); idempotent.
  void stop();

 private:
  void run(store& s);

  int stop_fd_ = -1, kick_fd_ = -1;
  std::function<void()> pass_;
  std::thread thread_;
};

}  // namespace uvd::xen
