// SPDX-License-Identifier: Apache-2.0
#pragma once
// The wire between a host-local domain and the hub (the host-local
// "hypervisor"): SOCK_SEQPACKET, one message per call, file descriptors
// (memfds, eventfds, a store socket) passed with SCM_RIGHTS. The hub treats
// every message as hostile: it checks lengths before it reads a field.
#include <sys/socket.h>
#include <sys/uio.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.hpp"

namespace uvd::xen::local {

enum op : uint32_t {
  // main connection
  OP_HELLO = 1,       // u16 domid
  OP_GRANT = 2,       // u16 peer, u8 writable, u32 count, fd memfd -> u32 refs[count]
  OP_END_GRANT = 3,   // u32 refs[]
  OP_MAP = 4,         // u16 granter, u8 writable, u32 refs[] -> u64 map_id, u32 nfd, {u32 fd_index, u32 page}[n], fds
  OP_UNMAP = 5,       // u64 map_id
  OP_EVT_ALLOC = 6,   // u16 peer -> u32 port, fds {wait, notify}
  OP_EVT_BIND = 7,    // u16 peer, u32 remote_port -> u32 port, fds {wait, notify}
  OP_EVT_CLOSE = 8,   // u32 port
  OP_STORE_OPEN = 9,  // fd: one end of a socketpair that becomes a store connection
  // store connection: u32 txn, then strings (u32 length + bytes)
  OP_S_READ = 20,
  OP_S_WRITE = 21,
  OP_S_MKDIR = 22,
  OP_S_RM = 23,
  OP_S_DIRECTORY = 24,
  OP_S_SET_PERMS = 25,  // path, then "<r|w|b|n><domid>" per entry, as xenstore writes them
  OP_S_TXN_START = 26,
  OP_S_TXN_END = 27,  // strings: "1" commit, "0" abort
  OP_S_WATCH = 28,
  OP_S_UNWATCH = 29,
  OP_S_WATCH_EVENT = 30,  // hub -> client, unsolicited: path, token
};

struct msg_header {
  uint32_t op;
  int32_t status;  // replies: 0 or -errno
};

inline constexpr size_t max_msg = 64 * 1024;
inline constexpr size_t max_fds = 64;

// A message body being built or parsed.
class buf {
 public:
  void put_u8(uint8_t v) { put(&v, 1); }
  void put_u16(uint16_t v) { put(&v, 2); }
  void put_u32(uint32_t v) { put(&v, 4); }
  void put_u64(uint64_t v) { put(&v, 8); }
  void put_str(std::string_view s) {
    put_u32(static_cast<uint32_t>(s.size()));
    put(s.data(), s.size());
  }
  void put(const void* p, size_t n) {
    const auto* b = static_cast<const char*>(p);
    data_.insert(data_.end(), b, b + n);
  }

  // Parsing: each get fails (returns false) instead of reading past the end.
  bool get_u8(uint8_t& v) { return get(&v, 1); }
  bool get_u16(uint16_t& v) { return get(&v, 2); }
  bool get_u32(uint32_t& v) { return get(&v, 4); }
  bool get_u64(uint64_t& v) { return get(&v, 8); }
  bool get_str(std::string& s) {
    uint32_t n;
    if (!get_u32(n) || n > data_.size() - pos_) return false;
    s.assign(data_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool get(void* p, size_t n) {
    if (n > data_.size() - pos_) return false;
    std::memcpy(p, data_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  size_t remaining() const { return data_.size() - pos_; }
  bool at_end() const { return pos_ == data_.size(); }

  std::vector<char>& raw() { return data_; }
  const std::vector<char>& raw() const { return data_; }

 private:
  std::vector<char> data_;
  size_t pos_ = 0;
};

// Send one message with optional fds. Returns 0 or -errno.
int send_msg(int sock, const msg_header& h, const buf& body, const int* fds = nullptr, size_t nfds = 0);
// Receive one message; fds received are appended to `fds` (owned by the caller).
// Returns 1 for a message, 0 for an orderly close, -errno on error (-EAGAIN
// on a non-blocking socket with nothing waiting). Truncated messages are -EMSGSIZE.
int recv_msg(int sock, msg_header& h, buf& body, std::vector<int>& fds, bool nonblock = false);

}  // namespace uvd::xen::local
