// SPDX-License-Identifier: Apache-2.0
#pragma once
// A test transport standing for the connection between a client and a back
// end that holds a real device (here a COW device in this process): it
// forwards every request, and the fence, to that device. Cutting it is what a
// client sees when the server process dies: new requests and the fence fail
// with ECONNRESET at once, and the answers of requests already handed to the
// device are lost (ECONNRESET) although the device still runs them, as a
// killed server's writes still sitting in the kernel may land.
//
// It can also hold writes that start in [hold_lo, hold_hi) back until the
// test releases them: a request delayed between two of its steps, e.g. a COW
// device's bitmap update after its data is durable.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/vstore_ops.hpp"
#include "storage/vstore.hpp"

namespace uvd::test {

// The open's context (Vstore::open(cut_link_ops, name, opts, nullptr, &link)).
// It must outlive the device opened over it.
struct cut_link {
  std::unique_ptr<storage::Vstore> inner;
  std::atomic<bool> cut{false};
  std::atomic<uint64_t> hold_lo{0}, hold_hi{0};

  size_t held_count();
  // Hands every held write on to the device (all must be released before
  // the link's device is closed).
  void release_held();

  std::mutex mu;
  std::vector<storage::vstore_io*> held;
};

extern const core::vstore_ops cut_link_ops;

}  // namespace uvd::test
