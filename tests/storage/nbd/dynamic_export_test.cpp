// SPDX-License-Identifier: Apache-2.0
// Exports the NBD server opens through server_options::resolver: looked up at
// NBD_OPT_GO / INFO / EXPORT_NAME, listed by NBD_OPT_LIST, refused with the
// resolver's reason, held for exactly the life of the connection.
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include "core/registry.hpp"
#include "storage/nbd/nbd.hpp"
#include "tests/storage/nbd/nbd_test_client.hpp"
#include "transports/memory/memory.hpp"

namespace uvd::storage::nbd {
namespace {

namespace proto = uvd::storage::nbd;
using test::nbd::raw_client;

// Names "d/N" are memory disks made on first use and kept (like overlays);
// "bad/..." is refused as a policy matter; anything else is unknown.
class memory_resolver final : public export_resolver {
 public:
  explicit memory_resolver(core::registry& reg) : reg_(reg) {}
  core::result<resolved_export> resolve(std::string_view name, const client_info& who) override {
    if (name.substr(0, 4) == "bad/") return core::fail(EINVAL, "client name '" + std::string(name.substr(4)) + "' refused");
    if (name.substr(0, 2) != "d/") return core::fail(ENOENT, "no export named '" + std::string(name) + "'");
    std::lock_guard g(mu_);
    last_peer_ = who.peer;
    auto& d = disks_[std::string(name)];
    if (!d) {
      auto v = Vstore::open(reg_, "memory:4M");
      if (!v) return core::fail(std::move(v).err());
      d = std::move(*v);
    }
    resolved_export r;
    r.cfg.name = std::string(name);
    r.cfg.description = "resolved";
    r.cfg.disk = d;
    // The hold counts the connections that have this export.
    ++holders_;
    r.hold = std::shared_ptr<void>(nullptr, [this](void*) { --holders_; });
    return r;
  }
  std::vector<std::pair<std::string, std::string>> list() override {
    std::lock_guard g(mu_);
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& [n, d] : disks_) out.emplace_back(n, "resolved");
    return out;
  }
  std::atomic<int> holders_{0};
  std::string last_peer_;

 private:
  core::registry& reg_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Vstore>> disks_;
};

class NbdDynamicExports : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(reg_.add_vstore(memory::memory_vstore_ops));
    auto d = Vstore::open(reg_, "memory:1M");
    ASSERT_TRUE(d);
    resolver_ = std::make_shared<memory_resolver>(reg_);
    server_options o;
    o.exports.push_back({"fixed", "a fixed export", std::shared_ptr<Vstore>(std::move(*d)), false});
    o.resolver = resolver_;
    auto s = server::create(std::move(o));
    ASSERT_TRUE(s) << s.err().what();
    srv_ = std::move(*s);
  }
  raw_client connect() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    EXPECT_TRUE(srv_->serve_fd(sv[0]));
    return raw_client(sv[1]);
  }
  void wait_holders(int n) {
    for (int i = 0; i < 200 && resolver_->holders_.load() != n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    EXPECT_EQ(resolver_->holders_.load(), n);
  }

  core::registry reg_;
  std::shared_ptr<memory_resolver> resolver_;
  std::unique_ptr<server> srv_;
};

TEST_F(NbdDynamicExports, GoOpensAResolvedExportSharedByConnections) {
  {
    auto a = connect();
    test::nbd::export_info info;
    ASSERT_TRUE(a.connect_export("d/1", &info));
    EXPECT_EQ(info.size, 4u << 20);
    std::vector<uint8_t> w(4096, 0x3c), r(4096);
    ASSERT_EQ(a.pwrite(w.data(), 4096, 8192), 0u);
    auto b = connect();
    ASSERT_TRUE(b.connect_export("d/1"));
    ASSERT_EQ(b.pread(r.data(), 4096, 8192), 0u);
    EXPECT_EQ(r, w);
    wait_holders(2);
    a.disconnect();
    a.close();
    wait_holders(1);
  }
  wait_holders(0);
  EXPECT_EQ(resolver_->last_peer_.rfind("fd ", 0), 0u) << resolver_->last_peer_;  // what serve_fd calls its peer
}

TEST_F(NbdDynamicExports, RefusalsCarryTheResolversReason) {
  auto c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(proto::NBD_OPT_GO, raw_client::info_request("bad/../x", {})));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, proto::NBD_REP_ERR_POLICY);
  EXPECT_EQ(std::string(r->data.begin(), r->data.end()), "client name '../x' refused");
  ASSERT_TRUE(c.send_option(proto::NBD_OPT_INFO, raw_client::info_request("nope", {})));
  r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, proto::NBD_REP_ERR_UNKNOWN);
  // The connection goes on: INFO then GO on a resolved export opens it once.
  test::nbd::export_info info;
  auto t = c.go("d/2", &info, {proto::NBD_INFO_BLOCK_SIZE}, proto::NBD_OPT_INFO);
  ASSERT_TRUE(t);
  EXPECT_EQ(*t, proto::NBD_REP_ACK);
  t = c.go("d/2", &info);
  ASSERT_TRUE(t);
  EXPECT_EQ(*t, proto::NBD_REP_ACK);
  EXPECT_EQ(resolver_->holders_.load(), 1) << "INFO then GO on one name opened it twice";
}

TEST_F(NbdDynamicExports, ExportNameOptionResolvesOrCloses) {
  auto c = connect();
  ASSERT_TRUE(c.start());
  const std::string name = "d/3";
  ASSERT_TRUE(c.send_option(proto::NBD_OPT_EXPORT_NAME, std::vector<uint8_t>(name.begin(), name.end())));
  auto reply = c.recv_exact(8 + 2 + 124);
  ASSERT_TRUE(reply);
  auto bad = connect();
  ASSERT_TRUE(bad.start());
  const std::string hostile = "bad/x";
  ASSERT_TRUE(bad.send_option(proto::NBD_OPT_EXPORT_NAME, std::vector<uint8_t>(hostile.begin(), hostile.end())));
  EXPECT_TRUE(bad.wait_closed());
}

TEST_F(NbdDynamicExports, ListShowsFixedThenResolvedExports) {
  {
    auto a = connect();
    ASSERT_TRUE(a.connect_export("d/b"));
    auto b = connect();
    ASSERT_TRUE(b.connect_export("d/a"));
  }
  auto c = connect();
  ASSERT_TRUE(c.start());
  ASSERT_TRUE(c.send_option(proto::NBD_OPT_LIST));
  std::vector<std::string> names;
  for (;;) {
    auto r = c.read_option_reply();
    ASSERT_TRUE(r);
    if (r->type == proto::NBD_REP_ACK) break;
    ASSERT_EQ(r->type, proto::NBD_REP_SERVER);
    ASSERT_GE(r->data.size(), 4u);
    uint32_t len = uint32_t{r->data[0]} << 24 | uint32_t{r->data[1]} << 16 | uint32_t{r->data[2]} << 8 | r->data[3];
    names.emplace_back(r->data.begin() + 4, r->data.begin() + 4 + len);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"fixed", "d/a", "d/b"}));
}

}  // namespace
}  // namespace uvd::storage::nbd
