// SPDX-License-Identifier: Apache-2.0
#include "tests/transports/rdma/raw_client.hpp"

#include <netdb.h>

#include <chrono>
#include <cstring>
#include <thread>

namespace uvd::rdma::test {

namespace {
enum : uint64_t { K_RECV = 1, K_SEND = 2, K_RDMA = 3 };
constexpr uint64_t wr(uint64_t k, uint64_t i) { return k << 56 | i; }
constexpr size_t local_bytes = 4u << 20;
}  // namespace

raw_client::~raw_client() {
  if (id_ && id_->qp) {
    rdma_disconnect(id_.get());
    rdma_destroy_qp(id_.get());
  }
  cq_.reset();
  msgs_.reset();
  local_.reset();
  pd_.reset();
  id_.reset();
  ch_.reset();
}

core::result<std::unique_ptr<raw_client>> raw_client::connect(const std::string& src, const std::string& host,
                                                              const std::string& port, uint16_t qd) {
  std::unique_ptr<raw_client> c(new raw_client());
  c->qd_ = qd;
  c->ch_.reset(rdma_create_event_channel());
  if (!c->ch_) return core::fail(errno, "rdma_create_event_channel");
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(c->ch_.get(), &id, nullptr, RDMA_PS_TCP)) return core::fail(errno, "rdma_create_id");
  c->id_.reset(id);
  addrinfo* dst = nullptr;
  addrinfo* sa = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), nullptr, &dst)) return core::fail(EINVAL, "resolve " + host);
  if (!src.empty() && getaddrinfo(src.c_str(), nullptr, nullptr, &sa)) {
    freeaddrinfo(dst);
    return core::fail(EINVAL, "resolve " + src);
  }
  int rc = rdma_resolve_addr(id, sa ? sa->ai_addr : nullptr, dst->ai_addr, 5000);
  freeaddrinfo(dst);
  if (sa) freeaddrinfo(sa);
  if (rc) return core::fail(errno, "rdma_resolve_addr");
  if (auto e = expect_cm_event(c->ch_.get(), RDMA_CM_EVENT_ADDR_RESOLVED, 6000); !e) return core::fail(e.err());
  if (rdma_resolve_route(id, 5000)) return core::fail(errno, "rdma_resolve_route");
  if (auto e = expect_cm_event(c->ch_.get(), RDMA_CM_EVENT_ROUTE_RESOLVED, 6000); !e) return core::fail(e.err());
  c->pd_.reset(ibv_alloc_pd(id->verbs));
  if (!c->pd_) return core::fail(ENOMEM, "ibv_alloc_pd");
  c->cq_.reset(ibv_create_cq(id->verbs, 4 * qd + 8, nullptr, nullptr, 0));
  if (!c->cq_) return core::fail(ENOMEM, "ibv_create_cq");
  if (auto r = create_rc_qp(id, c->pd_.get(), c->cq_.get(), 2 * qd + 4, qd, 1); !r) return core::fail(r.err());
  auto m = registered_buffer::make(c->pd_.get(), size_t{2} * qd * msg_size, IBV_ACCESS_LOCAL_WRITE, "msgs");
  if (!m) return core::fail(m.err());
  c->msgs_ = std::move(*m);
  auto l = registered_buffer::make(c->pd_.get(), local_bytes, IBV_ACCESS_LOCAL_WRITE, "scratch");
  if (!l) return core::fail(l.err());
  c->local_ = std::move(*l);
  for (uint16_t i = 0; i < qd; ++i)
    if (post_recv(id->qp, wr(K_RECV, i), c->msgs_.data() + size_t{i} * msg_size, msg_size, c->msgs_.lkey()))
      return core::fail(EIO, "post_recv");
  std::byte hello[hello_size];
  conn_hello h;
  h.queue_depth = qd;
  encode_hello(h, hello);
  rdma_conn_param cp{};
  cp.private_data = hello;
  cp.private_data_len = hello_size;
  cp.initiator_depth = 8;
  cp.retry_count = 7;
  cp.rnr_retry_count = 7;
  if (rdma_connect(id, &cp)) return core::fail(errno, "rdma_connect");
  auto ev = next_cm_event(c->ch_.get(), 6000);
  if (!ev) return core::fail(ev.err());
  if (ev->type != RDMA_CM_EVENT_ESTABLISHED)
    return core::fail(ECONNREFUSED, std::string("connect: ") + cm_event_name(ev->type));
  auto a = decode_accept(ev->private_data);
  if (!a) return core::fail(a.err());
  c->qd_ = a->queue_depth;
  return c;
}

