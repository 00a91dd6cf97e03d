// SPDX-License-Identifier: Apache-2.0
// The file transport through its ops table, on both engines: geometry,
// scatter-gather, end of file, short transfers, hole punching, write-zeroes
// and its fallback, read-only devices, batching and a full ring.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tests/testutil.hpp"
#include "tests/transports/file/raw_disk.hpp"
#include "transports/file/file.hpp"
#include "transports/file/file_device.hpp"

namespace uvd::file {
namespace {

using test::raw_disk;
using test::test_req;

constexpr uint64_t MiB = 1 << 20;

std::vector<std::byte> pattern(size_t n, uint64_t seed, uint64_t offset) {
  std::vector<std::byte> b(n);
  test::fill_pattern(b, seed, offset);
  return b;
}

std::vector<std::byte> pread_all(const std::string& path, uint64_t off, size_t n) {
  std::vector<std::byte> b(n);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  ssize_t got = ::pread(fd, b.data(), n, static_cast<off_t>(off));
  EXPECT_GE(got, 0);
  b.resize(got > 0 ? static_cast<size_t>(got) : 0);
  ::close(fd);
  return b;
}

void pwrite_all(const std::string& path, uint64_t off, const std::vector<std::byte>& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)), static_cast<ssize_t>(data.size()));
  ::close(fd);
}

bool all_zero(const std::byte* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st{};
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

const file_stats& stats_of(const raw_disk& d) { return file_device_of(d.handle()).stats; }

class FileEngineTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    image_ = test::make_sparse_file(dir_.file("disk.img"), 8 * MiB);
    if (std::string(GetParam()) == "uring") {
      raw_disk probe;
      int rc = probe.open(file_vstore_ops, image_, "engine=uring");
      if (rc == -EPERM || rc == -ENOSYS || rc == -ENOMEM)
        GTEST_SKIP() << "io_uring is refused on this host (" << probe.errbuf()
                     << "); the uring engine is not tested here";
      ASSERT_EQ(rc, 0) << probe.errbuf();
    }
  }

  std::string options(const std::string& extra = {}) const {
    return std::string("engine=") + GetParam() + (extra.empty() ? "" : "&" + extra);
  }

  void open(raw_disk& d, const std::string& path, const std::string& extra = {}, uint32_t flags = 0) {
    ASSERT_EQ(d.open(file_vstore_ops, path, options(extra), flags), 0) << d.errbuf();
    ASSERT_STREQ(file_device_of(d.handle()).engine->name(), GetParam());
  }

  test::temp_dir dir_;
  std::string image_;
};

TEST_P(FileEngineTest, ReportsGeometryFeaturesAndIdentity) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  const core::vstore_info& info = d.info();
  EXPECT_EQ(info.size, 8 * MiB);
  EXPECT_EQ(info.block_size, 512u);
  EXPECT_EQ(info.max_segments, 1024u);
  EXPECT_GE(info.max_transfer, 64u * 1024);
  EXPECT_EQ(info.read_only, 0u);
  for (uint64_t f : {core::VSTORE_F_FLUSH, core::VSTORE_F_FUA, core::VSTORE_F_DISCARD, core::VSTORE_F_DISCARD_ZEROES,
                     core::VSTORE_F_WRITE_ZEROES})
    EXPECT_TRUE(info.features & f) << "feature bit " << f;
  struct stat st{};
  ASSERT_EQ(::stat(image_.c_str(), &st), 0);
  EXPECT_EQ(std::string(info.id), "file:dev=" + std::to_string(st.st_dev) + ":ino=" + std::to_string(st.st_ino));
}

