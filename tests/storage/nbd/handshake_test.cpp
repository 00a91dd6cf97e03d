// SPDX-License-Identifier: Apache-2.0
#include "storage/nbd/handshake.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace uvd::storage::nbd {
namespace {

using bytes = std::vector<uint8_t>;

std::vector<export_desc> two_exports() {
  export_desc a;
  a.name = "a";
  a.description = "first disk";
  a.size = 64ull << 20;
  a.tflags = make_transmission_flags(false, true, false, true);
  a.min_block = 512;
  export_desc b;
  b.name = "b";
  b.size = 1ull << 30;
  b.tflags = make_transmission_flags(true, false, false, true);
  b.min_block = 4096;
  b.preferred_block = 65536;
  b.max_block = 1u << 20;
  return {a, b};
}

bytes be32(uint32_t v) {
  bytes b(4);
  store_be32(b.data(), v);
  return b;
}

bytes option(uint32_t opt, const bytes& data = {}, uint64_t magic = NBD_OPTS_MAGIC) {
  bytes b(NBD_OPTION_HEADER_SIZE);
  store_be64(b.data(), magic);
  store_be32(b.data() + 8, opt);
  store_be32(b.data() + 12, static_cast<uint32_t>(data.size()));
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

bytes info_data(const std::string& name, std::vector<uint16_t> infos) {
  bytes d = be32(static_cast<uint32_t>(name.size()));
  d.insert(d.end(), name.begin(), name.end());
  d.push_back(static_cast<uint8_t>(infos.size() >> 8));
  d.push_back(static_cast<uint8_t>(infos.size()));
  for (uint16_t i : infos) {
    d.push_back(static_cast<uint8_t>(i >> 8));
    d.push_back(static_cast<uint8_t>(i));
  }
  return d;
}

struct reply {
  uint32_t option, type;
  bytes data;
};

// Splits server output into option replies (after the greeting has been taken off).
std::vector<reply> parse_replies(const bytes& out, size_t from = 0) {
  std::vector<reply> r;
  size_t p = from;
  while (p + NBD_OPTION_REPLY_HEADER_SIZE <= out.size()) {
    EXPECT_EQ(load_be64(out.data() + p), NBD_REP_MAGIC);
    uint32_t len = load_be32(out.data() + p + 16);
    reply x{load_be32(out.data() + p + 8), load_be32(out.data() + p + 12), {}};
    x.data.assign(out.begin() + static_cast<long>(p + 20), out.begin() + static_cast<long>(p + 20 + len));
    r.push_back(std::move(x));
    p += 20 + len;
  }
  EXPECT_EQ(p, out.size()) << "trailing bytes in server output";
  return r;
}

class NbdHandshake : public ::testing::Test {
 protected:
  std::vector<export_desc> exports_ = two_exports();
  handshake hs_{exports_};
  bytes out_;

  void SetUp() override {
    hs_.greet(out_);
    out_.clear();
    feed(be32(NBD_FLAG_C_FIXED_NEWSTYLE));
  }
  size_t feed(const bytes& in) { return hs_.feed(in, out_); }
  std::vector<reply> take() {
    auto r = parse_replies(out_);
    out_.clear();
    return r;
  }
};

TEST(NbdHandshakeGreeting, IsFixedNewstyle) {
  auto ex = two_exports();
  handshake hs(ex);
  bytes out;
  hs.greet(out);
  ASSERT_EQ(out.size(), NBD_GREETING_SIZE);
  EXPECT_EQ(load_be64(out.data()), NBD_MAGIC);
  EXPECT_EQ(load_be64(out.data() + 8), NBD_OPTS_MAGIC);
  EXPECT_EQ(load_be16(out.data() + 16), NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
}

TEST(NbdHandshakeGreeting, UnknownClientFlagsClose) {
  auto ex = two_exports();
  handshake hs(ex);
  bytes out;
  hs.feed(be32(1u << 5), out);
  EXPECT_TRUE(hs.closed());
  EXPECT_FALSE(hs.clean_close());
  EXPECT_TRUE(out.empty());
}

TEST_F(NbdHandshake, GoReportsEverythingAndEntersTransmission) {
  feed(option(NBD_OPT_GO, info_data("a", {NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE})));
  auto r = take();
  ASSERT_EQ(r.size(), 5u);
  for (auto& x : r) EXPECT_EQ(x.option, NBD_OPT_GO);
  EXPECT_EQ(r[0].type, NBD_REP_INFO);
  ASSERT_EQ(r[0].data.size(), 12u);
  EXPECT_EQ(load_be16(r[0].data.data()), NBD_INFO_EXPORT);
  EXPECT_EQ(load_be64(r[0].data.data() + 2), 64ull << 20);
  EXPECT_EQ(load_be16(r[0].data.data() + 10), exports_[0].tflags);
  EXPECT_EQ(load_be16(r[1].data.data()), NBD_INFO_NAME);
  EXPECT_EQ(std::string(r[1].data.begin() + 2, r[1].data.end()), "a");
  EXPECT_EQ(load_be16(r[2].data.data()), NBD_INFO_DESCRIPTION);
  EXPECT_EQ(std::string(r[2].data.begin() + 2, r[2].data.end()), "first disk");
  EXPECT_EQ(load_be16(r[3].data.data()), NBD_INFO_BLOCK_SIZE);
  ASSERT_EQ(r[3].data.size(), 14u);
  EXPECT_EQ(load_be32(r[3].data.data() + 2), 512u);
  EXPECT_EQ(load_be32(r[3].data.data() + 6), 4096u);
  EXPECT_EQ(load_be32(r[3].data.data() + 10), 32u << 20);
  EXPECT_EQ(r[4].type, NBD_REP_ACK);
  EXPECT_TRUE(hs_.in_transmission());
  EXPECT_EQ(hs_.export_index(), 0u);
}

TEST_F(NbdHandshake, GoSendsExportAndBlockSizeEvenUnasked) {
  feed(option(NBD_OPT_GO, info_data("b", {})));
  auto r = take();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(load_be16(r[0].data.data()), NBD_INFO_EXPORT);
  EXPECT_TRUE(load_be16(r[0].data.data() + 10) & NBD_FLAG_READ_ONLY);
  EXPECT_EQ(load_be16(r[1].data.data()), NBD_INFO_BLOCK_SIZE);
  EXPECT_EQ(load_be32(r[1].data.data() + 2), 4096u);
  EXPECT_EQ(load_be32(r[1].data.data() + 6), 65536u);
  EXPECT_EQ(load_be32(r[1].data.data() + 10), 1u << 20);
  EXPECT_EQ(r[2].type, NBD_REP_ACK);
  EXPECT_EQ(hs_.export_index(), 1u);
}

TEST_F(NbdHandshake, EmptyNameIsTheDefaultExport) {
  feed(option(NBD_OPT_GO, info_data("", {})));
  auto r = take();
  ASSERT_FALSE(r.empty());
  EXPECT_EQ(r.back().type, NBD_REP_ACK);
  EXPECT_EQ(hs_.export_index(), 0u);
}

TEST_F(NbdHandshake, UnknownExportInGoIsErrUnknownAndNegotiationGoesOn) {
  feed(option(NBD_OPT_GO, info_data("nope", {})));
  auto r = take();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, NBD_REP_ERR_UNKNOWN);
  EXPECT_NE(std::string(r[0].data.begin(), r[0].data.end()).find("nope"), std::string::npos);
  EXPECT_EQ(hs_.state(), handshake::phase::option_header);
  feed(option(NBD_OPT_GO, info_data("b", {})));
  EXPECT_TRUE(hs_.in_transmission());
}

TEST_F(NbdHandshake, InfoDoesNotEndNegotiation) {
  feed(option(NBD_OPT_INFO, info_data("b", {NBD_INFO_NAME})));
  auto r = take();
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r.back().type, NBD_REP_ACK);
  EXPECT_EQ(r.back().option, NBD_OPT_INFO);
  EXPECT_FALSE(hs_.in_transmission());
  feed(option(NBD_OPT_INFO, info_data("zzz", {})));
  EXPECT_EQ(take()[0].type, NBD_REP_ERR_UNKNOWN);
}

TEST_F(NbdHandshake, MalformedGoIsErrInvalid) {
  // Too short for name length + count.
  feed(option(NBD_OPT_GO, bytes{0, 0, 0}));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  // Name length past the data.
  bytes d = info_data("a", {});
  store_be32(d.data(), 1000);
  feed(option(NBD_OPT_GO, d));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  // Request count that does not match the length.
  d = info_data("a", {NBD_INFO_NAME});
  d[6] = 7;
  feed(option(NBD_OPT_GO, d));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  d = info_data("a", {NBD_INFO_NAME});
  d.push_back(0);
  feed(option(NBD_OPT_GO, d));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  EXPECT_FALSE(hs_.closed());
  EXPECT_FALSE(hs_.in_transmission());
}

TEST_F(NbdHandshake, UnknownInfoRequestsAreIgnored) {
  feed(option(NBD_OPT_GO, info_data("a", {0x1234, NBD_INFO_EXPORT, 0xffff})));
  auto r = take();
  ASSERT_EQ(r.size(), 3u);  // EXPORT, BLOCK_SIZE, ACK
  EXPECT_EQ(r.back().type, NBD_REP_ACK);
}

TEST_F(NbdHandshake, ListNamesEveryExport) {
  feed(option(NBD_OPT_LIST));
  auto r = take();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, NBD_REP_SERVER);
  EXPECT_EQ(load_be32(r[0].data.data()), 1u);
  EXPECT_EQ(std::string(r[0].data.begin() + 4, r[0].data.end()), "afirst disk");
  EXPECT_EQ(std::string(r[1].data.begin() + 4, r[1].data.end()), "b");
  EXPECT_EQ(r[2].type, NBD_REP_ACK);
  feed(option(NBD_OPT_LIST, bytes{1, 2, 3}));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
}

