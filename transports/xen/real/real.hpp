// SPDX-License-Identifier: Apache-2.0
#pragma once
// The real-Xen hypervisor (hv.hpp) from inside a Linux domain:
//   * grants      /dev/xen/gntalloc through libxengnttab's xengntshr (grant our pages)
//                 /dev/xen/gntdev   through libxengnttab's xengnttab (map a peer's grants)
//   * events      /dev/xen/evtchn   through libxenevtchn, one open handle per channel so
//                 each channel has its own pollable descriptor
//   * the store   xenstored through libxenstore (xs_open), one connection per store object
// Domain 0 may talk to itself: a grant to domid 0 mapped by domid 0, a loopback event
// channel, which is how the end-to-end harness runs both halves inside one dom0.
#include <memory>
#include <string>

#include "core/result.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen::real {

// A store connection to xenstored (xs_open). EACCES/ENOENT name what is missing.
core::result<std::unique_ptr<store>> open_xenstore();

// Our own domain id: 0 in the control domain (/proc/xen/capabilities says
// control_d), otherwise the store's relative "domid" node, as Linux's xenbus reads it.
core::result<domid_t> find_self_domid(store& s);

// "what: strerror(e)" for errors of the Xen libraries, which report through errno.
core::unexpected sys_fail(int e, const std::string& what);

}  // namespace uvd::xen::real
