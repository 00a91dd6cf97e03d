// SPDX-License-Identifier: Apache-2.0
#include "transports/xen/xenbus.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

namespace uvd::xen {

namespace {

using clock_type = std::chrono::steady_clock;

// Sleeps on the watch fd until an event or the deadline (at most 100 ms at a
// time, so a missed event costs little). False when the deadline passed.
core::result<bool> sleep_on_watch(store& s, clock_type::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now()).count();
  if (left <= 0) return false;
  pollfd p{s.watch_fd(), POLLIN, 0};
  (void)::poll(&p, 1, static_cast<int>(std::min<long long>(left, 100)));
  if (!drain_watches(s)) return core::fail(EPIPE, "store connection lost");
  return true;
}

}  // namespace

bool drain_watches(store& s) {
  for (;;) {
    auto ev = s.read_watch();
    if (!ev) return false;
    if (!*ev) return true;
  }
}

core::result<int> wait_state(store& s, const std::string& dir, bool (*pred)(int), uint32_t timeout_ms,
                             const char* what) {
  auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto st = read_state(s, dir);
    if (st && pred(*st)) return *st;
    auto more = sleep_on_watch(s, deadline);
    if (!more) return core::fail(std::move(more).err());
    if (!*more)
      return core::fail(ETIMEDOUT, dir + " did not reach " + what + " (state " +
                                       (st ? state_name(*st) : st.err().what()) + ")");
  }
}

core::result<void> wait_value(store& s, const std::string& path, const std::string& value, uint32_t timeout_ms) {
  auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto v = s.read(no_txn, path);
    if (v && *v == value) return core::ok();
    auto more = sleep_on_watch(s, deadline);
    if (!more) return core::fail(std::move(more).err());
    if (!*more) return core::fail(ETIMEDOUT, path + " did not become " + value);
  }
}

backend_loop::~backend_loop() {
  stop();
  for (int fd : {stop_fd_, kick_fd_})
    if (fd >= 0) ::close(fd);
}

core::result<void> backend_loop::start(store& s, std::function<void()> pass) {
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  kick_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0 || kick_fd_ < 0) return core::fail(errno, "eventfd");
  pass_ = std::move(pass);
  thread_ = std::thread([this, &s] { run(s); });
  return core::ok();
}

void backend_loop::kick() {
  uint64_t one = 1;
  if (kick_fd_ >= 0) (void)::write(kick_fd_, &one, sizeof one);
}

void backend_loop::stop() {
  uint64_t one = 1;
  if (stop_fd_ >= 0) (void)::write(stop_fd_, &one, sizeof one);
  if (thread_.joinable()) thread_.join();
}

void backend_loop::run(store& s) {
  for (;;) {
    pass_();
    pollfd p[3] = {{stop_fd_, POLLIN, 0}, {s.watch_fd(), POLLIN, 0}, {kick_fd_, POLLIN, 0}};
    int n = ::poll(p, 3, 200);
    if (n < 0 && errno != EINTR) return;
    if (p[0].revents) return;
    uint64_t v;
    (void)::read(kick_fd_, &v, sizeof v);
    (void)drain_watches(s);
  }
}

}  // namespace uvd::xen
