// SPDX-License-Identifier: Apache-2.0
#pragma once
// Net over RDMA (wire protocol: net_proto.hpp), both ends.
//
// Front end: the veth_ops table "rdma" (the same plugin and name as the
// storage client; the registry keeps network and storage tables apart):
//   rdma://HOST[:PORT]?options          (port 7172 by default)
//     name=NAME        the port's name at the switch (rate limits are keyed on it)
//     offload=1        (default) GSO and partial-checksum frames cross whole
//     depth=N          receive buffers posted (default 128: the switch's credits, so its
//                      egress burst towards this port)
//     max_mtu=N        largest MTU (default 9000; sizes the receive buffers without offload)
//     src=ADDR         local address to connect from (picks the local RDMA device)
//     timeout_ms=N     address and route resolution timeout (default 3000)
//     connect_ms=N     wait for the switch's answer to a connect (default 15000)
//     wait=1           start even if the switch is not there yet (link down)
//     reconnect_ms=N   retry interval after the switch goes away (default 200)
// When the switch goes away the Veth's link goes down; the transport
// reconnects on its own and the link comes back up.
//
// Switch side: a port source for net::Netback listening with rdma_cm; every
// front end that connects with a valid hello becomes a port. It lives in the
// rdma plugin and is reached through net_api, so that `uvd switch` runs
// without libibverbs when RDMA is not asked for.
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/veth_ops.hpp"
#include "net/netback.hpp"

namespace uvd::rdma {

extern const core::veth_ops rdma_net_veth_ops;

struct net_listen_options {
  std::vector<std::string> listen;  // "ADDR[:PORT]" (default port 7172, 0: any); the address picks the device
  std::map<std::string, net::rate_limit, std::less<>> limits;  // by port name
  std::optional<net::rate_limit> default_limit;
  uint32_t max_mtu = 65535;
  uint32_t max_ports = 256;
  uint32_t depth = 32;  // receive buffers per port (the front end's credits)
  std::string log_level;  // for the plugin's own logger ("": $UVD_LOG_LEVEL or info)
};

inline constexpr uint32_t NET_API_VERSION = 1;
struct net_api {
  uint32_t abi_version;  // NET_API_VERSION
  uint32_t struct_size;
  // Binds every address and listens; 0 and *out (the caller owns it: hand it
  // to Netback::add_source), or -errno with the reason in err. ports[i] gets
  // the port listener i is bound to (ports may be null).
  int (*listen)(const net_listen_options* opts, net::port_source** out, uint16_t* ports, size_t nports, char* err,
                size_t errlen);
};
const net_api* net_entry();

}  // namespace uvd::rdma

#define UVD_RDMA_NET_ENTRY_SYMBOL "uvd_rdma_net_entry"
