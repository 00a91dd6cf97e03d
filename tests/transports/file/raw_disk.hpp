// SPDX-License-Identifier: Apache-2.0
#pragma once
// Drives a vstore_ops table directly, as the front half would: preallocated
// requests with their context, a completion path, resubmission of what the
// transport did not accept. Lets the file tests see the transport itself.
#include <gtest/gtest.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "core/vstore_ops.hpp"

namespace uvd::test {

struct test_req {
  core::vstore_req req{};  // first: the completion maps the vstore_req back to this
  alignas(16) std::byte ctx[128]{};
  bool done = false;
  int status = 1;

  void set(uint16_t opcode, uint64_t offset, uint64_t length, const iovec* iov = nullptr, uint32_t iovcnt = 0,
           uint16_t flags = 0) {
    req.opcode = opcode;
    req.offset = offset;
    req.length = length;
    req.iov = iov;
    req.iovcnt = iovcnt;
    req.flags = flags;
    req.ctx = ctx;
    done = false;
    status = 1;
  }
};
static_assert(std::is_standard_layout_v<test_req>);

class raw_disk {
 public:
  static constexpr auto timeout = std::chrono::seconds(30);

  raw_disk() = default;
  raw_disk(const raw_disk&) = delete;
  raw_disk& operator=(const raw_disk&) = delete;
  ~raw_disk() { close(); }

  // Returns the open op's result; errbuf() holds its message.
  int open(const core::vstore_ops& ops, const std::string& target, const std::string& options, uint32_t flags = 0) {
    close();
    ops_ = &ops;
    host_ = {this, &raw_disk::on_complete};
    core::vstore_open_params p{};
    p.target = target.c_str();
    p.options = options.c_str();
    p.flags = flags;
    p.host = &host_;
    errbuf_[0] = '\0';
    p.errbuf = errbuf_;
    p.errbuf_len = sizeof errbuf_;
    int rc = ops.open(&p, &handle_);
    if (rc != 0) {
      handle_ = nullptr;
      return rc;
    }
    EXPECT_EQ(ops.info(handle_, &info_), 0);
    if (ops.ctx_size) {
      EXPECT_LE(ops.ctx_size(handle_), sizeof(test_req::ctx));
    }
    return 0;
  }

  void close() {
    if (!handle_) return;
    std::unique_lock lock(mu_);
    EXPECT_TRUE(cv_.wait_for(lock, timeout, [this] { return completed_ == submitted_; }))
        << "requests still in flight at close";
    lock.unlock();
    ops_->release(handle_);
    handle_ = nullptr;
  }

  void* handle() const { return handle_; }
  const core::vstore_info& info() const { return info_; }
  const char* errbuf() const { return errbuf_; }

  // Submits every request, resubmitting those not accepted after a
  // completion; returns the first negative submit() result, else 0.
  int submit(const std::vector<test_req*>& reqs, std::vector<int>* accepted = nullptr) {
    std::vector<core::vstore_req*> ptrs;
    for (test_req* r : reqs) ptrs.push_back(&r->req);
    size_t next = 0;
    while (next < ptrs.size()) {
      uint64_t seen;
      {
        std::lock_guard lock(mu_);
        seen = completed_;
        submitted_ += ptrs.size() - next;
      }
      int rc = ops_->submit(handle_, ptrs.data() + next, static_cast<uint32_t>(ptrs.size() - next));
      {
        std::lock_guard lock(mu_);
        submitted_ -= ptrs.size() - next - (rc > 0 ? rc : 0);
      }
      if (rc < 0) return rc;
      if (accepted) accepted->push_back(rc);
      next += static_cast<size_t>(rc);
      if (next < ptrs.size()) {
        std::unique_lock lock(mu_);
        if (!cv_.wait_for(lock, timeout, [&] { return completed_ > seen; })) {
          ADD_FAILURE() << "transport accepted nothing and completed nothing";
          return -ETIMEDOUT;
        }
      }
    }
    return 0;
  }

  bool wait(const std::vector<test_req*>& reqs) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      for (test_req* r : reqs)
        if (!r->done) return false;
      return true;
    });
  }

  // One request, synchronously: its status, or 1 if it never completed.
  int run(test_req& r) {
    if (int rc = submit({&r}); rc < 0) return rc;
    if (!wait({&r})) {
      ADD_FAILURE() << "request did not complete";
      return 1;
    }
    return r.status;
  }

  int read(uint64_t off, void* buf, uint64_t len) {
    iovec v{buf, len};
    test_req r;
    r.set(core::VSTORE_OP_READ, off, len, &v, 1);
    return run(r);
  }
  int write(uint64_t off, const void* buf, uint64_t len, uint16_t flags = 0) {
    iovec v{const_cast<void*>(buf), len};
    test_req r;
    r.set(core::VSTORE_OP_WRITE, off, len, &v, 1, flags);
    return run(r);
  }
  int flush() {
    test_req r;
    r.set(core::VSTORE_OP_FLUSH, 0, 0);
    return run(r);
  }
  int discard(uint64_t off, uint64_t len) {
    test_req r;
    r.set(core::VSTORE_OP_DISCARD, off, len);
    return run(r);
  }
  int write_zeroes(uint64_t off, uint64_t len, uint16_t flags = 0) {
    test_req r;
    r.set(core::VSTORE_OP_WRITE_ZEROES, off, len, nullptr, 0, flags);
    return run(r);
  }

 private:
  static void on_complete(void* owner, core::vstore_req* req, int status) {
    auto* self = static_cast<raw_disk*>(owner);
    auto* r = reinterpret_cast<test_req*>(req);
    {
      std::lock_guard lock(self->mu_);
      EXPECT_FALSE(r->done) << "request completed twice";
      r->status = status;
      r->done = true;
      ++self->completed_;
    }
    self->cv_.notify_all();
  }

  const core::vstore_ops* ops_ = nullptr;
  core::vstore_host host_{};
  void* handle_ = nullptr;
  core::vstore_info info_{};
  char errbuf_[512] = {};
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t submitted_ = 0;
  uint64_t completed_ = 0;
};

}  // namespace uvd::test
