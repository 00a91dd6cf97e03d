// SPDX-License-Identifier: Apache-2.0
// Fencing for the file transport (fence=1): requests run inside passes of the
// image's shared epoch record (storage/fence.hpp), so two back-end processes
// serving one image (two `uvd serve --rdma`) share one epoch, and a request of
// a fenced-off client can neither start nor still be running once fence(e)
// returned.
//
// The pass is taken at submission and ended in file_device::complete, so it
// covers the whole time the kernel may still write: a write sitting in the
// io_uring completion queue of a frozen process keeps its pass, and an
// advance waits for it instead of letting it land afterwards.
//
// submit() is also called from completion threads (the front half resubmits
// from its completion callback), and a completion thread that blocked for a
// pass would keep the passes it has yet to reap from ending: the advance
// waiting for them would never finish. So submit only takes passes that are
// free at once (fence_record::try_admit); a request that would have to wait,
// and every request after it, goes to one gate thread per device that waits
// for the pass and then hands the request to the engine.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <spdlog/spdlog.h>

#include "storage/fence.hpp"
#include "transports/file/file_device.hpp"

namespace uvd::file {

using core::vstore_req;

struct file_fence_gate {
  file_device* dev = nullptr;
  std::unique_ptr<storage::fence_record> rec;
  std::mutex mu;
  std::condition_variable cv;
  vstore_req* head = nullptr;  // waiting for a pass, FIFO, linked through ctx.next
  vstore_req* tail = nullptr;
  bool busy = false;           // the gate thread holds a request taken off the queue
  bool stop = false;
  std::thread worker;

  void push_locked(vstore_req* r) {
    ctx_of(r).next = nullptr;
    if (tail) ctx_of(tail).next = r;
    else head = r;
    tail = r;
  }
  void run();
};

void file_fence_gate_deleter::operator()(file_fence_gate* g) const noexcept {
  {
    std::lock_guard lk(g->mu);
    g->stop = true;
  }
  g->cv.notify_all();
  if (g->worker.joinable()) g->worker.join();
  delete g;
}

void file_fence_gate::run() {
  using namespace std::chrono_literals;
  std::unique_lock lk(mu);
  for (;;) {
    cv.wait(lk, [&] { return head != nullptr || stop; });
    if (!head) return;  // stopping: release comes only after every request completed
    vstore_req* r = head;
    head = ctx_of(r).next;
    if (!head) tail = nullptr;
    busy = true;
    lk.unlock();
    int rc = rec->admit(r->epoch);  // may wait for an advance, here or in another process
    if (rc == 0) {
      ctx_of(r).pass = 1;
      for (;;) {
        int n = dev->engine->submit(&r, 1);
        if (n == 1) break;
        if (n < 0) {  // the engine broke: the pass ends with the request
          rc = n;
          break;
        }
        // The ring is full of requests that hold passes; they complete
        // without this thread, and free a slot.
        std::this_thread::sleep_for(200us);
      }
    } else if (rc == -ESTALE) {
      dev->stats.fence_refused.fetch_add(1, std::memory_order_relaxed);
    } else {
      spdlog::error("file: {}: fence record: {}", dev->path, std::strerror(-rc));
    }
    if (rc != 0) dev->complete(r, rc);
    lk.lock();
    busy = false;
  }
}

core::result<void> file_fence_start(file_device& dev) {
  auto rec = storage::fence_record::open(storage::fence_record::path_for(dev.path));
  if (!rec) return core::fail(rec.err().errnum(), "file: fence=1 for " + dev.path + ": " + rec.err().what());
  std::unique_ptr<file_fence_gate, file_fence_gate_deleter> g(new file_fence_gate());
  g->dev = &dev;
  g->rec = std::move(*rec);
  g->worker = std::thread([gate = g.get()] { gate->run(); });
  spdlog::debug("file: {}: requests fenced by {}", dev.path, g->rec->path());
  dev.fence = std::move(g);
  return core::ok();
}

int file_fence_submit(file_device& dev, vstore_req* const* reqs, uint32_t n) {
  file_fence_gate& g = *dev.fence;
  auto defer = [&](uint32_t from) {
    {
      std::lock_guard lk(g.mu);
      for (uint32_t j = from; j < n; ++j) g.push_locked(reqs[j]);
    }
    dev.stats.fence_deferred.fetch_add(n - from, std::memory_order_relaxed);
    g.cv.notify_one();
    return static_cast<int>(n);
  };
  {
    std::lock_guard lk(g.mu);
    if (g.head || g.busy) {  // keep order behind requests already waiting
      for (uint32_t j = 0; j < n; ++j) g.push_locked(reqs[j]);
      dev.stats.fence_deferred.fetch_add(n, std::memory_order_relaxed);
      g.cv.notify_one();
      return static_cast<int>(n);
    }
  }
  uint32_t i = 0;
  while (i < n) {
    uint32_t k = i;
    int rc = 0;
    for (; k < n; ++k) {
      rc = g.rec->try_admit(reqs[k]->epoch);
      if (rc != 0) break;
      ctx_of(reqs[k]).pass = 1;
    }
    if (k > i) {
      int got = dev.engine->submit(reqs + i, k - i);
      uint32_t taken = got < 0 ? 0 : static_cast<uint32_t>(got);
      // What the engine did not take was not started: its passes end here.
      for (uint32_t j = i + taken; j < k; ++j) {
        ctx_of(reqs[j]).pass = 0;
        g.rec->leave();
      }
      if (got < 0) return i > 0 ? static_cast<int>(i) : got;
      if (taken < k - i) return static_cast<int>(i + taken);
      i = k;
    }
    if (i == n) break;
    if (rc == -EAGAIN) return defer(i);
    if (rc == -ESTALE) dev.stats.fence_refused.fetch_add(1, std::memory_order_relaxed);
    else spdlog::error("file: {}: fence record: {}", dev.path, std::strerror(-rc));
    dev.complete(reqs[i], rc);  // a refusal counts as taken: it completed
    ++i;
  }
  return static_cast<int>(n);
}

void file_fence_leave(file_device& dev, vstore_req* req) {
  ctx_of(req).pass = 0;
  dev.fence->rec->leave();
}

int file_fence_op(file_device& dev, uint32_t epoch) {
  if (!dev.fence) return -ENOTSUP;
  if (epoch == 0) {
    auto cur = dev.fence->rec->current();
    if (!cur) return -cur.err().errnum();
    return static_cast<int>(std::min<uint32_t>(*cur, INT32_MAX));
  }
  if (epoch > static_cast<uint32_t>(INT32_MAX)) return -EINVAL;
  auto r = dev.fence->rec->advance(epoch);
  if (!r) {
    if (r.err().errnum() != ESTALE) spdlog::warn("file: {}: {}", dev.path, r.err().what());
    return -r.err().errnum();
  }
  spdlog::debug("file: {}: fenced to epoch {}", dev.path, epoch);
  return 0;
}

}  // namespace uvd::file
