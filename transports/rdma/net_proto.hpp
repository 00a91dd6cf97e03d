// SPDX-License-Identifier: Apache-2.0
#pragma once
// Net over RDMA, wire protocol version 1: Ethernet frames between a front end
// (the "rdma" veth transport) and the netback switch (`uvd switch --rdma`), as
// 3leaf carried networking beside storage on one fabric. Private to the rdma
// transport; needs no RDMA library, so it is unit-tested everywhere.
//
// Connection (rdma_cm, RC queue pair, port 7172 by default):
//   front end                               switch
//   connect, private data: net_hello -----> validated as hostile input
//           <----- accept, private data: net_welcome   (or reject: net_refusal)
//   then messages, both ways, each one SEND into one posted RECV buffer.
//
// Every message starts with a msg_hdr (little endian, 16 bytes):
//   frame   the header, then one Ethernet frame (no FCS); flags and the
//           checksum/GSO fields are veth_frame's (see core/veth_ops.hpp)
//   credit  the header alone: only returns credits
//   mtu     front end -> switch: the header, then a u32 MTU (68..max_mtu)
//   link    front end -> switch: the header, then a u32 (1 up, 0 down): the
//           front end's administrative state; the switch delivers nothing to
//           a port that is down
//
// Flow control by credits. Each end posts `depth` receive buffers of
// `max_msg` bytes (both announced in the hello / welcome); those are the
// other end's initial credits. A SEND uses one credit; every header returns
// the credits its sender gained since its previous message: receives it
// reposted. A receive holding a frame is reposted only once the application
// has taken the frame (so a reader that falls behind pushes back on the
// sender, whose switch then drops at the egress, like a full NIC ring);
// a receive holding anything else is reposted by the transport at once,
// whatever the application does. Per end, with C its credits, P its
// reposted-but-unreturned receives, H its receives taken and not yet
// reposted, D its depth and A = D - P - H (what it has announced and the
// peer may still send it: the peer's credits plus messages on the way):
//   R1 a frame, mtu or link message needs C >= 2: the last credit is kept
//      for a credit message, so a peer whose application sits on its frames
//      (H = D - 1) can still be handed credits, and its own sends never stop
//      for want of our receives;
//   R2 a credit message goes out when P >= 1, C >= 1 and A < 2 (the peer may
//      be unable to send a frame: it gets what there is, now), or when
//      P >= grant_threshold(D) and C >= 2 (a batch: few credit messages; not
//      with the last credit, which the frames it would starve need more);
//   R3 both are checked again whenever C, P or H change: after every poll of
//      the receive queue and every repost.
// Why this cannot deadlock, for any two depths (>= 4):
//   - both ends are never at C = 0 once the wire is empty: a credit can be
//     spent down to zero only by a credit message (R1), which returns at
//     least one (R2); of two such messages the later one, or both if they
//     cross, arrives at an end that has spent its last credit already and
//     gives it credit again;
//   - an end at C = 0 spent its last credit on a credit message (R1),
//     which the peer reposts at once and has not returned yet (else C >= 1):
//     the peer has P >= 1, A < 2 and (first point) C >= 1, so it sends
//     credits by R2, whatever its application does;
//   - an end at C = 1 whose peer is stuck sends credits by R2 as soon as
//     P >= 1; P = D - A - H = 0 with A < 2 means its application sits on
//     D - 1 frames, all that R1 lets the peer send it, and the peer waits
//     rightly: for that application to read.
// So an application that does not read stops only its own receiving: its
// peer stops sending it frames (the switch drops them), nothing else stops.
// A credit message smaller than a batch answers a peer that may be stuck;
// two ends answering each other so forever would both have to sit on their
// frames, and the switch's end never does (it reposts every burst).
// Nobody sends more than the other posted, so the receive queue never runs
// dry (no RNR); a peer that returns more credits than its depth allows is
// broken and is disconnected.
// A message longer than the receiver's buffers fails the receiver's queue
// pair (IBV_WC_LOC_LEN_ERR): the switch counts it as oversize and drops the
// port; both ends hold to the peer's announced max_msg.
//
// The switch trusts nothing: bad private data is rejected with a reason; a
// message shorter than its header or than its type needs is counted as
// truncated, a bad magic/version/type/flag as a bad message, and frames go on
// to the switch's own checks (runts, MTU, offload metadata, source MAC).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/veth_ops.hpp"

