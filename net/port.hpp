// SPDX-License-Identifier: Apache-2.0
#pragma once
// A port of the netback switch: where frames enter and leave it. Ports are
// front ends attached through a transport (a daemon socket), TAP uplinks into
// the host kernel, or any Veth (veth_port). Everything a port hands the switch
// is hostile: the switch checks sizes, MACs and tags itself.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/veth_ops.hpp"
#include "net/eth.hpp"

namespace uvd::net {

// Counters the switch keeps per port (single-threaded: the switch loop).
struct port_stats {
  uint64_t rx_frames = 0, rx_bytes = 0;  // accepted from the port
  uint64_t tx_frames = 0, tx_bytes = 0;  // delivered to the port
  uint64_t tx_dropped = 0;               // for the port, but it was full, down or its MTU too small
  uint64_t rx_bad_mac = 0;               // source MAC the port does not own (or multicast)
  uint64_t rx_vlan = 0;                  // tagged frames on an access port
  uint64_t rx_runt = 0;                  // shorter than an Ethernet header
  uint64_t rx_oversize = 0;              // longer than the port's MTU allows
  uint64_t rx_truncated = 0;             // a message cut short of what it claims
  uint64_t rx_bad_offload = 0;           // checksum/GSO metadata that does not fit the frame
  uint64_t rx_bad_msg = 0;               // protocol messages that make no sense
  uint64_t throttled = 0;                // times the rate limiter held the port back

  uint64_t rx_dropped() const {
    return rx_bad_mac + rx_vlan + rx_runt + rx_oversize + rx_truncated + rx_bad_offload + rx_bad_msg;
  }
  void add(const port_stats& o);
};

class port {
 public:
  virtual ~port() = default;
  virtual std::string name() const = 0;
  // Frames from the port into the switch: up to n, data valid until the
  // next rx_burst. Framing errors are the port's to count in st.
  virtual uint32_t rx_burst(core::veth_frame* frames, uint32_t n, port_stats& st) = 0;
  // Frames from the switch out of the port; returns how many it took (the
  // switch counts the rest as dropped). The port copies what it keeps.
  virtual uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) = 0;
  // Descriptors that become readable when rx_burst has work.
  virtual void fds(std::vector<int>& out) const = 0;
  // False once the port is gone for good (its peer hung up): the switch drops it.
  virtual bool alive() const = 0;
  virtual bool link_up() const { return true; }
  // Takes CSUM_PARTIAL and GSO frames whole; else the switch finishes them.
  virtual bool offloads() const = 0;
  virtual uint32_t mtu() const = 0;
  // The only source MAC the port may use; nullopt: any (a trusted uplink).
  virtual std::optional<mac_addr> owned_mac() const = 0;
  // Tagged frames allowed (a trunk); access ports drop them.
  virtual bool trunk() const { return false; }
};

}  // namespace uvd::net
