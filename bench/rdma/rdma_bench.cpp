// SPDX-License-Identifier: Apache-2.0
// rdma_bench: fio-style load on any uvd device URI (rdma://, file://,
// multipath:...) through storage::Vstore, for the RDMA vs NBD comparison in
// bench/rdma/rdma-bench (fio's nbd engine drives the NBD side: uvd has no NBD
// client transport). One job per run:
//   rdma_bench --uri URI --rw randread|randwrite|read|write --bs 4096 --qd 32
//              --seconds 5 [--size BYTES] [--json FILE]
// Random jobs pick block-aligned offsets uniformly in [0, size); sequential
// ones wrap around. Prints one line "BENCH rw=... bs=... qd=... iops=...
// mib_s=... lat_us=..." and, with --json, the same as a JSON object.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "storage/vstore.hpp"
#include "transports/builtin.hpp"

namespace uvd::bench {
namespace {

using clock_type = std::chrono::steady_clock;

struct job {
  std::string uri, rw = "randread", json;
  uint32_t bs = 4096, qd = 1;
  double seconds = 5;
  uint64_t size = 0;  // 0: the device's
  bool probe = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "rdma_bench: %s\nusage: rdma_bench --uri URI [--rw randread|randwrite|read|write] [--bs N] "
               "[--qd N] [--seconds S] [--size BYTES] [--json FILE] | --uri URI --probe\n",
               why.c_str());
  std::exit(2);
}

struct runner {
  struct lane {
    runner* self = nullptr;
    storage::vstore_io io{};
    iovec iov{};
    clock_type::time_point sent{};
  };
  storage::Vstore& dev;
  const job& j;
  bool random, write;
  uint64_t span_blocks;
  std::unique_ptr<std::byte[], void (*)(void*)> mem{nullptr, nullptr};
  std::vector<lane> lanes;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<lane*> done;
  uint64_t rng = 0x9e3779b97f4a7c15ull, next_seq = 0;
  int first_error = 0;

  runner(storage::Vstore& d, const job& jb)
      : dev(d), j(jb), random(jb.rw.rfind("rand", 0) == 0), write(jb.rw.find("write") != std::string::npos) {
    span_blocks = (j.size ? j.size : dev.size()) / j.bs;
    mem = {static_cast<std::byte*>(std::aligned_alloc(4096, size_t{j.bs} * j.qd)), std::free};
    for (size_t i = 0; i < size_t{j.bs} * j.qd; ++i) mem[i] = static_cast<std::byte>(i * 131 + 7);
    lanes.resize(j.qd);
  }

  static void on_done(storage::vstore_io* io, int status) {
    auto* l = static_cast<lane*>(io->user);
    runner* r = l->self;
    {
      std::lock_guard lk(r->mu);
      if (status != 0 && r->first_error == 0) r->first_error = status;
      r->done.push_back(l);
    }
    r->cv.notify_one();
  }

  void prepare(lane& l, size_t i) {
    uint64_t block;
    if (random) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      block = rng % span_blocks;
    } else {
      block = next_seq++ % span_blocks;
    }
    l.self = this;
    l.iov = {mem.get() + i * j.bs, j.bs};
    l.io = {};
    l.io.opcode = write ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
    l.io.offset = block * j.bs;
    l.io.length = j.bs;
    l.io.iov = &l.iov;
    l.io.iovcnt = 1;
    l.io.done = &runner::on_done;
    l.io.user = &l;
    l.sent = clock_type::now();
  }

