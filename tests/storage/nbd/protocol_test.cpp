// SPDX-License-Identifier: Apache-2.0
#include "storage/nbd/protocol.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>

namespace uvd::storage::nbd {
namespace {

constexpr uint64_t kSize = 64ull << 20;

export_geometry rw_geometry() {
  export_geometry g;
  g.size = kSize;
  g.min_block = 512;
  g.tflags = make_transmission_flags(false, true, false, true);
  return g;
}

export_geometry ro_geometry() {
  export_geometry g = rw_geometry();
  g.tflags = make_transmission_flags(true, true, false, true);
  return g;
}

request req(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  request r;
  r.type = type;
  r.offset = offset;
  r.length = length;
  r.flags = flags;
  r.handle = 0x1122334455667788ull;
  return r;
}

void expect_error(const request_verdict& v, uint32_t error) {
  EXPECT_EQ(v.action, request_action::reply_error) << v.why;
  EXPECT_EQ(v.error, error) << error_name(v.error) << " instead of " << error_name(error) << ": " << v.why;
}

TEST(NbdProtocol, RequestRoundTrips) {
  request r = req(NBD_CMD_WRITE, 0x0102030405060708ull, 0x0a0b0c0d, NBD_CMD_FLAG_FUA);
  uint8_t wire[NBD_REQUEST_SIZE];
  encode_request(r, wire);
  EXPECT_EQ(load_be32(wire), NBD_REQUEST_MAGIC);
  EXPECT_EQ(wire[4], 0);  // flags, big-endian
  EXPECT_EQ(wire[5], 1);
  EXPECT_EQ(wire[7], NBD_CMD_WRITE);
  request back;
  ASSERT_TRUE(decode_request(wire, &back));
  EXPECT_EQ(back.type, r.type);
  EXPECT_EQ(back.flags, r.flags);
  EXPECT_EQ(back.handle, r.handle);
  EXPECT_EQ(back.offset, r.offset);
  EXPECT_EQ(back.length, r.length);
}

TEST(NbdProtocol, BadRequestMagicIsRejected) {
  uint8_t wire[NBD_REQUEST_SIZE];
  encode_request(req(NBD_CMD_READ, 0, 512), wire);
  wire[0] ^= 0x01;
  request r;
  EXPECT_FALSE(decode_request(wire, &r));
  // The reply magic is not a request magic either.
  store_be32(wire, NBD_SIMPLE_REPLY_MAGIC);
  EXPECT_FALSE(decode_request(wire, &r));
}

TEST(NbdProtocol, SimpleReplyEncoding) {
  uint8_t wire[NBD_SIMPLE_REPLY_SIZE];
  encode_simple_reply(wire, NBD_ENOSPC, 0xdeadbeefcafef00dull);
  EXPECT_EQ(load_be32(wire), NBD_SIMPLE_REPLY_MAGIC);
  EXPECT_EQ(load_be32(wire + 4), NBD_ENOSPC);
  EXPECT_EQ(load_be64(wire + 8), 0xdeadbeefcafef00dull);
}

TEST(NbdProtocol, ValidRequestsExecute) {
  auto g = rw_geometry();
  for (auto r : {req(NBD_CMD_READ, 0, 4096), req(NBD_CMD_WRITE, kSize - 512, 512),
                 req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_FUA), req(NBD_CMD_FLUSH, 0, 0),
                 req(NBD_CMD_FLUSH, 0, 0, NBD_CMD_FLAG_FUA), req(NBD_CMD_TRIM, 4096, 8192),
                 req(NBD_CMD_TRIM, 0, 512, NBD_CMD_FLAG_FUA), req(NBD_CMD_WRITE_ZEROES, 0, static_cast<uint32_t>(kSize)),
                 req(NBD_CMD_WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA),
                 req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_FUA), req(NBD_CMD_READ, 0, 32u << 20)}) {
    auto v = check_request(r, g);
    EXPECT_EQ(v.action, request_action::execute) << command_name(r.type) << ": " << v.why;
    EXPECT_EQ(v.payload, r.type == NBD_CMD_WRITE ? r.length : 0u);
  }
}

TEST(NbdProtocol, DiscIsASoftDisconnect) {
  EXPECT_EQ(check_request(req(NBD_CMD_DISC, 0, 0), rw_geometry()).action, request_action::soft_disconnect);
}

