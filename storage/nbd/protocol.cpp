// SPDX-License-Identifier: Apache-2.0
#include "storage/nbd/protocol.hpp"

#include <cerrno>

namespace uvd::storage::nbd {

bool decode_request(std::span<const uint8_t, NBD_REQUEST_SIZE> in, request* out) noexcept {
  const uint8_t* p = in.data();
  if (load_be32(p) != NBD_REQUEST_MAGIC) return false;
  out->flags = load_be16(p + 4);
  out->type = load_be16(p + 6);
  out->handle = load_be64(p + 8);
  out->offset = load_be64(p + 16);
  out->length = load_be32(p + 24);
  return true;
}

void encode_request(const request& r, std::span<uint8_t, NBD_REQUEST_SIZE> out) noexcept {
  uint8_t* p = out.data();
  store_be32(p, NBD_REQUEST_MAGIC);
  store_be16(p + 4, r.flags);
  store_be16(p + 6, r.type);
  store_be64(p + 8, r.handle);
  store_be64(p + 16, r.offset);
  store_be32(p + 24, r.length);
}

void encode_simple_reply(std::span<uint8_t, NBD_SIMPLE_REPLY_SIZE> out, uint32_t error, uint64_t handle) noexcept {
  uint8_t* p = out.data();
  store_be32(p, NBD_SIMPLE_REPLY_MAGIC);
  store_be32(p + 4, error);
  store_be64(p + 8, handle);
}

request_verdict check_request(const request& r, const export_geometry& g) noexcept {
  request_verdict v;
  const bool has_payload = r.type == NBD_CMD_WRITE;
  v.payload = has_payload ? r.length : 0;
  auto refuse = [&](uint32_t error, const char* why) {
    v.action = request_action::reply_error;
    v.error = error;
    v.why = why;
    // Dropping a huge payload would let one client pin this connection for
    // as long as it likes; the protocol allows a hard disconnect instead.
    if (has_payload && r.length > g.max_discard) v.action = request_action::hard_disconnect;
    return v;
  };

  switch (r.type) {
    case NBD_CMD_DISC:
      v.action = request_action::soft_disconnect;
      return v;
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
      break;
    default:
      return refuse(NBD_EINVAL, "unknown command");
  }

  const bool writes = r.type == NBD_CMD_WRITE || r.type == NBD_CMD_TRIM || r.type == NBD_CMD_WRITE_ZEROES;
  if (writes && (g.tflags & NBD_FLAG_READ_ONLY)) return refuse(NBD_EPERM, "write to a read-only export");

  if (r.flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE)) return refuse(NBD_EINVAL, "unknown or unnegotiated flag");
  if ((r.flags & NBD_CMD_FLAG_FUA) && !(g.tflags & NBD_FLAG_SEND_FUA)) return refuse(NBD_EINVAL, "FUA not negotiated");
  if ((r.flags & NBD_CMD_FLAG_NO_HOLE) && r.type != NBD_CMD_WRITE_ZEROES)
    return refuse(NBD_EINVAL, "NO_HOLE on a command other than WRITE_ZEROES");

  if (r.type == NBD_CMD_FLUSH) {
    if (!(g.tflags & NBD_FLAG_SEND_FLUSH)) return refuse(NBD_EINVAL, "FLUSH not negotiated");
    if (r.offset != 0 || r.length != 0) return refuse(NBD_EINVAL, "FLUSH with nonzero offset or length");
    return v;
  }
  if (r.type == NBD_CMD_TRIM && !(g.tflags & NBD_FLAG_SEND_TRIM)) return refuse(NBD_EINVAL, "TRIM not negotiated");
  if (r.type == NBD_CMD_WRITE_ZEROES && !(g.tflags & NBD_FLAG_SEND_WRITE_ZEROES))
    return refuse(NBD_EINVAL, "WRITE_ZEROES not negotiated");

  if ((r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE) && r.length > g.max_payload)
    return refuse(NBD_EINVAL, "length exceeds the maximum payload");
  if (r.length == 0) return refuse(NBD_EINVAL, "zero length");
  if (r.offset > g.size || r.length > g.size - r.offset)
    return refuse(r.type == NBD_CMD_WRITE || r.type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL,
                  "beyond the end of the export");
  if (g.min_block > 1 && (r.offset % g.min_block != 0 || r.length % g.min_block != 0))
    return refuse(NBD_EINVAL, "not aligned to the minimum block size");
  return v;
}