core::result<ibv_wc> raw_client::poll_one(int timeout_ms) {
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    ibv_wc wc;
    int n = ibv_poll_cq(cq_.get(), 1, &wc);
    if (n < 0) return core::fail(EIO, "ibv_poll_cq");
    if (n == 1) return wc;
    if (std::chrono::steady_clock::now() > until) return core::fail(ETIMEDOUT, "no completion");
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

core::result<open_reply> raw_client::open(const std::string& name, uint16_t flags) {
  open_rpc o;
  o.hdr.id = 0x0e0e;
  o.name = name;
  o.flags = flags;
  std::vector<std::byte> m(msg_size);
  m.resize(encode_open(o, m.data()));
  // An OPEN reply is not a `reply`: send and parse by hand.
  std::byte* sb = msgs_.data() + size_t{qd_} * msg_size;
  std::memcpy(sb, m.data(), m.size());
  ibv_sge sge{reinterpret_cast<uintptr_t>(sb), static_cast<uint32_t>(m.size()), msgs_.lkey()};
  ibv_send_wr w{};
  w.wr_id = wr(K_SEND, 0);
  w.sg_list = &sge;
  w.num_sge = 1;
  w.opcode = IBV_WR_SEND;
  w.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad;
  if (ibv_post_send(id_->qp, &w, &bad)) return core::fail(EIO, "post_send");
  bool sent = false, got = false;
  while (!sent || !got) {
    auto wc = poll_one(10000);
    if (!wc) return core::fail(wc.err());
    if (wc->status != IBV_WC_SUCCESS) return core::fail(ECONNRESET, wc_error_text(*wc));
    if (wc->wr_id >> 56 == K_SEND) {
      sent = true;
    } else {
      uint32_t i = wc->wr_id & 0xffff;
      std::byte* rb = msgs_.data() + size_t{i} * msg_size;
      auto r = decode_open_reply({rb, wc->byte_len}, &geo_);
      post_recv(id_->qp, wr(K_RECV, i), rb, msg_size, msgs_.lkey());
      if (!r) return core::fail(r.err());
      got = true;
    }
  }
  return geo_;
}

core::result<reply> raw_client::call(std::span<const std::byte> msg) {
  std::vector<std::vector<std::byte>> one{{msg.begin(), msg.end()}};
  auto r = call_many(one);
  if (!r) return core::fail(r.err());
  if (r->size() != 1) return core::fail(EPROTO, "expected one reply");
  return r->front();
}

core::result<std::vector<reply>> raw_client::call_many(const std::vector<std::vector<std::byte>>& msgs) {
  std::vector<reply> out;
  out.reserve(msgs.size());
  size_t next = 0, sends_done = 0;
  uint32_t outstanding = 0;  // RPCs sent and not answered
  std::vector<uint32_t> free_bufs;
  for (uint32_t i = 0; i < qd_; ++i) free_bufs.push_back(i);
  while (out.size() < msgs.size() || sends_done < next) {
    while (next < msgs.size() && outstanding < qd_ && !free_bufs.empty()) {
      uint32_t b = free_bufs.back();
      free_bufs.pop_back();
      std::byte* sb = msgs_.data() + (size_t{qd_} + b) * msg_size;
      size_t len = std::min(msgs[next].size(), msg_size);
      std::memcpy(sb, msgs[next].data(), len);
      ibv_sge sge{reinterpret_cast<uintptr_t>(sb), static_cast<uint32_t>(len), msgs_.lkey()};
      ibv_send_wr w{};
      w.wr_id = wr(K_SEND, b);
      w.sg_list = &sge;
      w.num_sge = 1;
      w.opcode = IBV_WR_SEND;
      w.send_flags = IBV_SEND_SIGNALED;
      ibv_send_wr* bad;
      if (ibv_post_send(id_->qp, &w, &bad)) return core::fail(EIO, "post_send");
      ++next;
      ++outstanding;
    }
    auto wc = poll_one(15000);
    if (!wc) return core::fail(wc.err().errnum(), wc.err().message + " after " + std::to_string(out.size()) + " replies");
    if (wc->status != IBV_WC_SUCCESS) return core::fail(ECONNRESET, wc_error_text(*wc));
    uint64_t kind = wc->wr_id >> 56;
    uint32_t i = wc->wr_id & 0xffff;
    if (kind == K_SEND) {
      free_bufs.push_back(i);
      ++sends_done;
    } else if (kind == K_RECV) {
      std::byte* rb = msgs_.data() + size_t{i} * msg_size;
      auto r = decode_reply({rb, wc->byte_len});
      post_recv(id_->qp, wr(K_RECV, i), rb, msg_size, msgs_.lkey());
      if (!r) return core::fail(r.err());
      out.push_back(*r);
      --outstanding;
    }
  }
  return out;
}

core::result<int> raw_client::one_rdma(ibv_wr_opcode op, uint64_t addr, uint32_t rkey, void* data, uint32_t len) {
  if (len > local_bytes) return core::fail(EINVAL, "too long");
  if (op == IBV_WR_RDMA_WRITE) std::memcpy(local_.data(), data, len);
  ibv_sge sge{local_.addr(), len, local_.lkey()};
  ibv_send_wr w{};
  w.wr_id = wr(K_RDMA, 0);
  w.sg_list = &sge;
  w.num_sge = 1;
  w.opcode = op;
  w.send_flags = IBV_SEND_SIGNALED;
  w.wr.rdma.remote_addr = addr;
  w.wr.rdma.rkey = rkey;
  ibv_send_wr* bad;
  if (ibv_post_send(id_->qp, &w, &bad)) return core::fail(EIO, "post_send");
  for (;;) {
    auto wc = poll_one(15000);
    if (!wc) return core::fail(wc.err());
    if (wc->wr_id >> 56 != K_RDMA) continue;
    if (op == IBV_WR_RDMA_READ && wc->status == IBV_WC_SUCCESS) std::memcpy(data, local_.data(), len);
    return static_cast<int>(wc->status);
  }
}

core::result<int> raw_client::rdma_write(uint64_t addr, uint32_t rkey, const void* data, uint32_t len) {
  return one_rdma(IBV_WR_RDMA_WRITE, addr, rkey, const_cast<void*>(data), len);
}
core::result<int> raw_client::rdma_read(uint64_t addr, uint32_t rkey, void* data, uint32_t len) {
  return one_rdma(IBV_WR_RDMA_READ, addr, rkey, data, len);
}

}  // namespace uvd::rdma::test
