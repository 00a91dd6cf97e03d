// SPDX-License-Identifier: Apache-2.0
#include "transports/xen/hv_open.hpp"

#include "core/uri.hpp"
#include "transports/xen/local/local.hpp"

namespace uvd::xen {

bool options_name_real_xen(std::string_view options) {
  std::string kind;
  return core::find_option(options, "hv", &kind) && kind == "xen";
}

core::result<std::unique_ptr<hypervisor>> open_hypervisor_from_options(std::string_view options) {
  std::string kind = "local", hub, dom = "1";
  core::find_option(options, "hv", &kind);
  if (kind == "xen") return open_real_hypervisor();
  if (kind != "local") return core::fail(EINVAL, "xen: hv must be local or xen, not " + kind);
  if (!core::find_option(options, "hub", &hub) || hub.empty())
    return core::fail(EINVAL, "xen: hv=local needs hub=<socket of the host-local hypervisor> (see uvd xen-back)");
  core::find_option(options, "domid", &dom);
  auto n = core::parse_size(dom);
  if (!n || *n > 0x7fef) return core::fail(EINVAL, "xen: domid must be 0..32751, not " + dom);
  return open_local_hypervisor(hub, static_cast<domid_t>(*n));
}

}  // namespace uvd::xen
