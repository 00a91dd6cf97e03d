// SPDX-License-Identifier: Apache-2.0
#pragma once
// Private to the file transport (and its tests): the open device, the
// per-request context and the engines that move the bytes.
#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "core/result.hpp"
#include "core/vstore_ops.hpp"
#include "transports/file/file.hpp"

namespace uvd::file {

// Counters for tests and debugging; relaxed atomics bumped by any thread.
struct file_stats {
  std::atomic<uint64_t> batches{0};          // submit() calls that accepted at least one request
  std::atomic<uint64_t> notifies{0};         // io_uring_submit calls / worker wake-ups
  std::atomic<uint64_t> ring_full{0};        // submit() calls that accepted fewer than offered
  std::atomic<uint64_t> short_transfers{0};  // reads/writes resumed after a partial transfer
  std::atomic<uint64_t> eof_fills{0};        // reads completed with zeros past the file's end
  std::atomic<uint64_t> zero_writes{0};      // write-zeroes done by writing a zero buffer
  std::atomic<uint64_t> offloaded{0};        // io_uring requests handed to the helper thread
  std::atomic<uint64_t> fence_refused{0};    // requests refused for a stale epoch (fence=1)
  std::atomic<uint64_t> fence_deferred{0};   // requests that waited for their fence pass on the gate thread
};

// How a WRITE_ZEROES is being carried out. On EOPNOTSUPP the request moves to
// the next method, and the device remembers so later requests skip the dead one.
enum zero_method : uint32_t {
  ZERO_PUNCH = 0,  // fallocate(PUNCH_HOLE): frees the blocks (only without VSTORE_REQ_NO_UNMAP)
  ZERO_RANGE = 1,  // fallocate(ZERO_RANGE): keeps the blocks allocated
  ZERO_WRITE = 2,  // write a zero buffer
  ZERO_SYNC = 3,   // fallocate done; fdatasync for VSTORE_REQ_FUA
};

// Lives in vstore_req::ctx (ctx_size bytes, preallocated by the front half),
// so the data path never allocates.
struct file_req_ctx {
  core::vstore_req* next;  // thread-pool queue link
  uint64_t done;           // bytes of a READ/WRITE transferred so far
  iovec partial;           // the rest of an iovec a short transfer stopped inside
  uint32_t zero;           // zero_method of a WRITE_ZEROES
  uint32_t pass;           // 1 while the request holds a fence pass (fence=1)
};
static_assert(alignof(file_req_ctx) <= 16, "vstore_req::ctx is aligned 16");

inline file_req_ctx& ctx_of(core::vstore_req* req) { return *static_cast<file_req_ctx*>(req->ctx); }

// One engine moves the requests of one device. submit() follows
// vstore_ops::submit: returns how many it accepted from the front (each
// completes exactly once through the engine's completion function), or a
// negative errno when the engine is unusable. Destruction stops the engine's
// threads; it happens only when nothing is in flight.
class file_engine {
 public:
  virtual ~file_engine() = default;
  virtual const char* name() const noexcept = 0;
  virtual int submit(core::vstore_req* const* reqs, uint32_t n) = 0;
};

struct file_device;

// Where an engine reports a finished request.
using file_done_fn = void (*)(void* arg, core::vstore_req* req, int status);

// Thread pool: workers run file_execute(). done/arg default to the device's host.
core::result<std::unique_ptr<file_engine>> make_thread_engine(file_device& dev, uint32_t threads,
                                                              file_done_fn done = nullptr, void* arg = nullptr);
// io_uring; the error says why the ring was refused (EPERM under seccomp, ENOSYS, ENOMEM).
core::result<std::unique_ptr<file_engine>> make_uring_engine(file_device& dev, uint32_t entries);

struct free_deleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

struct file_fence_gate;  // file_fence.cpp
struct file_fence_gate_deleter {
  void operator()(file_fence_gate* g) const noexcept;
};

// Fencing (fence=1, file_fence.cpp). Every request runs inside a pass of the
// image's fence record (storage/fence.hpp) from submission to completion: it
// is taken in submit and ended in file_device::complete, the one completion
// funnel of both engines.
core::result<void> file_fence_start(file_device& dev);
// submit() of a fenced device: admits each request (ESTALE for a stale epoch)
// without blocking the caller, which may be a completion thread; a request
// whose pass would have to wait goes to the gate thread, which waits for it.
int file_fence_submit(file_device& dev, core::vstore_req* const* reqs, uint32_t n);
void file_fence_leave(file_device& dev, core::vstore_req* req);
// vstore_ops::fence: -ENOTSUP when the device was opened without fence=1.
int file_fence_op(file_device& dev, uint32_t epoch);

struct file_device {
  file_device() = default;
  ~file_device();
  file_device(const file_device&) = delete;
  file_device& operator=(const file_device&) = delete;

  void complete(core::vstore_req* req, int status) {
    if (ctx_of(req).pass) file_fence_leave(*this, req);
    host.complete(host.owner, req, status);
  }

  int fd = -1;
  std::string path;
  bool block_device = false;
  bool direct = false;
  core::vstore_info info{};
  core::vstore_host host{};
  // Cleared when the filesystem answers EOPNOTSUPP; shared by all requests.
  std::atomic<bool> punch_ok{true};
  std::atomic<bool> zero_range_ok{true};
  // Aligned for O_DIRECT; source of ZERO_WRITE (nullptr on a read-only device).
  std::unique_ptr<std::byte, free_deleter> zero_buf;
  size_t zero_buf_len = 0;
  file_stats stats;
  std::unique_ptr<file_fence_gate, file_fence_gate_deleter> fence;  // fence=1; stopped first
  std::unique_ptr<file_engine> engine;  // last: stopped before the rest goes
};

// --- request execution helpers shared by the engines (file_io.cpp) ---

// Sets up the context of a request about to be submitted.
void file_init_ctx(const file_device& dev, core::vstore_req* req);

// 0, or the errno a request fails with before reaching the host file
// (a write to a read-only device, an op the device cannot do).
int file_precheck(const file_device& dev, const core::vstore_req& req);

// The iovecs still to transfer after ctx.done bytes: a tail of req.iov, or
// ctx.partial when the last transfer stopped inside an iovec.
struct iov_slice {
  const iovec* iov;
  uint32_t count;
};
iov_slice file_remaining_iov(core::vstore_req* req);

// Ends a read that reached the file's end: zero-fills its buffers from
// ctx.done on (the disk is larger than the file, or the file shrank).
void file_fill_past_eof(file_device& dev, core::vstore_req* req);

// True if pos is at or past the end of a regular file right now (it may have
// been truncated since open, or its size is not a multiple of the block size).
// Asked after a short read, so the rest is zero-filled at once instead of read
// again: under O_DIRECT that read would start at an unaligned offset, which
// some filesystems refuse with EINVAL before they look at the file's end.
bool file_past_eof(const file_device& dev, uint64_t pos);

// fallocate mode for a zero_method below ZERO_WRITE; for DISCARD use ZERO_PUNCH.
int file_fallocate_mode(uint32_t method);

// The first method for a WRITE_ZEROES, and the next after `method` answered
// EOPNOTSUPP (remembering that on the device).
uint32_t file_first_zero_method(const file_device& dev, const core::vstore_req& req);
uint32_t file_next_zero_method(file_device& dev, uint32_t method);

// Runs one request synchronously on the calling thread; returns its status.
// Resumes from the context's state (ctx.done, ctx.zero).
int file_execute(file_device& dev, core::vstore_req* req);

// --- test hooks (transports/file tests only) ---
file_device& file_device_of(void* handle);

}  // namespace uvd::file
