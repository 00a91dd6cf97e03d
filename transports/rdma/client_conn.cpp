// SPDX-License-Identifier: Apache-2.0
// The rdma client's control path: rdma_cm resolve and connect, the OPEN
// exchange (polled, before the reaper thread runs), FENCE, and teardown.
#include <netdb.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "core/log.hpp"
#include "core/uri.hpp"
#include "transports/rdma/protocol.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/verbs.hpp"
#include "transports/rdma/client_impl.hpp"

namespace uvd::rdma::client_detail {

client::~client() {
  if (reaper.joinable()) {
    stopping = true;
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = ::write(wake_fd, &one, sizeof one);
    reaper.join();
  }
  if (id && id->qp) rdma_disconnect(id.get());
  if (id && id->qp) rdma_destroy_qp(id.get());
  if (cq) {
    cq.reset();
  }
  cc.reset();
  msgs.reset();
  staging.reset();
  pd.reset();
  id.reset();
  ch.reset();
  if (wake_fd >= 0) ::close(wake_fd);
}

core::result<void> client::connect() {
  auto hp = split_host_port(host + ":" + port, default_port);
  if (!hp) return core::fail(std::move(hp).err());
  rdma_event_channel* c = rdma_create_event_channel();
  if (!c) return core::fail(errno, "rdma_create_event_channel (is the rdma_ucm module loaded?)");
  ch.reset(c);
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(ch.get(), &raw, this, RDMA_PS_TCP) != 0) return core::fail(errno, "rdma_create_id");
  id.reset(raw);

  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* ai = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &ai); rc != 0)
    return core::fail(EHOSTUNREACH, "cannot resolve '" + host + "': " + gai_strerror(rc));
  addrinfo* src_ai = nullptr;
  if (!src.empty()) {
    addrinfo sh{};
    sh.ai_flags = AI_NUMERICHOST;
    if (int grc = getaddrinfo(src.c_str(), nullptr, &sh, &src_ai); grc != 0) {
      freeaddrinfo(ai);
      return core::fail(EINVAL, "source address '" + src + "': " + gai_strerror(grc));
    }
  }
  int rc = rdma_resolve_addr(id.get(), src_ai ? src_ai->ai_addr : nullptr, ai->ai_addr, timeout_ms);
  int e = errno;
  freeaddrinfo(ai);
  if (src_ai) freeaddrinfo(src_ai);
  if (rc != 0) return core::fail(e, "rdma_resolve_addr " + host + ":" + port + " (no RDMA device reaches it?)");
  if (auto ev = expect_cm_event(ch.get(), RDMA_CM_EVENT_ADDR_RESOLVED, timeout_ms + 1000); !ev)
    return core::fail(ev.err().errnum(), "resolve " + host + ":" + port + ": " + ev.err().message);
  if (rdma_resolve_route(id.get(), timeout_ms) != 0) return core::fail(errno, "rdma_resolve_route");
  if (auto ev = expect_cm_event(ch.get(), RDMA_CM_EVENT_ROUTE_RESOLVED, timeout_ms + 1000); !ev)
    return core::fail(ev.err().errnum(), "route to " + host + ":" + port + ": " + ev.err().message);

  ibv_pd* p = ibv_alloc_pd(id->verbs);
  if (!p) return core::fail(errno ? errno : ENOMEM, "ibv_alloc_pd");
  pd.reset(p);
  ibv_comp_channel* cch = ibv_create_comp_channel(id->verbs);
  if (!cch) return core::fail(errno, "ibv_create_comp_channel");
  cc.reset(cch);

  ibv_device_attr dev{};
  if (ibv_query_device(id->verbs, &dev) != 0) return core::fail(errno, "ibv_query_device");
  // Send queue: per RPC one SEND plus one RDMA WRITE or READ per segment,
  // twice over (selective signaling leaves up to half the queue to unsignaled
  // work requests not yet known done).
  constexpr uint32_t per_rpc = max_segs_per_rpc + 1;
  const uint32_t qd_fits = std::max<uint32_t>(1, static_cast<uint32_t>(dev.max_qp_wr) / (2 * per_rpc));
  qd = std::clamp<uint32_t>(want_qd, 1, std::min<uint32_t>(max_queue_depth, qd_fits));
  nbufs = qd;
  uint32_t send_wr = 2 * qd * per_rpc;
  uint32_t cqe = std::min<uint32_t>(send_wr + qd + 1, static_cast<uint32_t>(dev.max_cqe));
  ibv_cq* q = ibv_create_cq(id->verbs, static_cast<int>(cqe), this, cc.get(), 0);
  if (!q) return core::fail(errno ? errno : ENOMEM, "ibv_create_cq of " + std::to_string(cqe) + " entries");
  cq.reset(q);
  if (auto r = create_rc_qp(id.get(), pd.get(), cq.get(), send_wr, qd, 1, 256, &max_inline); !r) return r;
  sq_cap = send_wr;
  read_wrs.reserve(size_t{qd} * max_segs_per_rpc);
  read_sges.reserve(size_t{qd} * max_segs_per_rpc);

  auto m = registered_buffer::make(pd.get(), size_t{qd} * 2 * msg_size, IBV_ACCESS_LOCAL_WRITE, "RPC buffers");
  if (!m) return core::fail(std::move(m).err());
  msgs = std::move(*m);
  for (uint32_t i = 0; i < qd; ++i)
    if (int prc = post_recv(id->qp, wr_id(WR_RECV, i), recv_buf(i), msg_size, msgs.lkey()); prc < 0)
      return core::fail(-prc, "ibv_post_recv");

  std::byte hello[hello_size];
  conn_hello h;
  h.queue_depth = static_cast<uint16_t>(qd);
  encode_hello(h, hello);
  rdma_conn_param cp{};
  cp.private_data = hello;
  cp.private_data_len = hello_size;
  cp.initiator_depth = static_cast<uint8_t>(std::min(dev.max_qp_init_rd_atom, 16));
  cp.responder_resources = 0;
  cp.retry_count = 7;
  cp.rnr_retry_count = 7;  // the server reposts a receive only after answering
  if (rdma_connect(id.get(), &cp) != 0) return core::fail(errno, "rdma_connect to " + host + ":" + port);
  auto ev = next_cm_event(ch.get(), timeout_ms + 1000);
  if (!ev) return core::fail(ev.err().errnum(), "connect to " + host + ":" + port + ": " + ev.err().message);
  if (ev->type == RDMA_CM_EVENT_REJECTED) {
    auto a = decode_accept(ev->private_data);
    if (a && a->status > 0)
      return core::fail(a->status, "server " + host + ":" + port + " refused the connection: " + std::strerror(a->status));
    return core::fail(ECONNREFUSED, "connection to " + host + ":" + port + " rejected (no uvd server on that port?)");
  }
  if (ev->type != RDMA_CM_EVENT_ESTABLISHED)
    return core::fail(ECONNABORTED, std::string("connect to ") + host + ":" + port + ": " + cm_event_name(ev->type));
  auto a = decode_accept(ev->private_data);
  if (!a) return core::fail(EPROTO, "server answered the connection without a 3leaf accept: " + a.err().message);
  if (a->version != protocol_version) return core::fail(EPROTO, "server chose 3leaf version " + std::to_string(a->version));
  if (a->queue_depth == 0 || a->queue_depth > qd) return core::fail(EPROTO, "server granted queue depth " + std::to_string(a->queue_depth));
  qd = a->queue_depth;  // fewer credits than receives posted: harmless
  return core::ok();
}

