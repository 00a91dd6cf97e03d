// SPDX-License-Identifier: Apache-2.0
#pragma once
// One NBD client connection: handshake, then the transmission phase. Private
// to storage/nbd; the server owns connections and runs each on a thread.
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "storage/nbd/handshake.hpp"
#include "storage/nbd/nbd.hpp"
#include "storage/nbd/protocol.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage::nbd::detail {

// Counters bumped from completion threads; relaxed atomics.
struct traffic_counters {
  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, trims{0}, write_zeroes{0};
  std::atomic<uint64_t> read_bytes{0}, write_bytes{0}, errors{0};

  void count(uint16_t type, uint64_t bytes, bool failed) noexcept;
  void add(const traffic_stats& s) noexcept;
  traffic_stats snapshot() const noexcept;
};

// An export as the server serves it.
struct export_state {
  export_config cfg;
  export_geometry geometry;
  std::atomic<uint64_t> connections{0};
  traffic_counters totals;  // of ended connections
};

// What connections share with the server; outlives every connection.
struct server_shared {
  server_options opts;
  std::vector<export_desc> descs;  // what the handshake tells clients, index = export
  std::vector<std::unique_ptr<export_state>> exports;
};

// Fills an export's geometry and what the handshake tells about it (the
// server's fixed exports and resolved ones alike).
core::result<void> describe_export(const export_config& e, const server_options& opts, export_state& st,
                                   export_desc& desc);

// The exports server_options::resolver opens for one connection, as the
// handshake looks them up (dynamic.cpp). Holds the one it resolved last.
class dynamic_exports final : public export_lookup {
 public:
  dynamic_exports(const server_shared& shared, client_info who) : shared_(shared), who_(std::move(who)) {}
  const export_desc* lookup(std::string_view name, uint32_t* error, std::string* message) override;
  std::vector<export_desc> list() override;
  // The export the last successful lookup opened.
  export_state* chosen() noexcept { return state_.get(); }

 private:
  const server_shared& shared_;
  client_info who_;
  std::unique_ptr<export_state> state_;
  export_desc desc_;
  std::shared_ptr<void> hold_;
};

class connection {
 public:
  // Takes ownership of fd (a connected, non-blocking stream socket).
  // preset_export < shared.exports.size(): the peer starts in the transmission
  // phase on that export, with no handshake (the Linux kernel's nbd driver
  // after NBD_SET_SOCK); otherwise it negotiates first.
  static constexpr size_t no_preset = SIZE_MAX;
  connection(const server_shared& shared, int fd, uint64_t id, std::string peer, size_t preset_export = no_preset);
  ~connection();
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  // The connection thread's body: returns once the socket is closed and no
  // request of this connection is in flight any more.
  void run();
  // Any thread: finish what is in flight, then close.
  void request_stop() noexcept;
  uint64_t id() const noexcept { return id_; }
  // The listener this connection came through, for resolvers (before run()).
  void set_listener(std::string l) { listener_ = std::move(l); }

 private:
  struct slot {
    vstore_io io;
    iovec data{};
    connection* conn = nullptr;
    request req;
    uint32_t error = 0;      // NBD_E* of the reply
    uint64_t charged = 0;    // bytes of max_buffered this slot holds
    std::byte* buf = nullptr;  // payload buffer, 4 KiB aligned, reused
    size_t cap = 0;
    slot* next = nullptr;    // reply queue link
    bool with_data = false;  // the reply carries the read data
    uint8_t hdr[NBD_SIMPLE_REPLY_SIZE];
  };
  enum class rx_state : uint8_t { header, payload, discard };
  enum class end_kind : uint8_t { none, disc, eof, hard, stop };

  bool do_handshake();
  void enter_transmission(size_t export_index);
  void transmission();
  bool send_all_blocking(std::span<const uint8_t> data, int64_t deadline_ms);

  // Receive side (connection thread only).
  bool rx();  // false: stop reading (end_ says why)
  bool rx_header();
  bool fill_rbuf();
  bool start_request(const request& r, const request_verdict& v);
  void submit_pending();
  void end(end_kind k, std::string why);
  bool busy_poll();

  // Slots and the reply path (any thread).
  slot* acquire(uint64_t bytes);
  void release(slot* s);
  void queue_reply(slot* s);
  void send_replies();
  void wake() noexcept;
  static void on_done(vstore_io* io, int status);
  static void free_buf(slot& s);

  const server_shared& shared_;
  int fd_;
  int wake_fd_ = -1;
  uint64_t id_;
  std::string peer_;
  size_t preset_export_;
  std::atomic<bool> stop_requested_{false};

  std::string listener_;
  // Declared before exp_ and disk_, so it goes after them: it may hold the disk.
  std::unique_ptr<dynamic_exports> dyn_;
  export_state* exp_ = nullptr;
  Vstore* disk_ = nullptr;
  export_geometry geo_;
  std::vector<slot> slots_;

  // Receive state (connection thread).
  std::unique_ptr<uint8_t[]> rbuf_;
  size_t rpos_ = 0, rend_ = 0;
  bool readable_ = true;   // the socket may have data (last recv was not short)
  bool rx_blocked_ = false;  // the next request waits for a free slot or buffer budget
  bool served_since_sleep_ = false;  // a request arrived since the last busy poll
  rx_state rxs_ = rx_state::header;
  slot* rx_slot_ = nullptr;  // request whose payload is arriving / being dropped
  uint64_t rx_left_ = 0;
  std::vector<vstore_io*> to_submit_;
  end_kind end_ = end_kind::none;
  std::string end_why_;

  // Shared between the connection thread and completions.
  std::mutex mu_;
  std::vector<slot*> free_;
  slot* rq_head_ = nullptr;  // replies waiting to be sent
  slot* rq_tail_ = nullptr;
  uint32_t in_flight_ = 0;   // slots out of free_
  uint64_t buffered_ = 0;
  bool sending_ = false;     // someone holds the send role
  bool want_pollout_ = false;  // the socket was full: the connection thread waits for POLLOUT
  bool broken_ = false;      // the socket failed: replies are dropped
  bool thread_waiting_ = false;  // the connection thread waits for a slot or for in-flight I/O
  std::atomic<uint64_t> progress_{0};
  std::atomic<uint32_t> callbacks_{0};  // completions running inside this connection
  std::atomic<uint64_t> allocated_{0};  // bytes of payload buffers the slots hold, in use or not  // bytes sent, to tell a stalled client from a slow one

  // Send state, owned by whoever holds the send role.
  slot* out_head_ = nullptr;
  slot* out_tail_ = nullptr;
  size_t out_off_ = 0;

  traffic_counters io_;
  std::atomic<bool> wrote_{false};
  std::atomic<uint64_t> protocol_errors_{0};
};

}  // namespace uvd::storage::nbd::detail
