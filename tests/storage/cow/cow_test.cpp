// SPDX-License-Identifier: Apache-2.0
// storage::Cow over the in-memory transport (shared bases, model checks,
// concurrency, media errors) and over files (reopen, wrong base, commit).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include "storage/cow/cow.hpp"
#include "tests/storage/cow/sim_disk.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"
#include "transports/memory/memory.hpp"

namespace uvd::storage {
namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * KiB;
constexpr uint64_t base_seed = 7;

std::vector<std::byte> pattern(uint64_t seed, uint64_t offset, uint64_t len) {
  std::vector<std::byte> v(len);
  test::fill_pattern(v, seed, offset);
  return v;
}

std::unique_ptr<Vstore> open_memory(uint64_t size, const std::string& options = {}) {
  open_options o;
  o.options = options;
  auto v = Vstore::open(memory::memory_vstore_ops, std::to_string(size), o);
  EXPECT_TRUE(v) << v.err().what();
  return v ? std::move(*v) : nullptr;
}

// A memory base of `size` bytes holding the base pattern.
std::shared_ptr<Vstore> make_base(uint64_t size, const std::string& options = {}) {
  std::shared_ptr<Vstore> b = open_memory(size, options);
  auto data = pattern(base_seed, 0, size);
  EXPECT_TRUE(b->write(0, data.data(), size));
  return b;
}

std::unique_ptr<Vstore> make_overlay_store(Vstore& base, uint32_t block_size, const std::string& options = {}) {
  auto size = cow_overlay_size(base.size(), block_size);
  EXPECT_TRUE(size);
  auto ov = open_memory(*size, options);
  cow_create_options co;
  co.block_size = block_size;
  auto h = format_cow(*ov, base, "memory:test", co);
  EXPECT_TRUE(h) << h.err().what();
  return ov;
}

std::unique_ptr<Vstore> make_cow(std::shared_ptr<Vstore> base, uint32_t block_size = 64 * KiB,
                                 const std::string& overlay_options = {}) {
  auto ov = make_overlay_store(*base, block_size, overlay_options);
  auto cow = open_cow(std::move(base), std::move(ov));
  EXPECT_TRUE(cow) << cow.err().what();
  return cow ? std::move(*cow) : nullptr;
}

uint64_t checksum(Vstore& v) {
  std::vector<std::byte> all(v.size());
  EXPECT_TRUE(v.read(0, all.data(), all.size()));
  return test::fnv1a(all);
}

std::vector<std::byte> read_all(Vstore& v) {
  std::vector<std::byte> all(v.size());
  auto r = v.read(0, all.data(), all.size());
  EXPECT_TRUE(r) << r.err().what();
  return all;
}

// Offset of the first difference, or -1.
int64_t first_diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return 0;
  auto m = std::mismatch(a.begin(), a.end(), b.begin());
  return m.first == a.end() ? -1 : m.first - a.begin();
}

TEST(Cow, FreshOverlayReadsTheBase) {
  auto base = make_base(4 * MiB);
  auto cow = make_cow(base);
  ASSERT_TRUE(cow);
  EXPECT_EQ(cow->size(), 4 * MiB);
  EXPECT_EQ(first_diff(read_all(*cow), pattern(base_seed, 0, 4 * MiB)), -1);
  EXPECT_TRUE(cow->has(core::VSTORE_F_FLUSH));
  EXPECT_EQ(std::string(cow->info().id).substr(0, 4), "cow:");
}

