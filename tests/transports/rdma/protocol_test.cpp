// SPDX-License-Identifier: Apache-2.0
// The 3leaf wire format: round trips, exact layout, and refusal of every
// malformed message a hostile peer could send.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "transports/rdma/protocol.hpp"

using namespace uvd::rdma;

namespace {

std::vector<std::byte> buf() { return std::vector<std::byte>(msg_size); }

uint32_t le32_at(const std::vector<std::byte>& b, size_t off) {
  return static_cast<uint32_t>(b[off]) | static_cast<uint32_t>(b[off + 1]) << 8 |
         static_cast<uint32_t>(b[off + 2]) << 16 | static_cast<uint32_t>(b[off + 3]) << 24;
}

io_rpc sample_io(uint16_t nseg) {
  io_rpc r;
  r.hdr.opcode = OP_WRITE;
  r.hdr.epoch = 7;
  r.hdr.id = 0x1122334455667788ull;
  r.offset = 1ull << 40;
  r.length = nseg * 4096ull;
  r.flags = RPC_FUA;
  r.nseg = nseg;
  for (uint16_t i = 0; i < nseg; ++i) r.segs[i] = {0xdead0000ull + i, 512u * i, 4096};
  return r;
}

TEST(RdmaProtocol, IoRpcRoundTripsAndHasTheDocumentedLayout) {
  auto b = buf();
  io_rpc in = sample_io(3);
  size_t n = encode_io(in, b.data());
  ASSERT_EQ(n, hdr_size + io_body_size + 3 * seg_ref_size);
  EXPECT_EQ(le32_at(b, 0), msg_magic);
  EXPECT_EQ(le32_at(b, 8), n);          // length
  EXPECT_EQ(le32_at(b, 12), 7u);        // epoch
  EXPECT_EQ(le32_at(b, 16), 0x55667788u);  // id, low half first
  io_rpc out;
  ASSERT_TRUE(decode_io({b.data(), n}, &out));
  EXPECT_EQ(out.hdr.opcode, OP_WRITE);
  EXPECT_EQ(out.hdr.epoch, 7u);
  EXPECT_EQ(out.hdr.id, in.hdr.id);
  EXPECT_EQ(out.offset, in.offset);
  EXPECT_EQ(out.length, in.length);
  EXPECT_EQ(out.flags, RPC_FUA);
  ASSERT_EQ(out.nseg, 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(out.segs[i].handle, in.segs[i].handle);
    EXPECT_EQ(out.segs[i].offset, in.segs[i].offset);
    EXPECT_EQ(out.segs[i].length, in.segs[i].length);
  }
}

TEST(RdmaProtocol, EveryTruncationOfAnIoRpcIsRefused) {
  auto b = buf();
  size_t n = encode_io(sample_io(4), b.data());
  io_rpc out;
  for (size_t len = 0; len < n; ++len) EXPECT_FALSE(decode_io({b.data(), len}, &out)) << len;
  // A longer message than the header says is refused too.
  EXPECT_FALSE(decode_io({b.data(), n + 1}, &out));
}

TEST(RdmaProtocol, BadMagicVersionLengthAndSegmentCountAreRefused) {
  auto b = buf();
  size_t n = encode_io(sample_io(2), b.data());
  io_rpc out;
  auto flip = [&](size_t off, std::byte v) {
    auto c = b;
    c[off] = v;
    return decode_io({c.data(), n}, &out);
  };
  EXPECT_FALSE(flip(0, std::byte{0}));      // magic
  EXPECT_FALSE(flip(4, std::byte{2}));      // version 2
  EXPECT_FALSE(flip(8, std::byte{0}));      // length field
  EXPECT_FALSE(flip(hdr_size + 18, std::byte{3}));  // nseg 3 with 2 present
  auto r = flip(hdr_size + 18, std::byte{200});     // nseg past the limit
  ASSERT_FALSE(r);
  EXPECT_EQ(r.err().errnum(), E2BIG);
}

TEST(RdmaProtocol, OpenAndOpenReplyRoundTrip) {
  auto b = buf();
  open_rpc o;
  o.hdr.id = 9;
  o.flags = OPEN_READ_ONLY;
  o.name = "disk0";
  size_t n = encode_open(o, b.data());
  auto d = decode_open({b.data(), n});
  ASSERT_TRUE(d) << d.err().what();
  EXPECT_EQ(d->name, "disk0");
  EXPECT_EQ(d->flags, OPEN_READ_ONLY);
  EXPECT_EQ(d->hdr.id, 9u);

  open_reply rep;
  rep.hdr.id = 9;
  rep.block_size = 512;
  rep.size = 64ull << 20;
  rep.features = 5;
  rep.segment_size = 131072;
  rep.nsegs = max_pool_segments;
  rep.max_segs = 16;
  rep.epoch = 3;
  std::strcpy(rep.uuid, "01234567-89ab-8def-8123-456789abcdef");
  for (uint32_t i = 0; i < rep.nsegs; ++i) rep.pool[i] = {i * 77ull + 1, 0x7f0000000000ull + i * 131072ull, 42, 131072};
  n = encode_open_reply(rep, b.data());
  ASSERT_LE(n, msg_size);
  open_reply back;
  ASSERT_TRUE(decode_open_reply({b.data(), n}, &back));
  EXPECT_EQ(back.size, rep.size);
  EXPECT_EQ(back.epoch, 3u);
  EXPECT_STREQ(back.uuid, rep.uuid);
  ASSERT_EQ(back.nsegs, rep.nsegs);
  EXPECT_EQ(back.pool[127].handle, rep.pool[127].handle);
  EXPECT_EQ(back.pool[127].addr, rep.pool[127].addr);
  for (size_t len = 0; len < n; len += 7) EXPECT_FALSE(decode_open_reply({b.data(), len}, &back)) << len;
}

TEST(RdmaProtocol, OpenWithLyingNameLengthOrNulIsRefused) {
  auto b = buf();
  open_rpc o;
  o.name = "abc";
  size_t n = encode_open(o, b.data());
  auto c = b;
  c[hdr_size + 2] = std::byte{4};  // name_len 4, 3 bytes present
  EXPECT_FALSE(decode_open({c.data(), n}));
  c = b;
  c[hdr_size + 5] = std::byte{0};  // NUL inside the name
  EXPECT_FALSE(decode_open({c.data(), n}));
}

TEST(RdmaProtocol, ReplyCarriesOnlyZeroOrNegativeErrno) {
  auto b = buf();
  reply r;
  r.hdr.id = 5;
  r.status = -ESTALE;
  r.epoch = 4;
  size_t n = encode_reply(r, b.data());
  ASSERT_EQ(n, reply_size);
  auto d = decode_reply({b.data(), n});
  ASSERT_TRUE(d);
  EXPECT_EQ(d->status, -ESTALE);
  EXPECT_EQ(d->epoch, 4u);
  r.status = 5;
  n = encode_reply(r, b.data());
  EXPECT_FALSE(decode_reply({b.data(), n}));
}

TEST(RdmaProtocol, HelloAndAcceptRoundTrip) {
  std::byte h[hello_size];
  conn_hello in;
  in.queue_depth = 48;
  encode_hello(in, h);
  auto d = decode_hello(h);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->queue_depth, 48);
  EXPECT_EQ(d->max_version, protocol_version);
  EXPECT_FALSE(decode_hello({h, hello_size - 1}));
  conn_accept a;
  a.status = EBUSY;
  encode_accept(a, h);
  auto da = decode_accept(h);
  ASSERT_TRUE(da);
  EXPECT_EQ(da->status, EBUSY);
}

