// SPDX-License-Identifier: Apache-2.0
#pragma once
// The NBD wire format (NetworkBlockDevice doc/proto.md): constants, byte
// order, transmission-phase request decoding and checking, reply encoding.
// Pure functions over byte buffers, no I/O: the server and the fuzzer share
// them. The handshake state machine is in handshake.hpp.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace uvd::storage::nbd {

// Magic numbers.
inline constexpr uint64_t NBD_MAGIC = 0x4e42444d41474943ull;      // "NBDMAGIC"
inline constexpr uint64_t NBD_OPTS_MAGIC = 0x49484156454f5054ull; // "IHAVEOPT"
inline constexpr uint64_t NBD_REP_MAGIC = 0x3e889045565a9ull;
inline constexpr uint32_t NBD_REQUEST_MAGIC = 0x25609513u;
inline constexpr uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698u;

// Handshake flags (server) and client flags.
inline constexpr uint16_t NBD_FLAG_FIXED_NEWSTYLE = 1u << 0;
inline constexpr uint16_t NBD_FLAG_NO_ZEROES = 1u << 1;
inline constexpr uint32_t NBD_FLAG_C_FIXED_NEWSTYLE = 1u << 0;
inline constexpr uint32_t NBD_FLAG_C_NO_ZEROES = 1u << 1;

// Transmission flags.
inline constexpr uint16_t NBD_FLAG_HAS_FLAGS = 1u << 0;
inline constexpr uint16_t NBD_FLAG_READ_ONLY = 1u << 1;
inline constexpr uint16_t NBD_FLAG_SEND_FLUSH = 1u << 2;
inline constexpr uint16_t NBD_FLAG_SEND_FUA = 1u << 3;
inline constexpr uint16_t NBD_FLAG_ROTATIONAL = 1u << 4;
inline constexpr uint16_t NBD_FLAG_SEND_TRIM = 1u << 5;
inline constexpr uint16_t NBD_FLAG_SEND_WRITE_ZEROES = 1u << 6;
inline constexpr uint16_t NBD_FLAG_SEND_DF = 1u << 7;
inline constexpr uint16_t NBD_FLAG_CAN_MULTI_CONN = 1u << 8;
inline constexpr uint16_t NBD_FLAG_SEND_CACHE = 1u << 10;
inline constexpr uint16_t NBD_FLAG_SEND_FAST_ZERO = 1u << 11;

// Options.
inline constexpr uint32_t NBD_OPT_EXPORT_NAME = 1;
inline constexpr uint32_t NBD_OPT_ABORT = 2;
inline constexpr uint32_t NBD_OPT_LIST = 3;
inline constexpr uint32_t NBD_OPT_STARTTLS = 5;
inline constexpr uint32_t NBD_OPT_INFO = 6;
inline constexpr uint32_t NBD_OPT_GO = 7;
inline constexpr uint32_t NBD_OPT_STRUCTURED_REPLY = 8;
inline constexpr uint32_t NBD_OPT_LIST_META_CONTEXT = 9;
inline constexpr uint32_t NBD_OPT_SET_META_CONTEXT = 10;
inline constexpr uint32_t NBD_OPT_EXTENDED_HEADERS = 11;

// Option replies.
inline constexpr uint32_t NBD_REP_ACK = 1;
inline constexpr uint32_t NBD_REP_SERVER = 2;
inline constexpr uint32_t NBD_REP_INFO = 3;
inline constexpr uint32_t NBD_REP_FLAG_ERROR = 1u << 31;
inline constexpr uint32_t NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
inline constexpr uint32_t NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2;
inline constexpr uint32_t NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3;
inline constexpr uint32_t NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4;
inline constexpr uint32_t NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5;
inline constexpr uint32_t NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;
inline constexpr uint32_t NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7;
inline constexpr uint32_t NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8;
inline constexpr uint32_t NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9;

// Information types in NBD_OPT_INFO / NBD_OPT_GO and NBD_REP_INFO.
inline constexpr uint16_t NBD_INFO_EXPORT = 0;
inline constexpr uint16_t NBD_INFO_NAME = 1;
inline constexpr uint16_t NBD_INFO_DESCRIPTION = 2;
inline constexpr uint16_t NBD_INFO_BLOCK_SIZE = 3;

// Commands.
inline constexpr uint16_t NBD_CMD_READ = 0;
inline constexpr uint16_t NBD_CMD_WRITE = 1;
inline constexpr uint16_t NBD_CMD_DISC = 2;
inline constexpr uint16_t NBD_CMD_FLUSH = 3;
inline constexpr uint16_t NBD_CMD_TRIM = 4;
inline constexpr uint16_t NBD_CMD_CACHE = 5;
inline constexpr uint16_t NBD_CMD_WRITE_ZEROES = 6;
inline constexpr uint16_t NBD_CMD_BLOCK_STATUS = 7;

