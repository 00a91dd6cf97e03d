// SPDX-License-Identifier: Apache-2.0
// The host-local hypervisor: grants that only the named domain can map, with
// read-only enforced by the mapping, revocation, event channels, and the
// store's tree, permissions, transactions and watches.
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "tests/testutil.hpp"
#include "transports/xen/hv.hpp"
#include "transports/xen/local/local.hpp"

using namespace uvd;
using namespace uvd::xen;

namespace {

class LocalHv : public ::testing::Test {
 protected:
  void SetUp() override {
    auto h = local_hub::start(dir_.file("hub.sock"));
    ASSERT_TRUE(h) << h.err().what();
    hub_ = std::move(*h);
    auto d0 = open_local_hypervisor(hub_->socket_path(), 0);
    auto d1 = open_local_hypervisor(hub_->socket_path(), 1);
    auto d2 = open_local_hypervisor(hub_->socket_path(), 2);
    ASSERT_TRUE(d0 && d1 && d2);
    dom0_ = std::move(*d0);
    dom1_ = std::move(*d1);
    dom2_ = std::move(*d2);
  }

  test::temp_dir dir_;
  std::unique_ptr<local_hub> hub_;
  std::unique_ptr<hypervisor> dom0_, dom1_, dom2_;
};

TEST_F(LocalHv, GrantedPagesAreSharedWithThePeer) {
  auto g = dom1_->grant_pages(0, 3, true);
  ASSERT_TRUE(g) << g.err().what();
  std::memset((*g)->addr(), 0x5a, 3 * page_size);
  // Map in a different order than granted: the mapping follows the refs.
  grant_ref_t refs[] = {(*g)->ref(2), (*g)->ref(0)};
  static_cast<char*>((*g)->addr())[2 * page_size] = 'c';
  auto m = dom0_->map_grants(1, refs, true);
  ASSERT_TRUE(m) << m.err().what();
  char* p = static_cast<char*>((*m)->addr());
  EXPECT_EQ(p[0], 'c');
  EXPECT_EQ(p[page_size + 1], 0x5a);
  p[page_size] = 'w';  // back end writes into the front end's page 0
  EXPECT_EQ(static_cast<char*>((*g)->addr())[0], 'w');
}

TEST_F(LocalHv, MapRefusesWrongDomainUnknownRefAndWritableReadOnly) {
  auto g = dom1_->grant_pages(0, 2, false);
  ASSERT_TRUE(g);
  grant_ref_t ok[] = {(*g)->ref(0)};
  auto not_mine = dom2_->map_grants(1, ok, false);
  ASSERT_FALSE(not_mine);
  EXPECT_EQ(not_mine.err().errnum(), EPERM);
  grant_ref_t bogus[] = {(*g)->ref(0), 123456};
  auto b = dom0_->map_grants(1, bogus, false);
  ASSERT_FALSE(b) << "one bad ref fails the whole map";
  EXPECT_EQ(b.err().errnum(), EINVAL);
  auto wrong_granter = dom0_->map_grants(2, ok, false);
  EXPECT_FALSE(wrong_granter);
  auto rw = dom0_->map_grants(1, ok, true);
  ASSERT_FALSE(rw);
  EXPECT_EQ(rw.err().errnum(), EACCES);
  auto ro = dom0_->map_grants(1, ok, false);
  ASSERT_TRUE(ro) << ro.err().what();
  EXPECT_FALSE((*ro)->writable());
}

sigjmp_buf g_jmp;
void on_segv(int) { siglongjmp(g_jmp, 1); }

TEST_F(LocalHv, ReadOnlyMappingFaultsOnWrite) {
  auto g = dom1_->grant_pages(0, 1, false);
  ASSERT_TRUE(g);
  std::strcpy(static_cast<char*>((*g)->addr()), "base");
  grant_ref_t r[] = {(*g)->ref(0)};
  auto m = dom0_->map_grants(1, r, false);
  ASSERT_TRUE(m);
  volatile char* p = static_cast<char*>((*m)->addr());
  EXPECT_EQ(p[0], 'b');
  // The pages of a read-only grant arrive as an O_RDONLY descriptor, so not even
  // mprotect can make them writable.
  EXPECT_NE(::mprotect((*m)->addr(), page_size, PROT_READ | PROT_WRITE), 0);
  struct sigaction sa {}, old{};
  sa.sa_handler = on_segv;
  sigaction(SIGSEGV, &sa, &old);
  bool faulted = false;
  if (sigsetjmp(g_jmp, 1) == 0)
    p[0] = 'X';
  else
    faulted = true;
  sigaction(SIGSEGV, &old, nullptr);
  EXPECT_TRUE(faulted);
  EXPECT_EQ(static_cast<char*>((*g)->addr())[0], 'b');
}

TEST_F(LocalHv, EndingAccessRefusesNewMappingsButKeepsExistingOnes) {
  auto g = dom1_->grant_pages(0, 1, true);
  ASSERT_TRUE(g);
  grant_ref_t r[] = {(*g)->ref(0)};
  auto m = dom0_->map_grants(1, r, true);
  ASSERT_TRUE(m);
  g->reset();  // end access
  static_cast<char*>((*m)->addr())[0] = 1;  // still valid memory for the mapper, as on Xen
  auto again = dom0_->map_grants(1, r, true);
  EXPECT_FALSE(again) << "a revoked grant must not map again";
}

TEST_F(LocalHv, EventChannelsNotifyTheOtherEnd) {
  auto a = dom1_->alloc_unbound(0);
  ASSERT_TRUE(a);
  auto wrong = dom2_->bind_interdomain(1, (*a)->local_port());
  ASSERT_FALSE(wrong) << "port was opened for domain 0 only";
  auto b = dom0_->bind_interdomain(1, (*a)->local_port());
  ASSERT_TRUE(b) << b.err().what();
  auto twice = dom0_->bind_interdomain(1, (*a)->local_port());
  EXPECT_FALSE(twice);
  EXPECT_FALSE(*(*b)->ack());
  ASSERT_TRUE((*a)->notify());
  ASSERT_TRUE((*a)->notify());
  pollfd p{(*b)->fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 1000), 1);
  EXPECT_TRUE(*(*b)->ack());
  EXPECT_FALSE(*(*b)->ack()) << "notifications coalesce";
  ASSERT_TRUE((*b)->notify());
  EXPECT_TRUE(*(*a)->ack());
}

