// SPDX-License-Identifier: Apache-2.0
// storage::Multipath over real, separate back ends in-process (shared_path:
// each path its own descriptor, worker and fence record handle on one image)
// with faults injected while verified I/O runs.
#include "storage/multipath/multipath.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "core/registry.hpp"
#include "storage/cow/cow.hpp"
#include "storage/fence.hpp"
#include "tests/storage/multipath/shared_path.hpp"
#include "tests/testutil.hpp"
#include "transports/file/file.hpp"
#include "transports/memory/memory.hpp"

using namespace uvd;
using namespace std::chrono_literals;
using storage::multipath_options;
using storage::path_state;
using storage::Vstore;
using storage::vstore_io;
using test::path_fault;
using test::path_faults;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr uint64_t image_size = 16ull << 20;
constexpr uint64_t bs = 4096;

struct rig {
  test::temp_dir dir;
  std::string image;
  std::vector<std::unique_ptr<path_faults>> faults;
  std::unique_ptr<Vstore> mp;
  std::shared_ptr<storage::multipath_monitor> mon;

  storage::multipath_status status() const { return mon->status(); }
  path_state state(size_t i) const { return status().paths.at(i).state; }
};

multipath_options fast_options(storage::mp_policy policy = storage::mp_policy::failover) {
  multipath_options mo;
  mo.policy = policy;
  mo.check_interval = 50ms;
  // Long enough that a loaded machine does not fake a silent path; the tests
  // about silence shorten it.
  mo.io_timeout = 1000ms;
  mo.queue_if_no_path = 10s;
  return mo;
}

void open_rig(rig& r, size_t npaths, const multipath_options& mo) {
  r.image = test::make_sparse_file(r.dir.file("disk.img"), image_size);
  std::vector<std::unique_ptr<Vstore>> paths;
  for (size_t i = 0; i < npaths; ++i) {
    r.faults.push_back(std::make_unique<path_faults>());
    r.faults.back()->client_timeout_ms = 5000;
    auto v = Vstore::open(test::shared_path_ops, r.image, {}, nullptr, r.faults.back().get());
    ASSERT_TRUE(v) << v.err().what();
    paths.push_back(std::move(*v));
  }
  auto m = storage::open_multipath(std::move(paths), mo, {}, &r.mon);
  ASSERT_TRUE(m) << m.err().what();
  r.mp = std::move(*m);
}

