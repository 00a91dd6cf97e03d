// SPDX-License-Identifier: Apache-2.0
#pragma once
// storage::Vstore, the generic virtual disk front half. Everything generic
// lives here, once, for every transport: a request queue with a bounded
// number of in-flight transport requests (the queue depth), a shadow table of
// those requests indexed by tag, bounds/alignment/read-only checks, splitting
// of requests past the transport's limits, emulation of ops the transport
// lacks (write-zeroes, FUA), batching (submit many, notify once) and stats.
#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "core/stats.hpp"
#include "core/vstore_ops.hpp"

namespace uvd::storage {

class Vstore;

// One request from a user of a Vstore. Caller-owned (embed it in your own
// per-request state); it and its buffers must stay valid until done() runs.
// done() is called exactly once per submitted io, from any thread (possibly
// inside submit()); status is 0 or a negative errno.
struct vstore_io {
  uint16_t opcode = core::VSTORE_OP_READ;
  uint16_t flags = 0;  // core::VSTORE_REQ_*
  uint64_t offset = 0;
  uint64_t length = 0;
  const struct iovec* iov = nullptr;
  uint32_t iovcnt = 0;
  uint32_t epoch = 0;  // fencing epoch, carried to the transport (vstore_req::epoch); 0: unfenced
  void (*done)(vstore_io* io, int status) = nullptr;
  void* user = nullptr;

  // Front-half bookkeeping; do not touch.
  struct {
    vstore_io* next = nullptr;   // pending-queue link
    uint64_t cursor = 0;         // bytes of this io already handed to children
    uint32_t outstanding = 0;    // children in flight
    int status = 0;              // first error
    uint8_t phase = 0;           // 0: main op, 1: emulated FUA flush
  } priv;
};

struct open_options {
  uint32_t queue_depth = 64;   // transport requests in flight at once (1..4096)
  bool read_only = false;
  bool direct = false;         // VSTORE_OPEN_DIRECT
  std::string options;         // extra transport options, "k=v&k=v", appended to the URI's
};

class Vstore {
 public:
  // Open by URI ("file:///img", "memory:64M", "cow:///overlay.cow") through a registry.
  static core::result<std::unique_ptr<Vstore>> open(core::registry& reg, std::string_view uri,
                                                    const open_options& opts = {});
  // Open with an ops table already in hand. reg may be null (then stacking
  // layers cannot open their next devices by URI); context reaches the
  // transport's open as vstore_open_params::context.
  static core::result<std::unique_ptr<Vstore>> open(const core::vstore_ops& ops, std::string_view target,
                                                    const open_options& opts, core::registry* reg = nullptr,
                                                    void* context = nullptr);

  // Waits for every submitted io to complete, then releases the transport.
  ~Vstore();
  Vstore(const Vstore&) = delete;
  Vstore& operator=(const Vstore&) = delete;

  // Asynchronous. Each io gets exactly one done(). Invalid ones (range,
  // alignment, EROFS, zero length, too many segments) complete at once with
  // an error; the rest are queued and the transport is notified once per batch.
  void submit(std::span<vstore_io* const> ios);
  void submit(vstore_io* io) { submit(std::span<vstore_io* const>(&io, 1)); }

  // The check submit() applies, for callers that want to refuse early: 0 or -errno.
  int validate(const vstore_io& io) const noexcept;

  // Synchronous helpers built on submit(); they wait for completion.
  core::result<void> read(uint64_t offset, void* buf, uint64_t length);
  core::result<void> write(uint64_t offset, const void* buf, uint64_t length, uint16_t flags = 0);
  core::result<void> readv(uint64_t offset, std::span<const iovec> iov);
  core::result<void> writev(uint64_t offset, std::span<const iovec> iov, uint16_t flags = 0);
  core::result<void> flush();
  core::result<void> discard(uint64_t offset, uint64_t length, uint16_t flags = 0);
  core::result<void> write_zeroes(uint64_t offset, uint64_t length, uint16_t flags = 0);

  // Blocks until nothing is in flight or queued.
  void drain();

  // The transport's fence op (see vstore_ops::fence): synchronous. fence(0)
  // returns the export's current epoch; fence(e) makes e current. ENOTSUP
  // when the transport cannot fence.
  bool can_fence() const noexcept { return ops_.fence != nullptr; }
  core::result<uint32_t> fence(uint32_t epoch);

  const core::vstore_info& info() const noexcept { return info_; }
  uint64_t size() const noexcept { return info_.size; }
  uint32_t block_size() const noexcept { return info_.block_size; }
  bool read_only() const noexcept { return info_.read_only != 0; }
  bool has(uint64_t feature) const noexcept { return (info_.features & feature) != 0; }
  const std::string& transport_name() const noexcept { return transport_; }
  const std::string& target() const noexcept { return target_; }
  uint32_t queue_depth() const noexcept { return static_cast<uint32_t>(slots_.size()); }
  core::vstore_counters stats() const noexcept { return stats_.snapshot(); }

  // Largest iovec count one io may carry.
  static constexpr uint32_t max_io_segments = 1024;

 private:
  struct slot;
  Vstore() = default;
  core::result<void> init(const core::vstore_ops& ops, std::string_view target, const std::string& options,
                          const open_options& opts, core::registry* reg, void* context);
  static void on_complete(void* owner, core::vstore_req* req, int status);
  vstore_io* release_slot_locked(slot& s, int status);
  void finish_io(vstore_io* io);
  bool fill_child(vstore_io* io, slot& s);
  void kick_locked(std::unique_lock<std::mutex>& lk);
  core::result<void> run_sync(vstore_io& io);

  core::vstore_ops ops_{};
  void* handle_ = nullptr;
  core::vstore_info info_{};
  core::vstore_host host_{};
  std::string transport_, target_;
  uint64_t max_child_ = 0;      // bytes per transport request
  uint32_t max_child_segs_ = 0;

  struct slot {
    core::vstore_req req{};
    vstore_io* parent = nullptr;
    std::vector<iovec> iov;   // this child's slice of the parent's iovec
  };
  std::vector<slot> slots_;
  std::unique_ptr<std::byte[]> ctx_mem_;

  std::mutex mu_;
  std::condition_variable idle_cv_;
  std::vector<uint32_t> free_;       // free slot tags
  vstore_io* pending_head_ = nullptr;  // FIFO of ios waiting for slots
  vstore_io* pending_tail_ = nullptr;
  std::vector<core::vstore_req*> ready_;  // built, not yet accepted by the transport
  uint64_t in_flight_ios_ = 0;         // submitted ios not yet done
  bool dispatching_ = false;
  bool redispatch_ = false;
  uint64_t completions_ = 0;           // transport completions so far
  std::atomic<uint32_t> callbacks_{0};  // threads inside on_complete
  mutable core::vstore_stats stats_;
};

}  // namespace uvd::storage
