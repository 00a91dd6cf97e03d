// SPDX-License-Identifier: Apache-2.0
// Cost of the generic front half per request: 4 KiB reads from a RAM disk
// through storage::Vstore (validation, slot, shadow table, completion) against
// the bare memcpy the RAM disk does underneath (the peer: zero overhead).
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "storage/vstore.hpp"
#include "transports/memory/memory.hpp"

using namespace uvd;

namespace {

constexpr uint64_t dev_size = 64ull << 20;

void BM_Memcpy4k(benchmark::State& state) {
  std::vector<std::byte> dev(dev_size, std::byte{0x5a}), buf(4096);
  uint64_t off = 0;
  for (auto _ : state) {
    std::memcpy(buf.data(), dev.data() + off, 4096);
    benchmark::DoNotOptimize(buf.data());
    off = (off + 4096 * 7) % dev_size;
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_VstoreRead4k(benchmark::State& state) {
  const auto batch = static_cast<uint32_t>(state.range(0));
  const bool async = state.range(1) != 0;
  auto v = storage::Vstore::open(memory::memory_vstore_ops, "64M",
                                 {.queue_depth = std::max<uint32_t>(batch, 1), .options = async ? "async=1&depth=64" : ""});
  if (!v) {
    state.SkipWithError(v.err().what().c_str());
    return;
  }
  {  // touch every page, as the memcpy peer's buffer is: no reads of the shared zero page
    std::vector<std::byte> fill(1 << 20, std::byte{0x5a});
    for (uint64_t off = 0; off < dev_size; off += fill.size())
      if (!(*v)->write(off, fill.data(), fill.size())) {
        state.SkipWithError("prefill failed");
        return;
      }
  }
  std::vector<std::byte> bufs(batch * 4096);
  std::vector<iovec> iov(batch);
  std::vector<storage::vstore_io> ios(batch);
  std::vector<storage::vstore_io*> ptrs(batch);
  std::atomic<uint32_t> left{0};
  for (uint32_t i = 0; i < batch; ++i) {
    iov[i] = {bufs.data() + i * 4096, 4096};
    ios[i].opcode = core::VSTORE_OP_READ;
    ios[i].length = 4096;
    ios[i].iov = &iov[i];
    ios[i].iovcnt = 1;
    ios[i].user = &left;
    ios[i].done = [](storage::vstore_io* io, int) { static_cast<std::atomic<uint32_t>*>(io->user)->fetch_sub(1); };
    ptrs[i] = &ios[i];
  }
  uint64_t off = 0;
  for (auto _ : state) {
    for (auto& io : ios) {
      io.offset = off;
      off = (off + 4096 * 7) % dev_size;
    }
    left.store(batch);
    (*v)->submit(ptrs);
    while (left.load(std::memory_order_acquire) != 0) {
    }
  }
  state.SetItemsProcessed(state.iterations() * batch);
}

}  // namespace

BENCHMARK(BM_Memcpy4k);
BENCHMARK(BM_VstoreRead4k)->ArgNames({"batch", "async"})->Args({1, 0})->Args({32, 0})->Args({32, 1});
