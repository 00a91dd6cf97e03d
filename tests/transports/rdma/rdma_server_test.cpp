// SPDX-License-Identifier: Apache-2.0
// The 3leaf server and client over real verbs: many clients at once, a
// hostile client, fencing, handle revocation, stable export UUIDs, large
// transfers, queue depth. Needs two RDMA devices ($UVD_RDMA_PEER_ADDR for the
// server, $UVD_RDMA_ADDR for clients): the guest harness provides them
// (tests/e2e/rdma, ctest -L e2e); elsewhere every test skips, saying why.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "core/log.hpp"
#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "tests/transports/rdma/raw_client.hpp"
#include "transports/file/file.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/server_check.hpp"

using namespace uvd;
using namespace uvd::rdma;
using rdma::test::raw_client;

namespace {

constexpr uint64_t disk_size = 64ull << 20;

bool rdma_here(std::string* why) {
  if (!have_rdma_device(why)) return false;
  if (!std::getenv("UVD_RDMA_PEER_ADDR")) {
    *why = "set UVD_RDMA_PEER_ADDR (server) and UVD_RDMA_ADDR (clients) to addresses of two RDMA devices";
    return false;
  }
  return true;
}

#define NEED_RDMA()                                                                          \
  do {                                                                                       \
    std::string why_;                                                                        \
    if (!rdma_here(&why_)) GTEST_SKIP() << "RDMA test skipped: " << why_ << " (it runs in the Soft-RoCE guest: " \
                                        << "ctest -L e2e -R RdmaServerInGuest)";             \
  } while (0)

class RdmaServer : public ::testing::Test {
 protected:
  void SetUp() override {
    // A guest run that times out is killed: keep what was said up to then.
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    (void)core::init_logging(std::getenv("UVD_LOG_LEVEL") ? "" : "info");
    std::string why;
    if (!rdma_here(&why)) return;
    server_addr_ = std::getenv("UVD_RDMA_PEER_ADDR");
    const char* c = std::getenv("UVD_RDMA_ADDR");
    client_addr_ = c ? c : "";
    path_ = uvd::test::make_sparse_file(dir_.file("disk.img"), disk_size);
  }

  std::shared_ptr<storage::Vstore> open_disk(bool ro = false) {
    storage::open_options o;
    o.read_only = ro;
    auto v = storage::Vstore::open(file::file_vstore_ops, path_, o);
    EXPECT_TRUE(v) << v.err().what();
    return v ? std::shared_ptr<storage::Vstore>(std::move(*v)) : nullptr;
  }

  void start(server_options o = {}, bool ro = false) {
    disk_ = open_disk(ro);
    ASSERT_TRUE(disk_);
    o.listen = {server_addr_ + ":0"};
    o.exports = {export_of(*disk_, "disk", ro)};
    auto s = server::create(o);
    ASSERT_TRUE(s) << s.err().what();
    srv_ = std::move(*s);
    ASSERT_TRUE(srv_->start());
    port_ = std::to_string(srv_->port());
  }

  std::unique_ptr<storage::Vstore> client(const std::string& name = "disk", const std::string& extra = "",
                                          uint32_t qd = 64) {
    storage::open_options o;
    o.queue_depth = qd;
    o.options = (client_addr_.empty() ? "" : "src=" + client_addr_) + extra;
    auto v = storage::Vstore::open(rdma_vstore_ops, server_addr_ + ":" + port_ + "/" + name, o);
    EXPECT_TRUE(v) << v.err().what();
    return v ? std::move(*v) : nullptr;
  }

  std::unique_ptr<raw_client> raw(bool do_open = true) {
    auto c = raw_client::connect(client_addr_, server_addr_, port_);
    EXPECT_TRUE(c) << c.err().what();
    if (!c) return nullptr;
    if (do_open) {
      auto g = (*c)->open("disk");
      EXPECT_TRUE(g) << g.err().what();
      EXPECT_EQ(g ? g->status : -1, 0);
    }
    return std::move(*c);
  }

