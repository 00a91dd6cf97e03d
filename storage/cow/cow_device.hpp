// SPDX-License-Identifier: Apache-2.0
#pragma once
// The COW data path behind cow_vstore_ops (private to storage/cow).
//
// Every request runs as a small state machine in its vstore_req::ctx, driven
// by the completions of its child ios on the base and the overlay; no thread
// of its own, no allocation per I/O.
//
//   READ   split into runs of blocks with one source (overlay where the bit is
//          set, else base); one child read per run, runs one after another.
//   WRITE / WRITE_ZEROES / DISCARD (a discarded range reads back as zeros):
//     claim  every unallocated block touched is claimed in an in-flight table;
//            a block another request is allocating makes this one wait (blocks
//            are claimed in ascending order, so waits cannot deadlock)
//     copy   a partially covered claimed block (only the first and the last can
//            be) is read from the base into a bounce block and merged
//     data   one contiguous overlay write for the rest (block i lives at
//            data_offset + i * block_size) plus one per bounce block
//     sync   group commit: one overlay flush for every request waiting
//     bitmap bits of the claimed blocks, batched across requests, one write
//            per run of dirty bitmap pages; then sync (group commit again)
//     ack    bits become visible to readers, claims are released, completion
//   FLUSH  waits for one overlay flush (every acknowledged write already is durable).
//
// A failed bitmap write or bitmap sync leaves the media state unknown, so the
// device refuses further writes (EIO) until it is reopened or fenced; reads go on.
//
// Fencing (cow_fence.cpp). Every child io on the overlay carries the epoch of
// the request it serves (vstore_req::epoch); flushes and bitmap writes, which
// serve a batch, carry the batch's newest. A fenced overlay store (the file
// transport with fence=1) therefore refuses every step of a request of an
// older epoch, a late bitmap update included. Base reads carry none: the base
// is read-only and shared. fence(e) closes a gate (new requests wait in it,
// submit() never blocks), advances the overlay store's epoch, waits for the
// device's own requests to end (their next overlay step is refused at once),
// re-reads and validates the header and bitmap, and reopens the gate: the
// metadata another process (or device) wrote under the older epoch is now the
// device's. A request carrying a nonzero epoch older than the last fence is
// refused here (ESTALE) before it reaches a store. A bitmap write or sync
// refused with ESTALE did not run: the device refuses writes (ESTALE) until
// the next fence reloads the bitmap.
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "core/result.hpp"
#include "core/vstore_ops.hpp"
#include "storage/cow/cow_format.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage {

// Most iovecs in one COW request (the front half splits longer ones).
inline constexpr uint32_t cow_max_segments = 64;

class cow_device {
 public:
  // Validates the overlay held by `overlay` and checks that `base` is the base
  // it was made from. host is the completion path of the front half above.
  static core::result<std::unique_ptr<cow_device>> make(std::shared_ptr<Vstore> base, std::unique_ptr<Vstore> overlay,
                                                        bool read_only, const core::vstore_host* host);
  ~cow_device();
  cow_device(const cow_device&) = delete;
  cow_device& operator=(const cow_device&) = delete;

  int info(core::vstore_info* out) const;
  static size_t ctx_size();
  int submit(core::vstore_req* const* reqs, uint32_t n);
  // vstore_ops::fence: epoch 0 queries the overlay store's epoch; otherwise
  // advances it and reloads the metadata. ENOTSUP when the overlay store
  // cannot fence. Thread-safe; blocks the caller only.
  int fence(uint32_t epoch);

 private:
  struct request;
  struct req_list {
    request* head = nullptr;
    request* tail = nullptr;
    bool empty() const { return head == nullptr; }
    void push(request* r);
    void append(req_list& other);
    req_list take() {
      req_list out = *this;
      head = tail = nullptr;
      return out;
    }
  };
  struct free_deleter {
    void operator()(std::byte* p) const;
  };

