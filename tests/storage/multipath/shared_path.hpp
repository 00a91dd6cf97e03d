// SPDX-License-Identifier: Apache-2.0
#pragma once
// A test transport that is a real, separate back end in-process: each open
// is one "server" with its own descriptor on a shared image file, its own
// worker thread that executes requests, and its own handle on the image's
// fence record (storage/fence), which it honours: every request runs under
// a fence pass for the epoch it carries, and the fence op advances the record.
// Requests cross from the client side to the server as copies (write data is
// copied at submit, as it would be sent), so a request can outlive the
// client's interest in it, and land late.
//
// Faults, set by the test at any time through path_faults (the open's context):
//   fail       every request is answered ECONNRESET at once and dropped
//   fail_late  answered ECONNRESET at once, but the server still holds it and
//              executes it after write_delay_ms (a reply lost, the work not)
//   silent     nothing is answered; requests wait in the server and execute
//              when the fault clears; the client gives up on one after
//              client_timeout_ms (ETIMEDOUT) while the server still holds it
//   closed     submit fails with ENOTCONN, queued requests are dropped
// write_delay_ms makes every write execute that long after it arrived.
// eio_offset: any request touching that byte fails with EIO (a media error).
#include <atomic>
#include <cstdint>

#include "core/vstore_ops.hpp"

namespace uvd::test {

enum class path_fault : int { none = 0, fail, fail_late, silent, closed };

struct path_faults {
  std::atomic<int> mode{0};  // path_fault
  std::atomic<uint32_t> write_delay_ms{0};
  std::atomic<uint32_t> client_timeout_ms{2000};
  std::atomic<uint32_t> fence_timeout_ms{300};
  std::atomic<uint64_t> eio_offset{UINT64_MAX};
  // What the server did.
  std::atomic<uint64_t> executed{0};      // requests run against the image
  std::atomic<uint64_t> writes{0};        // writes run against the image
  std::atomic<uint64_t> refused{0};       // requests refused by the fence (stale epoch)
  std::atomic<uint64_t> late_refused{0};  // of those, ones the client had given up on
  std::atomic<uint64_t> refused_writes{0};  // refused requests that were writes
  std::atomic<uint64_t> fences{0};        // fence advances done through this path

  void set(path_fault f) { mode.store(static_cast<int>(f)); }
  path_fault get() const { return static_cast<path_fault>(mode.load()); }
};

// "shared-path": target is the image file; context a path_faults* (may be null).
extern const core::vstore_ops shared_path_ops;

}  // namespace uvd::test
