// SPDX-License-Identifier: Apache-2.0
// COW devices over one fenced overlay (cow:...?fence=1), as two `uvd serve`
// processes exporting one client's overlay hold them: each caches the header
// and bitmap, so the device a client moves to must take over the other's
// metadata when it is fenced, and the other's late writes (data and bitmap)
// must be refused. Devices are made in one process (each opens its own
// overlay descriptor and fence record, so they exclude each other as two
// processes do), across a fork with the first writer SIGKILLed mid-stream,
// and under multipath failover.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "storage/cow/cow.hpp"
#include "storage/multipath/multipath.hpp"
#include "tests/storage/cow/cut_link.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

namespace uvd::storage {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t KiB = 1024, MiB = 1024 * KiB;
constexpr uint64_t bs = 64 * KiB;           // the overlay's block size (the default)
constexpr uint64_t disk = 4 * MiB;          // 64 blocks
constexpr uint64_t slot = 8 * KiB;          // 8 slots per block, one 4 KiB write each
constexpr uint64_t region_len = 4 * KiB;
constexpr uint32_t regions = disk / slot;   // 512 distinct partial-block regions
constexpr uint64_t base_seed = 0xba5e;

// Region i: block i % 64, slot i / 64, at a sector offset inside the slot so
// both ends of the write are inside a block: every first write to a block
// copies the rest of it up from the base.
uint64_t region_offset(uint32_t i) { return (i % (disk / bs)) * bs + (i / (disk / bs)) * slot + 512; }

std::vector<std::byte> pattern(uint64_t seed, uint64_t off, uint64_t len) {
  std::vector<std::byte> v(len);
  test::fill_pattern(v, seed, off);
  return v;
}

// One request with an epoch, waited for.
int io_sync(Vstore& v, uint16_t op, uint64_t off, void* buf, uint64_t len, uint32_t epoch) {
  struct waiter {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    int status = 0;
  } w;
  iovec iov{buf, len};
  vstore_io io;
  io.opcode = op;
  io.offset = off;
  io.length = len;
  io.iov = &iov;
  io.iovcnt = 1;
  io.epoch = epoch;
  io.user = &w;
  io.done = [](vstore_io* p, int status) {
    auto* x = static_cast<waiter*>(p->user);
    std::lock_guard lk(x->mu);
    x->status = status;
    x->done = true;
    x->cv.notify_all();
  };
  v.submit(&io);
  std::unique_lock lk(w.mu);
  w.cv.wait(lk, [&] { return w.done; });
  return w.status;
}

int write_region(Vstore& v, uint64_t seed, uint32_t i, uint32_t epoch) {
  auto data = pattern(seed, region_offset(i), region_len);
  return io_sync(v, core::VSTORE_OP_WRITE, region_offset(i), data.data(), region_len, epoch);
}

class CowFence : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    base_ = dir_.file("base.img");
    overlay_ = dir_.file("client.cow");
    auto data = pattern(base_seed, 0, disk);
    int fd = ::open(base_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(disk));
    ::close(fd);
    auto h = create_cow_file(*reg_, overlay_, base_);
    ASSERT_TRUE(h) << h.err().what();
  }
  std::string fenced_uri() const { return "cow:file://" + overlay_ + "?fence=1"; }
  std::unique_ptr<Vstore> open_dev(const std::string& uri) {
    auto v = Vstore::open(*reg_, uri);
    EXPECT_TRUE(v) << uri << ": " << v.err().what();
    return v ? std::move(*v) : nullptr;
  }
  std::vector<std::byte> read_all(Vstore& v, uint32_t epoch = 0) {
    std::vector<std::byte> all(disk);
    EXPECT_EQ(io_sync(v, core::VSTORE_OP_READ, 0, all.data(), disk, epoch), 0);
    return all;
  }
  // The model: the base, with every region in `seeds` (0: untouched) written.
  static std::vector<std::byte> expected(const std::vector<uint64_t>& seeds) {
    auto img = pattern(base_seed, 0, disk);
    for (uint32_t i = 0; i < regions; ++i)
      if (seeds[i]) {
        auto d = pattern(seeds[i], region_offset(i), region_len);
        std::copy(d.begin(), d.end(), img.begin() + static_cast<std::ptrdiff_t>(region_offset(i)));
      }
    return img;
  }
  // First region whose bytes differ from the model, or -1.
  static int64_t first_bad_region(const std::vector<std::byte>& got, const std::vector<std::byte>& want) {
    for (uint32_t b = 0; b < disk / bs; ++b)
      if (!std::equal(got.begin() + b * bs, got.begin() + (b + 1) * bs, want.begin() + b * bs))
        return static_cast<int64_t>(b);
    return -1;
  }
  uint64_t allocated_blocks() {
    auto rep = inspect_cow(*reg_, overlay_, true);
    EXPECT_TRUE(rep) << rep.err().what();
    if (!rep) return 0;
    EXPECT_TRUE(rep->base_ok) << rep->base_message;
    return rep->allocated;
  }
  // `uvd cow info` on the overlay: exit 0 and the allocated count.
  void check_cow_info(uint64_t want_allocated) {
    const std::string uvd = test::build_dir() + "/uvd";
    if (::access(uvd.c_str(), X_OK) != 0) {
      ADD_FAILURE() << "the uvd binary is not built at " << uvd;
      return;
    }
    auto r = test::run_cmd({uvd, "cow", "info", overlay_});
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("allocated:        " + std::to_string(want_allocated) + " blocks"), std::string::npos)
        << "want " << want_allocated << " blocks allocated:\n" << r.output;
  }

  // multipath(link(cow d1), link(cow d2)), failover with fence=required: two
  // COW devices of the one fenced overlay as a client reaches two servers of it.
  core::result<std::unique_ptr<Vstore>> open_two_cow_paths(test::cut_link& l1, test::cut_link& l2, bool failback,
                                                           std::chrono::milliseconds check_interval,
                                                           std::shared_ptr<multipath_monitor>& mon) {
    std::vector<std::unique_ptr<Vstore>> paths;
    for (test::cut_link* l : {&l1, &l2}) {
      l->inner = open_dev(fenced_uri());
      if (!l->inner) return core::fail(EIO, "cannot open the overlay");
      auto p = Vstore::open(test::cut_link_ops, "cow", {}, nullptr, l);
      if (!p) return core::fail(p.err().errnum(), p.err().what());
      paths.push_back(std::move(*p));
    }
    multipath_options mo;
    mo.policy = mp_policy::failover;
    mo.fence = mp_fence::required;
    mo.failback = failback;
    mo.check_interval = check_interval;
    mo.io_timeout = 2s;
    return open_multipath(std::move(paths), mo, {}, &mon);
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::string base_, overlay_;
};

