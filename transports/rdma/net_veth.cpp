// SPDX-License-Identifier: Apache-2.0
// The front-end side of net over RDMA: a Veth whose wire is an RC queue pair
// to the netback switch (net_proto.hpp). Reconnects on its own; the link is
// down meanwhile.
//
// Receives are absorbed wherever the connection is serviced (rx_poll, xmit,
// tx_timeout): credits are applied and credit messages reposted at once;
// frames wait in their receive buffers, which are reposted (and their
// credits returned) only once rx_poll has copied them out. The switch keeps
// one of our receives free for a credit message (net_proto.hpp, R1), so a
// reader that falls behind never stops our transmit.
#include <fcntl.h>
#include <netdb.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "net/eth.hpp"
#include "transports/rdma/net_conn.hpp"
#include "transports/rdma/net_rdma.hpp"

namespace uvd::rdma {

namespace {

struct held_frame {
  uint32_t idx;  // receive buffer
  net_rx_msg m;
};

struct net_dev {
  std::string host, port, src, name, where;
  uint8_t mac[6];
  uint32_t mtu = 1500, max_mtu = 9000, depth = 128;
  uint32_t link_max_mtu = 65535;
  bool offload = true;
  int timeout_ms = 3000, connect_ms = 15000, reconnect_ms = 200;
  const core::veth_host* cb = nullptr;
  int ep = -1, timer = -1;
  std::mutex mu;  // everything below: data path and control
  // One connection; destroyed in reverse order (queues, id, channel).
  cm_channel_ptr ch;
  cm_id_ptr id;
  std::unique_ptr<net_conn> conn;
  std::deque<held_frame> held;
  std::vector<net_recv> rv;
  bool want_tx = false;
  bool admin_up = true;
  bool send_mtu = false, send_link = false;
  std::atomic<uint64_t> rx_errors{0}, rx_dropped{0}, tx_dropped{0}, tx_errors{0};

  ~net_dev() {
    drop_conn();
    if (timer >= 0) ::close(timer);
    if (ep >= 0) ::close(ep);
  }
  void drop_conn() {
    if (conn) {
      ::epoll_ctl(ep, EPOLL_CTL_DEL, conn->fd(), nullptr);
      rdma_disconnect(id.get());
    }
    if (ch) ::epoll_ctl(ep, EPOLL_CTL_DEL, ch->fd, nullptr);
    held.clear();
    conn.reset();
    id.reset();
    ch.reset();
  }
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

uint32_t recv_size_for(const net_dev& d) {
  return static_cast<uint32_t>(sizeof(net_msg_hdr)) +
         (d.offload ? net::gso_max_frame : net::max_frame_for_mtu(d.max_mtu));
}

// Resolves, builds the queues, says hello and waits for the welcome. Called
// with mu held; 0 or -errno with *err set.
int connect_switch(net_dev& d, std::string* err) {
  auto fail = [&](int e, const std::string& why) {
    *err = d.where + ": " + why;
    d.drop_conn();
    return -e;
  };
  rdma_event_channel* ch = rdma_create_event_channel();
  if (!ch) return fail(errno, "rdma_create_event_channel (is ib_uverbs/rdma_ucm loaded?)");
  d.ch.reset(ch);
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(ch, &raw, nullptr, RDMA_PS_TCP) != 0) return fail(errno, "rdma_create_id");
  d.id.reset(raw);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* ai = nullptr;
  if (int rc = getaddrinfo(d.host.c_str(), d.port.c_str(), &hints, &ai); rc != 0)
    return fail(EHOSTUNREACH, std::string("cannot resolve the host: ") + gai_strerror(rc));
  addrinfo* src_ai = nullptr;
  if (!d.src.empty()) {
    addrinfo sh{};
    sh.ai_flags = AI_NUMERICHOST;
    if (int rc = getaddrinfo(d.src.c_str(), nullptr, &sh, &src_ai); rc != 0) {
      freeaddrinfo(ai);
      return fail(EINVAL, "source address '" + d.src + "': " + gai_strerror(rc));
    }
  }
  int rc = rdma_resolve_addr(raw, src_ai ? src_ai->ai_addr : nullptr, ai->ai_addr, d.timeout_ms);
  int e = errno;
  freeaddrinfo(ai);
  if (src_ai) freeaddrinfo(src_ai);
  if (rc != 0) return fail(e, "rdma_resolve_addr (no RDMA device reaches it?)");
  if (auto ev = expect_cm_event(ch, RDMA_CM_EVENT_ADDR_RESOLVED, d.timeout_ms + 1000); !ev)
    return fail(ev.err().errnum(), "resolve: " + ev.err().message);
  if (rdma_resolve_route(raw, d.timeout_ms) != 0) return fail(errno, "rdma_resolve_route");
  if (auto ev = expect_cm_event(ch, RDMA_CM_EVENT_ROUTE_RESOLVED, d.timeout_ms + 1000); !ev)
    return fail(ev.err().errnum(), "route: " + ev.err().message);
  auto c = net_conn::create(raw, d.depth, recv_size_for(d), d.depth);
  if (!c) return fail(c.err().errnum(), c.err().what());
  d.conn = std::move(*c);

