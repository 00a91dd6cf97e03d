// SPDX-License-Identifier: Apache-2.0
// Reinstating dead paths. A transport whose connection is gone may never come
// back by itself (the rdma client does not reconnect: every request after a
// lost connection fails at once). Like multipath-tools, which reopens a path's
// device when its checker finds it usable again, the device closes a failed
// path whose check failed with a path error and opens it again from its URI:
// at once, then after check_interval, doubling up to reopen_max. The new
// device must reach the same medium (size, id, fencing); it carries I/O again
// only after a health check on it succeeds, which is also when it fails back.
//
// A path is closed only while nothing of this device is in it: no request,
// no abandoned request of a silent path (its transport must return them
// first), no check, no fence. So closing never waits for a hung transport and
// never frees a buffer the old device might still write.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "storage/multipath/mp_device.hpp"

namespace uvd::storage {

void mp_device::mark_dead_locked(path& p) {
  if (!reg_ || p.uri.empty() || p.dead) return;
  p.dead = true;
  reopen_cv_.notify_all();
}

mp_device::path* mp_device::due_for_reopen_locked(clock::time_point now, clock::time_point* next) {
  for (auto& pp : paths_) {
    path& p = *pp;
    if (!p.dead || p.state != path_state::failed) continue;
    if (p.live || p.abandoned || p.probe_busy || p.ctl_users) continue;  // wait until it holds nothing of ours
    if (p.next_reopen <= now) return &p;
    *next = std::min(*next, p.next_reopen);
  }
  return nullptr;
}

// Empty if v may replace a path of this device, else why not.
std::string mp_device::reopen_refusal(const Vstore& v) const {
  const auto& vi = v.info();
  if (vi.size != info_.size)
    return "it now has " + std::to_string(vi.size) + " bytes, not " + std::to_string(info_.size);
  if (mo_.check_id && std::strncmp(vi.id, medium_id_.c_str(), sizeof vi.id) != 0)
    return "it now reaches medium '" + std::string(vi.id) + "', not '" + medium_id_ + "'";
  if (v.block_size() > info_.block_size || info_.block_size % v.block_size())
    return "its block size is now " + std::to_string(v.block_size());
  if (vi.read_only && !info_.read_only) return "it is read-only now";
  return {};
}

void mp_device::reopen_loop() {
  std::unique_lock lk(mu_);
  const auto cap = mo_.reopen_max > std::chrono::milliseconds::zero() ? mo_.reopen_max : 4 * mo_.check_interval;
  while (!stop_) {
    auto next = clock::time_point::max();
    path* due = due_for_reopen_locked(clock::now(), &next);
    if (!due) {
      // Woken by a path marked dead, or by stop; a busy dead path is looked
      // at again every check interval (its requests come back meanwhile).
      reopen_cv_.wait_until(lk, std::min(next, clock::now() + mo_.check_interval));
      continue;
    }
    path& p = *due;
    std::unique_ptr<Vstore> old = std::move(p.vs);  // probes skip a path without a device
    ++p.reopens;
    lk.unlock();
    old.reset();  // nothing of ours is in it: this does not wait on the dead transport
    auto v = Vstore::open(*reg_, p.uri, path_oo_);
    std::string why;
    if (!v) why = v.err().what();
    else if (why = reopen_refusal(**v); why.empty() && fencing_ && !mp_path_fences(**v))
      why = "it cannot fence any more";
    lk.lock();
    p.reopen_delay = p.reopen_delay == clock::duration{} ? clock::duration(mo_.check_interval)
                                                          : std::min<clock::duration>(2 * p.reopen_delay, cap);
    p.next_reopen = clock::now() + p.reopen_delay;
    if (!why.empty()) {
      p.last_error = "reopen: " + why;
      spdlog::warn("multipath {}: path {} does not reopen from {}: {} (next attempt in {} ms)", mo_.label, p.name,
                   p.uri, why, std::chrono::duration_cast<std::chrono::milliseconds>(p.reopen_delay).count());
      if (v) {
        lk.unlock();
        v->reset();  // never used: nothing in flight
        lk.lock();
      }
      continue;
    }
    p.vs = std::move(*v);
    p.dead = false;  // until its check says otherwise
    spdlog::info("multipath {}: path {} reopened from {}; it returns once a check passes", mo_.label, p.name, p.uri);
    check_requested_ = true;
    health_cv_.notify_all();
  }
}

}  // namespace uvd::storage
