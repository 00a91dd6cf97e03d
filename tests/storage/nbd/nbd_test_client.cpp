// SPDX-License-Identifier: Apache-2.0
#include "tests/storage/nbd/nbd_test_client.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace uvd::test::nbd {

using namespace uvd::storage::nbd;

raw_client::~raw_client() { close(); }

raw_client& raw_client::operator=(raw_client&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void raw_client::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void raw_client::shutdown_write() { ::shutdown(fd_, SHUT_WR); }

raw_client raw_client::connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    fd = -1;
  }
  return raw_client(fd);
}

raw_client raw_client::connect_tcp(const std::string& host, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  ::inet_pton(AF_INET, host.c_str(), &sa.sin_addr);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    fd = -1;
  }
  if (fd >= 0) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return raw_client(fd);
}

bool raw_client::send_raw(const void* data, size_t len) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (len > 0) {
    ssize_t n = ::send(fd_, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

bool raw_client::recv_into(void* buf, size_t len, int timeout_ms) {
  auto* p = static_cast<uint8_t*>(buf);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (len > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd pf{fd_, POLLIN, 0};
    int r = ::poll(&pf, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    ssize_t n = ::recv(fd_, p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

std::optional<std::vector<uint8_t>> raw_client::recv_exact(size_t len, int timeout_ms) {
  std::vector<uint8_t> v(len);
  if (!recv_into(v.data(), len, timeout_ms)) return std::nullopt;
  return v;
}

bool raw_client::wait_closed(int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  uint8_t buf[65536];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd pf{fd_, POLLIN, 0};
    int r = ::poll(&pf, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n == 0) return true;
    if (n < 0 && errno != EINTR && errno != EAGAIN) return true;  // ECONNRESET and friends
  }
}

bool raw_client::read_greeting() {
  auto g = recv_exact(NBD_GREETING_SIZE);
  if (!g) return false;
  return load_be64(g->data()) == NBD_MAGIC && load_be64(g->data() + 8) == NBD_OPTS_MAGIC &&
         (load_be16(g->data() + 16) & NBD_FLAG_FIXED_NEWSTYLE);
}

bool raw_client::send_client_flags(uint32_t flags) {
  uint8_t b[4];
  store_be32(b, flags);
  return send_raw(b, 4);
}

bool raw_client::start() { return read_greeting() && send_client_flags(); }

bool raw_client::send_option(uint32_t option, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> b(NBD_OPTION_HEADER_SIZE + data.size());
  store_be64(b.data(), NBD_OPTS_MAGIC);
  store_be32(b.data() + 8, option);
  store_be32(b.data() + 12, static_cast<uint32_t>(data.size()));
  if (!data.empty()) std::memcpy(b.data() + NBD_OPTION_HEADER_SIZE, data.data(), data.size());
  return send_raw(b);
}

std::optional<option_reply> raw_client::read_option_reply(int timeout_ms) {
  auto h = recv_exact(NBD_OPTION_REPLY_HEADER_SIZE, timeout_ms);
  if (!h || load_be64(h->data()) != NBD_REP_MAGIC) return std::nullopt;
  option_reply r;
  r.option = load_be32(h->data() + 8);
  r.type = load_be32(h->data() + 12);
  uint32_t len = load_be32(h->data() + 16);
  if (len > (1u << 20)) return std::nullopt;
  if (len) {
    auto d = recv_exact(len, timeout_ms);
    if (!d) return std::nullopt;
    r.data = std::move(*d);
  }
  return r;
}

std::vector<uint8_t> raw_client::info_request(const std::string& name, const std::vector<uint16_t>& infos) {
  std::vector<uint8_t> d(4 + name.size() + 2 + 2 * infos.size());
  store_be32(d.data(), static_cast<uint32_t>(name.size()));
  if (!name.empty()) std::memcpy(d.data() + 4, name.data(), name.size());
  store_be16(d.data() + 4 + name.size(), static_cast<uint16_t>(infos.size()));
  for (size_t i = 0; i < infos.size(); ++i) store_be16(d.data() + 4 + name.size() + 2 + 2 * i, infos[i]);
  return d;
}

std::optional<uint32_t> raw_client::go(const std::string& name, export_info* info, const std::vector<uint16_t>& infos,
                                       uint32_t option) {
  if (!send_option(option, info_request(name, infos))) return std::nullopt;
  for (;;) {
    auto r = read_option_reply();
    if (!r || r->option != option) return std::nullopt;
    if (r->type != NBD_REP_INFO) return r->type;
    if (r->data.size() < 2 || !info) continue;
    const uint8_t* d = r->data.data();
    switch (load_be16(d)) {
      case NBD_INFO_EXPORT:
        if (r->data.size() != 12) return std::nullopt;
        info->size = load_be64(d + 2);
        info->tflags = load_be16(d + 10);
        break;
      case NBD_INFO_NAME:
        info->name.assign(reinterpret_cast<const char*>(d + 2), r->data.size() - 2);
        break;
      case NBD_INFO_DESCRIPTION:
        info->description.assign(reinterpret_cast<const char*>(d + 2), r->data.size() - 2);
        break;
      case NBD_INFO_BLOCK_SIZE:
        if (r->data.size() != 14) return std::nullopt;
        info->min_block = load_be32(d + 2);
        info->preferred_block = load_be32(d + 6);
        info->max_block = load_be32(d + 10);
        break;
    }
  }
}

bool raw_client::connect_export(const std::string& name, export_info* info) {
  export_info local;
  if (!start()) return false;
  auto r = go(name, info ? info : &local);
  return r && *r == NBD_REP_ACK;
}

bool raw_client::send_request(uint16_t type, uint64_t handle, uint64_t offset, uint32_t length, uint16_t flags,
                              const void* payload) {
  request r;
  r.type = type;
  r.flags = flags;
  r.handle = handle;
  r.offset = offset;
  r.length = length;
  uint8_t h[NBD_REQUEST_SIZE];
  encode_request(r, h);
  if (!send_raw(h, sizeof h)) return false;
  return !payload || send_raw(payload, length);
}

std::optional<simple_reply> raw_client::read_reply(int timeout_ms) {
  auto h = recv_exact(NBD_SIMPLE_REPLY_SIZE, timeout_ms);
  if (!h || load_be32(h->data()) != NBD_SIMPLE_REPLY_MAGIC) return std::nullopt;
  return simple_reply{load_be32(h->data() + 4), load_be64(h->data() + 8)};
}

std::optional<uint32_t> raw_client::call(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags,
                                         const void* payload, void* read_buf) {
  uint64_t handle = next_handle_++;
  if (!send_request(type, handle, offset, length, flags, type == NBD_CMD_WRITE ? payload : nullptr))
    return std::nullopt;
  auto r = read_reply();
  if (!r || r->handle != handle) return std::nullopt;
  if (type == NBD_CMD_READ && r->error == 0) {
    if (read_buf) {
      if (!recv_into(read_buf, length)) return std::nullopt;
    } else if (!recv_exact(length)) {
      return std::nullopt;
    }
  }
  return r->error;
}

}  // namespace uvd::test::nbd
