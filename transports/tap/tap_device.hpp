// SPDX-License-Identifier: Apache-2.0
#pragma once
// Private to the tap transport: the TUN/TAP and interface ioctls.
#include <cstdint>
#include <string>

namespace uvd::tap {

// struct virtio_net_hdr as the kernel reads and writes it in front of each
// frame with IFF_VNET_HDR (little-endian on every host Linux runs us on).
// <linux/virtio_net.h> does not compile as C++, hence this copy of the layout.
struct vnet_hdr {
  uint8_t flags;
  uint8_t gso_type;
  uint16_t hdr_len;
  uint16_t gso_size;
  uint16_t csum_start;
  uint16_t csum_offset;
};
static_assert(sizeof(vnet_hdr) == 10);
inline constexpr uint8_t vnet_f_needs_csum = 1, vnet_f_data_valid = 2;
inline constexpr uint8_t vnet_gso_none = 0, vnet_gso_tcpv4 = 1, vnet_gso_udp = 3, vnet_gso_tcpv6 = 4,
                         vnet_gso_ecn = 0x80;

struct tap_queue_params {
  std::string dev = "/dev/net/tun";
  std::string name;  // may be empty or a pattern ("uvd%d")
  bool vnet_hdr = true;
  bool multi_queue = false;
};

// Opens one queue of the interface (creating it on the first call); returns
// the fd (non-blocking) or -errno with a message naming the cause. *actual
// gets the interface's name.
int open_tap_queue(const tap_queue_params& p, std::string* actual, std::string* err);

// TUN_F_* offloads the kernel may hand us (0, or csum + TSO4/6).
int set_tap_offload(int fd, bool on, std::string* err);

// Interface settings through an AF_INET control socket of the current namespace.
int set_if_mac(int ctl, const std::string& name, const uint8_t* mac, std::string* err);
int set_if_mtu(int ctl, const std::string& name, uint32_t mtu, std::string* err);
int set_if_up(int ctl, const std::string& name, bool up, std::string* err);
int set_tap_carrier(int fd, bool on, std::string* err);
bool if_exists(const std::string& name);

}  // namespace uvd::tap
