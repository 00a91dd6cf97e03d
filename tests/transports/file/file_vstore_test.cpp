// SPDX-License-Identifier: Apache-2.0
// The file transport's control plane: open errors, probe, engine choice
// (including io_uring refused by seccomp), block devices (a loop device),
// the generic front half on top, and the plugin.
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/loop.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "core/registry.hpp"
#include "storage/vstore.hpp"
#include "tests/testutil.hpp"
#include "tests/transports/file/raw_disk.hpp"
#include "transports/file/file.hpp"
#include "transports/file/file_device.hpp"

namespace uvd::file {
namespace {

using test::raw_disk;

constexpr uint64_t MiB = 1 << 20;

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
}

bool all_zero(const std::vector<std::byte>& b, size_t from = 0, size_t n = SIZE_MAX) {
  for (size_t i = from; i < b.size() && i - from < n; ++i)
    if (b[i] != std::byte{0}) return false;
  return true;
}

std::vector<std::byte> pread_all(const std::string& path, uint64_t off, size_t n) {
  std::vector<std::byte> b(n);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  EXPECT_EQ(::pread(fd, b.data(), n, static_cast<off_t>(off)), static_cast<ssize_t>(n));
  ::close(fd);
  return b;
}

// Root ignores permission bits; for the length of a scope this thread does not.
class without_dac_override {
 public:
  without_dac_override() {
    if (::geteuid() != 0) return;
    hdr_.version = _LINUX_CAPABILITY_VERSION_3;
    hdr_.pid = 0;
    if (::syscall(SYS_capget, &hdr_, saved_) != 0) return;
    __user_cap_data_struct lowered[2];
    std::memcpy(lowered, saved_, sizeof lowered);
    lowered[0].effective &= ~((1u << CAP_DAC_OVERRIDE) | (1u << CAP_DAC_READ_SEARCH));
    active_ = ::syscall(SYS_capset, &hdr_, lowered) == 0;
  }
  ~without_dac_override() {
    if (active_) ::syscall(SYS_capset, &hdr_, saved_);
  }
  bool ok() const { return ::geteuid() != 0 || active_; }

