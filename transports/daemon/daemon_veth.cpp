// SPDX-License-Identifier: Apache-2.0
// The front-end side of the daemon transport: a Veth whose wire is a socket
// to the netback switch. Reconnects on its own; the link is down meanwhile.
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/daemon/daemon_shm.hpp"
#include "transports/daemon/daemon_socket.hpp"

namespace uvd::daemon {

namespace {

struct daemon_dev {
  std::string path, name;
  uint8_t mac[6];
  uint32_t mtu = 1500;
  bool offload = true;
  bool want_shm = true;  // ask for shared-memory rings
  uint32_t ring_order = ring_default_order;
  int reconnect_ms = 200;
  uint32_t max_mtu = 65535;
  const core::veth_host* host = nullptr;
  int ep = -1, sock = -1, timer = -1;
  bool want_out = false;
  bool was_connected = false;
  std::mutex mu;  // the socket: data path and control (reconnect, MTU, MAC)
  std::vector<mmsghdr> msg;
  std::vector<iovec> iov;
  std::vector<frame_hdr> hdr;
  std::unique_ptr<shm_conn> shm;  // set while connected with rings
  uint32_t want_room = 0;         // bytes the tx ring must free before tx_done
  std::atomic<uint64_t> rx_errors{0}, tx_dropped{0};

