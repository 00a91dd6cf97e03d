// SPDX-License-Identifier: Apache-2.0
// The NBD server against a raw-socket client over the memory transport, in
// both completion modes (inside submit, and from a worker thread).
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "core/registry.hpp"
#include "storage/nbd/nbd.hpp"
#include "tests/storage/nbd/nbd_test_client.hpp"
#include "tests/testutil.hpp"
#include "transports/memory/memory.hpp"

namespace uvd::storage::nbd {
namespace {

using test::nbd::export_info;
using test::nbd::raw_client;

constexpr uint64_t kDiskSize = 64ull << 20;

std::vector<std::byte> pattern(size_t len, uint64_t seed, uint64_t offset) {
  std::vector<std::byte> b(len);
  test::fill_pattern(b, seed, offset);
  return b;
}

class NbdServer : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { ASSERT_TRUE(reg_.add_vstore(memory::memory_vstore_ops)); }

  std::shared_ptr<Vstore> open_disk(std::string uri) {
    if (std::string(GetParam()) == "async") uri += (uri.find('?') == std::string::npos ? "?" : "&") + std::string("async=1");
    auto v = Vstore::open(reg_, uri);
    EXPECT_TRUE(v) << (v ? "" : v.err().what());
    return v ? std::shared_ptr<Vstore>(std::move(*v)) : nullptr;
  }

  // One export "a" (plus any in extra), on a unix socket in a temp folder.
  void serve(server_options opts = {}, bool read_only = false) {
    if (opts.exports.empty()) {
      disk_ = open_disk("memory:64M");
      ASSERT_TRUE(disk_);
      opts.exports.push_back({"a", "the first disk", disk_, read_only});
    } else {
      disk_ = opts.exports[0].disk;
    }
    sock_ = dir_.file("nbd.sock");
    opts.unix_paths = {sock_};
    auto s = server::create(std::move(opts));
    ASSERT_TRUE(s) << s.err().what();
    srv_ = std::move(*s);
    ASSERT_TRUE(srv_->start());
  }

  raw_client connect() { return raw_client::connect_unix(sock_); }

  raw_client open_export(const std::string& name = "a", export_info* info = nullptr) {
    raw_client c = connect();
    EXPECT_TRUE(c.connected());
    EXPECT_TRUE(c.connect_export(name, info));
    return c;
  }

  // A fresh client can still do real work: the server is healthy.
  void expect_healthy(uint64_t offset = 1ull << 20) {
    raw_client c = open_export();
    auto w = pattern(65536, 77, offset);
    ASSERT_EQ(c.pwrite(w.data(), 65536, offset), 0u);
    std::vector<std::byte> r(65536);
    ASSERT_EQ(c.pread(r.data(), 65536, offset), 0u);
    EXPECT_EQ(test::find_pattern_mismatch(r, 77, offset), -1);
    c.disconnect();
  }

