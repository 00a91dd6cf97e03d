// SPDX-License-Identifier: Apache-2.0
#pragma once
// The TAP transport ("tap:NAME?options"): a Veth whose wire is a Linux TAP
// interface (/dev/net/tun, IFF_TAP | IFF_NO_PI). What the Veth transmits, the
// kernel receives on NAME; what the kernel sends out of NAME, the Veth
// receives. NAME is created if it does not exist (and goes away on close) or
// attached to if it does (a persistent `ip tuntap add` interface stays).
// The interface gets the Veth's MAC and MTU and is brought up; the Veth's
// administrative link state is the carrier the kernel sees.
//
// Options:
//   offload=1      (default) IFF_VNET_HDR with checksum and TSO4/TSO6 both
//                  ways, so 64 KiB segments cross the user/kernel boundary
//                  whole; offload=0: plain frames, the front half checksums
//                  and segments in software
//   queues=N       IFF_MULTI_QUEUE with N queues (default: what the Veth asks)
//   keep_mac=1     leave the interface's own MAC (the Veth is then a peer on
//                  the interface's link rather than the interface itself)
//   up=0           do not bring the interface up
//   dev=PATH       the clone device (default /dev/net/tun)
// Non-blocking I/O: each queue's fd is its rx_fd, for the owner's epoll.
#include "core/veth_ops.hpp"

namespace uvd::tap {

extern const core::veth_ops tap_veth_ops;

}  // namespace uvd::tap