TEST(Cow, TwoOverlaysOnOneBaseDivergeIndependently) {
  auto base = make_base(4 * MiB);
  const uint64_t sum = checksum(*base);
  auto a = make_cow(base), b = make_cow(base);
  ASSERT_TRUE(a && b);
  auto wa = pattern(100, 0, 256 * KiB), wb = pattern(200, 0, 256 * KiB);
  ASSERT_TRUE(a->write(64 * KiB, wa.data(), wa.size()));
  ASSERT_TRUE(b->write(128 * KiB, wb.data(), wb.size()));
  ASSERT_TRUE(b->write(3 * MiB + 4 * KiB, wb.data(), 8 * KiB));

  auto ma = pattern(base_seed, 0, 4 * MiB), mb = ma;
  std::memcpy(ma.data() + 64 * KiB, wa.data(), wa.size());
  std::memcpy(mb.data() + 128 * KiB, wb.data(), wb.size());
  std::memcpy(mb.data() + 3 * MiB + 4 * KiB, wb.data(), 8 * KiB);
  EXPECT_EQ(first_diff(read_all(*a), ma), -1);
  EXPECT_EQ(first_diff(read_all(*b), mb), -1);
  EXPECT_EQ(checksum(*base), sum) << "a COW device wrote to its base";
  a.reset();
  EXPECT_EQ(first_diff(read_all(*b), mb), -1) << "closing one overlay changed the other";
  EXPECT_EQ(checksum(*base), sum);
}

TEST(Cow, PartialBlockWritesKeepTheSurroundingBaseBytes) {
  auto base = make_base(2 * MiB);
  auto cow = make_cow(base, 64 * KiB);
  ASSERT_TRUE(cow);
  auto model = pattern(base_seed, 0, 2 * MiB);
  struct piece {
    uint64_t off, len;
  } pieces[] = {
      {512, 512},                       // inside block 0
      {64 * KiB - 1024, 2048},          // straddles blocks 0 and 1
      {3 * 64 * KiB + 4 * KiB, 200 * KiB},  // partial head, whole blocks, partial tail
      {10 * 64 * KiB, 64 * KiB},        // exactly one block
      {12 * 64 * KiB + 512, 64 * KiB},  // one block's worth, misaligned: two partial blocks
      {2 * MiB - 512, 512},             // the last sector
  };
  uint64_t seed = 300;
  for (const auto& p : pieces) {
    auto data = pattern(seed, p.off, p.len);
    ASSERT_TRUE(cow->write(p.off, data.data(), p.len)) << "at " << p.off;
    std::memcpy(model.data() + p.off, data.data(), p.len);
    EXPECT_EQ(first_diff(read_all(*cow), model), -1) << "after writing " << p.len << " bytes at " << p.off;
    ++seed;
  }
  // A second partial write into an allocated block is an in-place write.
  auto again = pattern(999, 700 * 1024, 1024);
  ASSERT_TRUE(cow->write(3 * 64 * KiB + 1024, again.data(), again.size()));
  std::memcpy(model.data() + 3 * 64 * KiB + 1024, again.data(), again.size());
  EXPECT_EQ(first_diff(read_all(*cow), model), -1);
}

TEST(Cow, LastBlockShorterThanTheBlockSize) {
  const uint64_t size = 1 * MiB + 12 * KiB;  // 16 full 64 KiB blocks and a 12 KiB one
  auto base = make_base(size);
  auto cow = make_cow(base, 64 * KiB);
  ASSERT_TRUE(cow);
  auto model = pattern(base_seed, 0, size);
  auto d1 = pattern(41, 0, 4 * KiB);
  ASSERT_TRUE(cow->write(size - 8 * KiB, d1.data(), d1.size()));
  std::memcpy(model.data() + size - 8 * KiB, d1.data(), d1.size());
  auto d2 = pattern(42, 0, 16 * KiB);
  ASSERT_TRUE(cow->write(size - 16 * KiB, d2.data(), d2.size()));  // spans the last two blocks
  std::memcpy(model.data() + size - 16 * KiB, d2.data(), d2.size());
  EXPECT_EQ(first_diff(read_all(*cow), model), -1);
}

