// SPDX-License-Identifier: Apache-2.0
#include "storage/cow/cow_device.hpp"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace uvd::storage {

namespace {

enum : uint8_t { issue_idle = 0, issue_busy = 1, issue_done_early = 2 };
enum : uint8_t { stage_read, stage_copy_up, stage_data, stage_data_sync, stage_bitmap, stage_bitmap_sync, stage_flush };

std::byte* alloc_aligned(uint64_t bytes) {
  uint64_t rounded = (bytes + 4095) / 4096 * 4096;
  return static_cast<std::byte*>(std::aligned_alloc(4096, rounded));
}

// The iovecs covering bytes [skip, skip+len) of a request's buffers.
uint32_t slice_iov(const core::vstore_req* req, uint64_t skip, uint64_t len, iovec* out) {
  uint32_t i = 0, n = 0;
  while (i < req->iovcnt && skip >= req->iov[i].iov_len) skip -= req->iov[i++].iov_len;
  for (; i < req->iovcnt && len > 0; ++i, skip = 0) {
    uint64_t take = std::min<uint64_t>(req->iov[i].iov_len - skip, len);
    if (take == 0) continue;
    out[n++] = {static_cast<char*>(req->iov[i].iov_base) + skip, static_cast<size_t>(take)};
    len -= take;
  }
  return n;
}

void copy_from_iov(const core::vstore_req* req, uint64_t skip, std::byte* dst, uint64_t len) {
  uint32_t i = 0;
  while (i < req->iovcnt && skip >= req->iov[i].iov_len) skip -= req->iov[i++].iov_len;
  for (; i < req->iovcnt && len > 0; ++i, skip = 0) {
    uint64_t take = std::min<uint64_t>(req->iov[i].iov_len - skip, len);
    std::memcpy(dst, static_cast<const char*>(req->iov[i].iov_base) + skip, take);
    dst += take;
    len -= take;
  }
}

void note_status(std::atomic<int>& slot, int status) {
  if (status >= 0) return;
  int expected = 0;
  slot.compare_exchange_strong(expected, status, std::memory_order_acq_rel);
}

bool test_bit(const std::vector<uint64_t>& v, uint64_t b) { return (v[b >> 6] >> (b & 63)) & 1u; }

}  // namespace

// The per-request context, living in vstore_req::ctx.
struct cow_device::request {
  cow_device* dev = nullptr;
  core::vstore_req* req = nullptr;
  request* next = nullptr;   // link in whichever device list holds it
  uint64_t b0 = 0, b1 = 0;   // first and last block touched
  uint64_t scan = 0;         // next block to claim
  uint64_t cursor = 0;       // reads: bytes done
  std::atomic<uint32_t> outstanding{0};
  std::atomic<int> status{0};
  std::atomic<uint8_t> issue{issue_idle};
  uint8_t stage = stage_read;
  bool zeroes = false;       // WRITE_ZEROES or DISCARD: the data is zeros
  bool has_claims = false;
  bool head_bounce = false, tail_bounce = false;
  std::byte* bounce[2] = {nullptr, nullptr};
  iovec bounce_iov[2];
  vstore_io child[3];
  iovec slice[cow_max_segments];
};

void cow_device::req_list::push(request* r) {
  r->next = nullptr;
  if (tail) tail->next = r;
  else head = r;
  tail = r;
}

void cow_device::req_list::append(req_list& other) {
  if (other.empty()) return;
  if (tail) tail->next = other.head;
  else head = other.head;
  tail = other.tail;
  other.head = other.tail = nullptr;
}

void cow_device::free_deleter::operator()(std::byte* p) const { std::free(p); }

size_t cow_device::ctx_size() { return sizeof(request); }

cow_device::~cow_device() = default;