// Command flags.
inline constexpr uint16_t NBD_CMD_FLAG_FUA = 1u << 0;
inline constexpr uint16_t NBD_CMD_FLAG_NO_HOLE = 1u << 1;
inline constexpr uint16_t NBD_CMD_FLAG_DF = 1u << 2;
inline constexpr uint16_t NBD_CMD_FLAG_REQ_ONE = 1u << 3;
inline constexpr uint16_t NBD_CMD_FLAG_FAST_ZERO = 1u << 4;

// Error values of the reply's error field: the only ones the protocol names.
inline constexpr uint32_t NBD_SUCCESS = 0;
inline constexpr uint32_t NBD_EPERM = 1;
inline constexpr uint32_t NBD_EIO = 5;
inline constexpr uint32_t NBD_ENOMEM = 12;
inline constexpr uint32_t NBD_EINVAL = 22;
inline constexpr uint32_t NBD_ENOSPC = 28;
inline constexpr uint32_t NBD_EOVERFLOW = 75;
inline constexpr uint32_t NBD_ENOTSUP = 95;
inline constexpr uint32_t NBD_ESHUTDOWN = 108;

// Sizes of fixed wire records.
inline constexpr size_t NBD_GREETING_SIZE = 18;      // magic, IHAVEOPT, handshake flags
inline constexpr size_t NBD_OPTION_HEADER_SIZE = 16;  // IHAVEOPT, option, length
inline constexpr size_t NBD_OPTION_REPLY_HEADER_SIZE = 20;
inline constexpr size_t NBD_REQUEST_SIZE = 28;
inline constexpr size_t NBD_SIMPLE_REPLY_SIZE = 16;
inline constexpr size_t NBD_EXPORT_NAME_REPLY_SIZE = 134;  // size, flags, 124 zeroes
inline constexpr uint32_t NBD_MAX_STRING = 4096;       // longest string (export name, message)
inline constexpr uint16_t NBD_DEFAULT_PORT = 10809;

// Big-endian loads and stores; p need not be aligned.
inline uint16_t load_be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
inline uint32_t load_be32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}
inline uint64_t load_be64(const uint8_t* p) { return uint64_t{load_be32(p)} << 32 | load_be32(p + 4); }
inline void store_be16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  store_be16(p, static_cast<uint16_t>(v >> 16));
  store_be16(p + 2, static_cast<uint16_t>(v));
}
inline void store_be64(uint8_t* p, uint64_t v) {
  store_be32(p, static_cast<uint32_t>(v >> 32));
  store_be32(p + 4, static_cast<uint32_t>(v));
}

// One transmission-phase request header.
struct request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t handle = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Decodes NBD_REQUEST_SIZE bytes. False when the magic is wrong: the stream
// is out of step and the only safe answer is a hard disconnect.
bool decode_request(std::span<const uint8_t, NBD_REQUEST_SIZE> in, request* out) noexcept;
void encode_request(const request& r, std::span<uint8_t, NBD_REQUEST_SIZE> out) noexcept;
void encode_simple_reply(std::span<uint8_t, NBD_SIMPLE_REPLY_SIZE> out, uint32_t error, uint64_t handle) noexcept;

// What the server knows about the export when it checks a request.
struct export_geometry {
  uint64_t size = 0;
  uint16_t tflags = 0;          // transmission flags sent to the client
  uint32_t min_block = 1;       // offsets and lengths must be multiples of it
  uint32_t max_payload = 32u << 20;  // longest READ/WRITE
  uint32_t max_discard = 64u << 20;  // longest refused WRITE payload read and dropped
};

enum class request_action : uint8_t {
  execute,           // valid: hand it to the Vstore
  reply_error,       // reply with `error`; for WRITE, read and drop the payload first
  soft_disconnect,   // NBD_CMD_DISC: finish what is in flight, flush, close
  hard_disconnect,   // cannot stay in step (a WRITE payload too big to drop): close
};

struct request_verdict {
  request_action action = request_action::execute;
  uint32_t error = NBD_SUCCESS;  // NBD_E* for reply_error
  uint32_t payload = 0;          // bytes that follow the header on the wire
  const char* why = "";          // for the log
};

// The checks the protocol document asks for, in its words: an unknown command
// or flag is EINVAL, a write or trim on a read-only export EPERM, a write past
// the end ENOSPC, any other out-of-range request EINVAL, a flag or command the
// export did not advertise EINVAL, a READ/WRITE longer than max_payload EINVAL.
request_verdict check_request(const request& r, const export_geometry& g) noexcept;

// A positive or negative errno from the storage layer as an NBD_E* value.
uint32_t nbd_error_from_errno(int err) noexcept;

// Transmission flags for an export.
uint16_t make_transmission_flags(bool read_only, bool can_trim, bool rotational, bool multi_conn) noexcept;

std::string_view command_name(uint16_t type) noexcept;
std::string_view option_name(uint32_t option) noexcept;
std::string_view reply_name(uint32_t reply) noexcept;
std::string_view error_name(uint32_t nbd_error) noexcept;

}  // namespace uvd::storage::nbd
