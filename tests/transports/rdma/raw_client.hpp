// SPDX-License-Identifier: Apache-2.0
#pragma once
// A 3leaf client with no manners, for tests: it speaks the wire protocol
// straight over verbs and sends whatever bytes a test gives it (forged
// handles, garbage, another client's handles), so the server's refusals can be
// checked one by one. Not thread-safe.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/result.hpp"
#include "transports/rdma/protocol.hpp"
#include "transports/rdma/verbs.hpp"

namespace uvd::rdma::test {

class raw_client {
 public:
  // Connects from src (may be "") to host:port and, unless export_name is
  // null, OPENs it.
  static core::result<std::unique_ptr<raw_client>> connect(const std::string& src, const std::string& host,
                                                           const std::string& port, uint16_t qd = 32);
  ~raw_client();

  core::result<open_reply> open(const std::string& name, uint16_t flags = 0);

  // Sends one message (any bytes) and waits for the reply to it.
  core::result<reply> call(std::span<const std::byte> msg);
  // Sends every message, keeping up to qd in flight; returns the replies'
  // statuses in the order they arrived (ids tell which).
  core::result<std::vector<reply>> call_many(const std::vector<std::vector<std::byte>>& msgs);

  // RDMA WRITE/READ between a local buffer and a server segment (addr, rkey).
  // Returns the completion status (IBV_WC_SUCCESS or the error).
  core::result<int> rdma_write(uint64_t addr, uint32_t rkey, const void* data, uint32_t len);
  core::result<int> rdma_read(uint64_t addr, uint32_t rkey, void* data, uint32_t len);

  const open_reply& geometry() const { return geo_; }
  std::byte* local() const { return local_.data(); }  // 4 MiB registered scratch
  uint16_t qd() const { return qd_; }

 private:
  raw_client() = default;
  core::result<int> one_rdma(ibv_wr_opcode op, uint64_t addr, uint32_t rkey, void* data, uint32_t len);
  core::result<ibv_wc> poll_one(int timeout_ms);

  cm_channel_ptr ch_;
  cm_id_ptr id_;
  pd_ptr pd_;
  cq_ptr cq_;
  registered_buffer msgs_;
  registered_buffer local_;
  uint16_t qd_ = 0;
  open_reply geo_{};
  std::vector<ibv_wc> stash_;  // completions seen while waiting for another
};

}  // namespace uvd::rdma::test
