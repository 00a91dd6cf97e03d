// SPDX-License-Identifier: Apache-2.0
#pragma once
// The storage server's private state (server.cpp: connections, rdma_cm and
// the service loop; server_io.cpp: the request path), shared by its files.
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unistd.h>
#include <vector>

#include "transports/rdma/protocol.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/server_check.hpp"
#include "transports/rdma/verbs.hpp"

namespace uvd::rdma {

namespace server_detail {

// WR_SEND_INLINE carries, below the kind, the count of sends posted up to it.
enum : uint64_t { WR_RECV = 1, WR_SEND = 2, WR_SEND_INLINE = 3 };
constexpr uint64_t wr_low_mask = (uint64_t{1} << 56) - 1;
constexpr uint64_t wr_id(uint64_t kind, uint64_t slot) { return kind << 56 | slot; }

struct export_entry {
  server_export ex;
  export_geometry geom;
  epoch_record epochs;
};

struct conn;

// Checks an export against the server's options and derives what it lacks
// (UUID; whether the disk keeps the epoch itself).
core::result<std::unique_ptr<export_entry>> make_export_entry(server_export e, const server_options& opts);

// One receive slot's I/O in flight at the export.
struct io_ctx {
  storage::vstore_io io;
  iovec iov[max_segs_per_rpc];
  conn* c = nullptr;
  uint32_t slot = 0;
  uint64_t id = 0;
  uint32_t epoch = 0;
  uint64_t send_mark = 0;  // conn::sq_posted after this slot's signaled reply
};

struct conn {
  server::impl* srv = nullptr;
  uint64_t serial = 0;
  cm_id_ptr id;
  pd_ptr pd;
  comp_channel_ptr cc;
  cq_ptr cq;
  registered_buffer msgs;  // nrecv receive buffers, then nrecv reply buffers
  registered_buffer pool;  // this client's segments; no other client's PD can reach it
  uint32_t qd = 0;     // credits granted to the client
  // Receive slots: twice the credits. A slot is reposted once its reply was
  // posted inline, or else once that reply was sent (its reply buffer is free
  // again); a client may send its next RPC as soon as it sees a reply, so the
  // spare half keeps a well-behaved client out of RNR waits.
  uint32_t nrecv = 0;
  handle_table handles;             // until OPEN moves it into the gate
  void* dyn_ref = nullptr;          // the resolver's hold on a resolved export (exp), closed at teardown
  std::optional<rpc_gate> gate;     // after OPEN
  export_entry* exp = nullptr;
  std::vector<io_ctx> ctx;
  uint32_t max_inline = 0;          // reply bytes a SEND carries inline (the QP's limit)
  uint32_t sq_cap = 0;              // send work requests the QP holds
  uint64_t sq_posted = 0, sq_freed = 0;  // replies posted / known done (under mu)
  std::mutex mu;                    // gate, and posting sends from several threads
  std::atomic<uint32_t> in_flight{0};  // export I/O and fences not answered yet
  std::atomic<bool> closing{false};
  std::atomic<uint64_t> rpcs{0};
  std::vector<storage::vstore_io*> batch;  // service thread only

  std::byte* recv_buf(uint32_t i) { return msgs.data() + size_t{i} * msg_size; }
  std::byte* send_buf(uint32_t i) { return msgs.data() + (size_t{nrecv} + i) * msg_size; }
};

inline uint16_t vstore_opcode(uint16_t op) {
  switch (op) {
    case OP_READ: return core::VSTORE_OP_READ;
    case OP_WRITE: return core::VSTORE_OP_WRITE;
    case OP_FLUSH: return core::VSTORE_OP_FLUSH;
    case OP_DISCARD: return core::VSTORE_OP_DISCARD;
    default: return core::VSTORE_OP_WRITE_ZEROES;
  }
}

}  // namespace server_detail

using server_detail::conn;
using server_detail::export_entry;
using server_detail::io_ctx;

struct server::impl {
  server_options opts;
  std::vector<std::unique_ptr<export_entry>> exports;
  export_resolver resolver;
  // Resolved exports by name, with the connections that use each (service
  // thread only): one entry, one epoch record, however many clients.
  struct resolved {
    std::unique_ptr<export_entry> entry;
    uint32_t users = 0;
  };
  std::map<std::string, resolved> dynamic;
  cm_channel_ptr ch;
  std::vector<cm_id_ptr> listeners;
  int cm_wake = -1, svc_wake = -1, ep = -1;
  std::thread cm_thread, svc_thread;
  std::atomic<bool> stop_cm{false}, stop_svc{false};
  bool started = false, stopped = false;

  mutable std::mutex conns_mu;
  std::map<rdma_cm_id*, std::shared_ptr<conn>> conns;  // by cm id
  uint64_t conns_gen = 0;
  uint64_t next_serial = 0;

  refusal_counters refused;
  std::atomic<uint64_t> accepted{0}, rejected{0}, served{0}, max_in_flight{0};
  // Threads inside a completion or fence answer: their last act (waking the
  // service thread) may follow the connection's last in-flight count, so
  // stop() waits for them before the server goes away.
  std::atomic<uint32_t> callbacks{0};

  ~impl();
  export_entry* find_export(const std::string& name);
  // A resolver's export for c (its hold kept in c.dyn_ref): nullptr with *status -errno.
  export_entry* open_resolved(conn& c, const std::string& name, int* status);
  void close_resolved(conn& c);
  void cm_loop();
  void on_connect_request(const cm_event& ev);
  core::result<std::shared_ptr<conn>> make_conn(const cm_event& ev, uint32_t qd);
  core::result<void> build_conn(const std::shared_ptr<conn>& c, rdma_cm_id* id);
  void svc_loop();
  bool service(conn& c);
  void on_recv(conn& c, uint32_t slot, uint32_t len);
  void refuse(conn& c, uint32_t slot, uint64_t id, refusal why);
  void post_reply(conn& c, uint32_t slot, size_t len);
  // epoch: the export's epoch to report; -1: the server's own record's.
  void reply_status(conn& c, uint32_t slot, uint64_t id, int status, int64_t epoch = -1);
  void teardown(conn& c);
  static void on_io_done(storage::vstore_io* io, int status);
  void answer_fences(const std::vector<uint64_t>& cookies);
  void wake_svc() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = ::write(svc_wake, &one, sizeof one);
  }
};

}  // namespace uvd::rdma