TEST_F(CowFence, FenceNeedsAFencedOverlayStore) {
  auto plain = open_dev("cow://" + overlay_);
  ASSERT_TRUE(plain);
  auto q = plain->fence(0);
  ASSERT_FALSE(q);
  EXPECT_EQ(q.err().errnum(), ENOTSUP);
  EXPECT_EQ(plain->fence(1).err().errnum(), ENOTSUP);
  EXPECT_FALSE(std::filesystem::exists(overlay_ + ".fence"));

  auto bad = Vstore::open(*reg_, "cow://" + overlay_ + "?fence=yes");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.err().errnum(), EINVAL);

  // Both spellings of the overlay store take the option.
  for (std::string uri : {"cow://" + overlay_ + "?fence=1", fenced_uri()}) {
    auto v = open_dev(uri);
    ASSERT_TRUE(v);
    EXPECT_TRUE(std::filesystem::exists(overlay_ + ".fence")) << uri;
    auto cur = v->fence(0);
    ASSERT_TRUE(cur) << cur.err().what();
  }
}

// The hazard: a second device opened before the first one wrote keeps the
// old bitmap; a partial write through it copies the block up from the base
// over the first device's data. (This is what the fence must prevent.)
TEST_F(CowFence, AnUnfencedSecondDeviceClobbersWithItsStaleBitmap) {
  auto d1 = open_dev("cow://" + overlay_);
  auto d2 = open_dev("cow://" + overlay_);
  ASSERT_TRUE(d1 && d2);
  ASSERT_EQ(write_region(*d1, 11, 0, 0), 0);   // allocates block 0
  ASSERT_EQ(write_region(*d2, 22, 64, 0), 0);  // block 0 again, slot 1: copy-up over region 0
  std::vector<uint64_t> seeds(regions, 0);
  seeds[0] = 11;
  seeds[64] = 22;
  d1.reset();
  d2.reset();
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), expected(seeds)), 0) << "the stale device did not clobber block 0";
}

