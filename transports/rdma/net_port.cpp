// SPDX-License-Identifier: Apache-2.0
// The switch side of net over RDMA: an rdma_cm listener that turns every
// front end with a valid hello into a port of net::Netback. Everything a
// front end sends is hostile input: private data, message headers, lengths,
// credits; frames then meet the switch's own checks (MAC, MTU, offloads).
//
// Each accepted connection moves to an rdma_cm event channel of its own, so
// its port alone sees its connection events; the port's descriptors are that
// channel, its completion channel, and an eventfd it kicks to be called once
// more to return the receive buffers the switch was still reading.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cstring>
#include <vector>

#include "core/log.hpp"
#include "net/eth.hpp"
#include "transports/rdma/net_conn.hpp"
#include "transports/rdma/net_rdma.hpp"

namespace uvd::rdma {

namespace {

void nonblock(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

class rdma_port final : public net::port {
 public:
  rdma_port(cm_channel_ptr ch, cm_id_ptr id, std::unique_ptr<net_conn> conn, const net_hello_view& h,
            uint32_t max_mtu, int wake)
      : ch_(std::move(ch)), id_(std::move(id)), conn_(std::move(conn)), wake_(wake), max_mtu_(max_mtu) {
    mac_ = net::mac_addr::from(h.mac);
    mtu_ = h.mtu;
    offload_ = h.offload;
    name_ = h.name;
  }
  ~rdma_port() override {
    if (too_big_) spdlog::info("switch: port '{}' could not take {} frames over its buffers", name_, too_big_);
    rdma_disconnect(id_.get());  // harmless when not connected
    conn_.reset();
    id_.reset();
    ch_.reset();
    ::close(wake_);
  }

  void kill() { dead_ = true; }
  // rdma_accept left the queue pair ready to send (RTS); a frame that beats
  // the front end's own readiness is retransmitted by RC.
  void accepted() { established_ = true; }
  std::string name() const override { return name_; }

  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, net::port_stats& st) override {
    if (dead_) return 0;
    uint64_t v;
    [[maybe_unused]] ssize_t r = ::read(wake_, &v, sizeof v);
    // The switch is done with the frames of the last burst: their buffers go back.
    for (uint32_t idx : lent_)
      if (conn_->repost(idx) != 0) return die("ibv_post_recv failed");
    lent_.clear();
    if (!cm_events()) return 0;
    if (!conn_->arm() || !conn_->reap_sends()) return die("a send failed");
    if (rv_.size() < n) rv_.resize(n);
    ibv_wc_status failed;
    int got = conn_->poll_recv(rv_.data(), static_cast<int>(n), &failed);
    if (got < 0) {
      if (failed == IBV_WC_SUCCESS) {  // more receives completed than it had credits for
        ++st.rx_bad_msg;
        return die("sent more messages than it had credits");
      }
      // A message longer than the buffers fails the queue pair (the front
      // end ignored our max_msg): the device reports it as a local length
      // error (mlx5), as the invalid request it NAKs, or (rxe) as a local
      // QP operation error. Nothing more can arrive on it.
      if (failed == IBV_WC_LOC_LEN_ERR || failed == IBV_WC_REM_INV_REQ_ERR || failed == IBV_WC_LOC_QP_OP_ERR) {
        ++st.rx_oversize;
        return die("sent a message over its receive buffers");
      }
      if (failed != IBV_WC_WR_FLUSH_ERR) ++st.rx_bad_msg;
      return die(ibv_wc_status_str(failed));
    }
    uint32_t k = 0;
    for (int i = 0; i < got; ++i) {
      uint32_t idx = rv_[i].idx;
      net_rx_msg m;
      auto s = parse_msg(conn_->buf(idx), rv_[i].len, true, &m);
      if (s == net_rx_status::ok && !conn_->window().granted(m.hdr.credits)) {
        ++st.rx_bad_msg;
        return die("returned more credits than it was given");
      }
      if (s == net_rx_status::truncated) {
        ++st.rx_truncated;
      } else if (s == net_rx_status::bad_msg) {
        ++st.rx_bad_msg;
      } else if (m.hdr.type == net_msg_frame) {
        core::veth_frame& f = frames[k++];
        f.data = const_cast<uint8_t*>(m.payload);  // our own receive buffer, not reposted until the next burst
        f.len = m.len;
        hdr_to_frame(m.hdr, &f);
        lent_.push_back(idx);
        continue;
      } else if (m.hdr.type == net_msg_mtu) {
        if (m.value < net::eth_min_mtu || m.value > max_mtu_) {
          ++st.rx_bad_msg;
        } else if (m.value != mtu_) {
          spdlog::info("switch: port '{}' MTU {} -> {}", name_, mtu_, m.value);
          mtu_ = m.value;
        }
      } else if (m.hdr.type == net_msg_link) {
        peer_up_ = m.value == 1;
      }
      if (conn_->repost(idx) != 0) return die("ibv_post_recv failed");
    }
    if (conn_->grant_if_due() < 0) return die("a send failed");
    // Called again soon: to repost the frames lent to the switch (and
    // return their credits), and to poll what a full burst left in the
    // queue (completions that came before the re-arm raise no event).
    if (!lent_.empty() || got == static_cast<int>(n)) {
      uint64_t one = 1;
      r = ::write(wake_, &one, sizeof one);
    }
    return k;
  }

  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override {
    if (dead_ || !established_) return 0;
    spdlog::trace("switch: port '{}' tx {} frames: {} credits, {} to return, {} slots", name_, n,
                  conn_->window().credits(), conn_->window().pending(), conn_->free_slots());
    if (!conn_->reap_sends()) {
      die("a send failed");
      return 0;
    }
    // What finds no credit is dropped (and counted by the switch), as a
    // hardware switch drops at a full egress queue. One post for the burst.
    uint32_t sent = 0;
    for (; sent < n; ++sent) {
      net_msg_hdr h;
      frame_to_hdr(*frames[sent], &h);
      int rc = conn_->send(h, frames[sent]->data, frames[sent]->len);
      if (rc == -EMSGSIZE) {
        ++too_big_;  // larger than the front end said it takes
        continue;
      }
      if (rc == -EAGAIN) break;
    }
    if (conn_->flush() < 0) {
      die("a send failed");
      return 0;
    }
    return sent;
  }

  void fds(std::vector<int>& out) const override {
    out.push_back(conn_->fd());
    out.push_back(ch_->fd);
    out.push_back(wake_);
  }
  bool alive() const override { return !dead_; }
  bool link_up() const override { return established_ && peer_up_ && !dead_; }
  bool offloads() const override { return offload_; }
  uint32_t mtu() const override { return mtu_; }
  std::optional<net::mac_addr> owned_mac() const override { return mac_; }

 private:
  uint32_t die(const char* why) {
    if (!dead_) spdlog::warn("switch: port '{}' {}; dropping it", name_, why);
    dead_ = true;
    return 0;
  }

  // False when the connection is over.
  bool cm_events() {
    for (;;) {
      auto ev = next_cm_event(ch_.get(), 0);
      if (!ev) return true;
      switch (ev->type) {
        case RDMA_CM_EVENT_ESTABLISHED:
          established_ = true;
          break;
        case RDMA_CM_EVENT_DISCONNECTED:
          established_ = false;
          dead_ = true;
          spdlog::info("switch: port '{}' disconnected", name_);
          return false;
        default:
          die(cm_event_name(ev->type));
          return false;
      }
    }
  }

  // Destroyed in reverse: queues, then the id, then its channel.
  cm_channel_ptr ch_;
  cm_id_ptr id_;
  std::unique_ptr<net_conn> conn_;
  int wake_;
  uint32_t max_mtu_;
  net::mac_addr mac_;
  uint32_t mtu_ = 1500;
  bool offload_ = false;
  bool established_ = false;
  bool peer_up_ = true;
  bool dead_ = false;
  uint64_t too_big_ = 0;
  std::string name_;
  std::vector<net_recv> rv_;
  std::vector<uint32_t> lent_;
};

class rdma_listener final : public net::port_source {
 public:
  rdma_listener(cm_channel_ptr ch, std::vector<cm_id_ptr> ids, net_listen_options o)
      : ch_(std::move(ch)), ids_(std::move(ids)), o_(std::move(o)) {}
  ~rdma_listener() override {
    ids_.clear();
    ch_.reset();
  }
  int fd() const override { return ch_->fd; }

