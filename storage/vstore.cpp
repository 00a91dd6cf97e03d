// SPDX-License-Identifier: Apache-2.0
#include "storage/vstore.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <thread>

#include "core/uri.hpp"

namespace uvd::storage {

namespace {

using core::vstore_req;

// Write-zeroes on a transport without it is a write from this buffer.
constexpr size_t zero_buf_size = 64 * 1024;
alignas(4096) const std::byte zero_buf[zero_buf_size] = {};

constexpr uint16_t known_req_flags = core::VSTORE_REQ_FUA | core::VSTORE_REQ_NO_UNMAP;

bool is_write_class(uint16_t op) {
  return op == core::VSTORE_OP_WRITE || op == core::VSTORE_OP_DISCARD || op == core::VSTORE_OP_WRITE_ZEROES;
}

uint64_t iov_bytes(const iovec* iov, uint32_t n) {
  uint64_t total = 0;
  for (uint32_t i = 0; i < n; ++i) total += iov[i].iov_len;
  return total;
}

}  // namespace

core::result<std::unique_ptr<Vstore>> Vstore::open(core::registry& reg, std::string_view uri,
                                                   const open_options& opts) {
  auto parsed = core::parse_uri(uri);
  if (!parsed) return core::fail(std::move(parsed).err());
  auto ops = reg.vstore(parsed->transport);
  if (!ops) return core::fail(std::move(ops).err());
  std::string options = parsed->options;
  if (!opts.options.empty()) options += (options.empty() ? "" : "&") + opts.options;
  std::unique_ptr<Vstore> v(new Vstore());
  if (auto r = v->init(**ops, parsed->target, options, opts, &reg, nullptr); !r) return core::fail(std::move(r).err());
  return v;
}

core::result<std::unique_ptr<Vstore>> Vstore::open(const core::vstore_ops& ops, std::string_view target,
                                                   const open_options& opts, core::registry* reg, void* context) {
  std::unique_ptr<Vstore> v(new Vstore());
  if (auto r = v->init(ops, target, opts.options, opts, reg, context); !r) return core::fail(std::move(r).err());
  return v;
}

core::result<void> Vstore::init(const core::vstore_ops& ops, std::string_view target, const std::string& options,
                                 const open_options& opts, core::registry* reg, void* context) {
  ops_ = ops;
  transport_ = ops.name ? ops.name : "?";
  target_ = std::string(target);
  if (opts.queue_depth < 1 || opts.queue_depth > 4096)
    return core::fail(EINVAL, "queue depth " + std::to_string(opts.queue_depth) + " is outside 1..4096");

  bool ro = opts.read_only;
  std::string v;
  if (core::find_option(options, "ro", &v) && v != "0") ro = true;
  bool direct = opts.direct || (core::find_option(options, "direct", &v) && v != "0");

  host_.owner = this;
  host_.complete = &Vstore::on_complete;
  char errbuf[512] = {};
  core::vstore_open_params p{};
  p.target = target_.c_str();
  p.options = options.c_str();
  p.flags = (ro ? core::VSTORE_OPEN_READ_ONLY : 0u) | (direct ? core::VSTORE_OPEN_DIRECT : 0u);
  p.host = &host_;
  p.registry = reg;
  p.context = context;
  p.errbuf = errbuf;
  p.errbuf_len = sizeof errbuf;
  int rc = ops_.open(&p, &handle_);
  if (rc < 0) {
    handle_ = nullptr;
    std::string what = errbuf[0] ? std::string(errbuf) : "cannot open '" + target_ + "'";
    return core::fail(-rc, transport_ + ": " + what);
  }
  rc = ops_.info(handle_, &info_);
  if (rc < 0) return core::fail(-rc, transport_ + ": cannot read device info for '" + target_ + "'");
  info_.id[sizeof info_.id - 1] = '\0';
  if (ro) info_.read_only = 1;
  if (info_.block_size == 0 || (info_.block_size & (info_.block_size - 1)) != 0)
    return core::fail(EINVAL, transport_ + ": transport reported block size " + std::to_string(info_.block_size) +
                                  ", not a power of two");

  // A child request carries at most max_child_ bytes in max_child_segs_ iovecs.
  max_child_ = info_.max_transfer ? info_.max_transfer : std::numeric_limits<uint64_t>::max();
  max_child_ -= max_child_ % info_.block_size;
  if (max_child_ == 0) return core::fail(EINVAL, transport_ + ": max transfer is smaller than a block");
  max_child_segs_ = info_.max_segments ? std::min(info_.max_segments, max_io_segments) : max_io_segments;

  static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16);
  size_t ctx = ops_.ctx_size ? ops_.ctx_size(handle_) : 0;
  ctx = (ctx + 15) & ~size_t{15};
  uint32_t qd = opts.queue_depth;
  slots_ = std::vector<slot>(qd);
  // operator new[] aligns to __STDCPP_DEFAULT_NEW_ALIGNMENT__ (16), as ctx promises.
  if (ctx) ctx_mem_.reset(new std::byte[ctx * qd]());
  free_.reserve(qd);
  ready_.reserve(qd);
  for (uint32_t i = 0; i < qd; ++i) {
    slots_[i].req.tag = i;
    slots_[i].req.ctx = ctx ? ctx_mem_.get() + i * ctx : nullptr;
    slots_[i].iov.reserve(max_child_segs_);
    free_.push_back(qd - 1 - i);
  }
  spdlog::debug("vstore {}:{} open: {} bytes, block {}, max transfer {}, qd {}", transport_, target_, info_.size,
                info_.block_size, info_.max_transfer, qd);
  return core::ok();
}