  bool wait_no_connections(int ms = 10000) {
    for (int i = 0; i < ms / 10; ++i) {
      if (srv_->active_connections() == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  core::registry reg_;
  test::temp_dir dir_;
  std::string sock_;
  std::shared_ptr<Vstore> disk_;
  std::unique_ptr<server> srv_;
};

TEST_P(NbdServer, ReadsBackWhatWasWritten) {
  serve();
  raw_client c = open_export();
  auto w = pattern(1 << 20, 1, 4096);
  EXPECT_EQ(c.pwrite(w.data(), 1 << 20, 4096), 0u);
  std::vector<std::byte> r(1 << 20);
  EXPECT_EQ(c.pread(r.data(), 1 << 20, 4096), 0u);
  EXPECT_EQ(test::find_pattern_mismatch(r, 1, 4096), -1);
  // The data really reached the Vstore.
  std::vector<std::byte> direct(1 << 20);
  ASSERT_TRUE(disk_->read(4096, direct.data(), direct.size()));
  EXPECT_EQ(test::find_pattern_mismatch(direct, 1, 4096), -1);
}

TEST_P(NbdServer, ExportInfoDescribesTheVstore) {
  server_options o;
  auto d = open_disk("memory:16M?block_size=4096");
  o.exports.push_back({"a", "described", d, false});
  serve(std::move(o));
  export_info info;
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  auto r = c.go("a", &info, {NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE});
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, NBD_REP_ACK);
  EXPECT_EQ(info.size, 16ull << 20);
  EXPECT_EQ(info.name, "a");
  EXPECT_EQ(info.description, "described");
  EXPECT_EQ(info.min_block, 4096u);
  EXPECT_GE(info.preferred_block, 4096u);
  EXPECT_EQ(info.max_block, 32u << 20);
  const uint16_t want = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                        NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN;
  EXPECT_EQ(info.tflags, want);
  // Unaligned to the 4 KiB block: EINVAL.
  std::vector<std::byte> b(8192);
  EXPECT_EQ(c.pread(b.data(), 512, 0), NBD_EINVAL);
  EXPECT_EQ(c.pread(b.data(), 4096, 512), NBD_EINVAL);
  EXPECT_EQ(c.pread(b.data(), 4096, 4096), 0u);
}

TEST_P(NbdServer, TcpListenerServesToo) {
  disk_ = open_disk("memory:64M");
  server_options o;
  o.exports.push_back({"", "", disk_, false});
  o.tcp = {"127.0.0.1:0"};
  auto s = server::create(std::move(o));
  ASSERT_TRUE(s) << s.err().what();
  srv_ = std::move(*s);
  ASSERT_TRUE(srv_->start());
  uint16_t port = srv_->tcp_port();
  ASSERT_NE(port, 0);
  EXPECT_EQ(srv_->uris().at(0), "nbd://127.0.0.1:" + std::to_string(port));
  EXPECT_EQ(srv_->uris("a b/c").at(0), "nbd://127.0.0.1:" + std::to_string(port) + "/a%20b%2Fc");
  raw_client c = raw_client::connect_tcp("127.0.0.1", port);
  ASSERT_TRUE(c.connect_export(""));
  auto w = pattern(8192, 3, 0);
  EXPECT_EQ(c.pwrite(w.data(), 8192, 0), 0u);
  std::vector<std::byte> r(8192);
  EXPECT_EQ(c.pread(r.data(), 8192, 0), 0u);
  EXPECT_EQ(test::find_pattern_mismatch(r, 3, 0), -1);
}

TEST_P(NbdServer, BadRequestMagicDisconnectsAndOthersCarryOn) {
  serve();
  raw_client other = open_export();
  raw_client c = open_export();
  uint8_t junk[NBD_REQUEST_SIZE];
  std::memset(junk, 0x41, sizeof junk);
  ASSERT_TRUE(c.send_raw(junk, sizeof junk));
  EXPECT_TRUE(c.wait_closed());
  auto w = pattern(4096, 5, 0);
  EXPECT_EQ(other.pwrite(w.data(), 4096, 0), 0u);
  expect_healthy();
}

TEST_P(NbdServer, BadOptionMagicDisconnects) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  uint8_t junk[16] = {'N', 'O', 'T', 'M', 'A', 'G', 'I', 'C', 0, 0, 0, 7, 0, 0, 0, 0};
  ASSERT_TRUE(c.send_raw(junk, sizeof junk));
  EXPECT_TRUE(c.wait_closed());
  expect_healthy();
}

TEST_P(NbdServer, GarbageInsteadOfClientFlagsDisconnects) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(0xffffffff));
  EXPECT_TRUE(c.wait_closed());
  expect_healthy();
}

TEST_P(NbdServer, UnknownOptionIsUnsupportedThenGoWorks) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(4242, {1, 2, 3}));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, NBD_REP_ERR_UNSUP);
  EXPECT_EQ(r->option, 4242u);
  export_info info;
  auto g = c.go("a", &info);
  ASSERT_TRUE(g);
  EXPECT_EQ(*g, NBD_REP_ACK);
  EXPECT_EQ(info.size, kDiskSize);
}

TEST_P(NbdServer, OversizeOptionIsTooBigOrDisconnects) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(NBD_OPT_GO, std::vector<uint8_t>(100000, 1)));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, NBD_REP_ERR_TOO_BIG);
  // A length no server should read: the connection is dropped.
  uint8_t h[16];
  store_be64(h, NBD_OPTS_MAGIC);
  store_be32(h + 8, NBD_OPT_GO);
  store_be32(h + 12, 0xffffff00u);
  ASSERT_TRUE(c.send_raw(h, sizeof h));
  EXPECT_TRUE(c.wait_closed());
}

