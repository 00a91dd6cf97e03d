// SPDX-License-Identifier: Apache-2.0
// Linked when the real-Xen implementation is not built (Xen libraries missing).
#include "transports/xen/hv.hpp"

namespace uvd::xen {

core::result<std::unique_ptr<hypervisor>> open_real_hypervisor() {
  return core::fail(ENOSYS,
                    "real Xen support not built: libxengnttab, libxenevtchn and libxenstore (libxen-dev) were "
                    "not found at configure time; use the host-local hypervisor (hv=local)");
}

}  // namespace uvd::xen