core::result<std::unique_ptr<cow_device>> cow_device::make(std::shared_ptr<Vstore> base,
                                                           std::unique_ptr<Vstore> overlay, bool read_only,
                                                           const core::vstore_host* host) {
  if (!base || !overlay) return core::fail(EINVAL, "a COW device needs a base and an overlay");
  const std::string ov_name = overlay->transport_name() + ":" + overlay->target();
  const std::string base_name = base->transport_name() + ":" + base->target();
  const uint64_t store = overlay->size();
  if (store < cow_header_size)
    return core::fail(EUCLEAN, "overlay " + ov_name + " is " + std::to_string(store) +
                                   " bytes, too small to be a COW overlay");

  std::unique_ptr<std::byte, free_deleter> hbuf(alloc_aligned(cow_header_size));
  if (!hbuf) return core::fail(ENOMEM, "no memory for the COW header");
  if (auto r = overlay->read(0, hbuf.get(), cow_header_size); !r)
    return core::fail(r.err().errnum(), "cannot read the header of overlay " + ov_name + ": " + r.err().message);
  auto h = parse_cow_header({hbuf.get(), cow_header_size});
  if (!h) return core::fail(h.err().errnum(), "overlay " + ov_name + ": " + h.err().message);
  if (auto r = check_cow_layout(*h, store); !r)
    return core::fail(r.err().errnum(), "overlay " + ov_name + ": " + r.err().message);

  std::unique_ptr<cow_device> d(new cow_device());
  d->disk_bitmap_.reset(alloc_aligned(h->bitmap_length));
  if (!d->disk_bitmap_) return core::fail(ENOMEM, "no memory for a COW bitmap of " + std::to_string(h->bitmap_length) + " bytes");
  if (auto r = overlay->read(h->bitmap_offset, d->disk_bitmap_.get(), h->bitmap_length); !r)
    return core::fail(r.err().errnum(), "cannot read the bitmap of overlay " + ov_name + ": " + r.err().message);
  std::span<const std::byte> bitmap(d->disk_bitmap_.get(), h->bitmap_length);
  auto allocated = check_cow_bitmap(*h, bitmap);
  if (!allocated) return core::fail(allocated.err().errnum(), "overlay " + ov_name + ": " + allocated.err().message);

  // Geometry: every child request must be aligned for the store it goes to.
  const uint32_t lbs = std::max({base->block_size(), overlay->block_size(), 512u});
  if (overlay->block_size() > cow_bitmap_page || h->block_size % lbs != 0 || h->virtual_size % lbs != 0)
    return core::fail(EINVAL, "overlay " + ov_name + " (block size " + std::to_string(h->block_size) + ", size " +
                                  std::to_string(h->virtual_size) + ") does not fit the block sizes of its stores (" +
                                  base_name + ": " + std::to_string(base->block_size()) + ", " + ov_name + ": " +
                                  std::to_string(overlay->block_size()) + ")");

  // Identity of the base: size, then content.
  if (base->size() != h->base_size)
    return core::fail(EMEDIUMTYPE, "overlay " + ov_name + " was made for a base of " + std::to_string(h->base_size) +
                                       " bytes, but base " + base_name + " has " + std::to_string(base->size()) +
                                       " bytes: refusing the wrong base");
  auto fp = fingerprint_base(*base);
  if (!fp) return core::fail(fp.err().errnum(), "base " + base_name + ": " + fp.err().message);
  if (!(*fp == h->base_fingerprint))
    return core::fail(EMEDIUMTYPE, "base " + base_name + " is not the image overlay " + ov_name +
                                       " was made from (content fingerprint " + fp->hex() + ", expected " +
                                       h->base_fingerprint.hex() + "): refusing the wrong base");

  d->host_ = host;
  d->hdr_ = std::move(*h);
  d->bs_ = d->hdr_.block_size;
  d->shift_ = static_cast<uint32_t>(std::countr_zero(d->hdr_.block_size));
  d->size_ = d->hdr_.virtual_size;
  d->blocks_ = d->hdr_.blocks();
  const size_t words = (d->blocks_ + 63) / 64;
  d->visible_.reset(new std::atomic<uint64_t>[words]);
  d->claimed_.assign(words, 0);
  d->load_visible(bitmap);
  d->page_dirty_.assign(d->hdr_.bitmap_length / cow_bitmap_page, 0);
  // A store that has the op may still not fence (file:// without fence=1).
  if (overlay->can_fence()) {
    auto q = overlay->fence(0);
    d->overlay_fences_ = q || q.err().errnum() != ENOTSUP;
  }

  core::vstore_info& in = d->info_;
  in.size = d->size_;
  in.block_size = lbs;
  in.max_transfer = 0;
  in.max_segments = cow_max_segments;
  in.opt_io_size = d->hdr_.block_size;
  in.features = core::VSTORE_F_FLUSH | core::VSTORE_F_FUA | core::VSTORE_F_DISCARD | core::VSTORE_F_DISCARD_ZEROES |
                core::VSTORE_F_WRITE_ZEROES | (base->info().features & core::VSTORE_F_ROTATIONAL);
  in.read_only = read_only || overlay->read_only() ? 1 : 0;
  // "cow:" + the overlay's identity, cut to fit.
  std::snprintf(in.id, sizeof in.id, "cow:%.*s", static_cast<int>(sizeof in.id - 5), overlay->info().id);

  d->base_ = std::move(base);
  d->overlay_ = std::move(overlay);
  return d;
}

