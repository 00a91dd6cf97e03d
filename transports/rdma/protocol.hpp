// SPDX-License-Identifier: Apache-2.0
#pragma once
// The 3leaf storage protocol, version 1: what a uvd RDMA client and a uvd
// storage server say to each other over one reliable-connected queue pair.
//
// Model (after 3leaf's virtual storage): RPC messages travel as SEND/RECV; disk
// data never does. At connect the server registers a memory pool for that
// client alone (its own protection domain, its own MR; two clients' pools never
// overlap) and hands it opaque handles, one per segment of the pool. A client
// uses a segment for one transfer at a time:
//   write: RDMA WRITE the data into the segment(s), then SEND the WRITE RPC
//          (RC ordering: the data is placed before the RPC is delivered);
//   read:  SEND the READ RPC; the server reads the disk into the segment(s)
//          and replies; the client then RDMA READs the segment(s).
// Handles are random 64-bit tokens the server maps to (client, segment); they
// say nothing about addresses, are refused on any other connection, and die
// with the connection. The rkey/address pairs that go with them are valid only
// on this client's queue pair (per-client protection domain).
//
// Connection (rdma_cm): the client's connect private data is a conn_hello
// (versions it speaks, queue depth it wants); the server accepts with a
// conn_accept (version chosen, queue depth granted) or rejects with a
// conn_accept whose status is a positive errno.
//
// Flow control: a client keeps at most `queue_depth` RPCs outstanding. The
// server posts twice that many receives and reposts a slot's receive once the
// RPC it carried is answered (a reply small enough to go inline: as soon as
// the reply is posted; a larger one, or any while the server's send queue is
// half full of unacknowledged replies: once the reply's send completed), so a
// client with more RPCs outstanding than granted only stalls itself (RNR
// retry). Nothing here is on the wire: any version-1 peer interoperates.
//
// Messages: a msg_hdr, then an opcode-specific body. All integers are little
// endian. Status values are 0 or a negative Linux errno. Every I/O RPC and
// FENCE carries the sender's fencing epoch: the server refuses I/O whose epoch
// is below the export's current one with -ESTALE, and FENCE raises the export's
// epoch and answers only when no I/O admitted under an older epoch is still in
// flight (so a late write through a fenced path can never land afterwards).
//
// Versioning: any change to a layout here is a new version; a server speaks a
// range and picks the highest both ends know.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/result.hpp"

