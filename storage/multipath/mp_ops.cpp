// SPDX-License-Identifier: Apache-2.0
// The multipath ops tables: "multipath" (paths opened by URI through the
// registry) and a private one that stacks on paths the caller opened
// (open_multipath). Also the URI options and the status view.
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstring>

#include "core/uri.hpp"
#include "storage/multipath/mp_device.hpp"
#include "storage/multipath/multipath.hpp"

namespace uvd::storage {

namespace {

using namespace std::chrono_literals;

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

int fail_open(const core::vstore_open_params* p, const core::error& e) {
  set_err(p, e.message);
  int errnum = e.errnum();
  return errnum > 0 ? -errnum : -EIO;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

core::result<std::string> percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    int hi = i + 2 < s.size() ? hex_value(s[i + 1]) : -1;
    int lo = i + 2 < s.size() ? hex_value(s[i + 2]) : -1;
    if (hi < 0 || lo < 0) return core::fail(EINVAL, "bad percent escape in '" + std::string(s) + "'");
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

std::string percent_encode(std::string_view s) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || std::strchr("-._~:/@,;+", ch)) {
      out += ch;
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// "500ms", "30s", "2m"; a bare number is seconds.
core::result<std::chrono::milliseconds> parse_duration(std::string_view key, std::string_view v) {
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  std::string_view unit(end, v.data() + v.size() - end);
  if (ec != std::errc() || end == v.data() || n > 86400000)
    return core::fail(EINVAL, "multipath option " + std::string(key) + ": '" + std::string(v) + "' is not a duration");
  if (unit == "ms") return std::chrono::milliseconds(n);
  if (unit.empty() || unit == "s") return std::chrono::milliseconds(n * 1000);
  if (unit == "m") return std::chrono::milliseconds(n * 60000);
  return core::fail(EINVAL, "multipath option " + std::string(key) + ": unknown unit in '" + std::string(v) +
                                "' (use ms, s or m)");
}

struct stack_handoff {
  std::vector<std::unique_ptr<Vstore>> paths;
  multipath_options mo;
  std::shared_ptr<multipath_monitor>* monitor = nullptr;
  path_reopen reopen;
};

struct mp_handle {
  std::shared_ptr<mp_device> dev;
};

int make_handle(const core::vstore_open_params* p, std::vector<std::unique_ptr<Vstore>> paths,
                const multipath_options& mo, std::shared_ptr<multipath_monitor>* monitor, path_reopen reopen,
                void** handle) {
  auto dev = mp_device::make(std::move(paths), mo, p->flags & core::VSTORE_OPEN_READ_ONLY, p->host, std::move(reopen));
  if (!dev) return fail_open(p, dev.err());
  if (monitor) *monitor = std::make_shared<multipath_monitor>(*dev);
  *handle = new mp_handle{std::move(*dev)};
  return 0;
}

int mp_open(const core::vstore_open_params* p, void** handle) {
  auto* reg = static_cast<core::registry*>(const_cast<void*>(p->registry));
  if (!reg) {
    set_err(p, "the multipath layer opens its paths through the transport registry, and none was given");
    return -EINVAL;
  }
  std::vector<std::string> uris;
  auto mo = parse_multipath_options(p->options, &uris);
  if (!mo) return fail_open(p, mo.err());
  if (p->target[0]) mo->label = p->target;
  open_options oo;
  oo.read_only = p->flags & core::VSTORE_OPEN_READ_ONLY;
  oo.direct = p->flags & core::VSTORE_OPEN_DIRECT;
  oo.queue_depth = mo->path_queue_depth;
  std::vector<std::unique_ptr<Vstore>> paths;
  for (size_t i = 0; i < uris.size(); ++i) {
    auto v = Vstore::open(*reg, uris[i], oo);
    if (!v)
      return fail_open(p, core::make_error(v.err().errnum(), "path " + std::to_string(i + 1) + " (" + uris[i] +
                                                                 "): " + v.err().message));
    paths.push_back(std::move(*v));
  }
  path_reopen reopen{reg, std::move(uris), oo};
  return make_handle(p, std::move(paths), *mo, nullptr, std::move(reopen), handle);
}

int mp_stack_open(const core::vstore_open_params* p, void** handle) {
  auto* h = static_cast<stack_handoff*>(p->context);
  if (!h) {
    set_err(p, "a stacked multipath device needs its paths handed over by open_multipath");
    return -EINVAL;
  }
  return make_handle(p, std::move(h->paths), h->mo, h->monitor, std::move(h->reopen), handle);
}

void mp_release(void* handle) {
  auto* h = static_cast<mp_handle*>(handle);
  h->dev->close();
  delete h;
}

int mp_info(void* handle, core::vstore_info* out) { return static_cast<mp_handle*>(handle)->dev->info(out); }

size_t mp_ctx_size(void*) { return mp_device::ctx_size(); }

int mp_submit(void* handle, core::vstore_req* const* reqs, uint32_t n) {
  return static_cast<mp_handle*>(handle)->dev->submit(reqs, n);
}

constexpr core::vstore_ops mp_stack_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "multipath",
    .description = "one disk over several paths (stacked in-process)",
    .open = mp_stack_open,
    .release = mp_release,
    .info = mp_info,
    .ctx_size = mp_ctx_size,
    .submit = mp_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = nullptr,
};

}  // namespace

const core::vstore_ops multipath_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "multipath",
    .description = "one disk over several paths, failover and fencing: multipath:?path=URI&path=URI[&policy=...]",
    .open = mp_open,
    .release = mp_release,
    .info = mp_info,
    .ctx_size = mp_ctx_size,
    .submit = mp_submit,
    .probe = nullptr,
    .poll = nullptr,
    // The device is the one that fences; it does not offer fencing upward.
    .fence = nullptr,
};

