// SPDX-License-Identifier: Apache-2.0
#pragma once
// A switch port made of a Veth over any transport: a TAP uplink into the host
// kernel (trusted: any source MAC), a pcap tracing port, a cascade to another
// switch through the daemon transport.
#include <memory>

#include "net/port.hpp"
#include "net/veth.hpp"

namespace uvd::net {

struct veth_port_options {
  bool trusted = true;  // any source MAC (an uplink); else only the Veth's MAC
  bool trunk = false;   // VLAN-tagged frames allowed
};

std::unique_ptr<port> make_veth_port(std::unique_ptr<Veth> v, const veth_port_options& o = {});

}  // namespace uvd::net
