// SPDX-License-Identifier: Apache-2.0
#pragma once
// An NBD server for any Vstore: fixed newstyle handshake (NBD_OPT_GO, INFO,
// LIST, EXPORT_NAME, ABORT), simple replies, READ / WRITE / FLUSH / TRIM /
// WRITE_ZEROES / DISC with FUA, several named exports, many concurrent
// connections on unix sockets and TCP.
//
// Each connection has one thread that reads and checks requests, submits
// them to the export's Vstore asynchronously (up to max_in_flight at once)
// and answers as completions arrive, possibly out of order. A completion
// sends its reply itself when the socket takes it without blocking, else the
// connection thread finishes the send, so a client that stops reading stalls
// only its own connection, never a Vstore completion path shared with others.
// A reply is sent only after the Vstore completed the request: an
// acknowledged write is as durable as the Vstore makes it (FUA and FLUSH
// included). Hostile input gets the error the protocol names or a clean
// disconnect that waits for the connection's in-flight I/O before freeing its
// buffers.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/result.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage::nbd {

struct export_config {
  std::string name;         // may be ""; the first export is also the default one
  std::string description;  // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
  std::shared_ptr<Vstore> disk;
  bool read_only = false;   // refuse writes even when the disk takes them
};

// Who is asking for an export: what export_resolver::resolve is told.
struct client_info {
  std::string peer;      // the client's address ("unix socket", "10.0.0.2:51234")
  std::string listener;  // the listener it reached ("unix:/run/uvd.sock", "tcp:0.0.0.0:10809")
};

// An export a resolver opened for one connection. hold is released when that
// connection ends (or the client picks another export first).
struct resolved_export {
  export_config cfg;
  std::shared_ptr<void> hold;
};

// Exports not in server_options::exports, opened by name on demand (e.g.
// per-client overlays provisioned on first use). Called from connection
// threads, several at once. Names are the client's: hostile input.
class export_resolver {
 public:
  virtual ~export_resolver() = default;
  // ENOENT: no such export (NBD_REP_ERR_UNKNOWN); EINVAL or EPERM: a name the
  // server refuses (NBD_REP_ERR_POLICY); anything else: NBD_REP_ERR_UNKNOWN
  // with the message. Messages go to the client.
  virtual core::result<resolved_export> resolve(std::string_view name, const client_info& who) = 0;
  // Names and descriptions NBD_OPT_LIST shows after the fixed exports.
  virtual std::vector<std::pair<std::string, std::string>> list() = 0;
};

struct server_options {
  std::vector<export_config> exports;
  std::shared_ptr<export_resolver> resolver;  // more exports, looked up by name (may be null)
  std::vector<std::string> unix_paths;  // listen on these unix socket paths
  std::vector<std::string> tcp;         // and on these "HOST:PORT" / "[V6]:PORT" (port 0: any free port)
  uint32_t max_in_flight = 64;          // requests in flight per connection (1..1024)
  uint32_t max_payload = 32u << 20;     // longest READ/WRITE, advertised as the maximum block size
  uint64_t max_buffered = 64ull << 20;  // payload bytes one connection may hold in flight (at least max_payload)
  uint32_t max_connections = 256;       // more are accepted and closed at once
  uint32_t handshake_timeout_ms = 30000;  // a client must reach transmission within this
  uint32_t drain_timeout_ms = 10000;    // when a connection ends, how long its replies may wait for a client that does not read
  bool multi_conn = true;               // advertise NBD_FLAG_CAN_MULTI_CONN (every connection shares one Vstore)
  uint32_t busy_poll_us = 50;           // after serving, look for the next request this long before sleeping (0: never)
};

struct traffic_stats {
  uint64_t reads = 0, writes = 0, flushes = 0, trims = 0, write_zeroes = 0;
  uint64_t read_bytes = 0, write_bytes = 0;
  uint64_t errors = 0;  // requests answered with an error
  std::string to_string() const;
};

struct export_stats {
  std::string name;
  uint64_t connections = 0;  // connections that chose this export
  traffic_stats io;          // of the connections that have ended
};

class server {
 public:
  // Checks the options and binds every listener (so a port or path in use
  // fails here). Serves nothing until start().
  // exports may be empty when a resolver is given.
  static core::result<std::unique_ptr<server>> create(server_options opts);
  ~server();  // stop()
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  // Starts accepting connections on a thread of its own.
  core::result<void> start();
  // Async-signal-safe: asks wait() to return. Does not stop anything itself.
  void request_stop() noexcept;
  // Blocks until request_stop() or stop().
  void wait();
  // start(), wait(), stop().
  core::result<void> run();
  // Stops accepting, lets every connection finish the requests it has in
  // flight and deliver their replies (within drain_timeout_ms), closes them,
  // flushes every export and logs per-export statistics. Idempotent.
  void stop();

  // Serves one connected stream socket (a socketpair end, an inherited
  // socket); takes ownership of fd. Works with or without start().
  core::result<void> serve_fd(int fd);
  // Serves one connected stream socket that is already in the transmission
  // phase on export export_index: no handshake, as the Linux kernel's nbd
  // driver speaks after NBD_SET_SOCK. Takes ownership of fd.
  core::result<void> serve_fd_transmission(int fd, size_t export_index = 0);
  // The transmission flags this server gives export export_index (what a
  // client that skips the handshake must be told out of band, NBD_SET_FLAGS).
  uint16_t transmission_flags(size_t export_index = 0) const;

  // One NBD URI per listener for an export (default: the default export), e.g.
  // "nbd+unix:///disk?socket=/run/a.sock", "nbd://127.0.0.1:10809/disk".
  std::vector<std::string> uris(std::string_view export_name = {}) const;
  // The port TCP listener i is bound to (useful with port 0).
  uint16_t tcp_port(size_t i = 0) const;
  size_t active_connections() const;
  std::vector<export_stats> stats() const;

 private:
  struct impl;
  explicit server(std::unique_ptr<impl> p);
  core::result<void> serve_connected(int fd, size_t preset_export);
  std::unique_ptr<impl> impl_;
};

// "HOST:PORT", "[V6ADDR]:PORT" or "HOST" (port 10809) -> host and port.
core::result<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text);

}  // namespace uvd::storage::nbd
