// SPDX-License-Identifier: Apache-2.0
// The io_uring engine: a batch of requests becomes a batch of SQEs and one
// io_uring_submit (submit many, notify once); a reaper thread takes the CQEs
// and completes the requests, resuming short transfers where they stopped.
//
// Every request in flight holds exactly one SQE/CQE at a time, and at most
// `capacity_` requests are in flight, so the completion queue (twice the
// submission queue) never overflows and a resubmission always finds an SQE.
#include <liburing.h>
#include <pthread.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#include <spdlog/spdlog.h>

#include "transports/file/file_device.hpp"

namespace uvd::file {

using core::vstore_req;

namespace {

// Pushes a request on a list linked through its context.
void push(vstore_req*& list, vstore_req* req) {
  ctx_of(req).next = list;
  list = req;
}

class uring_engine final : public file_engine {
 public:
  explicit uring_engine(file_device& dev) : dev_(dev) {}
  ~uring_engine() override;
  core::result<void> start(uint32_t entries);

  const char* name() const noexcept override { return "uring"; }
  int submit(vstore_req* const* reqs, uint32_t n) override;

 private:
  bool needs_helper(vstore_req* req) const;
  void prep(io_uring_sqe* sqe, vstore_req* req);
  int flush_sq();
  vstore_req* withdraw_unsubmitted();
  void resubmit(vstore_req* req);
  void offload(vstore_req* req);
  void finish(vstore_req* req, int status);
  static void helper_done(void* arg, vstore_req* req, int status);
  void on_cqe(vstore_req* req, int res);
  void reap();

  file_device& dev_;
  io_uring ring_{};
  bool ring_ok_ = false;
  bool has_fallocate_ = false;
  uint32_t capacity_ = 0;             // most requests in flight
  std::atomic<uint32_t> in_flight_{0};
  std::atomic<int> broken_{0};        // -errno once io_uring_submit failed for good
  std::mutex sq_mu_;                  // the submission queue has one producer at a time
  std::thread reaper_;
  std::mutex helper_mu_;
  std::unique_ptr<file_engine> helper_;  // started on first need
};

core::result<void> uring_engine::start(uint32_t entries) {
  io_uring_params params{};
  // SUBMIT_ALL: an SQE that fails early completes with an error CQE instead
  // of cutting the batch short (kernel 5.18+; older kernels say EINVAL).
  params.flags = IORING_SETUP_SUBMIT_ALL;
  int rc = io_uring_queue_init_params(entries, &ring_, &params);
  if (rc == -EINVAL) {
    params = io_uring_params{};
    rc = io_uring_queue_init_params(entries, &ring_, &params);
  }
  if (rc < 0) return core::fail(-rc, "io_uring_queue_init(" + std::to_string(entries) + ") refused");
  ring_ok_ = true;

  bool has_rw = true;
  if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
    has_rw = io_uring_opcode_supported(probe, IORING_OP_READV) && io_uring_opcode_supported(probe, IORING_OP_WRITEV) &&
             io_uring_opcode_supported(probe, IORING_OP_FSYNC);
    has_fallocate_ = io_uring_opcode_supported(probe, IORING_OP_FALLOCATE);
    io_uring_free_probe(probe);
  }
  if (!has_rw) return core::fail(ENOSYS, "this kernel's io_uring lacks readv/writev/fsync");
  capacity_ = std::min(params.sq_entries, params.cq_entries);

  try {
    reaper_ = std::thread([this] { reap(); });
  } catch (const std::system_error& e) {
    return core::fail(e.code().value(), std::string("cannot start the io_uring completion thread: ") + e.what());
  }
  pthread_setname_np(reaper_.native_handle(), "uvd-file-cq");
  return core::ok();
}

uring_engine::~uring_engine() {
  // The reaper goes first: after completing a request it may still be inside
  // the helper's submit(), handing over another.
  if (reaper_.joinable()) {
    // Nothing is in flight (release follows the last completion), so a NOP
    // with user_data 0 is the last CQE the reaper sees; it stops there.
    {
      std::lock_guard lock(sq_mu_);
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      int rc = -EBUSY;
      if (sqe) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, 0);
        rc = flush_sq();
      }
      if (rc < 0) {
        // Only a dead ring gets here; without the NOP the join below would
        // hang, so fail loudly instead.
        spdlog::critical("file: {}: cannot stop the io_uring completion thread: {}", dev_.path, std::strerror(-rc));
        std::terminate();
      }
    }
    reaper_.join();
  }
  helper_.reset();
  if (ring_ok_) io_uring_queue_exit(&ring_);
}

bool uring_engine::needs_helper(vstore_req* req) const {
  switch (req->opcode) {
    case core::VSTORE_OP_DISCARD:
      return dev_.block_device || !has_fallocate_;  // BLKDISCARD is an ioctl
    case core::VSTORE_OP_WRITE_ZEROES: {
      uint32_t m = ctx_of(req).zero;
      return m == ZERO_WRITE || (m != ZERO_SYNC && !has_fallocate_);
    }
    default:
      return false;
  }
}