void cow_device::load_visible(std::span<const std::byte> bitmap) {
  const size_t words = (blocks_ + 63) / 64;
  for (size_t w = 0; w < words; ++w) {
    uint64_t v = 0;
    for (uint64_t b = w * 64; b < std::min<uint64_t>(blocks_, w * 64 + 64); ++b)
      if (cow_bit(bitmap, b)) v |= uint64_t{1} << (b & 63);
    visible_[w].store(v, std::memory_order_relaxed);
  }
}

int cow_device::info(core::vstore_info* out) const {
  *out = info_;
  return 0;
}

bool cow_device::allocated(uint64_t block) const noexcept {
  return (visible_[block >> 6].load(std::memory_order_acquire) >> (block & 63)) & 1u;
}

bool cow_device::claimed(uint64_t block) const noexcept { return test_bit(claimed_, block); }

bool cow_device::covers(uint64_t off, uint64_t end, uint64_t block) const noexcept {
  uint64_t start = block << shift_;
  return off <= start && end >= std::min(start + bs_, size_);
}

// Completing is the last thing done with a request (its ctx is reused at
// once) and, when no other request is in flight, with the device: the front
// half may release it as soon as the last completion is in.
// A fence waiting for the device to drain is woken by the last one.
void cow_device::complete(request* r, int status) {
  core::vstore_req* req = r->req;
  if (in_flight_.fetch_sub(1) == 1 && draining_.load()) {
    std::lock_guard lk(gate_mu_);
    gate_cv_.notify_all();
  }
  host_->complete(host_->owner, req, status);
}

uint32_t cow_device::newest_epoch(const request* head) noexcept {
  uint32_t e = 0;
  for (; head; head = head->next) e = std::max(e, head->req->epoch);
  return e;
}

uint64_t cow_device::length(const request* head) noexcept {
  uint64_t n = 0;
  for (; head; head = head->next) ++n;
  return n;
}

int cow_device::submit(core::vstore_req* const* reqs, uint32_t n) {
  req_list list;
  for (uint32_t i = 0; i < n; ++i) {
    auto* r = new (reqs[i]->ctx) request;  // default-init: the iovec arrays stay unwritten
    r->dev = this;
    r->req = reqs[i];
    list.push(r);
  }
  {
    // Counted under the gate's lock, so a fence that closes the gate next
    // waits for these.
    std::lock_guard lk(gate_mu_);
    if (gated_) {
      gate_waiting_.append(list);
      return static_cast<int>(n);
    }
    in_flight_.fetch_add(n);
  }
  start_list(list.head);
  return static_cast<int>(n);
}