TEST_P(NbdServer, UnknownExportIsErrUnknownOrDisconnect) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  export_info info;
  auto r = c.go("missing", &info);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, NBD_REP_ERR_UNKNOWN);
  // NBD_OPT_EXPORT_NAME has no error reply: the server must end the session.
  std::string name = "missing";
  ASSERT_TRUE(c.send_option(NBD_OPT_EXPORT_NAME, std::vector<uint8_t>(name.begin(), name.end())));
  EXPECT_TRUE(c.wait_closed());
}

TEST_P(NbdServer, ExportNameEntersTransmission) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(NBD_OPT_EXPORT_NAME, {'a'}));
  auto r = c.recv_exact(NBD_EXPORT_NAME_REPLY_SIZE);
  ASSERT_TRUE(r);
  EXPECT_EQ(load_be64(r->data()), kDiskSize);
  std::vector<std::byte> b(4096);
  EXPECT_EQ(c.pread(b.data(), 4096, 0), 0u);
}

TEST_P(NbdServer, AbortIsAcknowledged) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(NBD_OPT_ABORT));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, NBD_REP_ACK);
  EXPECT_TRUE(c.wait_closed());
}

TEST_P(NbdServer, OversizeReadIsEinvalAndTheConnectionStaysInStep) {
  serve();
  raw_client c = open_export();
  EXPECT_EQ(c.call(NBD_CMD_READ, 0, 33u << 20), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_READ, 0, 0xfffffe00u), NBD_EINVAL);
  std::vector<std::byte> b(4096);
  EXPECT_EQ(c.pread(b.data(), 4096, 0), 0u);
}

TEST_P(NbdServer, OversizeWritePayloadIsConsumedAndRefused) {
  serve();
  raw_client c = open_export();
  const uint32_t len = (32u << 20) + 4096;
  std::vector<std::byte> big(len, std::byte{0x5a});
  EXPECT_EQ(c.pwrite(big.data(), len, 0), NBD_EINVAL);
  // Nothing of it was written, and the stream is still in step.
  std::vector<std::byte> b(4096);
  EXPECT_EQ(c.pread(b.data(), 4096, 0), 0u);
  EXPECT_NE(b[0], std::byte{0x5a});
  auto w = pattern(4096, 9, 0);
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0), 0u);
}

TEST_P(NbdServer, WriteLengthTooBigToSkipDisconnects) {
  serve();
  raw_client other = open_export();
  raw_client c = open_export();
  ASSERT_TRUE(c.send_request(NBD_CMD_WRITE, 1, 0, 0xfffff000u));
  // Some payload; the server may already have hung up, so this may fail.
  (void)c.send_raw(std::vector<uint8_t>(1 << 16, 0));
  EXPECT_TRUE(c.wait_closed());
  std::vector<std::byte> b(4096);
  EXPECT_EQ(other.pread(b.data(), 4096, 0), 0u);
}

TEST_P(NbdServer, OutOfRangeRequestsGetTheProtocolsErrors) {
  serve();
  raw_client c = open_export();
  std::vector<std::byte> b(8192);
  EXPECT_EQ(c.pread(b.data(), 4096, kDiskSize), NBD_EINVAL);
  EXPECT_EQ(c.pread(b.data(), 8192, kDiskSize - 4096), NBD_EINVAL);
  EXPECT_EQ(c.pwrite(b.data(), 4096, kDiskSize), NBD_ENOSPC);
  EXPECT_EQ(c.pwrite(b.data(), 8192, kDiskSize - 4096), NBD_ENOSPC);
  EXPECT_EQ(c.call(NBD_CMD_WRITE_ZEROES, kDiskSize - 4096, 8192), NBD_ENOSPC);
  EXPECT_EQ(c.call(NBD_CMD_TRIM, kDiskSize - 4096, 8192), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_READ, UINT64_MAX - 4095, 8192), NBD_EINVAL);
  EXPECT_EQ(c.pwrite(b.data(), 8192, UINT64_MAX - 4095), NBD_ENOSPC);
  EXPECT_EQ(c.pread(b.data(), 4096, kDiskSize - 4096), 0u);
}

