// SPDX-License-Identifier: Apache-2.0
#include "tests/storage/cow/sim_disk.hpp"

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace uvd::test {

namespace {

struct sim_handle {
  sim_disk* disk;
  const core::vstore_host* host;
};

int sim_open(const core::vstore_open_params* p, void** handle) {
  uintptr_t addr = 0;
  if (std::sscanf(p->target, "sim@%" SCNxPTR, &addr) != 1 || addr == 0) return -EINVAL;
  *handle = new sim_handle{reinterpret_cast<sim_disk*>(addr), p->host};
  return 0;
}

void sim_release(void* h) { delete static_cast<sim_handle*>(h); }

int sim_info(void* h, core::vstore_info* out) {
  *out = {};
  out->size = static_cast<sim_handle*>(h)->disk->size();
  out->block_size = 512;
  out->features = core::VSTORE_F_FLUSH;
  std::snprintf(out->id, sizeof out->id, "sim");
  return 0;
}

int sim_submit(void* h, core::vstore_req* const* reqs, uint32_t n) {
  auto* s = static_cast<sim_handle*>(h);
  for (uint32_t i = 0; i < n; ++i) {
    s->disk->before_request();
    int rc = s->disk->execute(*reqs[i]);
    s->host->complete(s->host->owner, reqs[i], rc);
  }
  return static_cast<int>(n);
}

constexpr core::vstore_ops sim_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "sim",
    .description = "test disk with a volatile write cache",
    .open = sim_open,
    .release = sim_release,
    .info = sim_info,
    .ctx_size = nullptr,
    .submit = sim_submit,
    .probe = nullptr,
    .poll = nullptr,
};

}  // namespace

std::unique_ptr<storage::Vstore> sim_disk::open() {
  char target[48];
  std::snprintf(target, sizeof target, "sim@%" PRIxPTR, reinterpret_cast<uintptr_t>(this));
  auto v = storage::Vstore::open(sim_ops, target, {});
  return v ? std::move(*v) : nullptr;
}

int sim_disk::execute(const core::vstore_req& req) {
  std::lock_guard lk(mu_);
  switch (req.opcode) {
    case core::VSTORE_OP_READ: {
      uint64_t at = req.offset;
      for (uint32_t i = 0; i < req.iovcnt; ++i) {
        std::memcpy(req.iov[i].iov_base, current_.data() + at, req.iov[i].iov_len);
        at += req.iov[i].iov_len;
      }
      return 0;
    }
    case core::VSTORE_OP_WRITE: {
      if (fail_hi_ > fail_lo_ && req.offset < fail_hi_ && fail_lo_ < req.offset + req.length) return -EIO;
      pending p{req.offset, std::vector<std::byte>(req.length)};
      uint64_t at = 0;
      for (uint32_t i = 0; i < req.iovcnt; ++i) {
        std::memcpy(p.data.data() + at, req.iov[i].iov_base, req.iov[i].iov_len);
        at += req.iov[i].iov_len;
      }
      std::memcpy(current_.data() + req.offset, p.data.data(), req.length);
      unflushed_.push_back(std::move(p));
      return 0;
    }
    case core::VSTORE_OP_FLUSH:
      durable_ = current_;
      unflushed_.clear();
      ++flushes_;
      return 0;
    default:
      return -EOPNOTSUPP;
  }
}

std::vector<std::byte> sim_disk::power_cut(std::mt19937_64& rng, uint64_t atom) {
  std::lock_guard lk(mu_);
  std::vector<std::byte> img = durable_;
  for (const pending& p : unflushed_) {
    const uint64_t end = p.offset + p.data.size();
    for (uint64_t at = p.offset; at < end;) {
      const uint64_t next = std::min(end, (at / atom + 1) * atom);
      if (rng() & 1) std::memcpy(img.data() + at, p.data.data() + (at - p.offset), next - at);
      at = next;
    }
  }
  return img;
}

std::vector<std::byte> sim_disk::contents() {
  std::lock_guard lk(mu_);
  return current_;
}

void sim_disk::fail_writes(uint64_t lo, uint64_t hi) {
  std::lock_guard lk(mu_);
  fail_lo_ = lo;
  fail_hi_ = hi;
}

}  // namespace uvd::test
