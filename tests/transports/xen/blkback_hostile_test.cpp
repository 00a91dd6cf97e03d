// SPDX-License-Identifier: Apache-2.0
// blkback against a hostile front end that writes raw blkif requests and raw
// store values: every malformed request gets an error response, nothing is
// written outside a request, an impossible ring disconnects only that device.
#include <poll.h>

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <thread>

#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/xen/blkback.hpp"
#include "transports/xen/blkif.hpp"
#include "transports/xen/local/local.hpp"

using namespace uvd;
using namespace uvd::xen;

namespace {

constexpr uint32_t vdev = 51712;
constexpr uint64_t disk_bytes = 4 << 20;
constexpr uint64_t disk_sectors = disk_bytes / 512;

// A front end that speaks blkif by hand.
class raw_front {
 public:
  raw_front(hypervisor& hv, domid_t back, uint32_t dev = vdev) : hv_(hv), back_(back), vdev_(dev) {}

  void prepare(bool persistent) {
    auto st = hv_.open_store();
    ASSERT_TRUE(st);
    st_ = std::move(*st);
    fdir_ = blk_frontend_dir(hv_.self_domid(), vdev_);
    bdir_ = blk_backend_dir(back_, hv_.self_domid(), vdev_);
    auto rp = hv_.grant_pages(back_, 1, true);
    auto data = hv_.grant_pages(back_, 16, true);
    auto ro = hv_.grant_pages(back_, 1, false);
    auto ind = hv_.grant_pages(back_, 2, true);
    ASSERT_TRUE(rp && data && ro && ind);
    ring_pages_ = std::move(*rp);
    data_ = std::move(*data);
    ro_ = std::move(*ro);
    ind_ = std::move(*ind);
    ASSERT_TRUE(ring_.init(ring_pages_->addr(), page_size));
    auto e = hv_.alloc_unbound(back_);
    ASSERT_TRUE(e);
    evt_ = std::move(*e);
    ASSERT_TRUE(st_->write(no_txn, fdir_ + "/ring-ref", std::to_string(ring_pages_->ref(0))));
    ASSERT_TRUE(st_->write(no_txn, fdir_ + "/event-channel", std::to_string(evt_->local_port())));
    ASSERT_TRUE(st_->write(no_txn, fdir_ + "/feature-persistent", persistent ? "1" : "0"));
  }

  void connect(bool persistent) {
    prepare(persistent);
    ASSERT_TRUE(write_state(*st_, fdir_, XenbusStateInitialised));
    ASSERT_EQ(wait_backend_state(XenbusStateConnected), XenbusStateConnected);
  }

  int wait_backend_state(int want) {
    int st = -1;
    for (int i = 0; i < 500; ++i) {
      auto s = read_state(*st_, bdir_);
      st = s ? *s : -1;
      if (st == want) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return st;
  }

  void send(const blkif_request& r) {
    std::memcpy(ring_.next_request(), &r, sizeof r);
    ring_.produce();
    if (ring_.push_requests()) {
      ASSERT_TRUE(evt_->notify());
    }
  }

  // The next response, or status 99 after 5 s of nothing.
  blkif_response wait_response() {
    blkif_response rsp{};
    for (int i = 0; i < 500; ++i) {
      auto t = ring_.take_response(&rsp);
      if (t == core::ring_take::item) return rsp;
      EXPECT_NE(t, core::ring_take::broken);
      pollfd p{evt_->fd(), POLLIN, 0};
      (void)::poll(&p, 1, 10);
      (void)evt_->ack();
    }
    rsp.status = 99;
    return rsp;
  }

  blkif_request_segment seg(grant_ref_t g, uint8_t first = 0, uint8_t last = 7) {
    blkif_request_segment s{};
    s.gref = g;
    s.first_sect = first;
    s.last_sect = last;
    return s;
  }

  hypervisor& hv_;
  domid_t back_;
  uint32_t vdev_;
  std::unique_ptr<store> st_;
  std::string fdir_, bdir_;
  std::unique_ptr<granted_pages> ring_pages_, data_, ro_, ind_;
  std::unique_ptr<event_channel> evt_;
  blk_front_ring ring_;
};

class BlkbackHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    auto h = local_hub::start(dir_.file("hub.sock"));
    ASSERT_TRUE(h);
    hub_ = std::move(*h);
    auto d = storage::Vstore::open(*reg_, "memory:4M");
    ASSERT_TRUE(d);
    disk_ = std::move(*d);
    std::vector<std::byte> fill(disk_bytes);
    test::fill_pattern(fill, 42, 0);
    ASSERT_TRUE(disk_->write(0, fill.data(), fill.size()));
    disk_sum_ = test::fnv1a(fill);
    auto hv0 = open_local_hypervisor(hub_->socket_path(), 0);
    ASSERT_TRUE(hv0);
    auto bb = blkback::start(std::move(*hv0));
    ASSERT_TRUE(bb);
    back_ = std::move(*bb);
    ASSERT_TRUE(back_->add_device(1, vdev, disk_));
    auto hv1 = open_local_hypervisor(hub_->socket_path(), 1);
    auto hv2 = open_local_hypervisor(hub_->socket_path(), 2);
    ASSERT_TRUE(hv1 && hv2);
    hv1_ = std::move(*hv1);
    hv2_ = std::move(*hv2);
  }

