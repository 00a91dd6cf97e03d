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
// device refuses further writes (EIO) until it is reopened; reads go on.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
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
  void submit_flush();
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
  std::atomic<int> broken_{0};

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
