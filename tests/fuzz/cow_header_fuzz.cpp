// SPDX-License-Identifier: Apache-2.0
// Fuzzes the COW overlay loader: the bytes are an overlay's first bytes
// (header, bitmap). Everything is parsed as opening would; inputs whose header
// parses and is small are then opened for real over memory stores (with the
// fingerprint patched to match a generated base, so the fuzzer gets past the
// identity check into the bitmap and the data path) and read and written.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "storage/cow/cow.hpp"
#include "transports/memory/memory.hpp"

namespace {

using namespace uvd;

std::unique_ptr<storage::Vstore> open_memory(uint64_t size) {
  auto v = storage::Vstore::open(memory::memory_vstore_ops, std::to_string(size), {});
  return v ? std::move(*v) : nullptr;
}

void open_for_real(storage::cow_header h, std::span<const std::byte> input) {
  constexpr uint64_t max_virtual = 1u << 20, max_store = 4u << 20;
  if (h.virtual_size > max_virtual || h.store_size() > max_store || h.virtual_size % 512 != 0) return;
  std::shared_ptr<storage::Vstore> base = open_memory(h.virtual_size);
  if (!base) return;
  std::vector<std::byte> data(h.virtual_size);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 131 + (i >> 9));
  if (!base->write(0, data.data(), data.size())) return;
  auto fp = storage::fingerprint_base(*base);
  if (!fp) __builtin_trap();
  h.base_fingerprint = *fp;

  const uint64_t store_size = (h.store_size() + 511) / 512 * 512;
  auto overlay = open_memory(store_size);
  if (!overlay) return;
  std::vector<std::byte> image(std::min<uint64_t>(input.size(), store_size) / 512 * 512);
  std::memcpy(image.data(), input.data(), image.size());
  if (!image.empty() && !overlay->write(0, image.data(), image.size())) return;
  auto header = storage::encode_cow_header(h);
  if (!overlay->write(0, header.data(), header.size())) return;

  auto cow = storage::open_cow(base, std::move(overlay));
  if (!cow) return;  // e.g. a stray bitmap bit: refused, as it must be
  storage::Vstore& dev = **cow;
  std::vector<std::byte> got(dev.size());
  if (!dev.read(0, got.data(), got.size())) __builtin_trap();
  // Where the bitmap says "base", the base shows through.
  std::vector<std::byte> bitmap(h.bitmap_length);  // as the overlay holds it
  if (image.size() > h.bitmap_offset)
    std::memcpy(bitmap.data(), image.data() + h.bitmap_offset,
                std::min<uint64_t>(h.bitmap_length, image.size() - h.bitmap_offset));
  for (uint64_t b = 0; b < h.blocks(); ++b) {
    if (storage::cow_bit(bitmap, b)) continue;
    uint64_t off = b * h.block_size, len = std::min<uint64_t>(h.block_size, h.virtual_size - off);
    if (std::memcmp(got.data() + off, data.data() + off, len) != 0) __builtin_trap();
  }
  // A write and a read back through the loaded bitmap.
  const uint64_t bs = dev.block_size();
  std::vector<std::byte> w(bs, std::byte{0x5a});
  uint64_t at = (h.virtual_size / 2) / bs * bs;
  if (!dev.write(at, w.data(), w.size())) __builtin_trap();
  if (!dev.read(at, got.data(), bs) || std::memcmp(got.data(), w.data(), bs) != 0) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> raw(reinterpret_cast<const std::byte*>(data), size);
  (void)storage::load_cow_state(raw, size);
  // Again with a valid checksum, so that mutated fields reach the checks
  // behind it.
  std::vector<std::byte> sealed(raw.begin(), raw.end());
  if (size >= storage::cow_header_size) storage::seal_cow_header(std::span(sealed).first(storage::cow_header_size));
  std::span<const std::byte> in = sealed;
  (void)storage::load_cow_state(in, size);
  auto h = storage::parse_cow_header(in);
  if (!h) return 0;
  auto st = storage::load_cow_state(in, h->store_size());
  if (st && st->header.virtual_size != h->virtual_size) __builtin_trap();
  open_for_real(*h, in);
  return 0;
}
