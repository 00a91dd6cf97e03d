// SPDX-License-Identifier: Apache-2.0
#pragma once
// Joins two Veths back to back, frames both ways: what `uvd veth` runs to
// export a front end to the kernel (front: the daemon socket to the switch;
// host: a TAP interface). NAPI-style: each queue is polled with a budget in
// turn; a destination queue that stops holds its frames in the source's rx
// buffers (back-pressure: the source is not polled again until they are
// taken). The front's link state is shown on the host side (TAP carrier).
#include <chrono>
#include <cstdint>

#include "core/result.hpp"
#include "net/veth.hpp"

namespace uvd::net {

struct pump_options {
  uint32_t budget = 64;
  bool follow_link = true;  // host is administratively up exactly while front has carrier
};

// Runs until stop_fd is readable (an eventfd or signalfd), in this thread.
core::result<void> pump(Veth& front, Veth& host, int stop_fd, const pump_options& o = {});

}  // namespace uvd::net