const char* to_string(path_state s) {
  switch (s) {
    case path_state::active: return "active";
    case path_state::standby: return "standby";
    case path_state::failed: return "failed";
  }
  return "?";
}

const char* to_string(mp_policy p) { return p == mp_policy::round_robin ? "round-robin" : "failover"; }

core::result<multipath_options> parse_multipath_options(std::string_view options, std::vector<std::string>* paths) {
  multipath_options mo;
  std::vector<std::string> found;
  while (!options.empty()) {
    auto amp = options.find('&');
    std::string_view kv = options.substr(0, amp);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
    if (kv.empty()) continue;
    auto eq = kv.find('=');
    std::string_view key = kv.substr(0, eq);
    std::string_view val = eq == std::string_view::npos ? std::string_view("1") : kv.substr(eq + 1);
    auto bad = [&](const char* want) {
      return core::fail(EINVAL, "multipath option " + std::string(key) + "='" + std::string(val) + "': expected " + want);
    };
    if (key == "path") {
      auto d = percent_decode(val);
      if (!d) return core::fail(std::move(d).err());
      if (d->empty()) return bad("a device URI");
      found.push_back(std::move(*d));
    } else if (key == "policy") {
      if (val == "failover" || val == "failover-only") mo.policy = mp_policy::failover;
      else if (val == "round-robin") mo.policy = mp_policy::round_robin;
      else return bad("failover or round-robin");
    } else if (key == "failback") {
      if (val == "immediate") mo.failback = true;
      else if (val == "manual") mo.failback = false;
      else return bad("immediate or manual");
    } else if (key == "queue_if_no_path" || key == "check_interval" || key == "io_timeout" || key == "reopen_max") {
      auto d = parse_duration(key, val);
      if (!d) return core::fail(std::move(d).err());
      if (key == "queue_if_no_path") mo.queue_if_no_path = *d;
      else if (key == "reopen_max") mo.reopen_max = *d;
      else if (*d <= 0ms) return bad("a positive duration");
      else if (key == "check_interval") mo.check_interval = *d;
      else mo.io_timeout = *d;
    } else if (key == "fence") {
      if (val == "auto") mo.fence = mp_fence::automatic;
      else if (val == "required") mo.fence = mp_fence::required;
      else if (val == "off") mo.fence = mp_fence::off;
      else return bad("auto, required or off");
    } else if (key == "check_id") {
      if (val != "0" && val != "1") return bad("0 or 1");
      mo.check_id = val == "1";
    } else if (key == "path_qd") {
      uint32_t n = 0;
      auto [end, ec] = std::from_chars(val.data(), val.data() + val.size(), n);
      if (ec != std::errc() || end != val.data() + val.size() || n < 1 || n > 4096) return bad("1..4096");
      mo.path_queue_depth = n;
    } else if (key == "ro" || key == "direct") {
      // The front half's; they reach the paths as open flags.
    } else {
      return core::fail(EINVAL, "unknown multipath option '" + std::string(key) +
                                    "' (known: path, policy, failback, queue_if_no_path, check_interval, io_timeout, "
                                    "reopen_max, fence, check_id, path_qd, ro, direct)");
    }
  }
  if (found.empty()) return core::fail(EINVAL, "a multipath device needs at least one path=URI");
  if (found.size() > mp_device::max_paths)
    return core::fail(EINVAL, "a multipath device takes at most " + std::to_string(mp_device::max_paths) + " paths");
  if (paths) *paths = std::move(found);
  return mo;
}

