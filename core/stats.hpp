// SPDX-License-Identifier: Apache-2.0
#pragma once
// Per-device statistics: relaxed atomic counters bumped on the data path and
// a plain snapshot for reporting.
#include <atomic>
#include <cstdint>
#include <string>

namespace uvd::core {

struct vstore_counters {
  uint64_t reads = 0, writes = 0, flushes = 0, discards = 0, write_zeroes = 0;
  uint64_t read_bytes = 0, write_bytes = 0;
  uint64_t errors = 0;          // requests completed with an error
  uint64_t rejected = 0;        // refused by validation before reaching the transport
  uint64_t splits = 0;          // extra transport requests made by splitting
  uint64_t emulated = 0;        // ops the front half emulated (FUA, write-zeroes)
  uint64_t queue_full = 0;      // times a request waited for a free slot
  uint64_t max_in_flight = 0;

  std::string to_string() const;
};

class vstore_stats {
 public:
  void add_op(uint16_t opcode, uint64_t bytes) noexcept;
  void add(std::atomic<uint64_t>& c, uint64_t n = 1) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
  void note_in_flight(uint64_t n) noexcept;
  vstore_counters snapshot() const noexcept;

  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, discards{0}, write_zeroes{0};
  std::atomic<uint64_t> read_bytes{0}, write_bytes{0};
  std::atomic<uint64_t> errors{0}, rejected{0}, splits{0}, emulated{0}, queue_full{0}, max_in_flight{0};
};

}  // namespace uvd::core