TEST_F(NbdHandshake, ExportNameEndsNegotiation) {
  feed(option(NBD_OPT_EXPORT_NAME, bytes{'b'}));
  ASSERT_EQ(out_.size(), NBD_EXPORT_NAME_REPLY_SIZE);
  EXPECT_EQ(load_be64(out_.data()), 1ull << 30);
  EXPECT_EQ(load_be16(out_.data() + 8), exports_[1].tflags);
  for (size_t i = 10; i < out_.size(); ++i) EXPECT_EQ(out_[i], 0);
  EXPECT_TRUE(hs_.in_transmission());
  EXPECT_EQ(hs_.export_index(), 1u);
}

TEST(NbdHandshakeNoZeroes, ExportNameSkipsThePadding) {
  auto ex = two_exports();
  handshake hs(ex);
  bytes out;
  hs.feed(be32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES), out);
  hs.feed(option(NBD_OPT_EXPORT_NAME, {}), out);
  EXPECT_EQ(out.size(), 10u);
  EXPECT_TRUE(hs.in_transmission());
  EXPECT_EQ(hs.export_index(), 0u);
}

TEST_F(NbdHandshake, UnknownExportNameCloses) {
  feed(option(NBD_OPT_EXPORT_NAME, bytes{'x'}));
  EXPECT_TRUE(hs_.closed());
  EXPECT_FALSE(hs_.clean_close());
  EXPECT_TRUE(out_.empty());
}

