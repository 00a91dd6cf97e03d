// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host-local hypervisor: Xen's grant tables, event channels and xenstore
// for processes on any Linux, so the blkif/netif protocols run unchanged
// between two processes (or two threads) without Xen.
//
// The hub plays the hypervisor and xenstored: each domain connects to its unix
// socket and claims a domid (domain ids are not authenticated: whoever may
// open the socket is as trusted as a toolstack). It keeps, per domain:
//   * a grant table: ref -> (peer domid, memfd page, read-only). Granted
//     frames are pages of a sealed memfd (it can neither shrink nor grow, so a
//     granter cannot pull pages from under a mapping with SIGBUS). A mapper
//     presents (granter, refs); an unknown or ended ref, a ref granted to
//     another domain, or a read-only ref asked for writing fails the whole map.
//     Read-only grants are handed out through an O_RDONLY descriptor, so the
//     mapper cannot map them writable even by hand. Ending access refuses new
//     mappings at once; pages stay valid for existing mappers until they unmap,
//     as on Xen.
//   * event channels: a pair of eventfds per channel, passed with SCM_RIGHTS.
//   * the store: the xenstore tree with permissions, transactions and watches
//     (store_tree.hpp); /local/domain/<id> is created, owned by <id>, when a
//     domain first connects.
// When a domain's last connection closes, its grants end, its ports close and,
// as a toolstack does when a driver domain dies, its backend/ directory is
// removed, so front ends see their back end's state vanish.
#include <memory>
#include <string>

#include "core/result.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

class local_hub {
 public:
  // Listens on socket_path (replacing a stale socket) and serves from a thread.
  static core::result<std::unique_ptr<local_hub>> start(const std::string& socket_path);
  virtual ~local_hub() = default;
  virtual const std::string& socket_path() const = 0;
};

// One domain's view of a hub. A domain may hold several connections (processes).
core::result<std::unique_ptr<hypervisor>> open_local_hypervisor(const std::string& socket_path, domid_t domid);

}  // namespace uvd::xen
