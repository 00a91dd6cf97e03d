// SPDX-License-Identifier: Apache-2.0
#pragma once
// The daemon transport: a front end joined to the netback switch of another
// process through a Unix socket (protocol: daemon_proto.hpp).
//
// Front end, "daemon:///run/uvd/switch.sock?options":
//   name=NAME      the port's name at the switch (rate limits are keyed on it)
//   offload=1      (default) ask for GSO and partial-checksum frames whole
//   wait=1         start even if the switch is not there yet (link down)
//   reconnect_ms=N retry interval after the switch goes away (default 200)
// When the switch goes away the Veth's link goes down; the transport
// reconnects on its own and the link comes back up.
//
// Switch side: daemon_listener, a port source for net::Netback.
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "core/result.hpp"
#include "core/veth_ops.hpp"
#include "net/netback.hpp"

namespace uvd::daemon {

extern const core::veth_ops daemon_veth_ops;

struct listener_options {
  std::map<std::string, net::rate_limit, std::less<>> limits;  // by port name
  std::optional<net::rate_limit> default_limit;
  uint32_t max_mtu = 65535;
  uint32_t max_ports = 256;
};

// Listens on path (replacing a stale socket file) and attaches every front
// end that says hello as a port of nb.
core::result<std::unique_ptr<net::port_source>> listen(const std::string& path, const listener_options& o);

// Asks a running switch for its statistics (Netback::stats_text()).
core::result<std::string> query_stats(const std::string& path);

}  // namespace uvd::daemon