TEST(Cow, WriteZeroesAndDiscardHideTheBase) {
  auto base = make_base(2 * MiB);
  auto cow = make_cow(base, 64 * KiB);
  ASSERT_TRUE(cow);
  EXPECT_TRUE(cow->has(core::VSTORE_F_DISCARD_ZEROES));
  auto model = pattern(base_seed, 0, 2 * MiB);
  ASSERT_TRUE(cow->write_zeroes(4 * KiB, 8 * KiB));  // partial block
  std::memset(model.data() + 4 * KiB, 0, 8 * KiB);
  ASSERT_TRUE(cow->write_zeroes(100 * KiB, 300 * KiB, core::VSTORE_REQ_NO_UNMAP));  // partial + whole blocks
  std::memset(model.data() + 100 * KiB, 0, 300 * KiB);
  ASSERT_TRUE(cow->discard(1 * MiB, 128 * KiB));  // whole blocks
  std::memset(model.data() + 1 * MiB, 0, 128 * KiB);
  auto d = pattern(5, 0, 64 * KiB);
  ASSERT_TRUE(cow->write(1536 * KiB, d.data(), d.size()));  // allocate, then zero in place
  ASSERT_TRUE(cow->write_zeroes(1536 * KiB + 512, 1024));
  std::memcpy(model.data() + 1536 * KiB, d.data(), d.size());
  std::memset(model.data() + 1536 * KiB + 512, 0, 1024);
  EXPECT_EQ(first_diff(read_all(*cow), model), -1);
}

TEST(Cow, RandomOperationsMatchAModel) {
  for (uint32_t block_size : {4 * 1024u, 64 * 1024u}) {
    SCOPED_TRACE("block size " + std::to_string(block_size));
    const uint64_t size = 3 * MiB;
    auto base = make_base(size);
    auto cow = make_cow(base, block_size);
    ASSERT_TRUE(cow);
    auto model = pattern(base_seed, 0, size);
    std::mt19937_64 rng(block_size);
    for (int i = 0; i < 400; ++i) {
      uint64_t len = (1 + rng() % 384) * 512;
      uint64_t off = (rng() % ((size - len) / 512 + 1)) * 512;
      switch (rng() % 6) {
        case 0:
        case 1:
        case 2: {  // a write in up to three segments
          auto data = pattern(1000 + i, off, len);
          std::vector<iovec> iov;
          uint64_t at = 0;
          while (at < len) {
            uint64_t n = iov.size() == 2 ? len - at : std::min<uint64_t>(len - at, (1 + rng() % 64) * 512);
            iov.push_back({data.data() + at, n});
            at += n;
          }
          ASSERT_TRUE(cow->writev(off, iov, rng() % 4 == 0 ? core::VSTORE_REQ_FUA : 0));
          std::memcpy(model.data() + off, data.data(), len);
          break;
        }
        case 3:
          ASSERT_TRUE(rng() % 2 ? cow->write_zeroes(off, len) : cow->discard(off, len));
          std::memset(model.data() + off, 0, len);
          break;
        case 4: {  // a read in two segments
          std::vector<std::byte> a(len / 2 / 512 * 512), b(len - a.size());
          std::vector<iovec> iov;
          if (!a.empty()) iov.push_back({a.data(), a.size()});
          iov.push_back({b.data(), b.size()});
          ASSERT_TRUE(cow->readv(off, iov));
          ASSERT_EQ(std::memcmp(a.data(), model.data() + off, a.size()), 0) << "read at " << off;
          ASSERT_EQ(std::memcmp(b.data(), model.data() + off + a.size(), b.size()), 0) << "read at " << off;
          break;
        }
        default:
          ASSERT_TRUE(cow->flush());
      }
    }
    EXPECT_EQ(first_diff(read_all(*cow), model), -1);
    EXPECT_EQ(checksum(*base), test::fnv1a(pattern(base_seed, 0, size)));
  }
}

// Writers race for the same unallocated blocks. Each owns some 4 KiB units of
// every block; a copy-up that is not serialised would bring back base bytes
// over another writer's acknowledged data.
TEST(Cow, ConcurrentWritersToTheSameBlocks) {
  const uint64_t size = 4 * MiB, block = 64 * KiB, unit = 4 * KiB;
  auto base = make_base(size, "async=1");
  auto cow = make_cow(base, block, "async=1");
  ASSERT_TRUE(cow);
  constexpr int writers = 6;  // units 0..11 of each block; 12..15 stay base
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < writers; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<uint64_t> blocks(size / block);
      for (uint64_t i = 0; i < blocks.size(); ++i) blocks[i] = i;
      std::shuffle(blocks.begin(), blocks.end(), rng);
      for (uint64_t b : blocks) {
        uint64_t off = b * block + static_cast<uint64_t>(t) * 2 * unit;
        auto data = pattern(500 + t, off, 2 * unit);
        if (!cow->write(off, data.data(), data.size())) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);
  auto all = read_all(*cow);
  for (uint64_t b = 0; b < size / block; ++b) {
    for (uint64_t u = 0; u < block / unit; ++u) {
      uint64_t off = b * block + u * unit;
      int t = static_cast<int>(u / 2);
      uint64_t seed = t < writers ? 500 + t : base_seed;
      ASSERT_EQ(test::find_pattern_mismatch({all.data() + off, unit}, seed, off), -1)
          << "block " << b << " unit " << u << " should hold " << (t < writers ? "writer " + std::to_string(t) : "the base");
    }
  }
}