  uint64_t disk_sum() {
    std::vector<std::byte> b(disk_bytes);
    EXPECT_TRUE(disk_->read(0, b.data(), b.size()));
    return test::fnv1a(b);
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<local_hub> hub_;
  std::shared_ptr<storage::Vstore> disk_;
  uint64_t disk_sum_ = 0;
  std::unique_ptr<blkback> back_;
  std::unique_ptr<hypervisor> hv1_, hv2_;
};

blkif_request rw(uint8_t op, uint64_t id, uint64_t sector) {
  blkif_request r{};
  r.operation = op;
  r.id = id;
  r.sector_number = sector;
  r.handle = static_cast<blkif_vdev_t>(vdev);
  return r;
}

class BlkbackHostileRequests : public BlkbackHostile, public ::testing::WithParamInterface<bool> {};

TEST_P(BlkbackHostileRequests, EachMalformedRequestGetsAnErrorAndTouchesNothing) {
  raw_front f(*hv1_, 0);
  ASSERT_NO_FATAL_FAILURE(f.connect(GetParam()));
  std::memset(f.data_->addr(), 0xee, 16 * page_size);
  // A page granted to domain 2, not to the back end: its ref must not map for us.
  auto foreign = hv1_->grant_pages(2, 1, true);
  ASSERT_TRUE(foreign);
  const grant_ref_t good = f.data_->ref(0);

  struct hostile_case {
    const char* what;
    blkif_request req;
    int16_t want;
  };
  std::vector<hostile_case> cases;
  auto add = [&](const char* what, blkif_request r, int16_t want) { cases.push_back({what, r, want}); };

  auto r = rw(99, 1, 0);
  add("unknown operation", r, BLKIF_RSP_EOPNOTSUPP);
  r = rw(BLKIF_OP_WRITE_BARRIER, 2, 0);
  r.nr_segments = 1;
  r.seg[0] = f.seg(good);
  add("write barrier (not offered)", r, BLKIF_RSP_EOPNOTSUPP);
  r = rw(BLKIF_OP_RESERVED_1, 3, 0);
  add("reserved operation", r, BLKIF_RSP_EOPNOTSUPP);
  r = rw(BLKIF_OP_READ, 4, 0);
  r.nr_segments = 0;
  add("read without segments", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 5, 0);
  r.nr_segments = 12;
  for (int i = 0; i < 11; ++i) r.seg[i] = f.seg(f.data_->ref(i));
  add("12 segments in a direct request", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 6, 0);
  r.nr_segments = 1;
  r.seg[0] = f.seg(good, 3, 2);
  add("first_sect > last_sect", r, BLKIF_RSP_ERROR);
  r.id = 7;
  r.seg[0] = f.seg(good, 0, 8);
  add("last_sect past the page", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 8, disk_sectors - 4);
  r.nr_segments = 1;
  r.seg[0] = f.seg(good);
  add("sectors past the end of the disk", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_WRITE, 9, UINT64_MAX - 3);
  r.nr_segments = 1;
  r.seg[0] = f.seg(good);
  add("sector number that wraps", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 10, 0);
  r.nr_segments = 2;
  r.seg[0] = f.seg(good);
  r.seg[1] = f.seg(987654);
  add("grant ref that was never granted", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 11, 0);
  r.nr_segments = 1;
  r.seg[0] = f.seg((*foreign)->ref(0));
  add("grant ref granted to another domain", r, BLKIF_RSP_ERROR);
  r = rw(BLKIF_OP_READ, 12, 0);
  r.nr_segments = 1;
  r.seg[0] = f.seg(f.ro_->ref(0));
  add("read into a read-only grant", r, BLKIF_RSP_ERROR);

  auto ind = [&](uint64_t id, uint8_t op, uint16_t nseg, grant_ref_t ig) {
    blkif_request_indirect x{};
    x.operation = BLKIF_OP_INDIRECT;
    x.indirect_op = op;
    x.nr_segments = nseg;
    x.id = id;
    x.handle = static_cast<blkif_vdev_t>(vdev);
    x.indirect_grefs[0] = ig;
    x.indirect_grefs[1] = f.ind_->ref(1);
    blkif_request out;
    std::memcpy(&out, &x, sizeof x);
    return out;
  };
  auto* list = static_cast<blkif_request_segment*>(f.ind_->addr());
  for (int i = 0; i < 16; ++i) list[i] = f.seg(f.data_->ref(i));
  list[13] = f.seg(f.data_->ref(13), 0, 9);  // only requests of 14+ segments see this one
  add("indirect flush", ind(13, BLKIF_OP_FLUSH_DISKCACHE, 4, f.ind_->ref(0)), BLKIF_RSP_ERROR);
  add("indirect without segments", ind(14, BLKIF_OP_READ, 0, f.ind_->ref(0)), BLKIF_RSP_ERROR);
  add("indirect over the advertised maximum", ind(15, BLKIF_OP_READ, 257, f.ind_->ref(0)), BLKIF_RSP_ERROR);
  add("indirect page that was never granted", ind(16, BLKIF_OP_READ, 4, 55555), BLKIF_RSP_ERROR);
  add("bad segment inside the indirect page", ind(17, BLKIF_OP_READ, 14, f.ind_->ref(0)), BLKIF_RSP_ERROR);

  auto disc = [&](uint64_t id, uint64_t sector, uint64_t n, uint8_t flag) {
    blkif_request_discard d{};
    d.operation = BLKIF_OP_DISCARD;
    d.id = id;
    d.sector_number = sector;
    d.nr_sectors = n;
    d.flag = flag;
    blkif_request out;
    std::memcpy(&out, &d, sizeof d);
    return out;
  };
  add("discard past the end", disc(18, disk_sectors - 1, 2, 0), BLKIF_RSP_ERROR);
  add("discard that wraps", disc(19, 8, UINT64_MAX - 4, 0), BLKIF_RSP_ERROR);
  add("discard of nothing", disc(20, 8, 0, 0), BLKIF_RSP_ERROR);
  add("secure discard (not offered)", disc(21, 8, 8, BLKIF_DISCARD_SECURE), BLKIF_RSP_EOPNOTSUPP);

  for (const auto& c : cases) {
    f.send(c.req);
    blkif_response rsp = f.wait_response();
    EXPECT_EQ(rsp.id, c.req.id) << c.what;
    EXPECT_EQ(rsp.status, c.want) << c.what;
    // An indirect request is answered with its inner operation (Linux blkfront checks it), when it has one.
    uint8_t want_op = c.req.operation;
    if (want_op == BLKIF_OP_INDIRECT) {
      blkif_request_indirect x;
      std::memcpy(&x, &c.req, sizeof x);
      if (x.indirect_op == BLKIF_OP_READ || x.indirect_op == BLKIF_OP_WRITE) want_op = x.indirect_op;
    }
    EXPECT_EQ(rsp.operation, want_op) << c.what;
  }
  // Nothing reached the disk, nothing was written into any granted page.
  EXPECT_EQ(disk_sum(), disk_sum_);
  for (size_t i = 0; i < 16 * page_size; ++i)
    ASSERT_EQ(static_cast<uint8_t*>(f.data_->addr())[i], 0xee) << "byte " << i << " of the data pages";
  // And the device still serves well-formed requests, direct and indirect.
  r = rw(BLKIF_OP_READ, 100, 16);
  r.nr_segments = 1;
  r.seg[0] = f.seg(good, 1, 2);  // sectors 16..17 into bytes 512..1535 of the page
  f.send(r);
  auto ok = f.wait_response();
  EXPECT_EQ(ok.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(static_cast<uint8_t*>(f.data_->addr())[511], 0xee) << "the read went outside its sectors";
  EXPECT_EQ(static_cast<uint8_t*>(f.data_->addr())[1536], 0xee) << "the read went outside its sectors";
  EXPECT_EQ(test::find_pattern_mismatch(std::span(static_cast<std::byte*>(f.data_->addr()) + 512, 1024), 42, 16 * 512),
            -1);
  f.send(ind(101, BLKIF_OP_READ, 13, f.ind_->ref(0)));
  EXPECT_EQ(f.wait_response().status, BLKIF_RSP_OKAY);
  auto st = back_->device_stats(1, vdev);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->errors, cases.size());
}

INSTANTIATE_TEST_SUITE_P(Grants, BlkbackHostileRequests, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "persistent" : "transient"; });

