// SPDX-License-Identifier: Apache-2.0
#include "tests/storage/cow/cut_link.hpp"

#include <cerrno>

namespace uvd::test {

namespace {

struct link_req {
  storage::vstore_io io;
  core::vstore_req* req = nullptr;
  const core::vstore_host* host = nullptr;
  cut_link* link = nullptr;
};

struct link_dev {
  cut_link* link = nullptr;
  const core::vstore_host* host = nullptr;
};

int link_open(const core::vstore_open_params* p, void** handle) {
  auto* l = static_cast<cut_link*>(p->context);
  if (!l || !l->inner) return -EINVAL;
  *handle = new link_dev{l, p->host};
  return 0;
}

void link_release(void* h) { delete static_cast<link_dev*>(h); }

int link_info(void* h, core::vstore_info* out) {
  *out = static_cast<link_dev*>(h)->link->inner->info();
  return 0;
}

size_t link_ctx_size(void*) { return sizeof(link_req); }

void link_done(storage::vstore_io* io, int status) {
  auto* r = static_cast<link_req*>(io->user);
  if (r->link->cut.load()) status = -ECONNRESET;  // the answer died with the server
  r->host->complete(r->host->owner, r->req, status);
}

int link_submit(void* h, core::vstore_req* const* reqs, uint32_t n) {
  auto* d = static_cast<link_dev*>(h);
  for (uint32_t i = 0; i < n; ++i) {
    core::vstore_req* q = reqs[i];
    if (d->link->cut.load()) {
      d->host->complete(d->host->owner, q, -ECONNRESET);
      continue;
    }
    auto* r = new (q->ctx) link_req;
    r->req = q;
    r->host = d->host;
    r->link = d->link;
    r->io.opcode = q->opcode;
    r->io.flags = q->flags;
    r->io.offset = q->offset;
    r->io.length = q->length;
    r->io.iov = q->iov;
    r->io.iovcnt = q->iovcnt;
    r->io.epoch = q->epoch;
    r->io.done = &link_done;
    r->io.user = r;
    if (q->opcode == core::VSTORE_OP_WRITE && q->offset >= d->link->hold_lo.load() &&
        q->offset < d->link->hold_hi.load()) {
      std::lock_guard lk(d->link->mu);
      d->link->held.push_back(&r->io);
      continue;
    }
    d->link->inner->submit(&r->io);
  }
  return static_cast<int>(n);
}

int link_fence(void* h, uint32_t epoch) {
  auto* d = static_cast<link_dev*>(h);
  if (d->link->cut.load()) return -ECONNRESET;
  auto r = d->link->inner->fence(epoch);
  if (!r) return -r.err().errnum();
  return static_cast<int>(*r);
}

}  // namespace

size_t cut_link::held_count() {
  std::lock_guard lk(mu);
  return held.size();
}

void cut_link::release_held() {
  std::vector<storage::vstore_io*> ios;
  {
    std::lock_guard lk(mu);
    ios.swap(held);
  }
  if (!ios.empty()) inner->submit(ios);
}

const core::vstore_ops cut_link_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "cut-link",
    .description = "a connection to a device in this process that a test can cut",
    .open = link_open,
    .release = link_release,
    .info = link_info,
    .ctx_size = link_ctx_size,
    .submit = link_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = link_fence,
};

}  // namespace uvd::test