 private:
  __user_cap_header_struct hdr_{};
  __user_cap_data_struct saved_[2]{};
  bool active_ = false;
};

TEST(FileOpen, MissingFileNamesThePath) {
  test::temp_dir dir;
  raw_disk d;
  EXPECT_EQ(d.open(file_vstore_ops, dir.file("nope.img"), ""), -ENOENT);
  EXPECT_EQ(std::string(d.errbuf()),
            "cannot open " + dir.file("nope.img") + " read-write: No such file or directory");
}

TEST(FileOpen, FoldersAndCharacterDevicesAreRefused) {
  test::temp_dir dir;
  raw_disk d;
  EXPECT_EQ(d.open(file_vstore_ops, dir.path(), ""), -EISDIR);
  EXPECT_NE(std::string(d.errbuf()).find("not a regular file or a block device"), std::string::npos) << d.errbuf();
  EXPECT_EQ(d.open(file_vstore_ops, "/dev/null", "", core::VSTORE_OPEN_READ_ONLY), -EINVAL);
  EXPECT_NE(std::string(d.errbuf()).find("/dev/null"), std::string::npos) << d.errbuf();
  EXPECT_EQ(d.open(file_vstore_ops, "", ""), -EINVAL);
  EXPECT_NE(std::string(d.errbuf()).find("no path"), std::string::npos) << d.errbuf();
}

TEST(FileOpen, BadOptionsAreRefusedByName) {
  test::temp_dir dir;
  auto path = test::make_sparse_file(dir.file("a.img"), MiB);
  raw_disk d;
  EXPECT_EQ(d.open(file_vstore_ops, path, "engine=fast"), -EINVAL);
  EXPECT_NE(std::string(d.errbuf()).find("engine=fast"), std::string::npos) << d.errbuf();
  EXPECT_EQ(d.open(file_vstore_ops, path, "cache=none"), -EINVAL);
  EXPECT_NE(std::string(d.errbuf()).find("'cache'"), std::string::npos) << d.errbuf();
}

TEST(FileOpen, ReadOnlyFileOpenedReadWriteSaysHowToOpenIt) {
  test::temp_dir dir;
  auto path = test::make_sparse_file(dir.file("golden.img"), MiB);
  ASSERT_EQ(::chmod(path.c_str(), 0444), 0);
  raw_disk d;
  {
    without_dac_override guard;
    ASSERT_TRUE(guard.ok()) << "cannot drop CAP_DAC_OVERRIDE to make the file's mode count";
    EXPECT_EQ(d.open(file_vstore_ops, path, ""), -EACCES);
    EXPECT_EQ(std::string(d.errbuf()),
              "cannot open " + path + " read-write: Permission denied (open it read-only with ro=1)");
    ASSERT_EQ(d.open(file_vstore_ops, path, "ro=1"), 0) << d.errbuf();
  }
  EXPECT_EQ(d.info().read_only, 1u);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(d.read(0, buf.data(), buf.size()), 0);
}

TEST(FileProbe, ListsRegularFilesAndBlockDevicesWithSizes) {
  test::temp_dir dir;
  test::make_sparse_file(dir.file("b.raw"), 4096);
  test::make_sparse_file(dir.file("a.img"), 3 * MiB);
  ASSERT_EQ(::mkdir(dir.file("sub").c_str(), 0755), 0);
  ASSERT_EQ(::mkfifo(dir.file("fifo").c_str(), 0644), 0);
  const std::string abs = real_path(dir.path());

  core::vstore_probe_entry out[4]{};
  ASSERT_EQ(file_vstore_ops.probe(dir.path().c_str(), out, 4), 2);
  EXPECT_EQ(std::string(out[0].uri), "file://" + abs + "/a.img");
  EXPECT_EQ(out[0].size, 3 * MiB);
  EXPECT_EQ(std::string(out[0].description), "regular file");
  EXPECT_EQ(std::string(out[1].uri), "file://" + abs + "/b.raw");
  EXPECT_EQ(out[1].size, 4096u);

  core::vstore_probe_entry one[2]{};
  EXPECT_EQ(file_vstore_ops.probe(dir.path().c_str(), one, 1), 2) << "the count says how many exist";
  EXPECT_EQ(std::string(one[0].uri), "file://" + abs + "/a.img");
  EXPECT_EQ(one[1].uri[0], '\0') << "only max entries are written";

  EXPECT_EQ(file_vstore_ops.probe(dir.file("b.raw").c_str(), out, 4), 1) << "a file names itself";
  EXPECT_EQ(file_vstore_ops.probe(dir.file("missing").c_str(), out, 4), -ENOENT);

  // Block devices in /dev (if any) are listed as such, with their rdev.
  std::vector<core::vstore_probe_entry> dev(4096);
  int n = file_vstore_ops.probe("/dev", dev.data(), static_cast<uint32_t>(dev.size()));
  ASSERT_GE(n, 0);
  for (int i = 0; i < std::min<int>(n, static_cast<int>(dev.size())); ++i) {
    std::string uri = dev[i].uri;
    ASSERT_EQ(uri.rfind("file:///dev/", 0), 0u) << uri;
    struct stat st{};
    ASSERT_EQ(::stat(uri.c_str() + 7, &st), 0) << uri;
    if (S_ISBLK(st.st_mode))
      EXPECT_EQ(std::string(dev[i].description),
                "block device " + std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev)));
    else
      EXPECT_TRUE(S_ISREG(st.st_mode)) << uri;
  }
}

// --- engine choice ---

// In a child process: io_uring_setup answers EPERM, as under a container's
// seccomp profile. Returns 0 when the transport coped, else which check failed.
int child_with_io_uring_refused(const std::string& path) {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
    return 10;
  {
    raw_disk d;
    if (d.open(file_vstore_ops, path, "engine=auto") != 0) return 11;
    if (std::string(file_device_of(d.handle()).engine->name()) != "threads") return 12;
    std::vector<std::byte> w(4096, std::byte{0x5A}), r(4096);
    if (d.write(8192, w.data(), w.size()) != 0 || d.read(8192, r.data(), r.size()) != 0 || r != w) return 13;
  }
  raw_disk d;
  if (d.open(file_vstore_ops, path, "engine=uring") != -EPERM) return 14;
  if (std::string(d.errbuf()).find("engine=threads") == std::string::npos) return 15;
  return 0;
}

