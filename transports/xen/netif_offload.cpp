// SPDX-License-Identifier: Apache-2.0
// netif's checksum flags name no position (unlike virtio_net_hdr): both
// halves find the TCP/UDP checksum from the headers, as Linux netfront and
// netback do with skb_checksum_setup.
#include <cerrno>

#include "net/eth.hpp"
#include "net/offload.hpp"
#include "transports/xen/netif.hpp"

namespace uvd::xen {

namespace {

uint16_t l4_csum_offset(uint8_t proto) { return proto == 6 ? 16 : 6; }

}  // namespace

int netif_csum_setup(uint8_t* frame, uint32_t len, bool recompute, core::veth_frame* f) {
  net::frame_layout l;
  if (int rc = net::parse_layout(frame, len, &l); rc != 0) return rc;
  uint16_t off = l4_csum_offset(l.l4_proto);
  if (l.l4 + off + 2u > len) return -EINVAL;
  if (recompute) {
    // The pseudo header over the L4 length the IP header states (not the
    // Ethernet padding), folded and not complemented: what the field holds
    // for a partial checksum.
    uint32_t l4_len;
    uint16_t s;
    if (l.ipv6) {
      l4_len = net::load_be16(frame + l.l3 + 4);
      s = net::ones_sum(frame + l.l3 + 8, 32);
    } else {
      uint32_t tot = net::load_be16(frame + l.l3 + 2);
      if (tot < l.l4 - l.l3) return -EINVAL;
      l4_len = tot - (l.l4 - l.l3);
      s = net::ones_sum(frame + l.l3 + 12, 8);
    }
    uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, l.l4_proto};
    net::store_be32(tail, l4_len);
    s = net::ones_sum(tail, 8, s);
    net::store_be16(frame + l.l4 + off, s);
  }
  f->flags |= core::VETH_FRAME_CSUM_PARTIAL;
  f->csum_start = static_cast<uint16_t>(l.l4);
  f->csum_offset = off;
  return 0;
}

bool netif_csum_derivable(const core::veth_frame& f, bool* ipv6) {
  net::frame_layout l;
  if (net::parse_layout(f.data, f.len, &l) != 0) return false;
  *ipv6 = l.ipv6;
  return f.csum_start == l.l4 && f.csum_offset == l4_csum_offset(l.l4_proto);
}

}  // namespace uvd::xen