// Writers overwrite the same ranges with their own data: every 4 KiB unit
// must end up holding one writer's whole unit, never a mix with the base.
TEST(Cow, OverlappingConcurrentWritesLeaveWholeUnits) {
  const uint64_t size = 2 * MiB, unit = 4 * KiB;
  auto base = make_base(size, "async=1");
  auto cow = make_cow(base, 64 * KiB, "async=1");
  ASSERT_TRUE(cow);
  constexpr int writers = 4;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < writers; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t off = 8 * KiB; off + 24 * KiB <= size; off += 96 * KiB) {
        auto data = pattern(700 + t, off, 24 * KiB);
        if (!cow->write(off, data.data(), data.size())) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);
  auto all = read_all(*cow);
  for (uint64_t off = 0; off < size; off += unit) {
    bool written = (off % (96 * KiB)) >= 8 * KiB && (off % (96 * KiB)) < 32 * KiB && off + unit <= size;
    bool ok = false;
    if (!written) ok = test::find_pattern_mismatch({all.data() + off, unit}, base_seed, off) == -1;
    for (int t = 0; written && t < writers && !ok; ++t)
      ok = test::find_pattern_mismatch({all.data() + off, unit}, 700 + t, off) == -1;
    ASSERT_TRUE(ok) << "unit at " << off << " is torn or lost";
  }
}

TEST(Cow, ReadOnlyDeviceRefusesWrites) {
  auto base = make_base(1 * MiB);
  auto ov = make_overlay_store(*base, 64 * KiB);
  open_options ro;
  ro.read_only = true;
  auto cow = open_cow(base, std::move(ov), ro);
  ASSERT_TRUE(cow) << cow.err().what();
  EXPECT_TRUE((*cow)->read_only());
  auto d = pattern(1, 0, 4096);
  auto w = (*cow)->write(0, d.data(), d.size());
  ASSERT_FALSE(w);
  EXPECT_EQ(w.err().errnum(), EROFS);
  EXPECT_TRUE((*cow)->flush());
}

TEST(Cow, DataWriteErrorLeavesTheBlockUnallocated) {
  auto base = make_base(1 * MiB);
  auto h = make_cow_header(base->size(), 64 * KiB, {}, {});  // the layout only depends on size and block size
  ASSERT_TRUE(h);
  // Block 3's slot in the overlay fails; everything else works.
  const uint64_t bad = h->data_offset + 3 * 64 * KiB + 8 * KiB;
  auto cow = make_cow(base, 64 * KiB, "fail_offset=" + std::to_string(bad));
  ASSERT_TRUE(cow);
  auto d = pattern(9, 0, 4 * KiB);
  auto w = cow->write(3 * 64 * KiB, d.data(), d.size());
  ASSERT_FALSE(w);
  EXPECT_EQ(w.err().errnum(), EIO);
  std::vector<std::byte> got(64 * KiB);
  ASSERT_TRUE(cow->read(3 * 64 * KiB, got.data(), got.size()));
  EXPECT_EQ(test::find_pattern_mismatch(got, base_seed, 3 * 64 * KiB), -1) << "a failed write exposed its block";
  // Other blocks still work.
  ASSERT_TRUE(cow->write(5 * 64 * KiB, d.data(), d.size()));
  ASSERT_TRUE(cow->read(5 * 64 * KiB, got.data(), 4 * KiB));
  EXPECT_EQ(std::memcmp(got.data(), d.data(), d.size()), 0);
}