TEST_F(NbdHandshake, AbortIsAckedAndClosesCleanly) {
  feed(option(NBD_OPT_ABORT));
  auto r = take();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, NBD_REP_ACK);
  EXPECT_TRUE(hs_.closed());
  EXPECT_TRUE(hs_.clean_close());
}

TEST_F(NbdHandshake, UnknownOptionsAreUnsupported) {
  for (uint32_t opt : {uint32_t{4}, uint32_t{12}, uint32_t{99}, uint32_t{0}, 0xffffffffu, NBD_OPT_EXTENDED_HEADERS}) {
    feed(option(opt, bytes{1, 2, 3, 4}));
    auto r = take();
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].type, NBD_REP_ERR_UNSUP) << opt;
    EXPECT_EQ(r[0].option, opt);
  }
  feed(option(NBD_OPT_GO, info_data("a", {})));
  EXPECT_TRUE(hs_.in_transmission());
}

TEST_F(NbdHandshake, TlsAndStructuredRepliesAreDeclined) {
  feed(option(NBD_OPT_STARTTLS));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_UNSUP);
  feed(option(NBD_OPT_STARTTLS, bytes{1}));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  feed(option(NBD_OPT_STRUCTURED_REPLY));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_UNSUP);
  feed(option(NBD_OPT_SET_META_CONTEXT, bytes{0, 0, 0, 0}));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
  feed(option(NBD_OPT_LIST_META_CONTEXT, bytes{0, 0, 0, 0}));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_INVALID);
}

