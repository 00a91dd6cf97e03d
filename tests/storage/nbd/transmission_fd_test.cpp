// SPDX-License-Identifier: Apache-2.0
// server::serve_fd_transmission: a socket that starts in the transmission
// phase with no handshake, as the Linux kernel's nbd driver speaks after
// NBD_SET_SOCK (what `uvd attach` hands it).
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>

#include "core/registry.hpp"
#include "storage/nbd/nbd.hpp"
#include "tests/storage/nbd/nbd_test_client.hpp"
#include "tests/testutil.hpp"
#include "transports/memory/memory.hpp"

namespace uvd::storage::nbd {
namespace {

using test::nbd::raw_client;

class NbdTransmissionFd : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(reg_.add_vstore(memory::memory_vstore_ops)); }

  std::unique_ptr<server> make(const char* uri, bool read_only = false) {
    auto v = Vstore::open(reg_, uri);
    EXPECT_TRUE(v) << (v ? "" : v.err().what());
    if (!v) return nullptr;
    server_options o;
    o.exports.push_back({"", "", std::shared_ptr<Vstore>(std::move(*v)), read_only});
    auto s = server::create(std::move(o));
    EXPECT_TRUE(s) << (s ? "" : s.err().what());
    return s ? std::move(*s) : nullptr;
  }

  raw_client connect(server& s, size_t export_index = 0) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    auto r = s.serve_fd_transmission(sv[0], export_index);
    EXPECT_TRUE(r) << (r ? "" : r.err().what());
    return raw_client(sv[1]);
  }

  core::registry reg_;
};

TEST_F(NbdTransmissionFd, ServesRequestsWithoutAnyHandshake) {
  auto s = make("memory:8M");
  ASSERT_TRUE(s);
  raw_client c = connect(*s);
  // The very first bytes on the socket are a request; the server sends no greeting.
  std::vector<std::byte> w(65536), r(65536);
  test::fill_pattern(w, 7, 4096);
  EXPECT_EQ(c.pwrite(w.data(), 65536, 4096, NBD_CMD_FLAG_FUA), 0u);
  EXPECT_EQ(c.pread(r.data(), 65536, 4096), 0u);
  EXPECT_EQ(std::memcmp(w.data(), r.data(), w.size()), 0);
  EXPECT_EQ(c.flush(), 0u);
  // Past the end: the kernel must get the error, not a hang.
  EXPECT_EQ(c.pread(r.data(), 4096, 8 << 20), static_cast<uint32_t>(NBD_EINVAL));
  c.disconnect();
  EXPECT_TRUE(c.wait_closed());
  auto st = s->stats();
  ASSERT_EQ(st.size(), 1u);
  EXPECT_EQ(st[0].connections, 1u);
}

TEST_F(NbdTransmissionFd, FlagsMatchWhatTheServerEnforces) {
  auto rw = make("memory:8M");
  ASSERT_TRUE(rw);
  uint16_t f = rw->transmission_flags();
  EXPECT_TRUE(f & NBD_FLAG_HAS_FLAGS);
  EXPECT_TRUE(f & NBD_FLAG_SEND_FLUSH);
  EXPECT_TRUE(f & NBD_FLAG_SEND_FUA);
  EXPECT_FALSE(f & NBD_FLAG_READ_ONLY);

  auto ro = make("memory:8M", true);
  ASSERT_TRUE(ro);
  EXPECT_TRUE(ro->transmission_flags() & NBD_FLAG_READ_ONLY);
  raw_client c = connect(*ro);
  std::vector<std::byte> w(4096);
  EXPECT_EQ(c.pwrite(w.data(), 4096, 0), static_cast<uint32_t>(NBD_EPERM));
  c.disconnect();
  EXPECT_TRUE(c.wait_closed());
}

TEST_F(NbdTransmissionFd, RefusesAnExportThatDoesNotExist) {
  auto s = make("memory:8M");
  ASSERT_TRUE(s);
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  EXPECT_FALSE(s->serve_fd_transmission(sv[0], 1));
  raw_client c(sv[1]);
  EXPECT_TRUE(c.wait_closed(2000));  // the server closed its end
  EXPECT_EQ(s->transmission_flags(1), 0);
}

}  // namespace
}  // namespace uvd::storage::nbd