TEST(Cow, BitmapWriteErrorStopsWritesButNotReads) {
  auto base = make_base(1 * MiB);
  auto size = cow_overlay_size(base->size(), 64 * KiB);
  ASSERT_TRUE(size);
  test::sim_disk disk(*size);
  auto ov = disk.open();
  ASSERT_TRUE(ov);
  auto h = format_cow(*ov, *base, "memory:test");
  ASSERT_TRUE(h) << h.err().what();
  auto cow = open_cow(base, std::move(ov));
  ASSERT_TRUE(cow) << cow.err().what();
  auto d = pattern(9, 0, 4 * KiB);
  ASSERT_TRUE((*cow)->write(128 * KiB, d.data(), d.size()));
  disk.fail_writes(h->bitmap_offset, h->bitmap_offset + h->bitmap_length);
  ASSERT_TRUE((*cow)->write(128 * KiB + 4 * KiB, d.data(), d.size())) << "an in-place write needs no bitmap";
  auto w = (*cow)->write(0, d.data(), d.size());
  ASSERT_FALSE(w);
  EXPECT_EQ(w.err().errnum(), EIO);
  disk.fail_writes(0, 0);
  auto w2 = (*cow)->write(256 * KiB, d.data(), d.size());
  ASSERT_FALSE(w2) << "a write was accepted after the bitmap could not be written";
  std::vector<std::byte> got(64 * KiB);
  ASSERT_TRUE((*cow)->read(0, got.data(), got.size()));
  EXPECT_EQ(test::find_pattern_mismatch(got, base_seed, 0), -1);
  ASSERT_TRUE((*cow)->read(128 * KiB + 4 * KiB, got.data(), 4 * KiB));
  EXPECT_EQ(std::memcmp(got.data(), d.data(), d.size()), 0);
}

// ---- header validation ------------------------------------------------------

struct corrupt_case {
  const char* name;
  void (*mutate)(cow_header& h, std::vector<std::byte>& bytes);  // bytes: header + bitmap
  bool reseal;       // encode the mutated header again (valid checksum)
  const char* says;  // part of the error message
};

std::vector<std::byte> image_of(const cow_header& h) {
  std::vector<std::byte> img(h.bitmap_offset + h.bitmap_length);
  auto enc = encode_cow_header(h);
  std::memcpy(img.data(), enc.data(), enc.size());
  return img;
}

TEST(CowFormat, HeaderRoundTrips) {
  cow_fingerprint fp;
  fp.bytes[3] = 42;
  auto h = make_cow_header(10 * MiB + 4096, 64 * KiB, fp, "file:///images/base.img");
  ASSERT_TRUE(h);
  auto img = image_of(*h);
  auto st = load_cow_state(img, h->store_size());
  ASSERT_TRUE(st) << st.err().what();
  EXPECT_EQ(st->header.virtual_size, 10 * MiB + 4096);
  EXPECT_EQ(st->header.block_size, 64 * KiB);
  EXPECT_EQ(st->header.base_uri, "file:///images/base.img");
  EXPECT_EQ(st->header.base_fingerprint, fp);
  EXPECT_EQ(st->header.blocks(), 161u);
  EXPECT_EQ(st->header.data_offset % (64 * KiB), 0u);
  EXPECT_EQ(st->allocated, 0u);
  img[h->bitmap_offset] = std::byte{0x05};
  st = load_cow_state(img, h->store_size());
  ASSERT_TRUE(st);
  EXPECT_EQ(st->allocated, 2u);
}