namespace uvd::rdma {

inline constexpr uint32_t hello_magic = 0x4656'4c33;  // "3LVF" little endian on the wire
inline constexpr uint32_t msg_magic = 0x3346'4c33;    // "3LF3"
inline constexpr uint16_t protocol_version = 1;

// Limits both ends hold to; a message past them is refused.
inline constexpr size_t msg_size = 4096;             // every SEND/RECV buffer
inline constexpr uint32_t max_segs_per_rpc = 32;     // segment references in one I/O RPC
inline constexpr uint32_t max_pool_segments = 128;   // handles in one OPEN reply
inline constexpr uint32_t max_queue_depth = 256;
inline constexpr size_t max_export_name = 255;
inline constexpr size_t uuid_chars = 36;

enum msg_opcode : uint16_t {
  OP_OPEN = 1,        // client: which export, how      -> OP_OPEN_REPLY
  OP_OPEN_REPLY = 2,  // server: geometry, pool, handles
  OP_READ = 3,        // I/O RPCs                       -> OP_REPLY
  OP_WRITE = 4,
  OP_FLUSH = 5,
  OP_DISCARD = 6,
  OP_WRITE_ZEROES = 7,
  OP_FENCE = 8,       // raise the export's epoch to hdr.epoch -> OP_REPLY
  OP_REPLY = 9,       // status of one RPC, matched by id
  OP_LIST = 10,       // before OPEN: the exports        -> OP_LIST_REPLY
  OP_LIST_REPLY = 11,
};

// Per-RPC flags (io_rpc::flags), the same bits as vstore_req flags.
enum : uint16_t {
  RPC_FUA = 1u << 0,
  RPC_NO_UNMAP = 1u << 1,
};
inline constexpr uint16_t known_rpc_flags = RPC_FUA | RPC_NO_UNMAP;

// open_rpc::flags
enum : uint16_t { OPEN_READ_ONLY = 1u << 0 };

// Wire sizes (packed, little endian).
inline constexpr size_t hello_size = 16;
inline constexpr size_t hdr_size = 24;
inline constexpr size_t seg_ref_size = 16;
inline constexpr size_t io_body_size = 24;
inline constexpr size_t pool_entry_size = 24;
inline constexpr size_t open_reply_fixed = hdr_size + 48 + uuid_chars + 4;
inline constexpr size_t list_entry_size = 64 + uuid_chars + 4 + 8;  // name[64], uuid, flags, size

// conn_hello: u32 magic, u16 min_version, u16 max_version, u16 queue_depth,
// u16 reserved, u32 reserved.  conn_accept: u32 magic, u16 version,
// u16 queue_depth, i32 status (0 or positive errno on reject), u32 reserved.
struct conn_hello {
  uint16_t min_version = protocol_version;
  uint16_t max_version = protocol_version;
  uint16_t queue_depth = 32;
};
struct conn_accept {
  uint16_t version = protocol_version;
  uint16_t queue_depth = 0;
  int32_t status = 0;
};

// u32 magic, u16 version, u16 opcode, u32 length (whole message), u32 epoch, u64 id.
struct msg_hdr {
  uint16_t opcode = 0;
  uint32_t length = 0;
  uint32_t epoch = 0;
  uint64_t id = 0;
};

// u64 handle, u32 offset (in the segment), u32 length.
struct seg_ref {
  uint64_t handle = 0;
  uint32_t offset = 0;
  uint32_t length = 0;
};

// After the header: u64 offset, u64 length (bytes on the export), u16 flags,
// u16 nseg, u32 reserved, then nseg seg_refs. READ and WRITE carry segments
// whose lengths sum to length; FLUSH, DISCARD, WRITE_ZEROES carry none.
struct io_rpc {
  msg_hdr hdr;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint16_t flags = 0;
  uint16_t nseg = 0;
  seg_ref segs[max_segs_per_rpc];
};

// After the header: u16 flags, u16 name_len, name bytes (an export name, or
// its UUID).
struct open_rpc {
  msg_hdr hdr;
  uint16_t flags = 0;
  std::string name;
};

// One segment of the client's pool as the OPEN reply names it:
// u64 handle, u64 remote address, u32 rkey, u32 length.
struct pool_entry {
  uint64_t handle = 0;
  uint64_t addr = 0;
  uint32_t rkey = 0;
  uint32_t length = 0;
};

// After the header: i32 status, u32 block_size, u64 size, u64 features
// (vstore feature bits), u32 read_only, u32 segment_size, u32 nsegs,
// u32 max_segs_per_rpc, u32 epoch (the export's current), u32 reserved,
// char uuid[36], 4 bytes padding, then nsegs pool_entries.
struct open_reply {
  msg_hdr hdr;
  int32_t status = 0;
  uint32_t block_size = 0;
  uint64_t size = 0;
  uint64_t features = 0;
  uint32_t read_only = 0;
  uint32_t segment_size = 0;
  uint32_t nsegs = 0;
  uint32_t max_segs = 0;
  uint32_t epoch = 0;
  char uuid[uuid_chars + 1] = {};
  pool_entry pool[max_pool_segments];
};

// After the header: i32 status, u32 epoch (the export's current).
struct reply {
  msg_hdr hdr;
  int32_t status = 0;
  uint32_t epoch = 0;
};
inline constexpr size_t reply_size = hdr_size + 8;

// After the header: u32 count (exports that exist), u32 entries (in this
// message), then entries of: char name[64] (NUL padded), char uuid[36],
// u32 read_only, u64 size.
struct list_entry {
  std::string name, uuid;
  bool read_only = false;
  uint64_t size = 0;
};
inline constexpr uint32_t max_list_entries = (msg_size - hdr_size - 8) / list_entry_size;

// Encoders write into out (at least msg_size bytes) and return the bytes used.
size_t encode_hello(const conn_hello& h, std::byte* out);
size_t encode_accept(const conn_accept& a, std::byte* out);
size_t encode_io(const io_rpc& r, std::byte* out);
size_t encode_open(const open_rpc& r, std::byte* out);
size_t encode_open_reply(const open_reply& r, std::byte* out);
size_t encode_reply(const reply& r, std::byte* out);
size_t encode_fence(uint64_t id, uint32_t epoch, std::byte* out);
size_t encode_list(uint64_t id, std::byte* out);
size_t encode_list_reply(uint64_t id, std::span<const list_entry> all, std::byte* out);

// Decoders read a received message once, into plain structs, and check only
// what the layout itself requires (sizes, magic, version, counts within the
// message); meaning is checked by the receiver (server_check.hpp).
core::result<conn_hello> decode_hello(std::span<const std::byte> in);
core::result<conn_accept> decode_accept(std::span<const std::byte> in);
core::result<msg_hdr> decode_hdr(std::span<const std::byte> in);
core::result<void> decode_io(std::span<const std::byte> in, io_rpc* out);
core::result<open_rpc> decode_open(std::span<const std::byte> in);
core::result<void> decode_open_reply(std::span<const std::byte> in, open_reply* out);
core::result<reply> decode_reply(std::span<const std::byte> in);
core::result<std::pair<uint32_t, std::vector<list_entry>>> decode_list_reply(std::span<const std::byte> in);

bool is_io_opcode(uint16_t op) noexcept;
const char* opcode_name(uint16_t op) noexcept;

}  // namespace uvd::rdma