TEST(NbdProtocol, UnknownCommandIsEinval) {
  for (uint16_t t : {NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, uint16_t{8}, uint16_t{0x1234}, uint16_t{0xffff}})
    expect_error(check_request(req(t, 0, 512), rw_geometry()), NBD_EINVAL);
}

TEST(NbdProtocol, UnknownOrUnnegotiatedFlagIsEinval) {
  auto g = rw_geometry();
  expect_error(check_request(req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_DF), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_READ, 0, 512, 1u << 9), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_WRITE_ZEROES, 0, 512, NBD_CMD_FLAG_FAST_ZERO), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_REQ_ONE), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_NO_HOLE), g), NBD_EINVAL);
  g.tflags &= ~NBD_FLAG_SEND_FUA;
  expect_error(check_request(req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_FUA), g), NBD_EINVAL);
}

TEST(NbdProtocol, RefusedWriteStillCarriesItsPayload) {
  auto v = check_request(req(NBD_CMD_WRITE, 0, 4096, NBD_CMD_FLAG_DF), rw_geometry());
  expect_error(v, NBD_EINVAL);
  EXPECT_EQ(v.payload, 4096u);
}

TEST(NbdProtocol, WritesOnReadOnlyExportAreEperm) {
  auto g = ro_geometry();
  EXPECT_TRUE(g.tflags & NBD_FLAG_READ_ONLY);
  expect_error(check_request(req(NBD_CMD_WRITE, 0, 512), g), NBD_EPERM);
  expect_error(check_request(req(NBD_CMD_TRIM, 0, 512), g), NBD_EPERM);
  expect_error(check_request(req(NBD_CMD_WRITE_ZEROES, 0, 512), g), NBD_EPERM);
  // Even beyond the end: read-only is what the client needs to hear.
  expect_error(check_request(req(NBD_CMD_WRITE, kSize, 512), g), NBD_EPERM);
  EXPECT_EQ(check_request(req(NBD_CMD_READ, 0, 512), g).action, request_action::execute);
  EXPECT_EQ(check_request(req(NBD_CMD_FLUSH, 0, 0), g).action, request_action::execute);
}

TEST(NbdProtocol, OutOfRangeWritesAreEnospcOthersEinval) {
  auto g = rw_geometry();
  expect_error(check_request(req(NBD_CMD_WRITE, kSize, 512), g), NBD_ENOSPC);
  expect_error(check_request(req(NBD_CMD_WRITE, kSize - 512, 1024), g), NBD_ENOSPC);
  expect_error(check_request(req(NBD_CMD_WRITE_ZEROES, kSize - 512, 1024), g), NBD_ENOSPC);
  expect_error(check_request(req(NBD_CMD_READ, kSize, 512), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_READ, kSize - 512, 1024), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_TRIM, kSize - 512, 1024), g), NBD_EINVAL);
}

TEST(NbdProtocol, OffsetOverflowIsCaught) {
  auto g = rw_geometry();
  uint64_t huge = UINT64_MAX - 511;
  expect_error(check_request(req(NBD_CMD_READ, huge, 1024), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_WRITE, huge, 1024), g), NBD_ENOSPC);
  expect_error(check_request(req(NBD_CMD_WRITE_ZEROES, UINT64_MAX, UINT32_MAX), g), NBD_ENOSPC);
}

TEST(NbdProtocol, OversizeReadAndWriteAreEinval) {
  auto g = rw_geometry();
  expect_error(check_request(req(NBD_CMD_READ, 0, g.max_payload + 512), g), NBD_EINVAL);
  auto v = check_request(req(NBD_CMD_WRITE, 0, g.max_payload + 512), g);
  expect_error(v, NBD_EINVAL);
  EXPECT_EQ(v.payload, g.max_payload + 512);
}

TEST(NbdProtocol, WritePayloadTooBigToDropDisconnects) {
  auto g = rw_geometry();
  auto v = check_request(req(NBD_CMD_WRITE, 0, g.max_discard + 1), g);
  EXPECT_EQ(v.action, request_action::hard_disconnect);
  v = check_request(req(NBD_CMD_WRITE, 0, UINT32_MAX), g);
  EXPECT_EQ(v.action, request_action::hard_disconnect);
  // A READ has no payload: the same length is only an error reply.
  expect_error(check_request(req(NBD_CMD_READ, 0, UINT32_MAX), g), NBD_EINVAL);
}