TEST_P(NbdServer, UnknownCommandsAndFlagsAreEinval) {
  serve();
  raw_client c = open_export();
  EXPECT_EQ(c.call(NBD_CMD_CACHE, 0, 4096), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_BLOCK_STATUS, 0, 4096), NBD_EINVAL);
  EXPECT_EQ(c.call(0x7777, 0, 4096), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_READ, 0, 4096, NBD_CMD_FLAG_DF), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_READ, 0, 4096, 0x8000), NBD_EINVAL);
  std::vector<std::byte> w(4096);
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0, NBD_CMD_FLAG_NO_HOLE), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_FLUSH, 4096, 0), NBD_EINVAL);
  EXPECT_EQ(c.call(NBD_CMD_READ, 0, 0), NBD_EINVAL);
  EXPECT_EQ(c.pread(w.data(), 4096, 0), 0u);
}

TEST_P(NbdServer, ReadOnlyExportRefusesWritesWithEperm) {
  serve({}, /*read_only=*/true);
  auto before = pattern(4096, 11, 0);
  ASSERT_TRUE(disk_->write(0, before.data(), 4096));
  export_info info;
  raw_client c = open_export("a", &info);
  EXPECT_TRUE(info.tflags & NBD_FLAG_READ_ONLY);
  EXPECT_FALSE(info.tflags & NBD_FLAG_SEND_WRITE_ZEROES);
  std::vector<std::byte> w(4096, std::byte{1});
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0), NBD_EPERM);
  EXPECT_EQ(c.call(NBD_CMD_TRIM, 0, 4096), NBD_EPERM);
  EXPECT_EQ(c.call(NBD_CMD_WRITE_ZEROES, 0, 4096), NBD_EPERM);
  std::vector<std::byte> r(4096);
  EXPECT_EQ(c.pread(r.data(), 4096, 0), 0u);
  EXPECT_EQ(test::find_pattern_mismatch(r, 11, 0), -1);
  EXPECT_EQ(c.flush(), 0u);
}

TEST_P(NbdServer, ReadOnlyVstoreIsAReadOnlyExport) {
  server_options o;
  o.exports.push_back({"a", "", open_disk("memory:8M?ro=1"), false});
  serve(std::move(o));
  export_info info;
  raw_client c = open_export("a", &info);
  EXPECT_TRUE(info.tflags & NBD_FLAG_READ_ONLY);
  std::vector<std::byte> w(4096);
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0), NBD_EPERM);
}

TEST_P(NbdServer, MediaErrorIsEio) {
  server_options o;
  o.exports.push_back({"a", "", open_disk("memory:8M?fail_offset=1048576"), false});
  serve(std::move(o));
  raw_client c = open_export();
  std::vector<std::byte> b(65536);
  EXPECT_EQ(c.pread(b.data(), 65536, (1 << 20) - 4096), NBD_EIO);
  EXPECT_EQ(c.pwrite(b.data(), 65536, (1 << 20) - 4096), NBD_EIO);
  EXPECT_EQ(c.pread(b.data(), 65536, 0), 0u);
}

TEST_P(NbdServer, TruncatedPacketsAndVanishingClientsLeaveTheServerHealthy) {
  serve();
  auto old = pattern(65536, 21, 0);
  ASSERT_TRUE(disk_->write(0, old.data(), old.size()));
  {  // half a greeting reply
    raw_client c = connect();
    ASSERT_TRUE(c.read_greeting());
    ASSERT_TRUE(c.send_raw("\0\0", 2));
  }
  {  // half an option
    raw_client c = connect();
    ASSERT_TRUE(c.start());
    ASSERT_TRUE(c.send_raw("IHAVEOPT\0\0", 10));
  }
  {  // half a request header
    raw_client c = open_export();
    uint8_t h[NBD_REQUEST_SIZE];
    request r;
    r.type = NBD_CMD_READ;
    r.length = 4096;
    encode_request(r, h);
    ASSERT_TRUE(c.send_raw(h, 13));
  }
  {  // a write header and half its payload
    raw_client c = open_export();
    ASSERT_TRUE(c.send_request(NBD_CMD_WRITE, 1, 0, 65536));
    ASSERT_TRUE(c.send_raw(std::vector<uint8_t>(30000, 0xee)));
  }
  EXPECT_TRUE(wait_no_connections());
  // The half-received write was never executed.
  std::vector<std::byte> now(65536);
  ASSERT_TRUE(disk_->read(0, now.data(), now.size()));
  EXPECT_EQ(test::find_pattern_mismatch(now, 21, 0), -1);
  expect_healthy();
}