  net_hello h{};
  h.magic = net_magic;
  h.version = net_version;
  h.flags = d.offload ? net_hello_offload : 0;
  h.depth = static_cast<uint16_t>(d.depth);
  std::memcpy(h.mac, d.mac, 6);
  h.mtu = d.mtu;
  h.max_msg = recv_size_for(d);
  std::snprintf(h.name, sizeof h.name, "%s", d.name.c_str());
  rdma_conn_param cp{};
  cp.private_data = &h;
  cp.private_data_len = sizeof h;
  cp.retry_count = 7;
  // Credits keep every send within what the switch posted; a short RNR
  // retry still covers a receive being reposted at that very moment.
  cp.rnr_retry_count = 7;
  if (rdma_connect(raw, &cp) != 0) return fail(errno, "rdma_connect");
  // A switch that is not there rejects at once (or the CM gives up with an
  // error event); a loaded one may take seconds to set the port up.
  auto ev = next_cm_event(ch, d.connect_ms);
  if (!ev) return fail(ev.err().errnum(), "connect: " + ev.err().message);
  if (ev->type == RDMA_CM_EVENT_REJECTED) {
    int status = 0;
    std::string why;
    if (parse_refusal(ev->private_data.data(), ev->private_data.size(), &status, &why))
      return fail(status, "the switch refused us: " + why);
    return fail(ECONNREFUSED, "connection rejected (no uvd switch --rdma on that port?)");
  }
  if (ev->type != RDMA_CM_EVENT_ESTABLISHED)
    return fail(ECONNABORTED, std::string("connect: ") + cm_event_name(ev->type));
  net_welcome w;
  std::string why;
  if (int werr = parse_welcome(ev->private_data.data(), ev->private_data.size(), &w, &why); werr)
    return fail(werr, why);
  if (auto r = d.conn->set_peer(w.depth, w.max_msg); !r) return fail(r.err().errnum(), r.err().what());
  d.link_max_mtu = w.max_mtu;
  if (!(w.flags & net_hello_offload) && d.offload)
    spdlog::warn("rdma-net {}: the switch declined offloads; frames go finished", d.where);
  d.want_tx = false;
  d.send_mtu = false;
  d.send_link = !d.admin_up;
  ::fcntl(ch->fd, F_SETFL, ::fcntl(ch->fd, F_GETFL) | O_NONBLOCK);
  epoll_event cev{.events = EPOLLIN, .data = {.fd = d.conn->fd()}};
  ::epoll_ctl(d.ep, EPOLL_CTL_ADD, d.conn->fd(), &cev);
  epoll_event mev{.events = EPOLLIN, .data = {.fd = ch->fd}};
  ::epoll_ctl(d.ep, EPOLL_CTL_ADD, ch->fd, &mev);
  itimerspec off{};
  ::timerfd_settime(d.timer, 0, &off, nullptr);
  spdlog::debug("rdma-net {}: connected as port {} (switch depth {}, max_msg {})", d.where, w.port_id, w.depth,
                w.max_msg);
  return 0;
}

void arm_reconnect(net_dev& d) {
  itimerspec t{};
  t.it_interval.tv_sec = d.reconnect_ms / 1000;
  t.it_interval.tv_nsec = (d.reconnect_ms % 1000) * 1000000L;
  t.it_value = t.it_interval;
  ::timerfd_settime(d.timer, 0, &t, nullptr);
}

// The switch went away (or broke the protocol): link down, retry on a timer.
void lose_switch(net_dev& d, const char* why) {
  if (!d.conn) return;
  d.drop_conn();
  spdlog::warn("rdma-net {}: lost the switch ({}); reconnecting every {} ms", d.where, why, d.reconnect_ms);
  arm_reconnect(d);
  if (d.cb) d.cb->link_changed(d.cb->owner, 0);
}

// Takes every completed receive: credits are applied and credit messages
// reposted at once, frames wait in their buffers for rx_poll. Then (R3)
// returns credits if due (unless the caller is about to send frames, which
// carry them) and wakes a transmit queue stopped for want of credit. False
// when the connection broke.
bool absorb(net_dev& d, bool grant = true) {
  net_conn& c = *d.conn;
  if (!c.reap_sends()) return false;
  if (d.rv.size() < c.depth()) d.rv.resize(c.depth());
  ibv_wc_status failed;
  int n = c.poll_recv(d.rv.data(), static_cast<int>(c.depth()), &failed);
  if (n < 0) return false;
  bool frames = false;
  for (int i = 0; i < n; ++i) {
    held_frame h{d.rv[i].idx, {}};
    auto st = parse_msg(c.buf(h.idx), d.rv[i].len, false, &h.m);
    if (st != net_rx_status::ok) {
      d.rx_errors.fetch_add(1, std::memory_order_relaxed);
    } else {
      if (!c.window().granted(h.m.hdr.credits)) return false;
      if (h.m.hdr.type == net_msg_frame) {
        d.held.push_back(h);
        frames = true;
        continue;
      }
    }
    if (c.repost(h.idx) != 0) return false;
  }
  if (frames && d.cb) d.cb->rx_ready(d.cb->owner, 0);
  if (grant && c.grant_if_due() < 0) return false;
  if (d.want_tx && c.may_send_data()) {
    d.want_tx = false;
    if (d.cb) d.cb->tx_done(d.cb->owner, 0);
  }
  return true;
}

// MTU and link messages, queued behind the credits they need.
int send_control(net_dev& d) {
  net_conn& c = *d.conn;
  for (;;) {
    if (!d.send_mtu && !d.send_link) return 0;
    if (!c.may_send_data()) return 0;
    bool mtu = d.send_mtu;
    uint32_t v = mtu ? d.mtu : (d.admin_up ? 1 : 0);
    if (int rc = c.send(make_hdr(mtu ? net_msg_mtu : net_msg_link), &v, 4); rc < 0) return rc == -EAGAIN ? 0 : rc;
    (mtu ? d.send_mtu : d.send_link) = false;
    if (int rc = c.flush(); rc < 0) return rc;
  }
}

int net_open(const core::veth_open_params* p, void** handle) {
  auto d = std::make_unique<net_dev>();
  const char* opts = p->options ? p->options : "";
  std::string target = p->target ? p->target : "";
  // "HOST:PORT" or "//HOST:PORT" (a URI's authority); a trailing '/' is fine.
  while (!target.empty() && target.front() == '/') target.erase(0, 1);
  while (!target.empty() && target.back() == '/') target.pop_back();
  auto hp = split_host_port(target, net_default_port);
  if (!hp) {
    set_err(p, "rdma: " + hp.err().message + " (want rdma://HOST[:PORT]?name=NAME)");
    return -EINVAL;
  }
  d->host = hp->first;
  d->port = hp->second;
  d->where = target;
  std::memcpy(d->mac, p->mac, 6);
  d->mtu = p->mtu ? p->mtu : 1500;
  d->cb = p->host;
  std::string v;
  if (core::find_option(opts, "name", &v)) d->name = v;
  if (d->name.empty()) d->name = net::mac_addr::from(p->mac).to_string();
  if (d->name.size() > 31) {
    set_err(p, "name longer than 31 characters");
    return -EINVAL;
  }
  if (core::find_option(opts, "offload", &v)) d->offload = v != "0";
  if (core::find_option(opts, "src", &v)) d->src = v;
  auto num = [&](const char* key, uint64_t lo, uint64_t hi, auto* out) {
    if (!core::find_option(opts, key, &v)) return true;
    auto n = core::parse_size(v);
    if (!n || *n < lo || *n > hi) {
      set_err(p, std::string(key) + " wants " + std::to_string(lo) + ".." + std::to_string(hi));
      return false;
    }
    *out = static_cast<std::remove_pointer_t<decltype(out)>>(*n);
    return true;
  };
  if (!num("depth", net_min_depth, net_max_depth, &d->depth) || !num("max_mtu", 68, 65535, &d->max_mtu) ||
      !num("timeout_ms", 10, 60000, &d->timeout_ms) || !num("connect_ms", 10, 120000, &d->connect_ms) ||
      !num("reconnect_ms", 10, 60000, &d->reconnect_ms))
    return -EINVAL;
  if (d->mtu > d->max_mtu) {
    set_err(p, "MTU " + std::to_string(d->mtu) + " is over max_mtu " + std::to_string(d->max_mtu));
    return -EINVAL;
  }
  bool wait = core::find_option(opts, "wait", &v) && v != "0";
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
    if (rc < 0) {
      spdlog::warn("rdma-net {}; waiting for it", err);
      arm_reconnect(*d);
    }
  }
  *handle = d.release();
  return 0;
}

void net_close(void* h) { delete static_cast<net_dev*>(h); }

int net_caps(void* h, core::veth_caps* out) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  *out = core::veth_caps{.min_mtu = net::eth_min_mtu, .max_mtu = std::min(d->max_mtu, d->link_max_mtu), .nqueues = 1};
  if (d->offload) out->features = core::VETH_F_TX_CSUM | core::VETH_F_RX_CSUM | core::VETH_F_TSO | core::VETH_F_SG;
  out->features |= core::VETH_F_LINK_STATE;
  return 0;
}

