// SPDX-License-Identifier: Apache-2.0
// The thread-pool engine: where io_uring is refused (seccomp filters in
// containers, old kernels) or engine=threads is asked for, workers run each
// request with preadv2/pwritev2/fdatasync/fallocate. The io_uring engine also
// keeps one of these, with a single worker, for the few ops io_uring cannot
// express (BLKDISCARD, writing zeros after fallocate was refused).
#include <pthread.h>

#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "transports/file/file_device.hpp"

namespace uvd::file {

using core::vstore_req;

namespace {

class thread_engine final : public file_engine {
 public:
  thread_engine(file_device& dev, file_done_fn done, void* arg) : dev_(dev), done_(done), arg_(arg) {}

  ~thread_engine() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  core::result<void> start(uint32_t threads) {
    try {
      workers_.reserve(threads);
      for (uint32_t i = 0; i < threads; ++i) {
        workers_.emplace_back([this] { run(); });
        pthread_setname_np(workers_.back().native_handle(), "uvd-file-io");
      }
    } catch (const std::system_error& e) {
      return core::fail(e.code().value(), std::string("cannot start file I/O threads: ") + e.what());
    }
    return core::ok();
  }

  const char* name() const noexcept override { return "threads"; }

  // The queue is an intrusive list through file_req_ctx::next, so queueing
  // allocates nothing and never runs out: every request is accepted.
  int submit(vstore_req* const* reqs, uint32_t n) override {
    // Sort first, publish after: once a worker can see a request it may
    // complete it at any moment, so a queued request is not touched again.
    vstore_req* head = nullptr;
    vstore_req* tail = nullptr;
    vstore_req* refused = nullptr;
    uint32_t queued = 0;
    for (uint32_t i = 0; i < n; ++i) {
      vstore_req* req = reqs[i];
      if (file_precheck(dev_, *req) != 0) {
        ctx_of(req).next = refused;
        refused = req;
        continue;
      }
      ctx_of(req).next = nullptr;
      if (tail) ctx_of(tail).next = req;
      else head = req;
      tail = req;
      ++queued;
    }
    if (head) {
      {
        std::lock_guard lock(mu_);
        if (tail_) ctx_of(tail_).next = head;
        else head_ = head;
        tail_ = tail;
      }
      // One wake-up per batch; a worker that finds more queued keeps going.
      dev_.stats.notifies.fetch_add(1, std::memory_order_relaxed);
      if (queued >= workers_.size()) cv_.notify_all();
      else for (uint32_t i = 0; i < queued; ++i) cv_.notify_one();
    }
    // Refused requests complete outside the lock: complete() may submit again.
    for (vstore_req* req = refused; req;) {
      vstore_req* next = ctx_of(req).next;
      finish(req, file_precheck(dev_, *req));
      req = next;
    }
    if (n > 0) dev_.stats.batches.fetch_add(1, std::memory_order_relaxed);
    return static_cast<int>(n);
  }

 private:
  void finish(vstore_req* req, int status) {
    if (done_) done_(arg_, req, status);
    else dev_.complete(req, status);
  }

  void run() {
    for (;;) {
      vstore_req* req;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return head_ != nullptr || stopping_; });
        if (!head_) return;  // stopping, and the queue is empty
        req = head_;
        head_ = ctx_of(req).next;
        if (!head_) tail_ = nullptr;
      }
      finish(req, file_execute(dev_, req));
    }
  }

  file_device& dev_;
  file_done_fn done_;
  void* arg_;
  std::mutex mu_;
  std::condition_variable cv_;
  vstore_req* head_ = nullptr;
  vstore_req* tail_ = nullptr;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

core::result<std::unique_ptr<file_engine>> make_thread_engine(file_device& dev, uint32_t threads, file_done_fn done,
                                                              void* arg) {
  if (threads == 0) return core::fail(EINVAL, "the file thread pool needs at least one thread");
  auto engine = std::make_unique<thread_engine>(dev, done, arg);
  if (auto started = engine->start(threads); !started) return core::fail(std::move(started).err());
  return std::unique_ptr<file_engine>(std::move(engine));
}

}  // namespace uvd::file