Vstore::~Vstore() {
  if (!handle_) return;
  drain();
  while (callbacks_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  ops_.release(handle_);
}

int Vstore::validate(const vstore_io& io) const noexcept {
  if (io.opcode > core::VSTORE_OP_WRITE_ZEROES) return -EINVAL;
  if (io.flags & ~known_req_flags) return -EINVAL;
  if (!io.done) return -EINVAL;
  if (io.opcode == core::VSTORE_OP_FLUSH) return 0;
  if (read_only() && is_write_class(io.opcode)) return -EROFS;
  if (io.length == 0) return -EINVAL;
  if (io.offset % info_.block_size || io.length % info_.block_size) return -EINVAL;
  if (io.offset > info_.size || io.length > info_.size - io.offset)
    return is_write_class(io.opcode) ? -ENOSPC : -EINVAL;
  if (io.opcode == core::VSTORE_OP_READ || io.opcode == core::VSTORE_OP_WRITE) {
    if (io.iovcnt == 0 || io.iovcnt > max_io_segments || !io.iov) return -EINVAL;
    if (iov_bytes(io.iov, io.iovcnt) != io.length) return -EINVAL;
  }
  return 0;
}

void Vstore::submit(std::span<vstore_io* const> ios) {
  vstore_io* head = nullptr;
  vstore_io* tail = nullptr;
  uint64_t accepted = 0;
  for (vstore_io* io : ios) {
    int rc = validate(*io);
    if (rc < 0) {
      stats_.add(stats_.rejected);
      if (io->done) io->done(io, rc);
      continue;
    }
    io->priv = {};
    stats_.add_op(io->opcode, io->opcode == core::VSTORE_OP_FLUSH ? 0 : io->length);
    // Ops the transport does not have and that need no emulation finish here:
    // a flush with no volatile cache below, an advisory discard.
    bool nothing_to_do = (io->opcode == core::VSTORE_OP_FLUSH && !has(core::VSTORE_F_FLUSH)) ||
                         (io->opcode == core::VSTORE_OP_DISCARD && !has(core::VSTORE_F_DISCARD));
    if (nothing_to_do) {
      stats_.add(stats_.emulated);
      io->done(io, 0);
      continue;
    }
    if (tail) tail->priv.next = io;
    else head = io;
    tail = io;
    ++accepted;
  }
  if (!head) return;
  std::unique_lock lk(mu_);
  in_flight_ios_ += accepted;
  if (pending_tail_) pending_tail_->priv.next = head;
  else pending_head_ = head;
  pending_tail_ = tail;
  kick_locked(lk);
}

// Builds the next transport request of io into slot s. Returns false when the
// io's buffers cannot be cut into a block-aligned request within the limits.
bool Vstore::fill_child(vstore_io* io, slot& s) {
  vstore_req& r = s.req;
  s.parent = io;
  s.iov.clear();
  r.flags = io->flags;
  r.epoch = io->epoch;
  if (io->priv.phase == 1) {  // the flush that makes an emulated FUA write durable
    r.opcode = core::VSTORE_OP_FLUSH;
    r.flags = 0;
    r.offset = r.length = 0;
    r.iov = nullptr;
    r.iovcnt = 0;
    io->priv.cursor = io->length;
    return true;
  }
  if (!has(core::VSTORE_F_FUA)) r.flags &= ~core::VSTORE_REQ_FUA;
  r.offset = io->offset + io->priv.cursor;
  r.opcode = io->opcode;
  uint64_t left = io->length - io->priv.cursor;

  if (io->opcode == core::VSTORE_OP_FLUSH ||
      io->opcode == core::VSTORE_OP_DISCARD ||
      (io->opcode == core::VSTORE_OP_WRITE_ZEROES && has(core::VSTORE_F_WRITE_ZEROES))) {
    r.length = io->opcode == core::VSTORE_OP_FLUSH ? 0 : left;
    r.iov = nullptr;
    r.iovcnt = 0;
    io->priv.cursor = io->length;
    return true;
  }

  uint64_t want = std::min(left, max_child_);
  if (io->opcode == core::VSTORE_OP_WRITE_ZEROES) {  // emulated: a write from the zero buffer
    r.opcode = core::VSTORE_OP_WRITE;
    want = std::min<uint64_t>(want, uint64_t{zero_buf_size} * max_child_segs_);
    for (uint64_t done = 0; done < want; done += zero_buf_size)
      s.iov.push_back({const_cast<std::byte*>(zero_buf), static_cast<size_t>(std::min<uint64_t>(zero_buf_size, want - done))});
  } else {
    // Find the parent's iovec at byte `cursor` and take up to `want` bytes.
    uint64_t skip = io->priv.cursor;
    uint32_t i = 0;
    while (i < io->iovcnt && skip >= io->iov[i].iov_len) skip -= io->iov[i++].iov_len;
    uint64_t got = 0;
    for (; i < io->iovcnt && got < want && s.iov.size() < max_child_segs_; ++i, skip = 0) {
      uint64_t n = std::min<uint64_t>(io->iov[i].iov_len - skip, want - got);
      if (n == 0) continue;
      s.iov.push_back({static_cast<char*>(io->iov[i].iov_base) + skip, static_cast<size_t>(n)});
      got += n;
    }
    // Out of segments before `want`: cut back to a block boundary.
    uint64_t cut = got % info_.block_size;
    while (cut > 0 && !s.iov.empty()) {
      iovec& last = s.iov.back();
      uint64_t n = std::min<uint64_t>(cut, last.iov_len);
      last.iov_len -= n;
      cut -= n;
      got -= n;
      if (last.iov_len == 0) s.iov.pop_back();
    }
    if (got == 0) return false;
    want = got;
  }
  r.length = want;
  r.iov = s.iov.data();
  r.iovcnt = static_cast<uint32_t>(s.iov.size());
  if (io->priv.cursor != 0 || want != left) stats_.add(stats_.splits);
  io->priv.cursor += want;
  return true;
}

// Called with mu_ held; returns with it released. One thread at a time builds
// transport requests and calls ops_.submit; others leave it a note.
void Vstore::kick_locked(std::unique_lock<std::mutex>& lk) {
  if (dispatching_) {
    redispatch_ = true;
    lk.unlock();
    return;
  }
  if (!pending_head_ && ready_.empty()) {  // ready_ is stable: no one is dispatching
    lk.unlock();
    return;
  }
  dispatching_ = true;
  std::vector<vstore_io*> unsplittable;
  for (;;) {
    redispatch_ = false;
    bool waited = false;
    while (pending_head_) {
      if (free_.empty()) {
        waited = true;
        break;
      }
      vstore_io* io = pending_head_;
      uint32_t tag = free_.back();
      free_.pop_back();
      slot& s = slots_[tag];
      if (io->priv.status < 0 || !fill_child(io, s)) {
        free_.push_back(tag);
        if (io->priv.status == 0) io->priv.status = -EINVAL;
        io->priv.cursor = io->length;
        pending_head_ = io->priv.next;
        if (!pending_head_) pending_tail_ = nullptr;
        if (io->priv.outstanding == 0) unsplittable.push_back(io);
        continue;
      }
      ++io->priv.outstanding;
      ready_.push_back(&s.req);
      if (io->priv.cursor >= io->length) {
        pending_head_ = io->priv.next;
        if (!pending_head_) pending_tail_ = nullptr;
      }
    }
    if (waited) stats_.add(stats_.queue_full);
    stats_.note_in_flight(slots_.size() - free_.size());
    const uint64_t completions_seen = completions_;
    lk.unlock();

    for (vstore_io* io : unsplittable) finish_io(io);
    unsplittable.clear();
    if (!ready_.empty()) {
      size_t before = ready_.size();
      int n = ops_.submit(handle_, ready_.data(), static_cast<uint32_t>(before));
      bool stuck = false;
      if (n == 0) {
        lk.lock();
        // Nothing of ours is at the transport, and nothing completed since we looked.
        stuck = completions_ == completions_seen && slots_.size() - free_.size() == before;
        lk.unlock();
      }
      if (n < 0 || stuck) {
        // Unusable device, or a transport that is "full" with nothing of ours in it.
        int status = n < 0 ? n : -EIO;
        if (n == 0) spdlog::error("vstore {}:{}: transport accepted no request with none in flight", transport_, target_);
        std::vector<vstore_req*> failed(ready_);
        ready_.clear();
        for (vstore_req* r : failed) {
          lk.lock();
          vstore_io* io = release_slot_locked(slots_[r->tag], status);
          lk.unlock();
          if (io) finish_io(io);
        }
      } else {
        ready_.erase(ready_.begin(), ready_.begin() + std::min<size_t>(static_cast<size_t>(n), before));
      }
    }
    lk.lock();
    bool more = redispatch_ || (ready_.empty() && pending_head_ && !free_.empty());
    if (!more) {
      dispatching_ = false;
      lk.unlock();
      return;
    }
  }
}

void Vstore::on_complete(void* owner, vstore_req* req, int status) {
  auto* self = static_cast<Vstore*>(owner);
  // The last io's done() may let the owner destroy this Vstore while this
  // thread still runs kick_locked(); the destructor waits for callbacks_ to drop.
  self->callbacks_.fetch_add(1, std::memory_order_acq_rel);
  std::unique_lock lk(self->mu_);
  if (vstore_io* io = self->release_slot_locked(self->slots_[req->tag], status)) {
    lk.unlock();
    self->finish_io(io);
    lk.lock();
  }
  self->kick_locked(lk);
  self->callbacks_.fetch_sub(1, std::memory_order_release);
}

// Frees a completed transport request's slot; returns its io if that was the
// io's last outstanding piece (to be finished outside the lock).
vstore_io* Vstore::release_slot_locked(slot& s, int status) {
  vstore_io* io = s.parent;
  if (status < 0 && io->priv.status == 0) io->priv.status = status > -4096 ? status : -EIO;
  --io->priv.outstanding;
  ++completions_;
  s.parent = nullptr;
  free_.push_back(s.req.tag);
  return io->priv.outstanding == 0 && io->priv.cursor >= io->length ? io : nullptr;
}

void Vstore::finish_io(vstore_io* io) {
  int status = io->priv.status;
  bool fua_emulated = (io->flags & core::VSTORE_REQ_FUA) && !has(core::VSTORE_F_FUA) && has(core::VSTORE_F_FLUSH) &&
                      (io->opcode == core::VSTORE_OP_WRITE || io->opcode == core::VSTORE_OP_WRITE_ZEROES ||
                       io->opcode == core::VSTORE_OP_DISCARD);
  if (status == 0 && io->priv.phase == 0 && fua_emulated) {
    stats_.add(stats_.emulated);
    io->priv.phase = 1;
    io->priv.cursor = 0;
    std::lock_guard lk(mu_);
    io->priv.next = pending_head_;  // continue ahead of newer work
    pending_head_ = io;
    if (!pending_tail_) pending_tail_ = io;
    return;  // the caller kicks
  }
  if (io->opcode == core::VSTORE_OP_WRITE_ZEROES && !has(core::VSTORE_F_WRITE_ZEROES)) stats_.add(stats_.emulated);
  if (status < 0) stats_.add(stats_.errors);
  io->done(io, status);
  std::lock_guard lk(mu_);
  if (--in_flight_ios_ == 0) idle_cv_.notify_all();
}

void Vstore::drain() {
  std::unique_lock lk(mu_);
  while (in_flight_ios_ != 0) {
    if (ops_.poll) {
      lk.unlock();
      ops_.poll(handle_, 64);
      lk.lock();
    } else {
      idle_cv_.wait(lk);
    }
  }
}

core::result<uint32_t> Vstore::fence(uint32_t epoch) {
  if (!ops_.fence) return core::fail(ENOTSUP, transport_ + ":" + target_ + " cannot fence");
  int rc = ops_.fence(handle_, epoch);
  if (rc < 0)
    return core::fail(-rc, "fence " + std::string(epoch ? "to epoch " + std::to_string(epoch) : "query") + " on " +
                               transport_ + ":" + target_ + " failed");
  return static_cast<uint32_t>(epoch ? epoch : rc);
}

namespace {

struct sync_waiter {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int status = 0;

  static void on_done(vstore_io* io, int status) {
    auto* w = static_cast<sync_waiter*>(io->user);
    std::lock_guard lk(w->mu);
    w->status = status;
    w->done = true;
    w->cv.notify_one();
  }
};

const char* op_name(uint16_t op) {
  switch (op) {
    case core::VSTORE_OP_READ: return "read";
    case core::VSTORE_OP_WRITE: return "write";
    case core::VSTORE_OP_FLUSH: return "flush";
    case core::VSTORE_OP_DISCARD: return "discard";
    case core::VSTORE_OP_WRITE_ZEROES: return "write-zeroes";
  }
  return "?";
}

}  // namespace

core::result<void> Vstore::run_sync(vstore_io& io) {
  sync_waiter w;
  io.user = &w;
  io.done = &sync_waiter::on_done;
  submit(&io);
  std::unique_lock lk(w.mu);
  while (!w.done) {
    if (ops_.poll) {
      lk.unlock();
      ops_.poll(handle_, 64);
      lk.lock();
    } else {
      w.cv.wait(lk);
    }
  }
  if (w.status < 0)
    return core::fail(-w.status, std::string(op_name(io.opcode)) + " of " + std::to_string(io.length) +
                                     " bytes at offset " + std::to_string(io.offset) + " on " + transport_ + ":" +
                                     target_ + " failed");
  return core::ok();
}

core::result<void> Vstore::read(uint64_t offset, void* buf, uint64_t length) {
  iovec v{buf, static_cast<size_t>(length)};
  return readv(offset, {&v, 1});
}

core::result<void> Vstore::write(uint64_t offset, const void* buf, uint64_t length, uint16_t flags) {
  iovec v{const_cast<void*>(buf), static_cast<size_t>(length)};
  return writev(offset, {&v, 1}, flags);
}

core::result<void> Vstore::readv(uint64_t offset, std::span<const iovec> iov) {
  vstore_io io;
  io.opcode = core::VSTORE_OP_READ;
  io.offset = offset;
  io.length = iov_bytes(iov.data(), static_cast<uint32_t>(iov.size()));
  io.iov = iov.data();
  io.iovcnt = static_cast<uint32_t>(iov.size());
  return run_sync(io);
}

core::result<void> Vstore::writev(uint64_t offset, std::span<const iovec> iov, uint16_t flags) {
  vstore_io io;
  io.opcode = core::VSTORE_OP_WRITE;
  io.flags = flags;
  io.offset = offset;
  io.length = iov_bytes(iov.data(), static_cast<uint32_t>(iov.size()));
  io.iov = iov.data();
  io.iovcnt = static_cast<uint32_t>(iov.size());
  return run_sync(io);
}

core::result<void> Vstore::flush() {
  vstore_io io;
  io.opcode = core::VSTORE_OP_FLUSH;
  return run_sync(io);
}

core::result<void> Vstore::discard(uint64_t offset, uint64_t length, uint16_t flags) {
  vstore_io io;
  io.opcode = core::VSTORE_OP_DISCARD;
  io.flags = flags;
  io.offset = offset;
  io.length = length;
  return run_sync(io);
}

core::result<void> Vstore::write_zeroes(uint64_t offset, uint64_t length, uint16_t flags) {
  vstore_io io;
  io.opcode = core::VSTORE_OP_WRITE_ZEROES;
  io.flags = flags;
  io.offset = offset;
  io.length = length;
  return run_sync(io);
}

}  // namespace uvd::storage