int net_xmit(void* h, uint32_t, core::veth_frame* const* frames, uint32_t n) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  if (!d->conn) {
    d->tx_dropped.fetch_add(n, std::memory_order_relaxed);
    return static_cast<int>(n);
  }
  net_conn& c = *d->conn;
  uint32_t sent = 0;
  auto broke = [&](const char* why) {
    d->tx_dropped.fetch_add(n - sent, std::memory_order_relaxed);
    lose_switch(*d, why);
    return static_cast<int>(n);
  };
  // Credits that came back since the last call first (a sender that never
  // reads still takes its credit messages here).
  if (!absorb(*d, false)) return broke("the connection broke");
  bool serviced = false;
  while (sent < n) {
    if ((d->send_mtu || d->send_link) && send_control(*d) < 0) return broke("a send failed");
    if (!d->send_mtu && !d->send_link && c.may_send_data()) {
      net_msg_hdr hdr;
      frame_to_hdr(*frames[sent], &hdr);
      int rc = c.send(hdr, frames[sent]->data, frames[sent]->len);
      if (rc == 0 || rc == -EMSGSIZE) {
        if (rc) d->tx_errors.fetch_add(1, std::memory_order_relaxed);  // over the switch's buffers: taken, counted
        ++sent;
        continue;
      }
    }
    // Out of credits or slots: post what is queued, re-arm the completion
    // channel (the caller may sleep on it) and look once more.
    if (serviced) break;
    serviced = true;
    if (c.flush() < 0) return broke("a send failed");
    if (!c.arm() || !absorb(*d, false)) return broke("the connection broke");
  }
  if (c.flush() < 0 || c.grant_if_due() < 0) return broke("a send failed");
  if (sent < n) {
    // The caller waits for tx_done: arm for what brings credits or slots,
    // then look once more (what came meanwhile wakes the queue at once).
    d->want_tx = true;
    if (!c.arm() || !absorb(*d, false)) return broke("the connection broke");
  }
  return static_cast<int>(sent);
}