TEST(CowFormat, CorruptHeadersAreRefused) {
  const corrupt_case cases[] = {
      {"bad magic", [](cow_header&, std::vector<std::byte>& b) { b[0] = std::byte{'X'}; }, false, "bad magic"},
      {"flipped bit", [](cow_header&, std::vector<std::byte>& b) { b[30] ^= std::byte{1}; }, false, "checksum"},
      {"uri byte changed", [](cow_header&, std::vector<std::byte>& b) { b[100] ^= std::byte{0x20}; }, false, "checksum"},
      {"version 2", [](cow_header& h, std::vector<std::byte>&) { h.version = 2; }, true, "version 2"},
      {"block size not a power of two", [](cow_header& h, std::vector<std::byte>&) { h.block_size = 65000; }, true,
       "block size"},
      {"block size too small", [](cow_header& h, std::vector<std::byte>&) { h.block_size = 512; }, true, "block size"},
      {"unknown flag", [](cow_header& h, std::vector<std::byte>&) { h.flags = 4; }, true, "flags"},
      {"zero size", [](cow_header& h, std::vector<std::byte>&) { h.virtual_size = h.base_size = 0; }, true,
       "virtual size"},
      {"huge size", [](cow_header& h, std::vector<std::byte>&) { h.virtual_size = h.base_size = ~0ull; }, true,
       "virtual size"},
      {"sizes differ", [](cow_header& h, std::vector<std::byte>&) { h.base_size += 4096; }, true, "base size"},
      {"bitmap too short", [](cow_header& h, std::vector<std::byte>&) { h.bitmap_length -= 4096; }, true,
       "bitmap length"},
      {"bitmap offset", [](cow_header& h, std::vector<std::byte>&) { h.bitmap_offset = 8192; }, true,
       "bitmap offset"},
      {"data overlaps bitmap", [](cow_header& h, std::vector<std::byte>&) { h.data_offset = 4096; }, true,
       "data offset"},
      {"stray bitmap bit",
       [](cow_header& h, std::vector<std::byte>& b) { b[h.bitmap_offset + (h.blocks() + 7) / 8 + 5] = std::byte{1}; },
       false, "bitmap marks block"},
      {"reserved byte", [](cow_header&, std::vector<std::byte>& b) { b[84] = std::byte{1}; }, false, "checksum"},
  };
  auto good = make_cow_header(8 * MiB + 64 * KiB * 3, 64 * KiB, {}, "file:///base.img");  // 131 blocks
  ASSERT_TRUE(good);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    cow_header h = *good;
    std::vector<std::byte> img = image_of(h);
    c.mutate(h, img);
    if (c.reseal) {
      auto enc = encode_cow_header(h);
      std::memcpy(img.data(), enc.data(), enc.size());
    }
    auto st = load_cow_state(img, good->store_size());
    ASSERT_FALSE(st) << "accepted a corrupt overlay";
    EXPECT_NE(st.err().message.find(c.says), std::string::npos) << st.err().message;
    EXPECT_TRUE(st.err().errnum() == EUCLEAN || st.err().errnum() == ENOTSUP) << st.err().errnum();
  }
  // A store shorter than its layout, a truncated image, an empty one.
  auto img = image_of(*good);
  auto st = load_cow_state(img, good->store_size() - 64 * KiB);
  ASSERT_FALSE(st);
  EXPECT_NE(st.err().message.find("truncated"), std::string::npos) << st.err().message;
  st = load_cow_state(std::span<const std::byte>(img).first(good->bitmap_offset + 100), good->store_size());
  ASSERT_FALSE(st);
  EXPECT_NE(st.err().message.find("truncated"), std::string::npos) << st.err().message;
  st = load_cow_state(std::span<const std::byte>(img).first(10), good->store_size());
  ASSERT_FALSE(st);
}

TEST(CowFormat, OpeningACorruptOverlayFailsClearly) {
  auto base = make_base(1 * MiB);
  auto ov = make_overlay_store(*base, 64 * KiB);
  std::vector<std::byte> hdr(4096);
  ASSERT_TRUE(ov->read(0, hdr.data(), hdr.size()));
  hdr[40] ^= std::byte{0x10};  // the bitmap offset, checksum left stale
  ASSERT_TRUE(ov->write(0, hdr.data(), hdr.size()));
  auto cow = open_cow(base, std::move(ov));
  ASSERT_FALSE(cow);
  EXPECT_EQ(cow.err().errnum(), EUCLEAN);
  EXPECT_NE(cow.err().message.find("checksum"), std::string::npos) << cow.err().message;

  auto blank = open_memory(*cow_overlay_size(base->size(), 64 * KiB));
  auto cow2 = open_cow(base, std::move(blank));
  ASSERT_FALSE(cow2);
  EXPECT_NE(cow2.err().message.find("not a uvd COW overlay"), std::string::npos) << cow2.err().message;
}

