// SPDX-License-Identifier: Apache-2.0
// Host checks of the failover workload itself: over a multipath device on two
// file paths it verifies clean, and it catches each kind of damage planted in
// the image behind its back (a stale generation, a torn, a misplaced and a
// never-acknowledged block), so the guest tests built on it can fail.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "storage/multipath/multipath.hpp"
#include "tests/e2e/multipath/mp_load.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

struct fixture {
  temp_dir dir;
  std::string image = make_sparse_file(dir.file("disk.img"), 8 << 20);
  std::unique_ptr<core::registry> reg = transports::make_default_registry();
  std::unique_ptr<storage::Vstore> dev;

  void open() {
    std::string uri = storage::multipath_uri({"file://" + image, "file://" + image + "?engine=threads"},
                                             "check_interval=100ms&io_timeout=1s");
    auto v = storage::Vstore::open(*reg, uri);
    ASSERT_TRUE(v) << v.err().what();
    dev = std::move(*v);
  }
};

void pwrite_block(const std::string& path, uint64_t block, const std::vector<std::byte>& data) {
  int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(block * data.size())),
            static_cast<ssize_t>(data.size()));
  ::close(fd);
}

TEST(MultipathLoad, VerifiesACleanRun) {
  fixture f;
  ASSERT_NO_FATAL_FAILURE(f.open());
  load_options o;
  o.blocks = 256;
  o.queue_depth = 8;
  verified_load load(*f.dev, o);
  ASSERT_TRUE(load.prefill()) << load.last_error();
  load.start();
  std::this_thread::sleep_for(400ms);
  load.stop();
  EXPECT_GT(load.writes_acked(), 100u);
  EXPECT_GT(load.reads_checked(), 100u);
  EXPECT_EQ(load.errors(), 0u) << load.last_error();
  EXPECT_TRUE(load.problems().empty());
  EXPECT_TRUE(load.verify_device(*f.dev).empty());
  f.dev.reset();
  auto v = load.verify_image(f.image);
  EXPECT_TRUE(v.empty()) << v.front();
  auto g = load.longest_gap(load_clock::now() - 1s, load_clock::now());
  EXPECT_GE(g.length, 0us);

  // Every block was written (prefill): a block of zeros is a lost write.
  pwrite_block(f.image, 7, std::vector<std::byte>(o.block_size));
  v = load.verify_image(f.image);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_NE(v[0].find("block 7: reads as zeros"), std::string::npos) << v[0];
}

TEST(MultipathLoad, CatchesStaleTornMisplacedAndUnacknowledgedBlocks) {
  fixture f;
  ASSERT_NO_FATAL_FAILURE(f.open());
  load_options o;
  o.blocks = 64;  // small, so blocks are written several times
  o.queue_depth = 4;
  o.write_percent = 90;
  verified_load load(*f.dev, o);
  load.start();
  std::this_thread::sleep_for(300ms);
  load.stop();
  f.dev.reset();
  ASSERT_TRUE(load.verify_image(f.image).empty());

  // Read the current records back to build damaged copies from them.
  std::vector<block_record> recs(o.blocks);
  int fd = ::open(f.image.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<std::byte> buf(o.block_size);
  for (uint64_t b = 0; b < o.blocks; ++b) {
    ASSERT_EQ(::pread(fd, buf.data(), buf.size(), static_cast<off_t>(b * o.block_size)),
              static_cast<ssize_t>(buf.size()));
    ASSERT_EQ(parse_record(buf, b, &recs[b]), "");
  }
  ::close(fd);
  uint64_t stale = o.blocks, torn = 1, misplaced = 2, unacked = 3;
  for (uint64_t b = 4; b < o.blocks && stale == o.blocks; ++b)
    if (recs[b].gen > 1) stale = b;
  ASSERT_LT(stale, o.blocks) << "no block written twice";

  make_record(buf, recs[stale].gen - 1, stale);  // an older write of this block, landing late
  pwrite_block(f.image, stale, buf);
  make_record(buf, recs[torn].gen, torn);
  buf[o.block_size - 1] ^= std::byte{1};
  pwrite_block(f.image, torn, buf);
  make_record(buf, recs[0].gen, 0);  // block 0's record in block 2
  pwrite_block(f.image, misplaced, buf);
  make_record(buf, 1'000'000'000, unacked);
  pwrite_block(f.image, unacked, buf);

  auto v = load.verify_image(f.image);
  ASSERT_EQ(v.size(), 4u);
  std::string all;
  for (auto& p : v) all += p + "\n";
  EXPECT_NE(all.find("block " + std::to_string(stale) + ": stale generation"), std::string::npos) << all;
  EXPECT_NE(all.find("block 1: checksum mismatch"), std::string::npos) << all;
  EXPECT_NE(all.find("block 2: holds the record of block 0"), std::string::npos) << all;
  EXPECT_NE(all.find("block 3: generation 1000000000 was never acknowledged"), std::string::npos) << all;
}

// The failover program end to end on the host, without a fault: two file
// paths, no servers, both fencing through the image's record (fence=1), so
// the device must take the export (epoch 1). The guest tests run it with real
// servers and faults.
TEST(MpFailover, BaselineRunOverTwoFilePaths) {
  temp_dir dir;
  std::string image = make_sparse_file(dir.file("disk.img"), 8 << 20);
  auto r = run_cmd({UVD_MP_FAILOVER, "--fault", "none", "--path", "file://" + image + "?fence=1", "--path",
                    "file://" + image + "?engine=threads&fence=1", "--image", image, "--blocks", "256", "--qd", "8",
                    "--warm-ms", "300", "--after-ms", "300", "--logs", dir.path(), "--options",
                    "check_interval=250ms&io_timeout=1s&fence=required"},
                   60s);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("status=pass"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" epoch=1 fences=1 "), std::string::npos) << r.output;
}

}  // namespace
}  // namespace uvd::test
