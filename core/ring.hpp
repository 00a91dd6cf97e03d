// SPDX-License-Identifier: Apache-2.0
#pragma once
// The Xen shared ring (xen/include/public/io/ring.h), byte-compatible with it:
// a 64-byte header {req_prod, req_event, rsp_prod, rsp_event, private pad}
// followed by a power-of-two array of entries, each a union of one request and
// one response. Free-running 32-bit indices; each side keeps a private
// producer copy and publishes a batch with one store (push). The event index
// (req_event / rsp_event) says at which index the other side wants to be
// woken, so a push reports "notify" only when the peer asked for it, and a
// consumer re-arms the index and re-checks before it sleeps (final check), so
// no wake-up is lost.
//
// The other side of the ring is another domain or process and may be hostile.
// The consumer therefore copies each entry out of shared memory before anyone
// looks at it (no double fetch), and treats a producer index more than a ring
// ahead of what it may legally be as a broken peer (ring_take::broken), after
// which the ring must not be used again.
//
// Not thread-safe: one thread produces on a side at a time, one consumes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace uvd::core {

using ring_idx = uint32_t;

// Layout of the ring.h header; entries start at byte 64.
struct sring_header {
  ring_idx req_prod;
  ring_idx req_event;
  ring_idx rsp_prod;
  ring_idx rsp_event;
  uint8_t pvt[4];
  uint8_t pad[44];
};
static_assert(sizeof(sring_header) == 64, "ring.h header is 64 bytes");

enum class ring_take {
  item,    // an entry was copied out
  empty,   // nothing to consume
  broken,  // the peer's producer index is impossible: stop using the ring
};

namespace ring_detail {

inline ring_idx load(const ring_idx* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void store(ring_idx* p, ring_idx v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline void full_barrier() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline uint32_t round_down_pow2(size_t n) {
  if (n == 0) return 0;
  uint32_t p = 1;
  while (static_cast<size_t>(p) * 2 <= n && p < (1u << 30)) p *= 2;
  return p;
}

// Copy an entry out of (or into) shared memory exactly once. memcpy through a
// volatile-free path is fine here: the destination is private and every later
// read uses the copy.
inline void copy_out(void* dst, const volatile void* src, size_t n) {
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  std::memcpy(dst, const_cast<const void*>(src), n);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);  // the compiler may not re-read src after this
}

// "Notify if the peer's event index lies in (old, new]", as ring.h's
// RING_PUSH_*_AND_CHECK_NOTIFY computes it with wrapping arithmetic.
inline bool need_notify(ring_idx new_prod, ring_idx old_prod, ring_idx event) {
  return static_cast<ring_idx>(new_prod - event) < static_cast<ring_idx>(new_prod - old_prod);
}

}  // namespace ring_detail

// Geometry shared by both ends: entries of max(sizeof Req, sizeof Rsp) bytes.
template <class Req, class Rsp>
struct ring_layout {
  static_assert(std::is_trivially_copyable_v<Req> && std::is_trivially_copyable_v<Rsp>);
  union entry {
    Req req;
    Rsp rsp;
  };
  static constexpr size_t entry_size = sizeof(entry);
  // __CONST_RING_SIZE: entries that fit in `bytes` of shared memory.
  static constexpr uint32_t size_for(size_t bytes) {
    return bytes < sizeof(sring_header) + entry_size ? 0
                                                     : ring_detail::round_down_pow2((bytes - sizeof(sring_header)) / entry_size);
  }
};

// The front end's side: produces requests, consumes responses.
template <class Req, class Rsp>
class front_ring {
 public:
  using layout = ring_layout<Req, Rsp>;

  front_ring() = default;
  // SHARED_RING_INIT + FRONT_RING_INIT on `bytes` of memory shared with the peer.
  // Returns false if the memory is too small for one entry.
  bool init(void* mem, size_t bytes) {
    nr_ = layout::size_for(bytes);
    if (nr_ == 0) return false;
    sring_ = static_cast<sring_header*>(mem);
    std::memset(sring_, 0, sizeof(sring_header));
    sring_->req_event = 1;
    sring_->rsp_event = 1;
    req_prod_pvt_ = rsp_cons_ = pushed_ = 0;
    return true;
  }

  uint32_t size() const { return nr_; }
  uint32_t free_requests() const { return nr_ - (req_prod_pvt_ - rsp_cons_); }
  bool full() const { return free_requests() == 0; }

  // The slot for the next request, written in place; call produce() after filling it.
  Req* next_request() { return &entries()[req_prod_pvt_ & (nr_ - 1)].req; }
  void produce() { ++req_prod_pvt_; }

  // Publish every produced request with one store. True if the peer asked
  // to be notified of at least one of them.
  bool push_requests() {
    ring_idx old = pushed_;  // private: the peer can scribble on the shared copy
    ring_idx now = req_prod_pvt_;
    pushed_ = now;
    ring_detail::store(&sring_->req_prod, now);
    ring_detail::full_barrier();
    return ring_detail::need_notify(now, old, ring_detail::load(&sring_->req_event));
  }

