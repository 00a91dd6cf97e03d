// SPDX-License-Identifier: Apache-2.0
#pragma once
// The rdma client's private state, shared by client_conn.cpp (rdma_cm,
// OPEN, FENCE: the control path) and client.cpp (the data path and the
// vstore_ops table).
#include <infiniband/verbs.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/vstore_ops.hpp"
#include "transports/rdma/protocol.hpp"
#include "transports/rdma/verbs.hpp"

namespace uvd::rdma::client_detail {

using core::vstore_req;

// wr_id layout: kind in the top byte, slot (or segment) below.
enum : uint64_t { WR_RECV = 1, WR_SEND = 2, WR_READ = 3, WR_WRITE = 4 };
constexpr uint64_t wr_id(uint64_t kind, uint64_t slot) { return kind << 56 | slot; }
constexpr uint64_t wr_kind(uint64_t id) { return id >> 56; }
constexpr uint32_t wr_slot(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffff); }

struct rpc_slot {
  vstore_req* req = nullptr;  // null: a control RPC (FENCE) or free
  uint32_t gen = 0;
  bool busy = false;
  bool send_done = false;
  bool reply_done = false;
  int status = 0;
  uint32_t reads_left = 0;
  uint16_t nseg = 0;
  uint16_t segs[max_segs_per_rpc] = {};
  uint32_t last_len = 0;  // bytes used in the last segment
  uint64_t send_mark = 0;  // client::sq_posted after this slot's signaled SEND / last READ
  uint64_t read_mark = 0;
  // control RPC result
  bool ctl = false;
  bool ctl_done = false;
  uint32_t reply_epoch = 0;
};

struct client {
  std::string target, host, port, export_name;
  std::string src;  // local address to bind (picks the RDMA device), may be empty
  int timeout_ms = 5000;
  uint32_t busy_poll_us = 0;
  uint32_t want_qd = 32;
  bool read_only = false;
  const core::vstore_host* host_cb = nullptr;

  cm_channel_ptr ch;
  cm_id_ptr id;
  pd_ptr pd;
  comp_channel_ptr cc;
  cq_ptr cq;
  registered_buffer msgs;     // qd receive buffers, then qd send buffers
  registered_buffer staging;  // one local segment per server segment
  uint32_t nbufs = 0;  // receive (and send) buffers: the queue depth asked for
  uint32_t qd = 0;     // RPCs in flight: what the server granted (<= nbufs)
  open_reply geo{};
  uint32_t max_transfer = 0;
  uint32_t max_inline = 0;  // bytes an RPC SEND may carry inline (the QP's limit)
  // Send queue accounting under selective signaling: an unsignaled work
  // request is known done once a later signaled one completes. Past half the
  // queue every post is signaled, so the queue never overflows.
  uint32_t sq_cap = 0;
  uint64_t sq_posted = 0, sq_freed = 0;
  // RDMA READs asked for during one pass over the CQ, posted as one chain.
  std::vector<ibv_send_wr> read_wrs;
  std::vector<ibv_sge> read_sges;
  std::vector<std::pair<vstore_req*, int>> reaped;  // completions of one reap() (reaper thread only)

  std::mutex mu;
  std::vector<rpc_slot> slots;
  std::vector<uint32_t> free_slots;
  // Staging segment i pairs with server segment i. Transfers take runs of
  // adjacent segments where they can, so that one RDMA op moves a whole run.
  std::vector<uint8_t> seg_busy;
  uint32_t segs_free = 0;
  std::condition_variable ctl_cv;
  std::atomic<int> dead{0};  // 0, or the -errno every request now gets
  int wake_fd = -1;
  std::atomic<bool> stopping{false};
  std::thread reaper;

  std::byte* recv_buf(uint32_t i) { return msgs.data() + size_t{i} * msg_size; }
  std::byte* send_buf(uint32_t i) { return msgs.data() + (size_t{nbufs} + i) * msg_size; }
  std::byte* seg_buf(uint32_t s) { return staging.data() + size_t{s} * geo.segment_size; }

  ~client();
  core::result<void> connect();
  core::result<void> open_export();
  int submit(vstore_req* const* reqs, uint32_t n);
  int post_rpc_locked(uint32_t s, vstore_req* r);
  void run();
  int reap(int budget);
  void on_wc(const ibv_wc& wc, std::vector<std::pair<vstore_req*, int>>& done);
  void take_segs_locked(rpc_slot& sl);
  void put_segs_locked(const rpc_slot& sl);
  // Segment runs of slot s as RDMA ops: {first segment, bytes}; returns the count.
  uint32_t runs_of(const rpc_slot& sl, std::pair<uint16_t, uint32_t>* out) const;
  void queue_reads_locked(uint32_t s);
  void flush_reads_locked(std::vector<std::pair<vstore_req*, int>>& done);
  uint32_t sq_used() const { return static_cast<uint32_t>(sq_posted - sq_freed); }
  void finish_slot_locked(uint32_t s, std::vector<std::pair<vstore_req*, int>>& done);
  void fail_all(int err, std::vector<std::pair<vstore_req*, int>>& done);
  int fence(uint32_t epoch);
};

}  // namespace uvd::rdma::client_detail
