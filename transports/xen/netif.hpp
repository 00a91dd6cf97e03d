// SPDX-License-Identifier: Apache-2.0
#pragma once
// netif as both halves speak it: Xen's structures (xen/io/netif.h) on the
// core ring, limits, and the store paths of a virtual interface.
#include <cstdint>
// The Xen public headers assume <stdint.h> came first.
#include <xen/grant_table.h>
#include <xen/io/netif.h>
#include <xen/io/xenbus.h>

#include <string>

#include "core/ring.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

using net_tx_front_ring = core::front_ring<netif_tx_request, netif_tx_response>;
using net_tx_back_ring = core::back_ring<netif_tx_request, netif_tx_response>;
using net_rx_front_ring = core::front_ring<netif_rx_request, netif_rx_response>;
using net_rx_back_ring = core::back_ring<netif_rx_request, netif_rx_response>;

// Both rings are one page: 256 entries each.
inline constexpr uint32_t net_ring_size = 256;
// Most slots one frame may take (XEN_NETIF_NR_SLOTS_MIN: every back end takes this many).
inline constexpr uint32_t net_max_slots = XEN_NETIF_NR_SLOTS_MIN;
// Largest MTU we carry: 3 slots of a 9000-byte jumbo frame plus its header.
inline constexpr uint32_t net_max_mtu = 9000;
inline constexpr uint32_t net_max_frame = net_max_mtu + 18;  // Ethernet header and one VLAN tag

inline std::string vif_frontend_dir(domid_t front, uint32_t handle) {
  return "/local/domain/" + std::to_string(front) + "/device/vif/" + std::to_string(handle);
}
inline std::string vif_backend_dir(domid_t back, domid_t front, uint32_t handle) {
  return "/local/domain/" + std::to_string(back) + "/backend/vif/" + std::to_string(front) + "/" +
         std::to_string(handle);
}

}  // namespace uvd::xen
