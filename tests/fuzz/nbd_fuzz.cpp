// SPDX-License-Identifier: Apache-2.0
// Fuzzes the NBD server: the handshake state machine and the request checks
// on raw bytes, and whole sessions (handshake + transmission) of the real
// server over a socketpair, against memory-backed exports. The first input
// byte picks the mode; mode 3 starts with a valid handshake so that the
// fuzzer spends its time in the transmission phase.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "storage/nbd/handshake.hpp"
#include "storage/nbd/nbd.hpp"
#include "storage/nbd/protocol.hpp"
#include "storage/vstore.hpp"
#include "transports/memory/memory.hpp"

namespace nbd = uvd::storage::nbd;

namespace {

#define FUZZ_CHECK(c)                                                \
  do {                                                               \
    if (!(c)) {                                                      \
      std::fprintf(stderr, "check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); \
      std::abort();                                                  \
    }                                                                \
  } while (0)

std::vector<nbd::export_desc> fuzz_descs() {
  nbd::export_desc a;
  a.name = "a";
  a.description = "fuzz";
  a.size = 1 << 20;
  a.tflags = nbd::make_transmission_flags(false, true, false, true);
  a.min_block = 512;
  nbd::export_desc b;
  b.name = "";
  b.size = 1 << 16;
  b.tflags = nbd::make_transmission_flags(true, false, false, false);
  b.min_block = 4096;
  return {a, b};
}

// Server output must be whole, well-formed option replies (or the final
// NBD_OPT_EXPORT_NAME answer).
void check_option_replies(const std::vector<uint8_t>& out, bool transmission) {
  size_t p = 0;
  while (p + nbd::NBD_OPTION_REPLY_HEADER_SIZE <= out.size() && nbd::load_be64(out.data() + p) == nbd::NBD_REP_MAGIC) {
    uint32_t len = nbd::load_be32(out.data() + p + 16);
    FUZZ_CHECK(len <= 64 * 1024);
    p += nbd::NBD_OPTION_REPLY_HEADER_SIZE + len;
    FUZZ_CHECK(p <= out.size());
  }
  if (p != out.size()) {  // only an EXPORT_NAME reply may follow
    FUZZ_CHECK(transmission);
    size_t rest = out.size() - p;
    FUZZ_CHECK(rest == 10 || rest == nbd::NBD_EXPORT_NAME_REPLY_SIZE);
  }
}

void fuzz_handshake(std::span<const uint8_t> data) {
  static const std::vector<nbd::export_desc> descs = fuzz_descs();
  nbd::handshake hs(descs);
  std::vector<uint8_t> out;
  // Feed in pieces whose sizes come from the data itself.
  size_t pos = 0, used_total = 0;
  size_t step = data.empty() ? 1 : (data[0] % 37) + 1;
  while (pos < data.size() && !hs.closed() && !hs.in_transmission()) {
    size_t n = std::min(step, data.size() - pos);
    size_t used = hs.feed(data.subspan(pos, n), out);
    FUZZ_CHECK(used <= n);
    if (!hs.closed() && !hs.in_transmission()) FUZZ_CHECK(used == n);
    used_total += used;
    pos += n;
  }
  FUZZ_CHECK(used_total <= data.size());
  check_option_replies(out, hs.in_transmission());
  if (hs.in_transmission()) FUZZ_CHECK(hs.export_index() < descs.size());
}

void fuzz_requests(std::span<const uint8_t> data) {
  if (data.size() < 4) return;
  nbd::export_geometry g;
  g.size = uint64_t{nbd::load_be16(data.data())} << 12;
  g.min_block = 1u << (data[2] % 13);
  g.tflags = static_cast<uint16_t>(nbd::NBD_FLAG_HAS_FLAGS | (data[3] << 1));
  data = data.subspan(4);
  for (size_t p = 0; p + nbd::NBD_REQUEST_SIZE <= data.size(); p += nbd::NBD_REQUEST_SIZE) {
    nbd::request r;
    std::span<const uint8_t, nbd::NBD_REQUEST_SIZE> rec(data.data() + p, nbd::NBD_REQUEST_SIZE);
    if (!nbd::decode_request(rec, &r)) continue;
    uint8_t again[nbd::NBD_REQUEST_SIZE];
    nbd::encode_request(r, again);
    FUZZ_CHECK(std::memcmp(again, rec.data(), sizeof again) == 0);
    auto v = nbd::check_request(r, g);
    FUZZ_CHECK(v.payload == (r.type == nbd::NBD_CMD_WRITE ? r.length : 0u));
    if (v.action == nbd::request_action::execute) {
      FUZZ_CHECK(r.type == nbd::NBD_CMD_FLUSH || (r.length > 0 && r.offset + r.length <= g.size));
      FUZZ_CHECK(r.type != nbd::NBD_CMD_READ || r.length <= g.max_payload);
      FUZZ_CHECK(!(g.tflags & nbd::NBD_FLAG_READ_ONLY) || r.type == nbd::NBD_CMD_READ || r.type == nbd::NBD_CMD_FLUSH);
    }
    if (v.action == nbd::request_action::reply_error)
      FUZZ_CHECK(v.error == nbd::NBD_EINVAL || v.error == nbd::NBD_EPERM || v.error == nbd::NBD_ENOSPC);
  }
}

struct session_server {
  std::unique_ptr<nbd::server> srv;
  session_server() {
    spdlog::set_level(spdlog::level::off);
    nbd::server_options o;
    auto open = [](const char* target, const char* options) {
      uvd::storage::open_options oo;
      oo.options = options;
      auto v = uvd::storage::Vstore::open(uvd::memory::memory_vstore_ops, target, oo);
      FUZZ_CHECK(v);
      return std::shared_ptr<uvd::storage::Vstore>(std::move(*v));
    };
    // One export completes inside submit, the other from a worker thread.
    o.exports.push_back({"a", "fuzz", open("1M", ""), false});
    o.exports.push_back({"ro", "", open("64K", "async=1&block_size=4096"), true});
    o.max_in_flight = 8;
    o.handshake_timeout_ms = 2000;
    o.drain_timeout_ms = 2000;
    auto s = nbd::server::create(std::move(o));
    FUZZ_CHECK(s);
    srv = std::move(*s);
  }
};

void fuzz_session(std::span<const uint8_t> data, bool prefix_handshake) {
  static session_server server;
  std::vector<uint8_t> in;
  if (prefix_handshake) {
    // Client flags, then NBD_OPT_GO for export "a".
    const uint8_t hs[] = {0, 0, 0, 1, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 7, 0, 0, 0, 7,
                          0, 0, 0, 1, 'a', 0, 0};
    in.assign(hs, hs + sizeof hs);
  }
  in.insert(in.end(), data.begin(), data.end());

  int sv[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  FUZZ_CHECK(server.srv->serve_fd(sv[0]));
  std::thread writer([&] {
    size_t off = 0;
    while (off < in.size()) {
      ssize_t n = ::send(sv[1], in.data() + off, in.size() - off, MSG_NOSIGNAL);
      if (n <= 0) break;  // the server hung up: fine
      off += static_cast<size_t>(n);
    }
    ::shutdown(sv[1], SHUT_WR);
  });
  // Read everything the server says until it closes; it must close, since
  // the client's input has ended.
  uint8_t buf[65536];
  for (;;) {
    pollfd p{sv[1], POLLIN, 0};
    int r = ::poll(&p, 1, 30000);
    FUZZ_CHECK(r > 0);  // a server that neither answers nor closes is a hang
    ssize_t n = ::recv(sv[1], buf, sizeof buf, 0);
    if (n <= 0) break;
  }
  writer.join();
  ::close(sv[1]);
  // The server closes the socket before its connection thread finishes (it
  // still logs and frees); wait for that, so nothing of this input is live
  // when the next begins or the leak checker looks.
  for (int i = 0; i < 30000 && server.srv->active_connections() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  FUZZ_CHECK(server.srv->active_connections() == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::span<const uint8_t> rest(data + 1, size - 1);
  switch (data[0] & 3) {
    case 0: fuzz_handshake(rest); break;
    case 1: fuzz_requests(rest); break;
    case 2: fuzz_session(rest, false); break;
    case 3: fuzz_session(rest, true); break;
  }
  return 0;
}