  void service(net::Netback& nb) override {
    for (;;) {
      auto ev = next_cm_event(ch_.get(), 0);
      if (!ev) return;
      if (ev->type == RDMA_CM_EVENT_CONNECT_REQUEST)
        accept_one(*ev, nb);
      else
        spdlog::warn("switch: rdma listener event {} (status {})", cm_event_name(ev->type), ev->status);
    }
  }

 private:
  void refuse(rdma_cm_id* id, int err, const std::string& why) {
    net_refusal r = make_refusal(err, why);
    rdma_reject(id, &r, sizeof r);
    rdma_destroy_id(id);
    spdlog::warn("switch: refused an rdma front end: {}", why);
  }

  void accept_one(const cm_event& ev, net::Netback& nb) {
    net_hello_limits lim{.max_mtu = o_.max_mtu};
    net_hello_view h;
    std::string why;
    if (int e = parse_hello(ev.private_data.data(), ev.private_data.size(), lim, &h, &why); e)
      return refuse(ev.id, e, why);
    if (nb.port_count() >= o_.max_ports) return refuse(ev.id, EMFILE, "switch is full");
    // Frames to it must fit its buffers; frames from it, ours.
    uint32_t max_mtu = std::min<uint32_t>(o_.max_mtu, h.max_msg - sizeof(net_msg_hdr) - net::eth_hlen - net::vlan_hlen);
    if (h.mtu > max_mtu) return refuse(ev.id, EINVAL, "MTU " + std::to_string(h.mtu) + " over its buffers");
    uint32_t recv_size = static_cast<uint32_t>(sizeof(net_msg_hdr)) +
                         (h.offload ? net::gso_max_frame : net::max_frame_for_mtu(max_mtu));
    rdma_event_channel* pch = rdma_create_event_channel();
    if (!pch) return refuse(ev.id, ENOMEM, "no event channel");
    cm_channel_ptr ch(pch);
    nonblock(pch->fd);
    if (rdma_migrate_id(ev.id, pch) != 0) return refuse(ev.id, errno, "rdma_migrate_id failed");
    cm_id_ptr id(ev.id);
    auto c = net_conn::create(ev.id, o_.depth, recv_size, o_.depth);
    if (c) {
      if (auto r = (*c)->set_peer(h.depth, h.max_msg); !r) c = core::fail(std::move(r).err());
    }
    if (!c) {
      spdlog::warn("switch: rdma front end '{}': {}", h.name, c.err().what());
      net_refusal r = make_refusal(c.err().errnum(), "no resources");
      rdma_reject(id.get(), &r, sizeof r);
      return;  // id, then its channel, destroyed
    }
    int wake = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake < 0) {
      rdma_reject(id.get(), nullptr, 0);
      return;
    }
    rdma_cm_id* raw = id.get();
    std::optional<net::rate_limit> limit = o_.default_limit;
    if (auto it = o_.limits.find(h.name); it != o_.limits.end()) limit = it->second;
    auto p = std::make_unique<rdma_port>(std::move(ch), std::move(id), std::move(*c), h, max_mtu, wake);
    rdma_port* port = p.get();
    uint32_t pid = nb.add_port(std::move(p), limit);
    net_welcome w{.magic = net_magic, .version = net_version,
                  .flags = static_cast<uint8_t>(h.offload ? net_hello_offload : 0),
                  .depth = static_cast<uint16_t>(o_.depth), .max_msg = recv_size, .max_mtu = max_mtu, .port_id = pid};
    rdma_conn_param cp{};
    cp.private_data = &w;
    cp.private_data_len = sizeof w;
    cp.retry_count = 7;
    // We send only into receives the front end said it posted; one that
    // lies about its credits fails its own connection, not the switch.
    cp.rnr_retry_count = 3;
    if (rdma_accept(raw, &cp) != 0) {
      spdlog::warn("switch: rdma_accept for '{}': {}", h.name, std::strerror(errno));
      port->kill();
    } else {
      port->accepted();
    }
  }