TEST(CowFormat, WrongBaseIsRefused) {
  auto base = make_base(1 * MiB);
  auto ov = make_overlay_store(*base, 64 * KiB);
  std::shared_ptr<Vstore> other = open_memory(1 * MiB);
  auto data = pattern(base_seed, 0, 1 * MiB);
  data[1000] ^= std::byte{1};  // one byte in the first 64 KiB, which the fingerprint always covers
  ASSERT_TRUE(other->write(0, data.data(), data.size()));
  auto cow = open_cow(other, std::move(ov));
  ASSERT_FALSE(cow);
  EXPECT_EQ(cow.err().errnum(), EMEDIUMTYPE);
  EXPECT_NE(cow.err().message.find("is not the image overlay"), std::string::npos) << cow.err().message;
}

// ---- files -------------------------------------------------------------------

class CowFile : public ::testing::Test {
 protected:
  void SetUp() override {
    reg_ = transports::make_default_registry();
    base_path_ = dir_.file("base.img");
    write_file(base_path_, pattern(base_seed, 0, size_));
    overlay_ = dir_.file("guest.cow");
  }
  static void write_file(const std::string& path, const std::vector<std::byte>& data) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0) << path;
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  static std::vector<std::byte> read_file(const std::string& path) {
    std::vector<std::byte> data(std::filesystem::file_size(path));
    int fd = ::open(path.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0) << path;
    EXPECT_EQ(::pread(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ::close(fd);
    return data;
  }
  std::unique_ptr<Vstore> open_dev(const std::string& uri, bool ro = false) {
    open_options o;
    o.read_only = ro;
    auto v = Vstore::open(*reg_, uri, o);
    EXPECT_TRUE(v) << v.err().what();
    return v ? std::move(*v) : nullptr;
  }

  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
  std::string base_path_, overlay_;
  const uint64_t size_ = 6 * MiB;
};

TEST_F(CowFile, OverlayPersistsAcrossReopen) {
  auto h = create_cow_file(*reg_, overlay_, base_path_);
  ASSERT_TRUE(h) << h.err().what();
  EXPECT_EQ(h->base_uri, "file://" + std::filesystem::absolute(base_path_).lexically_normal().string());
  auto again = create_cow_file(*reg_, overlay_, base_path_);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.err().errnum(), EEXIST);

  auto model = pattern(base_seed, 0, size_);
  {
    auto cow = open_dev("cow://" + overlay_);
    ASSERT_TRUE(cow);
    auto d = pattern(11, 0, 300 * KiB);
    ASSERT_TRUE(cow->write(1 * MiB + 512, d.data(), d.size()));
    std::memcpy(model.data() + 1 * MiB + 512, d.data(), d.size());
    ASSERT_TRUE(cow->write_zeroes(5 * MiB, 64 * KiB));
    std::memset(model.data() + 5 * MiB, 0, 64 * KiB);
  }
  {
    auto cow = open_dev("cow://" + overlay_);
    ASSERT_TRUE(cow);
    EXPECT_EQ(first_diff(read_all(*cow), model), -1);
    auto d = pattern(12, 0, 4 * KiB);
    ASSERT_TRUE(cow->write(1 * MiB + 8 * KiB, d.data(), d.size()));  // in place, after reopen
    std::memcpy(model.data() + 1 * MiB + 8 * KiB, d.data(), d.size());
  }
  auto cow = open_dev("cow:" + overlay_, true);  // also a relative-style address
  ASSERT_TRUE(cow);
  EXPECT_EQ(first_diff(read_all(*cow), model), -1);
  EXPECT_EQ(test::fnv1a(read_file(base_path_)), test::fnv1a(pattern(base_seed, 0, size_)));

  auto rep = inspect_cow(*reg_, overlay_, true);
  ASSERT_TRUE(rep) << rep.err().what();
  EXPECT_TRUE(rep->base_ok) << rep->base_message;
  EXPECT_EQ(rep->allocated, 6u);  // blocks 16..20 (1 MiB + 512 .. + 300 KiB) and 80; the rewrite was in place
}

