// SPDX-License-Identifier: Apache-2.0
#include "net/pump.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <mutex>
#include <thread>
#include <vector>

namespace uvd::net {

namespace {

// One direction: from.rx -> to.tx, for source queues [first, last).
struct lane {
  Veth& from;
  Veth& to;
  uint32_t budget;
  uint32_t first, last;
  std::mutex* to_mu;  // held around to's tx calls when several threads feed it
  std::vector<std::vector<veth_frame>> frames;  // per source queue: the last rx burst
  std::vector<std::vector<veth_frame*>> ptrs;
  std::vector<uint32_t> off, left;              // frames of that burst not yet taken

  lane(Veth& f, Veth& t, uint32_t b, uint32_t first_q, uint32_t last_q, std::mutex* mu = nullptr)
      : from(f), to(t), budget(b), first(first_q), last(last_q), to_mu(mu) {
    frames.resize(f.nqueues());
    ptrs.resize(f.nqueues());
    off.assign(f.nqueues(), 0);
    left.assign(f.nqueues(), 0);
    for (uint32_t q = first; q < last; ++q) {
      frames[q].resize(b);
      ptrs[q].resize(b);
      for (uint32_t i = 0; i < b; ++i) ptrs[q][i] = &frames[q][i];
    }
  }

  std::unique_lock<std::mutex> lock_to() { return to_mu ? std::unique_lock(*to_mu) : std::unique_lock<std::mutex>(); }

  // True when there is more to do at once.
  bool move() {
    bool more = false;
    for (uint32_t q = first; q < last; ++q) {
      uint32_t tq = q % to.nqueues();
      if (left[q]) {
        auto lk = lock_to();
        if (!to.tx_flush(tq)) continue;
        uint32_t took = to.tx_burst(tq, ptrs[q].data() + off[q], left[q]);
        off[q] += took;
        left[q] -= took;
        if (left[q]) continue;  // still full: wait for its wake-up
        more = true;
      } else if (to.tx_backlogged(tq)) {
        auto lk = lock_to();
        if (!to.tx_flush(tq)) continue;
      }
      uint32_t n = from.rx_burst(q, frames[q].data(), budget);
      if (n) {
        auto lk = lock_to();
        uint32_t took = to.tx_flush(tq) ? to.tx_burst(tq, ptrs[q].data(), n) : 0;
        off[q] = took;
        left[q] = n - took;
      }
      more |= (n == budget && !left[q]) || from.rx_pending(q);
    }
    return more;
  }

  bool stuck() const {
    for (uint32_t q = first; q < last; ++q)
      if (left[q]) return true;
    return false;
  }
};

void add_fd(int ep, int fd) {
  if (fd < 0) return;
  epoll_event ev{.events = EPOLLIN, .data = {.fd = fd}};
  ::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

// A worker for host queues [first, last) of a multi-queue host: host rx ->
// front tx only (the main loop owns everything else). It cannot wait on the
// front's event_fd (the main loop drains it), so while the front is full it
// looks again every millisecond. Ends when stop_fd is readable.
void host_queue_worker(Veth& front, Veth& host, int stop_fd, int quit_fd, uint32_t q, std::mutex& front_tx,
                       uint32_t budget) {
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) {
    spdlog::error("veth: worker for queue {}: epoll_create1 failed", q);
    return;
  }
  add_fd(ep, stop_fd);
  add_fd(ep, quit_fd);
  add_fd(ep, host.rx_fd(q));
  lane in(host, front, budget, q, q + 1, &front_tx);
  bool more = true;
  for (;;) {
    epoll_event evs[4];
    int n = ::epoll_wait(ep, evs, 4, more ? 0 : in.stuck() ? 1 : 200);
    bool stop = false;
    for (int i = 0; i < n; ++i) stop |= evs[i].data.fd == stop_fd || evs[i].data.fd == quit_fd;
    if (stop || (n < 0 && errno != EINTR)) break;
    more = in.move();
  }
  ::close(ep);
}

}  // namespace

core::result<void> pump(Veth& front, Veth& host, int stop_fd, const pump_options& o) {
  // Host queue 0 (and every host queue without workers) is served here.
  const uint32_t own_host_queues = o.queue_workers ? 1 : host.nqueues();
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return core::fail(errno, "epoll_create1");
  add_fd(ep, stop_fd);
  for (Veth* v : {&front, &host}) {
    add_fd(ep, v->event_fd());
    uint32_t nq = v == &host ? own_host_queues : v->nqueues();
    for (uint32_t q = 0; q < nq; ++q) add_fd(ep, v->rx_fd(q));
  }
  std::mutex front_tx;
  lane out(front, host, o.budget, 0, front.nqueues());
  lane in(host, front, o.budget, 0, own_host_queues, o.queue_workers ? &front_tx : nullptr);
  // The workers stop on the caller's stop_fd or, whatever ends this loop, on quit.
  struct workers_t {
    int quit = ::eventfd(0, EFD_CLOEXEC);
    std::vector<std::thread> t;
    ~workers_t() {
      uint64_t one = 1;
      [[maybe_unused]] ssize_t r = ::write(quit, &one, sizeof one);
      for (auto& w : t) w.join();
      ::close(quit);
    }
  } workers;
  for (uint32_t q = own_host_queues; q < host.nqueues(); ++q)
    workers.t.emplace_back([&, q] {
      host_queue_worker(front, host, stop_fd, workers.quit, q, front_tx, o.budget);
    });
  bool shown = !front.carrier();  // force the first sync
  bool more = true;
  for (;;) {
    epoll_event evs[16];
    int n = ::epoll_wait(ep, evs, 16, more ? 0 : 200);
    if (n < 0 && errno != EINTR) {
      int e = errno;
      ::close(ep);
      return core::fail(e, "epoll_wait");
    }
    for (int i = 0; i < n; ++i)
      if (evs[i].data.fd == stop_fd) {
        ::close(ep);
        return core::ok();
      }
    front.clear_events();
    host.clear_events();
    if (o.follow_link && front.carrier() != shown) {
      shown = front.carrier();
      if (auto r = host.set_admin_up(shown); !r) spdlog::warn("veth: {}", r.err().what());
      spdlog::info("veth: {}:{} link {}", front.transport_name(), front.target(), shown ? "up" : "down");
    }
    front.watchdog();
    host.watchdog();
    more = out.move();
    more |= in.move();
  }
}

}  // namespace uvd::net
