// SPDX-License-Identifier: Apache-2.0
#include "net/offload.hpp"

#include <bit>
#include <cerrno>
#include <cstring>

#include "net/eth.hpp"

namespace uvd::net {

namespace {

uint16_t fold64(uint64_t s) {
  s = (s & 0xffffffff) + (s >> 32);
  s = (s & 0xffffffff) + (s >> 32);
  s = (s & 0xffff) + (s >> 16);
  s = (s & 0xffff) + (s >> 16);
  return static_cast<uint16_t>(s);
}

uint16_t swap16(uint16_t v) { return static_cast<uint16_t>(v << 8 | v >> 8); }

// IPv4/IPv6 pseudo-header sum for an L4 length.
uint16_t pseudo_sum(const uint8_t* frame, const frame_layout& l, uint32_t l4_len) {
  uint8_t tail[4];
  uint16_t s;
  if (l.ipv6) {
    s = ones_sum(frame + l.l3 + 8, 32);
    store_be32(tail, l4_len);
    s = ones_sum(tail, 4, s);
  } else {
    s = ones_sum(frame + l.l3 + 12, 8);
    store_be16(tail, static_cast<uint16_t>(l4_len));
    s = ones_sum(tail, 2, s);
  }
  uint8_t proto[2] = {0, l.l4_proto};
  return ones_sum(proto, 2, s);
}

void set_ipv4_csum(uint8_t* ip) {
  uint32_t ihl = (ip[0] & 0x0f) * 4u;
  ip[10] = ip[11] = 0;
  store_be16(ip + 10, static_cast<uint16_t>(~ones_sum(ip, ihl)));
}

}  // namespace

uint16_t ones_sum(const uint8_t* p, uint32_t n, uint16_t init) {
  // Summing native 64-bit words with end-around carry equals summing 16-bit
  // words, byte-swapped on a little-endian host (RFC 1071, section 2).
  uint64_t s = 0;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    s += w;
    s += (s < w);
    p += 8;
    n -= 8;
  }
  if (n >= 4) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    s += w;
    s += (s < w);
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    uint16_t w;
    std::memcpy(&w, p, 2);
    s += w;
    s += (s < w);
    p += 2;
    n -= 2;
  }
  if (n) {
    uint64_t w = p[0];  // the high byte of a zero-padded word in network order
    if constexpr (std::endian::native == std::endian::big) w <<= 8;
    s += w;
    s += (s < w);
  }
  uint16_t r = fold64(s);
  if constexpr (std::endian::native == std::endian::little) r = swap16(r);
  return ones_add(r, init);
}

int parse_layout(const uint8_t* f, uint32_t len, frame_layout* out) {
  if (len < eth_hlen) return -EINVAL;
  uint32_t off = eth_hlen;
  uint16_t type = frame_ethertype(f);
  if (type == ethertype_vlan || type == ethertype_qinq) {
    if (len < eth_hlen + vlan_hlen) return -EINVAL;
    type = load_be16(f + 16);
    off += vlan_hlen;
  }
  frame_layout l;
  l.l3 = off;
  if (type == ethertype_ipv4) {
    if (len < off + 20) return -EINVAL;
    uint32_t ihl = (f[off] & 0x0f) * 4u;
    if ((f[off] >> 4) != 4 || ihl < 20 || len < off + ihl) return -EINVAL;
    l.l4_proto = f[off + 9];
    l.l4 = off + ihl;
  } else if (type == ethertype_ipv6) {
    if (len < off + 40 || (f[off] >> 4) != 6) return -EINVAL;
    l.ipv6 = true;
    l.l4_proto = f[off + 6];
    l.l4 = off + 40;
  } else {
    return -EPROTONOSUPPORT;
  }
  if (l.l4_proto == 6) {
    if (len < l.l4 + 20) return -EINVAL;
    uint32_t doff = (f[l.l4 + 12] >> 4) * 4u;
    if (doff < 20 || len < l.l4 + doff) return -EINVAL;
    l.hdr_len = l.l4 + doff;
  } else if (l.l4_proto == 17) {
    if (len < l.l4 + 8) return -EINVAL;
    l.hdr_len = l.l4 + 8;
  } else {
    return -EPROTONOSUPPORT;
  }
  *out = l;
  return 0;
}

int finish_csum(uint8_t* frame, uint32_t len, uint16_t csum_start, uint16_t csum_offset) {
  if (csum_start >= len || uint32_t(csum_start) + csum_offset + 2 > len) return -EINVAL;
  uint16_t c = static_cast<uint16_t>(~ones_sum(frame + csum_start, len - csum_start));
  if (c == 0) c = 0xffff;  // a UDP checksum of 0 means "none"; the same value to TCP
  store_be16(frame + csum_start + csum_offset, c);
  return 0;
}

