// SPDX-License-Identifier: Apache-2.0
#pragma once
// A raw-socket NBD client for tests: it speaks the protocol byte by byte so a
// test can send exactly the malformed or hostile input it wants and read
// exactly what the server answers.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "storage/nbd/protocol.hpp"

namespace uvd::test::nbd {

namespace proto = uvd::storage::nbd;

struct option_reply {
  uint32_t option = 0;
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct export_info {
  uint64_t size = 0;
  uint16_t tflags = 0;
  uint32_t min_block = 0, preferred_block = 0, max_block = 0;
  std::string name, description;
};

struct simple_reply {
  uint32_t error = 0;
  uint64_t handle = 0;
};

class raw_client {
 public:
  raw_client() = default;
  explicit raw_client(int fd) : fd_(fd) {}
  ~raw_client();
  raw_client(raw_client&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  raw_client& operator=(raw_client&& o) noexcept;

  static raw_client connect_unix(const std::string& path);
  static raw_client connect_tcp(const std::string& host, uint16_t port);
  bool connected() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  void close();
  void shutdown_write();

  // Raw bytes. send_raw fails (returns false) if the peer is gone.
  bool send_raw(const void* data, size_t len);
  bool send_raw(const std::vector<uint8_t>& d) { return send_raw(d.data(), d.size()); }
  // Exactly len bytes within timeout_ms; nullopt on EOF, error or timeout.
  std::optional<std::vector<uint8_t>> recv_exact(size_t len, int timeout_ms = 10000);
  bool recv_into(void* buf, size_t len, int timeout_ms = 10000);
  // True if the server closes the connection within timeout_ms (any data before is discarded).
  bool wait_closed(int timeout_ms = 10000);

  // Handshake.
  bool read_greeting();  // NBDMAGIC IHAVEOPT flags; checks fixed newstyle
  bool send_client_flags(uint32_t flags = proto::NBD_FLAG_C_FIXED_NEWSTYLE);
  bool start();          // greeting + client flags
  bool send_option(uint32_t option, const std::vector<uint8_t>& data = {});
  std::optional<option_reply> read_option_reply(int timeout_ms = 10000);
  static std::vector<uint8_t> info_request(const std::string& name, const std::vector<uint16_t>& infos);
  // NBD_OPT_GO (or INFO); fills info from the NBD_REP_INFO replies. Returns the final reply type.
  std::optional<uint32_t> go(const std::string& name, export_info* info,
                             const std::vector<uint16_t>& infos = {proto::NBD_INFO_BLOCK_SIZE},
                             uint32_t option = proto::NBD_OPT_GO);
  // start() + go(); false unless the server ACKed.
  bool connect_export(const std::string& name, export_info* info = nullptr);

  // Transmission.
  bool send_request(uint16_t type, uint64_t handle, uint64_t offset, uint32_t length, uint16_t flags = 0,
                    const void* payload = nullptr);
  std::optional<simple_reply> read_reply(int timeout_ms = 10000);
  // One request, one reply (with read data into buf for READ when error == 0).
  std::optional<uint32_t> call(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0,
                               const void* payload = nullptr, void* read_buf = nullptr);
  std::optional<uint32_t> pwrite(const void* data, uint32_t len, uint64_t offset, uint16_t flags = 0) {
    return call(proto::NBD_CMD_WRITE, offset, len, flags, data);
  }
  std::optional<uint32_t> pread(void* data, uint32_t len, uint64_t offset) {
    return call(proto::NBD_CMD_READ, offset, len, 0, nullptr, data);
  }
  std::optional<uint32_t> flush() { return call(proto::NBD_CMD_FLUSH, 0, 0); }
  bool disconnect() { return send_request(proto::NBD_CMD_DISC, 0, 0, 0); }

 private:
  int fd_ = -1;
  uint64_t next_handle_ = 1;
};

}  // namespace uvd::test::nbd