TEST_F(CowFile, WrongBaseIsRefusedWithAClearError) {
  ASSERT_TRUE(create_cow_file(*reg_, overlay_, base_path_));
  // Same size, different content.
  const std::string same_size = dir_.file("other.img");
  write_file(same_size, pattern(base_seed + 1, 0, size_));
  auto v = Vstore::open(*reg_, "cow://" + overlay_ + "?base=file://" + same_size);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.err().errnum(), EMEDIUMTYPE);
  EXPECT_NE(v.err().message.find("is not the image overlay"), std::string::npos) << v.err().message;
  EXPECT_NE(v.err().message.find("other.img"), std::string::npos) << v.err().message;

  // Different size.
  const std::string smaller = dir_.file("small.img");
  write_file(smaller, pattern(base_seed, 0, size_ - 1 * MiB));
  v = Vstore::open(*reg_, "cow://" + overlay_ + "?base=" + smaller);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.err().errnum(), EMEDIUMTYPE);
  EXPECT_NE(v.err().message.find("was made for a base of " + std::to_string(size_) + " bytes"), std::string::npos)
      << v.err().message;

  // The recorded base replaced by a different image in place.
  write_file(base_path_, pattern(base_seed + 2, 0, size_));
  v = Vstore::open(*reg_, "cow://" + overlay_);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.err().errnum(), EMEDIUMTYPE);
  auto rep = inspect_cow(*reg_, overlay_, true);
  ASSERT_TRUE(rep);
  EXPECT_FALSE(rep->base_ok);
  EXPECT_NE(rep->base_message.find("fingerprint"), std::string::npos) << rep->base_message;
}

TEST_F(CowFile, ACopiedBaseStillMatches) {
  ASSERT_TRUE(create_cow_file(*reg_, overlay_, base_path_));
  const std::string copy = dir_.file("copy.img");
  std::filesystem::copy_file(base_path_, copy);
  auto cow = open_dev("cow://" + overlay_ + "?base=" + copy);
  ASSERT_TRUE(cow);
  EXPECT_EQ(first_diff(read_all(*cow), pattern(base_seed, 0, size_)), -1);
  auto bad = Vstore::open(*reg_, "cow://" + overlay_ + "?bse=" + copy);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.err().message.find("unknown cow option 'bse'"), std::string::npos) << bad.err().message;
}

TEST_F(CowFile, CommitEqualsBasePlusOverlay) {
  cow_create_options co;
  co.block_size = 16 * KiB;
  ASSERT_TRUE(create_cow_file(*reg_, overlay_, base_path_, co));
  auto model = pattern(base_seed, 0, size_);
  {
    auto cow = open_dev("cow://" + overlay_);
    ASSERT_TRUE(cow);
    std::mt19937_64 rng(3);
    for (int i = 0; i < 60; ++i) {
      uint64_t len = (1 + rng() % 100) * 512, off = (rng() % ((size_ - len) / 512)) * 512;
      auto d = pattern(2000 + i, off, len);
      ASSERT_TRUE(cow->write(off, d.data(), len));
      std::memcpy(model.data() + off, d.data(), len);
    }
    ASSERT_TRUE(cow->write_zeroes(2 * MiB, 1 * MiB));  // a hole in the committed image
    std::memset(model.data() + 2 * MiB, 0, 1 * MiB);
  }
  const std::string out = dir_.file("merged.img");
  auto cow = open_dev("cow://" + overlay_, true);
  ASSERT_TRUE(cow);
  std::vector<uint64_t> progress;
  cow_commit_options opts;
  opts.chunk = 1 * MiB;
  opts.progress = [&](uint64_t done, uint64_t total) {
    EXPECT_EQ(total, size_);
    progress.push_back(done);
  };
  auto r = commit_cow(*cow, out, opts);
  ASSERT_TRUE(r) << r.err().what();
  auto merged = read_file(out);
  ASSERT_EQ(merged.size(), size_);
  EXPECT_EQ(first_diff(merged, model), -1);
  ASSERT_FALSE(progress.empty());
  EXPECT_TRUE(std::is_sorted(progress.begin(), progress.end()));
  EXPECT_EQ(progress.back(), size_);
  auto again = commit_cow(*cow, out, opts);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.err().errnum(), EEXIST);
}

}  // namespace
}  // namespace uvd::storage
