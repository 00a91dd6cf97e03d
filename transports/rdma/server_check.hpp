// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the storage server checks before it serves one RPC from a client, kept
// apart from the verbs code so that every refusal is unit-tested without an
// RDMA device. Every client is hostile: its handles, ids, offsets, lengths,
// sector ranges, opcodes and epochs are checked against server-side state
// only, after the message was copied out of the receive buffer once.
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/result.hpp"
#include "transports/rdma/protocol.hpp"

namespace uvd::rdma {

// Why an RPC was refused. Each is counted per server.
enum class refusal : uint8_t {
  none = 0,
  malformed,        // bad magic/version/length, body that does not parse
  unknown_opcode,
  not_open,         // I/O before OPEN, OPEN twice
  duplicate_id,     // an id already in flight on this connection
  stale_epoch,      // epoch below the export's current one (fenced)
  bad_handle,       // not a handle this connection was given
  segment_range,    // offset/length outside the segment, or an empty piece
  length_mismatch,  // segment lengths do not add up to the RPC's length
  misaligned,       // offset or length not a multiple of the block size
  sector_range,     // past the end of the export, or too long
  read_only,        // write-class RPC on a read-only export or connection
  bad_flags,
  count_
};
inline constexpr size_t refusal_kinds = static_cast<size_t>(refusal::count_);
const char* refusal_name(refusal r) noexcept;
// The status a refused RPC is answered with.
int refusal_errno(refusal r) noexcept;

struct refusal_counters {
  std::array<std::atomic<uint64_t>, refusal_kinds> n{};
  void add(refusal r) noexcept { n[static_cast<size_t>(r)].fetch_add(1, std::memory_order_relaxed); }
  uint64_t get(refusal r) const noexcept { return n[static_cast<size_t>(r)].load(std::memory_order_relaxed); }
  uint64_t total() const noexcept;
  std::string to_string() const;  // "bad_handle=3 sector_range=1", only nonzero ones
};

// The opaque handles of one client's pool: random 64-bit tokens from the
// kernel's CSPRNG, mapped to segment indexes. Nothing about a token says where
// its segment is, so a forged one is found only by guessing 64 bits.
class handle_table {
 public:
  // n fresh tokens, one per segment (0..n-1); none is 0 or repeated.
  core::result<void> assign(uint32_t n);
  // Segment index of a token this table gave out, or -1.
  int64_t lookup(uint64_t handle) const noexcept;
  uint64_t handle_of(uint32_t segment) const noexcept { return tokens_[segment]; }
  uint32_t size() const noexcept { return static_cast<uint32_t>(tokens_.size()); }
  // Forget every token (the connection ended): later lookups all fail.
  void revoke() noexcept;

 private:
  std::vector<uint64_t> tokens_;
  std::unordered_map<uint64_t, uint32_t> index_;
};

// The export as the checks see it.
struct export_geometry {
  uint64_t size = 0;
  uint32_t block_size = 512;
  uint32_t max_transfer = 0;  // longest READ/WRITE in bytes (segments * size caps it too)
  bool read_only = false;
};

// One checked I/O RPC: every segment resolved to (index, offset, length).
struct checked_io {
  uint16_t opcode = 0;
  uint16_t flags = 0;
  uint64_t id = 0;
  uint32_t epoch = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint16_t nseg = 0;
  struct piece {
    uint32_t segment = 0;
    uint32_t offset = 0;
    uint32_t length = 0;
  } segs[max_segs_per_rpc];
};

// Per-connection admission state: the handle table, the ids in flight, and
// whether OPEN happened (and read-only). Not thread-safe: the connection's
// service thread owns it.
class rpc_gate {
 public:
  rpc_gate(uint32_t segment_size, export_geometry geom, bool read_only_conn, handle_table handles)
      : segment_size_(segment_size), geom_(geom), read_only_(read_only_conn || geom.read_only),
        handles_(std::move(handles)) {}

  // Checks an I/O RPC (already decoded) against this connection and the
  // export. epoch_now is the export's current fencing epoch. On success fills
  // out and marks the id in flight (release it with done()).
  refusal check_io(const io_rpc& rpc, uint32_t epoch_now, checked_io* out);
  // A FENCE or other id-bearing RPC: only the id rule applies.
  refusal admit_id(uint64_t id);
  void done(uint64_t id) noexcept { in_flight_.erase(id); }
  size_t in_flight() const noexcept { return in_flight_.size(); }

  const handle_table& handles() const noexcept { return handles_; }
  void revoke() noexcept { handles_.revoke(); }

 private:
  uint32_t segment_size_;
  export_geometry geom_;
  bool read_only_;
  handle_table handles_;
  std::unordered_set<uint64_t> in_flight_;
};

// The fencing epoch of one export, checked under a lock. I/O is admitted only
// with an epoch at or above the current one and is counted until it finishes;
// fence(e) raises the epoch and reports, through fenced(), when every I/O
// admitted under an older epoch has finished: after that no write sent
// through a fenced path can land. Thread-safe.
class epoch_record {
 public:
  uint32_t current() const;
  // Authoritative check: false if epoch is nonzero and older than the current
  // one (nothing counted). Epoch 0 means unfenced and is always admitted.
  bool admit(uint32_t epoch);
  // An admitted I/O finished. Returns the cookies of fences that are now
  // complete (the caller answers them).
  std::vector<uint64_t> finish(uint32_t epoch);
  // Makes `epoch` (> 0) current. -ESTALE if it is not newer (nothing
  // changed); 1 if the fence is complete now; 0 if cookie comes back from a
  // later finish(), once no I/O admitted under an older epoch is in flight.
  int fence(uint32_t epoch, uint64_t cookie);
  // Older-epoch I/O still in flight (for tests and stats).
  uint64_t in_flight_below(uint32_t epoch) const;

 private:
  mutable std::mutex mu_;
  uint32_t epoch_ = 0;
  std::map<uint32_t, uint64_t> in_flight_;  // epoch -> admitted, unfinished I/O
  std::vector<std::pair<uint32_t, uint64_t>> waiters_;  // (fence epoch, cookie)
};

// A stable export identity: a UUID (RFC 9562 version 8, name-based) derived
// from the export's medium identity (vstore_info::id) and its name, so that a
// server restarted over the same image hands out the same UUID.
std::string export_uuid(std::string_view medium_id, std::string_view export_name);
bool looks_like_uuid(std::string_view s) noexcept;

}  // namespace uvd::rdma