template <class Pred>
bool wait_for(Pred p, std::chrono::milliseconds limit) {
  auto end = clock_type::now() + limit;
  while (!p()) {
    if (clock_type::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

std::vector<std::byte> pattern(uint64_t seed, uint64_t off, size_t len = bs) {
  std::vector<std::byte> b(len);
  if (seed) test::fill_pattern(b, seed, off);
  return b;
}

// What the image file itself holds, read past every path.
std::vector<std::byte> on_disk(const std::string& image, uint64_t off, size_t len = bs) {
  std::vector<std::byte> b(len);
  int fd = ::open(image.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(pread(fd, b.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
  ::close(fd);
  return b;
}

// One asynchronous io and its completion.
struct pending_io {
  vstore_io io;
  iovec iov{};
  std::vector<std::byte> buf;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int status = 1;
  clock_type::time_point finished{};

  void submit(Vstore& v, uint16_t op, uint64_t off, std::vector<std::byte> data) {
    buf = std::move(data);
    iov = {buf.data(), buf.size()};
    io = {};
    io.opcode = op;
    io.offset = off;
    io.length = buf.size();
    io.iov = &iov;
    io.iovcnt = 1;
    io.user = this;
    io.done = [](vstore_io* i, int st) {
      auto* self = static_cast<pending_io*>(i->user);
      std::lock_guard lk(self->mu);
      self->status = st;
      self->done = true;
      self->finished = clock_type::now();
      self->cv.notify_all();
    };
    v.submit(&io);
  }
  bool wait(std::chrono::milliseconds limit) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, limit, [&] { return done; });
  }
  bool is_done() {
    std::lock_guard lk(mu);
    return done;
  }
};

// Keeps qd requests in flight: random 4 KiB writes (a new version each) and
// reads, one at a time per block, every read checked against the last
// acknowledged version of its block. Measures the longest completion gap.
class load {
 public:
  load(Vstore& v, uint64_t blocks, uint32_t qd, uint64_t seed)
      : v_(v), acked_(blocks, 0), uncertain_(blocks, 0), busy_(blocks, false), slots_(qd), rng_(seed) {}

  void run_for(std::chrono::milliseconds d) {
    auto end = clock_type::now() + d;
    std::unique_lock lk(mu_);
    auto last = clock_type::now();
    uint32_t in_flight = 0;
    for (;;) {
      const bool more = clock_type::now() < end;
      for (auto& s : slots_) {
        if (!more || s.busy) continue;
        if (!prepare(s)) break;
        ++in_flight;
        lk.unlock();
        v_.submit(&s.io);
        lk.lock();
      }
      if (in_flight == 0) break;
      cv_.wait_for(lk, 100ms, [&] { return !done_.empty(); });
      while (!done_.empty()) {
        slot* s = done_.back();
        done_.pop_back();
        auto now = clock_type::now();
        longest_gap = std::max(longest_gap, now - last);
        last = now;
        finish(*s);
        --in_flight;
      }
    }
  }

  // Every block through v, and the same bytes in the image file.
  void verify_all(Vstore& v, const std::string& image) {
    std::vector<std::byte> buf(bs);
    for (uint64_t b = 0; b < acked_.size(); ++b) {
      ASSERT_TRUE(v.read(b * bs, buf.data(), bs));
      const bool ok = buf == pattern(acked_[b], b * bs) || (uncertain_[b] && buf == pattern(uncertain_[b], b * bs));
      EXPECT_TRUE(ok) << "block " << b << " lost acknowledged version " << acked_[b];
      EXPECT_EQ(buf, on_disk(image, b * bs)) << "block " << b;
      if (!ok) return;
    }
  }

  uint64_t writes = 0, reads = 0, errors = 0, mismatches = 0;
  clock_type::duration longest_gap{};

 private:
  struct slot {
    vstore_io io;
    iovec iov{};
    std::vector<std::byte> buf;
    uint64_t block = 0, version = 0;
    bool busy = false;
    int status = 0;
    load* owner = nullptr;
  };

  bool prepare(slot& s) {
    uint64_t b = rng_() % acked_.size();
    if (busy_[b]) return false;
    busy_[b] = true;
    s.busy = true;
    s.owner = this;
    s.block = b;
    const bool write = rng_() % 2;
    s.version = write ? ++next_version_ : acked_[b];
    s.buf = write ? pattern(s.version, b * bs) : std::vector<std::byte>(bs);
    s.iov = {s.buf.data(), bs};
    s.io = {};
    s.io.opcode = write ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
    s.io.offset = b * bs;
    s.io.length = bs;
    s.io.iov = &s.iov;
    s.io.iovcnt = 1;
    s.io.user = &s;
    s.io.done = [](vstore_io* io, int st) {
      auto* sl = static_cast<slot*>(io->user);
      std::lock_guard lk(sl->owner->mu_);
      sl->status = st;
      sl->owner->done_.push_back(sl);
      sl->owner->cv_.notify_all();
    };
    return true;
  }

  void finish(slot& s) {
    const bool write = s.io.opcode == core::VSTORE_OP_WRITE;
    if (s.status != 0) {
      ++errors;
      if (write) uncertain_[s.block] = s.version;  // may or may not have landed
    } else if (write) {
      ++writes;
      acked_[s.block] = s.version;
      uncertain_[s.block] = 0;
    } else {
      ++reads;
      const bool ok = s.buf == pattern(s.version, s.block * bs) ||
                      (uncertain_[s.block] && s.buf == pattern(uncertain_[s.block], s.block * bs));
      if (!ok) ++mismatches;
    }
    busy_[s.block] = false;
    s.busy = false;
  }

  Vstore& v_;
  std::vector<uint64_t> acked_, uncertain_;
  std::vector<bool> busy_;
  std::vector<slot> slots_;
  std::mt19937_64 rng_;
  uint64_t next_version_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<slot*> done_;
};

double ms(clock_type::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

TEST(MultipathOptions, ParseBuildAndRefuse) {
  std::string uri = storage::multipath_uri({"file:///a b?engine=uring&x=1", "memory:64M"}, "policy=round-robin");
  EXPECT_EQ(uri.find('?', uri.find("path=")), std::string::npos) << uri;
  auto q = uri.find('?');
  std::vector<std::string> paths;
  auto mo = storage::parse_multipath_options(uri.substr(q + 1), &paths);
  ASSERT_TRUE(mo) << mo.err().what();
  ASSERT_EQ(paths.size(), 2u);
  EXPECT_EQ(paths[0], "file:///a b?engine=uring&x=1");
  EXPECT_EQ(paths[1], "memory:64M");
  EXPECT_EQ(mo->policy, storage::mp_policy::round_robin);
  auto full = storage::parse_multipath_options(
      "path=memory:1M&queue_if_no_path=500ms&check_interval=2s&io_timeout=1m&fence=off&failback=manual", &paths);
  ASSERT_TRUE(full);
  EXPECT_EQ(full->queue_if_no_path, 500ms);
  EXPECT_EQ(full->check_interval, 2s);
  EXPECT_EQ(full->io_timeout, 60s);
  EXPECT_EQ(full->fence, storage::mp_fence::off);
  EXPECT_FALSE(full->failback);
  for (const char* bad : {"", "policy=round-robin", "path=memory:1M&policy=random", "path=memory:1M&bogus=1",
                          "path=memory:1M&io_timeout=0", "path=memory:1M&queue_if_no_path=5h", "path=%zz"}) {
    auto r = storage::parse_multipath_options(bad, &paths);
    EXPECT_FALSE(r) << bad;
  }
}

TEST(MultipathOpen, RefusesPathsToDifferentMedia) {
  test::temp_dir dir;
  auto reg = std::make_unique<core::registry>();
  ASSERT_TRUE(reg->add_vstore(memory::memory_vstore_ops));
  ASSERT_TRUE(reg->add_vstore(storage::multipath_vstore_ops));
  ASSERT_TRUE(reg->add_vstore(test::shared_path_ops));
  std::string a = test::make_sparse_file(dir.file("a.img"), image_size);
  std::string b = test::make_sparse_file(dir.file("b.img"), image_size);
  auto two = Vstore::open(*reg, storage::multipath_uri({"shared-path:" + a, "shared-path:" + b}));
  ASSERT_FALSE(two);
  EXPECT_EQ(two.err().errnum(), EMEDIUMTYPE) << two.err().what();
  auto sizes = Vstore::open(*reg, storage::multipath_uri({"memory:1M", "memory:2M"}, "check_id=0"));
  ASSERT_FALSE(sizes);
  EXPECT_NE(sizes.err().message.find("not one medium"), std::string::npos) << sizes.err().what();
  auto need = Vstore::open(*reg, storage::multipath_uri({"memory:1M"}, "fence=required"));
  ASSERT_FALSE(need);
  EXPECT_EQ(need.err().errnum(), ENOTSUP);
  // By URI through the registry: two back ends on one image, fenced.
  auto ok = Vstore::open(*reg, storage::multipath_uri({"shared-path:" + a, "shared-path:" + a}, "policy=round-robin"));
  ASSERT_TRUE(ok) << ok.err().what();
  auto data = pattern(77, 0, 64 * 1024);
  ASSERT_TRUE((*ok)->write(0, data.data(), data.size()));
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE((*ok)->read(0, back.data(), back.size()));
  EXPECT_EQ(back, data);
  EXPECT_EQ(on_disk(a, 0, data.size()), data);
  auto rec = storage::fence_record::open(storage::fence_record::path_for(a));
  ASSERT_TRUE(rec);
  EXPECT_EQ(*(*rec)->current(), 1u) << "opening takes the export with a fresh epoch";
}

TEST(VstoreOpsAbi, ATableBuiltBeforeFenceLoadsWithoutIt) {
  core::registry reg;
  core::vstore_ops t = test::shared_path_ops;
  t.name = "older";
  t.struct_size = offsetof(core::vstore_ops, fence);
  ASSERT_TRUE(reg.add_vstore(t));
  auto ops = reg.vstore("older");
  ASSERT_TRUE(ops);
  EXPECT_EQ((*ops)->fence, nullptr);
  test::temp_dir dir;
  auto v = Vstore::open(**ops, test::make_sparse_file(dir.file("d.img"), image_size), {});
  ASSERT_TRUE(v);
  EXPECT_FALSE((*v)->can_fence());
  EXPECT_EQ((*v)->fence(1).err().errnum(), ENOTSUP);
}

TEST(Multipath, RoundRobinSpreadsIoFailoverOnlyDoesNot) {
  for (auto policy : {storage::mp_policy::round_robin, storage::mp_policy::failover}) {
    rig r;
    open_rig(r, 2, fast_options(policy));
    ASSERT_TRUE(r.mp);
    load l(*r.mp, 512, 16, 1);
    l.run_for(400ms);
    EXPECT_EQ(l.errors + l.mismatches, 0u);
    uint64_t w0 = r.faults[0]->writes, w1 = r.faults[1]->writes;
    ASSERT_GT(w0 + w1, 50u);
    if (policy == storage::mp_policy::round_robin) {
      EXPECT_EQ(r.state(0), path_state::active);
      EXPECT_EQ(r.state(1), path_state::active);
      EXPECT_GT(w0 * 10, (w0 + w1) * 3) << w0 << " / " << w1;
      EXPECT_GT(w1 * 10, (w0 + w1) * 3) << w0 << " / " << w1;
    } else {
      EXPECT_EQ(r.state(0), path_state::active);
      EXPECT_EQ(r.state(1), path_state::standby);
      EXPECT_EQ(w1, 0u);
    }
    l.verify_all(*r.mp, r.image);
  }
}

TEST(Multipath, FailsOverUnderLoadAndFailsBack) {
  rig r;
  open_rig(r, 2, fast_options());
  ASSERT_TRUE(r.mp);
  load l(*r.mp, 1024, 32, 2);
  l.run_for(200ms);
  r.faults[0]->set(path_fault::fail);
  l.run_for(400ms);
  EXPECT_EQ(r.state(0), path_state::failed);
  EXPECT_EQ(r.state(1), path_state::active);
  const uint64_t on1 = r.faults[1]->writes;
  EXPECT_GT(on1, 0u);
  r.faults[0]->set(path_fault::none);
  ASSERT_TRUE(wait_for([&] { return r.state(0) == path_state::active; }, 2s)) << r.status().to_string();
  const uint64_t on0 = r.faults[0]->writes;
  l.run_for(300ms);
  EXPECT_GT(r.faults[0]->writes, on0) << "I/O went back to the preferred path";
  EXPECT_EQ(r.state(1), path_state::standby);
  EXPECT_EQ(l.errors, 0u);
  EXPECT_EQ(l.mismatches, 0u);
  auto st = r.status();
  EXPECT_GE(st.failovers, 1u);
  EXPECT_GE(st.fences, 2u);
  std::printf("failover on a failing path: longest gap between completions %.1f ms, %lu writes, %lu reads\n",
              ms(l.longest_gap), static_cast<unsigned long>(l.writes), static_cast<unsigned long>(l.reads));
  l.verify_all(*r.mp, r.image);
}

// A path whose device died for good (a transport that does not reconnect,
// like rdma after its server was killed) is closed and opened again from its
// URI, with backoff while the server is away, and fails back once the
// reopened device passes a check. Each path reaches the image through its own
// folder link: removing the link makes the server unreachable (open fails).
TEST(Multipath, ADeadPathIsReopenedFromItsUriAndFailsBack) {
  test::temp_dir dir;
  const std::string real = dir.file("real");
  ASSERT_EQ(::mkdir(real.c_str(), 0755), 0);
  const std::string image = test::make_sparse_file(real + "/disk.img", image_size);
  const std::vector<std::string> links = {dir.file("a"), dir.file("b")};
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(test::shared_path_ops));
  path_faults faults[2];
  std::vector<std::unique_ptr<Vstore>> paths;
  std::vector<std::string> uris;
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_EQ(::symlink(real.c_str(), links[i].c_str()), 0);
    faults[i].client_timeout_ms = 5000;
    auto v = Vstore::open(test::shared_path_ops, links[i] + "/disk.img", {}, nullptr, &faults[i]);
    ASSERT_TRUE(v) << v.err().what();
    paths.push_back(std::move(*v));
    uris.push_back("shared-path://" + links[i] + "/disk.img");
  }
  auto mo = fast_options();
  mo.reopen_max = 200ms;
  std::shared_ptr<storage::multipath_monitor> mon;
  auto m = storage::open_multipath(std::move(paths), mo, {}, &mon, storage::path_reopen{&reg, uris, {}});
  ASSERT_TRUE(m) << m.err().what();
  load l(**m, 1024, 32, 7);
  l.run_for(200ms);

  // Server A goes away: its connection closes for good, and it cannot be reached.
  ASSERT_EQ(::unlink(links[0].c_str()), 0);
  faults[0].set(path_fault::closed);
  l.run_for(700ms);
  auto st = mon->status();
  EXPECT_EQ(st.paths[0].state, path_state::failed) << st.to_string();
  EXPECT_EQ(st.paths[1].state, path_state::active) << st.to_string();
  // At once, then 50, 100, 200, 200... ms: a few attempts, not one per tick.
  EXPECT_GE(st.paths[0].reopens, 2u) << st.to_string();
  EXPECT_LE(st.paths[0].reopens, 8u) << st.to_string();
  EXPECT_NE(st.paths[0].last_error.find("reopen"), std::string::npos) << st.to_string();

  // It is back: the next attempt opens it, its check passes, it takes the I/O back.
  ASSERT_EQ(::symlink(real.c_str(), links[0].c_str()), 0);
  ASSERT_TRUE(wait_for([&] { return mon->status().paths[0].state == path_state::active; }, 3s))
      << mon->status().to_string();
  const uint64_t before = mon->status().paths[0].requests;
  l.run_for(300ms);
  st = mon->status();
  EXPECT_GT(st.paths[0].requests, before) << "the reopened path carries I/O again";
  EXPECT_EQ(st.paths[1].state, path_state::standby);
  EXPECT_EQ(l.errors, 0u);
  EXPECT_EQ(l.mismatches, 0u);
  l.verify_all(**m, image);
  std::printf("dead path reopened after %lu attempts; longest gap between completions %.1f ms\n",
              static_cast<unsigned long>(st.paths[0].reopens), ms(l.longest_gap));
}

// A path that only failed (its device still answers) is never reopened.
TEST(Multipath, ALivePathIsNotReopened) {
  test::temp_dir dir;
  const std::string image = test::make_sparse_file(dir.file("disk.img"), image_size);
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(test::shared_path_ops));
  path_faults faults[2];
  std::vector<std::unique_ptr<Vstore>> paths;
  std::vector<std::string> uris;
  for (size_t i = 0; i < 2; ++i) {
    faults[i].client_timeout_ms = 5000;
    paths.push_back(std::move(*Vstore::open(test::shared_path_ops, image, {}, nullptr, &faults[i])));
    uris.push_back("shared-path://" + image);
  }
  std::shared_ptr<storage::multipath_monitor> mon;
  auto m = storage::open_multipath(std::move(paths), fast_options(), {}, &mon, storage::path_reopen{&reg, uris, {}});
  ASSERT_TRUE(m) << m.err().what();
  load l(**m, 256, 16, 3);
  faults[0].set(path_fault::silent);  // stopped: its check hangs, nothing fails with a path error
  l.run_for(1500ms);
  EXPECT_EQ(mon->status().paths[0].state, path_state::failed);
  faults[0].set(path_fault::none);
  ASSERT_TRUE(wait_for([&] { return mon->status().paths[0].state == path_state::active; }, 3s))
      << mon->status().to_string();
  EXPECT_EQ(mon->status().paths[0].reopens, 0u) << "a silent path holds requests: it must not be closed";
  EXPECT_EQ(l.errors, 0u);
  l.verify_all(**m, image);
}

// The path stops answering (SIGSTOP-like). The device must detect it, fence,
// reissue the write elsewhere; when the path wakes, its copy of the old
// write must be refused, so the newer write survives.
TEST(Multipath, SilentPathIsFencedAndItsLateWriteIsRefused) {
  rig r;
  auto mo = fast_options();
  mo.io_timeout = 250ms;
  open_rig(r, 2, mo);
  ASSERT_TRUE(r.mp);
  const uint64_t off = 40 * bs;
  ASSERT_TRUE(r.mp->write(off, pattern(1, off).data(), bs));
  const uint32_t epoch0 = r.status().epoch;
  const uint64_t writes0 = r.faults[0]->writes;
  r.faults[0]->set(path_fault::silent);
  pending_io w1;
  auto t0 = clock_type::now();
  w1.submit(*r.mp, core::VSTORE_OP_WRITE, off, pattern(2, off));
  ASSERT_TRUE(w1.wait(5s)) << r.status().to_string();
  EXPECT_EQ(w1.status, 0);
  std::printf("failover on a silent path: write completed after %.1f ms (io_timeout 250 ms)\n", ms(w1.finished - t0));
  EXPECT_EQ(r.state(0), path_state::failed);
  EXPECT_GT(r.status().epoch, epoch0);
  ASSERT_TRUE(r.mp->write(off, pattern(3, off).data(), bs));  // the newer write, through path 1
  EXPECT_EQ(r.faults[0]->refused_writes, 0u);
  r.faults[0]->set(path_fault::none);  // the path wakes up with the old write in hand
  ASSERT_TRUE(wait_for([&] { return r.faults[0]->refused_writes >= 1; }, 3s)) << "the late write was not refused";
  EXPECT_EQ(r.faults[0]->writes, writes0) << "the silent path ran a write after it was fenced";
  std::vector<std::byte> back(bs);
  ASSERT_TRUE(r.mp->read(off, back.data(), bs));
  EXPECT_EQ(back, pattern(3, off));
  EXPECT_EQ(on_disk(r.image, off), pattern(3, off));
  ASSERT_TRUE(wait_for([&] { return r.state(0) == path_state::active; }, 3s)) << r.status().to_string();
  EXPECT_TRUE(wait_for([&] { return r.status().paths[0].abandoned == 0; }, 3s));
}

// Without fencing the device cannot make reissue safe, so a silent path's
// request is never reissued: it waits for the path.
TEST(Multipath, WithoutFencingASilentPathsRequestWaitsForIt) {
  rig r;
  auto mo = fast_options();
  mo.fence = storage::mp_fence::off;
  mo.io_timeout = 250ms;
  open_rig(r, 2, mo);
  ASSERT_TRUE(r.mp);
  const uint64_t off = 8 * bs;
  r.faults[0]->set(path_fault::silent);
  pending_io w1;
  w1.submit(*r.mp, core::VSTORE_OP_WRITE, off, pattern(5, off));
  std::this_thread::sleep_for(700ms);
  EXPECT_FALSE(w1.is_done());
  EXPECT_EQ(r.state(0), path_state::failed);
  ASSERT_TRUE(r.mp->write(16 * bs, pattern(6, 16 * bs).data(), bs));  // new I/O goes to path 1
  r.faults[0]->set(path_fault::none);
  ASSERT_TRUE(w1.wait(3s));
  EXPECT_EQ(w1.status, 0);
  EXPECT_EQ(on_disk(r.image, off), pattern(5, off));
}

// A connection reset whose write still runs on the server later: with
// fencing it is refused; without, it overwrites the newer data (which is
// the hazard fencing exists for).
TEST(Multipath, AWriteThatLandsLateIsRefusedOnlyWithFencing) {
  for (bool fencing : {true, false}) {
    rig r;
    auto mo = fast_options();
    if (!fencing) mo.fence = storage::mp_fence::off;
    open_rig(r, 2, mo);
    ASSERT_TRUE(r.mp);
    const uint64_t off = 3 * bs;
    r.faults[0]->write_delay_ms = 800;  // lands well after the newer write
    r.faults[0]->set(path_fault::fail_late);
    ASSERT_TRUE(r.mp->write(off, pattern(10, off).data(), bs));  // reset on path 0, reissued on path 1
    ASSERT_TRUE(r.mp->write(off, pattern(11, off).data(), bs));  // newer, on path 1
    r.faults[0]->set(path_fault::none);
    // The old write comes out of path 0's server either way: refused, or run.
    ASSERT_TRUE(wait_for([&] { return r.faults[0]->writes + r.faults[0]->refused_writes >= 1; }, 5s));
    if (fencing) {
      EXPECT_EQ(r.faults[0]->refused_writes, 1u);
      EXPECT_EQ(r.faults[0]->writes, 0u);
      EXPECT_EQ(on_disk(r.image, off), pattern(11, off));
      std::vector<std::byte> back(bs);
      ASSERT_TRUE(r.mp->read(off, back.data(), bs));
      EXPECT_EQ(back, pattern(11, off));
    } else {
      EXPECT_EQ(r.faults[0]->refused_writes, 0u);
      EXPECT_EQ(on_disk(r.image, off), pattern(10, off)) << "the late write should have landed without fencing";
    }
  }
}

TEST(Multipath, QueueIfNoPathIsBounded) {
  rig r;
  auto mo = fast_options();
  mo.queue_if_no_path = 300ms;
  open_rig(r, 2, mo);
  ASSERT_TRUE(r.mp);
  auto t0 = clock_type::now();  // no path can have failed before this
  r.faults[0]->set(path_fault::fail);
  r.faults[1]->set(path_fault::fail);
  pending_io w;
  w.submit(*r.mp, core::VSTORE_OP_WRITE, 0, pattern(1, 0));
  ASSERT_TRUE(w.wait(5s));
  EXPECT_EQ(w.status, -ENOLINK);
  EXPECT_GE(w.finished - t0, 300ms);
  EXPECT_LT(w.finished - t0, 2s);
  std::printf("queue_if_no_path=300ms: failed after %.1f ms\n", ms(w.finished - t0));
  pending_io fast;
  t0 = clock_type::now();
  fast.submit(*r.mp, core::VSTORE_OP_READ, 0, std::vector<std::byte>(bs));
  ASSERT_TRUE(fast.wait(2s));
  EXPECT_EQ(fast.status, -ENOLINK);
  EXPECT_LT(fast.finished - t0, 250ms) << "after the bound, new requests fail at once";
  EXPECT_GE(r.status().no_path_failed, 2u);
  // A path returns: requests work again, and one queued meanwhile waits for it.
  r.faults[1]->set(path_fault::none);
  ASSERT_TRUE(wait_for([&] { return r.state(1) != path_state::failed; }, 2s));
  ASSERT_TRUE(r.mp->write(0, pattern(2, 0).data(), bs));
  r.faults[1]->set(path_fault::fail);
  ASSERT_TRUE(wait_for([&] { return r.state(1) == path_state::failed; }, 2s));
  pending_io queued;
  queued.submit(*r.mp, core::VSTORE_OP_WRITE, 0, pattern(3, 0));
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(queued.is_done());
  r.faults[0]->set(path_fault::none);
  ASSERT_TRUE(queued.wait(3s));
  EXPECT_EQ(queued.status, 0);
  EXPECT_EQ(on_disk(r.image, 0), pattern(3, 0));
}

TEST(Multipath, MediaErrorIsReturnedNotFailedOver) {
  rig r;
  open_rig(r, 2, fast_options());
  ASSERT_TRUE(r.mp);
  r.faults[0]->eio_offset = 5 * bs + 100;
  r.faults[1]->eio_offset = 5 * bs + 100;
  std::vector<std::byte> buf(bs);
  auto rd = r.mp->read(5 * bs, buf.data(), bs);
  ASSERT_FALSE(rd);
  EXPECT_EQ(rd.err().errnum(), EIO);
  auto st = r.status();
  EXPECT_EQ(st.failovers, 0u);
  EXPECT_EQ(st.paths[0].state, path_state::active);
  EXPECT_TRUE(r.mp->read(6 * bs, buf.data(), bs));
}

// One owner at a time, like a SCSI reservation: a second device on the same
// export fences the first out; the first's writes can no longer land.
TEST(Multipath, ASecondOwnerFencesTheFirstOut) {
  rig r;
  open_rig(r, 2, fast_options());
  ASSERT_TRUE(r.mp);
  ASSERT_TRUE(r.mp->write(0, pattern(1, 0).data(), bs));
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(storage::multipath_vstore_ops));
  ASSERT_TRUE(reg.add_vstore(test::shared_path_ops));
  auto second = Vstore::open(reg, storage::multipath_uri({"shared-path:" + r.image}));
  ASSERT_TRUE(second) << second.err().what();
  ASSERT_TRUE((*second)->write(0, pattern(2, 0).data(), bs));
  auto late = r.mp->write(0, pattern(3, 0).data(), bs);
  ASSERT_FALSE(late);
  EXPECT_EQ(late.err().errnum(), EBADE) << late.err().what();
  EXPECT_EQ(on_disk(r.image, 0), pattern(2, 0));
  auto again = r.mp->write(bs, pattern(4, bs).data(), bs);
  EXPECT_FALSE(again) << "a preempted device stays fenced out";
  std::vector<std::byte> back(bs);
  ASSERT_TRUE((*second)->read(0, back.data(), bs));
  EXPECT_EQ(back, pattern(2, 0));
}

// The stack cow(multipath(path, path)): a guest's overlay reached over two
// back ends, one of which goes silent and then fails, under verified load.
TEST(Multipath, CowOverMultipathSurvivesFailover) {
  test::temp_dir dir;
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(file::file_vstore_ops));
  const std::string base_path = dir.file("base.img");
  {
    int fd = ::open(base_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    for (uint64_t off = 0; off < image_size; off += 1 << 20) {
      auto chunk = pattern(0xba5e, off, 1 << 20);
      ASSERT_EQ(pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)), static_cast<ssize_t>(chunk.size()));
    }
    ::close(fd);
  }
  const std::string overlay_path = dir.file("guest.cow");
  ASSERT_TRUE(storage::create_cow_file(reg, overlay_path, "file://" + base_path));
  std::vector<std::unique_ptr<path_faults>> faults;
  std::vector<std::unique_ptr<Vstore>> paths;
  for (int i = 0; i < 2; ++i) {
    faults.push_back(std::make_unique<path_faults>());
    auto v = Vstore::open(test::shared_path_ops, overlay_path, {}, nullptr, faults.back().get());
    ASSERT_TRUE(v) << v.err().what();
    paths.push_back(std::move(*v));
  }
  auto mo = fast_options();
  mo.io_timeout = 250ms;
  std::shared_ptr<storage::multipath_monitor> mon;
  auto overlay = storage::open_multipath(std::move(paths), mo, {}, &mon);
  ASSERT_TRUE(overlay) << overlay.err().what();
  storage::open_options ro;
  ro.read_only = true;
  auto base = Vstore::open(reg, "file://" + base_path, ro);
  ASSERT_TRUE(base);
  auto cow = storage::open_cow(std::shared_ptr<Vstore>(std::move(*base)), std::move(*overlay));
  ASSERT_TRUE(cow) << cow.err().what();
  // The first 4 MiB of the guest disk: writes go to the overlay through the
  // paths, unwritten blocks read the base's pattern.
  const uint64_t blocks = 1024;
  std::vector<uint64_t> version(blocks, 0);
  std::mt19937_64 rng(7);
  auto expect = [&](uint64_t b) { return version[b] ? pattern(version[b], b * bs) : pattern(0xba5e, b * bs); };
  uint64_t next = 1;
  auto t_end = clock_type::now() + 1500ms;
  int phase = 0;
  auto t0 = clock_type::now();
  std::vector<std::byte> buf(bs);
  while (clock_type::now() < t_end) {
    auto since = clock_type::now() - t0;
    if (phase == 0 && since > 200ms) faults[0]->set(path_fault::silent), phase = 1;
    if (phase == 1 && since > 700ms) faults[0]->set(path_fault::none), phase = 2;
    if (phase == 2 && since > 1000ms) faults[1]->set(path_fault::fail), phase = 3;
    uint64_t b = rng() % blocks;
    if (rng() % 2) {
      uint64_t v = next++;
      ASSERT_TRUE((*cow)->write(b * bs, pattern(v, b * bs).data(), bs));
      version[b] = v;
    } else {
      ASSERT_TRUE((*cow)->read(b * bs, buf.data(), bs));
      ASSERT_EQ(buf, expect(b)) << "block " << b;
    }
  }
  faults[1]->set(path_fault::none);
  auto st = mon->status();
  EXPECT_GE(st.failovers, 2u) << st.to_string();
  for (uint64_t b = 0; b < blocks; ++b) {
    ASSERT_TRUE((*cow)->read(b * bs, buf.data(), bs));
    ASSERT_EQ(buf, expect(b)) << "block " << b;
  }
}

