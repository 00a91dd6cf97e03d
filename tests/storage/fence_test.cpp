// SPDX-License-Identifier: Apache-2.0
// storage::fence_record: the shared epoch record back ends check requests
// against. Two processes (fork) race a late writer against an advance.
#include "storage/fence.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "tests/testutil.hpp"

using namespace uvd;
using storage::fence_record;
using namespace std::chrono_literals;

namespace {

using clock_type = std::chrono::steady_clock;

uint64_t read_u64(int fd) {
  uint64_t v = 0;
  EXPECT_EQ(pread(fd, &v, sizeof v, 0), static_cast<ssize_t>(sizeof v));
  return v;
}

void write_u64(int fd, uint64_t v) { ASSERT_EQ(pwrite(fd, &v, sizeof v, 0), static_cast<ssize_t>(sizeof v)); }

TEST(FenceRecord, StartsAtZeroAdvancesOnlyForwardAndPersists) {
  test::temp_dir dir;
  const std::string path = fence_record::path_for(dir.file("disk.img"));
  EXPECT_EQ(path, dir.file("disk.img.fence"));
  {
    auto r = fence_record::open(path);
    ASSERT_TRUE(r) << r.err().what();
    auto cur = (*r)->current();
    ASSERT_TRUE(cur);
    EXPECT_EQ(*cur, 0u);
    ASSERT_TRUE((*r)->advance(3));
    EXPECT_EQ(*(*r)->current(), 3u);
    for (uint32_t e : {0u, 2u, 3u}) {
      auto a = (*r)->advance(e);
      ASSERT_FALSE(a) << e;
      EXPECT_EQ(a.err().errnum(), ESTALE);
    }
    EXPECT_EQ(*(*r)->current(), 3u);
  }
  auto again = fence_record::open(path);
  ASSERT_TRUE(again);
  EXPECT_EQ(*(*again)->current(), 3u);
}

TEST(FenceRecord, RefusesACorruptRecord) {
  test::temp_dir dir;
  const std::string path = dir.file("x.fence");
  {
    auto r = fence_record::open(path);
    ASSERT_TRUE(r);
    ASSERT_TRUE((*r)->advance(7));
  }
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  unsigned char b = 9;  // epoch byte without its complement
  ASSERT_EQ(pwrite(fd, &b, 1, 8), 1);
  ::close(fd);
  auto r = fence_record::open(path);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.err().errnum(), EUCLEAN);
}

TEST(FenceRecord, AdmitsUnfencedAndCurrentEpochsRefusesOlderOnes) {
  test::temp_dir dir;
  auto r = fence_record::open(dir.file("d.fence"));
  ASSERT_TRUE(r);
  fence_record& rec = **r;
  ASSERT_TRUE(rec.advance(5));
  EXPECT_TRUE(rec.enter(0));
  EXPECT_TRUE(rec.enter(5));
  EXPECT_TRUE(rec.enter(6));
  auto old = rec.enter(4);
  ASSERT_FALSE(old);
  EXPECT_EQ(old.err().errnum(), ESTALE);
  int ran = 0;
  EXPECT_EQ(rec.run(4, [&] { return ++ran; }), -ESTALE);
  EXPECT_EQ(rec.run(5, [&] { return ++ran; }), 1);
  EXPECT_EQ(ran, 1);
}

// Two back ends in one process (two records on one file: separate open file
// descriptions, so their locks conflict as between processes).
TEST(FenceRecord, AdvanceWaitsForARequestInFlightOnAnotherBackEnd) {
  test::temp_dir dir;
  auto a = fence_record::open(dir.file("d.fence"));
  auto b = fence_record::open(dir.file("d.fence"));
  ASSERT_TRUE(a && b);
  ASSERT_TRUE((*a)->advance(1));
  std::atomic<bool> inside{false}, finished{false};
  std::thread req([&] {
    (*a)->run(1, [&] {
      inside = true;
      std::this_thread::sleep_for(300ms);
      finished = true;
      return 0;
    });
  });
  while (!inside) std::this_thread::sleep_for(1ms);
  auto t0 = clock_type::now();
  ASSERT_TRUE((*b)->advance(2));
  EXPECT_TRUE(finished) << "advance returned while a request of the old epoch was still executing";
  EXPECT_GE(clock_type::now() - t0, 200ms);
  req.join();
  EXPECT_FALSE((*a)->enter(1));
  EXPECT_TRUE((*a)->enter(2));
}

// Many threads of one back end keep passes overlapping; an advance from
// another must still get through (the lease and the gate), not starve.
TEST(FenceRecord, AdvanceIsNotStarvedByABusyBackEnd) {
  test::temp_dir dir;
  auto a = fence_record::open(dir.file("d.fence"));
  auto b = fence_record::open(dir.file("d.fence"));
  ASSERT_TRUE(a && b);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> admitted{0}, refused{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t)
    workers.emplace_back([&] {
      while (!stop) {
        int rc = (*a)->run(1, [&] {
          std::this_thread::sleep_for(200us);
          return 0;
        });
        (rc == 0 ? admitted : refused).fetch_add(1);
      }
    });
  std::this_thread::sleep_for(50ms);
  auto t0 = clock_type::now();
  ASSERT_TRUE((*b)->advance(2));
  auto took = clock_type::now() - t0;
  std::this_thread::sleep_for(20ms);
  stop = true;
  for (auto& w : workers) w.join();
  EXPECT_LT(took, 2s);
  EXPECT_GT(admitted.load(), 0u);
  EXPECT_GT(refused.load(), 0u);
}

