// SPDX-License-Identifier: Apache-2.0
// storage/roots: hostile client names, atomic provisioning (processes racing
// on one first attach), attachment records (dead pids), listing, removal,
// one shared device per overlay, and the RDMA server's C resolver table over
// it (the half of the RDMA resolver that runs without a device; the server
// half runs in the Soft-RoCE guest).
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "storage/roots/rdma_resolver.hpp"
#include "storage/roots/roots.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

namespace uvd::storage {
namespace {

using test::temp_dir;

constexpr uint64_t base_size = 8ull << 20;

bool exists(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0;
}

class Roots : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    base_path_ = dir_.file("base.img");
    std::vector<std::byte> buf(base_size);
    test::fill_pattern(buf, 7, 0);
    std::ofstream(base_path_, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), buf.size());
    base_sum_ = test::fnv1a(buf);
    ovdir_ = dir_.file("overlays");
  }
  uint64_t base_checksum() {
    std::ifstream f(base_path_, std::ios::binary);
    std::vector<std::byte> buf(base_size);
    f.read(reinterpret_cast<char*>(buf.data()), buf.size());
    return test::fnv1a(buf);
  }
  std::unique_ptr<overlay_exports> exports() {
    open_options bo;
    bo.read_only = true;
    auto base = Vstore::open(*reg_, "file://" + base_path_, bo);
    EXPECT_TRUE(base) << base.err().what();
    std::vector<overlay_exports::root> roots;
    roots.push_back({"deb", "file://" + base_path_, std::shared_ptr<Vstore>(std::move(*base))});
    auto x = overlay_exports::create(*reg_, ovdir_, std::move(roots));
    EXPECT_TRUE(x) << x.err().what();
    return std::move(*x);
  }
  static attachment_info who(const std::string& transport, const std::string& client) {
    attachment_info a;
    a.transport = transport;
    a.server = "test-listener";
    a.client = client;
    return a;
  }

  temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::string base_path_, ovdir_;
  uint64_t base_sum_ = 0;
};

TEST(RootNames, AcceptsTheDocumentedPatternOnly) {
  for (const char* ok : {"a", "client-a", "Node.7_b", "0", "x-"}) EXPECT_TRUE(check_client_name(ok)) << ok;
  EXPECT_TRUE(check_client_name(std::string(63, 'c')));
  const std::string nul("a\0b", 3);
  for (const std::string& bad : {std::string(""), std::string("../x"), std::string(".."), std::string("."),
                                 std::string("a/b"), std::string("a/b/c"), std::string(64, 'c'), std::string("-a"),
                                 std::string(".hidden"), std::string("a b"), std::string("a\nb"), nul,
                                 std::string("caf\xc3\xa9")}) {
    auto r = check_client_name(bad);
    ASSERT_FALSE(r) << "accepted '" << bad << "'";
    EXPECT_EQ(r.err().errnum(), EINVAL);
  }
  auto r = check_client_name(nul);
  EXPECT_NE(r.err().message.find("\\x00"), std::string::npos) << r.err().message;  // shown, not passed on raw
}

TEST(RootNames, SplitsExportNames) {
  auto ok = split_overlay_name("deb/client-a");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->first, "deb");
  EXPECT_EQ(ok->second, "client-a");
  EXPECT_EQ(split_overlay_name("deb").err().errnum(), ENOENT);
  for (const char* bad : {"deb/", "/x", "deb/../x", "deb/a/b", "../deb/x", "deb//x"})
    EXPECT_EQ(split_overlay_name(bad).err().errnum(), EINVAL) << bad;
  EXPECT_EQ(overlay_path("/srv/ov/", "deb", "c"), "/srv/ov/deb/c.cow");
}

TEST_F(Roots, ProvisionsOnceAndFindsItAgain) {
  auto p = provision_overlay(*reg_, ovdir_, "deb", "client-a", base_path_);
  ASSERT_TRUE(p) << p.err().what();
  EXPECT_TRUE(p->created);
  EXPECT_EQ(p->path, ovdir_ + "/deb/client-a.cow");
  auto again = provision_overlay(*reg_, ovdir_, "deb", "client-a", base_path_);
  ASSERT_TRUE(again);
  EXPECT_FALSE(again->created);
  auto rep = inspect_cow(*reg_, p->path, true);
  ASSERT_TRUE(rep) << rep.err().what();
  EXPECT_EQ(rep->header.virtual_size, base_size);
  EXPECT_TRUE(rep->base_ok) << rep->base_message;
  EXPECT_FALSE(provision_overlay(*reg_, ovdir_, "deb", "../escape", base_path_));
  EXPECT_FALSE(exists(ovdir_ + "/escape.cow"));
}

