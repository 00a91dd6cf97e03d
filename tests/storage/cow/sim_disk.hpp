// SPDX-License-Identifier: Apache-2.0
#pragma once
// sim_disk: a test-double store with a volatile write cache, for checking the
// order in which a layer above writes and syncs. Writes land in `current` and
// are remembered as unflushed until a FLUSH; power_cut() builds what a disk
// could hold after losing power at this instant: everything flushed, plus any
// subset of the unflushed atoms (the medium's atomic write unit: 4 KiB on SSDs
// and 4Kn disks, 512 bytes on old ones). It can also fail writes to a
// chosen byte range, and call a hook before each request runs.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "storage/vstore.hpp"

namespace uvd::test {

class sim_disk {
 public:
  explicit sim_disk(uint64_t size) : current_(size), durable_(size) {}

  // A Vstore on this disk; the disk must outlive it. Requests complete inline.
  std::unique_ptr<storage::Vstore> open();

  std::vector<std::byte> power_cut(std::mt19937_64& rng, uint64_t atom = 4096);
  std::vector<std::byte> contents();
  void fail_writes(uint64_t lo, uint64_t hi);  // writes touching [lo, hi) fail with EIO
  // Called before each request runs (not under the disk's lock).
  void set_hook(std::function<void()> hook) { hook_ = std::move(hook); }
  uint64_t flushes() const { return flushes_; }

  // The transport side (used by the ops table).
  int execute(const core::vstore_req& req);
  void before_request() {
    if (hook_) hook_();
  }
  uint64_t size() const { return current_.size(); }

 private:
  struct pending {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  std::mutex mu_;
  std::vector<std::byte> current_, durable_;
  std::vector<pending> unflushed_;
  uint64_t fail_lo_ = 0, fail_hi_ = 0;
  uint64_t flushes_ = 0;
  std::function<void()> hook_;
};

}  // namespace uvd::test
