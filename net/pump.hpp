// SPDX-License-Identifier: Apache-2.0
#pragma once
// Joins two Veths back to back, frames both ways: what `uvd veth` runs to
// export a front end to the kernel (front: the daemon socket to the switch;
// host: a TAP interface). NAPI-style: each queue is polled with a budget in
// turn; a destination queue that stops holds its frames in the source's rx
// buffers (back-pressure: the source is not polled again until they are
// taken). The front's link state is shown on the host side (TAP carrier).
// With queue_workers, host queues 1.. each get a thread of their own.
#include <chrono>
#include <cstdint>

#include "core/result.hpp"
#include "net/veth.hpp"

namespace uvd::net {

struct pump_options {
  uint32_t budget = 64;
  bool follow_link = true;  // host is administratively up exactly while front has carrier
  // One thread per host queue beyond the first (TAP IFF_MULTI_QUEUE: each
  // queue's reads in their own worker), all feeding the front's tx under a
  // lock. The calling thread keeps host queue 0, the front's rx and the
  // control work.
  bool queue_workers = false;
};

// Runs until stop_fd is readable (an eventfd or signalfd), in this thread.
core::result<void> pump(Veth& front, Veth& host, int stop_fd, const pump_options& o = {});

}  // namespace uvd::net