TEST_F(BlkbackHostile, IdReusedWhileInFlightIsRefused) {
  // A disk that completes from its own thread, so a request stays in flight
  // while the back end takes the next one.
  auto slow = storage::Vstore::open(*reg_, "memory:4M?async=1");
  ASSERT_TRUE(slow);
  ASSERT_TRUE(back_->add_device(1, vdev + 1, std::shared_ptr<storage::Vstore>(std::move(*slow))));
  raw_front f(*hv1_, 0, vdev + 1);
  ASSERT_NO_FATAL_FAILURE(f.connect(false));
  int overlapped = 0;
  // A 64-segment write (mapping 64 grants takes a while) and, in the same
  // push, a second request with the same id.
  auto* list = static_cast<blkif_request_segment*>(f.ind_->addr());
  auto big = hv1_->grant_pages(0, 64, true);
  ASSERT_TRUE(big);
  for (int i = 0; i < 64; ++i) list[i] = f.seg((*big)->ref(i));
  for (int round = 0; round < 20; ++round) {
    blkif_request_indirect x{};
    x.operation = BLKIF_OP_INDIRECT;
    x.indirect_op = BLKIF_OP_WRITE;
    x.nr_segments = 64;
    x.id = 7;
    x.sector_number = 0;
    x.indirect_grefs[0] = f.ind_->ref(0);
    blkif_request a;
    std::memcpy(&a, &x, sizeof x);
    auto b = rw(BLKIF_OP_READ, 7, 0);
    b.nr_segments = 1;
    b.seg[0] = f.seg(f.data_->ref(0));
    std::memcpy(f.ring_.next_request(), &a, sizeof a);
    f.ring_.produce();
    std::memcpy(f.ring_.next_request(), &b, sizeof b);
    f.ring_.produce();
    if (f.ring_.push_requests()) {
      ASSERT_TRUE(f.evt_->notify());
    }
    auto r1 = f.wait_response();
    auto r2 = f.wait_response();
    ASSERT_EQ(r1.id, 7u);
    ASSERT_EQ(r2.id, 7u);
    if (r1.operation == BLKIF_OP_READ) {
      // The read was answered first: it arrived while the write held id 7.
      EXPECT_EQ(r1.status, BLKIF_RSP_ERROR) << "round " << round;
      EXPECT_EQ(r2.status, BLKIF_RSP_OKAY);
      ++overlapped;
    } else {
      // The write finished before the read was taken: a legal reuse.
      EXPECT_EQ(r1.status, BLKIF_RSP_OKAY);
      EXPECT_EQ(r2.status, BLKIF_RSP_OKAY);
    }
  }
  RecordProperty("rounds_with_the_id_in_flight", overlapped);
}

