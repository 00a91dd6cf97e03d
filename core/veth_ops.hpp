// SPDX-License-Identifier: Apache-2.0
#pragma once
// veth_ops: the one ops table between the generic virtual NIC (net::Veth) and a
// network transport. Control ops are apart from burst data ops, which return
// counts (as DPDK's eth_dev_ops). MTU changes, the tx-timeout watchdog,
// statistics and software checksum stay in the front half. Only append fields.
#include <cstddef>
#include <cstdint>

namespace uvd::core {

inline constexpr uint32_t VETH_ABI_VERSION = 1;

// veth_frame::flags
enum : uint32_t {
  VETH_FRAME_CSUM_PARTIAL = 1u << 0,  // checksum at csum_start+csum_offset still to be filled
  VETH_FRAME_CSUM_VALID = 1u << 1,    // received frame's checksums were verified
  VETH_FRAME_GSO = 1u << 2,           // a large segment to cut into gso_size pieces
};

// veth_caps::features: what the transport does itself; the rest the front half does in software.
enum : uint64_t {
  VETH_F_TX_CSUM = 1u << 0,
  VETH_F_RX_CSUM = 1u << 1,
  VETH_F_TSO = 1u << 2,
  VETH_F_SG = 1u << 3,
  VETH_F_LINK_STATE = 1u << 4,  // reports carrier changes through veth_host::link_changed
};

// One Ethernet frame (no FCS). The buffer is the front half's: a transport
// reads it during xmit and must be done with it when xmit returns (every
// in-tree transport copies or writes it out; zero copy would need a release
// op appended later), and writes into it during rx_poll (len: capacity in,
// bytes written out). With CSUM_PARTIAL the checksum field holds the folded
// pseudo-header sum (as Linux and virtio_net_hdr have it); with GSO, csum is
// partial too and the segments' headers come from the first csum_start + TCP
// header bytes.
struct veth_frame {
  uint8_t* data;
  uint32_t len;
  uint32_t flags;       // VETH_FRAME_*
  uint16_t csum_start;  // with CSUM_PARTIAL
  uint16_t csum_offset;
  uint16_t gso_size;    // with GSO
  uint8_t gso_type;     // 1: TCPv4, 2: TCPv6, 3: UDP
  uint8_t reserved;
};

struct veth_caps {
  uint32_t min_mtu;
  uint32_t max_mtu;  // largest MTU the transport can carry
  uint32_t nqueues;  // tx/rx queue pairs
  uint32_t reserved;
  uint64_t features;  // VETH_F_*
};

// Events from the transport to the front half. Any thread; thread-safe.
struct veth_host {
  void* owner;
  void (*rx_ready)(void* owner, uint32_t queue);      // frames are waiting for rx_poll
  void (*tx_done)(void* owner, uint32_t queue);       // room again after xmit accepted fewer than asked
  void (*link_changed)(void* owner, int up);
};

struct veth_open_params {
  const char* target;   // "tap0", "/run/uvd/switch.sock", a pcap file...
  const char* options;  // "key=value&key=value"
  const uint8_t* mac;   // 6 bytes: the front half's MAC
  uint32_t mtu;
  uint32_t nqueues;     // asked for; the transport may give fewer (see caps)
  const struct veth_host* host;
  char* errbuf;
  size_t errbuf_len;
};

struct veth_stats_extra {  // transport-level counters the front half cannot see
  uint64_t rx_dropped;
  uint64_t rx_errors;
  uint64_t tx_dropped;
  uint64_t tx_errors;
};

struct veth_ops {
  uint32_t abi_version;
  uint32_t struct_size;
  const char* name;
  const char* description;

  // Required. Synchronous. Create the transport's resources (open a tap fd, connect a socket).
  int (*open)(const veth_open_params* params, void** handle);
  // Required. Synchronous. Release everything; no callback after it returns.
  void (*close)(void* handle);
  // Required. Synchronous.
  int (*caps)(void* handle, veth_caps* out);

  // Required. Burst transmit on one queue: returns how many frames it took
  // from the front (0..n); fewer than n means full, and tx_done follows when
  // there is room. A frame the transport cannot carry is taken and counted as
  // a tx error in stats. Serialised per queue by the front half.
  int (*xmit)(void* handle, uint32_t queue, veth_frame* const* frames, uint32_t n);

  // Required. Burst receive: fill up to budget frames from the front half's
  // buffers; returns how many were filled, or -errno. Serialised per queue.
  int (*rx_poll)(void* handle, uint32_t queue, veth_frame* frames, uint32_t budget);

  // Optional. Carrier: 1 up, 0 down, -errno.
  int (*link_state)(void* handle);
  // Optional. Tell the transport of an MTU change the front half accepted.
  int (*set_mtu)(void* handle, uint32_t mtu);
  // Optional. Tell the transport of a MAC change.
  int (*set_mac)(void* handle, const uint8_t* mac);
  // Optional. A file descriptor that is readable when rx_poll has work (for epoll), or -1.
  int (*rx_fd)(void* handle, uint32_t queue);
  // Optional.
  int (*stats)(void* handle, veth_stats_extra* out);

  // Appended (still ABI 1: nothing had shipped).
  // Optional. Synchronous. The front half's administrative link state (1 up,
  // 0 down), for a transport whose peer can show it (TAP: the carrier the
  // kernel interface sees). Serialised with the other control ops.
  int (*set_link)(void* handle, int up);
  // Optional. Synchronous. The watchdog found queue stopped for longer than
  // the tx timeout: reset it (drop what is stuck, rearm notifications). The
  // front half restarts the queue after it returns; without this op it only
  // restarts it. Serialised with xmit on that queue.
  int (*tx_timeout)(void* handle, uint32_t queue);
};

}  // namespace uvd::core
