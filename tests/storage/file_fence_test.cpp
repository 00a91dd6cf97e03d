// SPDX-License-Identifier: Apache-2.0
// The file transport's fence (fence=1): two processes serve one image, as two
// `uvd serve` back ends do, and share its epoch record. A write of a stale
// epoch is refused and changes nothing; an advance waits for the older writes
// another process still has in flight (that process is stopped while its
// writes sit in its engine's queue), so they have all landed when it returns.
// Without fence=1 the device does not fence, and multipath says so.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "storage/fence.hpp"
#include "storage/multipath/multipath.hpp"
#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "transports/file/file.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t mib = 1 << 20;

core::result<std::unique_ptr<storage::Vstore>> open_file(const std::string& img, const std::string& options,
                                                          uint32_t qd = 64) {
  storage::open_options oo;
  oo.options = options;
  oo.queue_depth = qd;
  return storage::Vstore::open(file::file_vstore_ops, img, oo);
}

// Requests carrying an epoch, waited for together.
struct batch {
  struct one {
    storage::vstore_io io;
    iovec iov{};
    batch* b = nullptr;
    int status = 1;  // 1: not completed yet
  };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<one> ios;
  size_t left = 0;

  explicit batch(size_t n) : ios(n) {}
  static void on_done(storage::vstore_io* io, int status) {
    auto* o = static_cast<one*>(io->user);
    std::lock_guard lk(o->b->mu);
    o->status = status;
    if (--o->b->left == 0) o->b->cv.notify_all();
  }
  void add(size_t i, uint16_t op, uint64_t off, void* buf, uint64_t len, uint32_t epoch) {
    one& o = ios[i];
    o.b = this;
    o.iov = {buf, len};
    o.io = {};
    o.io.opcode = op;
    o.io.offset = off;
    o.io.length = len;
    o.io.iov = &o.iov;
    o.io.iovcnt = 1;
    o.io.epoch = epoch;
    o.io.done = &batch::on_done;
    o.io.user = &o;
  }
  void submit(storage::Vstore& v) {
    std::vector<storage::vstore_io*> p;
    for (auto& o : ios) p.push_back(&o.io);
    {
      std::lock_guard lk(mu);
      left = ios.size();
    }
    v.submit(p);
  }
  void wait() {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return left == 0; });
  }
};

int write_sync(storage::Vstore& v, uint64_t off, void* buf, uint64_t len, uint32_t epoch) {
  batch b(1);
  b.add(0, core::VSTORE_OP_WRITE, off, buf, len, epoch);
  b.submit(v);
  b.wait();
  return b.ios[0].status;
}

std::vector<unsigned char> read_file(const std::string& path, uint64_t off, uint64_t len) {
  std::vector<unsigned char> out(len);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(pread(fd, out.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
  ::close(fd);
  return out;
}

bool all_bytes(const std::vector<unsigned char>& v, unsigned char c) {
  for (unsigned char x : v)
    if (x != c) return false;
  return true;
}

void make_image(const std::string& path, uint64_t bytes) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
  ::close(fd);
}

TEST(FileFence, WithoutTheOptionTheDeviceDoesNotFenceAndMultipathSaysSo) {
  test::temp_dir dir;
  const std::string img = dir.file("disk.img");
  make_image(img, 4 * mib);
  auto v = open_file(img, "");
  ASSERT_TRUE(v) << v.err().what();
  auto q = (*v)->fence(0);
  ASSERT_FALSE(q);
  EXPECT_EQ(q.err().errnum(), ENOTSUP);
  EXPECT_NE(::access((img + ".fence").c_str(), F_OK), 0) << "a device without fence=1 made a record";

  auto bad = open_file(img, "fence=maybe");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.err().errnum(), EINVAL);

  std::vector<std::unique_ptr<storage::Vstore>> paths;
  paths.push_back(std::move(*v));
  auto w = open_file(img, "engine=threads");
  ASSERT_TRUE(w);
  paths.push_back(std::move(*w));
  storage::multipath_options mo;
  std::shared_ptr<storage::multipath_monitor> mon;
  auto mp = storage::open_multipath(std::move(paths), mo, {}, &mon);
  ASSERT_TRUE(mp) << mp.err().what();
  EXPECT_FALSE(mon->status().fencing);
  mp->reset();

  std::vector<std::unique_ptr<storage::Vstore>> again;
  again.push_back(std::move(*open_file(img, "")));
  mo.fence = storage::mp_fence::required;
  auto req = storage::open_multipath(std::move(again), mo);
  ASSERT_FALSE(req);
  EXPECT_EQ(req.err().errnum(), ENOTSUP);
}

TEST(FileFence, MultipathOverTwoFencedFileEnginesTakesTheExport) {
  test::temp_dir dir;
  const std::string img = dir.file("disk.img");
  make_image(img, 4 * mib);
  auto open_mp = [&](std::shared_ptr<storage::multipath_monitor>* mon) {
    std::vector<std::unique_ptr<storage::Vstore>> paths;
    paths.push_back(std::move(*open_file(img, "fence=1")));
    paths.push_back(std::move(*open_file(img, "fence=1&engine=threads")));
    return storage::open_multipath(std::move(paths), {}, {}, mon);
  };
  std::shared_ptr<storage::multipath_monitor> m1, m2;
  auto first = open_mp(&m1);
  ASSERT_TRUE(first) << first.err().what();
  EXPECT_TRUE(m1->status().fencing);
  EXPECT_EQ(m1->status().epoch, 1u);
  std::vector<unsigned char> buf(4096, 0x5a);
  ASSERT_TRUE((*first)->write(0, buf.data(), buf.size()));
  // A second owner fences the first out: its writes are refused from then on.
  auto second = open_mp(&m2);
  ASSERT_TRUE(second) << second.err().what();
  EXPECT_EQ(m2->status().epoch, 2u);
  std::vector<unsigned char> other(4096, 0x77);
  auto late = (*first)->write(0, other.data(), other.size());
  ASSERT_FALSE(late);
  EXPECT_EQ(late.err().errnum(), EBADE);
  EXPECT_TRUE(all_bytes(read_file(img, 0, 4096), 0x5a));
  ASSERT_TRUE((*second)->write(0, other.data(), other.size()));
  EXPECT_TRUE(all_bytes(read_file(img, 0, 4096), 0x77));
}

