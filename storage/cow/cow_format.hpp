// SPDX-License-Identifier: Apache-2.0
#pragma once
// The on-media format of a COW overlay, and the loader that validates it.
//
// An overlay is one store (normally a sparse host file) laid out as:
//
//   offset 0               header, cow_header_size (4 KiB) bytes, little-endian:
//        0   8  magic "UVDCOW\r\n"
//        8   4  version (1)
//       12   4  header size (4096)
//       16   4  block size: power of two, 4 KiB .. 16 MiB (default 64 KiB)
//       20   4  flags (0; any other bit is refused)
//       24   8  virtual size, bytes (equal to the base size in version 1)
//       32   8  base size, bytes
//       40   8  bitmap offset (= header size)
//       48   8  bitmap length, bytes: ceil(blocks / 8) rounded up to 4 KiB
//       56   8  data offset: bitmap end rounded up to the block size
//       64  16  base fingerprint (cow_fingerprint)
//       80   2  base URI length
//       82   6  reserved, zero
//       88   8  header checksum: cow_hash64 of the header with this field zero
//       96   .  base URI (not NUL-terminated); the rest of the header is zero
//   bitmap_offset          allocation bitmap, 1 bit per block (block i is bit
//                          i % 8 of byte i / 8); set = the overlay holds the block
//   data_offset            block i at data_offset + i * block_size (sparse; a
//                          clear bit's slot is never read)
//
// Crash safety rests on two rules. Bits only ever go from 0 to 1, and a bit is
// written only after the block it exposes is durable. So a torn bitmap page is
// harmless (each bit is then its old or its new value, and both are valid) and
// opening after a crash needs no scan and no journal: the bitmap is the truth.
//
// The base fingerprint hashes the base's first and last 64 KiB, 16 sampled
// 4 KiB blocks and its size: a byte-for-byte copy of the base still matches, a
// different image (even of the same size) does not.
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/result.hpp"

namespace uvd::storage {

class Vstore;

inline constexpr char cow_magic[8] = {'U', 'V', 'D', 'C', 'O', 'W', '\r', '\n'};
inline constexpr uint32_t cow_version = 1;
inline constexpr uint32_t cow_header_size = 4096;
inline constexpr uint32_t cow_header_fixed = 96;  // bytes before the base URI
inline constexpr uint32_t cow_max_base_uri = cow_header_size - cow_header_fixed;
inline constexpr uint32_t cow_bitmap_page = 4096;
inline constexpr uint32_t cow_min_block_size = 4096;
inline constexpr uint32_t cow_max_block_size = 16u << 20;
inline constexpr uint32_t cow_default_block_size = 64u << 10;
// Largest virtual size: keeps every offset computation far from overflow.
inline constexpr uint64_t cow_max_virtual_size = uint64_t{1} << 60;

struct cow_fingerprint {
  std::array<uint8_t, 16> bytes{};
  bool operator==(const cow_fingerprint&) const = default;
  std::string hex() const;
};

struct cow_header {
  uint32_t version = cow_version;
  uint32_t header_size = cow_header_size;
  uint32_t block_size = cow_default_block_size;
  uint32_t flags = 0;
  uint64_t virtual_size = 0;
  uint64_t base_size = 0;
  uint64_t bitmap_offset = 0;
  uint64_t bitmap_length = 0;
  uint64_t data_offset = 0;
  cow_fingerprint base_fingerprint;
  std::string base_uri;

  uint64_t blocks() const noexcept { return (virtual_size + block_size - 1) / block_size; }
  // Bytes the store holding the overlay must have.
  uint64_t store_size() const noexcept { return data_offset + blocks() * block_size; }
};

// A header with its layout computed for a base of base_size bytes.
core::result<cow_header> make_cow_header(uint64_t base_size, uint32_t block_size, const cow_fingerprint& fp,
                                         std::string base_uri);

// The header_size bytes of h, checksummed.
std::vector<std::byte> encode_cow_header(const cow_header& h);

// Recomputes the checksum of a header_size-byte header in place (for tools
// and tests that edit raw headers).
void seal_cow_header(std::span<std::byte> header);

// Validates everything a header says (magic, version, sizes, offsets,
// overflow, checksum, reserved bytes). bytes may be longer than the header.
core::result<cow_header> parse_cow_header(std::span<const std::byte> bytes);

// The layout fits in a store of store_size bytes.
core::result<void> check_cow_layout(const cow_header& h, uint64_t store_size);

// Validates a bitmap (exactly bitmap_length bytes; no bit set past the last
// block) and returns the number of allocated blocks.
core::result<uint64_t> check_cow_bitmap(const cow_header& h, std::span<const std::byte> bitmap);

// What opening an overlay learns from its first bytes: image holds at least
// the header and the bitmap (data_offset bytes are enough), store_size is the
// size of the whole store. This is the loader fuzz_cow_header drives.
struct cow_state {
  cow_header header;
  std::vector<std::byte> bitmap;
  uint64_t allocated = 0;
};
core::result<cow_state> load_cow_state(std::span<const std::byte> image, uint64_t store_size);

// The fingerprint of a base's contents (reads about 200 KiB of it).
core::result<cow_fingerprint> fingerprint_base(Vstore& base);

// A 64-bit non-cryptographic hash (header checksum, fingerprint lanes).
uint64_t cow_hash64(std::span<const std::byte> data, uint64_t seed);

inline bool cow_bit(std::span<const std::byte> bitmap, uint64_t block) noexcept {
  return (static_cast<uint8_t>(bitmap[block >> 3]) >> (block & 7)) & 1u;
}

}  // namespace uvd::storage
