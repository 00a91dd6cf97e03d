// SPDX-License-Identifier: Apache-2.0
#pragma once
// The netif back end: every connected Xen virtual interface becomes a port of
// the netback switch (net::Netback), which validates source MACs, sizes and
// tags and forwards between ports. Wire format and keys as Linux xen-netback:
// one tx and one rx ring (tx-ring-ref, rx-ring-ref), one event-channel,
// request-rx-copy (the back end copies into pages the front end posted),
// feature-sg (frames over several slots, NETTXF/NETRXF_more_data),
// checksum offload (NETTXF/NETRXF_csum_blank, data_validated; IPv6 too:
// feature-ipv6-csum-offload) and TCP large segments both ways
// (feature-gso-tcpv4/-tcpv6, a XEN_NETIF_EXTRA_TYPE_GSO extra-info slot).
// Frames reach the front end only with the offloads it declared
// (feature-no-csum-offload, feature-ipv6-csum-offload, feature-gso-tcpv4/
// -tcpv6, feature-sg): the rest is finished here, checksums filled and large
// segments cut, as Linux netback's stack does for its vif. Without
// feature-rx-notify nothing waits for rx buffers.
//
// MAC: add_vif with a MAC fixes it (written as the toolstack does, to both
// directories); without one the front end declares its own MAC in its
// directory's "mac" key, which the back end adopts and echoes in its own
// ("mac-from-front" = 1, a uvd extension), one at a time, as the switch
// daemon does for its ports.
//
// Everything the front end writes is hostile: a tx request with a bad grant,
// an offset or size outside its page, a chain longer than 18 slots or whose
// sizes do not add up, or extra-info slots that were never negotiated is
// answered NETIF_RSP_ERROR and counted, as are extra-info slots of a kind
// not offered (only GSO is), repeated or over 4, GSO sizes or types that do
// not fit the frame, and checksum flags on a frame whose TCP/UDP checksum
// cannot be found; extra-info slots are answered NETIF_RSP_NULL; an impossible ring index kills the
// port (the switch drops it) and the device goes Closing.
#include <cstdint>
#include <memory>
#include <optional>

#include "core/result.hpp"
#include "net/eth.hpp"
#include "net/netback.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

class vif_backend : public net::port_source {
 public:
  // A store watcher thread starts at once; connected interfaces join the
  // switch through this port_source (Netback::add_source).
  static core::result<std::unique_ptr<vif_backend>> start(std::shared_ptr<hypervisor> hv);
  ~vif_backend() override = default;

  // The toolstack's part of `xl network-attach`: both directories with their
  // permissions, then the interface waits for its front end.
  virtual core::result<void> add_vif(domid_t front, uint32_t handle, std::optional<net::mac_addr> mac) = 0;
  virtual core::result<void> remove_vif(domid_t front, uint32_t handle) = 0;
  // Frames for the interface dropped because its front end had posted no
  // buffer for them (as Linux netback drops when a guest's rx ring is full).
  // Thread-safe.
  virtual core::result<uint64_t> dropped(domid_t front, uint32_t handle) = 0;
  // Offloads finished here for the interface because its front end does
  // not take them. Thread-safe.
  struct offload_counts {
    uint64_t sw_csum = 0;  // checksums filled
    uint64_t sw_gso = 0;   // large segments cut
  };
  virtual core::result<offload_counts> offloads_done(domid_t front, uint32_t handle) = 0;
  virtual domid_t domid() const = 0;
};

}  // namespace uvd::xen