TEST_F(CowFence, FencingTheSecondDeviceTakesOverTheFirstsBlocksAndRefusesItsLateWrites) {
  auto d1 = open_dev(fenced_uri());
  auto d2 = open_dev(fenced_uri());  // its metadata is read now, before d1 writes
  ASSERT_TRUE(d1 && d2);
  ASSERT_TRUE(d1->fence(1));
  std::vector<uint64_t> seeds(regions, 0);
  // Through d1: partial writes that allocate (copy-up) blocks 0..15, a few
  // written twice (in place), and one whole-block write.
  for (uint32_t i = 0; i < 16; ++i) {
    ASSERT_EQ(write_region(*d1, 100 + i, i, 1), 0) << i;
    seeds[i] = 100 + i;
  }
  ASSERT_EQ(write_region(*d1, 200, 64 + 3, 1), 0);
  seeds[64 + 3] = 200;
  auto whole = pattern(300, 20 * bs, bs);
  ASSERT_EQ(io_sync(*d1, core::VSTORE_OP_WRITE, 20 * bs, whole.data(), bs, 1), 0);

  // d2 takes over: its view now includes every block d1 allocated.
  auto f = d2->fence(2);
  ASSERT_TRUE(f) << f.err().what();
  EXPECT_EQ(*d2->fence(0), 2u);
  // Other partial blocks through d2: into every block d1 allocated (a copy-up
  // from a stale bitmap would wipe d1's data there), and fresh ones.
  for (uint32_t i = 0; i < 16; ++i) {
    ASSERT_EQ(write_region(*d2, 400 + i, 128 + i, 2), 0) << i;
    seeds[128 + i] = 400 + i;
  }
  ASSERT_EQ(write_region(*d2, 500, 128 + 20, 2), 0);
  seeds[128 + 20] = 500;
  for (uint32_t i = 30; i < 34; ++i) {
    ASSERT_EQ(write_region(*d2, 600 + i, i, 2), 0);
    seeds[i] = 600 + i;
  }
  auto want = expected(seeds);
  std::copy(whole.begin(), whole.end(), want.begin() + 20 * bs);
  // seeds[128 + 20] lies inside the whole block: write it into the model again.
  auto r148 = pattern(500, region_offset(148), region_len);
  std::copy(r148.begin(), r148.end(), want.begin() + static_cast<std::ptrdiff_t>(region_offset(148)));
  EXPECT_EQ(first_bad_region(read_all(*d2, 2), want), -1);

  // d1 is fenced off: writes of epoch 1 are refused (in place, and ones that
  // would allocate), and so are its reads of the overlay; nothing changes.
  EXPECT_EQ(write_region(*d1, 900, 64 + 3, 1), -ESTALE);   // allocated block, in place
  EXPECT_EQ(write_region(*d1, 901, 40, 1), -ESTALE);       // unallocated: copy-up, data, bitmap
  EXPECT_EQ(write_region(*d1, 902, 64 + 30, 1), -ESTALE);  // allocated by d2 only
  EXPECT_EQ(io_sync(*d1, core::VSTORE_OP_WRITE_ZEROES, 41 * bs, nullptr, bs, 1), -ESTALE);
  EXPECT_EQ(io_sync(*d1, core::VSTORE_OP_DISCARD, 3 * bs, nullptr, bs, 1), -ESTALE);
  std::vector<std::byte> buf(region_len);
  EXPECT_EQ(io_sync(*d1, core::VSTORE_OP_READ, region_offset(3), buf.data(), region_len, 1), -ESTALE);
  EXPECT_EQ(first_bad_region(read_all(*d2, 2), want), -1);
  // d1 itself is fenced again later (its owner takes the overlay back): it
  // sees d2's blocks, and requests of older epochs stop at the device.
  ASSERT_TRUE(d1->fence(3));
  EXPECT_EQ(first_bad_region(read_all(*d1, 3), want), -1) << "d1 after its own fence";
  EXPECT_EQ(io_sync(*d1, core::VSTORE_OP_READ, region_offset(40), buf.data(), region_len, 2), -ESTALE);
  EXPECT_EQ(write_region(*d2, 903, 64 + 31, 2), -ESTALE);
  EXPECT_EQ(first_bad_region(read_all(*d1, 3), want), -1);

  const uint64_t blocks = 16 + 1 + 4;  // d1's 16 + the whole block + d2's 30..33
  EXPECT_EQ(allocated_blocks(), blocks);
  d1.reset();
  d2.reset();
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), want), -1) << "after reopening";
}