void cow_device::start_list(request* head) {
  // The first child read of each request goes to the base or the overlay in
  // one batch per store: one notification for many requests.
  constexpr uint32_t batch_max = 64;
  vstore_io* to_base[batch_max];
  vstore_io* to_overlay[batch_max];
  request* reads[batch_max];
  uint32_t nb = 0, no = 0, nr = 0;
  auto send_reads = [&] {
    if (nb) base_->submit(std::span<vstore_io* const>(to_base, nb));
    if (no) overlay_->submit(std::span<vstore_io* const>(to_overlay, no));
    for (uint32_t i = 0; i < nr; ++i)
      if (read_settle(reads[i])) read_continue(reads[i]);
    nb = no = nr = 0;
  };

  const uint32_t fenced = fenced_epoch_.load(std::memory_order_acquire);
  const int dead = dead_.load(std::memory_order_acquire);
  for (request* next; head; head = next) {
    next = head->next;
    request* r = head;
    const core::vstore_req* req = r->req;
    if (dead < 0) {
      complete(r, dead);
      continue;
    }
    if (req->epoch != 0 && req->epoch < fenced) {  // fenced off: the base would still answer it
      complete(r, -ESTALE);
      continue;
    }
    switch (req->opcode) {
      case core::VSTORE_OP_READ: {
        if (nr == batch_max) send_reads();
        Vstore* target = read_prepare(r);
        (target == base_.get() ? to_base[nb++] : to_overlay[no++]) = &r->child[0];
        reads[nr++] = r;
        break;
      }
      case core::VSTORE_OP_WRITE:
      case core::VSTORE_OP_WRITE_ZEROES:
      case core::VSTORE_OP_DISCARD:
        start_write(r);
        break;
      case core::VSTORE_OP_FLUSH: {
        r->stage = stage_flush;
        req_list one;
        one.push(r);
        flush_enqueue(one);
        break;
      }
      default:
        complete(r, -EINVAL);
    }
  }
  send_reads();
}

// ---- reads -------------------------------------------------------------

Vstore* cow_device::read_prepare(request* r) {
  const core::vstore_req* req = r->req;
  const uint64_t off = req->offset + r->cursor, end = req->offset + req->length;
  const uint64_t b = off >> shift_;
  const bool in_overlay = allocated(b);
  uint64_t run_end = std::min(end, (b + 1) << shift_);
  while (run_end < end && allocated(run_end >> shift_) == in_overlay) run_end = std::min(end, run_end + bs_);
  const uint64_t len = run_end - off;

  vstore_io& c = r->child[0];
  c = vstore_io{};
  c.opcode = core::VSTORE_OP_READ;
  c.offset = in_overlay ? hdr_.data_offset + off : off;
  c.length = len;
  c.epoch = in_overlay ? req->epoch : 0;
  c.iovcnt = slice_iov(req, r->cursor, len, r->slice);
  c.iov = r->slice;
  c.done = &on_read_done;
  c.user = r;
  r->stage = stage_read;
  r->issue.store(issue_busy, std::memory_order_relaxed);
  return in_overlay ? overlay_.get() : base_.get();
}

// After handing a child read over: true when it already completed, so the
// caller continues the request (a trampoline instead of recursion through
// stores that complete inside submit).
bool cow_device::read_settle(request* r) {
  uint8_t expected = issue_busy;
  return !r->issue.compare_exchange_strong(expected, issue_idle, std::memory_order_acq_rel);
}

void cow_device::on_read_done(vstore_io* io, int status) {
  auto* r = static_cast<request*>(io->user);
  note_status(r->status, status);
  uint8_t expected = issue_busy;
  if (r->issue.compare_exchange_strong(expected, issue_done_early, std::memory_order_acq_rel)) return;
  r->dev->read_continue(r);
}

void cow_device::read_continue(request* r) {
  for (;;) {
    if (int st = r->status.load(std::memory_order_acquire); st < 0) return complete(r, st);
    r->cursor += r->child[0].length;
    if (r->cursor >= r->req->length) return complete(r, 0);
    Vstore* target = read_prepare(r);
    target->submit(&r->child[0]);
    if (!read_settle(r)) return;
  }
}

// ---- writes ------------------------------------------------------------