TEST_P(NbdServer, ClientVanishingWithRequestsInFlightDoesNotDisturbOthers) {
  serve();
  std::atomic<bool> done{false};
  std::atomic<int> ok_rounds{0};
  std::thread worker([&] {
    raw_client c = open_export();
    for (uint64_t i = 0; !done.load(); ++i) {
      uint64_t off = (32ull << 20) + (i % 64) * 65536;
      auto w = pattern(65536, 1000 + i, off);
      if (c.pwrite(w.data(), 65536, off) != 0u) break;
      std::vector<std::byte> r(65536);
      if (c.pread(r.data(), 65536, off) != 0u || test::find_pattern_mismatch(r, 1000 + i, off) != -1) break;
      ++ok_rounds;
    }
    c.disconnect();
  });
  for (int round = 0; round < 8; ++round) {
    raw_client c = open_export();
    auto w = pattern(256 * 1024, 5, 0);
    for (uint64_t i = 0; i < 32; ++i) {  // pipelined, never read
      if (!c.send_request(i % 2 ? NBD_CMD_WRITE : NBD_CMD_READ, i, i * 256 * 1024, 256 * 1024, 0,
                          i % 2 ? w.data() : nullptr))
        break;
    }
    c.close();  // gone, with its requests in flight and replies unsent
  }
  int before = ok_rounds.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  done = true;
  worker.join();
  EXPECT_GT(ok_rounds.load(), before) << "the other client stopped making progress";
  EXPECT_TRUE(wait_no_connections());
  expect_healthy();
}

TEST_P(NbdServer, ClientThatStopsReadingStallsOnlyItself) {
  serve();
  raw_client hog = open_export();
  // 64 reads of 1 MiB: far more than the socket buffers hold.
  for (uint64_t i = 0; i < 64; ++i) ASSERT_TRUE(hog.send_request(NBD_CMD_READ, i, 0, 1 << 20));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto t0 = std::chrono::steady_clock::now();
  expect_healthy();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  // And the hog still gets every reply, in full, once it reads.
  std::vector<std::byte> buf(1 << 20);
  std::set<uint64_t> seen;
  for (int i = 0; i < 64; ++i) {
    auto r = hog.read_reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->error, 0u);
    EXPECT_TRUE(seen.insert(r->handle).second);
    ASSERT_TRUE(hog.recv_into(buf.data(), buf.size()));
  }
}

TEST_P(NbdServer, ClientThatShutsItsReadSideIsDropped) {
  serve();
  for (int round = 0; round < 4; ++round) {
    raw_client c = open_export();
    for (uint64_t i = 0; i < 48; ++i) ASSERT_TRUE(c.send_request(NBD_CMD_READ, i, i * 65536, 65536));
    ::shutdown(c.fd(), SHUT_RD);  // replies now fail to send, with requests still in flight
    EXPECT_TRUE(wait_no_connections()) << "round " << round;
  }
  expect_healthy();
}

