// SPDX-License-Identifier: Apache-2.0
// Fencing of a COW device (see cow_device.hpp): forward the advance to the
// overlay store, let the device drain, and take the header and bitmap as the
// store now holds them. Two `uvd serve` processes exporting one overlay each
// cache its metadata; the one a client fails over to must see every block the
// other allocated before it serves a request of the new epoch.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>

#include <spdlog/spdlog.h>

#include "storage/cow/cow_device.hpp"

namespace uvd::storage {

namespace {

// How long a fence waits for the device's own requests. Requests of older
// epochs end quickly once the overlay refuses them; only a base that does not
// answer keeps one longer, and its own transport times it out.
constexpr std::chrono::seconds drain_limit{30};

struct sync_wait {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int status = 0;
  static void on_done(vstore_io* io, int status) {
    auto* w = static_cast<sync_wait*>(io->user);
    std::lock_guard lk(w->mu);
    w->status = status;
    w->done = true;
    w->cv.notify_all();
  }
};

struct free_bytes {
  void operator()(std::byte* p) const { std::free(p); }
};

}  // namespace

core::result<void> cow_device::read_overlay(uint64_t offset, std::byte* buf, uint64_t length, uint32_t epoch) {
  iovec iov{buf, static_cast<size_t>(length)};
  sync_wait w;
  vstore_io io;
  io.opcode = core::VSTORE_OP_READ;
  io.offset = offset;
  io.length = length;
  io.iov = &iov;
  io.iovcnt = 1;
  io.epoch = epoch;
  io.done = &sync_wait::on_done;
  io.user = &w;
  overlay_->submit(&io);
  std::unique_lock lk(w.mu);
  w.cv.wait(lk, [&] { return w.done; });
  if (w.status < 0) return core::fail(-w.status, std::strerror(-w.status));
  return core::ok();
}

void cow_device::gate_close() {
  std::lock_guard lk(gate_mu_);
  gated_ = true;
  draining_.store(true);
}

bool cow_device::gate_drain() {
  std::unique_lock lk(gate_mu_);
  return gate_cv_.wait_for(lk, drain_limit, [&] { return in_flight_.load() == 0; });
}

// Requests that waited go first, in arrival order; the gate opens only when
// none is left, so a request never overtakes one that arrived before it.
void cow_device::gate_open() {
  for (;;) {
    req_list list;
    {
      std::lock_guard lk(gate_mu_);
      if (gate_waiting_.empty()) {
        gated_ = false;
        draining_.store(false);
        return;
      }
      list = gate_waiting_.take();
      in_flight_.fetch_add(length(list.head));
    }
    start_list(list.head);
  }
}

// Runs with the gate closed and nothing in flight: no reader looks at
// visible_, no write holds a claim, no bitmap or flush io is out.
int cow_device::reload(uint32_t epoch) {
  const std::string name = overlay_->transport_name() + ":" + overlay_->target();
  auto fail = [&](int err, const std::string& why) {
    spdlog::error("cow {}: after fencing to epoch {}: {}; every request fails until a fence reloads it", name, epoch,
                  why);
    dead_.store(-err, std::memory_order_release);
    return -err;
  };
  std::unique_ptr<std::byte, free_bytes> hbuf(static_cast<std::byte*>(std::aligned_alloc(4096, cow_header_size)));
  std::unique_ptr<std::byte, free_bytes> bm(static_cast<std::byte*>(
      std::aligned_alloc(4096, (hdr_.bitmap_length + 4095) / 4096 * 4096)));
  if (!hbuf || !bm) return fail(ENOMEM, "no memory to reload the metadata");
  if (auto r = read_overlay(0, hbuf.get(), cow_header_size, epoch); !r)
    return fail(r.err().errnum(), "cannot read the header: " + r.err().message);
  auto h = parse_cow_header({hbuf.get(), cow_header_size});
  if (!h) return fail(h.err().errnum(), "header: " + h.err().message);
  if (auto r = check_cow_layout(*h, overlay_->size()); !r) return fail(r.err().errnum(), r.err().message);
  // Another process may only have added blocks: anything else means the file
  // was replaced or reformatted under this device.
  if (h->block_size != hdr_.block_size || h->virtual_size != hdr_.virtual_size ||
      h->bitmap_offset != hdr_.bitmap_offset || h->bitmap_length != hdr_.bitmap_length ||
      h->data_offset != hdr_.data_offset || h->base_size != hdr_.base_size ||
      !(h->base_fingerprint == hdr_.base_fingerprint))
    return fail(EUCLEAN, "the overlay's header changed its layout or base: it is not the overlay this device opened");
  if (auto r = read_overlay(hdr_.bitmap_offset, bm.get(), hdr_.bitmap_length, epoch); !r)
    return fail(r.err().errnum(), "cannot read the bitmap: " + r.err().message);
  std::span<const std::byte> bitmap(bm.get(), hdr_.bitmap_length);
  auto allocated = check_cow_bitmap(*h, bitmap);
  if (!allocated) return fail(allocated.err().errnum(), "bitmap: " + allocated.err().message);

  {
    std::lock_guard lk(mu_);
    std::memcpy(disk_bitmap_.get(), bm.get(), hdr_.bitmap_length);
    load_visible(bitmap);
    std::fill(page_dirty_.begin(), page_dirty_.end(), 0);
  }
  // What the device knew is replaced by what the store holds: a bitmap
  // write that failed or was refused is no longer unknown.
  broken_.store(0, std::memory_order_release);
  dead_.store(0, std::memory_order_release);
  spdlog::debug("cow {}: fenced to epoch {}, {} blocks allocated", name, epoch, *allocated);
  return 0;
}

int cow_device::fence(uint32_t epoch) {
  if (!overlay_fences_) return -ENOTSUP;
  if (epoch == 0) {
    auto q = overlay_->fence(0);
    return q ? static_cast<int>(std::min<uint32_t>(*q, INT32_MAX)) : -q.err().errnum();
  }
  std::lock_guard fl(fence_mu_);
  gate_close();
  // First the advance: from its return on, every overlay step of an older
  // request is refused, so the drain below is quick and nothing of the old
  // epoch can change the store after the reload read it.
  auto adv = overlay_->fence(epoch);
  if (!gate_drain()) {
    spdlog::error("cow {}:{}: requests still in flight {} s after a fence; failing the device until the next fence",
                  overlay_->transport_name(), overlay_->target(), drain_limit.count());
    dead_.store(-ETIMEDOUT, std::memory_order_release);
    gate_open();
    return -ETIMEDOUT;
  }
  int rc = 0;
  if (adv) {
    rc = reload(epoch);
    if (rc == 0) fenced_epoch_.store(epoch, std::memory_order_release);
  } else {
    rc = -adv.err().errnum();  // nothing changed on the store (ESTALE: someone fenced past it)
  }
  gate_open();
  return rc;
}

}  // namespace uvd::storage
