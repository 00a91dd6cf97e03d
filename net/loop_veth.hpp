// SPDX-License-Identifier: Apache-2.0
#pragma once
// The loopback reference transport ("loop:"), the test double of the network
// side: each queue is two lock-free single-producer rings joined end to end,
// so what queue q transmits, queue q receives (as DPDK's net/ring makes a NIC
// out of rings). Options, for exercising the front half:
//   depth=N     frames a ring holds (default 256); a full ring makes xmit take
//               fewer and tx_done follow when rx_poll drains it
//   offload=1   claim checksum and TSO offload, so frames cross whole
//   queues=N    most queue pairs it gives (default 8)
//   max_mtu=N   largest MTU (default 9000)
#include "core/veth_ops.hpp"

namespace uvd::net {

extern const core::veth_ops loop_veth_ops;

}  // namespace uvd::net