  cm_channel_ptr ch_;
  std::vector<cm_id_ptr> ids_;
  net_listen_options o_;
};

int api_listen(const net_listen_options* o, net::port_source** out, uint16_t* ports, size_t nports, char* err,
               size_t errlen) {
  auto fail = [&](int e, const std::string& why) {
    std::snprintf(err, errlen, "%s", why.c_str());
    return -e;
  };
  // Inside the plugin, spdlog is a copy of its own: point it at stderr too.
  if (auto r = core::init_logging(o->log_level); !r) return fail(EINVAL, r.err().what());
  if (o->listen.empty()) return fail(EINVAL, "no address to listen on");
  if (o->depth < net_min_depth || o->depth > net_max_depth)
    return fail(EINVAL, "rdma depth wants " + std::to_string(net_min_depth) + ".." + std::to_string(net_max_depth));
  if (o->max_mtu < net::eth_min_mtu || o->max_mtu > 65535) return fail(EINVAL, "max MTU out of range");
  rdma_event_channel* ch = rdma_create_event_channel();
  if (!ch) return fail(errno, "rdma_create_event_channel (no RDMA support: ib_uverbs and rdma_ucm loaded?)");
  cm_channel_ptr chp(ch);
  nonblock(ch->fd);
  std::vector<cm_id_ptr> ids;
  for (size_t i = 0; i < o->listen.size(); ++i) {
    const std::string& l = o->listen[i];
    auto hp = split_host_port(l, net_default_port);
    if (!hp) return fail(EINVAL, "--rdma " + hp.err().message);
    addrinfo hints{};
    hints.ai_flags = AI_PASSIVE;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* ai = nullptr;
    if (int rc = getaddrinfo(hp->first.c_str(), hp->second.c_str(), &hints, &ai); rc != 0)
      return fail(EINVAL, "cannot resolve '" + l + "': " + gai_strerror(rc));
    rdma_cm_id* id = nullptr;
    if (rdma_create_id(ch, &id, nullptr, RDMA_PS_TCP) != 0) {
      freeaddrinfo(ai);
      return fail(errno, "rdma_create_id");
    }
    cm_id_ptr idp(id);
    int rc = rdma_bind_addr(id, ai->ai_addr);
    int e = errno;
    freeaddrinfo(ai);
    if (rc != 0) return fail(e, "cannot bind " + l + " (no RDMA device has that address?): " + std::strerror(e));
    if (rdma_listen(id, 64) != 0) return fail(errno, "rdma_listen on " + l);
    if (ports && i < nports) ports[i] = ntohs(rdma_get_src_port(id));
    ids.push_back(std::move(idp));
  }
  *out = new rdma_listener(std::move(chp), std::move(ids), *o);
  return 0;
}

constexpr net_api the_net_api{
    .abi_version = NET_API_VERSION,
    .struct_size = sizeof(net_api),
    .listen = api_listen,
};

}  // namespace

const net_api* net_entry() { return &the_net_api; }

}  // namespace uvd::rdma
