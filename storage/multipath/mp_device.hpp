// SPDX-License-Identifier: Apache-2.0
#pragma once
// The multipath device behind multipath_vstore_ops (private to storage/multipath).
//
// A request from the front half above (vstore_req, its mp_request in ctx)
// goes down one path as a child: a pooled mp_child carrying its own vstore_io
// and bounce buffer. The child sits in its path's in-flight list (oldest
// first) until its done(). Outcomes:
//   success            reads copy the bounce buffer out; the request completes
//   request error      completes the request with it (every path would say so)
//   path error         the path fails; the request waits for the fence, then
//                      is reissued on a surviving path
//   ESTALE, old epoch  the request met a fence raised meanwhile: reissued
// A child older than io_timeout marks its path silent; after fencing, every
// live child of it is abandoned (its bounce buffer stays with it until the
// path returns it, then goes back to the pool) and its request reissued.
//
// One mutex guards the state; data copies and calls into the paths happen
// outside it. A health thread runs checks, silence detection, fences and the
// queue-if-no-path timer (mp_health.cpp). A reopen thread closes a dead
// path's Vstore and opens it again from its URI (mp_reopen.cpp).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/vstore_ops.hpp"
#include "storage/multipath/multipath.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage {

// Whether v fences: its table has the op and the device does not answer ENOTSUP.
bool mp_path_fences(Vstore& v);

class mp_device : public std::enable_shared_from_this<mp_device> {
 public:
  using clock = std::chrono::steady_clock;
  // Largest request the device takes (its bounce buffers' size).
  static constexpr uint32_t max_transfer = 256 * 1024;
  static constexpr size_t max_paths = 16;

  static core::result<std::shared_ptr<mp_device>> make(std::vector<std::unique_ptr<Vstore>> paths,
                                                       const multipath_options& mo, bool read_only,
                                                       const core::vstore_host* host, path_reopen reopen = {});
  ~mp_device();
  mp_device(const mp_device&) = delete;
  mp_device& operator=(const mp_device&) = delete;

  int info(core::vstore_info* out) const;
  static size_t ctx_size();
  int submit(core::vstore_req* const* reqs, uint32_t n);
  // Stops the health thread and closes the paths (waits for abandoned requests).
  void close();

  multipath_status status();
  void check_now();

 private:
  // The per-request context, in vstore_req::ctx.
  struct request {
    core::vstore_req* req = nullptr;
    request* next = nullptr;   // wait queue link
    uint32_t outstanding = 0;  // children in flight (several for a flush)
    int status = 0;            // first request/media error
    bool retry = false;        // a child must be reissued
  };
  // sending: built, data being copied; live: at the path; done: completing;
  // abandoned: given up on a silent path (its request went elsewhere).
  enum : uint8_t { child_sending = 0, child_live = 1, child_done = 2, child_abandoned = 3 };
  struct child {
    vstore_io io;
    iovec iov{};
    std::byte* buf = nullptr;  // max_transfer bytes, 4 KiB aligned
    mp_device* dev = nullptr;
    request* parent = nullptr;
    const core::vstore_req* req = nullptr;
    size_t path = 0;
    child* prev = nullptr;     // path in-flight list / free list
    child* next = nullptr;
    clock::time_point sent{};
    std::atomic<uint8_t> st{child_done};
    ~child() { std::free(buf); }
  };
  struct path {
    std::unique_ptr<Vstore> vs;
    std::string name;
    size_t idx = 0;
    mp_device* dev = nullptr;
    path_state state = path_state::standby;
    bool can_fence = false;
    bool dirty = false;         // took writes since its last flush
    child* head = nullptr;      // in flight, oldest first
    child* tail = nullptr;
    uint64_t live = 0;
    uint64_t abandoned = 0;
    uint64_t requests = 0, errors = 0, failures = 0, late_ok = 0, late_errors = 0;
    std::string last_error;
    // The health check: a one-block read.
    vstore_io probe;
    iovec probe_iov{};
    std::byte* probe_buf = nullptr;
    bool probe_busy = false;
    clock::time_point probe_sent{};
    // Reopening (mp_reopen.cpp). vs is null while closed or between attempts.
    std::string uri;            // where it is opened again; empty: never
    bool dead = false;          // failed, and its last check failed with a path error
    uint32_t ctl_users = 0;     // threads using vs outside mu_ (a fence)
    clock::duration reopen_delay{};  // backoff after the last attempt
    clock::time_point next_reopen{};
    uint64_t reopens = 0;       // attempts
    ~path() { std::free(probe_buf); }
  };

