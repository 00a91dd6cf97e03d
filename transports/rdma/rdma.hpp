// SPDX-License-Identifier: Apache-2.0
#pragma once
// The rdma transport: storage over RDMA in the 3leaf model (protocol.hpp)
// on libibverbs + librdmacm, client and server.
//
// Client: the vstore_ops table "rdma", URI rdma://HOST[:PORT]/EXPORT where
// EXPORT is an export name or its UUID. Options (after '?', '&'-separated):
//   qd=N            RPCs in flight on the connection (default 32, the server may grant fewer)
//   timeout_ms=N    address/route resolution and connect timeout (default 5000)
//   busy_poll_us=N  poll the completion queue this long after the last completion before
//                   sleeping on the completion channel, yielding the CPU between polls
//                   (default 0: on a machine with few CPUs the wake-up is cheaper than
//                   taking CPU time from the threads that answer)
//   src=ADDR        local address to connect from (picks the local RDMA device)
// The client copies data through its own registered staging segments (one per
// server segment), so callers' buffers need no registration.
//
// Server: serves any storage::Vstore exports to many clients at once; every
// client gets its own protection domain, pool and handles. One service thread
// visits the clients round-robin, taking up to `batch` RPCs from each per
// round and submitting them as one batch.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/result.hpp"
#include "core/vstore_ops.hpp"
#include "storage/vstore.hpp"

namespace uvd::rdma {

inline constexpr const char* default_port = "7171";

extern const core::vstore_ops rdma_vstore_ops;

// An export as the server sees it. The server only calls submit(), so the
// disk may live on the far side of a plugin boundary.
struct server_export {
  std::string name;
  std::string uuid;  // empty: derived from the medium id and name (stable across restarts)
  uint64_t size = 0;
  uint32_t block_size = 512;
  bool read_only = false;
  uint64_t features = 0;  // core::VSTORE_F_* of the disk
  std::string medium_id;  // vstore_info::id
  void* disk = nullptr;
  void (*submit)(void* disk, storage::vstore_io* const* ios, uint32_t n) = nullptr;
  // The disk's own fencing (vstore_ops::fence semantics), or nullptr: then the
  // server keeps the export's epoch itself (in memory, this server only).
  int (*fence)(void* disk, uint32_t epoch) = nullptr;
};

// A server_export for a Vstore in this process (kept alive by the caller).
inline server_export export_of(storage::Vstore& v, std::string name, bool read_only = false) {
  server_export e;
  e.name = std::move(name);
  e.size = v.size();
  e.block_size = v.block_size();
  e.read_only = read_only || v.read_only();
  e.features = v.info().features;
  e.medium_id = v.info().id;
  e.disk = &v;
  e.submit = [](void* d, storage::vstore_io* const* ios, uint32_t n) {
    static_cast<storage::Vstore*>(d)->submit(std::span<storage::vstore_io* const>(ios, n));
  };
  if (v.can_fence())
    e.fence = [](void* d, uint32_t epoch) -> int {
      auto r = static_cast<storage::Vstore*>(d)->fence(epoch);
      return r ? static_cast<int>(*r) : -r.err().errnum();
    };
  return e;
}

// Exports not in server_options::exports, opened when a client names one in
// OPEN (per-client overlays provisioned on first use) and shown by LIST. A
// plain C table, so it crosses the plugin boundary; every op is called on the
// server's service thread.
struct resolver_entry {
  std::string name;
  uint64_t size = 0;
  bool read_only = false;
};
struct export_resolver {
  void* ctx = nullptr;
  // Opens `name` (the client's: hostile) for one connection; listener and
  // peer are the addresses of both ends ("10.97.1.1:7171"). 0: *out
  // describes the export and *ref goes back to close() when the connection
  // ends. -ENOENT: no such export; any other -errno: refused, err says why
  // (sent to nobody, logged). Several connections opening the same name get
  // the same disk (the server then shares one export, and its epoch, between
  // them).
  int (*open)(void* ctx, const char* name, const char* listener, const char* peer, server_export* out, void** ref,
              char* err, size_t errlen) = nullptr;
  void (*close)(void* ctx, void* ref) = nullptr;
  // What LIST shows after the fixed exports (may be null).
  void (*list)(void* ctx, std::vector<resolver_entry>* out) = nullptr;
};

struct server_options {
  std::vector<std::string> listen;     // "ADDR[:PORT]" (default port 7171); the address picks the RDMA device
  std::vector<server_export> exports;
  uint32_t queue_depth = 64;           // most RPCs in flight per client (a client may ask for fewer)
  uint32_t segments = 64;              // pool segments per client (<= 128)
  uint32_t segment_size = 128 * 1024;  // bytes per segment; a client's pool is segments * segment_size
  uint32_t max_segs_per_rpc = 16;      // a READ/WRITE spans at most this many segments
  uint32_t max_clients = 64;
  uint32_t batch = 16;                 // RPCs taken from one client per round-robin turn
  uint32_t busy_poll_us = 0;           // spin this long before sleeping on the completion channels
  std::string log_level;               // for the plugin's own logger ("" : $UVD_LOG_LEVEL or info)
};

struct server_stats {
  uint64_t connections = 0;         // accepted so far
  uint64_t active = 0;              // connected now
  uint64_t rejected_connections = 0;
  uint64_t rpcs = 0;                // I/O RPCs served
  uint64_t refused = 0;             // RPCs refused (sum of the reasons below)
  std::string refusals;             // "bad_handle=3 sector_range=1"
  uint64_t refused_by[16] = {};     // indexed by refusal
  std::vector<uint64_t> per_client_rpcs;  // served per active connection, in accept order
  uint64_t max_in_flight = 0;       // most RPCs one connection had at the export at once
};

class server {
 public:
  // Binds and listens on every address (an address no RDMA device owns fails
  // here, naming it). Serves after start().
  // exports may be empty when resolver.open is set.
  static core::result<std::unique_ptr<server>> create(server_options opts, export_resolver resolver = {});
  ~server();  // stop()
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  core::result<void> start();
  // Stops accepting, disconnects every client, waits for their in-flight I/O,
  // frees their pools (handles revoked). Idempotent.
  void stop();
  // The port listener i is bound to (useful with port 0).
  uint16_t port(size_t i = 0) const;
  server_stats stats() const;
  // name -> uuid of every export, in order.
  std::vector<std::pair<std::string, std::string>> export_ids() const;