TEST(FileEngineChoice, AutoFallsBackToThreadsWhenIoUringIsRefused) {
  test::temp_dir dir;
  auto path = test::make_sparse_file(dir.file("a.img"), MiB);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) ::_exit(child_with_io_uring_refused(path));
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died, status " << status;
  if (WEXITSTATUS(status) == 10) GTEST_SKIP() << "cannot install a seccomp filter here";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "11: auto failed to open; 12: auto did not pick threads; 13: I/O on threads"
                                       " failed; 14: engine=uring did not fail with EPERM; 15: its message does not"
                                       " point at engine=threads";
}

TEST(FileEngineChoice, AutoPrefersIoUring) {
  test::temp_dir dir;
  auto path = test::make_sparse_file(dir.file("a.img"), MiB);
  raw_disk ring;
  if (int rc = ring.open(file_vstore_ops, path, "engine=uring"); rc != 0)
    GTEST_SKIP() << "io_uring is refused on this host: " << ring.errbuf();
  raw_disk d;
  ASSERT_EQ(d.open(file_vstore_ops, path, ""), 0) << d.errbuf();
  EXPECT_STREQ(file_device_of(d.handle()).engine->name(), "uring");
}

// --- block devices ---

// A loop device over a scratch file, detached at scope exit.
class loop_device {
 public:
  loop_device(const std::string& backing, uint32_t block_size) {
    int ctl = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) {
      why_ = std::string("/dev/loop-control: ") + std::strerror(errno);
      return;
    }
    int bfd = ::open(backing.c_str(), O_RDWR | O_CLOEXEC);
    for (int attempt = 0; attempt < 8 && fd_ < 0 && bfd >= 0; ++attempt) {
      int n = ::ioctl(ctl, LOOP_CTL_GET_FREE);
      if (n < 0) {
        why_ = std::string("LOOP_CTL_GET_FREE: ") + std::strerror(errno);
        break;
      }
      path_ = "/dev/loop" + std::to_string(n);
      int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) {
        why_ = path_ + ": " + std::strerror(errno);
        break;
      }
      loop_config cfg{};
      cfg.fd = static_cast<uint32_t>(bfd);
      cfg.block_size = block_size;
      cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;  // gone with the last close, even if this test dies
      if (::ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
        fd_ = fd;
      } else {
        why_ = "LOOP_CONFIGURE " + path_ + ": " + std::strerror(errno);
        ::close(fd);
        if (errno != EBUSY) break;  // EBUSY: another user took it first
      }
    }
    if (bfd >= 0) ::close(bfd);
    ::close(ctl);
  }
  ~loop_device() {
    if (fd_ < 0) return;
    ::ioctl(fd_, LOOP_CLR_FD, 0);
    ::close(fd_);
  }
  bool ok() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }
  const std::string& why() const { return why_; }

 private:
  int fd_ = -1;
  std::string path_, why_;
};

TEST(FileBlockDevice, LoopDeviceGeometryDataDiscardAndWriteZeroes) {
  test::temp_dir dir;
  auto backing = test::make_sparse_file(dir.file("backing.img"), 8 * MiB);
  loop_device loop(backing, 4096);
  if (!loop.ok()) GTEST_SKIP() << "no loop device to test block devices with (" << loop.why() << ")";
  struct stat st{};
  ASSERT_EQ(::stat(loop.path().c_str(), &st), 0);

  for (const char* engine : {"uring", "threads"}) {
    SCOPED_TRACE(engine);
    raw_disk d;
    int rc = d.open(file_vstore_ops, loop.path(), std::string("engine=") + engine);
    if (rc != 0 && std::string(engine) == "uring" && std::string(d.errbuf()).find("io_uring") != std::string::npos)
      continue;  // io_uring refused on this host; the thread engine still runs
    ASSERT_EQ(rc, 0) << d.errbuf();
    const core::vstore_info& info = d.info();
    EXPECT_EQ(info.size, 8 * MiB);
    EXPECT_EQ(info.block_size, 4096u) << "BLKSSZGET";
    EXPECT_EQ(std::string(info.id),
              "file:rdev=" + std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev)));
    EXPECT_TRUE(info.features & core::VSTORE_F_DISCARD) << "a loop device over ext4 can discard";
    EXPECT_FALSE(info.features & core::VSTORE_F_DISCARD_ZEROES);
    EXPECT_TRUE(info.features & core::VSTORE_F_WRITE_ZEROES);

    std::vector<std::byte> data(256 * 1024);
    test::fill_pattern(data, 61, MiB);
    ASSERT_EQ(d.write(MiB, data.data(), data.size()), 0);
    ASSERT_EQ(d.flush(), 0);
    EXPECT_EQ(pread_all(backing, MiB, data.size()), data) << "the write went through the loop device";

    ASSERT_EQ(d.discard(MiB, 64 * 1024), 0);
    ASSERT_EQ(d.write_zeroes(MiB + 128 * 1024, 64 * 1024), 0);
    ASSERT_EQ(d.write_zeroes(MiB + 192 * 1024, 64 * 1024, core::VSTORE_REQ_NO_UNMAP), 0);
    std::vector<std::byte> back(data.size(), std::byte{0xAA});
    ASSERT_EQ(d.read(MiB, back.data(), back.size()), 0);
    EXPECT_TRUE(all_zero(back, 0, 64 * 1024)) << "loop discards by punching the backing file";
    EXPECT_EQ(test::find_pattern_mismatch(std::span(back).subspan(64 * 1024, 64 * 1024), 61, MiB + 64 * 1024), -1);
    EXPECT_TRUE(all_zero(back, 128 * 1024));
    if (std::string(engine) == "uring") {
      EXPECT_GE(file_device_of(d.handle()).stats.offloaded.load(), 1u) << "BLKDISCARD runs on the helper thread";
    }
  }
}