namespace uvd::rdma {

inline constexpr const char* net_default_port = "7172";
inline constexpr uint32_t net_magic = 0x4e564455;  // "UDVN" little endian
inline constexpr uint8_t net_version = 1;

enum net_msg_type : uint8_t {
  net_msg_hello = 1,  // only as connect private data (net_hello)
  net_msg_frame = 2,
  net_msg_credit = 3,
  net_msg_mtu = 4,
  net_msg_link = 5,
};

// msg_hdr::flags for frames (the wire's own numbering of veth_frame flags).
enum : uint8_t {
  net_frame_csum_partial = 1u << 0,
  net_frame_csum_valid = 1u << 1,
  net_frame_gso = 1u << 2,
};

struct net_msg_hdr {
  uint32_t magic;     // net_magic
  uint8_t version;    // net_version
  uint8_t type;       // net_msg_type
  uint16_t credits;   // receives the sender reposted since its previous message
  uint8_t flags;      // frame: net_frame_*; else 0
  uint8_t gso_type;   // frame with net_frame_gso: 1 TCPv4, 2 TCPv6, 3 UDP (| 0x80 ECN)
  uint16_t gso_size;
  uint16_t csum_start;
  uint16_t csum_offset;
};
static_assert(sizeof(net_msg_hdr) == 16);

// net_hello::flags, net_welcome::flags
enum : uint8_t {
  net_hello_offload = 1u << 0,  // send me GSO and partial-checksum frames whole
};

// The front end's connect private data. rdma_cm leaves 56 bytes to the
// consumer of an RC connect request; this is exactly that.
struct net_hello {
  uint32_t magic;    // net_magic
  uint8_t version;   // net_version
  uint8_t flags;     // net_hello_*
  uint16_t depth;    // receives the front end posted: the switch's initial credits
  uint8_t mac[6];    // the only source MAC the port may use
  uint16_t reserved;
  uint32_t mtu;      // 68..65535
  uint32_t max_msg;  // bytes of each of its receive buffers: the largest message it takes
  char name[32];     // NUL-padded printable name (rate limits, logs)
};
static_assert(sizeof(net_hello) == 56);

// The switch's accept private data.
struct net_welcome {
  uint32_t magic;
  uint8_t version;
  uint8_t flags;     // net_hello_offload when the switch sends offloaded frames
  uint16_t depth;    // receives the switch posted: the front end's initial credits
  uint32_t max_msg;  // the switch's receive buffer size
  uint32_t max_mtu;  // largest MTU this port may set
  uint32_t port_id;
};
static_assert(sizeof(net_welcome) == 20);

// The switch's reject private data.
struct net_refusal {
  uint32_t magic;
  uint8_t version;
  uint8_t reserved[3];
  int32_t status;     // a positive errno
  char message[64];   // NUL-terminated reason
};
static_assert(sizeof(net_refusal) == 76);

// Receive depth limits (both ends). At least 4, so that a grant threshold
// of 2 leaves room for the two-credit rule.
inline constexpr uint32_t net_min_depth = 4;
inline constexpr uint32_t net_max_depth = 1024;
inline constexpr uint32_t net_min_msg = sizeof(net_msg_hdr) + 14 + 68;
// The largest message: a header and the largest GSO frame (net/eth.hpp gso_max_frame).
inline constexpr uint32_t net_max_msg = sizeof(net_msg_hdr) + 65536 + 14 + 4;

// Credits are returned in batches of an eighth of the receives: few credit
// messages, and a sender never waits long.
inline uint32_t grant_threshold(uint32_t depth) { return depth / 8 > 2 ? depth / 8 : 2; }

// Limits the switch checks a hello against.
struct net_hello_limits {
  uint32_t max_mtu = 65535;
};

// What a valid hello says, in host terms.
struct net_hello_view {
  uint8_t mac[6];
  uint32_t mtu = 0;
  uint32_t depth = 0;
  uint32_t max_msg = 0;
  bool offload = false;
  std::string name;
};

// Validates connect private data as a hello. 0 and *out filled, or a positive
// errno with *why set (the refusal's text).
int parse_hello(const void* data, size_t len, const net_hello_limits& lim, net_hello_view* out, std::string* why);

// Validates accept private data as a welcome; 0 or a positive errno with *why.
int parse_welcome(const void* data, size_t len, net_welcome* out, std::string* why);

// A reject's private data: the switch's errno and reason, if it is a refusal.
bool parse_refusal(const void* data, size_t len, int* status, std::string* why);

net_refusal make_refusal(int status, const std::string& why);

// What a received message is, after its header was checked.
enum class net_rx_status {
  ok,
  truncated,  // shorter than the header or than its type needs
  bad_msg,    // bad magic, version, type, flags, value or length
};

struct net_rx_msg {
  net_msg_hdr hdr{};
  const uint8_t* payload = nullptr;  // after the header
  uint32_t len = 0;                  // payload bytes
  uint32_t value = 0;                // mtu / link
};

// Copies the header out of buf (a completed receive of len bytes) and checks
// it and the message's length for its type. `from_front_end`: mtu and link
// messages are legal only towards the switch.
net_rx_status parse_msg(const uint8_t* buf, uint32_t len, bool from_front_end, net_rx_msg* out);

// veth_frame flags <-> header fields.
void frame_to_hdr(const core::veth_frame& f, net_msg_hdr* h);
// Fills f's offload fields (data and len set by the caller).
void hdr_to_frame(const net_msg_hdr& h, core::veth_frame* f);

inline net_msg_hdr make_hdr(net_msg_type t) {
  net_msg_hdr h{};
  h.magic = net_magic;
  h.version = net_version;
  h.type = t;
  return h;
}

// The credit arithmetic of one end of a connection (see the rules above).
// Not thread-safe: its owner serialises.
class credit_window {
 public:
  void reset(uint32_t own_depth, uint32_t peer_depth) {
    credits_ = peer_depth;
    peer_depth_ = peer_depth;
    own_depth_ = own_depth;
    pending_ = 0;
    taken_ = 0;
    threshold_ = grant_threshold(own_depth);
  }
  uint32_t credits() const { return credits_; }
  // Receives reposted and not yet returned to the peer (P).
  uint32_t pending() const { return pending_; }
  // Receives completed and not yet reposted (H).
  uint32_t taken() const { return taken_; }
  // At most what the peer may still send us (A).
  uint32_t announced() const { return own_depth_ - pending_ - taken_; }
  // R1: a frame, mtu or link message may go.
  bool may_send_data() const { return credits_ >= 2; }
  // R2: a credit message is due and may go.
  bool grant_due() const {
    if (credits_ < 1 || pending_ == 0) return false;
    return announced() < 2 || (pending_ >= threshold_ && credits_ >= 2);
  }
  // Takes a credit for a message about to be posted and returns the grant
  // its header carries.
  uint16_t take() {
    --credits_;
    uint16_t g = static_cast<uint16_t>(pending_);
    pending_ = 0;
    return g;
  }
  // n of our receives completed; false when more than we had posted (a
  // device that invents completions: nothing more can be trusted).
  bool received(uint32_t n) {
    if (uint64_t(n) > announced()) return false;
    taken_ += n;
    return true;
  }
  // n of the receives taken were reposted.
  void reposted(uint32_t n) {
    taken_ -= n;
    pending_ += n;
  }
  // The peer returned n credits; false when that is more than it could have
  // (a broken or hostile peer).
  bool granted(uint32_t n) {
    if (uint64_t(credits_) + n > peer_depth_) return false;
    credits_ += n;
    return true;
  }

 private:
  uint32_t credits_ = 0, peer_depth_ = 0, own_depth_ = 0, pending_ = 0, taken_ = 0, threshold_ = 2;
};

}  // namespace uvd::rdma
