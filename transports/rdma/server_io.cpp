// SPDX-License-Identifier: Apache-2.0
// The storage server's request path: reaping a connection's completion queue
// (service), replies (inline and mostly unsignaled, see post_reply), refusals
// and the export's completions. The checks every RPC passes are in on_recv
// (server.cpp) and server_check.*.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "transports/rdma/server_impl.hpp"

namespace uvd::rdma {

using namespace server_detail;

// An inline reply leaves its buffer free at once: its receive slot takes the
// client's next RPC right away (no completion to wait for, no wake-up of the
// service thread), and only one in sq_cap / 4 is signaled, to learn how far
// the send queue drained. Large replies, and any reply while half the queue
// is unaccounted for, hold their receive slot until their completion: then a
// client that outruns its credits is held back (RNR) instead of the send
// queue overflowing.
void server::impl::post_reply(conn& c, uint32_t slot, size_t len) {
  ibv_sge sge{reinterpret_cast<uintptr_t>(c.send_buf(slot)), static_cast<uint32_t>(len), c.msgs.lkey()};
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  ibv_send_wr* bad = nullptr;
  std::lock_guard lk(c.mu);
  const bool inl = len <= c.max_inline && c.sq_posted - c.sq_freed < c.sq_cap / 2;
  ++c.sq_posted;
  if (inl) {
    wr.wr_id = wr_id(WR_SEND_INLINE, c.sq_posted & wr_low_mask);
    wr.send_flags = IBV_SEND_INLINE | (c.sq_posted % std::max(1u, c.sq_cap / 4) == 0 ? IBV_SEND_SIGNALED : 0);
  } else {
    c.ctx[slot].send_mark = c.sq_posted;
    wr.wr_id = wr_id(WR_SEND, slot);
    wr.send_flags = IBV_SEND_SIGNALED;
  }
  int rc = ibv_post_send(c.id->qp, &wr, &bad);
  if (rc == 0 && inl) rc = -post_recv(c.id->qp, wr_id(WR_RECV, slot), c.recv_buf(slot), msg_size, c.msgs.lkey());
  if (rc != 0 && !c.closing.exchange(true)) {
    spdlog::warn("rdma server: client {}: posting a reply failed ({}); closing", c.serial, std::strerror(rc));
    wake_svc();
  }
}

void server::impl::reply_status(conn& c, uint32_t slot, uint64_t id, int status, int64_t epoch) {
  reply r;
  r.hdr.id = id;
  r.status = status;
  r.epoch = epoch >= 0 ? static_cast<uint32_t>(epoch) : c.exp ? c.exp->epochs.current() : 0;
  post_reply(c, slot, encode_reply(r, c.send_buf(slot)));
}

void server::impl::refuse(conn& c, uint32_t slot, uint64_t id, refusal why) {
  refused.add(why);
  spdlog::debug("rdma server: client {}: refused RPC id {:#x}: {}", c.serial, id, refusal_name(why));
  reply_status(c, slot, id, refusal_errno(why));
}

void server::impl::on_io_done(storage::vstore_io* io, int status) {
  auto* x = static_cast<io_ctx*>(io->user);
  conn& c = *x->c;
  impl& s = *c.srv;
  s.callbacks.fetch_add(1);
  {
    std::lock_guard lk(c.mu);
    c.gate->done(x->id);
  }
  auto fired = c.exp->epochs.finish(c.exp->ex.fence ? 0 : x->epoch);
  // The data of a READ sits in the client's segment now; the reply tells it to fetch.
  s.reply_status(c, x->slot, x->id, status);
  c.rpcs.fetch_add(1, std::memory_order_relaxed);
  s.served.fetch_add(1, std::memory_order_relaxed);
  if (!fired.empty()) s.answer_fences(fired);
  if (c.in_flight.fetch_sub(1) == 1) s.wake_svc();
  s.callbacks.fetch_sub(1);
}

// One round-robin turn for one connection: up to opts.batch completions, then
// the I/O they carried goes to the export as one batch. True if it did work.
bool server::impl::service(conn& c) {
  ibv_wc wc[64];
  uint32_t want = std::min<uint32_t>(opts.batch, 64);
  int n = ibv_poll_cq(c.cq.get(), static_cast<int>(want), wc);
  if (n <= 0) return false;
  for (int i = 0; i < n; ++i) {
    const uint32_t slot = static_cast<uint32_t>(wc[i].wr_id & 0xffffffff);
    const uint64_t kind = wc[i].wr_id >> 56;
    if (wc[i].status != IBV_WC_SUCCESS) {
      if (!c.closing.exchange(true)) {
        if (wc[i].status != IBV_WC_WR_FLUSH_ERR)
          spdlog::warn("rdma server: client {}: {}; closing", c.serial, wc_error_text(wc[i]));
        rdma_disconnect(c.id.get());
      }
      continue;
    }
    if (kind == WR_SEND_INLINE) {  // the send queue drained up to this reply
      std::lock_guard lk(c.mu);
      c.sq_freed = std::max(c.sq_freed, wc[i].wr_id & wr_low_mask);
      continue;
    }
    if (slot >= c.nrecv || c.closing.load()) continue;
    if (kind == WR_RECV) {
      on_recv(c, slot, wc[i].byte_len);
    } else if (kind == WR_SEND) {
      {
        std::lock_guard lk(c.mu);
        c.sq_freed = std::max(c.sq_freed, c.ctx[slot].send_mark);
      }
      // The reply left: the slot takes the client's next RPC.
      if (int rc = post_recv(c.id->qp, wr_id(WR_RECV, slot), c.recv_buf(slot), msg_size, c.msgs.lkey()); rc < 0)
        c.closing = true;
    }
  }
  if (!c.batch.empty()) {
    c.exp->ex.submit(c.exp->ex.disk, c.batch.data(), static_cast<uint32_t>(c.batch.size()));
    c.batch.clear();
  }
  return true;
}

}  // namespace uvd::rdma
