// SPDX-License-Identifier: Apache-2.0
// Kill a writer at random moments and check what the overlay shows after.
//
// Each cycle starts cow_crash_writer on a file base + file overlay, lets it
// write (random offsets and sizes, partial blocks, copy-ups, in-place
// rewrites, 16 in flight) for a random time, SIGKILLs it, reopens the overlay
// and checks every 4 KiB unit of the disk:
//   - it holds exactly one write's data (or the base's): never zeros,
//     another offset's data or a torn unit, so a bitmap bit never went out
//     before the data it exposes;
//   - it holds the last acknowledged write covering it, or the one write
//     after that which may have been in flight: no acknowledged write is lost.
// The overlay carries over from cycle to cycle (a fresh one every 8 cycles),
// so kills land in copy-ups, in bitmap updates and in in-place rewrites.
//
// UVD_COW_CRASH_CYCLES sets the number of cycles (default 100; scripts/cow-soak
// runs 1000). UVD_COW_CRASH_SEED replays a run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "storage/cow/cow.hpp"
#include "tests/storage/cow/crash_plan.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

extern char** environ;

namespace uvd::storage {
namespace {

namespace cc = uvd::test::cow_crash;

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

struct child_run {
  std::vector<uint64_t> acks;  // generations acknowledged, in order
  int wait_status = 0;
  bool ready = false;
};

// Reads 8-byte records from fd until EOF; ready when the first arrived.
bool read_record(int fd, uint64_t* out, int timeout_ms) {
  char* p = reinterpret_cast<char*>(out);
  size_t got = 0;
  while (got < sizeof *out) {
    pollfd pfd{fd, POLLIN, 0};
    int pr = ::poll(&pfd, 1, timeout_ms);
    if (pr == 0) return false;
    if (pr < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    ssize_t n = ::read(fd, p + got, sizeof *out - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

child_run run_writer(const std::string& overlay, uint64_t seed, uint64_t gen0, uint32_t kill_after_us) {
  child_run out;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return out;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  // The write end goes to the child as fd 3 (dup2 clears close-on-exec).
  posix_spawn_file_actions_adddup2(&fa, fds[1], 3);
  std::string seed_s = std::to_string(seed), gen_s = std::to_string(gen0);
  const char* argv[] = {UVD_COW_CRASH_WRITER, overlay.c_str(), seed_s.c_str(), gen_s.c_str(), "16", "3", nullptr};
  pid_t pid = -1;
  int rc = posix_spawn(&pid, UVD_COW_CRASH_WRITER, &fa, nullptr, const_cast<char**>(argv), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    ADD_FAILURE() << "cannot start " << UVD_COW_CRASH_WRITER << ": " << std::strerror(rc);
    return out;
  }
  uint64_t rec = 0;
  out.ready = read_record(fds[0], &rec, 60000) && rec == cc::ack_ready;
  if (out.ready) {
    // Collect acknowledgements while the writer runs, then kill it.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kill_after_us);
    while (std::chrono::steady_clock::now() < deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (!read_record(fds[0], &rec, static_cast<int>(std::max<int64_t>(left.count(), 0)))) break;
      out.acks.push_back(rec);
    }
  }
  ::kill(pid, SIGKILL);
  while (read_record(fds[0], &rec, 60000)) out.acks.push_back(rec);
  ::close(fds[0]);
  while (::waitpid(pid, &out.wait_status, 0) < 0 && errno == EINTR) {
  }
  return out;
}

TEST(CowCrash, SigkillNeverLosesAcknowledgedWritesNorExposesTornBlocks) {
  const uint64_t cycles = env_u64("UVD_COW_CRASH_CYCLES", 100);
  const uint64_t seed0 = env_u64("UVD_COW_CRASH_SEED", std::random_device{}());
  SCOPED_TRACE("UVD_COW_CRASH_SEED=" + std::to_string(seed0));
  std::mt19937_64 rng(seed0);

  test::temp_dir dir;
  const std::string base_path = dir.file("base.img"), overlay = dir.file("overlay.cow");
  {
    int fd = ::open(base_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    std::vector<std::byte> data(cc::disk_size);
    for (uint64_t u = 0; u < cc::units; ++u) cc::fill_unit(data.data() + u * cc::unit, u * cc::unit, 0);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  auto base_sum = [&] {
    std::vector<std::byte> data(cc::disk_size);
    int fd = ::open(base_path.c_str(), O_RDONLY);
    EXPECT_EQ(::pread(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ::close(fd);
    return test::fnv1a(data);
  };
  const uint64_t base_before = base_sum();

  auto reg = transports::make_default_registry();
  cow_create_options co;
  co.block_size = cc::block_size;
  ASSERT_TRUE(create_cow_file(*reg, overlay, base_path, co));

  std::vector<int64_t> cur(cc::units, 0);  // generation each unit holds
  uint64_t gen0 = 1, killed = 0, acked_total = 0;
  std::vector<std::byte> disk(cc::disk_size);
  for (uint64_t cycle = 0; cycle < cycles; ++cycle) {
    if (cycle > 0 && cycle % 8 == 0) {
      // A fresh overlay now and then, so that kills keep landing in copy-ups
      // and bitmap updates, not only in rewrites of allocated blocks.
      ASSERT_EQ(::unlink(overlay.c_str()), 0);
      ASSERT_TRUE(create_cow_file(*reg, overlay, base_path, co));
      std::fill(cur.begin(), cur.end(), 0);
    }
    const uint64_t seed = rng();
    // Mostly short runs (kills land during the first copy-ups and while the
    // device opens), some longer ones (in-place rewrites, big batches).
    const uint32_t kill_after_us = static_cast<uint32_t>(rng() % 4 == 0 ? rng() % 150000 : rng() % 30000);
    child_run run = run_writer(overlay, seed, gen0, kill_after_us);
    ASSERT_TRUE(run.ready) << "cycle " << cycle << ": the writer never opened the device";
    const bool was_killed = WIFSIGNALED(run.wait_status) && WTERMSIG(run.wait_status) == SIGKILL;
    const bool finished = WIFEXITED(run.wait_status) && WEXITSTATUS(run.wait_status) == 0;
    ASSERT_TRUE(was_killed || finished) << "cycle " << cycle << ": writer ended with status " << run.wait_status;
    killed += was_killed;
    acked_total += run.acks.size();

    // Which units each planned write covers, in plan order.
    std::vector<std::vector<uint32_t>> cover(cc::units);
    std::vector<cc::write_op> plan(cc::writes_per_cycle);
    for (uint64_t k = 0; k < cc::writes_per_cycle; ++k) {
      plan[k] = cc::plan(seed, gen0, k);
      for (uint64_t at = plan[k].offset; at < plan[k].offset + plan[k].length; at += cc::unit)
        cover[at / cc::unit].push_back(static_cast<uint32_t>(k));
    }
    std::vector<uint8_t> acked(cc::writes_per_cycle, 0);
    for (uint64_t g : run.acks) {
      ASSERT_TRUE(g >= gen0 && g < gen0 + cc::writes_per_cycle) << "bogus ack record " << g;
      acked[g - gen0] = 1;
    }

    {
      open_options ro;
      ro.read_only = true;
      auto dev = Vstore::open(*reg, "cow://" + overlay, ro);
      ASSERT_TRUE(dev) << "cycle " << cycle << ": reopening after the kill: " << dev.err().what();
      ASSERT_TRUE((*dev)->read(0, disk.data(), disk.size()));
    }
    for (uint64_t u = 0; u < cc::units; ++u) {
      const int64_t found = cc::decode_unit(disk.data() + u * cc::unit, u * cc::unit);
      ASSERT_GE(found, 0) << "cycle " << cycle << ": unit at " << u * cc::unit
                          << " holds data of no write (torn, zeros or misplaced); it held generation " << cur[u];
      // The acknowledged writes covering u form a prefix of those planned.
      const auto& c = cover[u];
      size_t n_acked = 0;
      while (n_acked < c.size() && acked[c[n_acked]]) ++n_acked;
      for (size_t i = n_acked; i < c.size(); ++i)
        ASSERT_FALSE(acked[c[i]]) << "harness: write " << c[i] << " acknowledged before an earlier overlapping one";
      std::set<int64_t> allowed;
      if (n_acked == 0) allowed.insert(cur[u]);
      else allowed.insert(static_cast<int64_t>(plan[c[n_acked - 1]].gen));
      if (n_acked < c.size()) allowed.insert(static_cast<int64_t>(plan[c[n_acked]].gen));
      ASSERT_TRUE(allowed.count(found))
          << "cycle " << cycle << ": unit at " << u * cc::unit << " holds generation " << found << "; allowed: "
          << *allowed.begin() << (allowed.size() > 1 ? " or " + std::to_string(*allowed.rbegin()) : std::string())
          << (n_acked ? " (an acknowledged write was lost)" : "");
      cur[u] = found;
    }
    gen0 += cc::writes_per_cycle;
    if (cycle % 25 == 24) {
      ASSERT_EQ(base_sum(), base_before) << "the base changed";
    }
  }
  EXPECT_EQ(base_sum(), base_before) << "the base changed";
  auto rep = inspect_cow(*reg, overlay, true);
  ASSERT_TRUE(rep) << rep.err().what();
  EXPECT_TRUE(rep->base_ok) << rep->base_message;
  // The kills must have landed while writes were going on, or this tested nothing.
  EXPECT_GT(killed, cycles / 2) << "most writers finished before the kill";
  EXPECT_GT(acked_total, cycles) << "too few writes were acknowledged to mean anything";
  RecordProperty("cycles", static_cast<int>(cycles));
  RecordProperty("killed", static_cast<int>(killed));
  RecordProperty("acknowledged_writes", static_cast<int>(acked_total));
  std::printf("cow crash: %llu cycles, %llu killed mid-run, %llu acknowledged writes checked, %llu of %llu blocks allocated\n",
              static_cast<unsigned long long>(cycles), static_cast<unsigned long long>(killed),
              static_cast<unsigned long long>(acked_total), static_cast<unsigned long long>(rep->allocated),
              static_cast<unsigned long long>(rep->header.blocks()));
}

}  // namespace
}  // namespace uvd::storage