// Hundreds of random faults on three paths while verified I/O runs; no
// acknowledged write may be lost and no read may return stale data.
TEST(Multipath, NoAcknowledgedWriteLostAcrossRandomFailures) {
  uint64_t seed = 0x5eed;
  if (const char* s = std::getenv("UVD_MP_SEED")) seed = std::strtoull(s, nullptr, 0);
  std::printf("seed %#llx (set UVD_MP_SEED to replay)\n", static_cast<unsigned long long>(seed));
  rig r;
  auto mo = fast_options(storage::mp_policy::round_robin);
  mo.io_timeout = 150ms;
  mo.check_interval = 30ms;
  mo.queue_if_no_path = 30s;
  open_rig(r, 3, mo);
  ASSERT_TRUE(r.mp);
  for (auto& f : r.faults) {
    f->client_timeout_ms = 1000;
    f->fence_timeout_ms = 200;
  }
  std::atomic<bool> stop{false};
  int events = 0;
  std::thread chaos([&] {
    std::mt19937_64 rng(seed);
    const path_fault kinds[] = {path_fault::none,      path_fault::none,   path_fault::fail,
                                path_fault::fail_late, path_fault::silent, path_fault::closed};
    while (!stop && events < 300) {
      std::this_thread::sleep_for(std::chrono::milliseconds(4 + rng() % 20));
      size_t p = rng() % r.faults.size();
      path_fault k = kinds[rng() % std::size(kinds)];
      r.faults[p]->write_delay_ms = k == path_fault::fail_late ? static_cast<uint32_t>(rng() % 100) : 0;
      r.faults[p]->set(k);
      // Keep one path healthy most of the time so the run makes progress.
      size_t healthy = 0;
      for (auto& f : r.faults) healthy += f->get() == path_fault::none;
      if (healthy == 0 && rng() % 4) r.faults[(p + 1) % r.faults.size()]->set(path_fault::none);
      ++events;
    }
    for (auto& f : r.faults) {
      f->write_delay_ms = 0;
      f->set(path_fault::none);
    }
  });
  load l(*r.mp, 256, 32, seed);
  while (events < 300) l.run_for(200ms);
  stop = true;
  chaos.join();
  l.run_for(300ms);
  r.mp->drain();
  auto st = r.status();
  uint64_t refused = 0, fences = 0;
  for (auto& f : r.faults) {
    refused += f->refused;
    fences += f->fences;
  }
  std::printf("%d faults: %lu writes, %lu reads acknowledged; %lu failovers, %lu reissued, %lu fences, %lu stale "
              "requests refused by the back ends; longest gap %.1f ms\n",
              events, static_cast<unsigned long>(l.writes), static_cast<unsigned long>(l.reads),
              static_cast<unsigned long>(st.failovers), static_cast<unsigned long>(st.reissued),
              static_cast<unsigned long>(fences), static_cast<unsigned long>(refused), ms(l.longest_gap));
  EXPECT_EQ(l.mismatches, 0u) << "a read returned stale data";
  EXPECT_EQ(l.errors, 0u);
  EXPECT_GT(st.failovers, 20u);
  EXPECT_GT(l.writes, 200u);
  // Let late requests of the fenced epochs run out, then check the medium.
  std::this_thread::sleep_for(300ms);
  l.verify_all(*r.mp, r.image);
}

}  // namespace