TEST_F(LocalHv, StoreTreePermissionsAndWatches) {
  auto s0 = dom0_->open_store();
  auto s1 = dom1_->open_store();
  ASSERT_TRUE(s0 && s1);
  store& st0 = **s0;
  store& st1 = **s1;
  ASSERT_TRUE(st1.write(no_txn, "/local/domain/1/device/vbd/51712/state", "1"));
  EXPECT_EQ(*st0.read(no_txn, "/local/domain/1/device/vbd/51712/state"), "1");
  auto dir = st0.directory(no_txn, "/local/domain/1/device/vbd");
  ASSERT_TRUE(dir);
  EXPECT_EQ(*dir, std::vector<std::string>{"51712"});
  // A guest may not write outside its own domain's tree, nor read another's.
  EXPECT_EQ(st1.write(no_txn, "/local/domain/0/backend/x", "1").err().errnum(), EACCES);
  ASSERT_TRUE(st0.write(no_txn, "/local/domain/0/backend/vbd/1/51712/state", "2"));
  EXPECT_EQ(st1.read(no_txn, "/local/domain/0/backend/vbd/1/51712/state").err().errnum(), EACCES);
  store_perm perms[] = {{0, false, false}, {1, true, false}};
  ASSERT_TRUE(st0.set_perms(no_txn, "/local/domain/0/backend/vbd/1/51712/state", perms));
  EXPECT_EQ(*st1.read(no_txn, "/local/domain/0/backend/vbd/1/51712/state"), "2");
  EXPECT_FALSE(st1.write(no_txn, "/local/domain/0/backend/vbd/1/51712/state", "6"));
  EXPECT_EQ(st0.read(no_txn, "/nope").err().errnum(), ENOENT);
  EXPECT_EQ(st0.read(no_txn, "relative//bad").err().errnum(), EINVAL);

  // A new watch fires once, then on every change at or below its path.
  ASSERT_TRUE(st0.watch("/local/domain/1/device", "tok"));
  ASSERT_TRUE(st1.write(no_txn, "/local/domain/1/device/vbd/51712/state", "3"));
  std::vector<std::string> seen;
  for (int i = 0; i < 50 && seen.size() < 2; ++i) {
    pollfd p{st0.watch_fd(), POLLIN, 0};
    (void)::poll(&p, 1, 100);
    for (;;) {
      auto ev = st0.read_watch();
      ASSERT_TRUE(ev);
      if (!*ev) break;
      EXPECT_EQ((*ev)->token, "tok");
      seen.push_back((*ev)->path);
    }
  }
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], "/local/domain/1/device");
  EXPECT_EQ(seen[1], "/local/domain/1/device/vbd/51712/state");
  // Watches do not leak nodes a domain may not read.
  ASSERT_TRUE(st1.watch("/local/domain/0", "peek"));
  ASSERT_TRUE(st0.write(no_txn, "/local/domain/0/secret", "x"));
  ASSERT_TRUE(st1.write(no_txn, "/local/domain/1/marker", "1"));  // an event st1 may see, to sync on
  ASSERT_TRUE(st1.watch("/local/domain/1/marker", "sync"));
  std::vector<std::string> tokens;
  for (int i = 0; i < 50; ++i) {
    pollfd p{st1.watch_fd(), POLLIN, 0};
    (void)::poll(&p, 1, 20);
    for (;;) {
      auto ev = st1.read_watch();
      ASSERT_TRUE(ev);
      if (!*ev) break;
      tokens.push_back((*ev)->token + " " + (*ev)->path);
    }
    if (!tokens.empty() && tokens.back().rfind("sync", 0) == 0) break;
  }
  for (const auto& t : tokens) EXPECT_EQ(t.find("secret"), std::string::npos) << t;
  ASSERT_TRUE(st1.rm(no_txn, "/local/domain/1/device"));
  EXPECT_EQ(st0.read(no_txn, "/local/domain/1/device/vbd/51712/state").err().errnum(), ENOENT);
}