int net_rx_poll(void* h, uint32_t q, core::veth_frame* frames, uint32_t budget) {
  auto* d = static_cast<net_dev*>(h);
  std::unique_lock lk(d->mu);
  if (!d->conn) {
    uint64_t ticks;
    if (::read(d->timer, &ticks, sizeof ticks) != sizeof ticks) return 0;
    std::string err;
    if (connect_switch(*d, &err) < 0) {
      spdlog::debug("rdma-net: {}", err);
      arm_reconnect(*d);
      return 0;
    }
    spdlog::info("rdma-net {}: reconnected to the switch", d->where);
    if (d->cb) d->cb->link_changed(d->cb->owner, 1);
    return 0;
  }
  // Connection events: the switch disconnecting, the device going away.
  for (;;) {
    auto ev = next_cm_event(d->ch.get(), 0);
    if (!ev) break;
    if (ev->type == RDMA_CM_EVENT_DISCONNECTED || ev->type == RDMA_CM_EVENT_DEVICE_REMOVAL ||
        ev->type == RDMA_CM_EVENT_TIMEWAIT_EXIT || ev->type == RDMA_CM_EVENT_CONNECT_ERROR) {
      lose_switch(*d, cm_event_name(ev->type));
      return 0;
    }
  }
  net_conn& c = *d->conn;
  if (!c.arm() || !absorb(*d)) {
    lose_switch(*d, "the connection broke");
    return 0;
  }
  uint32_t k = 0;
  while (k < budget && !d->held.empty()) {
    held_frame hf = d->held.front();
    d->held.pop_front();
    core::veth_frame& f = frames[k];
    if (hf.m.len > f.len) {
      d->rx_dropped.fetch_add(1, std::memory_order_relaxed);  // over our MTU's buffers
    } else {
      std::memcpy(f.data, hf.m.payload, hf.m.len);
      f.len = hf.m.len;
      hdr_to_frame(hf.m.hdr, &f);
      ++k;
    }
    if (c.repost(hf.idx) != 0) {
      lose_switch(*d, "ibv_post_recv failed");
      return static_cast<int>(k);
    }
  }
  // The frames' receives went back: their credits may be due (R3).
  if (send_control(*d) < 0 || c.grant_if_due() < 0) {
    lose_switch(*d, "a send failed");
    return static_cast<int>(k);
  }
  if (!d->held.empty() && d->cb) d->cb->rx_ready(d->cb->owner, q);
  if (d->want_tx && c.may_send_data()) {
    d->want_tx = false;
    if (d->cb) d->cb->tx_done(d->cb->owner, q);
  }
  return static_cast<int>(k);
}

