// SPDX-License-Identifier: Apache-2.0
#pragma once
// A single-producer single-consumer ring of Ethernet frames in memory shared
// by two processes (the daemon transport's fast path: a front end and the
// switch). Variable-sized records, so a 64 KiB GSO segment costs one slot and
// a 64-byte frame a small one.
//
// The rules are Xen's shared-ring rules (xen/io/ring.h), applied to bytes:
//   - free-running 32-bit byte indices; each side writes only its own index
//   - event indices: a side about to sleep writes the index at which it
//     wants a kick (cons_event: "data past here", prod_event: "room past
//     here"); the other side kicks only when its update crosses that index,
//     so a busy ring runs without a system call per frame
//   - after arming, re-check before sleeping (no lost wake-up)
//   - the peer is hostile: every index and record header is copied out of
//     shared memory once, then validated; a producer index more than a ring
//     ahead, or a record that does not fit where it claims to be, marks the
//     ring broken and the caller drops the peer
// Records are 64-byte aligned and never wrap: a producer that reaches the end
// writes a pad record and continues at offset 0.
#include <atomic>
#include <cstdint>
#include <cstring>

#include "transports/daemon/daemon_proto.hpp"

namespace uvd::daemon {

// The control block of one ring, at the start of the shared mapping.
struct ring_ctl {
  alignas(64) std::atomic<uint32_t> prod;        // written by the producer
  std::atomic<uint32_t> prod_event;              // producer: kick me when cons passes this
  alignas(64) std::atomic<uint32_t> cons;        // written by the consumer
  std::atomic<uint32_t> cons_event;              // consumer: kick me when prod passes this
};
static_assert(sizeof(ring_ctl) == 128);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

// One record: this header, then len bytes of frame, padded to 64.
struct ring_rec {
  uint32_t len;   // frame bytes (a pad record: bytes to the end of the ring)
  uint32_t kind;  // rec_frame or rec_pad
  frame_hdr meta;
};
static_assert(sizeof(ring_rec) == 20);

inline constexpr uint32_t rec_frame = 0x46525631;  // "1VRF"
inline constexpr uint32_t rec_pad = 0x44415031;    // "1PAD"
inline constexpr uint32_t rec_align = 64;
inline constexpr uint32_t ring_min_order = 18;  // 256 KiB: a GSO segment takes at most half a ring
inline constexpr uint32_t ring_max_order = 26;  // 64 MiB
inline constexpr uint32_t ring_default_order = 23;  // 8 MiB each way

constexpr uint32_t rec_bytes(uint32_t len) { return (uint32_t(sizeof(ring_rec)) + len + rec_align - 1) & ~(rec_align - 1); }

// The shared mapping of one connection: a page of two control blocks, then
// the front end's transmit ring (front -> switch), then its receive ring
// (switch -> front).
struct shm_layout {
  static constexpr size_t ctl_bytes = 4096;
  static size_t total(uint32_t order) { return ctl_bytes + 2 * (size_t(1) << order); }
  static ring_ctl* tx_ctl(void* base) { return static_cast<ring_ctl*>(base); }
  static ring_ctl* rx_ctl(void* base) { return static_cast<ring_ctl*>(base) + 1; }
  static uint8_t* tx_data(void* base, uint32_t) { return static_cast<uint8_t*>(base) + ctl_bytes; }
  static uint8_t* rx_data(void* base, uint32_t order) {
    return static_cast<uint8_t*>(base) + ctl_bytes + (size_t(1) << order);
  }
};

class ring_producer {
 public:
  ring_producer() = default;
  ring_producer(ring_ctl* c, uint8_t* data, uint32_t order)
      : c_(c), data_(data), size_(1u << order), prod_(c->prod.load(std::memory_order_relaxed)),
        published_(prod_) {}

  // Copies one frame in; false when there is no room (nothing written). The
  // frame is not visible to the consumer until publish().
  bool push(const frame_hdr& meta, const uint8_t* frame, uint32_t len) {
    uint32_t need = rec_bytes(len);
    uint32_t off = prod_ & (size_ - 1);
    uint32_t to_end = size_ - off;
    uint32_t total = need > to_end ? to_end + need : need;
    if (need > size_ / 2 || !room(total)) return false;
    if (need > to_end) {
      ring_rec pad{.len = to_end, .kind = rec_pad, .meta = {}};
      std::memcpy(data_ + off, &pad, sizeof pad);
      prod_ += to_end;
      off = 0;
    }
    ring_rec r{.len = len, .kind = rec_frame, .meta = meta};
    std::memcpy(data_ + off, &r, sizeof r);
    std::memcpy(data_ + off + sizeof r, frame, len);
    prod_ += need;
    return true;
  }