uint32_t nbd_error_from_errno(int err) noexcept {
  if (err < 0) err = -err;
  switch (err) {
    case 0:
      return NBD_SUCCESS;
    case EPERM:
    case EROFS:
    case EACCES:
      return NBD_EPERM;
    case EIO:
      return NBD_EIO;
    case ENOMEM:
      return NBD_ENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return NBD_ENOSPC;
    case EINVAL:
    case EOVERFLOW:  // EOVERFLOW is for DF reads, which are never negotiated here
    case ENOTSUP:
      return NBD_EINVAL;
    case ESHUTDOWN:
      return NBD_ESHUTDOWN;
    default:
      // Path and device errors (ENODEV, ETIMEDOUT, ECONNRESET...) mean the
      // data could not be moved: an I/O error to the client.
      return NBD_EIO;
  }
}

uint16_t make_transmission_flags(bool read_only, bool can_trim, bool rotational, bool multi_conn) noexcept {
  uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;
  if (read_only) {
    f |= NBD_FLAG_READ_ONLY;
  } else {
    f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES;
    if (can_trim) f |= NBD_FLAG_SEND_TRIM;
  }
  if (rotational) f |= NBD_FLAG_ROTATIONAL;
  if (multi_conn) f |= NBD_FLAG_CAN_MULTI_CONN;
  return f;
}

std::string_view command_name(uint16_t type) noexcept {
  switch (type) {
    case NBD_CMD_READ: return "READ";
    case NBD_CMD_WRITE: return "WRITE";
    case NBD_CMD_DISC: return "DISC";
    case NBD_CMD_FLUSH: return "FLUSH";
    case NBD_CMD_TRIM: return "TRIM";
    case NBD_CMD_CACHE: return "CACHE";
    case NBD_CMD_WRITE_ZEROES: return "WRITE_ZEROES";
    case NBD_CMD_BLOCK_STATUS: return "BLOCK_STATUS";
  }
  return "unknown command";
}

std::string_view option_name(uint32_t option) noexcept {
  switch (option) {
    case NBD_OPT_EXPORT_NAME: return "NBD_OPT_EXPORT_NAME";
    case NBD_OPT_ABORT: return "NBD_OPT_ABORT";
    case NBD_OPT_LIST: return "NBD_OPT_LIST";
    case NBD_OPT_STARTTLS: return "NBD_OPT_STARTTLS";
    case NBD_OPT_INFO: return "NBD_OPT_INFO";
    case NBD_OPT_GO: return "NBD_OPT_GO";
    case NBD_OPT_STRUCTURED_REPLY: return "NBD_OPT_STRUCTURED_REPLY";
    case NBD_OPT_LIST_META_CONTEXT: return "NBD_OPT_LIST_META_CONTEXT";
    case NBD_OPT_SET_META_CONTEXT: return "NBD_OPT_SET_META_CONTEXT";
    case NBD_OPT_EXTENDED_HEADERS: return "NBD_OPT_EXTENDED_HEADERS";
  }
  return "unknown option";
}

std::string_view reply_name(uint32_t reply) noexcept {
  switch (reply) {
    case NBD_REP_ACK: return "NBD_REP_ACK";
    case NBD_REP_SERVER: return "NBD_REP_SERVER";
    case NBD_REP_INFO: return "NBD_REP_INFO";
    case NBD_REP_ERR_UNSUP: return "NBD_REP_ERR_UNSUP";
    case NBD_REP_ERR_POLICY: return "NBD_REP_ERR_POLICY";
    case NBD_REP_ERR_INVALID: return "NBD_REP_ERR_INVALID";
    case NBD_REP_ERR_PLATFORM: return "NBD_REP_ERR_PLATFORM";
    case NBD_REP_ERR_TLS_REQD: return "NBD_REP_ERR_TLS_REQD";
    case NBD_REP_ERR_UNKNOWN: return "NBD_REP_ERR_UNKNOWN";
    case NBD_REP_ERR_SHUTDOWN: return "NBD_REP_ERR_SHUTDOWN";
    case NBD_REP_ERR_BLOCK_SIZE_REQD: return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case NBD_REP_ERR_TOO_BIG: return "NBD_REP_ERR_TOO_BIG";
  }
  return "unknown reply";
}

std::string_view error_name(uint32_t nbd_error) noexcept {
  switch (nbd_error) {
    case NBD_SUCCESS: return "success";
    case NBD_EPERM: return "EPERM";
    case NBD_EIO: return "EIO";
    case NBD_ENOMEM: return "ENOMEM";
    case NBD_EINVAL: return "EINVAL";
    case NBD_ENOSPC: return "ENOSPC";
    case NBD_EOVERFLOW: return "EOVERFLOW";
    case NBD_ENOTSUP: return "ENOTSUP";
    case NBD_ESHUTDOWN: return "ESHUTDOWN";
  }
  return "unknown error";
}

}  // namespace uvd::storage::nbd