// Each connection pipelines writes to its own region from one thread and
// matches replies by handle on another; then reads back and compares checksums.
TEST_P(NbdServer, ManyConnectionsWithPipelinedRequests) {
  serve();
  constexpr int kConns = 12;
  constexpr int kReqs = 96;
  constexpr uint32_t kLen = 16384;
  std::vector<std::thread> ts;
  std::atomic<int> failures{0};
  for (int ci = 0; ci < kConns; ++ci) {
    ts.emplace_back([&, ci] {
      raw_client c = open_export();
      const uint64_t base = static_cast<uint64_t>(ci) * kReqs * kLen;
      std::map<uint64_t, uint64_t> expected;  // handle -> offset
      std::thread sender([&] {
        for (int i = 0; i < kReqs; ++i) {
          uint64_t off = base + static_cast<uint64_t>(i) * kLen;
          auto w = pattern(kLen, 7 + ci, off);
          uint16_t flags = i % 16 == 0 ? NBD_CMD_FLAG_FUA : 0;
          if (!c.send_request(NBD_CMD_WRITE, 1000 + i, off, kLen, flags, w.data())) return;
        }
      });
      std::set<uint64_t> got;
      for (int i = 0; i < kReqs; ++i) {
        auto r = c.read_reply();
        if (!r || r->error != 0 || r->handle < 1000 || r->handle >= 1000 + kReqs || !got.insert(r->handle).second) {
          ++failures;
          break;
        }
      }
      sender.join();
      // Pipelined reads, replies matched by handle, data checked against the pattern.
      std::thread reader_sender([&] {
        for (int i = 0; i < kReqs; ++i)
          c.send_request(NBD_CMD_READ, 5000 + i, base + static_cast<uint64_t>(i) * kLen, kLen);
      });
      std::vector<std::byte> buf(kLen);
      for (int i = 0; i < kReqs; ++i) {
        auto r = c.read_reply();
        if (!r || r->error != 0 || !c.recv_into(buf.data(), kLen)) {
          ++failures;
          break;
        }
        uint64_t off = base + (r->handle - 5000) * kLen;
        auto want = pattern(kLen, 7 + ci, off);
        if (test::fnv1a(buf) != test::fnv1a(want)) ++failures;
      }
      reader_sender.join();
      c.flush();
      c.disconnect();
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  // Everything is in the Vstore too.
  for (int ci = 0; ci < kConns; ++ci) {
    std::vector<std::byte> all(kReqs * kLen);
    uint64_t base = static_cast<uint64_t>(ci) * kReqs * kLen;
    ASSERT_TRUE(disk_->read(base, all.data(), all.size()));
    EXPECT_EQ(test::find_pattern_mismatch(all, 7 + ci, base), -1) << "connection " << ci;
  }
}

TEST_P(NbdServer, FlushAndFuaReachTheVstore) {
  serve();
  raw_client c = open_export();
  uint64_t flushes = disk_->stats().flushes;
  std::vector<std::byte> w(4096, std::byte{3});
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0, NBD_CMD_FLAG_FUA), 0u);
  EXPECT_EQ(c.flush(), 0u);
  EXPECT_GT(disk_->stats().flushes, flushes);
  EXPECT_EQ(c.call(NBD_CMD_TRIM, 0, 4096, NBD_CMD_FLAG_FUA), 0u);
  EXPECT_EQ(c.call(NBD_CMD_WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE), 0u);
}

TEST_P(NbdServer, DiscFinishesFlushesAndCloses) {
  serve();
  raw_client c = open_export();
  auto w = pattern(65536, 31, 0);
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(c.send_request(NBD_CMD_WRITE, i, i * 65536ull, 65536, 0, w.data()));
  uint64_t flushes = disk_->stats().flushes;
  ASSERT_TRUE(c.disconnect());
  // Every outstanding request is answered before the server closes.
  for (int i = 0; i < 8; ++i) {
    auto r = c.read_reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->error, 0u);
  }
  EXPECT_TRUE(c.wait_closed());
  EXPECT_TRUE(wait_no_connections());
  EXPECT_GT(disk_->stats().flushes, flushes);
}

TEST_P(NbdServer, TrimAndWriteZeroesReadBackAsZeros) {
  serve();
  raw_client c = open_export();
  auto w = pattern(1 << 20, 41, 0);
  ASSERT_EQ(c.pwrite(w.data(), 1 << 20, 0), 0u);
  EXPECT_EQ(c.call(NBD_CMD_WRITE_ZEROES, 0, 65536), 0u);
  EXPECT_EQ(c.call(NBD_CMD_TRIM, 65536, 65536), 0u);
  std::vector<std::byte> r(1 << 20);
  ASSERT_EQ(c.pread(r.data(), 1 << 20, 0), 0u);
  for (size_t i = 0; i < 131072; ++i) ASSERT_EQ(r[i], std::byte{0}) << i;
  EXPECT_EQ(test::find_pattern_mismatch(std::span(r).subspan(131072), 41, 131072), -1);
}