  // Returns {completions, total latency in microseconds, elapsed seconds}.
  struct outcome {
    uint64_t ios = 0;
    double lat_us = 0, secs = 0;
  };
  outcome run() {
    outcome o;
    std::vector<storage::vstore_io*> batch;
    for (size_t i = 0; i < lanes.size(); ++i) {
      prepare(lanes[i], i);
      batch.push_back(&lanes[i].io);
    }
    auto t0 = clock_type::now();
    auto until = t0 + std::chrono::duration<double>(j.seconds);
    uint32_t in_flight = j.qd;
    bool stopping = false;
    while (in_flight > 0) {
      if (!batch.empty()) dev.submit(std::span<storage::vstore_io* const>(batch.data(), batch.size()));
      batch.clear();
      std::vector<lane*> got;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return !done.empty(); });
        got.swap(done);
        if (first_error) stopping = true;
      }
      auto now = clock_type::now();
      if (now >= until) stopping = true;
      for (lane* l : got) {
        --in_flight;
        ++o.ios;
        o.lat_us += std::chrono::duration<double, std::micro>(now - l->sent).count();
        if (!stopping) {
          prepare(*l, static_cast<size_t>(l - lanes.data()));
          batch.push_back(&l->io);
          ++in_flight;
        }
      }
    }
    o.secs = std::chrono::duration<double>(clock_type::now() - t0).count();
    return o;
  }
};

int main_impl(int argc, char** argv, core::registry& reg) {
  job j;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--uri") j.uri = val();
    else if (a == "--rw") j.rw = val();
    else if (a == "--bs") j.bs = static_cast<uint32_t>(std::stoul(val()));
    else if (a == "--qd") j.qd = static_cast<uint32_t>(std::stoul(val()));
    else if (a == "--seconds") j.seconds = std::stod(val());
    else if (a == "--size") j.size = std::stoull(val());
    else if (a == "--json") j.json = val();
    else if (a == "--probe") j.probe = true;
    else usage("unknown argument " + a);
  }
  if (j.uri.empty()) usage("--uri is required");
  if (j.rw != "randread" && j.rw != "randwrite" && j.rw != "read" && j.rw != "write") usage("bad --rw");
  if (j.qd == 0 || j.qd > 1024 || j.bs == 0) usage("bad --qd or --bs");
  storage::open_options oo;
  oo.queue_depth = std::max<uint32_t>(j.qd, 1);
  auto dev = storage::Vstore::open(reg, j.uri, oo);
  if (!dev) {
    std::fprintf(stderr, "rdma_bench: %s: %s\n", j.uri.c_str(), dev.err().what().c_str());
    return 1;
  }
  if (j.probe) return 0;
  if ((j.size ? j.size : (*dev)->size()) < j.bs || j.bs % (*dev)->block_size() != 0) usage("bad --size or --bs");
  runner r(**dev, j);
  auto o = r.run();
  if (r.first_error) {
    std::fprintf(stderr, "rdma_bench: I/O failed: %s\n", std::strerror(-r.first_error));
    return 1;
  }
  double iops = static_cast<double>(o.ios) / o.secs;
  double mib = iops * j.bs / (1024.0 * 1024.0);
  double lat = o.ios ? o.lat_us / static_cast<double>(o.ios) : 0;
  std::printf("BENCH uri=%s rw=%s bs=%u qd=%u ios=%llu seconds=%.3f iops=%.0f mib_s=%.2f lat_us=%.1f\n",
              j.uri.c_str(), j.rw.c_str(), j.bs, j.qd, static_cast<unsigned long long>(o.ios), o.secs, iops, mib,
              lat);
  if (!j.json.empty()) {
    FILE* f = std::fopen(j.json.c_str(), "w");
    if (!f) {
      std::perror(j.json.c_str());
      return 1;
    }
    std::fprintf(f,
                 "{\"uri\": \"%s\", \"rw\": \"%s\", \"bs\": %u, \"qd\": %u, \"ios\": %llu, \"seconds\": %.3f, "
                 "\"iops\": %.1f, \"mib_s\": %.3f, \"lat_us\": %.2f}\n",
                 j.uri.c_str(), j.rw.c_str(), j.bs, j.qd, static_cast<unsigned long long>(o.ios), o.secs, iops, mib,
                 lat);
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace uvd::bench

int main(int argc, char** argv) {
  // The registry (and the rdma plugin) stays loaded until exit, as in `uvd serve`: unloading
  // librdmacm would orphan its process-wide state.
  auto reg = uvd::transports::make_default_registry();
  std::exit(uvd::bench::main_impl(argc, argv, *reg));
}
