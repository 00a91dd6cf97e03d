// SPDX-License-Identifier: Apache-2.0
#include "transports/rdma/verbs.hpp"

#include <poll.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace uvd::rdma {

void cm_id_del::operator()(rdma_cm_id* id) const noexcept {
  if (id->qp) rdma_destroy_qp(id);
  rdma_destroy_id(id);
}

core::result<registered_buffer> registered_buffer::make(ibv_pd* pd, size_t bytes, int access, const char* what) {
  registered_buffer b;
  void* p = nullptr;
  size_t rounded = (bytes + 4095) & ~size_t{4095};
  if (posix_memalign(&p, 4096, rounded) != 0) return core::fail(ENOMEM, std::string("allocate ") + what);
  std::memset(p, 0, rounded);
  b.mem_.reset(static_cast<std::byte*>(p));
  b.size_ = bytes;
  ibv_mr* mr = ibv_reg_mr(pd, p, rounded, access);
  if (!mr) {
    int e = errno ? errno : ENOMEM;
    return core::fail(e, std::string("ibv_reg_mr of ") + std::to_string(rounded) + " bytes for " + what);
  }
  b.mr_.reset(mr);
  return b;
}

core::result<cm_event> next_cm_event(rdma_event_channel* ch, int timeout_ms) {
  pollfd pfd{ch->fd, POLLIN, 0};
  for (;;) {
    int n = ::poll(&pfd, 1, timeout_ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return core::fail(errno, "poll on the rdma_cm event channel");
    if (n == 0) return core::fail(ETIMEDOUT, "no rdma_cm event within " + std::to_string(timeout_ms) + " ms");
    break;
  }
  rdma_cm_event* ev = nullptr;
  if (rdma_get_cm_event(ch, &ev) != 0) return core::fail(errno, "rdma_get_cm_event");
  cm_event out;
  out.type = ev->event;
  out.status = ev->status;
  out.id = ev->id;
  out.listen_id = ev->listen_id;
  const rdma_conn_param& cp = ev->param.conn;
  if ((ev->event == RDMA_CM_EVENT_CONNECT_REQUEST || ev->event == RDMA_CM_EVENT_ESTABLISHED ||
       ev->event == RDMA_CM_EVENT_REJECTED || ev->event == RDMA_CM_EVENT_CONNECT_RESPONSE) &&
      cp.private_data && cp.private_data_len) {
    auto* p = static_cast<const std::byte*>(cp.private_data);
    out.private_data.assign(p, p + cp.private_data_len);
  }
  out.initiator_depth = cp.initiator_depth;
  out.responder_resources = cp.responder_resources;
  rdma_ack_cm_event(ev);
  return out;
}

core::result<cm_event> expect_cm_event(rdma_event_channel* ch, rdma_cm_event_type want, int timeout_ms) {
  auto ev = next_cm_event(ch, timeout_ms);
  if (!ev) return ev;
  if (ev->type != want) {
    int e = ev->type == RDMA_CM_EVENT_REJECTED        ? ECONNREFUSED
            : ev->type == RDMA_CM_EVENT_UNREACHABLE   ? EHOSTUNREACH
            : ev->type == RDMA_CM_EVENT_ADDR_ERROR    ? EADDRNOTAVAIL
            : ev->type == RDMA_CM_EVENT_ROUTE_ERROR   ? ENETUNREACH
            : ev->type == RDMA_CM_EVENT_CONNECT_ERROR ? ECONNABORTED
                                                      : EPROTO;
    return core::fail(e, std::string("expected rdma_cm event ") + cm_event_name(want) + ", got " +
                             cm_event_name(ev->type) + " (status " + std::to_string(ev->status) + ")");
  }
  return ev;
}

core::result<void> create_rc_qp(rdma_cm_id* id, ibv_pd* pd, ibv_cq* cq, uint32_t send_wr, uint32_t recv_wr,
                                uint32_t max_sge, uint32_t want_inline, uint32_t* got_inline) {
  ibv_qp_init_attr a{};
  a.send_cq = cq;
  a.recv_cq = cq;
  a.qp_type = IBV_QPT_RC;
  a.cap.max_send_wr = send_wr;
  a.cap.max_recv_wr = recv_wr;
  a.cap.max_send_sge = max_sge;
  a.cap.max_recv_sge = 1;
  a.cap.max_inline_data = want_inline;
  a.sq_sig_all = 0;
  int rc = rdma_create_qp(id, pd, &a);
  if (rc != 0 && want_inline) {  // inline data is an optimisation: go without
    a.cap.max_inline_data = 0;
    rc = rdma_create_qp(id, pd, &a);
  }
  if (rc != 0)
    return core::fail(errno, "rdma_create_qp (RC, " + std::to_string(send_wr) + " send / " + std::to_string(recv_wr) +
                                 " receive work requests)");
  if (got_inline) *got_inline = a.cap.max_inline_data;
  return core::ok();
}

int post_recv(ibv_qp* qp, uint64_t wr_id, void* addr, uint32_t len, uint32_t lkey) noexcept {
  ibv_sge sge{reinterpret_cast<uintptr_t>(addr), len, lkey};
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  int rc = ibv_post_recv(qp, &wr, &bad);
  return rc ? -rc : 0;
}

core::result<std::pair<std::string, std::string>> split_host_port(std::string_view text, const char* def) {
  std::string host, port = def;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos) return core::fail(EINVAL, "'" + std::string(text) + "': no ']'");
    host = std::string(text.substr(1, close - 1));
    std::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return core::fail(EINVAL, "'" + std::string(text) + "': expected ':' after ']'");
      port = std::string(rest.substr(1));
    }
  } else {
    size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      host = std::string(text);
    } else {
      host = std::string(text.substr(0, colon));
      port = std::string(text.substr(colon + 1));
    }
  }
  if (host.empty()) return core::fail(EINVAL, "'" + std::string(text) + "' names no host");
  if (port.empty() || port.find_first_not_of("0123456789") != std::string::npos || port.size() > 5 ||
      std::stoul(port) > 65535)
    return core::fail(EINVAL, "'" + std::string(text) + "': port '" + port + "' is not a number up to 65535");
  return std::pair{host, port};
}

const char* cm_event_name(rdma_cm_event_type t) noexcept { return rdma_event_str(t); }

std::string wc_error_text(const ibv_wc& wc) {
  return std::string(ibv_wc_status_str(wc.status)) + " (status " + std::to_string(wc.status) + ", vendor error " +
         std::to_string(wc.vendor_err) + ")";
}

bool have_rdma_device(std::string* why) {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (!list) {
    if (why) *why = std::string("ibv_get_device_list failed: ") + std::strerror(errno) + " (no RDMA support in this kernel?)";
    return false;
  }
  ibv_free_device_list(list);
  if (n == 0 && why)
    *why = "no RDMA device (ibv_get_device_list found none; Soft-RoCE needs the rdma_rxe module and "
           "'rdma link add rxe0 type rxe netdev IF')";
  return n > 0;
}

}  // namespace uvd::rdma