int net_link_state(void* h) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  return d->conn ? 1 : 0;
}

int net_set_mtu(void* h, uint32_t mtu) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  if (mtu > d->max_mtu) return -EINVAL;
  d->mtu = mtu;
  if (!d->conn) return 0;  // the next hello carries it
  // Ordered before any later frame on the queue pair (frames wait behind it).
  d->send_mtu = true;
  if (send_control(*d) < 0) lose_switch(*d, "a send failed");
  return 0;
}

int net_set_link(void* h, int up) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  d->admin_up = up != 0;
  if (!d->conn) return 0;
  d->send_link = true;
  if (send_control(*d) < 0) lose_switch(*d, "a send failed");
  return 0;
}

int net_set_mac(void* h, const uint8_t* mac) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  std::memcpy(d->mac, mac, 6);
  if (!d->conn) return 0;
  // The switch binds a port to the MAC of its hello: say hello again.
  d->drop_conn();
  std::string err;
  if (connect_switch(*d, &err) < 0) {
    spdlog::warn("rdma-net: {}", err);
    arm_reconnect(*d);
    if (d->cb) d->cb->link_changed(d->cb->owner, 0);
  }
  return 0;
}

// The front half found the queue stopped for its whole tx timeout: say
// where the credits stand and service the connection once.
int net_tx_timeout(void* h, uint32_t) {
  auto* d = static_cast<net_dev*>(h);
  std::lock_guard lk(d->mu);
  if (!d->conn) return 0;
  net_conn& c = *d->conn;
  spdlog::warn("rdma-net {}: transmit stalled: {} credits, {} receives to return, {} free send slots, {} frames held",
               d->where, c.window().credits(), c.window().pending(), c.free_slots(), d->held.size());
  if (!c.arm() || !absorb(*d) || c.grant_if_due() < 0) lose_switch(*d, "the connection broke");
  return 0;
}

int net_rx_fd(void* h, uint32_t) { return static_cast<net_dev*>(h)->ep; }

int net_stats(void* h, core::veth_stats_extra* out) {
  auto* d = static_cast<net_dev*>(h);
  *out = core::veth_stats_extra{.rx_dropped = d->rx_dropped.load(std::memory_order_relaxed),
                                .rx_errors = d->rx_errors.load(std::memory_order_relaxed),
                                .tx_dropped = d->tx_dropped.load(std::memory_order_relaxed),
                                .tx_errors = d->tx_errors.load(std::memory_order_relaxed)};
  return 0;
}

}  // namespace

const core::veth_ops rdma_net_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "rdma",
    .description = "front end joined to `uvd switch --rdma` over an RDMA RC queue pair (SEND/RECV, credits)",
    .open = net_open,
    .close = net_close,
    .caps = net_caps,
    .xmit = net_xmit,
    .rx_poll = net_rx_poll,
    .link_state = net_link_state,
    .set_mtu = net_set_mtu,
    .set_mac = net_set_mac,
    .rx_fd = net_rx_fd,
    .stats = net_stats,
    .set_link = net_set_link,
    .tx_timeout = net_tx_timeout,
};

}  // namespace uvd::rdma