  mp_device() = default;

  // Data path (mp_device.cpp).
  void kick();
  void build_locked();
  bool schedule_locked(request* r);
  size_t pick_path_locked();
  void setup_child_locked(child* c, request* r, size_t idx, uint16_t opcode);
  child* get_child_locked();
  void put_child_locked(child* c);
  void link_locked(path& p, child* c);
  void unlink_locked(path& p, child* c);
  static void on_child_done(vstore_io* io, int status);
  void requeue_front_locked(request* r);
  void recompute_states_locked();
  bool have_healthy_locked() const;
  void fail_path_locked(size_t idx, int err, const std::string& why, bool silent);
  void abandon_locked(path& p);
  void fail_waiting_locked(int status, std::vector<request*>& out);

  // Health (mp_health.cpp).
  void health_loop();
  void run_fence(std::unique_lock<std::mutex>& lk);
  void check_silence_locked(clock::time_point now);
  void launch_probes(std::unique_lock<std::mutex>& lk, clock::time_point now);
  static void on_probe_done(vstore_io* io, int status);
  void check_no_path_locked(clock::time_point now);
  void complete_pending(std::unique_lock<std::mutex>& lk);
  core::result<void> initial_fence();

  // Reopen (mp_reopen.cpp).
  void reopen_loop();
  path* due_for_reopen_locked(clock::time_point now, clock::time_point* next);
  std::string reopen_refusal(const Vstore& v) const;
  void mark_dead_locked(path& p);

  multipath_options mo_;
  const core::vstore_host* host_ = nullptr;
  core::vstore_info info_{};
  bool fencing_ = false;
  bool read_only_ = false;

  std::vector<std::unique_ptr<path>> paths_;

  std::mutex mu_;
  std::condition_variable health_cv_;
  std::vector<request*> completions_;  // to complete once mu_ is released (rare paths)
  std::thread health_;
  std::thread reopener_;
  std::condition_variable reopen_cv_;
  core::registry* reg_ = nullptr;  // where dead paths are opened again (null: never)
  open_options path_oo_;
  std::string medium_id_;          // the first path's vstore_info::id
  bool stop_ = false;
  bool closed_ = false;
  bool check_requested_ = false;

  request* wait_head_ = nullptr;  // requests waiting to be (re)dispatched, FIFO
  request* wait_tail_ = nullptr;
  uint64_t waiting_ = 0;
  bool dispatching_ = false, redispatch_ = false;
  std::vector<child*> to_submit_;  // used by the one dispatching thread

  child* free_children_ = nullptr;
  std::vector<std::unique_ptr<child>> all_children_;

  uint32_t epoch_ = 0;         // stamped on every request (0 when not fencing)
  uint32_t epoch_target_ = 0;  // the newest epoch asked for
  bool need_fence_ = false;    // dispatch paused until the epoch is raised
  bool preempted_ = false;     // another owner fenced past us
  size_t rr_next_ = 0;
  bool no_path_ = false;
  clock::time_point no_path_since_{};
  bool no_path_failing_ = false;

  uint64_t failovers_ = 0, reissued_ = 0, fences_ = 0, no_path_failed_ = 0;
};

}  // namespace uvd::storage