// Processes racing on one first attach all end with the same, valid overlay;
// exactly one of them made it, and no temporary is left behind.
TEST_F(Roots, ProcessesRacingOnAFirstAttachShareOneOverlay) {
  constexpr int n = 6;
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  std::vector<pid_t> kids;
  for (int i = 0; i < n; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(go[1]);
      char c;
      if (::read(go[0], &c, 1) < 0) ::_exit(9);  // all start together
      auto reg = transports::make_default_registry();
      auto p = provision_overlay(*reg, ovdir_, "deb", "racer", base_path_);
      ::_exit(!p ? 2 : p->created ? 0 : 1);
    }
    kids.push_back(pid);
  }
  ::close(go[0]);
  ::close(go[1]);  // EOF releases every child at once
  int created = 0, found = 0;
  for (pid_t k : kids) {
    int st = 0;
    ::waitpid(k, &st, 0);
    ASSERT_TRUE(WIFEXITED(st));
    ASSERT_LE(WEXITSTATUS(st), 1) << "a racer failed to provision";
    (WEXITSTATUS(st) == 0 ? created : found)++;
  }
  EXPECT_EQ(created, 1);
  EXPECT_EQ(found, n - 1);
  auto rep = inspect_cow(*reg_, ovdir_ + "/deb/racer.cow", true);
  ASSERT_TRUE(rep) << rep.err().what();
  EXPECT_TRUE(rep->base_ok);
  auto all = list_overlays(*reg_, ovdir_);
  ASSERT_TRUE(all);
  ASSERT_EQ(all->size(), 1u);
  int entries = 0;
  if (DIR* d = ::opendir((ovdir_ + "/deb").c_str())) {
    while (dirent* e = ::readdir(d)) entries += std::strncmp(e->d_name, ".racer", 6) == 0;
    ::closedir(d);
  }
  EXPECT_EQ(entries, 0) << "a temporary overlay was left behind";
}

TEST_F(Roots, AttachmentRecordsOfDeadProcessesAreIgnored) {
  auto p = provision_overlay(*reg_, ovdir_, "deb", "c1", base_path_);
  ASSERT_TRUE(p);
  {
    auto rec = attachment::write(p->path, who("nbd", "10.0.0.2:4000"));
    ASSERT_TRUE(rec) << rec.err().what();
    auto live = list_attachments(p->path);
    ASSERT_EQ(live.size(), 1u);
    EXPECT_EQ(live[0].transport, "nbd");
    EXPECT_EQ(live[0].server, "test-listener");
    EXPECT_EQ(live[0].client, "10.0.0.2:4000");
    EXPECT_EQ(live[0].pid, ::getpid());
    EXPECT_GT(live[0].since, 0);
  }
  EXPECT_TRUE(list_attachments(p->path).empty()) << "the record outlived its owner";
  // A process that dies holding a record (SIGKILL: no destructor runs).
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto rec = attachment::write(p->path, who("rdma", "10.0.0.3:5000\nforged=1"));
    if (!rec) ::_exit(1);
    ::kill(::getpid(), SIGKILL);
  }
  int st = 0;
  ::waitpid(pid, &st, 0);
  auto all = list_attachments(p->path, true);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_FALSE(all[0].live);
  EXPECT_EQ(all[0].client, "10.0.0.3:5000 forged=1");  // one line: a peer cannot add keys
  EXPECT_TRUE(list_attachments(p->path).empty());
  // Dead records do not block removal; a live one does, unless forced.
  auto rec = attachment::write(p->path, who("nbd", "x"));
  ASSERT_TRUE(rec);
  auto r = remove_overlay(ovdir_, "deb", "c1", false);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.err().errnum(), EBUSY);
  EXPECT_TRUE(exists(p->path));
  rec->reset();
  ASSERT_TRUE(remove_overlay(ovdir_, "deb", "c1", false));
  EXPECT_FALSE(exists(p->path));
  EXPECT_FALSE(exists(p->path + ".attached"));
  EXPECT_EQ(remove_overlay(ovdir_, "deb", "c1", false).err().errnum(), ENOENT);
}

