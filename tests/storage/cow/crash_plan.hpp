// SPDX-License-Identifier: Apache-2.0
#pragma once
// The crash test's plan, shared by the writer it kills (cow_crash_writer) and
// the checker (cow_crash_test): which writes a cycle makes, and what their
// data looks like. Every 4 KiB unit of data names its own offset and the
// generation of the write that put it there, so the checker tells old, new,
// misplaced and garbage content apart.
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace uvd::test::cow_crash {

inline constexpr uint64_t unit = 4096;
inline constexpr uint64_t disk_size = 8ull << 20;
inline constexpr uint64_t units = disk_size / unit;
inline constexpr uint32_t block_size = 64u << 10;
inline constexpr uint64_t units_per_block = block_size / unit;
inline constexpr uint64_t writes_per_cycle = 3000;
inline constexpr uint64_t magic = 0x4b534943574f4355ull;  // "UCOWCISK"
inline constexpr uint64_t ack_ready = ~uint64_t{0};      // first record on the ack pipe

inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct write_op {
  uint64_t offset = 0;  // bytes, unit-aligned
  uint64_t length = 0;  // bytes, whole units
  uint64_t gen = 0;     // generation: gen0 + index in the cycle (never 0: 0 is the base)
};

// Write k of the cycle started with (seed, gen0). A third stay inside one COW
// block (partial-block copy-ups), a third straddle a block boundary (partial
// head and tail), a third are large (whole blocks plus partial ends).
inline write_op plan(uint64_t seed, uint64_t gen0, uint64_t k) {
  uint64_t r1 = mix(seed * 0x100000001b3ull + k), r2 = mix(r1), r3 = mix(r2);
  write_op w;
  w.gen = gen0 + k;
  uint64_t len_units = 1, first = 0;
  switch (r1 % 3) {
    case 0: {  // within one block
      len_units = 1 + r2 % 4;
      uint64_t block = r3 % (units / units_per_block);
      first = block * units_per_block + (r3 >> 20) % (units_per_block - len_units + 1);
      break;
    }
    case 1: {  // across a block boundary
      len_units = 2 + r2 % 6;
      uint64_t boundary = 1 + r3 % (units / units_per_block - 1);
      uint64_t before = 1 + (r3 >> 24) % (len_units - 1);
      first = boundary * units_per_block - before;
      break;
    }
    default:  // large
      len_units = 8 + r2 % 40;
      first = r3 % (units - len_units + 1);
  }
  w.offset = first * unit;
  w.length = len_units * unit;
  return w;
}

// Unit at byte offset `at` written by generation `gen` (0: the base).
inline void fill_unit(std::byte* p, uint64_t at, uint64_t gen) {
  uint64_t words[unit / 8];
  words[0] = magic;
  words[1] = at;
  words[2] = gen;
  uint64_t s = mix(at * 31 + gen);
  for (size_t i = 3; i < unit / 8; ++i) words[i] = s = mix(s + i);
  std::memcpy(p, words, unit);
}

// The generation whose content the unit at `at` holds, or -1 for anything
// else (zeros, another offset's data, a torn unit).
inline int64_t decode_unit(const std::byte* p, uint64_t at) {
  uint64_t head[3];
  std::memcpy(head, p, sizeof head);
  if (head[0] != magic || head[1] != at || head[2] >= (uint64_t{1} << 62)) return -1;
  std::byte want[unit];
  fill_unit(want, at, head[2]);
  return std::memcmp(want, p, unit) == 0 ? static_cast<int64_t>(head[2]) : -1;
}

}  // namespace uvd::test::cow_crash