TEST(RdmaProtocol, ListReplyRoundTrips) {
  auto b = buf();
  std::vector<list_entry> all{{"a", "01234567-89ab-8def-8123-456789abcdef", true, 4096},
                              {"bb", "11234567-89ab-8def-8123-456789abcdef", false, 1 << 20}};
  size_t n = encode_list_reply(3, all, b.data());
  auto d = decode_list_reply({b.data(), n});
  ASSERT_TRUE(d) << d.err().what();
  EXPECT_EQ(d->first, 2u);
  ASSERT_EQ(d->second.size(), 2u);
  EXPECT_EQ(d->second[1].name, "bb");
  EXPECT_TRUE(d->second[0].read_only);
  EXPECT_EQ(d->second[1].size, 1u << 20);
}

// Random bytes must never decode into something out of bounds (ASan watches).
TEST(RdmaProtocol, RandomMessagesNeverReadOutOfBounds) {
  std::mt19937_64 rng(42);
  io_rpc io;
  open_reply rep;
  for (int i = 0; i < 20000; ++i) {
    size_t len = rng() % 200;
    std::vector<std::byte> m(len);
    for (auto& x : m) x = std::byte(rng());
    if (len >= hdr_size && rng() % 2) {  // a valid header over random bodies
      io_rpc h;
      h.hdr.opcode = static_cast<uint16_t>(rng() % 12);
      std::vector<std::byte> tmp(msg_size);
      encode_io(h, tmp.data());
      std::memcpy(m.data(), tmp.data(), hdr_size);
      uint32_t l = static_cast<uint32_t>(len);
      std::memcpy(m.data() + 8, &l, 4);
    }
    (void)decode_hdr(m);
    (void)decode_io(m, &io);
    (void)decode_open(m);
    (void)decode_open_reply(m, &rep);
    (void)decode_reply(m);
    (void)decode_list_reply(m);
    (void)decode_hello(m);
  }
}

}  // namespace
