// SPDX-License-Identifier: Apache-2.0
#pragma once
// NAME/CLIENT overlays for the RDMA storage server: overlay_exports behind the
// server's C resolver table (transports/rdma/rdma.hpp export_resolver), which
// the rdma plugin calls across its boundary. Header-only so the tool links no
// RDMA library; the plugin sees only the function pointers.
#include <cstdio>

#include "storage/roots/roots.hpp"
#include "transports/rdma/rdma.hpp"

namespace uvd::storage {

// x must outlive the server. Each open() is one connection's lease (shared
// device, attachment record with transport "rdma"); close() drops it.
inline rdma::export_resolver rdma_overlay_resolver(overlay_exports& x) {
  rdma::export_resolver r;
  r.ctx = &x;
  r.open = [](void* ctx, const char* name, const char* listener, const char* peer, rdma::server_export* out,
              void** ref, char* err, size_t errlen) -> int {
    attachment_info a;
    a.transport = "rdma";
    a.server = listener ? listener : "?";
    a.client = peer ? peer : "?";
    auto l = static_cast<overlay_exports*>(ctx)->open(name ? name : "", std::move(a));
    if (!l) {
      std::snprintf(err, errlen, "%s", l.err().what().c_str());
      return -l.err().errnum();
    }
    *out = rdma::export_of(*(*l)->disk, (*l)->name);
    *ref = l->release();
    return 0;
  };
  r.close = [](void*, void* ref) { delete static_cast<overlay_exports::lease*>(ref); };
  r.list = [](void* ctx, std::vector<rdma::resolver_entry>* out) {
    for (auto& o : static_cast<overlay_exports*>(ctx)->list()) out->push_back({o.name, o.size, o.read_only});
  };
  return r;
}

}  // namespace uvd::storage