void cow_device::start_write(request* r) {
  const core::vstore_req* req = r->req;
  r->zeroes = req->opcode != core::VSTORE_OP_WRITE;
  r->b0 = req->offset >> shift_;
  r->b1 = (req->offset + req->length - 1) >> shift_;
  r->scan = r->b0;
  if (int st = broken_.load(std::memory_order_acquire); st < 0) return complete(r, st);
  claim(r);
}

void cow_device::claim(request* r) {
  const uint64_t off = r->req->offset, end = off + r->req->length;
  {
    std::lock_guard lk(mu_);
    for (; r->scan <= r->b1; ++r->scan) {
      const uint64_t b = r->scan;
      if (allocated(b)) continue;
      if (claimed(b)) {  // another write is allocating it: wait for that one
        r->next = blocked_;
        blocked_ = r;
        return;
      }
      claimed_[b >> 6] |= uint64_t{1} << (b & 63);
      r->has_claims = true;
    }
    // Every unallocated block in range is ours now; only the first and the
    // last can be partly covered and need their rest from the base.
    r->head_bounce = !allocated(r->b0) && !covers(off, end, r->b0);
    r->tail_bounce = r->b1 != r->b0 && !allocated(r->b1) && !covers(off, end, r->b1);
    if (r->head_bounce) r->bounce[0] = get_bounce_locked();
    if (r->tail_bounce) r->bounce[1] = get_bounce_locked();
  }
  if ((r->head_bounce && !r->bounce[0]) || (r->tail_bounce && !r->bounce[1])) {
    req_list one;
    one.push(r);
    return finish_writes(one, -ENOMEM);
  }
  if (r->head_bounce || r->tail_bounce) copy_up(r);
  else write_data(r);
}

std::byte* cow_device::get_bounce_locked() {
  if (!bounce_free_.empty()) {
    std::byte* b = bounce_free_.back();
    bounce_free_.pop_back();
    return b;
  }
  // The pool grows to the most partial-block writes ever in flight at once.
  std::byte* b = alloc_aligned(bs_);
  if (b) bounce_all_.emplace_back(b);
  return b;
}

void cow_device::copy_up(request* r) {
  vstore_io* ios[2];
  uint32_t n = 0;
  for (int k = 0; k < 2; ++k) {
    if (!(k == 0 ? r->head_bounce : r->tail_bounce)) continue;
    const uint64_t start = (k == 0 ? r->b0 : r->b1) << shift_;
    const uint64_t len = std::min(bs_, size_ - start);
    if (len < bs_) std::memset(r->bounce[k] + len, 0, bs_ - len);
    r->bounce_iov[k] = {r->bounce[k], static_cast<size_t>(len)};
    vstore_io& c = r->child[n];
    c = vstore_io{};
    c.opcode = core::VSTORE_OP_READ;
    c.offset = start;
    c.length = len;
    c.iov = &r->bounce_iov[k];
    c.iovcnt = 1;
    c.done = &on_child_done;
    c.user = r;
    ios[n++] = &c;
  }
  r->stage = stage_copy_up;
  r->outstanding.store(n, std::memory_order_release);
  base_->submit(std::span<vstore_io* const>(ios, n));
}

void cow_device::after_copy_up(request* r) {
  if (int st = r->status.load(std::memory_order_acquire); st < 0) {
    req_list one;
    one.push(r);
    return finish_writes(one, st);
  }
  const core::vstore_req* req = r->req;
  const uint64_t off = req->offset, end = off + req->length;
  for (int k = 0; k < 2; ++k) {
    if (!(k == 0 ? r->head_bounce : r->tail_bounce)) continue;
    const uint64_t start = (k == 0 ? r->b0 : r->b1) << shift_;
    const uint64_t lo = std::max(off, start), hi = std::min(end, start + bs_);
    if (r->zeroes) std::memset(r->bounce[k] + (lo - start), 0, hi - lo);
    else copy_from_iov(req, lo - off, r->bounce[k] + (lo - start), hi - lo);
  }
  write_data(r);
}

