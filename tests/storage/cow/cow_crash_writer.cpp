// SPDX-License-Identifier: Apache-2.0
// The process cow_crash_test kills. Opens cow://OVERLAY, makes the planned
// writes of one cycle with QD requests in flight (never two overlapping at
// once, so the order of writes to any byte is the plan's order) and reports
// each write on ACK_FD only after it completed. A write that overlaps one in
// flight waits until that one is reported, so for every byte at most one
// write past the last reported one can be on its way when the kill lands.
//
// usage: cow_crash_writer OVERLAY SEED GEN0 QD ACK_FD
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "core/log.hpp"
#include "storage/cow/cow.hpp"
#include "tests/storage/cow/crash_plan.hpp"
#include "transports/builtin.hpp"

namespace {

using namespace uvd;
namespace cc = uvd::test::cow_crash;

int ack_fd = -1;

void send_record(uint64_t v) {
  const char* p = reinterpret_cast<const char*>(&v);
  size_t left = sizeof v;
  while (left) {  // 8 bytes on a pipe: one atomic write
    ssize_t n = ::write(ack_fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) std::_Exit(4);
    p += n;
    left -= static_cast<size_t>(n);
  }
}

struct slot {
  cc::write_op w;
  std::vector<std::byte> data;
  iovec iov{};
  storage::vstore_io io;
  bool busy = false;
};

struct writer {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<slot> slots;

  static void on_done(storage::vstore_io* io, int status) {
    auto* self = static_cast<writer*>(io->user);
    if (status < 0) {
      std::fprintf(stderr, "cow_crash_writer: write at %llu failed: %d\n",
                   static_cast<unsigned long long>(io->offset), status);
      std::_Exit(3);
    }
    slot* s = nullptr;
    for (auto& x : self->slots)
      if (&x.io == io) s = &x;
    send_record(s->w.gen);  // acknowledged: tell the checker before anything may overlap it
    std::lock_guard lk(self->mu);
    s->busy = false;
    self->cv.notify_all();
  }

  bool overlaps_in_flight(const cc::write_op& w) {
    for (auto& s : slots)
      if (s.busy && w.offset < s.w.offset + s.w.length && s.w.offset < w.offset + w.length) return true;
    return false;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: cow_crash_writer OVERLAY SEED GEN0 QD ACK_FD\n");
    return 2;
  }
  const std::string overlay = argv[1];
  const uint64_t seed = std::strtoull(argv[2], nullptr, 0);
  const uint64_t gen0 = std::strtoull(argv[3], nullptr, 0);
  const uint32_t qd = static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 0));
  ack_fd = std::atoi(argv[5]);

  (void)core::init_logging(std::getenv("UVD_LOG_LEVEL") ? "" : "warn");  // quiet: it runs hundreds of times
  auto reg = transports::make_default_registry();
  storage::open_options oo;
  oo.queue_depth = qd;
  auto dev = storage::Vstore::open(*reg, "cow://" + overlay, oo);
  if (!dev) {
    std::fprintf(stderr, "cow_crash_writer: %s\n", dev.err().what().c_str());
    return 1;
  }
  writer wr;
  wr.slots.resize(qd);
  for (auto& s : wr.slots) s.data.resize(64 * cc::unit);
  send_record(cc::ack_ready);

  for (uint64_t k = 0; k < cc::writes_per_cycle; ++k) {
    const cc::write_op w = cc::plan(seed, gen0, k);
    slot* s = nullptr;
    {
      std::unique_lock lk(wr.mu);
      wr.cv.wait(lk, [&] {
        if (wr.overlaps_in_flight(w)) return false;
        for (auto& x : wr.slots)
          if (!x.busy) return true;
        return false;
      });
      for (auto& x : wr.slots)
        if (!x.busy) {
          s = &x;
          break;
        }
      s->busy = true;
      s->w = w;
    }
    for (uint64_t at = 0; at < w.length; at += cc::unit) cc::fill_unit(s->data.data() + at, w.offset + at, w.gen);
    s->iov = {s->data.data(), static_cast<size_t>(w.length)};
    s->io = storage::vstore_io{};
    s->io.opcode = core::VSTORE_OP_WRITE;
    s->io.offset = w.offset;
    s->io.length = w.length;
    s->io.iov = &s->iov;
    s->io.iovcnt = 1;
    s->io.done = &writer::on_done;
    s->io.user = &wr;
    (*dev)->submit(&s->io);
  }
  (*dev)->drain();
  return 0;
}
