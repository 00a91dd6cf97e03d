// SPDX-License-Identifier: Apache-2.0
// The multipath data path: dispatch, completion, path failure and reissue.
#include "storage/multipath/mp_device.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/errors.hpp"

namespace uvd::storage {

namespace {

bool is_write_class(uint16_t op) {
  return op == core::VSTORE_OP_WRITE || op == core::VSTORE_OP_DISCARD || op == core::VSTORE_OP_WRITE_ZEROES;
}

void copy_to_iov(const core::vstore_req* req, const std::byte* src, uint64_t len) {
  for (uint32_t i = 0; i < req->iovcnt && len > 0; ++i) {
    uint64_t n = std::min<uint64_t>(req->iov[i].iov_len, len);
    std::memcpy(req->iov[i].iov_base, src, n);
    src += n;
    len -= n;
  }
}

void copy_from_iov(const core::vstore_req* req, std::byte* dst, uint64_t len) {
  for (uint32_t i = 0; i < req->iovcnt && len > 0; ++i) {
    uint64_t n = std::min<uint64_t>(req->iov[i].iov_len, len);
    std::memcpy(dst, req->iov[i].iov_base, n);
    dst += n;
    len -= n;
  }
}

}  // namespace

size_t mp_device::ctx_size() { return sizeof(request); }

mp_device::~mp_device() { close(); }

int mp_device::info(core::vstore_info* out) const {
  *out = info_;
  return 0;
}

mp_device::child* mp_device::get_child_locked() {
  if (child* c = free_children_) {
    free_children_ = c->next;
    return c;
  }
  // The pool grows only when abandoned children hold buffers or the front
  // half's queue is deeper than the pool; steady state allocates nothing.
  auto c = std::make_unique<child>();
  c->buf = static_cast<std::byte*>(std::aligned_alloc(4096, max_transfer));
  if (!c->buf) return nullptr;
  c->dev = this;
  all_children_.push_back(std::move(c));
  return all_children_.back().get();
}

void mp_device::put_child_locked(child* c) {
  c->parent = nullptr;
  c->prev = nullptr;
  c->next = free_children_;
  free_children_ = c;
}

void mp_device::link_locked(path& p, child* c) {
  c->prev = p.tail;
  c->next = nullptr;
  if (p.tail) p.tail->next = c;
  else p.head = c;
  p.tail = c;
  ++p.live;
}

void mp_device::unlink_locked(path& p, child* c) {
  if (c->prev) c->prev->next = c->next;
  else p.head = c->next;
  if (c->next) c->next->prev = c->prev;
  else p.tail = c->prev;
  c->prev = c->next = nullptr;
  --p.live;
}

int mp_device::submit(core::vstore_req* const* reqs, uint32_t n) {
  std::unique_lock lk(mu_);
  const int refuse = preempted_ ? -EBADE : no_path_failing_ ? -ENOLINK : 0;
  if (refuse == 0) {
    for (uint32_t i = 0; i < n; ++i) {
      auto* r = static_cast<request*>(reqs[i]->ctx);
      *r = request{};
      r->req = reqs[i];
      if (wait_tail_) wait_tail_->next = r;
      else wait_head_ = r;
      wait_tail_ = r;
      ++waiting_;
    }
  }
  lk.unlock();
  if (refuse != 0) {
    if (refuse == -ENOLINK) {
      lk.lock();
      no_path_failed_ += n;
      lk.unlock();
    }
    for (uint32_t i = 0; i < n; ++i) host_->complete(host_->owner, reqs[i], refuse);
    return static_cast<int>(n);
  }
  kick();
  return static_cast<int>(n);
}

void mp_device::requeue_front_locked(request* r) {
  r->next = wait_head_;
  wait_head_ = r;
  if (!wait_tail_) wait_tail_ = r;
  ++waiting_;
  ++reissued_;
}

size_t mp_device::pick_path_locked() {
  const size_t n = paths_.size();
  if (mo_.policy == mp_policy::round_robin) {
    for (size_t k = 0; k < n; ++k) {
      size_t i = (rr_next_ + k) % n;
      if (paths_[i]->state == path_state::active) {
        rr_next_ = i + 1;
        return i;
      }
    }
    return n;
  }
  for (size_t i = 0; i < n; ++i)
    if (paths_[i]->state == path_state::active) return i;
  return n;
}

void mp_device::setup_child_locked(child* c, request* r, size_t idx, uint16_t opcode) {
  const core::vstore_req* q = r->req;
  c->parent = r;
  c->req = q;
  c->path = idx;
  c->st.store(child_sending, std::memory_order_relaxed);
  c->io = vstore_io{};
  c->io.opcode = opcode;
  c->io.flags = opcode == core::VSTORE_OP_FLUSH ? 0 : q->flags;
  c->io.offset = opcode == core::VSTORE_OP_FLUSH ? 0 : q->offset;
  c->io.length = opcode == core::VSTORE_OP_FLUSH ? 0 : q->length;
  c->io.epoch = fencing_ ? epoch_ : 0;
  c->io.done = &mp_device::on_child_done;
  c->io.user = c;
  if (opcode == core::VSTORE_OP_READ || opcode == core::VSTORE_OP_WRITE) {
    c->iov = {c->buf, static_cast<size_t>(q->length)};
    c->io.iov = &c->iov;
    c->io.iovcnt = 1;
  }
  path& p = *paths_[idx];
  if (is_write_class(opcode)) p.dirty = true;
  if (opcode == core::VSTORE_OP_FLUSH) p.dirty = false;
  ++p.requests;
  c->sent = clock::now();
  link_locked(p, c);
  ++r->outstanding;
  to_submit_.push_back(c);
}

// Sends r down one path (a flush: down every path that took writes since its
// last flush). False when no path can take it now.
bool mp_device::schedule_locked(request* r) {
  const uint16_t op = r->req->opcode;
  if (op == core::VSTORE_OP_FLUSH) {
    size_t targets[max_paths];
    size_t nt = 0;
    for (size_t i = 0; i < paths_.size(); ++i)
      if (paths_[i]->state != path_state::failed && paths_[i]->dirty) targets[nt++] = i;
    if (nt == 0) {
      size_t i = pick_path_locked();
      if (i == paths_.size()) return false;
      targets[nt++] = i;
    }
    r->outstanding = 0;
    for (size_t k = 0; k < nt; ++k) {
      child* c = get_child_locked();
      if (!c) {
        if (k == 0) return false;
        break;
      }
      setup_child_locked(c, r, targets[k], op);
    }
    return true;
  }
  size_t i = pick_path_locked();
  if (i == paths_.size()) return false;
  child* c = get_child_locked();
  if (!c) return false;
  r->outstanding = 0;
  setup_child_locked(c, r, i, op);
  return true;
}

void mp_device::build_locked() {
  while (wait_head_ && !need_fence_ && !preempted_ && !closed_) {
    request* r = wait_head_;
    if (!schedule_locked(r)) break;
    wait_head_ = r->next;
    if (!wait_head_) wait_tail_ = nullptr;
    r->next = nullptr;
    --waiting_;
  }
}

// One thread at a time builds children and hands them to the paths; a
// completion that arrives meanwhile (even inline, from a path's submit)
// leaves a note instead of recursing.
void mp_device::kick() {
  std::unique_lock lk(mu_);
  if (dispatching_) {
    redispatch_ = true;
    return;
  }
  dispatching_ = true;
  for (;;) {
    redispatch_ = false;
    build_locked();
    if (to_submit_.empty()) break;
    std::vector<child*> batch;
    batch.swap(to_submit_);
    lk.unlock();
    for (child* c : batch) {
      // Sending: the health thread does not abandon it before it is at the path.
      if (c->io.opcode == core::VSTORE_OP_WRITE) copy_from_iov(c->req, c->buf, c->io.length);
      c->st.store(child_live, std::memory_order_release);
      paths_[c->path]->vs->submit(&c->io);
    }
    batch.clear();
    lk.lock();
    if (to_submit_.capacity() < batch.capacity()) to_submit_.swap(batch);
    if (!redispatch_ && !wait_head_) break;
  }
  dispatching_ = false;
}

void mp_device::on_child_done(vstore_io* io, int status) {
  auto* c = static_cast<child*>(io->user);
  mp_device* d = c->dev;
  uint8_t expected = child_live;
  if (!c->st.compare_exchange_strong(expected, child_done, std::memory_order_acq_rel)) {
    // Abandoned on a silent path: its request went elsewhere long ago.
    std::lock_guard lk(d->mu_);
    path& p = *d->paths_[c->path];
    --p.abandoned;
    if (status < 0) ++p.late_errors;
    else ++p.late_ok;
    d->put_child_locked(c);
    return;
  }
  request* r = c->parent;
  if (status == 0 && io->opcode == core::VSTORE_OP_READ) copy_to_iov(r->req, c->buf, io->length);

  bool complete = false, wake = false;
  {
    std::lock_guard lk(d->mu_);
    path& p = *d->paths_[c->path];
    d->unlink_locked(p, c);
    bool retry = false;
    if (status < 0) {
      if (status == -ESTALE && io->epoch != 0 && io->epoch < d->epoch_target_) {
        retry = true;  // it met a fence raised after it was sent
      } else if (core::is_path_error(status)) {
        ++p.errors;
        p.last_error = std::string("request failed: ") + std::strerror(-status);
        if (p.state != path_state::failed) d->fail_path_locked(c->path, status, p.last_error, false);
        // It may still run on the back end if nothing fenced its epoch yet.
        if (d->fencing_ && io->epoch >= d->epoch_) d->need_fence_ = true;
        retry = true;
      }
    }
    if (retry) r->retry = true;
    else if (status < 0 && r->status == 0) r->status = status;
    if (io->opcode == core::VSTORE_OP_FLUSH && retry) p.dirty = true;
    d->put_child_locked(c);
    if (--r->outstanding == 0) {
      if (r->retry && r->status == 0) {
        r->retry = false;
        d->requeue_front_locked(r);
        wake = true;
      } else {
        complete = true;
      }
    }
    wake = wake || d->wait_head_ != nullptr;
    if (d->need_fence_) d->health_cv_.notify_all();
  }
  if (complete) d->host_->complete(d->host_->owner, r->req, r->status);
  if (wake) d->kick();
}

bool mp_device::have_healthy_locked() const {
  for (const auto& p : paths_)
    if (p->state != path_state::failed) return true;
  return false;
}

void mp_device::recompute_states_locked() {
  const size_t n = paths_.size();
  if (mo_.policy == mp_policy::round_robin) {
    for (auto& p : paths_)
      if (p->state != path_state::failed) p->state = path_state::active;
    return;
  }
  size_t active = n, preferred = n;
  for (size_t i = 0; i < n; ++i) {
    if (paths_[i]->state == path_state::failed) continue;
    if (preferred == n) preferred = i;
    if (active == n && paths_[i]->state == path_state::active) active = i;
  }
  const size_t was_active = active;
  if (mo_.failback || active == n) active = preferred;
  // Moving I/O to another back end (failback included) raises the epoch
  // first: a back end that caches state of the export (a COW device's bitmap)
  // reloads it under the fence, and the old path's late requests are refused.
  if (fencing_ && active != was_active && was_active != n) need_fence_ = true;
  for (size_t i = 0; i < n; ++i)
    if (paths_[i]->state != path_state::failed) paths_[i]->state = i == active ? path_state::active : path_state::standby;
}

void mp_device::fail_path_locked(size_t idx, int err, const std::string& why, bool silent) {
  path& p = *paths_[idx];
  if (p.state != path_state::failed) {
    p.state = path_state::failed;
    ++p.failures;
    ++failovers_;
    p.last_error = why;
    spdlog::warn("multipath {}: path {} failed ({}): {}", mo_.label, p.name, std::strerror(err < 0 ? -err : err), why);
    recompute_states_locked();
    if (!have_healthy_locked() && !no_path_) {
      no_path_ = true;
      no_path_since_ = clock::now();
      spdlog::error("multipath {}: no healthy path; queueing for up to {} ms", mo_.label, mo_.queue_if_no_path.count());
    }
  }
  if (fencing_) need_fence_ = true;
  if (silent) {
    if (fencing_) abandon_locked(p);
    else if (p.head)
      spdlog::warn("multipath {}: path {} is silent and cannot be fenced: its {} requests stay on it until it answers",
                   mo_.label, p.name, p.live);
  }
  health_cv_.notify_all();
}

// Gives up the live children of a silent path: their requests are reissued
// once the fence is raised (dispatch is paused until then).
void mp_device::abandon_locked(path& p) {
  for (child* c = p.head; c;) {
    child* next = c->next;
    uint8_t expected = child_live;
    // A child still being sent, or whose completion is already running (it
    // waits for mu_), is left to that thread.
    if (c->st.compare_exchange_strong(expected, child_abandoned, std::memory_order_acq_rel)) {
      unlink_locked(p, c);
      ++p.abandoned;
      request* r = c->parent;
      r->retry = true;
      if (--r->outstanding == 0) {
        r->retry = false;
        if (r->status == 0) requeue_front_locked(r);
        else completions_.push_back(r);
      }
    }
    c = next;
  }
}

void mp_device::fail_waiting_locked(int status, std::vector<request*>& out) {
  while (request* r = wait_head_) {
    wait_head_ = r->next;
    r->next = nullptr;
    r->status = status;
    out.push_back(r);
  }
  wait_tail_ = nullptr;
  waiting_ = 0;
}

}  // namespace uvd::storage
