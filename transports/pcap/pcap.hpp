// SPDX-License-Identifier: Apache-2.0
#pragma once
// The pcap transport ("pcap:///trace/out.pcap?in=/trace/in.pcap"): a NIC
// whose wire is a pair of capture files, for tracing and replay in the
// spirit of UML's soft devices. Every frame the Veth transmits is appended
// to the target file (classic pcap, microsecond timestamps, LINKTYPE_ETHERNET);
// with in=, received frames are replayed from that file in order.
// Options:
//   in=PATH      replay this capture (microsecond or nanosecond pcap, either byte order)
//   follow=1     at the end of `in`, wait for more, as `tail -f` (live tracing)
//   speed=F      replay at the recorded pace (the gaps between timestamps),
//                F times faster; without it, as fast as the receiver polls
//   max_mtu=N    largest MTU (default 65535)
// An empty target ("pcap:?in=x.pcap") transmits into nothing. Replayed records
// that are shorter than an Ethernet header, longer than the MTU allows,
// captured short of their length (incl_len < orig_len) or cut off at the end
// of the file are dropped and counted (rx_errors). No checksum or TSO
// offload: the front half finishes frames before they are written.
#include "core/veth_ops.hpp"

namespace uvd::pcap {

extern const core::veth_ops pcap_veth_ops;

}  // namespace uvd::pcap