bool verify_csums(const uint8_t* frame, uint32_t len) {
  frame_layout l;
  if (parse_layout(frame, len, &l) != 0) return true;
  if (!l.ipv6 && ones_sum(frame + l.l3, l.l4 - l.l3) != 0xffff) return false;
  uint32_t end = len;
  if (!l.ipv6) {
    uint32_t tot = load_be16(frame + l.l3 + 2);
    if (l.l3 + tot <= len) end = l.l3 + tot;  // ignore Ethernet padding
  } else {
    uint32_t pl = load_be16(frame + l.l3 + 4);
    if (l.l4 + pl <= len) end = l.l4 + pl;
  }
  if (l.l4_proto == 17 && load_be16(frame + l.l4 + 6) == 0 && !l.ipv6) return true;  // no UDP checksum
  uint16_t s = ones_sum(frame + l.l4, end - l.l4, pseudo_sum(frame, l, end - l.l4));
  return s == 0xffff;
}

uint32_t gso_segmented_bytes(const core::veth_frame& f, const frame_layout& l) {
  uint32_t payload = f.len - l.hdr_len;
  uint32_t nseg = payload == 0 ? 1 : (payload + f.gso_size - 1) / f.gso_size;
  return payload + nseg * l.hdr_len;
}

int check_offload(const core::veth_frame& f, uint32_t mtu, frame_layout* layout) {
  if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {
    if (f.csum_start < eth_hlen || uint32_t(f.csum_start) + f.csum_offset + 2 > f.len) return -EINVAL;
  }
  if (!(f.flags & core::VETH_FRAME_GSO)) return 0;
  if (f.len > gso_max_frame) return -EMSGSIZE;
  if (f.gso_size == 0 || (f.gso_type & 0x7f) == 0) return -EINVAL;
  uint8_t t = f.gso_type & 0x7f;
  if (t != 1 && t != 2) return -EPROTONOSUPPORT;  // TCPv4, TCPv6; UDP fragmentation is not offered
  frame_layout l;
  if (int rc = parse_layout(f.data, f.len, &l); rc != 0) return rc;
  if (l.l4_proto != 6 || l.ipv6 != (t == 2)) return -EINVAL;
  if (l.hdr_len - l.l3 + f.gso_size > mtu) return -EMSGSIZE;  // each segment fits the MTU
  uint32_t payload = f.len - l.hdr_len;
  if ((payload + f.gso_size - 1) / f.gso_size > gso_max_segs) return -EINVAL;
  if (layout) *layout = l;
  return 0;
}

int gso_segment(const core::veth_frame& f, const frame_layout& l, uint8_t* arena, uint32_t arena_len,
                core::veth_frame* out, uint32_t max_out) {
  uint32_t payload = f.len - l.hdr_len;
  uint32_t nseg = payload == 0 ? 1 : (payload + f.gso_size - 1) / f.gso_size;
  if (nseg > max_out || gso_segmented_bytes(f, l) > arena_len) return -ENOSPC;
  const uint8_t* src = f.data;
  uint32_t seq0 = load_be32(src + l.l4 + 4);
  uint16_t id0 = l.ipv6 ? 0 : load_be16(src + l.l3 + 4);
  uint8_t flags0 = src[l.l4 + 13];
  uint8_t* p = arena;
  for (uint32_t i = 0; i < nseg; ++i) {
    uint32_t off = i * f.gso_size;
    uint32_t chunk = payload - off < f.gso_size ? payload - off : f.gso_size;
    if (payload == 0) chunk = 0;
    std::memcpy(p, src, l.hdr_len);
    std::memcpy(p + l.hdr_len, src + l.hdr_len + off, chunk);
    uint32_t seg_len = l.hdr_len + chunk;
    uint8_t* ip = p + l.l3;
    if (l.ipv6) {
      store_be16(ip + 4, static_cast<uint16_t>(seg_len - l.l3 - 40));
    } else {
      store_be16(ip + 2, static_cast<uint16_t>(seg_len - l.l3));
      store_be16(ip + 4, static_cast<uint16_t>(id0 + i));
      set_ipv4_csum(ip);
    }
    uint8_t* tcp = p + l.l4;
    store_be32(tcp + 4, seq0 + off);
    uint8_t fl = flags0;
    if (i + 1 < nseg) fl &= static_cast<uint8_t>(~(0x01 | 0x08));  // FIN, PSH only on the last
    if (i > 0) fl &= static_cast<uint8_t>(~0x80);                   // CWR only on the first
    tcp[13] = fl;
    tcp[16] = tcp[17] = 0;
    uint32_t l4_len = seg_len - l.l4;
    uint16_t c = static_cast<uint16_t>(~ones_sum(tcp, l4_len, pseudo_sum(p, l, l4_len)));
    store_be16(tcp + 16, c);
    out[i] = core::veth_frame{.data = p, .len = seg_len, .flags = core::VETH_FRAME_CSUM_VALID};
    p += seg_len;
  }
  return static_cast<int>(nseg);
}

uint64_t wire_bytes(const core::veth_frame& f) {
  if (!(f.flags & core::VETH_FRAME_GSO) || f.gso_size == 0) return f.len;
  frame_layout l;
  if (parse_layout(f.data, f.len, &l) != 0) return f.len;
  return gso_segmented_bytes(f, l);
}

}  // namespace uvd::net