// A synchronous control RPC during open, before the reaper runs: poll the CQ.
core::result<void> client::open_export() {
  std::byte* out = send_buf(0);
  open_rpc o;
  o.hdr.id = 1;
  o.flags = read_only ? OPEN_READ_ONLY : 0;
  o.name = export_name;
  size_t len = encode_open(o, out);
  ibv_sge sge{reinterpret_cast<uintptr_t>(out), static_cast<uint32_t>(len), msgs.lkey()};
  ibv_send_wr wr{};
  wr.wr_id = wr_id(WR_SEND, 0);
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(id->qp, &wr, &bad); rc != 0) return core::fail(rc, "ibv_post_send (OPEN)");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  bool sent = false, got = false;
  while (!(sent && got)) {
    ibv_wc wc[4];
    int n = ibv_poll_cq(cq.get(), 4, wc);
    if (n < 0) return core::fail(EIO, "ibv_poll_cq");
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) return core::fail(ECONNRESET, "OPEN failed: " + wc_error_text(wc[i]));
      if (wr_kind(wc[i].wr_id) == WR_SEND) {
        sent = true;
      } else if (wr_kind(wc[i].wr_id) == WR_RECV) {
        uint32_t s = wr_slot(wc[i].wr_id);
        auto r = decode_open_reply({recv_buf(s), wc[i].byte_len}, &geo);
        if (!r) return core::fail(EPROTO, "bad OPEN reply: " + r.err().message);
        if (geo.status < 0)
          return core::fail(-geo.status, "server refused export '" + export_name + "': " + std::strerror(-geo.status));
        if (int prc = post_recv(id->qp, wr_id(WR_RECV, s), recv_buf(s), msg_size, msgs.lkey()); prc < 0)
          return core::fail(-prc, "ibv_post_recv");
        got = true;
      }
    }
    if (n == 0) {
      if (std::chrono::steady_clock::now() > deadline) return core::fail(ETIMEDOUT, "no OPEN reply from the server");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  if (geo.block_size == 0 || (geo.block_size & (geo.block_size - 1)) || geo.segment_size < geo.block_size ||
      geo.segment_size % geo.block_size || geo.nsegs == 0 || geo.max_segs == 0 || geo.max_segs > max_segs_per_rpc)
    return core::fail(EPROTO, "server sent an unusable geometry (block " + std::to_string(geo.block_size) + ", segment " +
                                  std::to_string(geo.segment_size) + " x " + std::to_string(geo.nsegs) + ")");
  for (uint32_t i = 0; i < geo.nsegs; ++i)
    if (geo.pool[i].length != geo.segment_size) return core::fail(EPROTO, "server pool segments differ in size");
  uint64_t stage_bytes = uint64_t{geo.nsegs} * geo.segment_size;
  auto st = registered_buffer::make(pd.get(), stage_bytes, IBV_ACCESS_LOCAL_WRITE, "staging segments");
  if (!st) return core::fail(std::move(st).err());
  staging = std::move(*st);
  max_transfer = geo.segment_size * std::min(geo.max_segs, geo.nsegs);
  slots.assign(qd, {});
  for (uint32_t i = qd; i-- > 0;) free_slots.push_back(i);
  seg_busy.assign(geo.nsegs, 0);
  segs_free = geo.nsegs;
  return core::ok();
}