// A separate process keeps writing the old value under epoch 1 (a late
// writer on a fenced path); the parent advances to 2 and writes the new
// value. The old value must never land after the advance returned.
TEST(FenceRecord, TwoProcessesRaceALateWriterIsRefusedAfterAdvance) {
  test::temp_dir dir;
  const std::string data = dir.file("disk.img");
  const std::string rec_path = fence_record::path_for(data);
  std::mt19937_64 rng(20240611);
  for (int round = 0; round < 20; ++round) {
    int dfd = ::open(data.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(dfd, 0);
    write_u64(dfd, 0);
    ::unlink(rec_path.c_str());
    {
      auto r = fence_record::open(rec_path);
      ASSERT_TRUE(r);
      ASSERT_TRUE((*r)->advance(1));
    }
    int ready[2];
    ASSERT_EQ(pipe(ready), 0);
    const auto hold = std::chrono::microseconds(rng() % 3000);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // The late writer: old value 0x01d under epoch 1 until refused.
      auto r = fence_record::open(rec_path);
      if (!r) _exit(90);
      int fd = ::open(data.c_str(), O_RDWR);
      char c = 'r';
      if (write(ready[1], &c, 1) != 1) _exit(91);
      // Bounded, so a record that never refuses fails the test instead of hanging it.
      for (auto until = clock_type::now() + 5s; clock_type::now() < until;) {
        int rc = (*r)->run(1, [&] {
          std::this_thread::sleep_for(hold);  // the write is "in flight" for a while
          uint64_t v = 0x01d;
          return pwrite(fd, &v, sizeof v, 0) == sizeof v ? 0 : -EIO;
        });
        if (rc == -ESTALE) _exit(0);
        if (rc != 0) _exit(92);
      }
      _exit(93);  // never refused
    }
    char c;
    ASSERT_EQ(read(ready[0], &c, 1), 1);
    ::close(ready[0]);
    ::close(ready[1]);
    std::this_thread::sleep_for(std::chrono::microseconds(1000 + rng() % 5000));
    auto r = fence_record::open(rec_path);
    ASSERT_TRUE(r);
    ASSERT_TRUE((*r)->advance(2)) << "round " << round;
    ASSERT_EQ((*r)->run(2, [&] {
      write_u64(dfd, 0x2e3);
      return 0;
    }),
              0);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0) << "round " << round << ": the late writer "
                                      << (WEXITSTATUS(status) == 93 ? "was never refused" : "failed");
    EXPECT_EQ(read_u64(dfd), 0x2e3u) << "round " << round << ": a write of the fenced epoch landed after the advance";
    ::close(dfd);
  }
}

}  // namespace

namespace {

// uvd fence show|advance drive the same record, as an operator would.
// The uvd binary: $UVD_BUILD_DIR/uvd, else two folders above this test
// binary (build/tests/storage/fence_test -> build/uvd).
std::string uvd_binary() {
  if (std::getenv("UVD_BUILD_DIR")) return test::build_dir() + "/uvd";
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return "uvd";
  std::string p(exe, static_cast<size_t>(n));
  for (int i = 0; i < 3 && p.rfind('/') != std::string::npos; ++i) p.resize(p.rfind('/'));
  return p + "/uvd";
}

TEST(FenceTool, ShowsAndAdvancesAnImagesEpoch) {
  const std::string uvd = uvd_binary();
  ASSERT_EQ(access(uvd.c_str(), X_OK), 0) << uvd << " is not built";
  test::temp_dir dir;
  const std::string image = test::make_sparse_file(dir.file("disk.img"), 1 << 20);
  auto show = test::run_cmd({uvd, "fence", "show", image});
  ASSERT_EQ(show.status, 0) << show.output;
  EXPECT_NE(show.output.find("epoch 0"), std::string::npos) << show.output;
  auto adv = test::run_cmd({uvd, "fence", "advance", image});
  ASSERT_EQ(adv.status, 0) << adv.output;
  EXPECT_NE(adv.output.find("epoch 1"), std::string::npos) << adv.output;
  auto to = test::run_cmd({uvd, "fence", "advance", image, "--to", "7"});
  ASSERT_EQ(to.status, 0) << to.output;
  auto back = test::run_cmd({uvd, "fence", "advance", image, "--to", "5"});
  EXPECT_EQ(back.status, 3) << back.output;
  EXPECT_NE(back.output.find("at epoch 7"), std::string::npos) << back.output;
  auto rec = fence_record::open(fence_record::path_for(image));
  ASSERT_TRUE(rec);
  EXPECT_EQ(*(*rec)->current(), 7u);
  EXPECT_FALSE((*rec)->enter(6));
}

}  // namespace
