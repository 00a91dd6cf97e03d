// SPDX-License-Identifier: Apache-2.0
// I/O load generator for bench/cow-bench: the access pattern of `qemu-img
// bench` (request k at offset k * STEP modulo the device size, DEPTH requests
// in flight, each completion issuing the next), driven through a uvd device
// in-process, so a COW disk, a raw file and qemu's qcow2 see the same load.
//
// usage: cow_bench_driver URI [--write] [--fua] [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [--fill]
// prints one line: "ops=N seconds=S iops=I mib_s=M"
#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "core/log.hpp"
#include "core/uri.hpp"
#include "storage/vstore.hpp"
#include "transports/builtin.hpp"

namespace {

using namespace uvd;

struct bench {
  storage::Vstore* dev = nullptr;
  uint64_t count = 0, step = 0, size = 0, bs = 0;
  uint16_t opcode = core::VSTORE_OP_READ, flags = 0;
  std::atomic<uint64_t> issued{0}, completed{0};
  std::atomic<int> error{0};
  std::mutex mu;
  std::condition_variable cv;

  struct slot {
    bench* b;
    storage::vstore_io io;
    iovec iov;
    std::byte* buf;
  };
  std::vector<slot> slots;

  // Fills io with the next request; false when all were issued.
  bool next(slot& s) {
    uint64_t k = issued.fetch_add(1, std::memory_order_relaxed);
    if (k >= count) return false;
    s.io = storage::vstore_io{};
    s.io.opcode = opcode;
    s.io.flags = flags;
    s.io.offset = static_cast<uint64_t>((static_cast<unsigned __int128>(k) * step) % size);
    if (s.io.offset + bs > size) s.io.offset = 0;
    s.io.length = bs;
    s.iov = {s.buf, static_cast<size_t>(bs)};
    s.io.iov = &s.iov;
    s.io.iovcnt = 1;
    s.io.done = &on_done;
    s.io.user = &s;
    return true;
  }

  static void on_done(storage::vstore_io* io, int status) {
    auto* s = static_cast<slot*>(io->user);
    bench* b = s->b;
    if (status < 0) b->error.store(status);
    bool more = status >= 0 && b->next(*s);
    if (more) b->dev->submit(&s->io);
    if (b->completed.fetch_add(1, std::memory_order_acq_rel) + 1 == b->count || status < 0) {
      std::lock_guard lk(b->mu);
      b->cv.notify_all();
    }
  }
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "cow_bench_driver: %s\nusage: cow_bench_driver URI [--write] [--fua] [-c COUNT] [-d DEPTH] "
                       "[-s SIZE] [-S STEP] [--fill]\n", why);
  std::exit(2);
}

uint64_t size_arg(const char* v) {
  auto n = core::parse_size(v ? v : "");
  if (!n) usage(("bad size: " + std::string(v ? v : "")).c_str());
  return *n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("no device");
  std::string uri = argv[1];
  bench b;
  uint32_t depth = 64;
  bool fill = false;
  b.count = 100000;
  b.bs = 4096;
  b.step = 0;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--write") b.opcode = core::VSTORE_OP_WRITE;
    else if (a == "--fua") b.flags = core::VSTORE_REQ_FUA;
    else if (a == "--fill") fill = true;
    else if (a == "-c") b.count = size_arg(v), ++i;
    else if (a == "-d") depth = static_cast<uint32_t>(size_arg(v)), ++i;
    else if (a == "-s") b.bs = size_arg(v), ++i;
    else if (a == "-S") b.step = size_arg(v), ++i;
    else usage(("unknown argument " + a).c_str());
  }
  if (b.step == 0) b.step = b.bs;
  (void)core::init_logging();  // $UVD_LOG_LEVEL
  auto reg = transports::make_default_registry();
  storage::open_options oo;
  oo.queue_depth = depth;
  auto dev = storage::Vstore::open(*reg, uri, oo);
  if (!dev) {
    std::fprintf(stderr, "cow_bench_driver: %s\n", dev.err().what().c_str());
    return 1;
  }
  b.dev = dev->get();
  b.size = (*dev)->size();

  if (fill) {  // write the whole device once, in 1 MiB requests (allocates every COW block)
    std::vector<std::byte> buf(1 << 20, std::byte{0x3c});
    for (uint64_t off = 0; off < b.size; off += buf.size()) {
      uint64_t n = std::min<uint64_t>(buf.size(), b.size - off);
      if (auto r = (*dev)->write(off, buf.data(), n); !r) {
        std::fprintf(stderr, "cow_bench_driver: fill: %s\n", r.err().what().c_str());
        return 1;
      }
    }
    std::printf("filled=%llu\n", static_cast<unsigned long long>(b.size));
    return 0;
  }

  std::vector<std::byte*> bufs;
  b.slots.resize(depth);
  for (auto& s : b.slots) {
    s.b = &b;
    s.buf = static_cast<std::byte*>(std::aligned_alloc(4096, (b.bs + 4095) / 4096 * 4096));
    std::memset(s.buf, 0xa5, b.bs);
    bufs.push_back(s.buf);
  }
  auto t0 = std::chrono::steady_clock::now();
  std::vector<storage::vstore_io*> first;
  for (auto& s : b.slots)
    if (b.next(s)) first.push_back(&s.io);
  (*dev)->submit(first);
  {
    std::unique_lock lk(b.mu);
    b.cv.wait(lk, [&] { return b.completed.load() >= b.count || b.error.load() < 0; });
  }
  (*dev)->drain();
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto* p : bufs) std::free(p);
  if (b.error.load() < 0) {
    std::fprintf(stderr, "cow_bench_driver: I/O error %d\n", b.error.load());
    return 1;
  }
  const double iops = static_cast<double>(b.count) / secs;
  std::printf("%s\n", fmt::format("ops={} seconds={:.3f} iops={:.0f} mib_s={:.1f}", b.count, secs, iops,
                                  iops * static_cast<double>(b.bs) / (1 << 20)).c_str());
  return 0;
}