// A write of the old epoch delayed between its durable data and its bitmap
// update (the first back end stalled there) must not land that bitmap page
// after the second back end took over and wrote the same page: it would drop
// the second one's allocation, and an acknowledged write with it.
TEST_F(CowFence, ALateBitmapUpdateOfTheOldEpochIsRefused) {
  auto rep = inspect_cow(*reg_, overlay_, false);
  ASSERT_TRUE(rep) << rep.err().what();
  test::cut_link l1;
  open_options fo;
  fo.options = "fence=1";
  auto store = Vstore::open(*reg_, "file://" + overlay_, fo);
  ASSERT_TRUE(store) << store.err().what();
  l1.inner = std::move(*store);
  auto link = Vstore::open(test::cut_link_ops, "overlay", {}, nullptr, &l1);
  ASSERT_TRUE(link) << link.err().what();
  open_options ro;
  ro.read_only = true;
  auto base = Vstore::open(*reg_, "file://" + base_, ro);
  ASSERT_TRUE(base);
  auto d1 = open_cow(std::shared_ptr<Vstore>(std::move(*base)), std::move(*link));
  ASSERT_TRUE(d1) << d1.err().what();
  auto d2 = open_dev(fenced_uri());
  ASSERT_TRUE(d2);
  ASSERT_TRUE((*d1)->fence(1));

  l1.hold_lo = rep->header.bitmap_offset;
  l1.hold_hi = rep->header.bitmap_offset + rep->header.bitmap_length;
  std::atomic<int> late_status{1};
  std::thread late([&] { late_status = write_region(**d1, 11, 0, 1); });  // allocates block 0
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (l1.held_count() == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(l1.held_count(), 1u) << "the first device's bitmap write never came";

  ASSERT_TRUE(d2->fence(2));
  ASSERT_EQ(write_region(*d2, 22, 1, 2), 0);  // allocates block 1: the same bitmap page
  l1.release_held();
  late.join();
  EXPECT_EQ(late_status.load(), -ESTALE);

  std::vector<uint64_t> seeds(regions, 0);
  seeds[1] = 22;
  EXPECT_EQ(first_bad_region(read_all(*d2, 2), expected(seeds)), -1);
  d1->reset();
  d2.reset();
  EXPECT_EQ(allocated_blocks(), 1u);
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), expected(seeds)), -1) << "after reopening";
}