// --- under the generic front half ---

class FileVstoreTest : public ::testing::TestWithParam<const char*> {
 protected:
  core::result<std::unique_ptr<storage::Vstore>> open(const std::string& path, bool read_only = false) {
    storage::open_options o;
    o.options = std::string("engine=") + GetParam();
    o.read_only = read_only;
    o.queue_depth = 16;
    return storage::Vstore::open(file_vstore_ops, path, o);
  }
  test::temp_dir dir_;
};

TEST_P(FileVstoreTest, SplitsLargeRequestsAndReadsThemBack) {
  auto path = test::make_sparse_file(dir_.file("a.img"), 16 * MiB);
  auto v = open(path);
  if (!v && std::string(GetParam()) == "uring") GTEST_SKIP() << v.err().what();
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> data(5 * MiB + 4096);
  test::fill_pattern(data, 71, 512);
  ASSERT_TRUE((*v)->write(512, data.data(), data.size(), core::VSTORE_REQ_FUA));
  EXPECT_GT((*v)->stats().splits, 0u) << "bigger than max_transfer: the front half split it";
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE((*v)->read(512, back.data(), back.size()));
  EXPECT_EQ(test::find_pattern_mismatch(back, 71, 512), -1);
  EXPECT_TRUE((*v)->flush());
  EXPECT_EQ(pread_all(path, 512, data.size()), data);

  ASSERT_TRUE((*v)->discard(MiB, MiB));
  ASSERT_TRUE((*v)->write_zeroes(3 * MiB, MiB, core::VSTORE_REQ_NO_UNMAP));
  ASSERT_TRUE((*v)->read(512, back.data(), back.size()));
  EXPECT_TRUE(all_zero(back, MiB - 512, MiB));
  EXPECT_TRUE(all_zero(back, 3 * MiB - 512, MiB));
  EXPECT_EQ(test::find_pattern_mismatch(std::span(back).first(MiB - 512), 71, 512), -1);
  auto past_end = (*v)->write(16 * MiB, data.data(), 4096);
  ASSERT_FALSE(past_end);
  EXPECT_EQ(past_end.err().errnum(), ENOSPC);
}

TEST_P(FileVstoreTest, ReadOnlyDiskRefusesWritesWithErofs) {
  auto path = test::make_sparse_file(dir_.file("a.img"), MiB);
  auto v = open(path, true);
  if (!v && std::string(GetParam()) == "uring") GTEST_SKIP() << v.err().what();
  ASSERT_TRUE(v) << v.err().what();
  EXPECT_TRUE((*v)->read_only());
  std::vector<std::byte> buf(4096);
  auto w = (*v)->write(0, buf.data(), buf.size());
  ASSERT_FALSE(w);
  EXPECT_EQ(w.err().errnum(), EROFS);
  EXPECT_TRUE((*v)->read(0, buf.data(), buf.size()));
}