void uring_engine::prep(io_uring_sqe* sqe, vstore_req* req) {
  file_req_ctx& c = ctx_of(req);
  switch (req->opcode) {
    case core::VSTORE_OP_READ: {
      iov_slice s = file_remaining_iov(req);
      io_uring_prep_readv(sqe, dev_.fd, s.iov, s.count, req->offset + c.done);
      break;
    }
    case core::VSTORE_OP_WRITE: {
      iov_slice s = file_remaining_iov(req);
      io_uring_prep_writev2(sqe, dev_.fd, s.iov, s.count, req->offset + c.done,
                            (req->flags & core::VSTORE_REQ_FUA) ? RWF_DSYNC : 0);
      break;
    }
    case core::VSTORE_OP_FLUSH:
      io_uring_prep_fsync(sqe, dev_.fd, IORING_FSYNC_DATASYNC);
      break;
    case core::VSTORE_OP_DISCARD:
      io_uring_prep_fallocate(sqe, dev_.fd, file_fallocate_mode(ZERO_PUNCH), static_cast<off_t>(req->offset),
                              static_cast<off_t>(req->length));
      break;
    case core::VSTORE_OP_WRITE_ZEROES:
      if (c.zero == ZERO_SYNC)
        io_uring_prep_fsync(sqe, dev_.fd, IORING_FSYNC_DATASYNC);
      else
        io_uring_prep_fallocate(sqe, dev_.fd, file_fallocate_mode(c.zero), static_cast<off_t>(req->offset),
                                static_cast<off_t>(req->length));
      break;
  }
  io_uring_sqe_set_data(sqe, req);
}

// Hands every prepared SQE to the kernel. Caller holds sq_mu_. One
// io_uring_submit normally takes the whole batch; the loop only repeats if
// the kernel stopped early for lack of resources.
int uring_engine::flush_sq() {
  while (io_uring_sq_ready(&ring_) > 0) {
    int rc = io_uring_submit(&ring_);
    dev_.stats.notifies.fetch_add(1, std::memory_order_relaxed);
    if (rc > 0) continue;
    if (rc == 0 || rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) {
      std::this_thread::yield();
      continue;
    }
    return rc;
  }
  return 0;
}

// After a fatal io_uring_submit error: takes back the SQEs the kernel did not
// consume and returns their requests linked through ctx.next, so they can be
// failed. Caller holds sq_mu_.
vstore_req* uring_engine::withdraw_unsubmitted() {
  io_uring_sq& sq = ring_.sq;
  const unsigned head = io_uring_smp_load_acquire(sq.khead);
  vstore_req* list = nullptr;
  vstore_req** link = &list;
  for (unsigned i = head; i != sq.sqe_tail; ++i) {
    auto* req = reinterpret_cast<vstore_req*>(static_cast<uintptr_t>(sq.sqes[i & sq.ring_mask].user_data));
    *link = req;
    link = &ctx_of(req).next;
  }
  *link = nullptr;
  IO_URING_WRITE_ONCE(*sq.ktail, head);
  sq.sqe_head = sq.sqe_tail = head;
  return list;
}

int uring_engine::submit(vstore_req* const* reqs, uint32_t n) {
  if (int broken = broken_.load(std::memory_order_acquire)) return broken;
  const uint32_t used = in_flight_.load(std::memory_order_acquire);
  uint32_t accept = std::min(n, used < capacity_ ? capacity_ - used : 0u);
  if (accept < n) dev_.stats.ring_full.fetch_add(1, std::memory_order_relaxed);
  if (accept == 0) return 0;

  // Requests that do not go to the ring wait on these lists (linked through
  // ctx.next) until the lock is dropped, because complete() may call submit()
  // again. A request handed to the kernel is never touched here again: it
  // may have completed, and its slot been reused, already.
  vstore_req* refused = nullptr;  // failed the precheck
  vstore_req* helped = nullptr;   // for the helper thread
  vstore_req* broke = nullptr;    // the ring failed under them
  int fatal = 0;
  {
    std::lock_guard lock(sq_mu_);
    uint32_t engine_bound = 0;
    for (uint32_t i = 0; i < accept; ++i) {
      vstore_req* req = reqs[i];
      if (file_precheck(dev_, *req) != 0) {
        push(refused, req);
        continue;
      }
      if (needs_helper(req)) {
        push(helped, req);
        ++engine_bound;
        continue;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (!sqe) {  // not while capacity_ <= SQ entries; kept as a guard
        accept = i;
        break;
      }
      prep(sqe, req);
      ++engine_bound;
    }
    // Count before the kernel sees them: completions may start at once.
    in_flight_.fetch_add(engine_bound, std::memory_order_acq_rel);
    if (int rc = flush_sq(); rc < 0) {
      spdlog::error("file: {}: io_uring_submit failed: {}; the device stops taking requests", dev_.path,
                    std::strerror(-rc));
      fatal = rc;
      broken_.store(rc, std::memory_order_release);
      broke = withdraw_unsubmitted();
    }
  }
  for (vstore_req* req = refused; req;) {
    vstore_req* next = ctx_of(req).next;
    dev_.complete(req, file_precheck(dev_, *req));
    req = next;
  }
  for (vstore_req* req = broke; req;) {
    vstore_req* next = ctx_of(req).next;
    finish(req, fatal);
    req = next;
  }
  for (vstore_req* req = helped; req;) {
    vstore_req* next = ctx_of(req).next;
    offload(req);
    req = next;
  }
  dev_.stats.batches.fetch_add(1, std::memory_order_relaxed);
  return static_cast<int>(accept);
}

void uring_engine::resubmit(vstore_req* req) {
  int rc;
  {
    std::lock_guard lock(sq_mu_);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      rc = -EBUSY;
    } else {
      prep(sqe, req);
      rc = flush_sq();
      if (rc < 0) {
        broken_.store(rc, std::memory_order_release);
        withdraw_unsubmitted();  // req alone, failed below
      }
    }
  }
  if (rc < 0) finish(req, rc);
}

