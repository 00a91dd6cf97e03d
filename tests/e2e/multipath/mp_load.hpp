// SPDX-License-Identifier: Apache-2.0
#pragma once
// A continuous, verified block workload for failover tests. Every write puts a
// self-describing record into one block: magic, a generation number unique to
// that write, the block number and a checksum of the rest of the block. The
// load keeps the map of what was acknowledged (the newest acknowledged
// generation per block) and checks every read against it while it runs, so a
// lost write, a stale block (an older generation over a newer one: a late
// write landing after failover), a misplaced or a torn block is caught at once
// or in the final sweep. Only one request per block is in flight at a time, so
// the expected content of a block is always known exactly; a write that
// completed with an error leaves the block "either the old or that one".
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "storage/vstore.hpp"

namespace uvd::test {

struct load_options {
  uint32_t block_size = 4096;
  uint64_t blocks = 512;      // the working set: blocks 0..blocks-1 of the device
  uint32_t queue_depth = 16;  // requests in flight at once
  uint32_t write_percent = 50;
  uint64_t seed = 1;
};

using load_clock = std::chrono::steady_clock;

// The record in a block, as written by the load.
struct block_record {
  uint64_t gen = 0;
  uint64_t block = 0;
};

// Fills buf (one block) with the record of write `gen` to `block`.
void make_record(std::span<std::byte> buf, uint64_t gen, uint64_t block);
// Empty when buf is a valid record for `block` (or all zeros: *out.gen == 0),
// else what is wrong with it.
std::string parse_record(std::span<const std::byte> buf, uint64_t block, block_record* out);

class verified_load {
 public:
  verified_load(storage::Vstore& dev, load_options o);
  ~verified_load();  // stop()
  verified_load(const verified_load&) = delete;
  verified_load& operator=(const verified_load&) = delete;

  // Writes every block of the working set once (synchronously, before start):
  // from then on each block's expected content is known exactly, whatever the
  // device held before. false (and errors()) if a write failed.
  bool prefill();
  void start();
  // Stops issuing and waits for every request in flight to complete.
  void stop();

  // Blocks whose writes are in flight now are written again (with newer
  // generations) before any other block: after a failover this makes sure a
  // late copy of a write caught on the failed path would be stale, so its
  // landing could not go unnoticed.
  void rewrite_in_flight();

  uint64_t completions() const { return completions_.load(); }
  uint64_t writes_acked() const { return writes_acked_.load(); }
  uint64_t reads_checked() const { return reads_checked_.load(); }
  uint64_t errors() const { return errors_.load(); }
  std::string last_error() const;
  load_clock::time_point last_completion() const;
  // Verification failures seen so far (capped).
  std::vector<std::string> problems() const;

  // The longest time between two consecutive completions (or a window edge and
  // the nearest completion) within [from, to]: the outage a caller saw.
  struct gap {
    std::chrono::microseconds length{0};
    load_clock::time_point start{};
  };
  gap longest_gap(load_clock::time_point from, load_clock::time_point to) const;

  // After stop(): reads every block of the working set through dev (any
  // device on the same medium) and checks it against the acknowledged map.
  std::vector<std::string> verify_device(storage::Vstore& dev);
  // The same against an image file read with pread (no uvd code on the path).
  std::vector<std::string> verify_image(const std::string& path);

  const load_options& options() const { return o_; }

 private:
  struct lane {
    verified_load* self = nullptr;
    storage::vstore_io io{};
    iovec iov{};
    std::byte* buf = nullptr;
    uint64_t block = 0;
    uint64_t gen = 0;  // of a write; 0 for a read
    int status = 0;
    load_clock::time_point done_at{};
  };
  static void on_done(storage::vstore_io* io, int status);
  void driver();
  void issue_locked(lane& l);
  void finish_locked(lane& l);
  uint64_t pick_block_locked();
  // "" or the problem with block b holding data, updating the map when a
  // write of unknown outcome is resolved.
  std::string check_locked(uint64_t b, std::span<const std::byte> data);
  void problem_locked(std::string p);

  storage::Vstore& dev_;
  load_options o_;
  std::unique_ptr<std::byte[], void (*)(void*)> mem_{nullptr, nullptr};
  std::vector<lane> lanes_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint32_t> done_;      // lanes completed, not processed yet
  std::vector<uint64_t> acked_;     // per block: newest acknowledged generation (0: never written)
  std::vector<std::vector<uint64_t>> maybe_;  // per block: generations of failed writes that may have landed
  std::vector<uint8_t> busy_;       // per block: a request in flight
  std::deque<uint64_t> priority_;   // blocks to write next
  std::vector<load_clock::time_point> stamps_;  // every completion, in order
  std::vector<std::string> problems_;
  std::string last_error_;
  uint64_t next_gen_ = 0;
  uint64_t rng_ = 0;
  uint32_t in_flight_ = 0;
  bool stopping_ = false;
  std::thread thread_;

  std::atomic<uint64_t> completions_{0};
  std::atomic<uint64_t> writes_acked_{0};
  std::atomic<uint64_t> reads_checked_{0};
  std::atomic<uint64_t> errors_{0};
};

}  // namespace uvd::test
