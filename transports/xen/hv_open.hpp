// SPDX-License-Identifier: Apache-2.0
#pragma once
// The hypervisor a front end's URI options name: "hv=local&hub=PATH&domid=N"
// (the default) or "hv=xen". Shared by every xen front end.
#include <memory>
#include <string_view>

#include "core/result.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

core::result<std::unique_ptr<hypervisor>> open_hypervisor_from_options(std::string_view options);

// True when the options name real Xen.
bool options_name_real_xen(std::string_view options);

}  // namespace uvd::xen