  // Copy out the next response. broken: the peer published responses to
  // requests that were never sent.
  ring_take take_response(Rsp* out) {
    ring_idx prod = ring_detail::load(&sring_->rsp_prod);
    if (static_cast<ring_idx>(prod - rsp_cons_) > static_cast<ring_idx>(req_prod_pvt_ - rsp_cons_))
      return ring_take::broken;
    if (prod == rsp_cons_) return ring_take::empty;
    ring_detail::copy_out(out, &entries()[rsp_cons_ & (nr_ - 1)].rsp, sizeof(Rsp));
    ++rsp_cons_;
    return ring_take::item;
  }

  // RING_FINAL_CHECK_FOR_RESPONSES: ask to be woken at the next response,
  // then look again, so a response that raced with the re-arm is not slept on.
  // True if responses are waiting.
  bool final_check_for_responses() {
    if (ring_detail::load(&sring_->rsp_prod) != rsp_cons_) return true;
    ring_detail::store(&sring_->rsp_event, rsp_cons_ + 1);
    ring_detail::full_barrier();
    return ring_detail::load(&sring_->rsp_prod) != rsp_cons_;
  }

  // Requests published but not yet answered.
  uint32_t outstanding() const { return req_prod_pvt_ - rsp_cons_; }
  sring_header* shared() const { return sring_; }

 private:
  typename layout::entry* entries() const {
    return reinterpret_cast<typename layout::entry*>(reinterpret_cast<std::byte*>(sring_) + sizeof(sring_header));
  }
  sring_header* sring_ = nullptr;
  uint32_t nr_ = 0;
  ring_idx req_prod_pvt_ = 0;
  ring_idx rsp_cons_ = 0;
  ring_idx pushed_ = 0;
};

// The back end's side: consumes requests, produces responses.
template <class Req, class Rsp>
class back_ring {
 public:
  using layout = ring_layout<Req, Rsp>;

  back_ring() = default;
  // BACK_RING_INIT on memory the front end initialised (and may keep changing).
  bool attach(void* mem, size_t bytes) {
    nr_ = layout::size_for(bytes);
    if (nr_ == 0) return false;
    sring_ = static_cast<sring_header*>(mem);
    rsp_prod_pvt_ = req_cons_ = pushed_ = 0;
    return true;
  }

  uint32_t size() const { return nr_; }

  // Copy out the next request. Stops (empty) while every ring slot holds a
  // request not yet answered, since its response would have nowhere to go
  // (RING_REQUEST_CONS_OVERFLOW). broken: req_prod is more than a ring ahead.
  ring_take take_request(Req* out) {
    ring_idx prod = ring_detail::load(&sring_->req_prod);
    ring_idx avail = prod - req_cons_;
    if (avail > nr_) return ring_take::broken;
    if (avail == 0) return ring_take::empty;
    if (static_cast<ring_idx>(req_cons_ - rsp_prod_pvt_) >= nr_) return ring_take::empty;
    ring_detail::copy_out(out, &entries()[req_cons_ & (nr_ - 1)].req, sizeof(Req));
    ++req_cons_;
    return ring_take::item;
  }

  // Requests published and not yet taken. An impossible producer index reads
  // as 0 here; take_request reports it as broken.
  uint32_t available_requests() const {
    ring_idx avail = ring_detail::load(&sring_->req_prod) - req_cons_;
    return avail > nr_ ? 0 : avail;
  }

  // RING_FINAL_CHECK_FOR_REQUESTS. True if requests are waiting (or the
  // producer index is broken: the next take_request says which).
  bool final_check_for_requests() {
    if (ring_detail::load(&sring_->req_prod) != req_cons_) return true;
    ring_detail::store(&sring_->req_event, req_cons_ + 1);
    ring_detail::full_barrier();
    return ring_detail::load(&sring_->req_prod) != req_cons_;
  }

  // Write one response (copied in) at the private producer index.
  void put_response(const Rsp& rsp) {
    std::memcpy(&entries()[rsp_prod_pvt_ & (nr_ - 1)].rsp, &rsp, sizeof(Rsp));
    ++rsp_prod_pvt_;
  }
  // Requests taken but not yet answered.
  uint32_t unanswered() const { return req_cons_ - rsp_prod_pvt_; }

  // Publish every written response with one store; true if the peer asked to be notified.
  bool push_responses() {
    ring_idx old = pushed_;
    ring_idx now = rsp_prod_pvt_;
    pushed_ = now;
    ring_detail::store(&sring_->rsp_prod, now);
    ring_detail::full_barrier();
    return ring_detail::need_notify(now, old, ring_detail::load(&sring_->rsp_event));
  }

  sring_header* shared() const { return sring_; }

 private:
  typename layout::entry* entries() const {
    return reinterpret_cast<typename layout::entry*>(reinterpret_cast<std::byte*>(sring_) + sizeof(sring_header));
  }
  sring_header* sring_ = nullptr;
  uint32_t nr_ = 0;
  ring_idx rsp_prod_pvt_ = 0;
  ring_idx req_cons_ = 0;
  // Our last published rsp_prod, kept privately: the front end can write the
  // shared copy, and a forged "old" value would only cost a wrong notify
  // decision, but there is no reason to trust it at all.
  ring_idx pushed_ = 0;
};

}  // namespace uvd::core