TEST_F(NbdHandshake, BadOptionMagicCloses) {
  feed(option(NBD_OPT_GO, info_data("a", {}), 0x1122334455667788ull));
  EXPECT_TRUE(hs_.closed());
  EXPECT_FALSE(hs_.clean_close());
  EXPECT_TRUE(out_.empty());
}

TEST_F(NbdHandshake, OverlongOptionIsDroppedAndTooBig) {
  bytes big(20000, 0xab);  // past max_option_length, within max_option_discard
  feed(option(NBD_OPT_GO, big));
  auto r = take();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, NBD_REP_ERR_TOO_BIG);
  feed(option(NBD_OPT_GO, info_data("a", {})));
  EXPECT_TRUE(hs_.in_transmission());
}

TEST_F(NbdHandshake, HugeOptionLengthCloses) {
  bytes h(NBD_OPTION_HEADER_SIZE);
  store_be64(h.data(), NBD_OPTS_MAGIC);
  store_be32(h.data() + 8, NBD_OPT_LIST);
  store_be32(h.data() + 12, 0xfffffff0u);
  feed(h);
  EXPECT_TRUE(hs_.closed());
  // EXPORT_NAME cannot be refused with an error reply: too long closes at once.
  auto ex = two_exports();
  handshake hs(ex);
  bytes out;
  hs.feed(be32(1), out);
  store_be32(h.data() + 8, NBD_OPT_EXPORT_NAME);
  store_be32(h.data() + 12, 20000);
  hs.feed(h, out);
  EXPECT_TRUE(hs.closed());
}

TEST_F(NbdHandshake, LongExportNameIsTooBig) {
  feed(option(NBD_OPT_GO, info_data(std::string(5000, 'n'), {})));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_TOO_BIG);
}

TEST_F(NbdHandshake, TooManyOptionsClose) {
  for (int i = 0; i < 300 && !hs_.closed(); ++i) feed(option(99));
  EXPECT_TRUE(hs_.closed());
  EXPECT_EQ(hs_.options_seen(), handshake_limits{}.max_options + 1);
}

TEST_F(NbdHandshake, StopsAtTheEndOfTheHandshake) {
  bytes in = option(NBD_OPT_GO, info_data("a", {}));
  size_t go_len = in.size();
  in.insert(in.end(), {0x25, 0x60, 0x95, 0x13, 9, 9, 9});  // the start of a request
  EXPECT_EQ(feed(in), go_len);
  EXPECT_TRUE(hs_.in_transmission());
  EXPECT_EQ(feed(bytes{1, 2, 3}), 0u);
}

TEST_F(NbdHandshake, ByteAtATimeGivesTheSameAnswer) {
  bytes in = option(NBD_OPT_LIST);
  bytes go = option(NBD_OPT_GO, info_data("b", {NBD_INFO_NAME}));
  in.insert(in.end(), go.begin(), go.end());
  for (uint8_t b : in) EXPECT_EQ(feed(bytes{b}), 1u);
  auto r = take();
  ASSERT_EQ(r.size(), 3u + 4u);
  EXPECT_EQ(r[2].type, NBD_REP_ACK);
  EXPECT_EQ(r.back().type, NBD_REP_ACK);
  EXPECT_TRUE(hs_.in_transmission());
  EXPECT_EQ(hs_.export_index(), 1u);
}

TEST_F(NbdHandshake, ShuttingDownRefusesOptionsButAbort) {
  hs_.set_shutting_down();
  feed(option(NBD_OPT_GO, info_data("a", {})));
  EXPECT_EQ(take().at(0).type, NBD_REP_ERR_SHUTDOWN);
  EXPECT_FALSE(hs_.in_transmission());
  feed(option(NBD_OPT_ABORT));
  EXPECT_EQ(take().at(0).type, NBD_REP_ACK);
  EXPECT_TRUE(hs_.clean_close());
}

TEST(NbdHandshakeNoExports, EverythingIsUnknown) {
  std::vector<export_desc> none;
  handshake hs(none);
  bytes out;
  hs.feed(be32(1), out);
  hs.feed(option(NBD_OPT_GO, info_data("", {})), out);
  auto r = parse_replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, NBD_REP_ERR_UNKNOWN);
  out.clear();
  hs.feed(option(NBD_OPT_EXPORT_NAME), out);
  EXPECT_TRUE(hs.closed());
}

}  // namespace
}  // namespace uvd::storage::nbd