TEST_P(NbdServer, SeveralNamedExports) {
  server_options o;
  auto a = open_disk("memory:8M");
  auto b = open_disk("memory:16M");
  o.exports.push_back({"a", "disk a", a, false});
  o.exports.push_back({"b", "disk b", b, false});
  serve(std::move(o));
  raw_client l = connect();
  ASSERT_TRUE(l.start());
  ASSERT_TRUE(l.send_option(NBD_OPT_LIST));
  std::vector<std::string> names;
  for (;;) {
    auto r = l.read_option_reply();
    ASSERT_TRUE(r);
    if (r->type == NBD_REP_ACK) break;
    ASSERT_EQ(r->type, NBD_REP_SERVER);
    uint32_t n = load_be32(r->data.data());
    names.emplace_back(r->data.begin() + 4, r->data.begin() + 4 + n);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"a", "b"}));
  l.close();

  export_info ia, ib, idef;
  raw_client ca = open_export("a", &ia);
  raw_client cb = open_export("b", &ib);
  raw_client cd = open_export("", &idef);
  EXPECT_EQ(ia.size, 8ull << 20);
  EXPECT_EQ(ib.size, 16ull << 20);
  EXPECT_EQ(idef.size, 8ull << 20);  // the first export is the default
  auto wa = pattern(4096, 51, 0), wb = pattern(4096, 52, 0);
  EXPECT_EQ(ca.pwrite(wa.data(), 4096, 0), 0u);
  EXPECT_EQ(cb.pwrite(wb.data(), 4096, 0), 0u);
  std::vector<std::byte> r(4096);
  EXPECT_EQ(cd.pread(r.data(), 4096, 0), 0u);
  EXPECT_EQ(test::find_pattern_mismatch(r, 51, 0), -1);
  EXPECT_EQ(cb.pread(r.data(), 4096, 0), 0u);
  EXPECT_EQ(test::find_pattern_mismatch(r, 52, 0), -1);
  ca.disconnect();
  cb.disconnect();
  cd.disconnect();
  EXPECT_TRUE(wait_no_connections());
  auto st = srv_->stats();
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[0].connections, 2u);
  EXPECT_EQ(st[1].connections, 1u);
  EXPECT_EQ(st[0].io.writes, 1u);
  EXPECT_EQ(st[0].io.reads, 1u);
}