  uvd::test::temp_dir dir_;
  std::string server_addr_, client_addr_, path_, port_;
  std::shared_ptr<storage::Vstore> disk_;
  std::unique_ptr<server> srv_;
};

std::vector<std::byte> io_msg(uint16_t op, uint64_t id, uint64_t off, uint64_t len, std::vector<seg_ref> segs,
                              uint32_t epoch = 0, uint16_t flags = 0) {
  io_rpc r;
  r.hdr.opcode = op;
  r.hdr.id = id;
  r.hdr.epoch = epoch;
  r.offset = off;
  r.length = len;
  r.flags = flags;
  r.nseg = static_cast<uint16_t>(segs.size());
  for (size_t i = 0; i < segs.size() && i < max_segs_per_rpc; ++i) r.segs[i] = segs[i];
  std::byte tmp[msg_size];
  std::vector<std::byte> m(tmp, tmp + encode_io(r, tmp));
  if (segs.size() > max_segs_per_rpc) {  // claim more segments than the protocol allows
    uint16_t n = static_cast<uint16_t>(segs.size());
    std::memcpy(m.data() + hdr_size + 18, &n, 2);
  }
  return m;
}

uint64_t refused(const server_stats& s, refusal r) { return s.refused_by[static_cast<size_t>(r)]; }

TEST_F(RdmaServer, ManyClientsAtOnceAreServedRoundRobinAndKeepTheirData) {
  NEED_RDMA();
  server_options o;
  o.batch = 8;
  start(o);
  constexpr int nclients = 8;
  constexpr uint64_t region = 4ull << 20;
  constexpr int ops = 128;
  std::vector<std::unique_ptr<storage::Vstore>> cs;
  for (int i = 0; i < nclients; ++i) {
    cs.push_back(client("disk", "&qd=16", 32));
    ASSERT_TRUE(cs.back());
  }
  EXPECT_EQ(srv_->stats().active, uint64_t{nclients});
  std::atomic<int> go{0}, first_done{-1};
  std::vector<uint64_t> at_first_finish;
  std::mutex mu;
  std::vector<std::thread> ts;
  std::vector<int> errors(nclients, 0);
  for (int i = 0; i < nclients; ++i) {
    ts.emplace_back([&, i] {
      storage::Vstore& v = *cs[i];
      struct op {
        storage::vstore_io io;
        std::vector<std::byte> buf;
        iovec iov;
      };
      std::vector<op> slots(16);
      std::mutex m;
      std::condition_variable cv;
      int done = 0, issued = 0, inflight = 0;
      while (go.load() == 0) std::this_thread::yield();
      auto cb = [](storage::vstore_io* io, int st) {
        auto* ctx = static_cast<std::tuple<std::mutex*, std::condition_variable*, int*, int*, int*>*>(io->user);
        std::lock_guard lk(*std::get<0>(*ctx));
        ++*std::get<2>(*ctx);
        --*std::get<3>(*ctx);
        if (st) ++*std::get<4>(*ctx);
        std::get<1>(*ctx)->notify_all();
      };
      std::tuple<std::mutex*, std::condition_variable*, int*, int*, int*> ctx{&m, &cv, &done, &inflight, &errors[i]};
      std::unique_lock lk(m);
      while (done < ops) {
        while (issued < ops && inflight < 16) {
          op& s = slots[issued % 16];
          uint64_t off = i * region + (issued % 64) * 65536ull;
          s.buf.assign(65536, std::byte{0});
          uvd::test::fill_pattern(s.buf, 500 + i, off);
          s.iov = {s.buf.data(), s.buf.size()};
          s.io = {};
          s.io.opcode = core::VSTORE_OP_WRITE;
          s.io.offset = off;
          s.io.length = s.buf.size();
          s.io.iov = &s.iov;
          s.io.iovcnt = 1;
          s.io.done = cb;
          s.io.user = &ctx;
          ++issued;
          ++inflight;
          lk.unlock();
          v.submit(&s.io);
          lk.lock();
        }
        cv.wait(lk, [&] { return done >= ops || (issued < ops && inflight < 16); });
      }
      lk.unlock();
      int expected = -1;
      if (first_done.compare_exchange_strong(expected, i)) {
        std::lock_guard g(mu);
        at_first_finish = srv_->stats().per_client_rpcs;
      }
    });
  }
  go = 1;
  for (auto& t : ts) t.join();
  for (int i = 0; i < nclients; ++i) EXPECT_EQ(errors[i], 0) << "client " << i;
  // Every client's region holds its own pattern: pools never mixed.
  for (int i = 0; i < nclients; ++i) {
    std::vector<std::byte> r(64 * 65536);
    ASSERT_TRUE(cs[(i + 1) % nclients]->read(i * region, r.data(), r.size()));  // read through another client
    EXPECT_EQ(uvd::test::find_pattern_mismatch(r, 500 + i, i * region), -1) << "region " << i;
  }
  // Round-robin: when the first client finished, nobody had been starved.
  ASSERT_EQ(at_first_finish.size(), size_t{nclients});
  uint64_t mn = *std::min_element(at_first_finish.begin(), at_first_finish.end());
  uint64_t mx = *std::max_element(at_first_finish.begin(), at_first_finish.end());
  std::string counts;
  for (auto n : at_first_finish) counts += std::to_string(n) + " ";
  std::printf("served per client when the first finished: %s\n", counts.c_str());
  EXPECT_GE(mn * 4, mx) << "served per client: " << counts;
  EXPECT_EQ(srv_->stats().refused, 0u);
}

TEST_F(RdmaServer, HostileClientIsRefusedCountedAndHarmsNobody) {
  NEED_RDMA();
  start();
  auto good = client();
  ASSERT_TRUE(good);
  auto a = raw();
  auto b = raw();
  ASSERT_TRUE(a && b);
  const open_reply& ga = a->geometry();
  const open_reply& gb = b->geometry();
  ASSERT_GT(ga.nsegs, 0u);
  const uint32_t seg = ga.segment_size;
  // The two clients' pools do not overlap.
  for (uint32_t i = 0; i < ga.nsegs; ++i)
    for (uint32_t j = 0; j < gb.nsegs; ++j) {
      EXPECT_NE(ga.pool[i].handle, gb.pool[j].handle);
      bool disjoint = ga.pool[i].addr + seg <= gb.pool[j].addr || gb.pool[j].addr + seg <= ga.pool[i].addr;
      EXPECT_TRUE(disjoint) << "segment " << i << " of a overlaps segment " << j << " of b";
    }

  // The well-behaved client writes and verifies in the first 16 MiB all along.
  std::atomic<bool> stop{false};
  std::atomic<int> good_errors{0}, good_rounds{0};
  std::thread well_behaved([&] {
    std::vector<std::byte> w(256 * 1024), r(w.size());
    for (uint64_t k = 0; !stop.load() || k < 8; ++k) {
      uint64_t off = (k % 64) * w.size();
      uvd::test::fill_pattern(w, k, off);
      if (!good->write(off, w.data(), w.size()) || !good->read(off, r.data(), r.size()) || r != w) ++good_errors;
      ++good_rounds;
    }
  });

  // Everything hostile targets [32 MiB, 64 MiB), which nobody may change.
  const uint64_t canary = 32ull << 20;
  std::vector<std::vector<std::byte>> msgs;
  std::vector<int> want;
  std::mt19937_64 rng(99);
  // At least 10^5 (the default); UVD_RDMA_SWEEP changes it for a quick look.
  const int sweep = std::getenv("UVD_RDMA_SWEEP") ? std::atoi(std::getenv("UVD_RDMA_SWEEP")) : 100000;
  for (int i = 0; i < sweep; ++i) {
    uint64_t h = i % 2 ? rng() : ga.pool[i % ga.nsegs].handle + 1 + rng() % 4096;
    msgs.push_back(io_msg(OP_WRITE, 1000 + i, canary + (i % 1024) * 4096ull, 4096, {{h, 0, 4096}}));
    want.push_back(-EBADF);
  }
  for (uint32_t j = 0; j < gb.nsegs; ++j) {  // b's real handles, from a
    msgs.push_back(io_msg(OP_WRITE, 200000 + j, canary, 4096, {{gb.pool[j].handle, 0, 4096}}));
    want.push_back(-EBADF);
  }
  uint64_t h0 = ga.pool[0].handle;
  msgs.push_back(io_msg(OP_WRITE, 300001, canary, 4096, {{h0, seg - 2048, 4096}}));   // runs off the segment
  want.push_back(-EFAULT);
  msgs.push_back(io_msg(OP_READ, 300002, canary, 4096, {{h0, 0xffffffffu, 4096}}));  // wraps
  want.push_back(-EFAULT);
  msgs.push_back(io_msg(OP_WRITE, 300003, disk_size, 4096, {{h0, 0, 4096}}));       // past the end
  want.push_back(-ERANGE);
  msgs.push_back(io_msg(OP_WRITE, 300004, ~0ull - 511, 4096, {{h0, 0, 4096}}));     // wraps 2^64
  want.push_back(-ERANGE);
  std::vector<seg_ref> all;
  for (uint32_t i = 0; i < 17; ++i) all.push_back({ga.pool[i].handle, 0, seg});
  msgs.push_back(io_msg(OP_WRITE, 300005, canary, 17ull * seg, all));  // longer than max transfer
  want.push_back(-ERANGE);
  std::vector<seg_ref> too_many(40, seg_ref{h0, 0, 512});
  msgs.push_back(io_msg(OP_WRITE, 300006, canary, 40 * 512, too_many));  // more segments than the protocol has
  want.push_back(-EPROTO);
  msgs.push_back(io_msg(OP_WRITE, 300007, canary + 100, 4096, {{h0, 0, 4096}}));  // unaligned
  want.push_back(-EINVAL);
  msgs.push_back(io_msg(OP_WRITE, 300008, canary, 8192, {{h0, 0, 4096}}));  // segments short of the length
  want.push_back(-EINVAL);
  msgs.push_back(io_msg(99, 300009, canary, 4096, {{h0, 0, 4096}}));  // unknown opcode
  want.push_back(-EOPNOTSUPP);
  for (int i = 0; i < 200; ++i) {  // garbage
    std::vector<std::byte> g(1 + rng() % 2000);
    for (auto& x : g) x = std::byte(rng());
    msgs.push_back(g);
    want.push_back(-EPROTO);
  }
  const server_stats before = srv_->stats();
  auto t0 = std::chrono::steady_clock::now();
  auto replies = a->call_many(msgs);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(replies) << replies.err().what();
  std::printf("%zu hostile RPCs refused in %.1f s\n", msgs.size(), secs);
  ASSERT_EQ(replies->size(), msgs.size());
  // Match replies to requests by id (garbage has no id: its replies carry 0).
  std::map<uint64_t, int> by_id;
  int garbage_replies = 0;
  for (const reply& r : *replies) {
    if (r.hdr.id == 0) {
      ++garbage_replies;
      EXPECT_EQ(r.status, -EPROTO);
    } else {
      by_id[r.hdr.id] = r.status;
    }
  }
  EXPECT_EQ(garbage_replies, 200);
  for (size_t i = 0; i + 200 < msgs.size(); ++i) {
    auto h = decode_hdr(msgs[i]);
    ASSERT_TRUE(h);
    ASSERT_EQ(by_id.count(h->id), 1u) << "no reply for id " << h->id;
    EXPECT_EQ(by_id[h->id], want[i]) << "id " << h->id;
  }
  const server_stats after = srv_->stats();
  EXPECT_EQ(refused(after, refusal::bad_handle) - refused(before, refusal::bad_handle), uint64_t{sweep} + gb.nsegs);
  EXPECT_EQ(refused(after, refusal::segment_range) - refused(before, refusal::segment_range), 2u);
  EXPECT_EQ(refused(after, refusal::sector_range) - refused(before, refusal::sector_range), 3u);
  EXPECT_EQ(refused(after, refusal::malformed) - refused(before, refusal::malformed), 201u);
  EXPECT_EQ(refused(after, refusal::unknown_opcode) - refused(before, refusal::unknown_opcode), 1u);
  EXPECT_EQ(after.refused - before.refused, msgs.size());

  // b's memory cannot be reached with b's rkey from another connection
  // (another protection domain): the access fails and b's data stays.
  std::vector<std::byte> mine(4096, std::byte{0x5b}), back(4096);
  auto w = b->rdma_write(gb.pool[0].addr, gb.pool[0].rkey, mine.data(), 4096);
  ASSERT_TRUE(w);
  EXPECT_EQ(*w, IBV_WC_SUCCESS);
  auto c = raw();
  ASSERT_TRUE(c);
  std::vector<std::byte> evil(4096, std::byte{0xee});
  auto x = c->rdma_write(gb.pool[0].addr, gb.pool[0].rkey, evil.data(), 4096);
  ASSERT_TRUE(x);
  EXPECT_NE(*x, IBV_WC_SUCCESS) << "an RDMA WRITE with another client's rkey succeeded";
  auto rb = b->rdma_read(gb.pool[0].addr, gb.pool[0].rkey, back.data(), 4096);
  ASSERT_TRUE(rb);
  EXPECT_EQ(*rb, IBV_WC_SUCCESS);
  EXPECT_EQ(back, mine);

  stop = true;
  well_behaved.join();
  EXPECT_EQ(good_errors.load(), 0);
  EXPECT_GT(good_rounds.load(), 0);
  // Nothing landed in the canary region.
  std::vector<std::byte> r(disk_size - canary);
  ASSERT_TRUE(good->read(canary, r.data(), r.size()));
  EXPECT_TRUE(std::all_of(r.begin(), r.end(), [](std::byte v) { return v == std::byte{0}; }));
}

TEST_F(RdmaServer, FenceRefusesIoOfOlderEpochs) {
  NEED_RDMA();
  start();
  auto a = raw();
  ASSERT_TRUE(a);
  const open_reply& g = a->geometry();
  std::vector<std::byte> data(4096, std::byte{0x11});
  auto w = a->rdma_write(g.pool[0].addr, g.pool[0].rkey, data.data(), 4096);
  ASSERT_TRUE(w && *w == IBV_WC_SUCCESS);
  auto ok = a->call(io_msg(OP_WRITE, 1, 0, 4096, {{g.pool[0].handle, 0, 4096}}, 1));
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 0);
  std::vector<std::byte> f(msg_size);
  f.resize(encode_fence(2, 5, f.data()));
  auto fr = a->call(f);
  ASSERT_TRUE(fr);
  EXPECT_EQ(fr->status, 0);
  EXPECT_EQ(fr->epoch, 5u);
  auto again = a->call(f);  // not newer: refused, nothing changed
  ASSERT_TRUE(again);
  EXPECT_EQ(again->status, -ESTALE);
  auto stale = a->call(io_msg(OP_WRITE, 3, 4096, 4096, {{g.pool[0].handle, 0, 4096}}, 4));
  ASSERT_TRUE(stale);
  EXPECT_EQ(stale->status, -ESTALE);
  auto fresh = a->call(io_msg(OP_WRITE, 4, 8192, 4096, {{g.pool[0].handle, 0, 4096}}, 5));
  ASSERT_TRUE(fresh);
  EXPECT_EQ(fresh->status, 0);
  // The client's fence op (vstore_ops::fence): a query, then a newer epoch.
  auto v = client();
  ASSERT_TRUE(v);
  ASSERT_TRUE(v->can_fence());
  auto q = v->fence(0);
  ASSERT_TRUE(q) << q.err().what();
  EXPECT_EQ(*q, 5u);
  auto f6 = v->fence(6);
  ASSERT_TRUE(f6) << f6.err().what();
  auto old = a->call(io_msg(OP_WRITE, 5, 4096, 4096, {{g.pool[0].handle, 0, 4096}}, 5));
  ASSERT_TRUE(old);
  EXPECT_EQ(old->status, -ESTALE);
  // Epoch 0 means unfenced (a plain single-path client): still served.
  std::vector<std::byte> buf(4096, std::byte{0x22});
  EXPECT_TRUE(v->write(16384, buf.data(), buf.size()));
  EXPECT_EQ(refused(srv_->stats(), refusal::stale_epoch), 2u);
  // Nothing of the stale writes landed.
  std::vector<std::byte> got(4096);
  ASSERT_TRUE(disk_->read(4096, got.data(), 4096));
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_F(RdmaServer, DisconnectRevokesHandlesAndFreesThePool) {
  NEED_RDMA();
  start();
  open_reply old;
  {
    auto a = raw();
    ASSERT_TRUE(a);
    old = a->geometry();
    EXPECT_EQ(srv_->stats().active, 1u);
  }
  for (int i = 0; i < 100 && srv_->stats().active != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(srv_->stats().active, 0u) << "the disconnected client's connection was not torn down";
  auto b = raw();
  ASSERT_TRUE(b);
  std::vector<std::vector<std::byte>> msgs;
  for (uint32_t i = 0; i < old.nsegs; ++i)
    msgs.push_back(io_msg(OP_READ, 10 + i, 0, 4096, {{old.pool[i].handle, 0, 4096}}));
  auto rs = b->call_many(msgs);
  ASSERT_TRUE(rs) << rs.err().what();
  for (const reply& r : *rs) EXPECT_EQ(r.status, -EBADF);
}

TEST_F(RdmaServer, ExportUuidIsStableAcrossRestartsAndOpensTheExport) {
  NEED_RDMA();
  start();
  std::string uuid = srv_->export_ids().at(0).second;
  EXPECT_TRUE(looks_like_uuid(uuid)) << uuid;
  srv_.reset();
  start();
  EXPECT_EQ(srv_->export_ids().at(0).second, uuid) << "the UUID changed across a restart";
  auto v = client(uuid);
  ASSERT_TRUE(v);
  EXPECT_EQ(std::string(v->info().id), "rdma:uuid=" + uuid);
  auto w = client("uuid:" + uuid);
  ASSERT_TRUE(w);
  storage::open_options o;
  o.options = client_addr_.empty() ? "" : "src=" + client_addr_;
  auto missing = storage::Vstore::open(rdma_vstore_ops, server_addr_ + ":" + port_ + "/nosuch", o);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.err().errnum(), ENOENT);
}

TEST_F(RdmaServer, LargeTransfersSpanSeveralSegments) {
  NEED_RDMA();
  start();
  auto v = client("disk", "&qd=32", 64);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->info().max_transfer, 16u * 128 * 1024);
  std::vector<std::byte> w(6 << 20), r(w.size());
  uvd::test::fill_pattern(w, 3, 1 << 20);
  ASSERT_TRUE(v->write(1 << 20, w.data(), w.size()));
  ASSERT_TRUE(v->read(1 << 20, r.data(), r.size()));
  EXPECT_EQ(uvd::test::find_pattern_mismatch(r, 3, 1 << 20), -1);
}