TEST_P(FileEngineTest, WritesAndReadsBackScatterGather) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  const uint64_t off = 3 * 4096;
  const size_t len = 5 * 4096;
  auto data = pattern(len, 7, off);
  // Uneven segments on both sides, none block-sized.
  iovec wv[3] = {{data.data(), 1000}, {data.data() + 1000, 9000}, {data.data() + 10000, len - 10000}};
  test_req w;
  w.set(core::VSTORE_OP_WRITE, off, len, wv, 3);
  ASSERT_EQ(d.run(w), 0);
  EXPECT_EQ(pread_all(image_, off, len), data) << "the host file holds what was written";

  std::vector<std::byte> back(len, std::byte{0xAA});
  iovec rv[4] = {{back.data(), 7}, {back.data() + 7, 4089}, {back.data() + 4096, 12288}, {back.data() + 16384, len - 16384}};
  test_req r;
  r.set(core::VSTORE_OP_READ, off, len, rv, 4);
  ASSERT_EQ(d.run(r), 0);
  EXPECT_EQ(test::find_pattern_mismatch(back, 7, off), -1);
}

TEST_P(FileEngineTest, FuaWriteAndFlushComplete) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  auto data = pattern(64 * 1024, 3, MiB);
  ASSERT_EQ(d.write(MiB, data.data(), data.size(), core::VSTORE_REQ_FUA), 0);
  EXPECT_EQ(pread_all(image_, MiB, data.size()), data);
  EXPECT_EQ(d.flush(), 0);
  ASSERT_EQ(d.write_zeroes(MiB, 4096, core::VSTORE_REQ_FUA), 0);
  EXPECT_TRUE(all_zero(pread_all(image_, MiB, 4096).data(), 4096));
}

TEST_P(FileEngineTest, ReadPastEndOfShortFileZeroFills) {
  const std::string path = dir_.file("short.img");
  auto data = pattern(1000, 11, 0);
  { std::FILE* f = std::fopen(path.c_str(), "wb"); ASSERT_TRUE(f); std::fwrite(data.data(), 1, data.size(), f); std::fclose(f); }
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, path));
  EXPECT_EQ(d.info().size, 1024u) << "1000 bytes show as two whole blocks";
  std::vector<std::byte> back(1024, std::byte{0xAA});
  ASSERT_EQ(d.read(0, back.data(), back.size()), 0);
  EXPECT_TRUE(std::equal(data.begin(), data.end(), back.begin()));
  EXPECT_TRUE(all_zero(back.data() + 1000, 24));
  EXPECT_GE(stats_of(d).eof_fills.load(), 1u);
}

TEST_P(FileEngineTest, ReadOfFileTruncatedAfterOpenStopsAtItsEndAndZeroFills) {
  auto data = pattern(64 * 1024, 5, 0);
  pwrite_all(image_, 0, data);
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  ASSERT_EQ(::truncate(image_.c_str(), 10000), 0);
  std::vector<std::byte> back(64 * 1024, std::byte{0xAA});
  ASSERT_EQ(d.read(0, back.data(), back.size()), 0);
  EXPECT_TRUE(std::equal(data.begin(), data.begin() + 10000, back.begin()));
  EXPECT_TRUE(all_zero(back.data() + 10000, back.size() - 10000));
  EXPECT_GE(stats_of(d).short_transfers.load(), 1u);
  EXPECT_GE(stats_of(d).eof_fills.load(), 1u);
}

// RLIMIT_FSIZE cuts a write short at the limit; the transport resumes the
// rest, which the kernel then refuses with EFBIG, and reports that.
TEST_P(FileEngineTest, ShortWriteResumesAndReportsTheError) {
  const std::string path = dir_.file("grow.img");
  test::make_sparse_file(path, 0);
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, path));  // an empty file: the ops table is driven past its end on purpose
  auto data = pattern(64 * 1024, 9, 0);
  iovec v[2] = {{data.data(), 6000}, {data.data() + 6000, data.size() - 6000}};
  test_req w;
  w.set(core::VSTORE_OP_WRITE, 0, data.size(), v, 2);
  struct rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 10000;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  int status = d.run(w);
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_EQ(status, -EFBIG);
  EXPECT_GE(stats_of(d).short_transfers.load(), 1u);
  auto on_disk = pread_all(path, 0, data.size());
  ASSERT_EQ(on_disk.size(), 10000u);
  EXPECT_TRUE(std::equal(on_disk.begin(), on_disk.end(), data.begin())) << "the part before the limit landed";
}

