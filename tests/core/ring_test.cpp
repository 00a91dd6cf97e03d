// SPDX-License-Identifier: Apache-2.0
// core/ring.hpp against Xen's own ring.h macros (the layout and the event
// index must be byte-compatible), a hostile producer, and two threads that
// sleep on eventfds so a lost wake-up would hang the test.
#include <cstdint>
// The Xen public headers assume <stdint.h> came first.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>
// ring.h leaves its barriers to the including environment (Linux, Xen, mini-os).
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/blkif.h>
#include <xen/io/ring.h>

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "core/ring.hpp"

using uvd::core::back_ring;
using uvd::core::front_ring;
using uvd::core::ring_layout;
using uvd::core::ring_take;
using uvd::core::sring_header;

namespace {

struct msg {
  uint64_t id;
  uint64_t payload[3];
};

using fr = front_ring<msg, msg>;
using br = back_ring<msg, msg>;

struct alignas(4096) page_buf {
  std::byte b[4096 * 4];
};

TEST(Ring, LayoutMatchesXenRingH) {
  EXPECT_EQ(offsetof(blkif_sring, req_prod), offsetof(sring_header, req_prod));
  EXPECT_EQ(offsetof(blkif_sring, req_event), offsetof(sring_header, req_event));
  EXPECT_EQ(offsetof(blkif_sring, rsp_prod), offsetof(sring_header, rsp_prod));
  EXPECT_EQ(offsetof(blkif_sring, rsp_event), offsetof(sring_header, rsp_event));
  EXPECT_EQ(offsetof(blkif_sring, ring), sizeof(sring_header));
  using bl = ring_layout<blkif_request, blkif_response>;
  EXPECT_EQ(bl::entry_size, sizeof(union blkif_sring_entry));
  for (size_t pages : {1, 2, 4, 8, 16})
    EXPECT_EQ(bl::size_for(pages * 4096), __CONST_RING_SIZE(blkif, pages * 4096)) << pages << " pages";
  EXPECT_EQ(bl::size_for(4096), 32u);  // what every blkfront has used for 15 years
  EXPECT_EQ(bl::size_for(32), 0u);
}

// Our front end against a back end written with Xen's macros, and the
// reverse: requests and responses cross, and both agree when to notify.
TEST(Ring, InteroperatesWithXenMacros) {
  page_buf mem{};
  front_ring<blkif_request, blkif_response> ours;
  ASSERT_TRUE(ours.init(mem.b, 4096));
  blkif_back_ring_t theirs;
  BACK_RING_INIT(&theirs, reinterpret_cast<blkif_sring*>(mem.b), 4096);
  ASSERT_EQ(RING_SIZE(&theirs), ours.size());

  for (uint64_t round = 0; round < 100; ++round) {  // wraps the 32-entry ring several times
    for (int i = 0; i < 3; ++i) {
      blkif_request* r = ours.next_request();
      *r = {};
      r->operation = BLKIF_OP_READ;
      r->id = round * 3 + i;
      r->sector_number = round;
      ours.produce();
    }
    bool notify = ours.push_requests();
    // The back end armed req_event at its last final check, so this batch must notify.
    EXPECT_TRUE(notify) << round;
    int got = 0;
    int more;
    do {
      while (RING_HAS_UNCONSUMED_REQUESTS(&theirs)) {
        blkif_request req;
        RING_COPY_REQUEST(&theirs, theirs.req_cons, &req);
        ++theirs.req_cons;
        EXPECT_EQ(req.id, round * 3 + got);
        blkif_response* rsp = RING_GET_RESPONSE(&theirs, theirs.rsp_prod_pvt);
        rsp->id = req.id;
        rsp->operation = req.operation;
        rsp->status = BLKIF_RSP_OKAY;
        ++theirs.rsp_prod_pvt;
        ++got;
      }
      RING_FINAL_CHECK_FOR_REQUESTS(&theirs, more);
    } while (more);
    EXPECT_EQ(got, 3);
    int their_notify;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&theirs, their_notify);
    EXPECT_TRUE(their_notify) << "rsp_event starts at 1 and is re-armed by our final check";
    blkif_response rsp;
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(ours.take_response(&rsp), ring_take::item);
      EXPECT_EQ(rsp.id, round * 3 + i);
    }
    EXPECT_EQ(ours.take_response(&rsp), ring_take::empty);
    EXPECT_FALSE(ours.final_check_for_responses());
  }
}

TEST(Ring, NotifiesOnlyWhenThePeerAsked) {
  page_buf mem{};
  fr f;
  br b;
  ASSERT_TRUE(f.init(mem.b, 4096));
  ASSERT_TRUE(b.attach(mem.b, 4096));
  msg m{};
  f.produce();
  EXPECT_TRUE(f.push_requests()) << "req_event starts at 1";
  f.produce();
  EXPECT_FALSE(f.push_requests()) << "the consumer has not re-armed yet: no second interrupt";
  ASSERT_EQ(b.take_request(&m), ring_take::item);
  ASSERT_EQ(b.take_request(&m), ring_take::item);
  EXPECT_FALSE(b.final_check_for_requests());  // re-arms req_event at req_cons + 1
  f.produce();
  f.produce();
  EXPECT_TRUE(f.push_requests());
  // Two responses, one push: one notification; a later push without re-arm: none.
  b.put_response(m);
  b.put_response(m);
  EXPECT_TRUE(b.push_responses());
  b.put_response(m);
  EXPECT_FALSE(b.push_responses());
}

