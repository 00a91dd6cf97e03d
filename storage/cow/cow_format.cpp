// SPDX-License-Identifier: Apache-2.0
#include "storage/cow/cow_format.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "storage/vstore.hpp"

namespace uvd::storage {

namespace {

// Corrupt metadata is EUCLEAN ("structure needs cleaning"), as filesystems
// report it; the message says what exactly is wrong.
constexpr int corrupt = EUCLEAN;

constexpr size_t off_magic = 0, off_version = 8, off_header_size = 12, off_block_size = 16, off_flags = 20,
                 off_virtual_size = 24, off_base_size = 32, off_bitmap_offset = 40, off_bitmap_length = 48,
                 off_data_offset = 56, off_fingerprint = 64, off_uri_length = 80, off_reserved = 82,
                 off_checksum = 88;
constexpr uint64_t checksum_seed = 0x636f772d68647231ull;  // "cow-hdr1"

uint64_t mix(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t get_le(std::span<const std::byte> b, size_t off, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t{static_cast<uint8_t>(b[off + i])} << (8 * i);
  return v;
}

void put_le(std::span<std::byte> b, size_t off, size_t n, uint64_t v) {
  for (size_t i = 0; i < n; ++i) b[off + i] = static_cast<std::byte>(v >> (8 * i));
}

uint64_t round_up(uint64_t v, uint64_t align) { return (v + align - 1) / align * align; }

uint64_t expected_bitmap_length(uint64_t blocks) { return round_up((blocks + 7) / 8, cow_bitmap_page); }

uint64_t header_checksum(std::span<const std::byte> header) {
  std::vector<std::byte> copy(header.begin(), header.end());
  put_le(copy, off_checksum, 8, 0);
  return cow_hash64(copy, checksum_seed);
}

std::string num(uint64_t v) { return std::to_string(v); }

}  // namespace

uint64_t cow_hash64(std::span<const std::byte> data, uint64_t seed) {
  uint64_t h = mix(seed ^ (data.size() * 0x9e3779b97f4a7c15ull));
  size_t i = 0;
  for (; i + 8 <= data.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, data.data() + i, 8);
    h = std::rotl(h ^ mix(w + 0x9e3779b97f4a7c15ull), 29) * 0x9fb21c651e98df25ull + 0x2545f4914f6cdd1dull;
  }
  uint64_t tail = 0;
  for (size_t k = 0; i < data.size(); ++i, ++k) tail |= uint64_t{static_cast<uint8_t>(data[i])} << (8 * k);
  h = std::rotl(h ^ mix(tail ^ 0xa0761d6478bd642full), 29) * 0x9fb21c651e98df25ull;
  return mix(h ^ data.size());
}

std::string cow_fingerprint::hex() const {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  for (uint8_t b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

core::result<cow_header> make_cow_header(uint64_t base_size, uint32_t block_size, const cow_fingerprint& fp,
                                         std::string base_uri) {
  if (block_size < cow_min_block_size || block_size > cow_max_block_size || !std::has_single_bit(block_size))
    return core::fail(EINVAL, "COW block size " + num(block_size) + " must be a power of two from " +
                                  num(cow_min_block_size) + " to " + num(cow_max_block_size));
  if (base_size == 0 || base_size > cow_max_virtual_size)
    return core::fail(EINVAL, "a COW base must be 1 byte to 1 EiB, not " + num(base_size) + " bytes");
  if (base_uri.size() > cow_max_base_uri)
    return core::fail(ENAMETOOLONG, "base address is " + num(base_uri.size()) + " bytes; at most " +
                                        num(cow_max_base_uri) + " fit in the overlay header");
  cow_header h;
  h.block_size = block_size;
  h.virtual_size = base_size;
  h.base_size = base_size;
  h.bitmap_offset = cow_header_size;
  h.bitmap_length = expected_bitmap_length(h.blocks());
  h.data_offset = round_up(h.bitmap_offset + h.bitmap_length, block_size);
  h.base_fingerprint = fp;
  h.base_uri = std::move(base_uri);
  return h;
}

std::vector<std::byte> encode_cow_header(const cow_header& h) {
  std::vector<std::byte> b(cow_header_size);
  std::memcpy(b.data() + off_magic, cow_magic, sizeof cow_magic);
  put_le(b, off_version, 4, h.version);
  put_le(b, off_header_size, 4, cow_header_size);
  put_le(b, off_block_size, 4, h.block_size);
  put_le(b, off_flags, 4, h.flags);
  put_le(b, off_virtual_size, 8, h.virtual_size);
  put_le(b, off_base_size, 8, h.base_size);
  put_le(b, off_bitmap_offset, 8, h.bitmap_offset);
  put_le(b, off_bitmap_length, 8, h.bitmap_length);
  put_le(b, off_data_offset, 8, h.data_offset);
  std::memcpy(b.data() + off_fingerprint, h.base_fingerprint.bytes.data(), h.base_fingerprint.bytes.size());
  size_t uri_len = std::min<size_t>(h.base_uri.size(), cow_max_base_uri);
  put_le(b, off_uri_length, 2, uri_len);
  std::memcpy(b.data() + cow_header_fixed, h.base_uri.data(), uri_len);
  put_le(b, off_checksum, 8, header_checksum(b));
  return b;
}

void seal_cow_header(std::span<std::byte> header) {
  if (header.size() < cow_header_fixed) return;
  put_le(header, off_checksum, 8, header_checksum(header));
}

core::result<cow_header> parse_cow_header(std::span<const std::byte> bytes) {
  if (bytes.size() < cow_header_fixed)
    return core::fail(corrupt, "overlay is too short to hold a COW header (" + num(bytes.size()) + " bytes)");
  if (std::memcmp(bytes.data() + off_magic, cow_magic, sizeof cow_magic) != 0)
    return core::fail(corrupt, "not a uvd COW overlay (bad magic)");
  cow_header h;
  h.version = static_cast<uint32_t>(get_le(bytes, off_version, 4));
  if (h.version != cow_version)
    return core::fail(ENOTSUP, "COW overlay version " + num(h.version) + " is not supported (this build reads version " +
                                   num(cow_version) + ")");
  h.header_size = static_cast<uint32_t>(get_le(bytes, off_header_size, 4));
  if (h.header_size != cow_header_size)
    return core::fail(corrupt, "COW header size " + num(h.header_size) + " is wrong (version 1 headers are " +
                                   num(cow_header_size) + " bytes)");
  if (bytes.size() < h.header_size)
    return core::fail(corrupt, "COW header is truncated (" + num(bytes.size()) + " of " + num(h.header_size) + " bytes)");
  auto header = bytes.first(h.header_size);
  uint64_t stored = get_le(header, off_checksum, 8), computed = header_checksum(header);
  if (stored != computed)
    return core::fail(corrupt, "COW header checksum mismatch (stored " + num(stored) + ", computed " + num(computed) +
                                   "): the overlay header is corrupt");

  h.block_size = static_cast<uint32_t>(get_le(header, off_block_size, 4));
  h.flags = static_cast<uint32_t>(get_le(header, off_flags, 4));
  h.virtual_size = get_le(header, off_virtual_size, 8);
  h.base_size = get_le(header, off_base_size, 8);
  h.bitmap_offset = get_le(header, off_bitmap_offset, 8);
  h.bitmap_length = get_le(header, off_bitmap_length, 8);
  h.data_offset = get_le(header, off_data_offset, 8);
  std::memcpy(h.base_fingerprint.bytes.data(), header.data() + off_fingerprint, h.base_fingerprint.bytes.size());
  uint64_t uri_len = get_le(header, off_uri_length, 2);

  if (h.flags != 0) return core::fail(corrupt, "COW header has unknown flags " + num(h.flags));
  if (h.block_size < cow_min_block_size || h.block_size > cow_max_block_size || !std::has_single_bit(h.block_size))
    return core::fail(corrupt, "COW header block size " + num(h.block_size) + " is not a power of two from " +
                                   num(cow_min_block_size) + " to " + num(cow_max_block_size));
  if (h.virtual_size == 0 || h.virtual_size > cow_max_virtual_size)
    return core::fail(corrupt, "COW header virtual size " + num(h.virtual_size) + " is out of range");
  if (h.base_size != h.virtual_size)
    return core::fail(corrupt, "COW header base size " + num(h.base_size) + " differs from its virtual size " +
                                   num(h.virtual_size));
  if (h.bitmap_offset != h.header_size)
    return core::fail(corrupt, "COW bitmap offset " + num(h.bitmap_offset) + " is wrong (expected " +
                                   num(h.header_size) + ")");
  uint64_t want_bitmap = expected_bitmap_length(h.blocks());
  if (h.bitmap_length != want_bitmap)
    return core::fail(corrupt, "COW bitmap length " + num(h.bitmap_length) + " does not fit " + num(h.blocks()) +
                                   " blocks (expected " + num(want_bitmap) + ")");
  uint64_t want_data = round_up(h.bitmap_offset + h.bitmap_length, h.block_size);
  if (h.data_offset != want_data)
    return core::fail(corrupt, "COW data offset " + num(h.data_offset) + " is wrong (expected " + num(want_data) + ")");
  if (uri_len > cow_max_base_uri)
    return core::fail(corrupt, "COW header base address length " + num(uri_len) + " is past the header");
  for (size_t i = off_reserved; i < off_checksum; ++i)
    if (header[i] != std::byte{0}) return core::fail(corrupt, "COW header reserved bytes are not zero");
  for (size_t i = cow_header_fixed + uri_len; i < header.size(); ++i)
    if (header[i] != std::byte{0}) return core::fail(corrupt, "COW header has data past its base address");
  h.base_uri.assign(reinterpret_cast<const char*>(header.data() + cow_header_fixed), uri_len);
  if (h.base_uri.find('\0') != std::string::npos)
    return core::fail(corrupt, "COW header base address contains a NUL byte");
  return h;
}

core::result<void> check_cow_layout(const cow_header& h, uint64_t store_size) {
  if (store_size < h.store_size())
    return core::fail(corrupt, "overlay store is " + num(store_size) + " bytes but its layout needs " +
                                   num(h.store_size()) + " (bitmap and data for " + num(h.blocks()) +
                                   " blocks): it is truncated");
  return core::ok();
}

core::result<uint64_t> check_cow_bitmap(const cow_header& h, std::span<const std::byte> bitmap) {
  if (bitmap.size() != h.bitmap_length)
    return core::fail(corrupt, "COW bitmap is " + num(bitmap.size()) + " bytes, expected " + num(h.bitmap_length));
  uint64_t blocks = h.blocks(), allocated = 0;
  uint64_t full_bytes = blocks / 8;
  for (uint64_t i = 0; i < full_bytes; ++i) allocated += std::popcount(static_cast<uint8_t>(bitmap[i]));
  for (uint64_t b = full_bytes * 8; b < blocks; ++b) allocated += cow_bit(bitmap, b);
  // Past the last block every bit must be clear: a set one means the bitmap
  // is not what this header describes.
  uint64_t first_stray = blocks;
  if (blocks % 8) {
    uint8_t tail = static_cast<uint8_t>(bitmap[full_bytes]) >> (blocks % 8);
    if (tail) first_stray = blocks + static_cast<uint64_t>(std::countr_zero(tail));
  }
  if (first_stray == blocks) {
    for (uint64_t i = (blocks + 7) / 8; i < bitmap.size(); ++i)
      if (bitmap[i] != std::byte{0}) {
        first_stray = i * 8 + static_cast<uint64_t>(std::countr_zero(static_cast<uint8_t>(bitmap[i])));
        break;
      }
  }
  if (first_stray != blocks)
    return core::fail(corrupt, "COW bitmap marks block " + num(first_stray) + " allocated but the disk has only " +
                                   num(blocks) + " blocks: the bitmap is corrupt");
  return allocated;
}

core::result<cow_state> load_cow_state(std::span<const std::byte> image, uint64_t store_size) {
  auto h = parse_cow_header(image);
  if (!h) return core::fail(std::move(h).err());
  if (auto r = check_cow_layout(*h, store_size); !r) return core::fail(std::move(r).err());
  if (image.size() < h->bitmap_offset + h->bitmap_length)
    return core::fail(corrupt, "overlay is truncated inside its bitmap (" + num(image.size()) + " bytes, bitmap ends at " +
                                   num(h->bitmap_offset + h->bitmap_length) + ")");
  cow_state st;
  auto bm = image.subspan(h->bitmap_offset, h->bitmap_length);
  auto allocated = check_cow_bitmap(*h, bm);
  if (!allocated) return core::fail(std::move(allocated).err());
  st.header = std::move(*h);
  st.bitmap.assign(bm.begin(), bm.end());
  st.allocated = *allocated;
  return st;
}

core::result<cow_fingerprint> fingerprint_base(Vstore& base) {
  const uint64_t size = base.size();
  const uint64_t gran = std::max<uint64_t>(4096, base.block_size());
  const uint64_t span = std::max<uint64_t>(64 * 1024, gran);
  struct region {
    uint64_t offset, length;
  };
  std::vector<region> regions;
  regions.push_back({0, std::min(size, span)});
  uint64_t tail = size > span ? (size - span) / gran * gran : 0;
  regions.push_back({tail, size - tail});
  for (uint64_t k = 1; k <= 16; ++k) {
    uint64_t off = static_cast<uint64_t>(static_cast<unsigned __int128>(size) * k / 17) / gran * gran;
    if (off >= size) continue;
    regions.push_back({off, std::min(gran, size - off)});
  }
  uint64_t a = mix(0x6670312d61ull ^ size), b = mix(0x6670312d62ull + size);
  // Page-aligned, for bases opened with O_DIRECT.
  std::unique_ptr<std::byte, decltype(&std::free)> buf(static_cast<std::byte*>(std::aligned_alloc(4096, span)),
                                                       &std::free);
  if (!buf) return core::fail(ENOMEM, "no memory to fingerprint the base");
  for (const region& r : regions) {
    if (r.length == 0) continue;
    if (auto rd = base.read(r.offset, buf.get(), r.length); !rd)
      return core::fail(rd.err().errnum(), "cannot read the base to fingerprint it: " + rd.err().message);
    std::span<const std::byte> data(buf.get(), r.length);
    a = mix(a + cow_hash64(data, 0x5eed0001ull ^ r.offset));
    b = mix(b ^ cow_hash64(data, 0x5eed0002ull + r.offset * 3));
  }
  cow_fingerprint fp;
  for (int i = 0; i < 8; ++i) {
    fp.bytes[i] = static_cast<uint8_t>(a >> (8 * i));
    fp.bytes[8 + i] = static_cast<uint8_t>(b >> (8 * i));
  }
  return fp;
}

}  // namespace uvd::storage