TEST(NbdProtocol, ZeroLengthAndMisalignedAreEinval) {
  auto g = rw_geometry();
  expect_error(check_request(req(NBD_CMD_READ, 0, 0), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_WRITE, 0, 0), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_READ, 1, 512), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_WRITE, 0, 100), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_TRIM, 256, 512), g), NBD_EINVAL);
  g.min_block = 1;
  EXPECT_EQ(check_request(req(NBD_CMD_READ, 1, 100), g).action, request_action::execute);
}

TEST(NbdProtocol, FlushWithOffsetOrLengthIsEinval) {
  auto g = rw_geometry();
  expect_error(check_request(req(NBD_CMD_FLUSH, 512, 0), g), NBD_EINVAL);
  expect_error(check_request(req(NBD_CMD_FLUSH, 0, 512), g), NBD_EINVAL);
}

TEST(NbdProtocol, UnadvertisedCommandsAreEinval) {
  auto g = rw_geometry();
  g.tflags = make_transmission_flags(false, false, false, false);
  EXPECT_FALSE(g.tflags & NBD_FLAG_SEND_TRIM);
  expect_error(check_request(req(NBD_CMD_TRIM, 0, 512), g), NBD_EINVAL);
  g.tflags &= ~NBD_FLAG_SEND_WRITE_ZEROES;
  expect_error(check_request(req(NBD_CMD_WRITE_ZEROES, 0, 512), g), NBD_EINVAL);
  g.tflags &= ~NBD_FLAG_SEND_FLUSH;
  expect_error(check_request(req(NBD_CMD_FLUSH, 0, 0), g), NBD_EINVAL);
}

TEST(NbdProtocol, TransmissionFlags) {
  uint16_t rw = make_transmission_flags(false, true, true, true);
  EXPECT_EQ(rw, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES |
                    NBD_FLAG_SEND_TRIM | NBD_FLAG_ROTATIONAL | NBD_FLAG_CAN_MULTI_CONN);
  uint16_t ro = make_transmission_flags(true, true, false, false);
  EXPECT_EQ(ro, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_READ_ONLY);
}

TEST(NbdProtocol, ErrnoMapsToTheErrorsTheProtocolNames) {
  EXPECT_EQ(nbd_error_from_errno(0), NBD_SUCCESS);
  EXPECT_EQ(nbd_error_from_errno(-EROFS), NBD_EPERM);
  EXPECT_EQ(nbd_error_from_errno(EPERM), NBD_EPERM);
  EXPECT_EQ(nbd_error_from_errno(-EIO), NBD_EIO);
  EXPECT_EQ(nbd_error_from_errno(-ENOMEM), NBD_ENOMEM);
  EXPECT_EQ(nbd_error_from_errno(-ENOSPC), NBD_ENOSPC);
  EXPECT_EQ(nbd_error_from_errno(-EDQUOT), NBD_ENOSPC);
  EXPECT_EQ(nbd_error_from_errno(-EFBIG), NBD_ENOSPC);
  EXPECT_EQ(nbd_error_from_errno(-EINVAL), NBD_EINVAL);
  EXPECT_EQ(nbd_error_from_errno(-EOVERFLOW), NBD_EINVAL);
  EXPECT_EQ(nbd_error_from_errno(-ESHUTDOWN), NBD_ESHUTDOWN);
  // Anything else (a path gone, a timeout) is an I/O error, never a raw errno.
  EXPECT_EQ(nbd_error_from_errno(-ETIMEDOUT), NBD_EIO);
  EXPECT_EQ(nbd_error_from_errno(-ENODEV), NBD_EIO);
  EXPECT_EQ(nbd_error_from_errno(-ECONNRESET), NBD_EIO);
}

TEST(NbdProtocol, NamesForLogs) {
  EXPECT_EQ(command_name(NBD_CMD_WRITE_ZEROES), "WRITE_ZEROES");
  EXPECT_EQ(command_name(999), "unknown command");
  EXPECT_EQ(option_name(NBD_OPT_GO), "NBD_OPT_GO");
  EXPECT_EQ(reply_name(NBD_REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
  EXPECT_EQ(error_name(NBD_ENOSPC), "ENOSPC");
}

}  // namespace
}  // namespace uvd::storage::nbd