TEST(Ring, CopiesRequestsOutOnce) {
  page_buf mem{};
  fr f;
  br b;
  ASSERT_TRUE(f.init(mem.b, 4096));
  ASSERT_TRUE(b.attach(mem.b, 4096));
  msg* slot = f.next_request();
  *slot = {7, {1, 2, 3}};
  f.produce();
  (void)f.push_requests();
  msg m{};
  ASSERT_EQ(b.take_request(&m), ring_take::item);
  slot->id = 666;  // the hostile producer rewrites the entry after it was taken
  slot->payload[0] = 666;
  EXPECT_EQ(m.id, 7u);
  EXPECT_EQ(m.payload[0], 1u);
}

TEST(Ring, HostileProducerIndexIsBroken) {
  page_buf mem{};
  fr f;
  br b;
  ASSERT_TRUE(f.init(mem.b, 4096));
  ASSERT_TRUE(b.attach(mem.b, 4096));
  const uint32_t n = b.size();
  msg m{};
  // Exactly a ring's worth is legal.
  __atomic_store_n(&f.shared()->req_prod, n, __ATOMIC_RELEASE);
  for (uint32_t i = 0; i < n; ++i) ASSERT_EQ(b.take_request(&m), ring_take::item) << i;
  // Every slot holds an unanswered request: the consumer must wait, not overrun.
  __atomic_store_n(&f.shared()->req_prod, n + 1, __ATOMIC_RELEASE);
  EXPECT_EQ(b.take_request(&m), ring_take::empty);
  b.put_response(m);
  (void)b.push_responses();
  EXPECT_EQ(b.take_request(&m), ring_take::item);
  // More than a ring ahead of the consumer: broken, whatever the wrap.
  __atomic_store_n(&f.shared()->req_prod, n + 1 + n + 1, __ATOMIC_RELEASE);
  EXPECT_EQ(b.take_request(&m), ring_take::broken);
  __atomic_store_n(&f.shared()->req_prod, 0xfffffff0u, __ATOMIC_RELEASE);  // "behind" the consumer
  EXPECT_EQ(b.take_request(&m), ring_take::broken);
}

TEST(Ring, HostileResponderIsBroken) {
  page_buf mem{};
  fr f;
  ASSERT_TRUE(f.init(mem.b, 4096));
  msg m{};
  f.produce();
  f.produce();
  (void)f.push_requests();
  __atomic_store_n(&f.shared()->rsp_prod, 3u, __ATOMIC_RELEASE);  // answers to a request never sent
  EXPECT_EQ(f.take_response(&m), ring_take::broken);
  __atomic_store_n(&f.shared()->rsp_prod, 2u, __ATOMIC_RELEASE);
  EXPECT_EQ(f.take_response(&m), ring_take::item);
  EXPECT_EQ(f.take_response(&m), ring_take::item);
  EXPECT_EQ(f.take_response(&m), ring_take::empty);
}

void wait_fd(int fd) {
  pollfd p{fd, POLLIN, 0};
  while (::poll(&p, 1, -1) < 0) {
  }
  uint64_t v;
  ASSERT_EQ(::read(fd, &v, sizeof v), static_cast<ssize_t>(sizeof v));
}

// Two threads that sleep between batches and rely on the event index alone:
// a lost wake-up hangs (ctest's timeout), a wrong order or a torn entry fails.
TEST(Ring, TwoThreadsWithEventIndexLoseNoWakeup) {
  page_buf mem{};
  fr f;
  br b;
  ASSERT_TRUE(f.init(mem.b, 2 * 4096));
  ASSERT_TRUE(b.attach(mem.b, 2 * 4096));
  int to_back = eventfd(0, EFD_CLOEXEC), to_front = eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(to_back, 0);
  ASSERT_GE(to_front, 0);
  constexpr uint64_t total = 200000;
  std::atomic<uint64_t> notifies{0};

  std::thread back([&] {
    uint64_t expect = 0;
    msg m;
    while (expect < total) {
      bool more = true;
      while (more) {
        ring_take t;
        while ((t = b.take_request(&m)) == ring_take::item) {
          if (m.id != expect || m.payload[0] != ~m.id) {
            ADD_FAILURE() << "request " << expect << " came as " << m.id;
            return;
          }
          ++expect;
          b.put_response(m);
        }
        if (t == ring_take::broken) {
          ADD_FAILURE() << "broken";
          return;
        }
        if (b.push_responses()) {
          uint64_t one = 1;
          (void)::write(to_front, &one, sizeof one);
        }
        more = b.final_check_for_requests();
      }
      if (expect < total) wait_fd(to_back);
    }
  });

  uint64_t sent = 0, done = 0;
  msg m;
  while (done < total) {
    uint32_t batch = 0;
    while (sent < total && !f.full() && batch < 7) {
      *f.next_request() = {sent, {~sent, 0, 0}};
      f.produce();
      ++sent;
      ++batch;
    }
    if (batch && f.push_requests()) {
      ++notifies;
      uint64_t one = 1;
      ASSERT_EQ(::write(to_back, &one, sizeof one), 8);
    }
    ring_take t;
    while ((t = f.take_response(&m)) == ring_take::item) {
      ASSERT_EQ(m.id, done);
      ++done;
    }
    ASSERT_NE(t, ring_take::broken);
    if (done < total && (sent == total || f.full()) && !f.final_check_for_responses()) wait_fd(to_front);
  }
  back.join();
  close(to_back);
  close(to_front);
  RecordProperty("notifications", std::to_string(notifies.load()));
}

}  // namespace