int client::fence(uint32_t epoch) {
  uint32_t s;
  {
    std::unique_lock lk(mu);
    if (int d = dead.load()) return d;
    ctl_cv.wait(lk, [&] { return !free_slots.empty() || dead.load(); });
    if (int d = dead.load()) return d;
    s = free_slots.back();
    free_slots.pop_back();
    rpc_slot& sl = slots[s];
    ++sl.gen;
    sl.busy = true;
    sl.ctl = true;
    size_t len = encode_fence(uint64_t{sl.gen} << 32 | s, epoch, send_buf(s));
    ibv_sge sge{reinterpret_cast<uintptr_t>(send_buf(s)), static_cast<uint32_t>(len), msgs.lkey()};
    ibv_send_wr wr{};
    wr.wr_id = wr_id(WR_SEND, s);
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(id->qp, &wr, &bad); rc != 0) {
      sl = {};
      free_slots.push_back(s);
      return -ENOTCONN;
    }
    sl.send_mark = ++sq_posted;
    // Both halves (send completion and reply) must arrive before the slot is reused.
    ctl_cv.wait_for(lk, std::chrono::milliseconds(timeout_ms * 4), [&] {
      return (sl.reply_done && sl.send_done) || sl.ctl_done || dead.load();
    });
    int st = !(sl.reply_done && sl.send_done) ? (dead.load() ? dead.load() : -ETIMEDOUT) : sl.status;
    if (st == 0 && epoch == 0) st = static_cast<int>(std::min<uint32_t>(sl.reply_epoch, INT32_MAX));  // a query
    uint32_t gen = sl.gen;
    if (sl.reply_done && sl.send_done) {
      sl = {};
      sl.gen = gen;
      free_slots.push_back(s);
    }  // else the slot stays taken: a late reply finds no waiter, harmlessly
    return st;
  }
}

}  // namespace uvd::rdma::client_detail