TEST_P(NbdServer, StopAnswersWhatIsInFlightAndKeepsAcknowledgedWrites) {
  serve();
  raw_client c = open_export();
  constexpr int kN = 48;
  std::thread sender([&] {
    for (int i = 0; i < kN; ++i) {
      auto w = pattern(65536, 61, i * 65536ull);
      if (!c.send_request(NBD_CMD_WRITE, i, i * 65536ull, 65536, 0, w.data())) return;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::thread stopper([&] { srv_->stop(); });
  std::vector<uint64_t> acked;
  for (;;) {
    auto r = c.read_reply(5000);
    if (!r) break;  // closed
    if (r->error == 0) acked.push_back(r->handle);
  }
  stopper.join();
  sender.join();
  for (uint64_t h : acked) {
    std::vector<std::byte> b(65536);
    ASSERT_TRUE(disk_->read(h * 65536, b.data(), b.size()));
    EXPECT_EQ(test::find_pattern_mismatch(b, 61, h * 65536), -1) << "acknowledged write " << h << " lost";
  }
  // The listener is gone.
  struct stat st{};
  EXPECT_NE(::stat(sock_.c_str(), &st), 0);
}

TEST_P(NbdServer, StopDuringTheHandshakeRefusesFurtherOptions) {
  serve();
  raw_client c = connect();
  ASSERT_TRUE(c.start());
  std::thread stopper([&] { srv_->stop(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (c.send_option(NBD_OPT_LIST)) {
    // Within the grace the server still answers, but only to say it is going.
    if (auto r = c.read_option_reply(2000)) {
      EXPECT_EQ(r->type, NBD_REP_ERR_SHUTDOWN);
    }
  }
  EXPECT_TRUE(c.wait_closed(5000));
  stopper.join();
}

TEST_P(NbdServer, HandshakeMustFinishInTime) {
  server_options o;
  o.handshake_timeout_ms = 300;
  serve(std::move(o));
  raw_client c = connect();
  ASSERT_TRUE(c.read_greeting());
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(c.wait_closed(5000));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
}

TEST_P(NbdServer, ConnectionsBeyondTheLimitAreClosed) {
  server_options o;
  o.max_connections = 2;
  serve(std::move(o));
  raw_client a = open_export();
  raw_client b = open_export();
  raw_client c = connect();
  EXPECT_TRUE(c.wait_closed());
  a.disconnect();
  a.close();
  EXPECT_TRUE(b.flush() == 0u);
}

TEST_P(NbdServer, ServesASocketpair) {
  disk_ = open_disk("memory:8M");
  server_options o;
  o.exports.push_back({"x", "", disk_, false});
  auto s = server::create(std::move(o));
  ASSERT_TRUE(s);
  srv_ = std::move(*s);
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ASSERT_TRUE(srv_->serve_fd(sv[0]));
  raw_client c(sv[1]);
  ASSERT_TRUE(c.connect_export("x"));
  auto w = pattern(4096, 71, 0);
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0), 0u);
  c.disconnect();
  EXPECT_TRUE(c.wait_closed());
}

TEST_P(NbdServer, SmallInFlightLimitStillServesDeepPipelines) {
  server_options o;
  o.max_in_flight = 2;
  o.max_buffered = 1;  // raised to one max payload: one big request at a time
  serve(std::move(o));
  raw_client c = open_export();
  auto w = pattern(1 << 20, 81, 0);
  std::thread sender([&] {
    for (int i = 0; i < 32; ++i) c.send_request(NBD_CMD_WRITE, i, (i % 8) * (1ull << 20), 1 << 20, 0, w.data());
  });
  std::set<uint64_t> got;
  for (int i = 0; i < 32; ++i) {
    auto r = c.read_reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->error, 0u);
    got.insert(r->handle);
  }
  sender.join();
  EXPECT_EQ(got.size(), 32u);
}

INSTANTIATE_TEST_SUITE_P(Completion, NbdServer, ::testing::Values("inline", "async"),
                         [](const auto& info) { return std::string(info.param); });

TEST(NbdServerSetup, RefusesBadOptions) {
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(memory::memory_vstore_ops));
  auto d = Vstore::open(reg, "memory:1M");
  ASSERT_TRUE(d);
  std::shared_ptr<Vstore> disk(std::move(*d));
  EXPECT_FALSE(server::create({}));
  server_options o;
  o.exports = {{"a", "", disk, false}, {"a", "", disk, false}};
  auto r = server::create(o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.err().message.find("two exports"), std::string::npos);
  o.exports = {{"a", "", nullptr, false}};
  EXPECT_FALSE(server::create(o));
  o.exports = {{"a", "", disk, false}};
  o.max_in_flight = 0;
  EXPECT_FALSE(server::create(o));
  o.max_in_flight = 64;
  o.tcp = {"nonsense:port"};
  EXPECT_FALSE(server::create(o));
}

TEST(NbdServerSetup, UnixSocketInUseOrStale) {
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(memory::memory_vstore_ops));
  auto d = Vstore::open(reg, "memory:1M");
  ASSERT_TRUE(d);
  std::shared_ptr<Vstore> disk(std::move(*d));
  test::temp_dir dir;
  server_options o;
  o.exports = {{"a", "", disk, false}};
  o.unix_paths = {dir.file("s")};
  auto first = server::create(o);
  ASSERT_TRUE(first);
  auto second = server::create(o);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.err().errnum(), EADDRINUSE);
  first->reset();  // stop: the socket file is removed
  // A stale socket file (its server died) is replaced.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, dir.file("s").c_str(), sizeof sa.sun_path - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  ::close(fd);
  auto third = server::create(o);
  EXPECT_TRUE(third) << (third ? "" : third.err().what());
  // A regular file is never removed.
  std::string plain = dir.file("plain");
  ::close(::open(plain.c_str(), O_CREAT | O_WRONLY, 0600));
  o.unix_paths = {plain};
  EXPECT_FALSE(server::create(o));
}

TEST(NbdServerSetup, ParsesHostPort) {
  auto a = parse_host_port("127.0.0.1:10810");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->first, "127.0.0.1");
  EXPECT_EQ(a->second, 10810);
  auto b = parse_host_port("[::1]:99");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->first, "::1");
  EXPECT_EQ(b->second, 99);
  auto c = parse_host_port("localhost");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->second, NBD_DEFAULT_PORT);
  EXPECT_FALSE(parse_host_port(":10809"));
  EXPECT_FALSE(parse_host_port("::1:10809"));
  EXPECT_FALSE(parse_host_port("host:99999"));
  EXPECT_FALSE(parse_host_port("host:"));
  EXPECT_FALSE(parse_host_port("host:12a"));
  EXPECT_FALSE(parse_host_port("[::1"));
}

}  // namespace
}  // namespace uvd::storage::nbd