std::string multipath_uri(const std::vector<std::string>& paths, std::string_view extra_options) {
  std::string uri = "multipath:";
  char sep = '?';
  for (const auto& p : paths) {
    uri += sep;
    uri += "path=" + percent_encode(p);
    sep = '&';
  }
  if (!extra_options.empty()) {
    uri += sep;
    uri += extra_options;
  }
  return uri;
}

std::string multipath_status::to_string() const {
  std::string s = "multipath " + label + ": policy " + storage::to_string(policy) + ", fencing " +
                  (fencing ? "on, epoch " + std::to_string(epoch) : std::string("off")) + ", failovers " +
                  std::to_string(failovers) + ", reissued " + std::to_string(reissued) + ", fences " +
                  std::to_string(fences) + ", queued " + std::to_string(queued) + (open ? "" : " (closed)") + "\n";
  for (const auto& p : paths)
    s += "  " + p.name + ": " + storage::to_string(p.state) + ", " + std::to_string(p.requests) + " requests, " +
         std::to_string(p.in_flight) + " in flight, " + std::to_string(p.abandoned) + " abandoned, " +
         std::to_string(p.failures) + " failures" +
         (p.reopens ? ", " + std::to_string(p.reopens) + " reopens" : std::string()) + (p.last_error.empty() ? "" : ", last error: " + p.last_error) + "\n";
  return s;
}

multipath_status multipath_monitor::status() const { return dev_->status(); }
void multipath_monitor::check_now() const { dev_->check_now(); }

core::result<std::unique_ptr<Vstore>> open_multipath(std::vector<std::unique_ptr<Vstore>> paths,
                                                     const multipath_options& mo, const open_options& opts,
                                                     std::shared_ptr<multipath_monitor>* monitor,
                                                     path_reopen reopen) {
  if (!opts.options.empty()) return core::fail(EINVAL, "a stacked multipath device takes no transport options");
  std::string target = mo.label.empty() && !paths.empty() && paths[0]
                           ? paths[0]->transport_name() + ":" + paths[0]->target()
                           : mo.label;
  if (!reopen.uris.empty() && (reopen.uris.size() != paths.size() || !reopen.registry))
    return core::fail(EINVAL, "multipath: reopening needs a registry and one URI per path");
  stack_handoff h{std::move(paths), mo, monitor, std::move(reopen)};
  return Vstore::open(mp_stack_ops, target, opts, nullptr, &h);
}

}  // namespace uvd::storage