// What the first writer (a child process) reports.
struct writer_report {
  std::atomic<uint32_t> acked_count{0};
  std::atomic<uint32_t> completed{0};
  std::atomic<uint8_t> sent[regions];
  std::atomic<uint8_t> acked[regions];
  std::atomic<int> error{0};
};

struct writer_io {
  vstore_io io;
  iovec iov{};
  std::vector<std::byte> data;
  uint32_t region = 0;
  writer_report* rep = nullptr;

  static void on_done(vstore_io* io, int status) {
    auto* w = static_cast<writer_io*>(io->user);
    if (status == 0) {
      w->rep->acked[w->region] = 1;
      w->rep->acked_count.fetch_add(1);
    } else {
      int expected = 0;
      w->rep->error.compare_exchange_strong(expected, status);
    }
    w->rep->completed.fetch_add(1);
  }
};

// Writes the regions of slots 0..3 (every block, in a shuffled order) at
// queue depth 8 under epoch 1 until it is killed.
[[noreturn]] void first_writer(const std::string& uri, int go_fd, writer_report* rep) {
  char c;
  if (::read(go_fd, &c, 1) != 1) _exit(10);
  auto reg = transports::make_default_registry();
  auto v = Vstore::open(*reg, uri);
  if (!v) _exit(11);
  if (!(*v)->fence(1)) _exit(12);
  std::vector<uint32_t> order;
  for (uint32_t i = 0; i < regions / 2; ++i) order.push_back(i);
  std::shuffle(order.begin(), order.end(), std::mt19937(42));
  std::vector<writer_io> ios(order.size());
  for (uint32_t k = 0; k < ios.size(); ++k) {
    writer_io& w = ios[k];
    w.region = order[k];
    w.rep = rep;
    w.data = pattern(1000 + w.region, region_offset(w.region), region_len);
    w.iov = {w.data.data(), region_len};
    w.io.opcode = core::VSTORE_OP_WRITE;
    w.io.offset = region_offset(w.region);
    w.io.length = region_len;
    w.io.iov = &w.iov;
    w.io.iovcnt = 1;
    w.io.epoch = 1;
    w.io.user = &w;
    w.io.done = &writer_io::on_done;
    while (k >= rep->completed.load() + 8) std::this_thread::sleep_for(100us);
    rep->sent[w.region] = 1;
    (*v)->submit(&w.io);
  }
  (*v)->drain();
  for (;;) pause();  // the parent kills it, maybe only after it ran out of regions
}

