// SPDX-License-Identifier: Apache-2.0
#include "net/pump.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <vector>

namespace uvd::net {

namespace {

// One direction: from.rx -> to.tx.
struct lane {
  Veth& from;
  Veth& to;
  uint32_t budget;
  std::vector<std::vector<veth_frame>> frames;  // per source queue: the last rx burst
  std::vector<std::vector<veth_frame*>> ptrs;
  std::vector<uint32_t> off, left;              // frames of that burst not yet taken

  lane(Veth& f, Veth& t, uint32_t b) : from(f), to(t), budget(b) {
    frames.resize(f.nqueues());
    ptrs.resize(f.nqueues());
    off.assign(f.nqueues(), 0);
    left.assign(f.nqueues(), 0);
    for (uint32_t q = 0; q < f.nqueues(); ++q) {
      frames[q].resize(b);
      ptrs[q].resize(b);
      for (uint32_t i = 0; i < b; ++i) ptrs[q][i] = &frames[q][i];
    }
  }

  // True when there is more to do at once.
  bool move() {
    bool more = false;
    for (uint32_t q = 0; q < from.nqueues(); ++q) {
      uint32_t tq = q % to.nqueues();
      if (!to.tx_flush(tq)) continue;
      if (left[q]) {
        uint32_t took = to.tx_burst(tq, ptrs[q].data() + off[q], left[q]);
        off[q] += took;
        left[q] -= took;
        if (left[q]) continue;  // still full: wait for its wake-up
        more = true;
      }
      uint32_t n = from.rx_burst(q, frames[q].data(), budget);
      if (n) {
        uint32_t took = to.tx_burst(tq, ptrs[q].data(), n);
        off[q] = took;
        left[q] = n - took;
      }
      more |= (n == budget && !left[q]) || from.rx_pending(q);
    }
    return more;
  }
};

void add_fd(int ep, int fd) {
  if (fd < 0) return;
  epoll_event ev{.events = EPOLLIN, .data = {.fd = fd}};
  ::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

}  // namespace

core::result<void> pump(Veth& front, Veth& host, int stop_fd, const pump_options& o) {
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return core::fail(errno, "epoll_create1");
  add_fd(ep, stop_fd);
  for (Veth* v : {&front, &host}) {
    add_fd(ep, v->event_fd());
    for (uint32_t q = 0; q < v->nqueues(); ++q) add_fd(ep, v->rx_fd(q));
  }
  lane out(front, host, o.budget), in(host, front, o.budget);
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
