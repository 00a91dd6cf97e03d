// SPDX-License-Identifier: Apache-2.0
// The COW layer's ops tables: "cow" (opened by URI through the registry) and a
// private one that stacks on stores the caller already opened (open_cow).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/uri.hpp"
#include "storage/cow/cow.hpp"
#include "storage/cow/cow_device.hpp"

namespace uvd::storage {

namespace {

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

int fail_open(const core::vstore_open_params* p, const core::error& e) {
  set_err(p, e.message);
  int errnum = e.errnum();
  return errnum > 0 ? -errnum : -EIO;
}

// Keys a cow: address may carry. ro and direct are the front half's, which
// turns them into open flags.
core::result<void> check_options(std::string_view options) {
  while (!options.empty()) {
    auto amp = options.find('&');
    std::string_view kv = options.substr(0, amp);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
    std::string_view key = kv.substr(0, kv.find('='));
    if (key.empty()) continue;
    if (key == "fence") {
      std::string_view val = kv.size() > key.size() ? kv.substr(key.size() + 1) : std::string_view{};
      if (val != "0" && val != "1") return core::fail(EINVAL, "cow option fence takes 0 or 1, not '" + std::string(val) + "'");
      continue;
    }
    if (key != "base" && key != "ro" && key != "direct")
      return core::fail(EINVAL, "unknown cow option '" + std::string(key) + "' (known: base, ro, direct, fence)");
  }
  return core::ok();
}

core::result<std::string> recorded_base(Vstore& overlay) {
  std::unique_ptr<std::byte, decltype(&std::free)> buf(
      static_cast<std::byte*>(std::aligned_alloc(4096, cow_header_size)), &std::free);
  if (!buf) return core::fail(ENOMEM, "no memory for a COW header");
  const std::string name = overlay.transport_name() + ":" + overlay.target();
  if (overlay.size() < cow_header_size)
    return core::fail(EUCLEAN, "overlay " + name + " is too small to be a COW overlay");
  if (auto r = overlay.read(0, buf.get(), cow_header_size); !r)
    return core::fail(r.err().errnum(), "cannot read the header of overlay " + name + ": " + r.err().message);
  auto h = parse_cow_header({buf.get(), cow_header_size});
  if (!h) return core::fail(h.err().errnum(), "overlay " + name + ": " + h.err().message);
  if (h->base_uri.empty())
    return core::fail(EINVAL, "overlay " + name + " records no base address; give one with ?base=URI");
  return h->base_uri;
}

int cow_open(const core::vstore_open_params* p, void** handle) {
  auto* reg = static_cast<core::registry*>(const_cast<void*>(p->registry));
  if (!reg) {
    set_err(p, "the cow layer opens its base and overlay through the transport registry, and none was given");
    return -EINVAL;
  }
  if (auto r = check_options(p->options); !r) return fail_open(p, r.err());
  const bool ro = p->flags & core::VSTORE_OPEN_READ_ONLY;
  const bool direct = p->flags & core::VSTORE_OPEN_DIRECT;

  open_options oo;
  oo.read_only = ro;
  oo.direct = direct;
  oo.queue_depth = 128;  // data, bounce blocks, bitmap pages and flushes of 64 requests
  std::string fence;
  const bool fenced = core::find_option(p->options, "fence", &fence) && fence == "1";
  if (fenced) oo.options = "fence=1";  // the overlay store's own option (the file transport's)
  auto overlay = Vstore::open(*reg, cow_overlay_store_uri(p->target), oo);
  if (!overlay) return fail_open(p, core::make_error(overlay.err().errnum(), "overlay: " + overlay.err().message));
  if (fenced) {
    auto q = (*overlay)->fence(0);
    if (!q) {
      set_err(p, "fence=1, but the overlay store " + (*overlay)->transport_name() + ":" + (*overlay)->target() +
                     " cannot fence: " + q.err().message);
      return q.err().errnum() == ENOTSUP ? -ENOTSUP : -q.err().errnum();
    }
  }

  std::string base_uri;
  if (!core::find_option(p->options, "base", &base_uri)) {
    auto rec = recorded_base(**overlay);
    if (!rec) return fail_open(p, rec.err());
    base_uri = std::move(*rec);
  }
  open_options bo;
  bo.read_only = true;
  bo.direct = direct;
  bo.queue_depth = 128;
  auto base = Vstore::open(*reg, cow_normalize_uri(base_uri), bo);
  if (!base) return fail_open(p, core::make_error(base.err().errnum(), "base: " + base.err().message));

  auto dev = cow_device::make(std::shared_ptr<Vstore>(std::move(*base)), std::move(*overlay), ro, p->host);
  if (!dev) return fail_open(p, dev.err());
  *handle = dev->release();
  return 0;
}

void cow_release(void* handle) { delete static_cast<cow_device*>(handle); }

int cow_info(void* handle, core::vstore_info* out) { return static_cast<cow_device*>(handle)->info(out); }

size_t cow_ctx_size(void*) { return cow_device::ctx_size(); }

int cow_fence(void* handle, uint32_t epoch) { return static_cast<cow_device*>(handle)->fence(epoch); }

int cow_submit(void* handle, core::vstore_req* const* reqs, uint32_t n) {
  return static_cast<cow_device*>(handle)->submit(reqs, n);
}

// open_cow hands its already-open stores to the open op as the in-process
// context; this table is never registered, so no URI reaches it.
struct stack_handoff {
  std::shared_ptr<Vstore> base;
  std::unique_ptr<Vstore> overlay;
};

int cow_stack_open(const core::vstore_open_params* p, void** handle) {
  auto* h = static_cast<stack_handoff*>(p->context);
  if (!h || !h->base || !h->overlay) {
    set_err(p, "a stacked COW device needs its base and overlay handed over by open_cow");
    return -EINVAL;
  }
  auto dev = cow_device::make(std::move(h->base), std::move(h->overlay), p->flags & core::VSTORE_OPEN_READ_ONLY,
                              p->host);
  if (!dev) return fail_open(p, dev.err());
  *handle = dev->release();
  return 0;
}

constexpr core::vstore_ops cow_stack_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "cow",
    .description = "copy-on-write overlay over a shared read-only base (stacked in-process)",
    .open = cow_stack_open,
    .release = cow_release,
    .info = cow_info,
    .ctx_size = cow_ctx_size,
    .submit = cow_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = cow_fence,
};

}  // namespace

const core::vstore_ops cow_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "cow",
    .description = "copy-on-write overlay over a shared read-only base: cow:///overlay.cow[?base=URI&fence=1]",
    .open = cow_open,
    .release = cow_release,
    .info = cow_info,
    .ctx_size = cow_ctx_size,
    .submit = cow_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = cow_fence,
};

core::result<std::unique_ptr<Vstore>> open_cow(std::shared_ptr<Vstore> base, std::unique_ptr<Vstore> overlay,
                                               const open_options& opts) {
  if (!base || !overlay) return core::fail(EINVAL, "open_cow needs a base and an overlay");
  if (!opts.options.empty()) return core::fail(EINVAL, "a stacked COW device takes no transport options");
  std::string target = overlay->transport_name() + ":" + overlay->target();
  stack_handoff h{std::move(base), std::move(overlay)};
  return Vstore::open(cow_stack_ops, target, opts, nullptr, &h);
}

}  // namespace uvd::storage