TEST_P(FileEngineTest, DiscardPunchesAHoleThatReadsZerosAndFreesBlocks) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  auto data = pattern(4 * MiB, 21, MiB);
  for (uint64_t o = 0; o < data.size(); o += MiB) ASSERT_EQ(d.write(MiB + o, data.data() + o, MiB), 0);
  ASSERT_EQ(d.flush(), 0);
  const uint64_t before = allocated_bytes(image_);
  ASSERT_GE(before, 4 * MiB);

  ASSERT_EQ(d.discard(2 * MiB, 2 * MiB), 0);
  const uint64_t after = allocated_bytes(image_);
  EXPECT_LE(after, before - 2 * MiB) << "st_blocks must drop by the discarded range";

  std::vector<std::byte> back(4 * MiB);
  for (uint64_t o = 0; o < back.size(); o += MiB) ASSERT_EQ(d.read(MiB + o, back.data() + o, MiB), 0);
  EXPECT_EQ(test::find_pattern_mismatch(std::span(back).first(MiB), 21, MiB), -1);
  EXPECT_TRUE(all_zero(back.data() + MiB, 2 * MiB));
  EXPECT_EQ(test::find_pattern_mismatch(std::span(back).last(MiB), 21, 4 * MiB), -1);
}

TEST_P(FileEngineTest, WriteZeroesKeepsBlocksOnlyWithNoUnmap) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  auto data = pattern(2 * MiB, 4, 0);
  for (uint64_t o = 0; o < data.size(); o += MiB) ASSERT_EQ(d.write(o, data.data() + o, MiB), 0);
  ASSERT_EQ(d.flush(), 0);
  const uint64_t full = allocated_bytes(image_);

  ASSERT_EQ(d.write_zeroes(0, MiB, core::VSTORE_REQ_NO_UNMAP), 0);
  EXPECT_GE(allocated_bytes(image_), full) << "NO_UNMAP keeps the range allocated";
  EXPECT_TRUE(all_zero(pread_all(image_, 0, MiB).data(), MiB));

  ASSERT_EQ(d.write_zeroes(MiB, MiB), 0);
  EXPECT_LE(allocated_bytes(image_), full - MiB) << "without NO_UNMAP the blocks may go, and on this filesystem do";
  std::vector<std::byte> back(2 * MiB, std::byte{0xAA});
  ASSERT_EQ(d.read(0, back.data(), MiB), 0);
  ASSERT_EQ(d.read(MiB, back.data() + MiB, MiB), 0);
  EXPECT_TRUE(all_zero(back.data(), back.size()));
  EXPECT_EQ(stats_of(d).zero_writes.load(), 0u) << "fallocate did the work";
}

TEST_P(FileEngineTest, WriteZeroesWritesZerosWhenFallocateIsRefused) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  auto data = pattern(MiB, 8, 0);
  ASSERT_EQ(d.write(0, data.data(), data.size()), 0);
  // As if the filesystem had answered EOPNOTSUPP to both fallocate modes.
  file_device& dev = file_device_of(d.handle());
  dev.punch_ok = false;
  dev.zero_range_ok = false;
  ASSERT_EQ(d.write_zeroes(4096, MiB - 8192), 0);
  EXPECT_EQ(stats_of(d).zero_writes.load(), 1u);
  auto back = pread_all(image_, 0, MiB);
  EXPECT_EQ(test::find_pattern_mismatch(std::span(back).first(4096), 8, 0), -1);
  EXPECT_TRUE(all_zero(back.data() + 4096, MiB - 8192));
  EXPECT_EQ(test::find_pattern_mismatch(std::span(back).last(4096), 8, MiB - 4096), -1);
}

// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the refusal arrives
// at run time, for a whole batch in flight at once, and the transport writes
// zeros instead, completing each request exactly once.
TEST_P(FileEngineTest, WriteZeroesFallsBackOnAFilesystemWithoutZeroRange) {
  struct stat st{};
  if (::stat("/dev/shm", &st) != 0 || !S_ISDIR(st.st_mode) || ::access("/dev/shm", W_OK) != 0)
    GTEST_SKIP() << "no writable /dev/shm (tmpfs) on this host: the run-time ZERO_RANGE refusal is not tested";
  std::string path = "/dev/shm/uvd-file-test-" + std::to_string(::getpid()) + "-" + GetParam();
  test::make_sparse_file(path, 2 * MiB);
  struct unlink_at_exit {
    std::string p;
    ~unlink_at_exit() { ::unlink(p.c_str()); }
  } cleanup{path};
  auto data = pattern(MiB, 12, 0);
  pwrite_all(path, 0, data);
  // The first refusal on a fresh device races the submitter: the reaper may
  // take the request over while submit() is still walking its batch.
  for (int round = 0; round < 48; ++round) {
    raw_disk fresh;
    ASSERT_NO_FATAL_FAILURE(open(fresh, path));
    ASSERT_EQ(fresh.write_zeroes(MiB, 4096, core::VSTORE_REQ_NO_UNMAP), 0) << "round " << round;
  }

  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, path));
  constexpr int n = 32;
  std::vector<test_req> reqs(n);
  std::vector<test_req*> ptrs;
  for (int i = 0; i < n; ++i) {
    reqs[i].set(core::VSTORE_OP_WRITE_ZEROES, static_cast<uint64_t>(i) * 8192, 4096, nullptr, 0,
                core::VSTORE_REQ_NO_UNMAP);
    ptrs.push_back(&reqs[i]);
  }
  ASSERT_EQ(d.submit(ptrs), 0);
  ASSERT_TRUE(d.wait(ptrs));
  for (const test_req& r : reqs) EXPECT_EQ(r.status, 0);
  if (stats_of(d).zero_writes.load() == 0)
    GTEST_SKIP() << "this kernel's tmpfs accepted FALLOC_FL_ZERO_RANGE; nothing to fall back from";
  EXPECT_EQ(stats_of(d).zero_writes.load(), static_cast<uint64_t>(n));
  EXPECT_FALSE(file_device_of(d.handle()).zero_range_ok.load()) << "the refusal is remembered";

  auto back = pread_all(path, 0, MiB);
  for (int i = 0; i < n; ++i) {
    EXPECT_TRUE(all_zero(back.data() + i * 8192, 4096)) << "request " << i;
    EXPECT_EQ(test::find_pattern_mismatch(std::span(back).subspan(i * 8192 + 4096, 4096), 12, i * 8192 + 4096), -1);
  }
}

TEST_P(FileEngineTest, ReadOnlyOpenRefusesEveryWrite) {
  auto data = pattern(8192, 2, 0);
  pwrite_all(image_, 0, data);
  for (int via_option = 0; via_option < 2; ++via_option) {
    raw_disk d;
    ASSERT_NO_FATAL_FAILURE(via_option ? open(d, image_, "ro=1") : open(d, image_, {}, core::VSTORE_OPEN_READ_ONLY));
    EXPECT_EQ(d.info().read_only, 1u);
    EXPECT_FALSE(d.info().features & (core::VSTORE_F_DISCARD | core::VSTORE_F_WRITE_ZEROES));
    auto junk = pattern(4096, 99, 0);
    EXPECT_EQ(d.write(0, junk.data(), junk.size()), -EROFS);
    EXPECT_EQ(d.discard(0, 4096), -EROFS);
    EXPECT_EQ(d.write_zeroes(0, 4096), -EROFS);
    std::vector<std::byte> back(8192);
    ASSERT_EQ(d.read(0, back.data(), back.size()), 0);
    EXPECT_EQ(back, data);
    EXPECT_EQ(d.flush(), 0);
  }
  EXPECT_EQ(pread_all(image_, 0, 8192), data) << "the file is untouched";
}

