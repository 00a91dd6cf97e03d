// SPDX-License-Identifier: Apache-2.0
#pragma once
// The daemon wire protocol, between a front end (the "daemon" veth transport)
// in one process and the netback switch (`uvd switch`) in another, as UML's
// switch daemon joined UML instances. Version 1.
//
// Transport: a Unix SOCK_SEQPACKET socket at a path. Message boundaries are
// the socket's; every integer is little-endian; every message starts with a
// one-byte type.
//
//   front end                          switch
//   hello  ------------------------->          first message, exactly once
//          <-------------------------  welcome status 0, or an errno and the
//                                              socket is closed
//   frame  <------------------------>  frame   any number, both ways
//   mtu    ------------------------->          the front end's MTU changed
//
// A control client sends a hello with hello_control set; the switch answers
// with welcome and then one stats message (text), and closes.
//
// Shared-memory frames (hello_shm): the hello carries, as SCM_RIGHTS, a
// sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW) of shm_layout::total(ring_order)
// bytes and two eventfds, the front end's doorbell and the switch's. Frames
// then travel through the two rings of frame_ring.hpp instead of the socket,
// which stays open for control messages and to tell either side that the
// other is gone. A welcome without hello_shm means the switch declined: frames
// go over the socket.
//
// The switch trusts nothing: a first message that is not a well-formed hello
// ends the connection; a frame message shorter than its header is counted as
// truncated, a frame over the port's MTU (or over the receive buffer: the
// socket reports MSG_TRUNC) as oversize, shorter than an Ethernet header as a
// runt, bad offload metadata as such, tagged frames as VLAN, and a source MAC
// other than the hello's as forged; all are dropped and counted per port.
#include <cstdint>

#include "net/eth.hpp"

namespace uvd::daemon {

inline constexpr uint32_t proto_magic = 0x4e445655;  // "UVDN"
inline constexpr uint8_t proto_version = 1;

enum msg_type : uint8_t {
  msg_hello = 1,
  msg_welcome = 2,
  msg_frame = 3,
  msg_mtu = 4,
  msg_stats = 5,
};

enum : uint16_t {
  hello_offload = 1u << 0,  // send me GSO and partial-checksum frames whole
  hello_control = 1u << 1,  // not a port: a stats query
  hello_shm = 1u << 2,      // frames through shared-memory rings (fds attached)
};

struct hello_msg {
  uint8_t type;       // msg_hello
  uint8_t version;    // proto_version
  uint16_t flags;     // hello_*
  uint32_t magic;     // proto_magic
  uint8_t mac[6];     // the port's MAC: the only source MAC it may use
  uint16_t ring_order;  // hello_shm: log2 of each ring's bytes (frame_ring.hpp limits), else 0
  uint32_t mtu;       // 68..65535
  char name[32];      // NUL-padded printable name, for rate limits and logs
};
static_assert(sizeof(hello_msg) == 52);

struct welcome_msg {
  uint8_t type;  // msg_welcome
  uint8_t version;
  uint16_t flags;      // hello_offload if the switch will send offloaded frames
  uint32_t magic;
  int32_t status;      // 0, or a positive errno
  uint32_t port_id;
  uint32_t max_mtu;
  char message[64];    // why, when status is not 0
};
static_assert(sizeof(welcome_msg) == 84);

// Frame flags (a subset of veth_frame's, renumbered for the wire).
enum : uint8_t {
  frame_csum_partial = 1u << 0,
  frame_csum_valid = 1u << 1,
  frame_gso = 1u << 2,
};

struct frame_hdr {
  uint8_t type;  // msg_frame
  uint8_t flags;
  uint8_t gso_type;  // 1 TCPv4, 2 TCPv6 (| 0x80 ECN)
  uint8_t reserved;
  uint16_t gso_size;
  uint16_t csum_start;
  uint16_t csum_offset;
  uint16_t reserved2;
};  // followed by the Ethernet frame
static_assert(sizeof(frame_hdr) == 12);

struct mtu_msg {
  uint8_t type;  // msg_mtu
  uint8_t reserved[3];
  uint32_t mtu;
};
static_assert(sizeof(mtu_msg) == 8);

// The largest message: a frame header and a GSO frame.
inline constexpr uint32_t max_msg = sizeof(frame_hdr) + net::gso_max_frame;

}  // namespace uvd::daemon
