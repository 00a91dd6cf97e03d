// SPDX-License-Identifier: Apache-2.0
#include "transports/memory/memory.hpp"

#include <sys/mman.h>

#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/uri.hpp"

namespace uvd::memory {

namespace {

using core::vstore_req;

struct memory_dev {
  std::byte* mem = nullptr;
  uint64_t size = 0;
  uint32_t block_size = 512;
  uint32_t max_transfer = 0;
  uint32_t max_segments = 0;
  bool read_only = false;
  uint64_t fail_offset = UINT64_MAX;
  const core::vstore_host* host = nullptr;
  std::shared_mutex data_mu;  // writers exclusive, readers shared

  bool async = false;
  uint32_t depth = 0;
  std::mutex q_mu;
  std::condition_variable q_cv;
  std::deque<vstore_req*> queue;
  bool stopping = false;
  std::thread worker;

  int execute(vstore_req* r);
  void run_worker();
};

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

int option_u64(const core::vstore_open_params* p, const char* key, uint64_t* out) {
  std::string v;
  if (!core::find_option(p->options, key, &v)) return 0;
  auto n = core::parse_size(v);
  if (!n) {
    set_err(p, std::string("option ") + key + ": " + n.err().message);
    return -EINVAL;
  }
  *out = *n;
  return 0;
}

int memory_open(const core::vstore_open_params* p, void** handle) {
  auto size = core::parse_size(p->target);
  if (!size || *size == 0) {
    set_err(p, "memory device needs a size, e.g. memory:64M (got '" + std::string(p->target) + "')");
    return -EINVAL;
  }
  auto dev = std::make_unique<memory_dev>();
  dev->size = *size;
  uint64_t bs = 512, mt = 0, ms = 0, depth = 16, async = 0;
  if (int rc = option_u64(p, "block_size", &bs); rc < 0) return rc;
  if (int rc = option_u64(p, "max_transfer", &mt); rc < 0) return rc;
  if (int rc = option_u64(p, "max_segments", &ms); rc < 0) return rc;
  if (int rc = option_u64(p, "depth", &depth); rc < 0) return rc;
  if (int rc = option_u64(p, "async", &async); rc < 0) return rc;
  if (int rc = option_u64(p, "fail_offset", &dev->fail_offset); rc < 0) return rc;
  if (bs < 1 || bs > 65536 || (bs & (bs - 1)) || dev->size % bs) {
    set_err(p, "block_size must be a power of two up to 64K that divides the size");
    return -EINVAL;
  }
  dev->block_size = static_cast<uint32_t>(bs);
  dev->max_transfer = static_cast<uint32_t>(mt);
  dev->max_segments = static_cast<uint32_t>(ms);
  dev->depth = depth ? static_cast<uint32_t>(depth) : 1;
  dev->async = async != 0;
  dev->read_only = p->flags & core::VSTORE_OPEN_READ_ONLY;
  dev->host = p->host;
  // Anonymous pages: untouched ranges cost nothing and read as zeros.
  void* m = mmap(nullptr, dev->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    int e = errno;
    set_err(p, "cannot reserve " + std::to_string(dev->size) + " bytes: " + std::strerror(e));
    return -e;
  }
  dev->mem = static_cast<std::byte*>(m);
  if (dev->async) dev->worker = std::thread([d = dev.get()] { d->run_worker(); });
  *handle = dev.release();
  return 0;
}

void memory_release(void* handle) {
  auto* dev = static_cast<memory_dev*>(handle);
  if (dev->worker.joinable()) {
    {
      std::lock_guard lk(dev->q_mu);
      dev->stopping = true;
    }
    dev->q_cv.notify_all();
    dev->worker.join();
  }
  munmap(dev->mem, dev->size);
  delete dev;
}

int memory_info(void* handle, core::vstore_info* out) {
  auto* dev = static_cast<memory_dev*>(handle);
  *out = {};
  out->size = dev->size;
  out->block_size = dev->block_size;
  out->max_transfer = dev->max_transfer;
  out->max_segments = dev->max_segments;
  out->features = core::VSTORE_F_DISCARD | core::VSTORE_F_DISCARD_ZEROES | core::VSTORE_F_WRITE_ZEROES;
  out->read_only = dev->read_only;
  std::snprintf(out->id, sizeof out->id, "memory:%p", static_cast<void*>(dev->mem));
  return 0;
}

int memory_dev::execute(vstore_req* r) {
  if (r->opcode != core::VSTORE_OP_FLUSH && fail_offset >= r->offset && fail_offset - r->offset < r->length)
    return -EIO;
  switch (r->opcode) {
    case core::VSTORE_OP_READ: {
      std::shared_lock lk(data_mu);
      uint64_t off = r->offset;
      for (uint32_t i = 0; i < r->iovcnt; ++i) {
        std::memcpy(r->iov[i].iov_base, mem + off, r->iov[i].iov_len);
        off += r->iov[i].iov_len;
      }
      return 0;
    }
    case core::VSTORE_OP_WRITE: {
      std::unique_lock lk(data_mu);
      uint64_t off = r->offset;
      for (uint32_t i = 0; i < r->iovcnt; ++i) {
        std::memcpy(mem + off, r->iov[i].iov_base, r->iov[i].iov_len);
        off += r->iov[i].iov_len;
      }
      return 0;
    }
    case core::VSTORE_OP_DISCARD:
    case core::VSTORE_OP_WRITE_ZEROES: {
      std::unique_lock lk(data_mu);
      std::memset(mem + r->offset, 0, r->length);
      return 0;
    }
    case core::VSTORE_OP_FLUSH:
      return 0;
  }
  return -EINVAL;
}

void memory_dev::run_worker() {
  std::unique_lock lk(q_mu);
  for (;;) {
    q_cv.wait(lk, [&] { return stopping || !queue.empty(); });
    if (queue.empty()) return;
    std::deque<vstore_req*> batch;
    batch.swap(queue);
    lk.unlock();
    for (vstore_req* r : batch) host->complete(host->owner, r, execute(r));
    lk.lock();
  }
}

int memory_submit(void* handle, vstore_req* const* reqs, uint32_t n) {
  auto* dev = static_cast<memory_dev*>(handle);
  if (!dev->async) {
    for (uint32_t i = 0; i < n; ++i) dev->host->complete(dev->host->owner, reqs[i], dev->execute(reqs[i]));
    return static_cast<int>(n);
  }
  uint32_t taken = 0;
  {
    std::lock_guard lk(dev->q_mu);
    while (taken < n && dev->queue.size() < dev->depth) dev->queue.push_back(reqs[taken++]);
  }
  if (taken) dev->q_cv.notify_one();
  return static_cast<int>(taken);
}

}  // namespace

const core::vstore_ops memory_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "memory",
    .description = "RAM disk (reference transport): memory:SIZE",
    .open = memory_open,
    .release = memory_release,
    .info = memory_info,
    .ctx_size = nullptr,
    .submit = memory_submit,
    .probe = nullptr,
    .poll = nullptr,
};

}  // namespace uvd::memory