// An export that holds every I/O until the test lets it go: what arrives at
// once is what the connection carries at once.
struct holding_disk {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<storage::vstore_io*> held;
  static void submit(void* d, storage::vstore_io* const* ios, uint32_t n) {
    auto* self = static_cast<holding_disk*>(d);
    std::lock_guard lk(self->mu);
    self->held.insert(self->held.end(), ios, ios + n);
    self->cv.notify_all();
  }
};

TEST_F(RdmaServer, OneConnectionCarriesThirtyTwoRequestsAtOnce) {
  NEED_RDMA();
  holding_disk hd;
  server_export e;
  e.name = "held";
  e.size = disk_size;
  e.block_size = 512;
  e.medium_id = "test:held";
  e.disk = &hd;
  e.submit = &holding_disk::submit;
  server_options o;
  o.listen = {server_addr_ + ":0"};
  o.exports = {e};
  auto s = server::create(o);
  ASSERT_TRUE(s) << s.err().what();
  srv_ = std::move(*s);
  ASSERT_TRUE(srv_->start());
  port_ = std::to_string(srv_->port());
  auto v = client("held", "&qd=32", 64);
  ASSERT_TRUE(v);
  struct op {
    storage::vstore_io io;
    iovec iov;
    std::vector<std::byte> buf = std::vector<std::byte>(4096);
  };
  struct counts {
    std::atomic<int> done{0}, errors{0};
  } cnt;
  std::vector<op> ops(64);
  std::vector<storage::vstore_io*> batch;
  for (int i = 0; i < 64; ++i) {
    ops[i].iov = {ops[i].buf.data(), 4096};
    ops[i].io.opcode = core::VSTORE_OP_READ;
    ops[i].io.offset = i * 4096ull;
    ops[i].io.length = 4096;
    ops[i].io.iov = &ops[i].iov;
    ops[i].io.iovcnt = 1;
    ops[i].io.user = &cnt;
    ops[i].io.done = [](storage::vstore_io* io, int st) {
      auto* c = static_cast<counts*>(io->user);
      if (st) c->errors.fetch_add(1);
      c->done.fetch_add(1);
    };
    batch.push_back(&ops[i].io);
  }
  v->submit(batch);
  std::vector<storage::vstore_io*> first;
  {
    std::unique_lock lk(hd.mu);
    hd.cv.wait_for(lk, std::chrono::seconds(30), [&] { return hd.held.size() >= 32; });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a 33rd would arrive now
    first.swap(hd.held);
  }
  EXPECT_EQ(first.size(), 32u) << "RPCs at the server at once from one connection (32 credits)";
  // Let them go (the data each read returns names its offset), then the rest.
  for (int round = 0; round < 2 && cnt.done.load() < 64; ++round) {
    for (auto* io : first) {
      std::memset(io->iov[0].iov_base, static_cast<int>(io->offset / 4096), io->iov[0].iov_len);
      io->done(io, 0);
    }
    if (round == 1) break;
    std::unique_lock lk(hd.mu);
    hd.cv.wait_for(lk, std::chrono::seconds(30), [&] { return hd.held.size() >= 32; });
    first.clear();
    first.swap(hd.held);
  }
  for (int i = 0; i < 200 && cnt.done.load() < 64; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(cnt.done.load(), 64);
  EXPECT_EQ(cnt.errors.load(), 0);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(ops[i].buf[100], std::byte(i)) << "read " << i << " got another's data";
  EXPECT_GE(srv_->stats().max_in_flight, 32u);
}

TEST_F(RdmaServer, ReadOnlyExportRefusesWritesOverTheWire) {
  NEED_RDMA();
  start({}, true);
  auto v = client();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->read_only());
  auto a = raw();
  ASSERT_TRUE(a);
  const open_reply& g = a->geometry();
  EXPECT_EQ(g.read_only, 1u);
  auto r = a->call(io_msg(OP_WRITE, 1, 0, 4096, {{g.pool[0].handle, 0, 4096}}));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, -EROFS);
  auto d = a->call(io_msg(OP_DISCARD, 2, 0, 4096, {}));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->status, -EROFS);
}

}  // namespace