TEST_P(FileVstoreTest, OpensByUriThroughTheRegistry) {
  auto path = test::make_sparse_file(dir_.file("a.img"), 1000);
  core::registry reg;
  ASSERT_TRUE(reg.add_vstore(file_vstore_ops));
  auto v = storage::Vstore::open(reg, "file://" + path + "?engine=" + GetParam());
  if (!v && std::string(GetParam()) == "uring") GTEST_SKIP() << v.err().what();
  ASSERT_TRUE(v) << v.err().what();
  EXPECT_EQ((*v)->size(), 1024u);
  std::vector<std::byte> buf(1024, std::byte{0x11});
  ASSERT_TRUE((*v)->write(0, buf.data(), 512));
  std::vector<std::byte> back(1024, std::byte{0xAA});
  ASSERT_TRUE((*v)->read(0, back.data(), back.size()));
  EXPECT_TRUE(std::equal(back.begin(), back.begin() + 512, buf.begin()));
  EXPECT_TRUE(all_zero(back, 512)) << "past the 1000-byte file, zeros";
  auto bad = storage::Vstore::open(reg, "file://" + path + "?engine=nope");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.err().what().find("engine=nope"), std::string::npos) << bad.err().what();
}

// Rounds of disjoint writes, discards and write-zeroes in one batch each,
// then a batch of overlapping reads, all checked against a shadow copy. A
// small ring and queue keep the transport full and the front half waiting.
struct batch_waiter {
  std::mutex mu;
  std::condition_variable cv;
  size_t finished = 0;
};

struct batch_op {
  storage::vstore_io io;
  std::vector<std::byte> buf;
  iovec iov[3];
  int status = 1;
  batch_waiter* waiter = nullptr;

  static void done(storage::vstore_io* io, int status) {
    auto* self = static_cast<batch_op*>(io->user);
    batch_waiter& w = *self->waiter;
    {
      std::lock_guard lock(w.mu);
      self->status = status;
      ++w.finished;
    }
    w.cv.notify_all();
  }
};

// Submits the whole batch in one call and waits for every done().
void run_batch(storage::Vstore& v, std::vector<batch_op>& ops) {
  batch_waiter w;
  std::vector<storage::vstore_io*> ios;
  for (batch_op& x : ops) {
    x.waiter = &w;
    x.io.user = &x;
    x.io.done = &batch_op::done;
    ios.push_back(&x.io);
  }
  v.submit(ios);
  std::unique_lock lock(w.mu);
  ASSERT_TRUE(w.cv.wait_for(lock, std::chrono::seconds(60), [&] { return w.finished == ops.size(); }))
      << w.finished << " of " << ops.size() << " completed";
}

// Points a request's buffer at up to three uneven iovecs.
void cut_iov(batch_op& x, std::mt19937_64& rng) {
  const size_t len = x.buf.size();
  size_t a = rng() % (len + 1), b = rng() % (len + 1);
  if (a > b) std::swap(a, b);
  x.iov[0] = {x.buf.data(), a};
  x.iov[1] = {x.buf.data() + a, b - a};
  x.iov[2] = {x.buf.data() + b, len - b};
  x.io.iov = x.iov;
  x.io.iovcnt = 3;
}

