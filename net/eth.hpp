// SPDX-License-Identifier: Apache-2.0
#pragma once
// Ethernet basics shared by the front half, the switch and the transports:
// frame size limits, MAC addresses, header fields.
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "core/result.hpp"

namespace uvd::net {

inline constexpr uint32_t eth_hlen = 14;        // dst, src, ethertype; frames carry no FCS
inline constexpr uint32_t vlan_hlen = 4;        // one 802.1Q tag
inline constexpr uint32_t eth_min_frame = eth_hlen;  // shorter is a runt (hosts need not pad to 60)
inline constexpr uint32_t eth_min_mtu = 68;     // IPv4's minimum
inline constexpr uint32_t eth_jumbo_mtu = 9000;
// The largest frame a GSO (TSO) segment may be: 64 KiB of IP datagram plus
// the link header, as Linux's default gso_max_size.
inline constexpr uint32_t gso_max_frame = 65536 + eth_hlen + vlan_hlen;

inline constexpr uint16_t ethertype_ipv4 = 0x0800;
inline constexpr uint16_t ethertype_arp = 0x0806;
inline constexpr uint16_t ethertype_vlan = 0x8100;
inline constexpr uint16_t ethertype_qinq = 0x88a8;
inline constexpr uint16_t ethertype_ipv6 = 0x86dd;

// Largest non-GSO frame for an MTU: header plus payload plus one VLAN tag
// (Linux accepts a tagged frame of mtu + 18 on an untagged device).
constexpr uint32_t max_frame_for_mtu(uint32_t mtu) { return mtu + eth_hlen + vlan_hlen; }

inline uint16_t load_be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
inline uint32_t load_be32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}
inline void store_be16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

struct mac_addr {
  std::array<uint8_t, 6> b{};

  static mac_addr from(const uint8_t* p) {
    mac_addr m;
    std::memcpy(m.b.data(), p, 6);
    return m;
  }
  const uint8_t* data() const { return b.data(); }
  bool is_multicast() const { return b[0] & 1; }  // broadcast included
  bool is_broadcast() const { return b == std::array<uint8_t, 6>{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; }
  bool is_zero() const { return b == std::array<uint8_t, 6>{}; }
  bool is_local() const { return b[0] & 2; }
  uint64_t key() const {
    uint64_t k = 0;
    for (uint8_t x : b) k = k << 8 | x;
    return k;
  }
  std::string to_string() const;
  friend bool operator==(const mac_addr&, const mac_addr&) = default;
};

inline const mac_addr broadcast_mac{{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}};

// "02:00:00:00:00:01" (also with '-'); errors name the text.
core::result<mac_addr> parse_mac(std::string_view text);
// A random unicast, locally administered address (as Linux's eth_random_addr).
mac_addr random_mac();

inline mac_addr frame_dst(const uint8_t* frame) { return mac_addr::from(frame); }
inline mac_addr frame_src(const uint8_t* frame) { return mac_addr::from(frame + 6); }
inline uint16_t frame_ethertype(const uint8_t* frame) { return load_be16(frame + 12); }

}  // namespace uvd::net
