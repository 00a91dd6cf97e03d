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
#include "core/veth_ops.hpp"
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

// A tx frame's length travels in the first slot's 16-bit size: GSO frames stop there.
inline constexpr uint32_t net_max_tx_gso_frame = XEN_NETIF_MAX_TX_SIZE;
// Extra-info slots one frame may carry: one of each type at most.
inline constexpr uint32_t net_max_extras = XEN_NETIF_EXTRA_TYPE_MAX - 1;

// What one side of a vif has said it takes (netif.h's feature keys; absent
// keys take netif.h's defaults, which is why IPv4 checksum offload is on
// unless "feature-no-csum-offload" says otherwise).
struct netif_features {
  bool sg = false;
  bool csum4 = true;
  bool csum6 = false;
  bool gso4 = false;
  bool gso6 = false;
  bool rx_notify = false;
};

// netif carries no checksum position: a side that sees NETTXF/NETRXF_csum_blank
// finds the TCP or UDP checksum field from the headers, as Linux's
// skb_checksum_setup does. Fills f's csum_start/csum_offset and sets
// VETH_FRAME_CSUM_PARTIAL; with recompute, also writes the pseudo-header sum
// into the field (for a GSO frame whose sender left it unset, as netback
// tolerates). -EPROTONOSUPPORT: not TCP/UDP over IPv4/IPv6; -EINVAL: cut short.
int netif_csum_setup(uint8_t* frame, uint32_t len, bool recompute, core::veth_frame* f);

// True when a CSUM_PARTIAL frame's checksum sits where netif_csum_setup would
// find it, so that a peer told only "csum_blank" fills the right field. *ipv6: the IP version.
bool netif_csum_derivable(const core::veth_frame& f, bool* ipv6);

inline std::string vif_frontend_dir(domid_t front, uint32_t handle) {
  return "/local/domain/" + std::to_string(front) + "/device/vif/" + std::to_string(handle);
}
inline std::string vif_backend_dir(domid_t back, domid_t front, uint32_t handle) {
  return "/local/domain/" + std::to_string(back) + "/backend/vif/" + std::to_string(front) + "/" +
         std::to_string(handle);
}

}  // namespace uvd::xen