TEST_F(BlkbackHostile, IdsAreCheckedAcrossAWholeBatch) {
  // The back end takes every request one push published before it answers
  // any of them (the memory disk completes inside submit, and 32 x 4 KiB is
  // one slice), so an id repeated within a push is in flight when its copy
  // arrives. Random 64-bit ids fill the in-flight id table with collisions
  // and removals, round after round.
  raw_front f(*hv1_, 0);
  ASSERT_NO_FATAL_FAILURE(f.connect(true));
  ASSERT_EQ(f.ring_.size(), 32u);
  uint64_t seed = 0x9e3779b97f4a7c15ull, expected_errors = 0;
  auto next = [&] {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
  };
  for (int round = 0; round < 200; ++round) {
    std::vector<uint64_t> ids;
    for (uint32_t k = 0; k < 32; ++k) {
      uint64_t id = (k > 0 && next() % 4 == 0) ? ids[next() % ids.size()] : next();
      ids.push_back(id);
      auto r = rw(BLKIF_OP_READ, id, next() % (disk_sectors / 8) * 8);
      r.nr_segments = 1;
      r.seg[0] = f.seg(f.data_->ref(k % 16));
      std::memcpy(f.ring_.next_request(), &r, sizeof r);
      f.ring_.produce();
    }
    if (f.ring_.push_requests()) {
      ASSERT_TRUE(f.evt_->notify());
    }
    std::map<uint64_t, std::pair<int, int>> got;  // id -> (okay, error)
    for (uint32_t k = 0; k < 32; ++k) {
      auto rsp = f.wait_response();
      ASSERT_NE(rsp.status, 99) << "round " << round << ": no answer";
      EXPECT_EQ(rsp.operation, BLKIF_OP_READ);
      (rsp.status == BLKIF_RSP_OKAY ? got[rsp.id].first : got[rsp.id].second)++;
    }
    std::map<uint64_t, int> sent;
    for (uint64_t id : ids) ++sent[id];
    ASSERT_EQ(got.size(), sent.size()) << "round " << round;
    for (auto& [id, n] : sent) {
      EXPECT_EQ(got[id].first, 1) << "round " << round << " id " << id;
      EXPECT_EQ(got[id].second, n - 1) << "round " << round << " id " << id;
      expected_errors += n - 1;
    }
  }
  auto st = back_->device_stats(1, vdev);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->requests, 200u * 32);
  EXPECT_EQ(st->errors, expected_errors);
  EXPECT_GT(expected_errors, 0u);
  EXPECT_EQ(disk_sum(), disk_sum_);
}