void cow_device::write_data(request* r) {
  const core::vstore_req* req = r->req;
  const uint64_t off = req->offset, end = off + req->length;
  vstore_io* ios[3];
  uint32_t n = 0;
  auto bounce_write = [&](int k, uint64_t block) {
    r->bounce_iov[k] = {r->bounce[k], static_cast<size_t>(bs_)};
    vstore_io& c = r->child[n];
    c = vstore_io{};
    c.opcode = core::VSTORE_OP_WRITE;
    c.offset = hdr_.data_offset + (block << shift_);
    c.length = bs_;
    c.epoch = req->epoch;
    c.iov = &r->bounce_iov[k];
    c.iovcnt = 1;
    c.done = &on_child_done;
    c.user = r;
    ios[n++] = &c;
  };
  if (r->head_bounce) bounce_write(0, r->b0);
  // The rest is contiguous in the overlay: whole blocks being allocated and
  // allocated blocks written in place alike.
  const uint64_t lo = r->head_bounce ? (r->b0 + 1) << shift_ : off;
  const uint64_t hi = r->tail_bounce ? r->b1 << shift_ : end;
  if (lo < hi) {
    vstore_io& c = r->child[n];
    c = vstore_io{};
    c.offset = hdr_.data_offset + lo;
    c.length = hi - lo;
    c.epoch = req->epoch;
    if (r->zeroes) {
      c.opcode = core::VSTORE_OP_WRITE_ZEROES;
      c.flags = req->opcode == core::VSTORE_OP_WRITE_ZEROES ? (req->flags & core::VSTORE_REQ_NO_UNMAP) : 0;
    } else {
      c.opcode = core::VSTORE_OP_WRITE;
      c.iovcnt = slice_iov(req, lo - off, hi - lo, r->slice);
      c.iov = r->slice;
    }
    c.done = &on_child_done;
    c.user = r;
    ios[n++] = &c;
  }
  if (r->tail_bounce) bounce_write(1, r->b1);
  r->stage = stage_data;
  r->outstanding.store(n, std::memory_order_release);
  overlay_->submit(std::span<vstore_io* const>(ios, n));
}