void uring_engine::offload(vstore_req* req) {
  dev_.stats.offloaded.fetch_add(1, std::memory_order_relaxed);
  file_engine* helper = nullptr;
  int err = 0;
  {
    std::lock_guard lock(helper_mu_);
    if (!helper_) {
      auto made = make_thread_engine(dev_, 1, &uring_engine::helper_done, this);
      if (made) helper_ = std::move(*made);
      else {
        err = -made.err().errnum();
        spdlog::error("file: {}: {}", dev_.path, made.err().what());
      }
    }
    helper = helper_.get();
  }
  if (!helper) finish(req, err ? err : -ENOMEM);
  else helper->submit(&req, 1);
}

void uring_engine::finish(vstore_req* req, int status) {
  // Free the slot first: complete() may submit more and must find room.
  in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  dev_.complete(req, status);
}

void uring_engine::helper_done(void* arg, vstore_req* req, int status) {
  static_cast<uring_engine*>(arg)->finish(req, status);
}

void uring_engine::on_cqe(vstore_req* req, int res) {
  file_req_ctx& c = ctx_of(req);
  if (res == -EINTR) return resubmit(req);
  switch (req->opcode) {
    case core::VSTORE_OP_READ:
    case core::VSTORE_OP_WRITE: {
      const bool is_read = req->opcode == core::VSTORE_OP_READ;
      if (res == -EAGAIN) return resubmit(req);
      if (res < 0) return finish(req, res);
      if (res == 0) {
        if (!is_read) return finish(req, -EIO);  // no progress: do not spin
        file_fill_past_eof(dev_, req);
        return finish(req, 0);
      }
      c.done += static_cast<uint64_t>(res);
      if (c.done >= req->length) return finish(req, 0);
      dev_.stats.short_transfers.fetch_add(1, std::memory_order_relaxed);
      if (is_read && file_past_eof(dev_, req->offset + c.done)) {
        file_fill_past_eof(dev_, req);
        return finish(req, 0);
      }
      return resubmit(req);
    }
    case core::VSTORE_OP_WRITE_ZEROES:
      if (res == -EOPNOTSUPP && c.zero < ZERO_WRITE) {
        c.zero = file_next_zero_method(dev_, c.zero);
        return c.zero == ZERO_WRITE ? offload(req) : resubmit(req);
      }
      if (res == 0 && c.zero < ZERO_WRITE && (req->flags & core::VSTORE_REQ_FUA)) {
        c.zero = ZERO_SYNC;
        return resubmit(req);
      }
      return finish(req, res);
    default:
      return finish(req, res < 0 ? res : 0);
  }
}

void uring_engine::reap() {
  constexpr unsigned batch = 32;
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(&ring_, &cqe);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) {
      spdlog::error("file: {}: waiting for io_uring completions failed: {}", dev_.path, std::strerror(-rc));
      return;
    }
    io_uring_cqe* cqes[batch];
    struct {
      vstore_req* req;
      int res;
    } done[batch];
    unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, batch);
    for (unsigned i = 0; i < n; ++i) done[i] = {static_cast<vstore_req*>(io_uring_cqe_get_data(cqes[i])), cqes[i]->res};
    io_uring_cq_advance(&ring_, n);  // copied out: give the kernel its space back early
    bool stop = false;
    for (unsigned i = 0; i < n; ++i) {
      if (done[i].req) on_cqe(done[i].req, done[i].res);
      else stop = true;
    }
    if (stop) return;
  }
}

}  // namespace

core::result<std::unique_ptr<file_engine>> make_uring_engine(file_device& dev, uint32_t entries) {
  auto engine = std::make_unique<uring_engine>(dev);
  if (auto started = engine->start(entries); !started) return core::fail(std::move(started).err());
  return std::unique_ptr<file_engine>(std::move(engine));
}

}  // namespace uvd::file
