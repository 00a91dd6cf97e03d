// SPDX-License-Identifier: Apache-2.0
// Power cuts at every step of every write: the overlay sits on a disk with a
// volatile write cache (sim_disk); before each request reaches that disk a
// snapshot is taken of what the disk could hold if power failed right then
// (all flushed data plus any subset of the unflushed 4 KiB units). Each
// snapshot is opened as an overlay and every 4 KiB unit of the disk must hold
// either what the acknowledged writes left there or the whole unit of the one
// write in flight. This is the check on the order "data, sync, bitmap, sync,
// acknowledge": a bit that reached media before its block would expose zeros
// or stale bytes, and an acknowledgement before a sync would lose the write.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "storage/cow/cow.hpp"
#include "tests/storage/cow/crash_plan.hpp"
#include "tests/storage/cow/sim_disk.hpp"
#include "transports/memory/memory.hpp"

namespace uvd::storage {
namespace {

namespace cc = uvd::test::cow_crash;

std::unique_ptr<Vstore> open_memory(uint64_t size) {
  auto v = Vstore::open(memory::memory_vstore_ops, std::to_string(size), {});
  EXPECT_TRUE(v) << v.err().what();
  return v ? std::move(*v) : nullptr;
}

void check_power_cuts(uint32_t block_size, uint64_t writes, uint64_t seed) {
  constexpr uint64_t size = 2ull << 20, units = size / cc::unit;
  std::shared_ptr<Vstore> base = open_memory(size);
  {
    std::vector<std::byte> data(size);
    for (uint64_t u = 0; u < units; ++u) cc::fill_unit(data.data() + u * cc::unit, u * cc::unit, 0);
    ASSERT_TRUE(base->write(0, data.data(), size));
  }
  auto ov_size = cow_overlay_size(size, block_size);
  ASSERT_TRUE(ov_size);
  test::sim_disk disk(*ov_size);
  cow_create_options co;
  co.block_size = block_size;
  {
    auto ov = disk.open();
    ASSERT_TRUE(format_cow(*ov, *base, "memory:base", co));
  }
  auto cow = open_cow(base, disk.open());
  ASSERT_TRUE(cow) << cow.err().what();

  std::mt19937_64 rng(seed), cut_rng(seed + 1);
  std::vector<std::vector<std::byte>> cuts;
  disk.set_hook([&] {
    if (cut_rng() % 2 == 0) cuts.push_back(disk.power_cut(cut_rng));
  });

  std::vector<int64_t> cur(units, 0);  // generation each unit holds once the acknowledged writes are in
  std::vector<std::byte> buf(64 * cc::unit), got(size);
  uint64_t checked = 0, saw_in_flight = 0;
  for (uint64_t gen = 1; gen <= writes; ++gen) {
    const uint64_t len_units = 1 + rng() % (rng() % 4 == 0 ? 40 : 6);
    const uint64_t first = rng() % (units - len_units + 1);
    for (uint64_t u = 0; u < len_units; ++u) cc::fill_unit(buf.data() + u * cc::unit, (first + u) * cc::unit, gen);
    cuts.clear();
    ASSERT_TRUE((*cow)->write(first * cc::unit, buf.data(), len_units * cc::unit)) << "write " << gen;

    for (const auto& image : cuts) {
      auto store = open_memory(*ov_size);
      ASSERT_TRUE(store->write(0, image.data(), image.size()));
      auto after = open_cow(base, std::move(store));
      ASSERT_TRUE(after) << "write " << gen << ": a power cut left an overlay that does not open: "
                         << after.err().what();
      ASSERT_TRUE((*after)->read(0, got.data(), size));
      for (uint64_t u = 0; u < units; ++u) {
        const int64_t found = cc::decode_unit(got.data() + u * cc::unit, u * cc::unit);
        const bool in_write = u >= first && u < first + len_units;
        if (in_write && found == static_cast<int64_t>(gen)) {
          ++saw_in_flight;
          continue;
        }
        ASSERT_EQ(found, cur[u]) << "write " << gen << ", block size " << block_size << ": after a power cut the unit at "
                                 << u * cc::unit << " holds "
                                 << (found < 0 ? std::string("no write's data (torn, zeros or stale)")
                                               : "generation " + std::to_string(found))
                                 << ", expected generation " << cur[u] << (in_write ? " or " + std::to_string(gen) : "");
      }
      ++checked;
    }
    for (uint64_t u = first; u < first + len_units; ++u) cur[u] = static_cast<int64_t>(gen);
  }
  disk.set_hook({});
  EXPECT_GT(checked, writes) << "too few power cuts were simulated";
  EXPECT_GT(saw_in_flight, 0u) << "no power cut ever caught a write half-way";
  EXPECT_GT(disk.flushes(), writes) << "writes were acknowledged without syncs";
}

TEST(CowPowerCut, EveryCutShowsAcknowledgedOrWholeInFlightData64K) { check_power_cuts(64 * 1024, 120, 1); }

TEST(CowPowerCut, EveryCutShowsAcknowledgedOrWholeInFlightData4K) { check_power_cuts(4096, 120, 2); }

}  // namespace
}  // namespace uvd::storage