  ~daemon_dev() {
    if (sock >= 0) ::close(sock);
    if (timer >= 0) ::close(timer);
    if (ep >= 0) ::close(ep);
  }
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

// Connects and says hello; 0 or -errno with *err set. Called with mu held.
int connect_switch(daemon_dev& d, std::string* err) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (d.path.empty() || d.path.size() >= sizeof sa.sun_path) {
    *err = "socket path '" + d.path + "' is empty or too long";
    return -ENAMETOOLONG;
  }
  std::memcpy(sa.sun_path, d.path.c_str(), d.path.size());
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    int e = errno;
    ::close(fd);
    *err = "no switch at " + d.path + " (" + std::strerror(e) + "); start one with: uvd switch --socket " + d.path;
    return -e;
  }
  hello_msg h{.type = msg_hello, .version = proto_version, .flags = static_cast<uint16_t>(d.offload ? hello_offload : 0),
              .magic = proto_magic, .mtu = d.mtu};
  std::memcpy(h.mac, d.mac, 6);
  std::snprintf(h.name, sizeof h.name, "%s", d.name.c_str());
  std::unique_ptr<shm_conn> shm;
  if (d.want_shm) {
    auto c = shm_conn::create(d.ring_order);
    if (!c) {
      ::close(fd);
      *err = "cannot make the frame rings: " + c.err().what();
      return -c.err().errnum();
    }
    shm = std::move(*c);
    h.flags |= hello_shm;
    h.ring_order = static_cast<uint16_t>(d.ring_order);
    int fds[3];
    shm->fds(fds);
    if (int rc = send_with_fds(fd, &h, sizeof h, fds, 3); rc < 0) {
      ::close(fd);
      *err = std::string("cannot say hello to the switch at ") + d.path + ": " + std::strerror(-rc);
      return rc;
    }
  }
  welcome_msg w{};
  int n = shm ? exchange(fd, nullptr, 0, &w, sizeof w, 3000) : exchange(fd, &h, sizeof h, &w, sizeof w, 3000);
  if (n != static_cast<int>(sizeof w) || w.type != msg_welcome || w.magic != proto_magic) {
    ::close(fd);
    *err = "the switch at " + d.path + " did not welcome us" + (n < 0 ? std::string(": ") + std::strerror(-n) : "");
    return n < 0 ? n : -EPROTO;
  }
  if (w.status != 0) {
    ::close(fd);
    w.message[sizeof w.message - 1] = 0;
    *err = "the switch at " + d.path + " refused us: " + w.message;
    return -w.status;
  }
  d.offload = d.offload && (w.flags & hello_offload);
  d.max_mtu = w.max_mtu ? w.max_mtu : 65535;
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  if (!(w.flags & hello_shm)) shm.reset();  // the switch declined: frames over the socket
  if (!shm) size_buffers(fd);
  d.sock = fd;
  d.want_out = false;
  d.shm = std::move(shm);
  epoll_event ev{.events = EPOLLIN | EPOLLRDHUP, .data = {.fd = fd}};
  ::epoll_ctl(d.ep, EPOLL_CTL_ADD, fd, &ev);
  if (d.shm) {
    epoll_event bev{.events = EPOLLIN, .data = {.fd = d.shm->bell()}};
    ::epoll_ctl(d.ep, EPOLL_CTL_ADD, d.shm->bell(), &bev);
  }
  itimerspec off{};
  ::timerfd_settime(d.timer, 0, &off, nullptr);
  return 0;
}

void arm_reconnect(daemon_dev& d) {
  itimerspec t{};
  t.it_interval.tv_sec = d.reconnect_ms / 1000;
  t.it_interval.tv_nsec = (d.reconnect_ms % 1000) * 1000000L;
  t.it_value = t.it_interval;
  ::timerfd_settime(d.timer, 0, &t, nullptr);
}

// The switch went away: link down, retry on a timer. Called with mu held.
void lose_switch(daemon_dev& d) {
  if (d.sock < 0) return;
  ::epoll_ctl(d.ep, EPOLL_CTL_DEL, d.sock, nullptr);
  ::close(d.sock);
  d.sock = -1;
  if (d.shm) ::epoll_ctl(d.ep, EPOLL_CTL_DEL, d.shm->bell(), nullptr);
  d.shm.reset();
  spdlog::warn("daemon: lost the switch at {}; reconnecting every {} ms", d.path, d.reconnect_ms);
  arm_reconnect(d);
  if (d.host) d.host->link_changed(d.host->owner, 0);
}

int daemon_open(const core::veth_open_params* p, void** handle) {
  auto d = std::make_unique<daemon_dev>();
  const char* opts = p->options ? p->options : "";
  d->path = p->target ? p->target : "";
  std::memcpy(d->mac, p->mac, 6);
  d->mtu = p->mtu ? p->mtu : 1500;
  d->host = p->host;
  std::string v;
  if (core::find_option(opts, "name", &v)) d->name = v;
  if (d->name.empty()) d->name = net::mac_addr::from(p->mac).to_string();
  if (d->name.size() > 31) {
    set_err(p, "name longer than 31 characters");
    return -EINVAL;
  }
  if (core::find_option(opts, "offload", &v)) d->offload = v != "0";
  if (core::find_option(opts, "shm", &v)) d->want_shm = v != "0";
  if (core::find_option(opts, "ring_order", &v)) {
    auto n = core::parse_size(v);
    if (!n || *n < ring_min_order || *n > ring_max_order) {
      set_err(p, "ring_order wants " + std::to_string(ring_min_order) + ".." + std::to_string(ring_max_order));
      return -EINVAL;
    }
    d->ring_order = static_cast<uint32_t>(*n);
  }
  bool wait = core::find_option(opts, "wait", &v) && v != "0";
  if (core::find_option(opts, "reconnect_ms", &v)) {
    auto n = core::parse_size(v);
    if (!n || *n < 10 || *n > 60000) {
      set_err(p, "reconnect_ms wants 10..60000");
      return -EINVAL;
    }
    d->reconnect_ms = static_cast<int>(*n);
  }
  d->ep = ::epoll_create1(EPOLL_CLOEXEC);
  d->timer = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (d->ep < 0 || d->timer < 0) return -errno;
  epoll_event ev{.events = EPOLLIN, .data = {.fd = d->timer}};
  ::epoll_ctl(d->ep, EPOLL_CTL_ADD, d->timer, &ev);
  std::string err;
  {
    std::lock_guard lk(d->mu);
    int rc = connect_switch(*d, &err);
    if (rc < 0 && !wait) {
      set_err(p, err);
      return rc;
    }
    if (rc < 0) {  // start with the link down and keep trying
      spdlog::warn("daemon: {}; waiting for it", err);
      arm_reconnect(*d);
    }
  }
  *handle = d.release();
  return 0;
}

void daemon_close(void* h) { delete static_cast<daemon_dev*>(h); }

int daemon_caps(void* h, core::veth_caps* out) {
  auto* d = static_cast<daemon_dev*>(h);
  *out = core::veth_caps{.min_mtu = net::eth_min_mtu, .max_mtu = d->max_mtu, .nqueues = 1};
  if (d->offload) out->features = core::VETH_F_TX_CSUM | core::VETH_F_RX_CSUM | core::VETH_F_TSO | core::VETH_F_SG;
  out->features |= core::VETH_F_LINK_STATE;
  return 0;
}

// Frames into the transmit ring; a full ring stops the queue until the
// switch frees enough for the first frame left (it kicks our doorbell).
int shm_xmit(daemon_dev& d, core::veth_frame* const* frames, uint32_t n) {
  ring_producer& out = d.shm->out();
  uint32_t sent = 0;
  while (sent < n) {
    frame_hdr h;
    to_wire(*frames[sent], &h);
    if (out.push(h, frames[sent]->data, frames[sent]->len)) {
      ++sent;
      continue;
    }
    if (!out.sane()) {
      d.tx_dropped.fetch_add(n - sent, std::memory_order_relaxed);
      lose_switch(d);
      return static_cast<int>(n);
    }
    uint32_t need = ring_producer::worst_case(frames[sent]->len);
    if (out.arm_space(need)) continue;
    d.want_room = need;
    d.want_out = true;
    break;
  }
  if (out.publish()) d.shm->kick_peer();
  return static_cast<int>(sent);
}

// Frames out of the receive ring, copied into the front half's buffers.
int shm_rx(daemon_dev& d, uint32_t q, core::veth_frame* frames, uint32_t budget) {
  ring_consumer& in = d.shm->in();
  uint32_t k = 0;
  for (;;) {
    if (d.want_out && d.shm->out().has_room(d.want_room)) {
      d.want_out = false;
      if (d.host) d.host->tx_done(d.host->owner, q);
    }
    while (k < budget) {
      uint32_t len = 0;
      frame_hdr h;
      auto st = in.pop(frames[k].data, frames[k].len, &len, &h);
      if (st == ring_consumer::status::empty) break;
      if (st == ring_consumer::status::broken) {
        spdlog::warn("daemon: the receive ring from {} is corrupt", d.path);
        lose_switch(d);
        return static_cast<int>(k);
      }
      core::veth_frame f = frames[k];
      f.len = len;
      if (st == ring_consumer::status::too_big || h.type != msg_frame || !from_wire(h, &f)) {
        d.rx_errors.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      frames[k++] = f;
    }
    if (in.release()) d.shm->kick_peer();
    if (k == budget) break;
    // Idle: clear the doorbell, see whether the switch hung up, and ask for
    // a kick before sleeping; anything that arrived meanwhile is taken now.
    d.shm->drain_bell();
    char c;
    ssize_t r = ::recv(d.sock, &c, 1, MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      lose_switch(d);
      return static_cast<int>(k);
    }
    bool more = in.arm_data();
    if (d.want_out && d.shm->out().has_room(d.want_room)) continue;
    if (!more) break;
  }
  return static_cast<int>(k);
}

int daemon_xmit(void* h, uint32_t, core::veth_frame* const* frames, uint32_t n) {
  auto* d = static_cast<daemon_dev*>(h);
  std::lock_guard lk(d->mu);
  if (d->sock < 0) {
    d->tx_dropped.fetch_add(n, std::memory_order_relaxed);
    return static_cast<int>(n);
  }
  if (d->shm) return shm_xmit(*d, frames, n);
  if (d->hdr.size() < n) {
    d->hdr.resize(n);
    d->iov.resize(2 * size_t(n));
    d->msg.resize(n);
  }
  for (uint32_t i = 0; i < n; ++i) {
    to_wire(*frames[i], &d->hdr[i]);
    d->iov[2 * i] = iovec{&d->hdr[i], sizeof(frame_hdr)};
    d->iov[2 * i + 1] = iovec{frames[i]->data, frames[i]->len};
    d->msg[i] = mmsghdr{};
    d->msg[i].msg_hdr.msg_iov = &d->iov[2 * i];
    d->msg[i].msg_hdr.msg_iovlen = 2;
  }
  uint32_t sent = 0;
  while (sent < n) {
    int r = ::sendmmsg(d->sock, d->msg.data() + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r > 0) {
      sent += static_cast<uint32_t>(r);
      continue;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
      // Full: wake when the socket drains (rx_fd reports it; rx_poll says tx_done).
      d->want_out = true;
      epoll_event ev{.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data = {.fd = d->sock}};
      ::epoll_ctl(d->ep, EPOLL_CTL_MOD, d->sock, &ev);
      return static_cast<int>(sent);
    }
    if (r < 0 && errno == EINTR) continue;
    d->tx_dropped.fetch_add(n - sent, std::memory_order_relaxed);
    lose_switch(*d);
    return static_cast<int>(n);
  }
  return static_cast<int>(n);
}

int daemon_rx_poll(void* h, uint32_t q, core::veth_frame* frames, uint32_t budget) {
  auto* d = static_cast<daemon_dev*>(h);
  std::unique_lock lk(d->mu);
  if (d->sock < 0) {
    uint64_t ticks;
    if (::read(d->timer, &ticks, sizeof ticks) != sizeof ticks) return 0;
    std::string err;
    if (connect_switch(*d, &err) < 0) return 0;
    spdlog::info("daemon: reconnected to the switch at {}", d->path);
    lk.unlock();
    if (d->host) d->host->link_changed(d->host->owner, 1);
    return 0;
  }
  if (d->shm) return shm_rx(*d, q, frames, budget);
  if (d->want_out) {
    pollfd p{d->sock, POLLOUT, 0};
    if (::poll(&p, 1, 0) > 0 && (p.revents & POLLOUT)) {
      d->want_out = false;
      epoll_event ev{.events = EPOLLIN | EPOLLRDHUP, .data = {.fd = d->sock}};
      ::epoll_ctl(d->ep, EPOLL_CTL_MOD, d->sock, &ev);
      if (d->host) d->host->tx_done(d->host->owner, q);
    }
  }
  if (d->msg.size() < budget) {
    d->hdr.resize(budget);
    d->iov.resize(2 * size_t(budget));
    d->msg.resize(budget);
  }
  for (uint32_t i = 0; i < budget; ++i) {
    d->iov[2 * i] = iovec{&d->hdr[i], sizeof(frame_hdr)};
    d->iov[2 * i + 1] = iovec{frames[i].data, frames[i].len};
    d->msg[i] = mmsghdr{};
    d->msg[i].msg_hdr.msg_iov = &d->iov[2 * i];
    d->msg[i].msg_hdr.msg_iovlen = 2;
  }
  int r = ::recvmmsg(d->sock, d->msg.data(), budget, MSG_DONTWAIT, nullptr);
  if (r < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lose_switch(*d);
    return 0;
  }
  uint32_t k = 0;
  for (int i = 0; i < r; ++i) {
    uint32_t len = d->msg[i].msg_len;
    if (len == 0) {  // the switch hung up
      lose_switch(*d);
      break;
    }
    if ((d->msg[i].msg_hdr.msg_flags & MSG_TRUNC) || len < sizeof(frame_hdr) || d->hdr[i].type != msg_frame) {
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    core::veth_frame f = frames[i];
    f.len = len - static_cast<uint32_t>(sizeof(frame_hdr));
    if (!from_wire(d->hdr[i], &f)) {
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    frames[k++] = f;
  }
  return static_cast<int>(k);
}

int daemon_link_state(void* h) {
  auto* d = static_cast<daemon_dev*>(h);
  std::lock_guard lk(d->mu);
  return d->sock >= 0 ? 1 : 0;
}

int daemon_set_mtu(void* h, uint32_t mtu) {
  auto* d = static_cast<daemon_dev*>(h);
  std::lock_guard lk(d->mu);
  d->mtu = mtu;
  if (d->sock < 0) return 0;  // the next hello carries it
  mtu_msg m{.type = msg_mtu, .mtu = mtu};
  pollfd p{d->sock, POLLOUT, 0};
  ::poll(&p, 1, 1000);
  if (::send(d->sock, &m, sizeof m, MSG_DONTWAIT | MSG_NOSIGNAL) != sizeof m) return -errno;
  return 0;
}

int daemon_set_mac(void* h, const uint8_t* mac) {
  auto* d = static_cast<daemon_dev*>(h);
  std::lock_guard lk(d->mu);
  std::memcpy(d->mac, mac, 6);
  if (d->sock < 0) return 0;
  // The switch binds a port to the MAC of its hello: say hello again.
  ::epoll_ctl(d->ep, EPOLL_CTL_DEL, d->sock, nullptr);
  ::close(d->sock);
  d->sock = -1;
  std::string err;
  if (connect_switch(*d, &err) < 0) {
    arm_reconnect(*d);
    if (d->host) d->host->link_changed(d->host->owner, 0);
  }
  return 0;
}

int daemon_rx_fd(void* h, uint32_t) { return static_cast<daemon_dev*>(h)->ep; }

int daemon_stats(void* h, core::veth_stats_extra* out) {
  auto* d = static_cast<daemon_dev*>(h);
  *out = core::veth_stats_extra{.rx_errors = d->rx_errors.load(std::memory_order_relaxed),
                                .tx_dropped = d->tx_dropped.load(std::memory_order_relaxed)};
  return 0;
}

}  // namespace

const core::veth_ops daemon_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "daemon",
    .description = "front end joined to `uvd switch` through a Unix socket (UML switch daemon style)",
    .open = daemon_open,
    .close = daemon_close,
    .caps = daemon_caps,
    .xmit = daemon_xmit,
    .rx_poll = daemon_rx_poll,
    .link_state = daemon_link_state,
    .set_mtu = daemon_set_mtu,
    .set_mac = daemon_set_mac,
    .rx_fd = daemon_rx_fd,
    .stats = daemon_stats,
};

}  // namespace uvd::daemon
