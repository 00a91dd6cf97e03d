// SPDX-License-Identifier: Apache-2.0
#include "transports/rdma/net_proto.hpp"

#include <cerrno>
#include <cstdio>

namespace uvd::rdma {

namespace {

constexpr uint8_t known_frame_flags = net_frame_csum_partial | net_frame_csum_valid | net_frame_gso;

bool unicast(const uint8_t* m) {
  if (m[0] & 1) return false;
  for (int i = 0; i < 6; ++i)
    if (m[i]) return true;
  return false;
}

}  // namespace

int parse_hello(const void* data, size_t len, const net_hello_limits& lim, net_hello_view* out, std::string* why) {
  // rdma_cm pads private data to the transport's size: accept anything at
  // least as long as a hello, read only the hello.
  if (!data || len < sizeof(net_hello)) {
    *why = "no hello in the connect request";
    return EPROTO;
  }
  net_hello h;
  std::memcpy(&h, data, sizeof h);  // copy, then validate
  if (h.magic != net_magic) {
    *why = "not a uvd net hello (bad magic)";
    return EPROTO;
  }
  if (h.version != net_version) {
    *why = "protocol version " + std::to_string(h.version) + " (the switch speaks 1)";
    return EPROTONOSUPPORT;
  }
  if (h.flags & ~net_hello_offload) {
    *why = "unknown hello flags";
    return EINVAL;
  }
  if (!unicast(h.mac)) {
    *why = "the MAC is not unicast";
    return EINVAL;
  }
  if (h.mtu < 68 || h.mtu > lim.max_mtu) {
    *why = "MTU " + std::to_string(h.mtu) + " out of range";
    return EINVAL;
  }
  if (h.depth < net_min_depth || h.depth > net_max_depth) {
    *why = "receive depth " + std::to_string(h.depth) + " out of range";
    return EINVAL;
  }
  if (h.max_msg < net_min_msg || h.max_msg > net_max_msg || h.max_msg < sizeof(net_msg_hdr) + h.mtu + 14) {
    *why = "receive buffers of " + std::to_string(h.max_msg) + " bytes do not fit MTU " + std::to_string(h.mtu);
    return EINVAL;
  }
  size_t nl = strnlen(h.name, sizeof h.name);
  if (nl == sizeof h.name) {
    *why = "port name is not terminated";
    return EINVAL;
  }
  for (size_t i = 0; i < nl; ++i)
    if (h.name[i] < 0x21 || h.name[i] > 0x7e) {
      *why = "port name is not printable";
      return EINVAL;
    }
  std::memcpy(out->mac, h.mac, 6);
  out->mtu = h.mtu;
  out->depth = h.depth;
  out->max_msg = h.max_msg;
  out->offload = h.flags & net_hello_offload;
  out->name.assign(h.name, nl);
  return 0;
}

int parse_welcome(const void* data, size_t len, net_welcome* out, std::string* why) {
  if (!data || len < sizeof(net_welcome)) {
    *why = "the switch accepted without a welcome (not a uvd switch?)";
    return EPROTO;
  }
  net_welcome w;
  std::memcpy(&w, data, sizeof w);
  if (w.magic != net_magic || w.version != net_version) {
    *why = "the switch's welcome has a bad magic or version";
    return EPROTO;
  }
  if (w.depth < net_min_depth || w.depth > net_max_depth || w.max_msg < net_min_msg || w.max_msg > net_max_msg ||
      w.max_mtu < 68 || (w.flags & ~net_hello_offload)) {
    *why = "the switch's welcome makes no sense (depth " + std::to_string(w.depth) + ", max_msg " +
           std::to_string(w.max_msg) + ", max_mtu " + std::to_string(w.max_mtu) + ")";
    return EPROTO;
  }
  *out = w;
  return 0;
}

bool parse_refusal(const void* data, size_t len, int* status, std::string* why) {
  if (!data || len < sizeof(net_refusal)) return false;
  net_refusal r;
  std::memcpy(&r, data, sizeof r);
  if (r.magic != net_magic || r.status <= 0 || r.status > 4095) return false;
  r.message[sizeof r.message - 1] = 0;
  *status = r.status;
  *why = r.message;
  return true;
}

net_refusal make_refusal(int status, const std::string& why) {
  net_refusal r{};
  r.magic = net_magic;
  r.version = net_version;
  r.status = status;
  std::snprintf(r.message, sizeof r.message, "%s", why.c_str());
  return r;
}

net_rx_status parse_msg(const uint8_t* buf, uint32_t len, bool from_front_end, net_rx_msg* out) {
  if (len < sizeof(net_msg_hdr)) return net_rx_status::truncated;
  std::memcpy(&out->hdr, buf, sizeof out->hdr);
  const net_msg_hdr& h = out->hdr;
  if (h.magic != net_magic || h.version != net_version) return net_rx_status::bad_msg;
  out->payload = buf + sizeof h;
  out->len = len - static_cast<uint32_t>(sizeof h);
  switch (h.type) {
    case net_msg_frame:
      if (h.flags & ~known_frame_flags) return net_rx_status::bad_msg;
      return net_rx_status::ok;
    case net_msg_credit:
      if (h.flags || out->len) return net_rx_status::bad_msg;
      return net_rx_status::ok;
    case net_msg_mtu:
    case net_msg_link:
      if (!from_front_end || h.flags) return net_rx_status::bad_msg;
      if (out->len < 4) return net_rx_status::truncated;
      if (out->len > 4) return net_rx_status::bad_msg;
      std::memcpy(&out->value, out->payload, 4);
      if (h.type == net_msg_link && out->value > 1) return net_rx_status::bad_msg;
      return net_rx_status::ok;
    default:
      return net_rx_status::bad_msg;
  }
}

void frame_to_hdr(const core::veth_frame& f, net_msg_hdr* h) {
  *h = make_hdr(net_msg_frame);
  if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {
    h->flags |= net_frame_csum_partial;
    h->csum_start = f.csum_start;
    h->csum_offset = f.csum_offset;
  }
  if (f.flags & core::VETH_FRAME_CSUM_VALID) h->flags |= net_frame_csum_valid;
  if (f.flags & core::VETH_FRAME_GSO) {
    h->flags |= net_frame_gso;
    h->gso_type = f.gso_type;
    h->gso_size = f.gso_size;
  }
}

void hdr_to_frame(const net_msg_hdr& h, core::veth_frame* f) {
  f->flags = 0;
  f->csum_start = f->csum_offset = f->gso_size = 0;
  f->gso_type = 0;
  if (h.flags & net_frame_csum_partial) {
    f->flags |= core::VETH_FRAME_CSUM_PARTIAL;
    f->csum_start = h.csum_start;
    f->csum_offset = h.csum_offset;
  }
  if (h.flags & net_frame_csum_valid) f->flags |= core::VETH_FRAME_CSUM_VALID;
  if (h.flags & net_frame_gso) {
    f->flags |= core::VETH_FRAME_GSO;
    f->gso_type = h.gso_type;
    f->gso_size = h.gso_size;
  }
}

}  // namespace uvd::rdma