TEST_F(CowFence, SecondProcessTakesOverAfterTheFirstIsKilledMidWrite) {
  auto* rep = static_cast<writer_report*>(
      mmap(nullptr, sizeof(writer_report), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(rep, MAP_FAILED);
  new (rep) writer_report();
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(go[1]);
    first_writer(fenced_uri(), go[0], rep);
  }
  ::close(go[0]);
  // The second back end opens first: its cached metadata is empty.
  auto d2 = open_dev(fenced_uri());
  ASSERT_TRUE(d2);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (rep->acked_count.load() < 120 && std::chrono::steady_clock::now() < deadline && rep->error.load() == 0)
    std::this_thread::sleep_for(1ms);
  ::kill(pid, SIGKILL);
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_EQ(rep->error.load(), 0) << "a write of the first back end failed";
  ASSERT_GE(rep->acked_count.load(), 120u) << "the first back end did not get going";
  ASSERT_TRUE(WIFSIGNALED(st)) << "the first back end exited by itself (status " << st << ")";
  uint32_t sent_total = 0;
  for (uint32_t i = 0; i < regions; ++i) sent_total += rep->sent[i].load();
  RecordProperty("killed_with_in_flight", static_cast<int>(sent_total - rep->acked_count.load()));
  RecordProperty("acknowledged_before_kill", static_cast<int>(rep->acked_count.load()));

  auto f = d2->fence(2);
  ASSERT_TRUE(f) << f.err().what();
  // The other half of every block, through the second back end: each lands
  // in a block the first one allocated, or one it never reached.
  std::vector<uint64_t> seeds(regions, 0);
  for (uint32_t i = regions / 2; i < regions; ++i) {
    ASSERT_EQ(write_region(*d2, 5000 + i, i, 2), 0) << i;
    seeds[i] = 5000 + i;
  }
  auto got = read_all(*d2, 2);
  uint32_t acked = 0, landed_unacked = 0;
  std::set<uint64_t> blocks_acked, blocks_sent;
  for (uint32_t i = 0; i < regions; ++i) {
    const auto off = static_cast<std::ptrdiff_t>(region_offset(i));
    auto mine = pattern(seeds[i] ? seeds[i] : 1000 + i, region_offset(i), region_len);
    auto base = pattern(base_seed, region_offset(i), region_len);
    const bool is_new = std::equal(mine.begin(), mine.end(), got.begin() + off);
    const bool is_base = std::equal(base.begin(), base.end(), got.begin() + off);
    if (seeds[i]) {
      EXPECT_TRUE(is_new) << "region " << i << " written after the fence does not read back";
      blocks_acked.insert(region_offset(i) / bs);
    } else if (rep->acked[i].load()) {
      ++acked;
      EXPECT_TRUE(is_new) << "acknowledged region " << i << " of the killed back end was lost";
      blocks_acked.insert(region_offset(i) / bs);
    } else {
      // In flight when it died: either state, nothing else.
      EXPECT_TRUE(is_new || is_base) << "region " << i << " is neither its old nor its new content";
      if (is_new) ++landed_unacked;
      if (!rep->sent[i].load()) {
        EXPECT_TRUE(is_base) << "region " << i << " was never sent";
      }
    }
    if (rep->sent[i].load() || seeds[i]) blocks_sent.insert(region_offset(i) / bs);
  }
  EXPECT_GE(acked, 120u);
  // The gaps between regions still hold the base.
  auto want_gaps = pattern(base_seed, 0, disk);
  for (uint32_t i = 0; i < regions; ++i) {
    const auto off = static_cast<std::ptrdiff_t>(region_offset(i));
    std::copy(got.begin() + off, got.begin() + off + static_cast<std::ptrdiff_t>(region_len), want_gaps.begin() + off);
  }
  EXPECT_EQ(first_bad_region(got, want_gaps), -1) << "bytes outside every region changed";

  const uint64_t allocated = allocated_blocks();
  EXPECT_EQ(allocated, disk / bs) << "every block holds a write after the fence";
  d2.reset();
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), got), -1) << "after reopening";
  fresh.reset();
  check_cow_info(allocated);
  ::close(go[1]);
  munmap(rep, sizeof(writer_report));
}

