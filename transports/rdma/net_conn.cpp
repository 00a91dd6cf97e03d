// SPDX-License-Identifier: Apache-2.0
#include "transports/rdma/net_conn.hpp"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace uvd::rdma {

core::result<std::unique_ptr<net_conn>> net_conn::create(rdma_cm_id* id, uint32_t depth, uint32_t recv_size,
                                                         uint32_t send_wr) {
  std::unique_ptr<net_conn> c(new net_conn());
  c->id_ = id;
  c->depth_ = depth;
  c->recv_size_ = recv_size;
  ibv_device_attr dev{};
  if (ibv_query_device(id->verbs, &dev) != 0) return core::fail(errno, "ibv_query_device");
  c->send_wr_ = std::min<uint32_t>(send_wr, static_cast<uint32_t>(dev.max_qp_wr));
  if (depth > static_cast<uint32_t>(dev.max_qp_wr) || depth > static_cast<uint32_t>(dev.max_cqe))
    return core::fail(EINVAL, "receive depth " + std::to_string(depth) + " is more than the device allows");
  ibv_pd* pd = ibv_alloc_pd(id->verbs);
  if (!pd) return core::fail(errno ? errno : ENOMEM, "ibv_alloc_pd");
  c->pd_.reset(pd);
  ibv_comp_channel* ch = ibv_create_comp_channel(id->verbs);
  if (!ch) return core::fail(errno, "ibv_create_comp_channel");
  c->channel_.reset(ch);
  // Non-blocking: the channel is drained from poll loops, never waited on.
  ::fcntl(ch->fd, F_SETFL, ::fcntl(ch->fd, F_GETFL) | O_NONBLOCK);
  ibv_cq* scq = ibv_create_cq(id->verbs, static_cast<int>(c->send_wr_), c.get(), ch, 0);
  if (!scq) return core::fail(errno ? errno : ENOMEM, "ibv_create_cq (send)");
  c->send_cq_.reset(scq);
  ibv_cq* rcq = ibv_create_cq(id->verbs, static_cast<int>(depth), c.get(), ch, 0);
  if (!rcq) return core::fail(errno ? errno : ENOMEM, "ibv_create_cq (receive)");
  c->recv_cq_.reset(rcq);

  ibv_qp_init_attr a{};
  a.send_cq = scq;
  a.recv_cq = rcq;
  a.qp_type = IBV_QPT_RC;
  a.cap.max_send_wr = c->send_wr_;
  a.cap.max_recv_wr = depth;
  a.cap.max_send_sge = 1;
  a.cap.max_recv_sge = 1;
  a.sq_sig_all = 1;  // every send completes: its slot is free again
  if (rdma_create_qp(id, pd, &a) != 0)
    return core::fail(errno, "rdma_create_qp (RC, " + std::to_string(c->send_wr_) + " send / " + std::to_string(depth) +
                                 " receive work requests)");
  c->has_qp_ = true;

  auto r = registered_buffer::make(pd, size_t(depth) * recv_size, IBV_ACCESS_LOCAL_WRITE, "net receive buffers");
  if (!r) return core::fail(std::move(r).err());
  c->recv_ = std::move(*r);
  for (uint32_t i = 0; i < depth; ++i)
    if (int rc = post_recv(id->qp, i, c->recv_.data() + size_t(i) * recv_size, recv_size, c->recv_.lkey()); rc < 0)
      return core::fail(-rc, "ibv_post_recv");
  if (ibv_req_notify_cq(rcq, 0) != 0) return core::fail(EIO, "ibv_req_notify_cq");
  return c;
}

net_conn::~net_conn() {
  // The queue pair goes first: nothing may complete into queues being freed.
  if (has_qp_ && id_->qp) rdma_destroy_qp(id_);
}

core::result<void> net_conn::set_peer(uint32_t peer_depth, uint32_t peer_max_msg) {
  peer_max_msg_ = peer_max_msg;
  slot_size_ = peer_max_msg;
  uint32_t slots = std::min(send_wr_, peer_depth);
  auto s = registered_buffer::make(pd_.get(), size_t(slots) * slot_size_, IBV_ACCESS_LOCAL_WRITE, "net send slots");
  if (!s) return core::fail(std::move(s).err());
  send_ = std::move(*s);
  free_.clear();
  nslots_ = slots;
  for (uint32_t i = slots; i-- > 0;) free_.push_back(i);
  wrs_.assign(slots, ibv_send_wr{});
  sges_.assign(slots, ibv_sge{});
  queued_ = 0;
  win_.reset(depth_, peer_depth);
  return core::ok();
}