  cow_device() = default;

  bool allocated(uint64_t block) const noexcept;
  bool claimed(uint64_t block) const noexcept;
  bool covers(uint64_t off, uint64_t end, uint64_t block) const noexcept;
  void complete(request* r, int status);
  void start_list(request* head);
  static uint32_t newest_epoch(const request* head) noexcept;
  static uint64_t length(const request* head) noexcept;

  // Fencing (cow_fence.cpp).
  void gate_close();
  bool gate_drain();
  void gate_open();
  int reload(uint32_t epoch);
  core::result<void> read_overlay(uint64_t offset, std::byte* buf, uint64_t length, uint32_t epoch);
  void load_visible(std::span<const std::byte> bitmap);

  // Reads.
  Vstore* read_prepare(request* r);
  static bool read_settle(request* r);
  void read_continue(request* r);
  static void on_read_done(vstore_io* io, int status);

  // Writes, write-zeroes, discards.
  void start_write(request* r);
  void claim(request* r);
  void copy_up(request* r);
  void after_copy_up(request* r);
  void write_data(request* r);
  static void on_child_done(vstore_io* io, int status);
  std::byte* get_bounce_locked();
  void finish_writes(req_list list, int status);
  void restart(request* blocked);

  // Group commit of overlay flushes.
  void flush_enqueue(req_list list);
  void submit_flush(uint32_t epoch);
  static void on_flush_done(vstore_io* io, int status);
  void after_sync(request* batch, int status);

  // Batched bitmap updates.
  void bitmap_enqueue(req_list list);
  uint32_t bitmap_launch_locked();
  void submit_bitmap(uint32_t n);
  static void on_bitmap_done(vstore_io* io, int status);

  std::shared_ptr<Vstore> base_;
  std::unique_ptr<Vstore> overlay_;
  cow_header hdr_;
  const core::vstore_host* host_ = nullptr;
  core::vstore_info info_{};
  uint32_t shift_ = 0;
  uint64_t bs_ = 0;
  uint64_t size_ = 0;
  uint64_t blocks_ = 0;

  // Bits readers see: set once a block's data and bit are durable. Written
  // under mu_, read without it.
  std::unique_ptr<std::atomic<uint64_t>[]> visible_;
  std::atomic<int> broken_{0};    // writes fail with it (bitmap state unknown: -EIO, refused: -ESTALE)
  std::atomic<int> dead_{0};      // every request fails with it (metadata could not be reloaded)

  // Fencing: requests admitted past the gate and not yet completed, and the
  // requests that arrived while a fence held the gate closed.
  bool overlay_fences_ = false;
  std::mutex fence_mu_;           // one fence at a time
  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  bool gated_ = false;
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> in_flight_{0};
  std::atomic<uint32_t> fenced_epoch_{0};
  req_list gate_waiting_;

  std::mutex mu_;
  std::vector<uint64_t> claimed_;   // blocks being allocated by an in-flight write
  request* blocked_ = nullptr;      // writes waiting for another's claim (LIFO)
  std::vector<std::byte*> bounce_free_;
  std::vector<std::unique_ptr<std::byte, free_deleter>> bounce_all_;

  // The bitmap as it is (or is being) written to the overlay.
  std::unique_ptr<std::byte, free_deleter> disk_bitmap_;
  std::vector<uint8_t> page_dirty_;
  static constexpr uint32_t max_bitmap_ios = 32;
  vstore_io bm_io_[max_bitmap_ios];
  iovec bm_iov_[max_bitmap_ios];
  std::atomic<uint32_t> bm_outstanding_{0};
  std::atomic<int> bm_status_{0};
  bool bm_busy_ = false;
  req_list bm_waiting_, bm_inflight_;

  vstore_io flush_io_;
  bool flush_busy_ = false;
  req_list flush_waiting_, flush_inflight_;
};

}  // namespace uvd::storage
