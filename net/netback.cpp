// SPDX-License-Identifier: Apache-2.0
#include "net/netback.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "net/offload.hpp"

namespace uvd::net {

using clock = rate_limiter::clock;

void port_stats::add(const port_stats& o) {
  rx_frames += o.rx_frames;
  rx_bytes += o.rx_bytes;
  tx_frames += o.tx_frames;
  tx_bytes += o.tx_bytes;
  tx_dropped += o.tx_dropped;
  rx_bad_mac += o.rx_bad_mac;
  rx_vlan += o.rx_vlan;
  rx_runt += o.rx_runt;
  rx_oversize += o.rx_oversize;
  rx_truncated += o.rx_truncated;
  rx_bad_offload += o.rx_bad_offload;
  rx_bad_msg += o.rx_bad_msg;
  throttled += o.throttled;
}

core::result<rate_limit> parse_rate_limit(std::string_view text) {
  auto bad = [&] {
    std::string msg(1, '\'');  // built piecewise: g++ 12 warns falsely (-Wrestrict) on "..." + string
    msg.append(text).append("' is not a rate limit: write BYTES/MICROSECONDS (12500/1000) or a rate (100mbit, 1gbit)");
    return core::fail(EINVAL, msg);
  };
  uint64_t a = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), a);
  if (ec != std::errc() || a == 0) return bad();
  std::string_view rest(p, static_cast<size_t>(text.data() + text.size() - p));
  if (!rest.empty() && rest[0] == '/') {
    uint64_t us = 0;
    auto [q, ec2] = std::from_chars(rest.data() + 1, rest.data() + rest.size(), us);
    if (ec2 != std::errc() || q != rest.data() + rest.size() || us == 0) return bad();
    return rate_limit{a, std::chrono::microseconds(us)};
  }
  uint64_t mult = 0;
  if (rest == "kbit") mult = 1000;
  else if (rest == "mbit") mult = 1000 * 1000;
  else if (rest == "gbit") mult = 1000ull * 1000 * 1000;
  else return bad();
  // bits per second -> bytes per millisecond
  uint64_t bytes_per_ms = a * mult / 8 / 1000;
  if (bytes_per_ms == 0) return bad();
  return rate_limit{bytes_per_ms, std::chrono::microseconds(1000)};
}

struct Netback::slot {
  uint32_t id = 0;
  std::unique_ptr<port> p;
  port_stats st;
  std::optional<rate_limiter> limiter;
  std::vector<int> fds;
  bool ready = true;      // may have frames (epoll said so, or the last round used the budget)
  bool watched = false;   // fds in the epoll set
  clock::time_point throttled_until{};
  bool throttled = false;
  std::vector<core::veth_frame*> out;  // frames queued for this port this round
  std::vector<core::veth_frame> rx;    // the port's last burst; [rx_off, rx_off + rx_left) not yet switched
  uint32_t rx_off = 0, rx_left = 0;
};

core::result<std::unique_ptr<Netback>> Netback::create(const netback_options& opts) {
  std::unique_ptr<Netback> nb(new Netback());
  nb->opts_ = opts;
  if (opts.budget == 0 || opts.budget > 1024) return core::fail(EINVAL, "switch budget must be 1..1024");
  nb->macs_ = mac_table(opts.mac_table_size, opts.ageing);
  nb->epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (nb->epfd_ < 0) return core::fail(errno, "epoll_create1");
  nb->stop_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (nb->stop_fd_ < 0) return core::fail(errno, "eventfd");
  epoll_event ev{.events = EPOLLIN, .data = {.u64 = UINT64_MAX}};
  ::epoll_ctl(nb->epfd_, EPOLL_CTL_ADD, nb->stop_fd_, &ev);
  nb->seg_arena_len_ = gso_max_frame + gso_max_segs * 256;
  nb->seg_arena_.reset(new uint8_t[nb->seg_arena_len_]);
  nb->last_age_ = clock::now();
  return nb;
}