TEST_P(FileVstoreTest, RandomBatchesMatchAShadowCopy) {
  constexpr uint64_t size = 32 * MiB, slot = 2 * MiB, block = 512;
  auto path = test::make_sparse_file(dir_.file("a.img"), size);
  storage::open_options o;
  o.options = std::string("engine=") + GetParam() + "&entries=8&threads=3";
  o.queue_depth = 12;
  auto v = storage::Vstore::open(file_vstore_ops, path, o);
  if (!v && std::string(GetParam()) == "uring") GTEST_SKIP() << v.err().what();
  ASSERT_TRUE(v) << v.err().what();

  std::vector<std::byte> shadow(size);
  std::mt19937_64 rng(20240611);
  for (int round = 0; round < 8; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // Ten distinct 2 MiB slots, one request inside each: no two overlap.
    std::vector<uint64_t> slots(size / slot);
    for (uint64_t i = 0; i < slots.size(); ++i) slots[i] = i;
    std::shuffle(slots.begin(), slots.end(), rng);
    std::vector<batch_op> writes(10);
    for (size_t i = 0; i < writes.size(); ++i) {
      batch_op& x = writes[i];
      const uint64_t start = slots[i] * slot + (rng() % (slot / block)) * block;
      x.io.offset = start;
      x.io.length = (1 + rng() % ((slots[i] * slot + slot - start) / block)) * block;
      const unsigned kind = rng() % 10;
      if (kind < 6) {
        x.io.opcode = core::VSTORE_OP_WRITE;
        x.io.flags = kind == 0 ? core::VSTORE_REQ_FUA : 0;
        x.buf.resize(x.io.length);
        test::fill_pattern(x.buf, rng(), x.io.offset);
        cut_iov(x, rng);
      } else if (kind < 8) {
        x.io.opcode = core::VSTORE_OP_DISCARD;
      } else {
        x.io.opcode = core::VSTORE_OP_WRITE_ZEROES;
        x.io.flags = kind == 8 ? core::VSTORE_REQ_NO_UNMAP : 0;
      }
    }
    ASSERT_NO_FATAL_FAILURE(run_batch(**v, writes));
    for (const batch_op& x : writes) {
      ASSERT_EQ(x.status, 0) << "op " << x.io.opcode << " at " << x.io.offset << "+" << x.io.length;
      if (x.io.opcode == core::VSTORE_OP_WRITE)
        std::copy(x.buf.begin(), x.buf.end(), shadow.begin() + static_cast<ptrdiff_t>(x.io.offset));
      else
        std::fill_n(shadow.begin() + static_cast<ptrdiff_t>(x.io.offset), x.io.length, std::byte{0});
    }

    std::vector<batch_op> reads(16);
    for (batch_op& x : reads) {
      x.io.opcode = core::VSTORE_OP_READ;
      x.io.offset = (rng() % (size / block)) * block;
      x.io.length = (1 + rng() % std::min<uint64_t>((size - x.io.offset) / block, 3 * slot / block)) * block;
      x.buf.assign(x.io.length, std::byte{0xAA});
      cut_iov(x, rng);
    }
    ASSERT_NO_FATAL_FAILURE(run_batch(**v, reads));
    for (const batch_op& x : reads) {
      ASSERT_EQ(x.status, 0);
      ASSERT_TRUE(std::equal(x.buf.begin(), x.buf.end(), shadow.begin() + static_cast<ptrdiff_t>(x.io.offset)))
          << "read at " << x.io.offset << "+" << x.io.length << " differs from what was written";
    }
  }
  EXPECT_TRUE((*v)->flush());
  EXPECT_EQ(pread_all(path, 0, size), shadow) << "the host file matches the shadow copy";
}

INSTANTIATE_TEST_SUITE_P(Engines, FileVstoreTest, ::testing::Values("uring", "threads"),
                         [](const auto& info) { return std::string(info.param); });

// --- the plugin ---

TEST(FilePlugin, LoadsThroughTheRegistryAndExportsOnlyItsEntry) {
  core::registry reg;
  auto loaded = reg.load_plugin(UVD_FILE_PLUGIN);
  ASSERT_TRUE(loaded) << loaded.err().what();
  auto ops = reg.vstore("file");
  ASSERT_TRUE(ops) << ops.err().what();
  EXPECT_STREQ((*ops)->name, "file");

  test::temp_dir dir;
  auto path = test::make_sparse_file(dir.file("a.img"), MiB);
  auto v = storage::Vstore::open(reg, "file://" + path);
  ASSERT_TRUE(v) << v.err().what();
  std::vector<std::byte> buf(4096, std::byte{0x42}), back(4096);
  ASSERT_TRUE((*v)->write(4096, buf.data(), buf.size()));
  ASSERT_TRUE((*v)->read(4096, back.data(), back.size()));
  EXPECT_EQ(back, buf);

  void* h = ::dlopen(UVD_FILE_PLUGIN, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  ASSERT_NE(h, nullptr) << "the registry keeps the plugin loaded";
  EXPECT_NE(::dlsym(h, "uvd_plugin_entry"), nullptr);
  EXPECT_EQ(::dlsym(h, "_ZN3uvd4file15file_vstore_opsE"), nullptr) << "the ops table stays hidden";
  EXPECT_EQ(::dlsym(h, "_ZN3uvd4core10parse_sizeESt17basic_string_viewIcSt11char_traitsIcEE"), nullptr)
      << "static libraries linked into the plugin stay hidden";
  ::dlclose(h);
}

}  // namespace
}  // namespace uvd::file