TEST_F(LocalHv, TransactionsConflictAndRetry) {
  auto s0 = dom0_->open_store();
  auto s0b = dom0_->open_store();
  ASSERT_TRUE(s0 && s0b);
  ASSERT_TRUE((*s0)->write(no_txn, "/t/counter", "0"));
  auto t = (*s0)->transaction_start();
  ASSERT_TRUE(t);
  ASSERT_TRUE((*s0)->write(*t, "/t/counter", "1"));
  EXPECT_EQ(*(*s0b)->read(no_txn, "/t/counter"), "0") << "uncommitted writes are private";
  ASSERT_TRUE((*s0b)->write(no_txn, "/t/other", "x"));
  auto end = (*s0)->transaction_end(*t, true);
  ASSERT_FALSE(end);
  EXPECT_EQ(end.err().errnum(), EAGAIN);
  EXPECT_EQ(*(*s0)->read(no_txn, "/t/counter"), "0");

  // Two threads incrementing through with_transaction lose no update.
  auto incr = [](store& s) {
    for (int i = 0; i < 50; ++i) {
      auto r = with_transaction(s, [&](txn_t tx) -> core::result<void> {
        auto v = read_uint(s, tx, "/t/counter");
        if (!v) return core::fail(std::move(v).err());
        return s.write(tx, "/t/counter", std::to_string(*v + 1));
      }, 10000);
      ASSERT_TRUE(r) << r.err().what();
    }
  };
  std::thread a([&] { incr(**s0); });
  std::thread b([&] { incr(**s0b); });
  a.join();
  b.join();
  EXPECT_EQ(*(*s0)->read(no_txn, "/t/counter"), "100");
}

TEST_F(LocalHv, ADomainThatGoesAwayLosesItsGrants) {
  int to_parent[2], to_child[2];
  ASSERT_EQ(::pipe(to_parent), 0);
  ASSERT_EQ(::pipe(to_child), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // domain 3 in its own process: grant one page, report the ref, wait, die
    auto hv = open_local_hypervisor(hub_->socket_path(), 3);
    grant_ref_t ref = 0;
    std::unique_ptr<granted_pages> g;
    if (hv) {
      auto r = (*hv)->grant_pages(0, 1, true);
      if (r) {
        g = std::move(*r);
        ref = g->ref(0);
      }
    }
    (void)!::write(to_parent[1], &ref, sizeof ref);
    char c;
    (void)!::read(to_child[0], &c, 1);
    ::_exit(0);  // no destructor runs: only the hub's cleanup ends the grant
  }
  grant_ref_t ref = 0;
  ASSERT_EQ(::read(to_parent[0], &ref, sizeof ref), static_cast<ssize_t>(sizeof ref));
  ASSERT_NE(ref, 0u);
  grant_ref_t r[] = {ref};
  {
    auto m = dom0_->map_grants(3, r, true);
    ASSERT_TRUE(m) << m.err().what();
  }
  ASSERT_EQ(::write(to_child[1], "x", 1), 1);
  int st;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  bool refused = false;
  for (int i = 0; i < 200 && !refused; ++i) {  // the hub notices the hang-up asynchronously
    refused = !dom0_->map_grants(3, r, true);
    if (!refused) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(refused);
  for (int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) ::close(fd);
}

}  // namespace
