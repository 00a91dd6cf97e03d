// SPDX-License-Identifier: Apache-2.0
#pragma once
// One end of a net-over-RDMA connection (net_proto.hpp), shared by the front
// end (net_veth.cpp) and the switch's port (net_port.cpp): protection domain,
// one completion channel over a send CQ and a receive CQ, the RC queue pair,
// registered receive buffers and send slots, and the credit window. Frames
// are copied into registered send slots, so callers' buffers need no
// registration. Not thread-safe: its owner serialises.
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/result.hpp"
#include "transports/rdma/net_proto.hpp"
#include "transports/rdma/verbs.hpp"

namespace uvd::rdma {

struct net_recv {
  uint32_t idx;  // receive buffer
  uint32_t len;  // bytes received
};

class net_conn {
 public:
  // Builds everything on id (whose device is known: after route resolution,
  // or a connect request) and posts `depth` receives of recv_size bytes.
  // send_wr: most sends in flight.
  static core::result<std::unique_ptr<net_conn>> create(rdma_cm_id* id, uint32_t depth, uint32_t recv_size,
                                                        uint32_t send_wr);
  ~net_conn();
  net_conn(const net_conn&) = delete;
  net_conn& operator=(const net_conn&) = delete;

  // Once the peer's depth and buffer size are known (hello / welcome):
  // registers the send slots and sets the credits.
  core::result<void> set_peer(uint32_t peer_depth, uint32_t peer_max_msg);

  int fd() const noexcept { return channel_->fd; }
  uint32_t depth() const noexcept { return depth_; }
  uint32_t recv_size() const noexcept { return recv_size_; }
  uint32_t peer_max_msg() const noexcept { return peer_max_msg_; }
  credit_window& window() noexcept { return win_; }

  // Takes the completion channel's events and rearms the receive queue, and
  // the send queue when no send slot is free; call before polling them so
  // that nothing completes unnoticed.
  bool arm();
  // Frees the slots of completed sends; false when a send failed.
  bool reap_sends();
  // Up to max completed receives into out, counted as taken (credit_window::
  // received); -1 when the connection is broken (*failed: the status of the
  // receive that failed, IBV_WC_SUCCESS for a completion that cannot be).
  int poll_recv(net_recv* out, int max, ibv_wc_status* failed);
  const uint8_t* buf(uint32_t idx) const noexcept { return recv_.data() ? reinterpret_cast<const uint8_t*>(recv_.data()) + size_t(idx) * recv_size_ : nullptr; }
  // Posts receive idx again (its data is no longer needed) and counts it as a credit to return.
  int repost(uint32_t idx);

  // A frame, mtu or link message may go now (two credits, a free slot).
  bool may_send_data() const noexcept { return win_.may_send_data() && !free_.empty(); }
  size_t free_slots() const noexcept { return free_.size(); }
  // Queues one message: hdr (its credits field is filled here) and payload,
  // copied into a send slot; flush() posts what was queued, in one call (one
  // doorbell for a burst). 0; -EAGAIN without credit or slot; -EMSGSIZE
  // over the peer's buffers.
  int send(net_msg_hdr h, const void* payload, uint32_t len);
  // Posts the queued messages. 0, or -errno when the queue pair is broken.
  int flush();
  // Sends (and flushes) a credit message when one is due (net_proto.hpp, R2).
  // 0 or -errno.
  int grant_if_due();

 private:
  net_conn() = default;

  rdma_cm_id* id_ = nullptr;  // not owned
  pd_ptr pd_;
  comp_channel_ptr channel_;
  cq_ptr send_cq_, recv_cq_;
  registered_buffer recv_, send_;
  uint32_t depth_ = 0, recv_size_ = 0, send_wr_ = 0;
  uint32_t peer_max_msg_ = 0, slot_size_ = 0, nslots_ = 0;
  std::vector<uint32_t> free_;
  std::vector<ibv_send_wr> wrs_;  // queued by send(), chained, posted by flush()
  std::vector<ibv_sge> sges_;
  uint32_t queued_ = 0;
  credit_window win_;
  bool has_qp_ = false;
  bool send_armed_ = false;
};

}  // namespace uvd::rdma
