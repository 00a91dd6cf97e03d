// SPDX-License-Identifier: Apache-2.0
#pragma once
// Thin RAII over the libibverbs / librdmacm objects both ends use: the
// rdma_cm event channel and ids, protection domains, registered memory,
// completion queues with a completion channel, RC queue pairs. Private to the
// rdma transport.
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/result.hpp"

namespace uvd::rdma {

struct cm_channel_del {
  void operator()(rdma_event_channel* c) const noexcept { rdma_destroy_event_channel(c); }
};
struct cm_id_del {
  void operator()(rdma_cm_id* id) const noexcept;  // destroys its QP first, if any
};
struct pd_del {
  void operator()(ibv_pd* p) const noexcept { ibv_dealloc_pd(p); }
};
struct mr_del {
  void operator()(ibv_mr* m) const noexcept { ibv_dereg_mr(m); }
};
struct comp_channel_del {
  void operator()(ibv_comp_channel* c) const noexcept { ibv_destroy_comp_channel(c); }
};
struct cq_del {
  void operator()(ibv_cq* c) const noexcept { ibv_destroy_cq(c); }
};
struct free_del {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};

using cm_channel_ptr = std::unique_ptr<rdma_event_channel, cm_channel_del>;
using cm_id_ptr = std::unique_ptr<rdma_cm_id, cm_id_del>;
using pd_ptr = std::unique_ptr<ibv_pd, pd_del>;
using mr_ptr = std::unique_ptr<ibv_mr, mr_del>;
using comp_channel_ptr = std::unique_ptr<ibv_comp_channel, comp_channel_del>;
using cq_ptr = std::unique_ptr<ibv_cq, cq_del>;

// Page-aligned memory registered with a protection domain.
class registered_buffer {
 public:
  static core::result<registered_buffer> make(ibv_pd* pd, size_t bytes, int access, const char* what);
  std::byte* data() const noexcept { return mem_.get(); }
  size_t size() const noexcept { return size_; }
  uint32_t lkey() const noexcept { return mr_->lkey; }
  uint32_t rkey() const noexcept { return mr_->rkey; }
  uint64_t addr() const noexcept { return reinterpret_cast<uintptr_t>(mem_.get()); }
  // Deregisters first: the memory outlives its registration.
  void reset() noexcept {
    mr_.reset();
    mem_.reset();
  }

 private:
  std::unique_ptr<std::byte, free_del> mem_;
  mr_ptr mr_;
  size_t size_ = 0;
};

// One rdma_cm event, copied out (private data included) and acknowledged, so
// that the id it names can be destroyed whenever its owner likes.
struct cm_event {
  rdma_cm_event_type type = RDMA_CM_EVENT_ADDR_ERROR;
  int status = 0;
  rdma_cm_id* id = nullptr;
  rdma_cm_id* listen_id = nullptr;
  std::vector<std::byte> private_data;
  uint8_t initiator_depth = 0;
  uint8_t responder_resources = 0;
};

// Waits up to timeout_ms (-1: forever) for the next event. ETIMEDOUT on timeout.
core::result<cm_event> next_cm_event(rdma_event_channel* ch, int timeout_ms);
// Waits for an event of `want` type, failing on any other.
core::result<cm_event> expect_cm_event(rdma_event_channel* ch, rdma_cm_event_type want, int timeout_ms);

// Creates the RC queue pair of a connection (rdma_create_qp) on one CQ for
// both directions. With want_inline, asks for SENDs that carry that many
// bytes inline (copied into the work request when posted, so the buffer is
// free at once and the device reads no memory for them); a device that cannot
// gets a QP without, and *got_inline says what the QP took.
core::result<void> create_rc_qp(rdma_cm_id* id, ibv_pd* pd, ibv_cq* cq, uint32_t send_wr, uint32_t recv_wr,
                                uint32_t max_sge, uint32_t want_inline = 0, uint32_t* got_inline = nullptr);

int post_recv(ibv_qp* qp, uint64_t wr_id, void* addr, uint32_t len, uint32_t lkey) noexcept;

// "host:port" or "[v6]:port" -> parts; port defaults to `def`.
core::result<std::pair<std::string, std::string>> split_host_port(std::string_view text, const char* def);

const char* cm_event_name(rdma_cm_event_type t) noexcept;
std::string wc_error_text(const ibv_wc& wc);

// Whether this machine has any RDMA device at all, with a reason when not.
bool have_rdma_device(std::string* why);

}  // namespace uvd::rdma
