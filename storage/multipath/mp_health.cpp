// SPDX-License-Identifier: Apache-2.0
// The multipath control side: open, health checks, silence detection,
// fencing, failback, queue-if-no-path, close and status.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>

#include "core/errors.hpp"
#include "storage/multipath/mp_device.hpp"

namespace uvd::storage {

namespace {

using namespace std::chrono_literals;

std::string path_name(const Vstore& v) { return v.transport_name() + ":" + v.target(); }

}  // namespace

// A table with a fence op may still not fence this device (file:// without
// fence=1 answers ENOTSUP); any other answer, even a path error, says it can.
bool mp_path_fences(Vstore& v) {
  if (!v.can_fence()) return false;
  auto q = v.fence(0);
  return q || q.err().errnum() != ENOTSUP;
}

namespace {

}  // namespace

core::result<std::shared_ptr<mp_device>> mp_device::make(std::vector<std::unique_ptr<Vstore>> paths,
                                                         const multipath_options& mo, bool read_only,
                                                         const core::vstore_host* host, path_reopen reopen) {
  if (paths.empty() || paths.size() > max_paths)
    return core::fail(EINVAL, "a multipath device needs 1.." + std::to_string(max_paths) + " paths, got " +
                                  std::to_string(paths.size()));
  if (mo.check_interval <= 0ms || mo.io_timeout <= 0ms || mo.queue_if_no_path < 0ms)
    return core::fail(EINVAL, "multipath: check_interval and io_timeout must be positive, queue_if_no_path not negative");
  for (const auto& p : paths)
    if (!p) return core::fail(EINVAL, "multipath: a path is missing");
  if (!reopen.uris.empty() && (reopen.uris.size() != paths.size() || !reopen.registry))
    return core::fail(EINVAL, "multipath: reopening needs a registry and one URI per path");

  const Vstore& first = *paths[0];
  std::shared_ptr<mp_device> d(new mp_device());
  d->mo_ = mo;
  d->host_ = host;
  d->read_only_ = read_only;
  core::vstore_info& in = d->info_;
  in.size = first.size();
  in.block_size = 512;
  in.max_transfer = max_transfer;
  in.max_segments = 0;  // the data is copied through our buffers
  in.mem_align = 0;
  // FUA and write-zeroes are always taken: a path's own front half emulates them.
  in.features = core::VSTORE_F_FUA | core::VSTORE_F_WRITE_ZEROES | core::VSTORE_F_DISCARD | core::VSTORE_F_DISCARD_ZEROES;
  bool all_fence = true;
  std::string cannot_fence;
  std::vector<bool> fences;
  for (const auto& p : paths) {
    const auto& pi = p->info();
    if (pi.size != in.size)
      return core::fail(EINVAL, "multipath: path " + path_name(*p) + " has " + std::to_string(pi.size) + " bytes, but " +
                                    path_name(first) + " has " + std::to_string(in.size) + ": not one medium");
    if (mo.check_id && std::strncmp(pi.id, first.info().id, sizeof pi.id) != 0)
      return core::fail(EMEDIUMTYPE, "multipath: path " + path_name(*p) + " reaches medium '" + pi.id + "', but " +
                                         path_name(first) + " reaches '" + first.info().id +
                                         "' (check_id=0 to accept paths whose id names the path)");
    in.block_size = std::max(in.block_size, p->block_size());
    in.opt_io_size = std::max(in.opt_io_size, pi.opt_io_size);
    in.features &= pi.features | core::VSTORE_F_FUA | core::VSTORE_F_WRITE_ZEROES;
    in.features |= pi.features & (core::VSTORE_F_FLUSH | core::VSTORE_F_ROTATIONAL);
    if (p->read_only()) in.read_only = 1;
    fences.push_back(mo.fence != mp_fence::off && mp_path_fences(*p));
    if (!fences.back()) {
      all_fence = false;
      if (cannot_fence.empty()) cannot_fence = path_name(*p);
    }
  }
  if (!(in.features & core::VSTORE_F_DISCARD)) in.features &= ~uint64_t{core::VSTORE_F_DISCARD_ZEROES};
  if (read_only) in.read_only = 1;
  if (in.size % in.block_size)
    return core::fail(EINVAL, "multipath: size " + std::to_string(in.size) + " is not a multiple of block size " +
                                  std::to_string(in.block_size));
  if (mo.fence == mp_fence::required && !all_fence)
    return core::fail(ENOTSUP, "multipath: fence=required, but path " + cannot_fence + " cannot fence");
  d->fencing_ = mo.fence != mp_fence::off && all_fence;
  std::snprintf(in.id, sizeof in.id, "multipath:%.*s", static_cast<int>(sizeof in.id - 11), first.info().id);
  if (d->mo_.label.empty()) d->mo_.label = path_name(first);

  for (size_t i = 0; i < paths.size(); ++i) {
    auto p = std::make_unique<path>();
    p->name = path_name(*paths[i]);
    p->idx = i;
    p->dev = d.get();
    p->can_fence = fences[i];
    if (!reopen.uris.empty()) p->uri = reopen.uris[i];
    size_t bytes = (in.block_size + 4095) / 4096 * 4096;
    p->probe_buf = static_cast<std::byte*>(std::aligned_alloc(4096, bytes));
    if (!p->probe_buf) return core::fail(ENOMEM, "multipath: no memory for a health check buffer");
    p->vs = std::move(paths[i]);
    d->paths_.push_back(std::move(p));
  }
  {
    std::lock_guard lk(d->mu_);
    d->recompute_states_locked();
    for (int i = 0; i < 32; ++i)
      if (child* c = d->get_child_locked()) d->put_child_locked(c);
    d->to_submit_.reserve(64);
    d->completions_.reserve(16);
  }
  d->medium_id_ = first.info().id;
  if (!reopen.uris.empty()) {
    d->reg_ = reopen.registry;
    d->path_oo_ = reopen.options;
  }
  if (auto r = d->initial_fence(); !r) return core::fail(std::move(r).err());
  d->health_ = std::thread([dev = d.get()] { dev->health_loop(); });
  if (d->reg_) d->reopener_ = std::thread([dev = d.get()] { dev->reopen_loop(); });
  spdlog::debug("multipath {}: {} paths, policy {}, fencing {}, epoch {}", d->mo_.label, d->paths_.size(),
                to_string(mo.policy), d->fencing_ ? "on" : "off", d->epoch_);
  return d;
}

// Takes the export: an epoch newer than any before, so the requests of an
// earlier owner (a previous run, a crashed host) can no longer land.
core::result<void> mp_device::initial_fence() {
  if (!fencing_) return core::ok();
  std::string why;
  for (int attempt = 0; attempt < 4; ++attempt) {
    uint32_t current = 0;
    bool answered = false;
    for (auto& p : paths_) {
      auto q = p->vs->fence(0);
      if (q) {
        current = std::max(current, *q);
        answered = true;
      } else {
        why = q.err().what();
      }
    }
    if (!answered) return core::fail(ENOLINK, "multipath: no path answered a fence query: " + why);
    if (current >= INT32_MAX) return core::fail(ERANGE, "multipath: the export's epoch is exhausted");
    const uint32_t target = current + 1;
    bool raced = false;
    for (auto& p : paths_) {
      auto r = p->vs->fence(target);
      if (r) {
        std::lock_guard lk(mu_);
        epoch_ = epoch_target_ = target;
        ++fences_;
        return core::ok();
      }
      why = r.err().what();
      if (r.err().errnum() == ESTALE) {
        raced = true;  // someone else fenced meanwhile: ask again
        break;
      }
    }
    if (!raced) break;
  }
  return core::fail(ENOLINK, "multipath: cannot take the export's fence: " + why);
}

void mp_device::health_loop() {
  std::unique_lock lk(mu_);
  const auto base = std::min(mo_.check_interval, mo_.io_timeout);
  const auto tick = std::clamp<clock::duration>(base / 10, 5ms, 100ms);
  auto next_check = clock::now() + mo_.check_interval;
  while (!stop_) {
    if (need_fence_ && !preempted_) run_fence(lk);
    auto now = clock::now();
    check_silence_locked(now);
    if (need_fence_ && !preempted_ && have_healthy_locked()) run_fence(lk);
    now = clock::now();
    if (check_requested_ || now >= next_check) {
      check_requested_ = false;
      next_check = now + mo_.check_interval;
      launch_probes(lk, now);
    }
    check_no_path_locked(clock::now());
    complete_pending(lk);
    if (stop_) break;
    health_cv_.wait_until(lk, std::min(next_check, clock::now() + tick));
  }
}

void mp_device::complete_pending(std::unique_lock<std::mutex>& lk) {
  if (completions_.empty()) return;
  std::vector<request*> batch;
  batch.swap(completions_);
  lk.unlock();
  for (request* r : batch) host_->complete(host_->owner, r->req, r->status);
  lk.lock();
}

// Raises the epoch through a surviving path; dispatch resumes after it.
void mp_device::run_fence(std::unique_lock<std::mutex>& lk) {
  while (need_fence_ && !stop_ && !preempted_) {
    size_t pick = paths_.size();
    for (size_t i = 0; i < paths_.size() && pick == paths_.size(); ++i)
      if (paths_[i]->state == path_state::active && paths_[i]->can_fence) pick = i;
    for (size_t i = 0; i < paths_.size() && pick == paths_.size(); ++i)
      if (paths_[i]->state == path_state::standby && paths_[i]->can_fence) pick = i;
    if (pick == paths_.size()) return;  // no path: wait for one to return
    const uint32_t target = std::max(epoch_, epoch_target_) + 1;
    if (target > static_cast<uint32_t>(INT32_MAX)) {
      spdlog::error("multipath {}: fencing epochs exhausted", mo_.label);
      preempted_ = true;
      fail_waiting_locked(-EBADE, completions_);
      return;
    }
    epoch_target_ = target;
    Vstore* vs = paths_[pick]->vs.get();
    ++paths_[pick]->ctl_users;  // not reopened under the fence
    lk.unlock();
    auto t0 = clock::now();
    auto r = vs->fence(target);
    auto took = clock::now() - t0;
    lk.lock();
    --paths_[pick]->ctl_users;
    if (r) {
      epoch_ = target;
      need_fence_ = false;
      ++fences_;
      spdlog::info("multipath {}: fenced to epoch {} through {} in {} us", mo_.label, target, paths_[pick]->name,
                   std::chrono::duration_cast<std::chrono::microseconds>(took).count());
      lk.unlock();
      kick();
      lk.lock();
      return;
    }
    const int err = r.err().errnum();
    if (err == ESTALE) {
      // A fresh epoch refused: another owner fenced past us (a preempted reservation).
      spdlog::error("multipath {}: fenced out by another owner of the export: {}", mo_.label, r.err().what());
      preempted_ = true;
      fail_waiting_locked(-EBADE, completions_);
      return;
    }
    ++paths_[pick]->errors;
    fail_path_locked(pick, err, "fence failed: " + r.err().what(), false);
  }
}

// A request (or check) outstanding past io_timeout: the path went silent.
void mp_device::check_silence_locked(clock::time_point now) {
  for (size_t i = 0; i < paths_.size(); ++i) {
    path& p = *paths_[i];
    bool stuck_req = false;
    for (child* c = p.head; c; c = c->next) {
      if (now - c->sent <= mo_.io_timeout) break;  // oldest first
      if (c->st.load(std::memory_order_acquire) == child_live) {
        stuck_req = true;
        break;
      }
    }
    const bool stuck_probe = p.probe_busy && now - p.probe_sent > mo_.io_timeout;
    if (!stuck_req && !(stuck_probe && p.state != path_state::failed)) continue;
    if (stuck_req && p.state == path_state::failed && !fencing_) continue;  // said so once already
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(mo_.io_timeout).count();
    fail_path_locked(i, ETIMEDOUT,
                     std::string(stuck_req ? "a request" : "the health check") + " unanswered for over " +
                         std::to_string(ms) + " ms",
                     true);
  }
}

void mp_device::launch_probes(std::unique_lock<std::mutex>& lk, clock::time_point now) {
  path* send[max_paths];
  size_t n = 0;
  for (auto& pp : paths_) {
    path& p = *pp;
    if (p.probe_busy || !p.vs) continue;
    p.probe = vstore_io{};
    p.probe.opcode = core::VSTORE_OP_READ;
    p.probe.offset = 0;
    p.probe.length = info_.block_size;
    p.probe_iov = {p.probe_buf, info_.block_size};
    p.probe.iov = &p.probe_iov;
    p.probe.iovcnt = 1;
    p.probe.epoch = fencing_ ? epoch_ : 0;
    p.probe.done = &mp_device::on_probe_done;
    p.probe.user = &p;
    p.probe_busy = true;
    p.probe_sent = now;
    send[n++] = &p;
  }
  lk.unlock();
  for (size_t i = 0; i < n; ++i) send[i]->vs->submit(&send[i]->probe);
  lk.lock();
}

void mp_device::on_probe_done(vstore_io* io, int status) {
  auto* p = static_cast<path*>(io->user);
  mp_device* d = p->dev;
  bool returned = false;
  {
    std::lock_guard lk(d->mu_);
    p->probe_busy = false;
    const bool fenced_meanwhile = status == -ESTALE && io->epoch != 0 && io->epoch < d->epoch_target_;
    if (fenced_meanwhile) {
      // Says nothing about the path; the next check carries the new epoch.
    } else if (status == 0 || !core::is_path_error(status)) {
      // An answer, even a media error, means the path is there.
      p->dead = false;
      p->reopen_delay = {};
      if (p->state == path_state::failed && !d->stop_) {
        p->state = path_state::standby;
        d->recompute_states_locked();
        d->no_path_ = false;
        d->no_path_failing_ = false;
        returned = true;
        spdlog::info("multipath {}: path {} returned ({})", d->mo_.label, p->name, to_string(p->state));
      }
    } else {
      ++p->errors;
      p->last_error = std::string("health check failed: ") + std::strerror(-status);
      if (p->state != path_state::failed) d->fail_path_locked(p->idx, status, p->last_error, false);
      d->mark_dead_locked(*p);
    }
  }
  if (returned) d->kick();
}

void mp_device::check_no_path_locked(clock::time_point now) {
  if (have_healthy_locked()) {
    no_path_ = false;
    no_path_failing_ = false;
    return;
  }
  if (!no_path_) {
    no_path_ = true;
    no_path_since_ = now;
  }
  if (!no_path_failing_ && now - no_path_since_ >= mo_.queue_if_no_path) {
    no_path_failing_ = true;
    spdlog::error("multipath {}: no path for {} ms: failing queued and new requests", mo_.label,
                  mo_.queue_if_no_path.count());
  }
  if (no_path_failing_ && wait_head_) {
    size_t before = completions_.size();
    fail_waiting_locked(-ENOLINK, completions_);
    no_path_failed_ += completions_.size() - before;
  }
}

void mp_device::check_now() {
  std::lock_guard lk(mu_);
  check_requested_ = true;
  health_cv_.notify_all();
}

void mp_device::close() {
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    stop_ = true;
    health_cv_.notify_all();
    reopen_cv_.notify_all();
  }
  if (health_.joinable()) health_.join();
  if (reopener_.joinable()) reopener_.join();
  {
    std::unique_lock lk(mu_);
    complete_pending(lk);
    closed_ = true;
  }
  // Every request of the front half has completed (the release contract);
  // closing a path waits for what it still holds: abandoned children, checks.
  for (auto& p : paths_) p->vs.reset();
}

multipath_status mp_device::status() {
  std::lock_guard lk(mu_);
  multipath_status s;
  s.label = mo_.label;
  s.policy = mo_.policy;
  s.fencing = fencing_;
  s.open = !closed_;
  s.epoch = epoch_;
  s.failovers = failovers_;
  s.reissued = reissued_;
  s.fences = fences_;
  s.queued = waiting_;
  s.no_path_failed = no_path_failed_;
  for (const auto& p : paths_) {
    path_status ps;
    ps.name = p->name;
    ps.state = p->state;
    ps.can_fence = p->can_fence;
    ps.requests = p->requests;
    ps.errors = p->errors;
    ps.failures = p->failures;
    ps.in_flight = p->live;
    ps.abandoned = p->abandoned;
    ps.reopens = p->reopens;
    ps.late_ok = p->late_ok;
    ps.late_refused = p->late_errors;
    ps.last_error = p->last_error;
    s.paths.push_back(std::move(ps));
  }
  return s;
}

}  // namespace uvd::storage