  struct impl;

 private:
  explicit server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// The server behind a C table, so that `uvd serve` reaches it through the
// rdma plugin (dlopen) and runs without libibverbs when RDMA is not wanted.
// The plugin exports it as extern "C" uvd_rdma_server_entry.
inline constexpr uint32_t SERVER_API_VERSION = 1;
struct server_api {
  uint32_t abi_version;  // SERVER_API_VERSION
  uint32_t struct_size;
  // 0 or -errno (detail in err); *out is a server, started.
  int (*start)(const server_options* opts, void** out, char* err, size_t errlen);
  void (*stats)(void* srv, server_stats* out);
  void (*export_ids)(void* srv, std::vector<std::pair<std::string, std::string>>* out);
  uint16_t (*port)(void* srv, size_t i);
  void (*stop_and_free)(void* srv);
  // Appended (present when struct_size covers it): start() with a resolver.
  int (*start_resolving)(const server_options* opts, const export_resolver* resolver, void** out, char* err,
                         size_t errlen);
};
// The part of server_api every version has.
inline constexpr size_t server_api_base_size = offsetof(server_api, start_resolving);
const server_api* server_entry();

// Raises the export's fencing epoch through an open rdma device handle (the
// vstore_ops handle): answered once no I/O admitted under an older epoch is
// in flight at the server. 0 or -errno. The vstore_ops `fence` op once
// vstore_ops carries one.
int rdma_fence(void* handle, uint32_t epoch);

}  // namespace uvd::rdma

#define UVD_RDMA_SERVER_ENTRY_SYMBOL "uvd_rdma_server_entry"
