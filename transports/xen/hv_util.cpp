// SPDX-License-Identifier: Apache-2.0
#include <cstdint>
// The Xen public headers assume <stdint.h> came first.
#include <xen/io/xenbus.h>

#include <charconv>
#include <string>

#include "transports/xen/hv.hpp"

namespace uvd::xen {

core::result<void> with_transaction(store& s, const std::function<core::result<void>(txn_t)>& fn, int attempts) {
  for (int i = 0; i < attempts; ++i) {
    auto t = s.transaction_start();
    if (!t) return core::fail(std::move(t).err());
    auto r = fn(*t);
    if (!r) {
      (void)s.transaction_end(*t, false);
      return r;
    }
    auto e = s.transaction_end(*t, true);
    if (e) return core::ok();
    if (e.err().errnum() != EAGAIN) return e;
  }
  return core::fail(EAGAIN, "store transaction kept conflicting");
}

core::result<uint64_t> read_uint(store& s, txn_t t, std::string_view path) {
  auto v = s.read(t, path);
  if (!v) return core::fail(std::move(v).err());
  uint64_t n = 0;
  const char* b = v->data();
  const char* e = b + v->size();
  auto [p, ec] = std::from_chars(b, e, n);
  if (ec != std::errc() || p != e || b == e)
    return core::fail(EINVAL, std::string(path) + ": not an unsigned number: \"" + *v + "\"");
  return n;
}

core::result<int> read_state(store& s, std::string_view dir) {
  auto n = read_uint(s, no_txn, std::string(dir) + "/state");
  if (!n) return core::fail(std::move(n).err());
  if (*n > XenbusStateReconfigured) return core::fail(EINVAL, std::string(dir) + "/state: no such xenbus state");
  return static_cast<int>(*n);
}

core::result<void> write_state(store& s, std::string_view dir, int st) {
  return s.write(no_txn, std::string(dir) + "/state", std::to_string(st));
}

const char* state_name(int st) {
  switch (st) {
    case XenbusStateUnknown: return "Unknown";
    case XenbusStateInitialising: return "Initialising";
    case XenbusStateInitWait: return "InitWait";
    case XenbusStateInitialised: return "Initialised";
    case XenbusStateConnected: return "Connected";
    case XenbusStateClosing: return "Closing";
    case XenbusStateClosed: return "Closed";
    case XenbusStateReconfiguring: return "Reconfiguring";
    case XenbusStateReconfigured: return "Reconfigured";
    default: return "?";
  }
}

}  // namespace uvd::xen