// multipath(link(cow d1), link(cow d2)) over one fenced overlay, failover:
// the link to d1 is cut under load (its server "dies": requests already in
// d1 may still land, their answers are lost), multipath fences through d2 and
// reissues; every acknowledged write reads back, through the multipath
// device and from the overlay reopened.
TEST_F(CowFence, MultipathFailsOverBetweenTwoCowDevicesOfOneOverlay) {
  test::cut_link l1, l2;
  std::shared_ptr<multipath_monitor> mon;
  auto mp = open_two_cow_paths(l1, l2, false, 100ms, mon);
  ASSERT_TRUE(mp) << mp.err().what();
  EXPECT_EQ(mon->status().epoch, 1u);

  std::vector<uint64_t> seeds(regions, 0);
  std::vector<uint32_t> order;
  for (uint32_t i = 0; i < regions; ++i) order.push_back(i);
  std::shuffle(order.begin(), order.end(), std::mt19937(7));
  // Four writers at once; the link is cut a third of the way through.
  std::atomic<uint32_t> next{0}, done{0};
  std::atomic<int> failed{0};
  auto writer = [&] {
    for (uint32_t k; (k = next.fetch_add(1)) < regions;) {
      const uint32_t i = order[k];
      auto data = pattern(7000 + i, region_offset(i), region_len);
      auto r = (*mp)->write(region_offset(i), data.data(), region_len);
      if (!r) {
        failed = r.err().errnum();
        return;
      }
      seeds[i] = 7000 + i;
      done.fetch_add(1);
    }
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) ts.emplace_back(writer);
  while (done.load() < regions / 3 && failed.load() == 0) std::this_thread::sleep_for(1ms);
  l1.cut.store(true);
  for (auto& t : ts) t.join();
  ASSERT_EQ(failed.load(), 0) << "a write failed instead of failing over";
  auto s = mon->status();
  EXPECT_GE(s.epoch, 2u);
  EXPECT_GE(s.failovers, 1u);
  EXPECT_EQ(s.paths[0].state, path_state::failed);

  auto want = expected(seeds);
  std::vector<std::byte> got(disk);
  ASSERT_TRUE((*mp)->read(0, got.data(), disk));
  EXPECT_EQ(first_bad_region(got, want), -1);
  mp->reset();
  l1.inner.reset();
  l2.inner.reset();
  EXPECT_EQ(allocated_blocks(), disk / bs);
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), want), -1) << "after reopening";
  fresh.reset();
  check_cow_info(disk / bs);
}

// Failback over two COW devices of one overlay: d1 is cut before the first
// write, so every block is allocated through d2 while d1 still caches the
// empty bitmap of its open. The link comes back, multipath fails back to d1
// and writes other parts of the same blocks through it. Taking the I/O back
// must raise the epoch (d1 reloads its bitmap under the fence); without that
// d1 copies the base over d2's data on its "first" write to each block.
TEST_F(CowFence, FailbackFencesSoTheReturningDeviceSeesTheOthersBlocks) {
  test::cut_link l1, l2;
  std::shared_ptr<multipath_monitor> mon;
  auto mp = open_two_cow_paths(l1, l2, true, 50ms, mon);
  ASSERT_TRUE(mp) << mp.err().what();

  constexpr uint32_t per_slot = disk / bs;  // regions i and i + per_slot share a block
  std::vector<uint64_t> seeds(regions, 0);
  auto write_slot = [&](uint32_t slot_index, uint64_t seed0) {
    for (uint32_t b = 0; b < per_slot; ++b) {
      const uint32_t i = slot_index * per_slot + b;
      auto data = pattern(seed0 + i, region_offset(i), region_len);
      auto r = (*mp)->write(region_offset(i), data.data(), region_len);
      ASSERT_TRUE(r) << "region " << i << ": " << r.err().what();
      seeds[i] = seed0 + i;
    }
  };
  l1.cut.store(true);
  write_slot(0, 9000);
  if (HasFatalFailure()) return;
  auto s = mon->status();
  ASSERT_EQ(s.paths[0].state, path_state::failed);
  const uint32_t epoch_after_failover = s.epoch;

  l1.cut.store(false);
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (mon->status().paths[0].state != path_state::active && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  ASSERT_EQ(mon->status().paths[0].state, path_state::active) << "no failback within 20 s";
  write_slot(1, 9500);
  if (HasFatalFailure()) return;
  EXPECT_GT(mon->status().epoch, epoch_after_failover) << "the failback did not raise the epoch";

  auto want = expected(seeds);
  std::vector<std::byte> got(disk);
  ASSERT_TRUE((*mp)->read(0, got.data(), disk));
  EXPECT_EQ(first_bad_region(got, want), -1) << "through the multipath device after failback";
  mp->reset();
  l1.inner.reset();
  l2.inner.reset();
  auto fresh = open_dev("cow://" + overlay_);
  EXPECT_EQ(first_bad_region(read_all(*fresh), want), -1) << "after reopening";
  fresh.reset();
  check_cow_info(disk / bs);
}

}  // namespace
}  // namespace uvd::storage
