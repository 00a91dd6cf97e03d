// SPDX-License-Identifier: Apache-2.0
#include "core/stats.hpp"

#include <fmt/format.h>

#include "core/vstore_ops.hpp"

namespace uvd::core {

void vstore_stats::add_op(uint16_t opcode, uint64_t bytes) noexcept {
  switch (opcode) {
    case VSTORE_OP_READ: add(reads); add(read_bytes, bytes); break;
    case VSTORE_OP_WRITE: add(writes); add(write_bytes, bytes); break;
    case VSTORE_OP_FLUSH: add(flushes); break;
    case VSTORE_OP_DISCARD: add(discards); break;
    case VSTORE_OP_WRITE_ZEROES: add(write_zeroes); break;
    default: break;
  }
}

void vstore_stats::note_in_flight(uint64_t n) noexcept {
  uint64_t cur = max_in_flight.load(std::memory_order_relaxed);
  while (n > cur && !max_in_flight.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
  }
}

vstore_counters vstore_stats::snapshot() const noexcept {
  auto r = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  vstore_counters c;
  c.reads = r(reads); c.writes = r(writes); c.flushes = r(flushes); c.discards = r(discards);
  c.write_zeroes = r(write_zeroes); c.read_bytes = r(read_bytes); c.write_bytes = r(write_bytes);
  c.errors = r(errors); c.rejected = r(rejected); c.splits = r(splits); c.emulated = r(emulated);
  c.queue_full = r(queue_full); c.max_in_flight = r(max_in_flight);
  return c;
}

std::string vstore_counters::to_string() const {
  return fmt::format(
      "reads={} ({} bytes) writes={} ({} bytes) flushes={} discards={} write_zeroes={} errors={} rejected={} "
      "splits={} emulated={} queue_full={} max_in_flight={}",
      reads, read_bytes, writes, write_bytes, flushes, discards, write_zeroes, errors, rejected, splits, emulated,
      queue_full, max_in_flight);
}

}  // namespace uvd::core