TEST_P(FileEngineTest, BatchOf64IsOneSubmitAndOneNotify) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_));
  constexpr int n = 64;
  auto data = pattern(n * 4096, 33, 0);
  std::vector<test_req> reqs(n);
  std::vector<iovec> iov(n);
  std::vector<test_req*> ptrs;
  for (int i = 0; i < n; ++i) {
    // Every other 4 KiB block, so no two requests could merge.
    iov[i] = {data.data() + i * 4096, 4096};
    reqs[i].set(core::VSTORE_OP_WRITE, static_cast<uint64_t>(i) * 8192, 4096, &iov[i], 1);
    ptrs.push_back(&reqs[i]);
  }
  const uint64_t notifies = stats_of(d).notifies.load();
  const uint64_t batches = stats_of(d).batches.load();
  std::vector<int> accepted;
  ASSERT_EQ(d.submit(ptrs, &accepted), 0);
  ASSERT_TRUE(d.wait(ptrs));
  EXPECT_EQ(accepted, std::vector<int>{n}) << "one submit() took the whole batch";
  EXPECT_EQ(stats_of(d).notifies.load() - notifies, 1u) << "one io_uring_submit / one wake-up for 64 requests";
  EXPECT_EQ(stats_of(d).batches.load() - batches, 1u);
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(reqs[i].status, 0);
    auto on_disk = pread_all(image_, static_cast<uint64_t>(i) * 8192, 4096);
    EXPECT_TRUE(std::equal(on_disk.begin(), on_disk.end(), data.begin() + i * 4096)) << "request " << i;
  }
}

TEST_P(FileEngineTest, SmallQueueTakesFewerAndAllStillComplete) {
  raw_disk d;
  ASSERT_NO_FATAL_FAILURE(open(d, image_, "entries=4&threads=1"));
  constexpr int n = 64;
  auto data = pattern(n * 4096, 44, 0);
  std::vector<test_req> reqs(n);
  std::vector<iovec> iov(n);
  std::vector<test_req*> ptrs;
  for (int i = 0; i < n; ++i) {
    iov[i] = {data.data() + i * 4096, 4096};
    reqs[i].set(core::VSTORE_OP_WRITE, static_cast<uint64_t>(i) * 4096, 4096, &iov[i], 1);
    ptrs.push_back(&reqs[i]);
  }
  std::vector<int> accepted;
  ASSERT_EQ(d.submit(ptrs, &accepted), 0);
  ASSERT_TRUE(d.wait(ptrs));
  for (const test_req& r : reqs) EXPECT_EQ(r.status, 0);
  if (std::string(GetParam()) == "uring") {
    EXPECT_LE(accepted.front(), 4) << "no more in flight than the ring holds";
    EXPECT_GT(accepted.size(), 1u);
    EXPECT_GE(stats_of(d).ring_full.load(), 1u);
  } else {
    EXPECT_EQ(accepted, std::vector<int>{n}) << "the thread pool queues everything";
  }
  EXPECT_EQ(pread_all(image_, 0, data.size()), data);
}

TEST_P(FileEngineTest, DirectIoReadsAndWritesAlignedBuffers) {
  // /tmp may be tmpfs without O_DIRECT; the build tree is on a real disk.
  std::vector<std::string> candidates = {dir_.file("direct.img"), std::string(UVD_FILE_TEST_SCRATCH) + "/direct-" +
                                                                       std::to_string(::getpid()) + ".img"};
  raw_disk d;
  std::string path;
  for (const std::string& c : candidates) {
    test::make_sparse_file(c, 4 * MiB + 1000);  // an unaligned size: the last block ends past EOF
    int rc = d.open(file_vstore_ops, c, options(), core::VSTORE_OPEN_DIRECT);
    if (rc == 0) {
      path = c;
      break;
    }
    ::unlink(c.c_str());
    ASSERT_EQ(rc, -EINVAL) << d.errbuf();
    EXPECT_NE(std::string(d.errbuf()).find("O_DIRECT"), std::string::npos) << d.errbuf();
  }
  if (path.empty()) GTEST_SKIP() << "no filesystem here takes O_DIRECT (EINVAL on " << candidates[0] << " and "
                                 << candidates[1] << ")";
  struct unlink_at_exit {
    std::string p;
    ~unlink_at_exit() { ::unlink(p.c_str()); }
  } cleanup{path};
  ASSERT_STREQ(file_device_of(d.handle()).engine->name(), GetParam());
  EXPECT_TRUE(file_device_of(d.handle()).direct);
  const uint32_t bs = d.info().block_size;
  EXPECT_GE(bs, 512u);
  EXPECT_EQ(bs & (bs - 1), 0u);
  EXPECT_EQ(d.info().size % bs, 0u);

  constexpr size_t len = 256 * 1024;
  auto* wbuf = static_cast<std::byte*>(std::aligned_alloc(4096, len));
  auto* rbuf = static_cast<std::byte*>(std::aligned_alloc(4096, len));
  std::unique_ptr<std::byte, free_deleter> w_owner(wbuf), r_owner(rbuf);
  test::fill_pattern({wbuf, len}, 17, MiB);
  ASSERT_EQ(d.write(MiB, wbuf, len, core::VSTORE_REQ_FUA), 0);
  ASSERT_EQ(d.read(MiB, rbuf, len), 0);
  EXPECT_EQ(test::find_pattern_mismatch({rbuf, len}, 17, MiB), -1);
  EXPECT_EQ(pread_all(path, MiB, len), std::vector<std::byte>(wbuf, wbuf + len));

  // The last block holds 1000 bytes of file; O_DIRECT stops short there.
  const uint64_t last = d.info().size - bs;
  std::memset(rbuf, 0xAA, bs);
  ASSERT_EQ(d.read(last, rbuf, bs), 0);
  EXPECT_TRUE(all_zero(rbuf, bs)) << "the tail of a sparse file and the bytes past its end read as zeros";
}