TEST_F(Roots, OneSharedDevicePerOverlayClosedOnLastDetach) {
  auto x = exports();
  ASSERT_TRUE(x);
  auto a = x->open("deb/client-a", who("nbd", "peer-1"));
  ASSERT_TRUE(a) << a.err().what();
  EXPECT_TRUE((*a)->created);
  auto b = x->open("deb/client-a", who("rdma", "peer-2"));
  ASSERT_TRUE(b);
  EXPECT_FALSE((*b)->created);
  EXPECT_EQ((*a)->disk.get(), (*b)->disk.get());
  EXPECT_EQ(x->open_devices(), 1u);
  EXPECT_EQ(list_attachments((*a)->path).size(), 2u);
  a->reset();
  EXPECT_EQ(x->open_devices(), 1u);
  EXPECT_EQ(list_attachments((*b)->path).size(), 1u);
  b->reset();
  EXPECT_EQ(x->open_devices(), 0u);
  EXPECT_TRUE(list_attachments(ovdir_ + "/deb/client-a.cow").empty());
  EXPECT_EQ(x->open("deb", who("", "")).err().errnum(), ENOENT);
  EXPECT_EQ(x->open("other/client-a", who("", "")).err().errnum(), ENOENT);
  EXPECT_EQ(x->open("deb/../x", who("", "")).err().errnum(), EINVAL);
  EXPECT_EQ(x->open(std::string("deb/a\0b", 7), who("", "")).err().errnum(), EINVAL);
}

TEST_F(Roots, ClientsAreIsolatedAndTheBaseIsNeverWritten) {
  auto x = exports();
  ASSERT_TRUE(x);
  std::vector<std::byte> wa(64 << 10), wb(64 << 10), got(64 << 10), base(64 << 10);
  test::fill_pattern(wa, 1, 4096);
  test::fill_pattern(wb, 2, 4096);
  test::fill_pattern(base, 7, 4096);
  {
    auto a = x->open("deb/a", who("nbd", "pa"));
    auto b = x->open("deb/b", who("nbd", "pb"));
    ASSERT_TRUE(a && b);
    ASSERT_TRUE((*a)->disk->write(4096, wa.data(), wa.size()));
    ASSERT_TRUE((*b)->disk->write(4096, wb.data(), wb.size()));
  }
  auto a = x->open("deb/a", {});
  auto b = x->open("deb/b", {});
  auto c = x->open("deb/c", {});
  ASSERT_TRUE(a && b && c);
  ASSERT_TRUE((*a)->disk->read(4096, got.data(), got.size()));
  EXPECT_EQ(got, wa);
  ASSERT_TRUE((*b)->disk->read(4096, got.data(), got.size()));
  EXPECT_EQ(got, wb);
  ASSERT_TRUE((*c)->disk->read(4096, got.data(), got.size()));
  EXPECT_EQ(got, base);
  EXPECT_EQ(base_checksum(), base_sum_);
  std::vector<std::string> names;
  for (auto& l : x->list()) names.push_back(l.name);
  EXPECT_EQ(names, (std::vector<std::string>{"deb/a", "deb/b", "deb/c"}));
}

// The table `uvd serve` hands the rdma plugin: one device for every
// connection of a name, a record per connection, errnos the server sends.
TEST_F(Roots, RdmaResolverTableSharesDevicesAndKeepsRecords) {
  auto x = exports();
  ASSERT_TRUE(x);
  rdma::export_resolver r = rdma_overlay_resolver(*x);
  char err[256] = {};
  rdma::server_export e1, e2;
  void *ref1 = nullptr, *ref2 = nullptr;
  ASSERT_EQ(r.open(r.ctx, "deb/node1", "10.97.1.1:7171", "10.97.1.2:1000", &e1, &ref1, err, sizeof err), 0) << err;
  ASSERT_EQ(r.open(r.ctx, "deb/node1", "10.97.2.1:7171", "10.97.2.2:1001", &e2, &ref2, err, sizeof err), 0) << err;
  EXPECT_EQ(e1.disk, e2.disk);
  EXPECT_EQ(e1.name, "deb/node1");
  EXPECT_EQ(e1.size, base_size);
  EXPECT_FALSE(e1.read_only);
  ASSERT_NE(e1.submit, nullptr);
  auto recs = list_attachments(ovdir_ + "/deb/node1.cow");
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].transport, "rdma");
  EXPECT_EQ(recs[1].server == "10.97.2.1:7171" || recs[0].server == "10.97.2.1:7171", true);
  std::vector<rdma::resolver_entry> listed;
  r.list(r.ctx, &listed);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].name, "deb/node1");
  EXPECT_EQ(listed[0].size, base_size);
  void* bad = nullptr;
  rdma::server_export eb;
  EXPECT_EQ(r.open(r.ctx, "deb/../../etc", "l", "p", &eb, &bad, err, sizeof err), -EINVAL);
  EXPECT_NE(std::string(err).find("client name"), std::string::npos) << err;
  EXPECT_EQ(r.open(r.ctx, "nosuchroot/a", "l", "p", &eb, &bad, err, sizeof err), -ENOENT);
  r.close(r.ctx, ref1);
  EXPECT_EQ(x->open_devices(), 1u);
  r.close(r.ctx, ref2);
  EXPECT_EQ(x->open_devices(), 0u);
  EXPECT_TRUE(list_attachments(ovdir_ + "/deb/node1.cow").empty());
}

}  // namespace
}  // namespace uvd::storage