void cow_device::on_child_done(vstore_io* io, int status) {
  auto* r = static_cast<request*>(io->user);
  note_status(r->status, status);
  if (r->outstanding.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  cow_device* d = r->dev;
  if (r->stage == stage_copy_up) return d->after_copy_up(r);
  // stage_data: the data is written; make it durable.
  req_list one;
  one.push(r);
  if (int st = r->status.load(std::memory_order_acquire); st < 0) return d->finish_writes(one, st);
  r->stage = stage_data_sync;
  d->flush_enqueue(one);
}

// Ends writes: on success their blocks become visible (bits are durable by
// now); on failure their claims are dropped and the blocks stay as they were.
void cow_device::finish_writes(req_list list, int status) {
  request* woken;
  {
    std::lock_guard lk(mu_);
    for (request* r = list.head; r; r = r->next) {
      if (r->has_claims) {
        for (uint64_t b = r->b0; b <= r->b1; ++b) {
          if (!claimed(b)) continue;
          claimed_[b >> 6] &= ~(uint64_t{1} << (b & 63));
          if (status == 0) visible_[b >> 6].fetch_or(uint64_t{1} << (b & 63), std::memory_order_release);
        }
      }
      for (std::byte*& b : r->bounce)
        if (b) {
          bounce_free_.push_back(b);
          b = nullptr;
        }
    }
    woken = blocked_;
    blocked_ = nullptr;
  }
  for (request* r = list.head; r;) {
    request* next = r->next;
    complete(r, status);
    r = next;
  }
  // Waiters keep the device alive: they are requests not yet completed.
  restart(woken);
}

void cow_device::restart(request* blocked) {
  while (blocked) {
    request* next = blocked->next;
    if (int st = broken_.load(std::memory_order_acquire); st < 0) {
      req_list one;
      one.push(blocked);
      finish_writes(one, st);
    } else {
      claim(blocked);
    }
    blocked = next;
  }
}

// ---- group commit --------------------------------------------------------

void cow_device::flush_enqueue(req_list list) {
  bool launch = false;
  uint32_t epoch = 0;
  {
    std::lock_guard lk(mu_);
    flush_waiting_.append(list);
    if (!flush_busy_) {
      flush_busy_ = true;
      flush_inflight_ = flush_waiting_.take();
      epoch = newest_epoch(flush_inflight_.head);
      launch = true;
    }
  }
  if (launch) submit_flush(epoch);
}

void cow_device::submit_flush(uint32_t epoch) {
  flush_io_ = vstore_io{};
  flush_io_.opcode = core::VSTORE_OP_FLUSH;
  flush_io_.epoch = epoch;
  flush_io_.done = &on_flush_done;
  flush_io_.user = this;
  overlay_->submit(&flush_io_);
}

void cow_device::on_flush_done(vstore_io* io, int status) {
  auto* d = static_cast<cow_device*>(io->user);
  request* batch;
  bool relaunch = false;
  uint32_t epoch = 0;
  {
    std::lock_guard lk(d->mu_);
    batch = d->flush_inflight_.take().head;
    if (!d->flush_waiting_.empty()) {
      d->flush_inflight_ = d->flush_waiting_.take();
      epoch = newest_epoch(d->flush_inflight_.head);
      relaunch = true;
    } else {
      d->flush_busy_ = false;
    }
  }
  // The next flush (for requests that arrived during this one) goes out
  // before this batch completes: its waiters keep the device alive.
  if (relaunch) d->submit_flush(epoch);
  d->after_sync(batch, status);
}

void cow_device::after_sync(request* batch, int status) {
  req_list done, failed, to_bitmap, broken;
  for (request* r = batch; r;) {
    request* next = r->next;
    switch (r->stage) {
      case stage_flush:
        (status < 0 ? failed : done).push(r);
        break;
      case stage_data_sync:
        if (status < 0) failed.push(r);
        else if (r->has_claims) to_bitmap.push(r);
        else done.push(r);
        break;
      default:  // stage_bitmap_sync: the bits are durable, or their state is unknown
        (status < 0 ? broken : done).push(r);
        break;
    }
    r = next;
  }
  // A sync the fence refused did not run: the bits may not be durable, but
  // no write of this epoch can land any more, and the next fence reloads.
  const int lost = status == -ESTALE ? -ESTALE : -EIO;
  if (!broken.empty()) {
    int expected = 0;
    broken_.compare_exchange_strong(expected, lost, std::memory_order_acq_rel);
  }
  // Whatever stays in flight keeps the device alive for the calls after it,
  // so the lists that end requests go last and the bitmap first.
  if (!to_bitmap.empty()) bitmap_enqueue(to_bitmap);
  if (!broken.empty()) finish_writes(broken, lost);
  if (!failed.empty()) finish_writes(failed, status);
  if (!done.empty()) finish_writes(done, 0);
}

// ---- bitmap --------------------------------------------------------------

void cow_device::bitmap_enqueue(req_list list) {
  uint32_t n = 0;
  int dead = 0;
  {
    std::lock_guard lk(mu_);
    dead = broken_.load(std::memory_order_acquire);
    if (dead == 0) {
      for (request* r = list.head; r; r = r->next) r->stage = stage_bitmap;
      bm_waiting_.append(list);
      if (!bm_busy_) {
        bm_busy_ = true;
        n = bitmap_launch_locked();
      }
    }
  }
  if (dead < 0) return finish_writes(list, dead);
  if (n) submit_bitmap(n);
}

// Sets the waiting batch's bits in the on-media bitmap image and prepares one
// write per run of dirty pages. Unchanged pages are never rewritten, and a
// batch touching many scattered pages writes the span between them once.
uint32_t cow_device::bitmap_launch_locked() {
  bm_inflight_ = bm_waiting_.take();
  auto* bm = reinterpret_cast<uint8_t*>(disk_bitmap_.get());
  uint64_t pmin = UINT64_MAX, pmax = 0;
  for (request* r = bm_inflight_.head; r; r = r->next) {
    for (uint64_t b = r->b0; b <= r->b1; ++b) {
      if (!claimed(b)) continue;
      bm[b >> 3] |= static_cast<uint8_t>(1u << (b & 7));
      uint64_t page = (b >> 3) / cow_bitmap_page;
      page_dirty_[page] = 1;
      pmin = std::min(pmin, page);
      pmax = std::max(pmax, page);
    }
  }
  if (pmin > pmax) {  // no claimed block: cannot happen for a request with claims
    pmin = pmax = 0;
    page_dirty_[0] = 1;
  }
  uint32_t runs = 0;
  for (uint64_t p = pmin; p <= pmax; ++p)
    if (page_dirty_[p] && (p == pmin || !page_dirty_[p - 1])) ++runs;
  uint32_t n = 0;
  auto add = [&](uint64_t first, uint64_t last) {
    iovec& v = bm_iov_[n];
    v = {disk_bitmap_.get() + first * cow_bitmap_page, static_cast<size_t>((last - first + 1) * cow_bitmap_page)};
    vstore_io& c = bm_io_[n];
    c = vstore_io{};
    c.opcode = core::VSTORE_OP_WRITE;
    c.offset = hdr_.bitmap_offset + first * cow_bitmap_page;
    c.length = v.iov_len;
    c.iov = &v;
    c.iovcnt = 1;
    c.done = &on_bitmap_done;
    c.user = this;
    ++n;
  };
  if (runs > max_bitmap_ios) {
    add(pmin, pmax);
  } else {
    for (uint64_t p = pmin; p <= pmax;) {
      if (!page_dirty_[p]) {
        ++p;
        continue;
      }
      uint64_t q = p;
      while (q + 1 <= pmax && page_dirty_[q + 1]) ++q;
      add(p, q);
      p = q + 1;
    }
  }
  std::fill(page_dirty_.begin() + static_cast<std::ptrdiff_t>(pmin),
            page_dirty_.begin() + static_cast<std::ptrdiff_t>(pmax) + 1, 0);
  const uint32_t epoch = newest_epoch(bm_inflight_.head);
  for (uint32_t i = 0; i < n; ++i) bm_io_[i].epoch = epoch;
  bm_status_.store(0, std::memory_order_relaxed);
  bm_outstanding_.store(n, std::memory_order_release);
  return n;
}

void cow_device::submit_bitmap(uint32_t n) {
  vstore_io* ios[max_bitmap_ios];
  for (uint32_t i = 0; i < n; ++i) ios[i] = &bm_io_[i];
  overlay_->submit(std::span<vstore_io* const>(ios, n));
}

void cow_device::on_bitmap_done(vstore_io* io, int status) {
  auto* d = static_cast<cow_device*>(io->user);
  note_status(d->bm_status_, status);
  if (d->bm_outstanding_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  const int st = d->bm_status_.load(std::memory_order_acquire);
  req_list batch, dead;
  uint32_t n = 0;
  {
    std::lock_guard lk(d->mu_);
    batch = d->bm_inflight_.take();
    if (st < 0) {
      // Some of these bits may be on media, some not: no write is trusted
      // with the bitmap again until the overlay is reopened or fenced (a
      // write the fence refused did not run, which multipath retries).
      int expected = 0;
      d->broken_.compare_exchange_strong(expected, st == -ESTALE ? -ESTALE : -EIO, std::memory_order_acq_rel);
      dead = d->bm_waiting_.take();
      d->bm_busy_ = false;
    } else if (!d->bm_waiting_.empty()) {
      n = d->bitmap_launch_locked();
    } else {
      d->bm_busy_ = false;
    }
  }
  if (n) d->submit_bitmap(n);
  if (st < 0) {
    batch.append(dead);
    return d->finish_writes(batch, st == -ESTALE ? -ESTALE : -EIO);
  }
  for (request* r = batch.head; r; r = r->next) r->stage = stage_bitmap_sync;
  d->flush_enqueue(batch);
}

}  // namespace uvd::storage