// What the child reports through shared memory.
struct child_report {
  std::atomic<int> stage{0};
  std::atomic<int> bad_status{0};    // first unexpected status of the in-flight writes
  std::atomic<int> stale_status{1};  // the write of the old epoch after the advance
  std::atomic<int> unfenced_status{1};
};

// The child: a second back end on the same image. It submits `count` writes of
// 1 MiB (epoch 1) on a one-worker engine and stops itself while they are
// queued there, each holding a fence pass; once resumed it waits for them,
// then (told by the parent) tries one more write of epoch 1 and one of epoch 0.
[[noreturn]] void child_main(const std::string& img, int go_fd, child_report* rep, uint32_t count) {
  char c;
  if (read(go_fd, &c, 1) != 1) _exit(10);
  auto v = open_file(img, "fence=1&engine=threads&threads=1", count);
  if (!v) _exit(11);
  std::vector<std::vector<unsigned char>> data(count, std::vector<unsigned char>(mib, 0xa1));
  batch b(count);
  for (uint32_t i = 0; i < count; ++i) b.add(i, core::VSTORE_OP_WRITE, uint64_t{i} * mib, data[i].data(), mib, 1);
  b.submit(**v);
  raise(SIGSTOP);  // the worker has hardly begun: most writes wait in its queue
  b.wait();
  for (auto& o : b.ios)
    if (o.status != 0 && rep->bad_status.load() == 0) rep->bad_status = o.status == 1 ? 999 : o.status;
  rep->stage = 1;
  if (read(go_fd, &c, 1) != 1) _exit(12);
  std::vector<unsigned char> stale(4096, 0xb2);
  rep->stale_status = write_sync(**v, 0, stale.data(), stale.size(), 1);
  std::vector<unsigned char> unf(4096, 0xc3);
  rep->unfenced_status = write_sync(**v, 4096, unf.data(), unf.size(), 0);
  rep->stage = 2;
  v->reset();
  _exit(0);
}

TEST(FileFence, TwoProcessesAdvanceDrainsOlderWritesAndRefusesStaleOnes) {
  test::temp_dir dir;
  const std::string img = dir.file("disk.img");
  constexpr uint32_t count = 24;
  make_image(img, count * mib);
  auto* rep = static_cast<child_report*>(
      mmap(nullptr, sizeof(child_report), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(rep, MAP_FAILED);
  new (rep) child_report();
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(go[1]);
    child_main(img, go[0], rep, count);
  }
  ::close(go[0]);
  auto kill_child = [&] {
    ::kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  };

  auto v = open_file(img, "fence=1");
  ASSERT_TRUE(v) << v.err().what();
  ASSERT_TRUE((*v)->fence(1));
  ASSERT_EQ(write(go[1], "g", 1), 1);

  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, WUNTRACED), pid);
  if (!WIFSTOPPED(st)) {
    kill_child();
    FAIL() << "the child did not stop with its writes in flight (wait status " << st << ")";
  }
  // The child is frozen holding passes for writes of epoch 1 that have not run.
  std::atomic<bool> advanced{false};
  int adv_status = 1;
  std::thread adv([&] {
    auto r = (*v)->fence(2);
    adv_status = r ? 0 : r.err().errnum();
    advanced = true;
  });
  std::this_thread::sleep_for(400ms);
  const bool early = advanced.load();
  ::kill(pid, SIGCONT);
  adv.join();
  EXPECT_FALSE(early) << "the advance returned while another process still held writes of the old epoch";
  EXPECT_EQ(adv_status, 0);
  // Every write admitted under epoch 1 has landed by the time fence(2) returned.
  auto image = read_file(img, 0, count * mib);
  EXPECT_TRUE(all_bytes(image, 0xa1)) << "fence(2) returned before the older writes drained";

  ASSERT_EQ(write(go[1], "g", 1), 1);
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "child wait status " << st;
  EXPECT_EQ(rep->bad_status.load(), 0) << "a write admitted before the advance failed";
  EXPECT_EQ(rep->stale_status.load(), -ESTALE) << "a write of a stale epoch was not refused";
  EXPECT_EQ(rep->unfenced_status.load(), 0) << "an unfenced write (epoch 0) was refused";
  EXPECT_TRUE(all_bytes(read_file(img, 0, 4096), 0xa1)) << "the refused write landed";
  EXPECT_TRUE(all_bytes(read_file(img, 4096, 4096), 0xc3));

  // Both processes see one epoch: this one's query, the record itself.
  EXPECT_EQ(*(*v)->fence(0), 2u);
  auto rec = storage::fence_record::open(storage::fence_record::path_for(img));
  ASSERT_TRUE(rec);
  EXPECT_EQ(*(*rec)->current(), 2u);
  // Epochs only grow.
  auto back = (*v)->fence(2);
  ASSERT_FALSE(back);
  EXPECT_EQ(back.err().errnum(), ESTALE);
  ::close(go[1]);
  munmap(rep, sizeof(child_report));
}

}  // namespace