INSTANTIATE_TEST_SUITE_P(Engines, FileEngineTest, ::testing::Values("uring", "threads"),
                         [](const auto& info) { return std::string(info.param); });

// --- helpers that both engines share ---

TEST(FileIoHelpers, RemainingIovResumesInsideAndBetweenSegments) {
  std::byte buf[100];
  iovec v[3] = {{buf, 10}, {buf + 10, 30}, {buf + 40, 60}};
  test_req r;
  r.set(core::VSTORE_OP_READ, 0, 100, v, 3);
  file_req_ctx& c = ctx_of(&r.req);
  c = file_req_ctx{};
  auto s = file_remaining_iov(&r.req);
  EXPECT_EQ(s.iov, v);
  EXPECT_EQ(s.count, 3u);
  c.done = 10;  // on a segment boundary: the tail of the caller's array
  s = file_remaining_iov(&r.req);
  EXPECT_EQ(s.iov, v + 1);
  EXPECT_EQ(s.count, 2u);
  c.done = 25;  // inside segment 1: its rest alone, from the context
  s = file_remaining_iov(&r.req);
  ASSERT_EQ(s.count, 1u);
  EXPECT_EQ(s.iov, &c.partial);
  EXPECT_EQ(s.iov->iov_base, buf + 25);
  EXPECT_EQ(s.iov->iov_len, 15u);
  c.done = 99;
  s = file_remaining_iov(&r.req);
  ASSERT_EQ(s.count, 1u);
  EXPECT_EQ(s.iov->iov_base, buf + 99);
  EXPECT_EQ(s.iov->iov_len, 1u);
}

TEST(FileOptions, ParsesKnownKeysAndRefusesTheRest) {
  auto o = parse_file_options("engine=threads&direct&ro=0&entries=32&threads=2");
  ASSERT_TRUE(o) << o.err().what();
  EXPECT_EQ(o->engine, file_engine_kind::threads);
  EXPECT_TRUE(o->direct);
  EXPECT_FALSE(o->read_only);
  EXPECT_EQ(o->entries, 32u);
  EXPECT_EQ(o->threads, 2u);
  auto d = parse_file_options("");
  ASSERT_TRUE(d);
  EXPECT_EQ(d->engine, file_engine_kind::automatic);
  EXPECT_FALSE(d->direct);

  auto bad_engine = parse_file_options("engine=fast");
  ASSERT_FALSE(bad_engine);
  EXPECT_EQ(bad_engine.err().errnum(), EINVAL);
  EXPECT_NE(bad_engine.err().message.find("engine=fast"), std::string::npos) << bad_engine.err().message;
  auto unknown = parse_file_options("direkt=1");
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.err().message.find("'direkt'"), std::string::npos) << unknown.err().message;
  EXPECT_FALSE(parse_file_options("entries=0"));
  EXPECT_FALSE(parse_file_options("threads=many"));
  EXPECT_FALSE(parse_file_options("ro=maybe"));
}

}  // namespace
}  // namespace uvd::file