TEST_F(BlkbackHostile, ImpossibleRingIndexDisconnectsOnlyThatDevice) {
  // A well-behaved second guest on the same back end.
  ASSERT_TRUE(back_->add_device(2, vdev, disk_));
  auto good = storage::Vstore::open(*reg_, "xen://0/" + std::to_string(vdev) + "?hub=" + hub_->socket_path() +
                                               "&domid=2");
  ASSERT_TRUE(good) << good.err().what();
  raw_front f(*hv1_, 0);
  ASSERT_NO_FATAL_FAILURE(f.connect(true));
  __atomic_store_n(&f.ring_.shared()->req_prod, f.ring_.size() + 5, __ATOMIC_RELEASE);
  ASSERT_TRUE(f.evt_->notify());
  EXPECT_EQ(f.wait_backend_state(XenbusStateClosing), XenbusStateClosing);
  auto err = f.st_->read(no_txn, f.bdir_ + "/error");
  ASSERT_TRUE(err);
  EXPECT_NE(err->find("impossible"), std::string::npos) << *err;
  std::vector<std::byte> b(1 << 16);
  ASSERT_TRUE((*good)->read(0, b.data(), b.size()));
  EXPECT_EQ(test::find_pattern_mismatch(b, 42, 0), -1);
  // The bad guest starts over cleanly: Closed, Initialising, and it is served again.
  ASSERT_TRUE(write_state(*f.st_, f.fdir_, XenbusStateClosed));
  EXPECT_EQ(f.wait_backend_state(XenbusStateClosed), XenbusStateClosed);
  ASSERT_TRUE(write_state(*f.st_, f.fdir_, XenbusStateInitialising));
  EXPECT_EQ(f.wait_backend_state(XenbusStateInitWait), XenbusStateInitWait);
}

TEST_F(BlkbackHostile, HostileStoreValuesAreRefused) {
  struct bad_key {
    const char* key;
    const char* value;
  };
  for (auto bk : {bad_key{"ring-page-order", "9"}, bad_key{"ring-ref", "zebra"}, bad_key{"ring-ref", "4294967296"},
                  bad_key{"event-channel", "77777"}, bad_key{"protocol", XEN_IO_PROTO_ABI_X86_32},
                  bad_key{"multi-queue-num-queues", "4"}, bad_key{"ring-ref", "123456"}}) {
    raw_front f(*hv1_, 0);
    ASSERT_NO_FATAL_FAILURE(f.prepare(false));
    ASSERT_TRUE(f.st_->write(no_txn, f.fdir_ + "/" + bk.key, bk.value));
    ASSERT_TRUE(write_state(*f.st_, f.fdir_, XenbusStateInitialised));
    EXPECT_EQ(f.wait_backend_state(XenbusStateClosing), XenbusStateClosing) << bk.key << "=" << bk.value;
    // Start over for the next value.
    for (const char* k : {"ring-page-order", "protocol", "multi-queue-num-queues"})
      (void)f.st_->rm(no_txn, f.fdir_ + "/" + k);
    ASSERT_TRUE(write_state(*f.st_, f.fdir_, XenbusStateClosed));
    EXPECT_EQ(f.wait_backend_state(XenbusStateClosed), XenbusStateClosed);
    ASSERT_TRUE(write_state(*f.st_, f.fdir_, XenbusStateInitialising));
    EXPECT_EQ(f.wait_backend_state(XenbusStateInitWait), XenbusStateInitWait);
  }
  // After all that, an honest handshake still connects.
  raw_front f(*hv1_, 0);
  ASSERT_NO_FATAL_FAILURE(f.connect(true));
}

}  // namespace