bool net_conn::arm() {
  for (;;) {
    ibv_cq* cq = nullptr;
    void* ctx = nullptr;
    if (ibv_get_cq_event(channel_.get(), &cq, &ctx) != 0) break;  // EAGAIN: drained
    ibv_ack_cq_events(cq, 1);
    if (cq == send_cq_.get()) {
      send_armed_ = false;
    } else if (ibv_req_notify_cq(cq, 0) != 0) {
      return false;
    }
  }
  // Receives always wake the owner (frames, credits). Send completions only
  // free slots, which every send path reaps first; they wake the owner only
  // when it has no slot left, else a sender waiting for credit would wake
  // once for every send in flight.
  if (free_.empty() && !send_armed_) {
    if (ibv_req_notify_cq(send_cq_.get(), 0) != 0) return false;
    send_armed_ = true;
  }
  return true;
}

bool net_conn::reap_sends() {
  ibv_wc wc[32];
  for (;;) {
    int n = ibv_poll_cq(send_cq_.get(), 32, wc);
    if (n < 0) return false;
    bool ok = true;
    for (int i = 0; i < n; ++i) {
      if (wc[i].wr_id < nslots_) free_.push_back(static_cast<uint32_t>(wc[i].wr_id));
      if (wc[i].status != IBV_WC_SUCCESS) ok = false;
    }
    if (!ok) return false;
    if (n < 32) return true;
  }
}

int net_conn::poll_recv(net_recv* out, int max, ibv_wc_status* failed) {
  *failed = IBV_WC_SUCCESS;
  int k = 0;
  ibv_wc wc[32];
  while (k < max) {
    int want = std::min(32, max - k);
    int n = ibv_poll_cq(recv_cq_.get(), want, wc);
    if (n < 0) return -1;
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        *failed = wc[i].status;
        return -1;
      }
      if (wc[i].wr_id >= depth_ || wc[i].opcode != IBV_WC_RECV || !win_.received(1)) return -1;
      out[k++] = net_recv{static_cast<uint32_t>(wc[i].wr_id), wc[i].byte_len};
    }
    if (n < want) break;
  }
  return k;
}

int net_conn::repost(uint32_t idx) {
  int rc = post_recv(id_->qp, idx, recv_.data() + size_t(idx) * recv_size_, recv_size_, recv_.lkey());
  if (rc == 0) win_.reposted(1);
  return rc;
}

int net_conn::send(net_msg_hdr h, const void* payload, uint32_t len) {
  if (sizeof h + size_t(len) > peer_max_msg_) return -EMSGSIZE;
  bool grant = h.type == net_msg_credit;
  if (free_.empty() || (grant ? win_.credits() < 1 : !win_.may_send_data())) return -EAGAIN;
  uint32_t slot = free_.back();
  free_.pop_back();
  uint8_t* p = reinterpret_cast<uint8_t*>(send_.data()) + size_t(slot) * slot_size_;
  h.credits = win_.take();
  std::memcpy(p, &h, sizeof h);
  if (len) std::memcpy(p + sizeof h, payload, len);
  // At most one message per slot is queued, so slots bound the queue.
  ibv_sge& sge = sges_[queued_];
  sge = ibv_sge{reinterpret_cast<uintptr_t>(p), static_cast<uint32_t>(sizeof h + len), send_.lkey()};
  ibv_send_wr& wr = wrs_[queued_];
  wr = ibv_send_wr{};
  wr.wr_id = slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  if (queued_) wrs_[queued_ - 1].next = &wr;
  ++queued_;
  return 0;
}

int net_conn::flush() {
  if (!queued_) return 0;
  ibv_send_wr* bad = nullptr;
  int rc = ibv_post_send(id_->qp, wrs_.data(), &bad);
  queued_ = 0;
  // A post fails only on a queue pair that is broken (or a bug in the
  // sizing above): the connection is over, credits no longer matter.
  return rc ? -rc : 0;
}

int net_conn::grant_if_due() {
  if (!win_.grant_due()) return 0;
  if (free_.empty()) {
    // The peer may be waiting for this message: be woken when a slot frees.
    if (!reap_sends()) return -EIO;
    if (free_.empty() && !send_armed_) {
      if (ibv_req_notify_cq(send_cq_.get(), 0) != 0) return -EIO;
      send_armed_ = true;
      if (!reap_sends()) return -EIO;
    }
    if (free_.empty()) return 0;
  }
  if (int rc = send(make_hdr(net_msg_credit), nullptr, 0); rc < 0) return rc == -EAGAIN ? 0 : rc;
  return flush();
}

}  // namespace uvd::rdma
