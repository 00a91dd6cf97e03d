// SPDX-License-Identifier: Apache-2.0
#pragma once
// Software offloads: what a NIC would do in hardware, for transports that
// cannot (no VETH_F_TX_CSUM / VETH_F_TSO) and for the switch when a port did
// not ask for large segments. Checksums follow RFC 1071; segmentation follows
// what Linux's tcp_gso_segment produces (headers copied, IP length and id,
// TCP sequence and flags adjusted, checksums complete).
#include <cstdint>

#include "core/veth_ops.hpp"

namespace uvd::net {

// The 16-bit ones' complement sum of [p, p+n), as a network-order value, plus init.
uint16_t ones_sum(const uint8_t* p, uint32_t n, uint16_t init = 0);
inline uint16_t ones_add(uint16_t a, uint16_t b) {
  uint32_t s = uint32_t(a) + b;
  return static_cast<uint16_t>((s & 0xffff) + (s >> 16));
}

// Layout of a frame's headers as far as the offloads need them.
struct frame_layout {
  uint32_t l3 = 0;        // offset of the IP header
  uint32_t l4 = 0;        // offset of the TCP/UDP header
  uint32_t hdr_len = 0;   // link + IP + TCP headers (GSO)
  uint8_t l4_proto = 0;   // 6 TCP, 17 UDP
  bool ipv6 = false;
};
// Parses Ethernet (one optional VLAN tag), IPv4 or IPv6 (no extension
// headers) and TCP or UDP. -EPROTONOSUPPORT for anything else, -EINVAL if cut short.
int parse_layout(const uint8_t* frame, uint32_t len, frame_layout* out);

// Fills a CSUM_PARTIAL frame's checksum in place. -EINVAL when csum_start or
// csum_offset point outside the frame.
int finish_csum(uint8_t* frame, uint32_t len, uint16_t csum_start, uint16_t csum_offset);

// True when the frame's IPv4 header checksum and TCP/UDP checksum are right
// (frames that are neither count as right).
bool verify_csums(const uint8_t* frame, uint32_t len);

// Most segments one GSO frame may be cut into; more is refused as malformed.
inline constexpr uint32_t gso_max_segs = 128;
// Bytes a GSO frame's segments need together (headers repeated).
uint32_t gso_segmented_bytes(const core::veth_frame& f, const frame_layout& l);

// Checks a frame's offload metadata against its bytes and an MTU, as a NIC
// would refuse a bad descriptor. 0, or -EINVAL / -EMSGSIZE / -EPROTONOSUPPORT.
// On success with GSO, *layout describes the headers.
int check_offload(const core::veth_frame& f, uint32_t mtu, frame_layout* layout);

// Cuts a checked GSO frame into complete frames (checksums filled) packed one
// after another in arena (arena_len bytes); out[0..n) describe them. Returns n,
// or -ENOSPC if arena or max_out is too small.
int gso_segment(const core::veth_frame& f, const frame_layout& l, uint8_t* arena, uint32_t arena_len,
                core::veth_frame* out, uint32_t max_out);

// Bytes the frame takes on a wire: a GSO frame counts its segments' headers.
uint64_t wire_bytes(const core::veth_frame& f);

}  // namespace uvd::net
