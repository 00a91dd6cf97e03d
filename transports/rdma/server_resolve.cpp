// SPDX-License-Identifier: Apache-2.0
// Exports the storage server opens on demand through its resolver (rdma.hpp
// export_resolver): an OPEN of a name it does not serve asks the resolver,
// and every connection that opens the same name shares one export entry, so
// fencing (the entry's epoch, or the disk's own record) covers all of them.
// Service thread only.
#include <spdlog/spdlog.h>

#include <cerrno>
#include <string>

#include "core/uri.hpp"
#include "transports/rdma/server_impl.hpp"

namespace uvd::rdma {

export_entry* server::impl::open_resolved(conn& c, const std::string& name, int* status) {
  if (name.empty() || c.dyn_ref) {
    *status = -ENOENT;
    return nullptr;
  }
  // The resolver takes a C string: a NUL inside would make "a\0b" open "a"
  // under another entry (and epoch) than "a" itself.
  if (name.find('\0') != std::string::npos) {
    *status = -EINVAL;
    return nullptr;
  }
  const std::string local = c.id ? core::sockaddr_text(rdma_get_local_addr(c.id.get())) : "?";
  const std::string peer = c.id ? core::sockaddr_text(rdma_get_peer_addr(c.id.get())) : "?";
  server_export ex;
  void* ref = nullptr;
  char err[512] = {};
  int rc = resolver.open(resolver.ctx, name.c_str(), local.c_str(), peer.c_str(), &ex, &ref, err, sizeof err);
  if (rc < 0) {
    *status = rc;
    if (rc != -ENOENT)  // the caller logs unknown names
      spdlog::warn("rdma server: client {} is refused '{}': {}", c.serial, name.substr(0, 80), err);
    return nullptr;
  }
  auto it = dynamic.find(name);
  if (it == dynamic.end()) {
    ex.name = name;
    auto ent = server_detail::make_export_entry(ex, opts);
    if (!ent) {
      resolver.close(resolver.ctx, ref);
      spdlog::warn("rdma server: client {}: export '{}': {}", c.serial, name.substr(0, 80), ent.err().what());
      *status = -ent.err().errnum();
      return nullptr;
    }
    it = dynamic.emplace(name, resolved{std::move(*ent), 0}).first;
    spdlog::info("rdma server: export '{}' opened ({} bytes, UUID {})", name, ex.size, it->second.entry->ex.uuid);
  } else if (it->second.entry->ex.disk != ex.disk) {
    // The resolver broke its promise to share the disk: two devices on one
    // medium would split its epoch. Refuse rather than serve it twice.
    resolver.close(resolver.ctx, ref);
    spdlog::error("rdma server: the resolver opened '{}' twice", name.substr(0, 80));
    *status = -EBUSY;
    return nullptr;
  }
  ++it->second.users;
  c.dyn_ref = ref;
  return it->second.entry.get();
}

void server::impl::close_resolved(conn& c) {
  if (!c.dyn_ref) return;
  void* ref = c.dyn_ref;
  c.dyn_ref = nullptr;
  for (auto it = dynamic.begin(); it != dynamic.end(); ++it) {
    if (it->second.entry.get() != c.exp) continue;
    if (--it->second.users == 0) {
      spdlog::info("rdma server: export '{}' closed, no client has it open", it->first);
      dynamic.erase(it);  // before close: the entry points at the disk close may free
    }
    break;
  }
  c.exp = nullptr;
  resolver.close(resolver.ctx, ref);
}

}  // namespace uvd::rdma
