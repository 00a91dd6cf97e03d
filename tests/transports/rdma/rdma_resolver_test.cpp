// SPDX-License-Identifier: Apache-2.0
// The storage server's resolved exports over real verbs (part of
// rdma_server_test, so it runs in the Soft-RoCE guest with the rest): OPEN of
// NAME/CLIENT provisions the client's overlay through the resolver `uvd serve
// --root` uses, connections to one name share one export (data and epoch),
// hostile names are refused, and the device and its attachment records go
// with the last client. Skipped (loudly) on a host without RDMA devices.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <thread>
#include <vector>

#include "core/log.hpp"
#include "storage/roots/rdma_resolver.hpp"
#include "storage/roots/roots.hpp"
#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/verbs.hpp"

using namespace uvd;

namespace {

bool rdma_ready(std::string* why) {
  if (!rdma::have_rdma_device(why)) return false;
  if (!std::getenv("UVD_RDMA_PEER_ADDR")) {
    *why = "set UVD_RDMA_PEER_ADDR (server) and UVD_RDMA_ADDR (clients) to addresses of two RDMA devices";
    return false;
  }
  return true;
}

TEST(RdmaResolvedExports, OverlaysAreProvisionedSharedFencedAndClosedWithTheLastClient) {
  std::string why;
  if (!rdma_ready(&why))
    GTEST_SKIP() << "RDMA test skipped: " << why << " (it runs in the Soft-RoCE guest: ctest -L e2e -R RdmaServerInGuest)";
  const std::string server_addr = std::getenv("UVD_RDMA_PEER_ADDR");
  const char* ca = std::getenv("UVD_RDMA_ADDR");
  const std::string src = ca && *ca ? std::string("src=") + ca : "";
  test::temp_dir dir;
  auto reg = transports::make_default_registry();
  const std::string base_path = test::make_sparse_file(dir.file("base.img"), 8ull << 20);
  storage::open_options bo;
  bo.read_only = true;
  auto base = storage::Vstore::open(*reg, "file://" + base_path, bo);
  ASSERT_TRUE(base) << base.err().what();
  std::shared_ptr<storage::Vstore> shared_base(std::move(*base));
  auto x = storage::overlay_exports::create(*reg, dir.file("overlays"), {{"deb", "file://" + base_path, shared_base}});
  ASSERT_TRUE(x) << x.err().what();

  rdma::server_options o;
  o.listen = {server_addr + ":0"};
  o.exports = {rdma::export_of(*shared_base, "deb", true)};
  auto srv = rdma::server::create(o, storage::rdma_overlay_resolver(**x));
  ASSERT_TRUE(srv) << srv.err().what();
  ASSERT_TRUE((*srv)->start());
  const std::string at = server_addr + ":" + std::to_string((*srv)->port()) + "/";
  auto open = [&](const std::string& name) {
    storage::open_options co;
    co.options = src;
    return storage::Vstore::open(rdma::rdma_vstore_ops, at + name, co);
  };
  const std::string overlay = dir.file("overlays") + "/deb/node1.cow";
  {
    auto a = open("deb/node1");
    ASSERT_TRUE(a) << a.err().what();
    auto b = open("deb/node1");  // a second path of the same client
    ASSERT_TRUE(b) << b.err().what();
    EXPECT_EQ((*x)->open_devices(), 1u);
    EXPECT_EQ(storage::list_attachments(overlay).size(), 2u);
    std::vector<std::byte> w(65536), r(65536);
    test::fill_pattern(w, 3, 1 << 20);
    ASSERT_TRUE((*a)->write(1 << 20, w.data(), w.size()));
    ASSERT_TRUE((*b)->read(1 << 20, r.data(), r.size()));
    EXPECT_EQ(r, w) << "two connections of one overlay saw different devices";
    // One export, one epoch: a fence through one path is what the other sees.
    ASSERT_TRUE((*a)->can_fence());
    auto f = (*a)->fence(7);
    ASSERT_TRUE(f) << f.err().what();
    auto q = (*b)->fence(0);
    ASSERT_TRUE(q) << q.err().what();
    EXPECT_EQ(*q, 7u);
    // The base is served read-only; other clients see it, not node1's blocks.
    auto other = open("deb/node2");
    ASSERT_TRUE(other);
    ASSERT_TRUE((*other)->read(1 << 20, r.data(), r.size()));
    EXPECT_NE(r, w);
    auto root = open("deb");
    ASSERT_TRUE(root);
    EXPECT_TRUE((*root)->read_only());
    for (const char* bad : {"deb/../x", "deb/a/b", "deb/", "nosuch/a"}) {
      auto v = open(bad);
      EXPECT_FALSE(v) << bad << " was opened";
    }
  }
  for (int i = 0; i < 100 && (*x)->open_devices() != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ((*x)->open_devices(), 0u) << "the overlay stayed open after its last client left";
  EXPECT_TRUE(storage::list_attachments(overlay).empty());
  // The overlay persisted: a new connection finds node1's data.
  auto again = open("deb/node1");
  ASSERT_TRUE(again);
  std::vector<std::byte> w(65536), r(65536);
  test::fill_pattern(w, 3, 1 << 20);
  ASSERT_TRUE((*again)->read(1 << 20, r.data(), r.size()));
  EXPECT_EQ(r, w);
  again->reset();
  (*srv)->stop();
}

}  // namespace
