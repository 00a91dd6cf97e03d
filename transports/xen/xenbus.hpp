// SPDX-License-Identifier: Apache-2.0
#pragma once
// xenbus steps every front end repeats (built on hv.hpp).
#include <cstdint>
#include <string>

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

}  // namespace uvd::xen