Netback::~Netback() {
  ports_.clear();
  sources_.clear();
  if (epfd_ >= 0) ::close(epfd_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void Netback::watch(slot& s, bool on) {
  if (s.watched == on) return;
  for (int fd : s.fds) {
    epoll_event ev{.events = EPOLLIN, .data = {.u64 = s.id}};
    ::epoll_ctl(epfd_, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd, &ev);
  }
  s.watched = on;
}

uint32_t Netback::add_port(std::unique_ptr<port> p, std::optional<rate_limit> limit) {
  auto s = std::make_unique<slot>();
  p->fds(s->fds);
  s->p = std::move(p);
  if (limit && limit->bytes && limit->interval.count() > 0)
    s->limiter.emplace(limit->bytes, limit->interval, clock::now());
  s->out.reserve(opts_.budget * 4);
  s->rx.resize(opts_.budget);
  uint32_t id = static_cast<uint32_t>(ports_.size());
  for (uint32_t i = 0; i < ports_.size(); ++i)
    if (!ports_[i]) {
      id = i;
      break;
    }
  if (id == ports_.size()) ports_.emplace_back();
  s->id = id;
  ports_[id] = std::move(s);
  watch(*ports_[id], true);
  spdlog::info("switch: port {} '{}' attached{}{}", id, ports_[id]->p->name(),
               ports_[id]->p->owned_mac() ? " mac " + ports_[id]->p->owned_mac()->to_string() : " (uplink)",
               limit ? fmt::format(", limited to {} bytes every {} us", limit->bytes, limit->interval.count()) : "");
  return id;
}

void Netback::add_source(std::unique_ptr<port_source> s) {
  epoll_event ev{.events = EPOLLIN, .data = {.u64 = UINT64_MAX - 1 - sources_.size()}};
  ::epoll_ctl(epfd_, EPOLL_CTL_ADD, s->fd(), &ev);
  sources_.push_back(std::move(s));
}

void Netback::stop() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t r = ::write(stop_fd_, &one, sizeof one);
}

size_t Netback::port_count() const {
  return static_cast<size_t>(std::count_if(ports_.begin(), ports_.end(), [](const auto& s) { return s != nullptr; }));
}

port_stats Netback::totals() const {
  port_stats t = gone_;
  for (const auto& s : ports_)
    if (s) t.add(s->st);
  return t;
}

std::string Netback::stats_text() const {
  std::string out;
  auto line = [](const port_stats& s) {
    return fmt::format(
        "rx_frames={} rx_bytes={} tx_frames={} tx_bytes={} tx_dropped={} rx_dropped={} rx_bad_mac={} rx_vlan={} "
        "rx_runt={} rx_oversize={} rx_truncated={} rx_bad_offload={} rx_bad_msg={} throttled={}",
        s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes, s.tx_dropped, s.rx_dropped(), s.rx_bad_mac, s.rx_vlan,
        s.rx_runt, s.rx_oversize, s.rx_truncated, s.rx_bad_offload, s.rx_bad_msg, s.throttled);
  };
  for (uint32_t i = 0; i < ports_.size(); ++i) {
    if (!ports_[i]) continue;
    auto m = ports_[i]->p->owned_mac();
    out += fmt::format("port {} name={} mac={} mtu={} {}\n", i, ports_[i]->p->name(), m ? m->to_string() : "any",
                       ports_[i]->p->mtu(), line(ports_[i]->st));
  }
  out += fmt::format("total ports={} macs={} {}\n", port_count(), macs_.size(), line(totals()));
  return out;
}

core::result<void> Netback::run() {
  while (!stopping_)
    if (auto r = run_once(std::chrono::milliseconds(200)); !r) return r;
  return core::ok();
}

core::result<void> Netback::run_once(std::chrono::milliseconds timeout) {
  auto now = clock::now();
  // Sleep no longer than until a throttled port earns credit again.
  std::chrono::nanoseconds wait = timeout;
  for (auto& s : ports_) {
    if (!s) continue;
    if (s->throttled)
      wait = std::min(wait, std::max(std::chrono::nanoseconds(s->throttled_until - now), std::chrono::nanoseconds(0)));
    else if (s->ready || s->rx_left)
      wait = std::chrono::nanoseconds(0);
  }
  epoll_event evs[64];
  timespec ts{static_cast<time_t>(wait.count() / 1000000000), static_cast<long>(wait.count() % 1000000000)};
  int n = ::epoll_pwait2(epfd_, evs, 64, &ts, nullptr);
  if (n < 0) {
    if (errno == EINTR) return core::ok();
    return core::fail(errno, "epoll_wait");
  }
  for (int i = 0; i < n; ++i) {
    uint64_t tag = evs[i].data.u64;
    if (tag == UINT64_MAX) {
      stopping_ = true;
      return core::ok();
    }
    if (tag > UINT64_MAX - 1 - sources_.size()) {
      sources_[UINT64_MAX - 1 - tag]->service(*this);
      continue;
    }
    if (tag < ports_.size() && ports_[tag]) ports_[tag]->ready = true;
  }
  now = clock::now();
  // Round robin: start one port further each round.
  uint32_t np = static_cast<uint32_t>(ports_.size());
  if (np) {
    rr_ = (rr_ + 1) % np;
    for (uint32_t k = 0; k < np; ++k) {
      uint32_t id = (rr_ + k) % np;
      if (ports_[id]) serve_port(*ports_[id], id, now);
    }
  }
  remove_dead();
  if (now - last_age_ > std::chrono::seconds(1)) {
    macs_.age(now);
    last_age_ = now;
  }
  return core::ok();
}

void Netback::throttle(slot& s, clock::time_point now) {
  // Out of credit: stop listening to the port until it earns some; its
  // frames wait in its own queue (the sender sees back-pressure).
  ++s.st.throttled;
  s.throttled = true;
  s.throttled_until = s.limiter->next_credit(now);
  watch(s, false);
}

void Netback::serve_port(slot& s, uint32_t id, clock::time_point now) {
  if (s.throttled) {
    if (now < s.throttled_until) return;
    s.throttled = false;
    watch(s, true);
    s.ready = true;
  }
  if ((!s.ready && !s.rx_left) || !s.p->alive()) return;
  if (s.limiter && !s.limiter->has_credit(now)) return throttle(s, now);
  if (!s.rx_left) {
    s.rx_off = 0;
    s.rx_left = s.p->rx_burst(s.rx.data(), opts_.budget, s.st);
    s.ready = s.rx_left == opts_.budget;
  }
  // Frame by frame, so that credit is checked before each one.
  while (s.rx_left) {
    if (s.limiter && !s.limiter->has_credit(now)) {
      throttle(s, now);
      break;
    }
    forward_one(id, s, s.rx[s.rx_off], now);
    ++s.rx_off;
    --s.rx_left;
  }
  flush_out();
}

void Netback::forward_one(uint32_t in, slot& src, core::veth_frame& f, clock::time_point now) {
  if (f.len < eth_hlen) {
    ++src.st.rx_runt;
    return;
  }
  uint16_t type = frame_ethertype(f.data);
  bool tagged = type == ethertype_vlan || type == ethertype_qinq;
  if (tagged && !src.p->trunk()) {
    ++src.st.rx_vlan;
    return;
  }
  const uint32_t mtu = src.p->mtu();
  if (!(f.flags & core::VETH_FRAME_GSO) && f.len > mtu + eth_hlen + (tagged ? vlan_hlen : 0)) {
    ++src.st.rx_oversize;
    return;
  }
  if ((f.flags & (core::VETH_FRAME_GSO | core::VETH_FRAME_CSUM_PARTIAL)) && check_offload(f, mtu, nullptr) != 0) {
    ++src.st.rx_bad_offload;
    return;
  }
  mac_addr sa = frame_src(f.data);
  const auto owned = src.p->owned_mac();
  if (sa.is_multicast() || sa.is_zero() || (owned && sa != *owned)) {
    ++src.st.rx_bad_mac;
    return;
  }
  ++src.st.rx_frames;
  src.st.rx_bytes += f.len;
  if (src.limiter) src.limiter->charge(wire_bytes(f));
  macs_.learn(sa, in, now);
  mac_addr da = frame_dst(f.data);
  uint32_t out = da.is_multicast() ? mac_table::no_port : macs_.lookup(da, now);
  if (out == in) return;  // the destination is behind the port it came from
  if (out != mac_table::no_port && out < ports_.size() && ports_[out]) {
    deliver(out, &f);
  } else {
    for (uint32_t p = 0; p < ports_.size(); ++p)
      if (p != in && ports_[p]) deliver(p, &f);
  }
}

void Netback::deliver(uint32_t out, core::veth_frame* f) {
  slot& d = *ports_[out];
  if (!d.p->alive() || !d.p->link_up()) {
    ++d.st.tx_dropped;
    return;
  }
  bool gso = f->flags & core::VETH_FRAME_GSO;
  bool partial = f->flags & core::VETH_FRAME_CSUM_PARTIAL;
  // No egress MTU check: the receiving front half checks frames against its
  // own MTU (and an MTU change reaches the switch through another queue).
  if (d.p->offloads() || (!gso && !partial)) {
    d.out.push_back(f);
    return;
  }
  // The port cannot take offloads: finish them here, into the switch's arena,
  // after what is already queued for it (no reordering).
  flush_port(d);
  if (!gso) {
    // A checksum to fill: copy so other ports still get the frame as it came.
    if (f->len > seg_arena_len_) return;
    std::memcpy(seg_arena_.get(), f->data, f->len);
    core::veth_frame c = *f;
    c.data = seg_arena_.get();
    finish_csum(c.data, c.len, c.csum_start, c.csum_offset);
    c.flags = core::VETH_FRAME_CSUM_VALID;
    core::veth_frame* p = &c;
    uint32_t took = d.p->tx_burst(&p, 1);
    d.st.tx_frames += took;
    d.st.tx_bytes += took ? c.len : 0;
    d.st.tx_dropped += 1 - took;
    return;
  }
  frame_layout l;
  if (check_offload(*f, d.p->mtu(), &l) != 0) {
    ++d.st.tx_dropped;
    return;
  }
  core::veth_frame segs[gso_max_segs];
  int ns = gso_segment(*f, l, seg_arena_.get(), seg_arena_len_, segs, gso_max_segs);
  if (ns <= 0) {
    ++d.st.tx_dropped;
    return;
  }
  core::veth_frame* ptrs[gso_max_segs];
  for (int i = 0; i < ns; ++i) ptrs[i] = &segs[i];
  uint32_t took = d.p->tx_burst(ptrs, static_cast<uint32_t>(ns));
  for (uint32_t i = 0; i < took; ++i) d.st.tx_bytes += segs[i].len;
  d.st.tx_frames += took;
  d.st.tx_dropped += static_cast<uint32_t>(ns) - took;
}

void Netback::flush_port(slot& s) {
  if (s.out.empty()) return;
  uint32_t n = static_cast<uint32_t>(s.out.size());
  uint32_t took = s.p->tx_burst(s.out.data(), n);
  for (uint32_t i = 0; i < took; ++i) s.st.tx_bytes += s.out[i]->len;
  s.st.tx_frames += took;
  s.st.tx_dropped += n - took;
  s.out.clear();
}

void Netback::flush_out() {
  for (auto& s : ports_)
    if (s) flush_port(*s);
}

void Netback::remove_dead() {
  for (uint32_t id = 0; id < ports_.size(); ++id) {
    auto& s = ports_[id];
    if (!s || s->p->alive()) continue;
    spdlog::info("switch: port {} '{}' detached", id, s->p->name());
    watch(*s, false);
    gone_.add(s->st);
    macs_.forget_port(id);
    s.reset();
  }
}

}  // namespace uvd::net