  // Makes pushed frames visible; true when the consumer asked for a kick.
  bool publish() {
    if (prod_ == published_) return false;
    uint32_t old = published_;
    c_->prod.store(prod_, std::memory_order_release);
    published_ = prod_;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    uint32_t ev = c_->cons_event.load(std::memory_order_relaxed);
    return uint32_t(prod_ - ev) < uint32_t(prod_ - old);
  }

  // Full: ask for a kick once bytes are free, then look again (the consumer
  // may have moved meanwhile). True when there is room now after all.
  bool arm_space(uint32_t bytes) {
    uint32_t cons = c_->cons.load(std::memory_order_acquire);
    c_->prod_event.store(cons + bytes, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return room(bytes);
  }

  // Room for a record of len frame bytes, pad included (worst case).
  static uint32_t worst_case(uint32_t len) { return 2 * rec_bytes(len); }
  bool has_room(uint32_t bytes) { return room(bytes); }
  // False when the consumer's index is impossible (a broken peer).
  bool sane() const { return !broken_; }

 private:
  bool room(uint32_t bytes) {
    uint32_t cons = c_->cons.load(std::memory_order_acquire);
    uint32_t used = prod_ - cons;
    if (used > size_) {  // consumer index ahead of what was produced
      broken_ = true;
      return false;
    }
    return size_ - used >= bytes;
  }

  ring_ctl* c_ = nullptr;
  uint8_t* data_ = nullptr;
  uint32_t size_ = 0;
  uint32_t prod_ = 0, published_ = 0;
  bool broken_ = false;
};

class ring_consumer {
 public:
  enum class status { ok, empty, too_big, broken };

  ring_consumer() = default;
  ring_consumer(ring_ctl* c, const uint8_t* data, uint32_t order)
      : c_(c), data_(data), size_(1u << order), cons_(c->cons.load(std::memory_order_relaxed)),
        released_(cons_) {}

  // Copies the next frame into buf (capacity cap): its length into *len and
  // its metadata into *meta. too_big: the frame was longer than cap and is
  // skipped. The slot is freed at the next release().
  status pop(uint8_t* buf, uint32_t cap, uint32_t* len, frame_hdr* meta) {
    for (;;) {
      if (avail_ == 0) {
        uint32_t prod = c_->prod.load(std::memory_order_acquire);
        avail_ = prod - cons_;
        if (avail_ > size_) return status::broken;
        if (avail_ == 0) return status::empty;
      }
      uint32_t off = cons_ & (size_ - 1);
      ring_rec r;
      if (avail_ < sizeof r) return status::broken;
      std::memcpy(&r, data_ + off, sizeof r);  // once: the peer may change it under us
      if (r.kind == rec_pad) {
        if (r.len != size_ - off || r.len > avail_) return status::broken;
        advance(r.len);
        continue;
      }
      uint32_t need = r.kind == rec_frame && r.len <= size_ / 2 ? rec_bytes(r.len) : 0;
      if (need == 0 || need > size_ - off || need > avail_) return status::broken;
      advance(need);
      *meta = r.meta;
      *len = r.len;
      if (r.len > cap) return status::too_big;
      std::memcpy(buf, data_ + off + sizeof r, r.len);
      return status::ok;
    }
  }

  // Frees what was popped; true when the producer asked for a kick.
  bool release() {
    if (cons_ == released_) return false;
    uint32_t old = released_;
    c_->cons.store(cons_, std::memory_order_release);
    released_ = cons_;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    uint32_t ev = c_->prod_event.load(std::memory_order_relaxed);
    return uint32_t(cons_ - ev) < uint32_t(cons_ - old);
  }

  // Empty: ask for a kick when data arrives, then look again. True when data
  // arrived meanwhile (do not sleep).
  bool arm_data() {
    c_->cons_event.store(cons_ + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return c_->prod.load(std::memory_order_acquire) != cons_;
  }

 private:
  void advance(uint32_t n) {
    cons_ += n;
    avail_ -= n;
  }

  ring_ctl* c_ = nullptr;
  const uint8_t* data_ = nullptr;
  uint32_t size_ = 0;
  uint32_t cons_ = 0, released_ = 0;
  uint32_t avail_ = 0;
};

}  // namespace uvd::daemon
