// SPDX-License-Identifier: Apache-2.0
// The pcap transport: traces that tcpdump reads, replay of captures in both
// byte orders, and hostile records dropped and counted.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "net/veth.hpp"
#include "tests/net/net_testutil.hpp"
#include "tests/testutil.hpp"
#include "transports/builtin.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

const net::mac_addr A{{0x02, 0, 0, 0, 0, 1}}, B{{0x02, 0, 0, 0, 0, 2}};

uint32_t sw(uint32_t v, bool swap) { return swap ? __builtin_bswap32(v) : v; }
uint16_t sw16(uint16_t v, bool swap) { return swap ? static_cast<uint16_t>(v << 8 | v >> 8) : v; }

struct capture {
  std::string bytes;
  bool swap;
  explicit capture(bool swapped = false, uint32_t magic = 0xa1b2c3d4) : swap(swapped) {
    put32(magic);
    put16(2);
    put16(4);
    put32(0);
    put32(0);
    put32(65535);
    put32(1);
  }
  void put32(uint32_t v) {
    v = sw(v, swap);
    bytes.append(reinterpret_cast<const char*>(&v), 4);
  }
  void put16(uint16_t v) {
    v = sw16(v, swap);
    bytes.append(reinterpret_cast<const char*>(&v), 2);
  }
  void record(const std::vector<uint8_t>& f, uint32_t orig = 0, uint32_t claim = 0, uint32_t sec = 1,
              uint32_t frac = 2) {
    put32(sec);
    put32(frac);
    put32(claim ? claim : static_cast<uint32_t>(f.size()));
    put32(orig ? orig : static_cast<uint32_t>(f.size()));
    bytes.append(reinterpret_cast<const char*>(f.data()), f.size());
  }
  void save(const std::string& path) { std::ofstream(path, std::ios::binary) << bytes; }
};

class Pcap : public ::testing::Test {
 protected:
  void SetUp() override { reg_ = transports::make_default_registry(); }
  std::unique_ptr<net::Veth> open(const std::string& uri) {
    auto v = net::Veth::open(*reg_, uri);
    EXPECT_TRUE(v) << v.err().what();
    return v ? std::move(*v) : nullptr;
  }
  test::temp_dir dir_;
  std::unique_ptr<core::registry> reg_;
};

TEST_F(Pcap, ReplayDropsAndCountsBadRecords) {
  capture c;
  c.record(test::make_test_frame(60, B, A, 1));
  c.record(std::vector<uint8_t>(10, 0xee));                        // undersize
  c.record(std::vector<uint8_t>(70000, 0xee));                     // oversize
  c.record(test::make_test_frame(50, B, A, 9), 100);               // captured short of the frame
  c.record(test::make_test_frame(100, B, A, 2));
  c.record(test::make_test_frame(20, B, A, 3), 200, 200);          // cut off by the end of the file
  c.save(dir_.file("in.pcap"));
  auto v = open("pcap:?in=" + dir_.file("in.pcap"));
  ASSERT_TRUE(v);
  auto got = test::receive_frames(*v, 10, 500ms);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(test::check_test_frame(got[0].bytes.data(), 60, 1));
  EXPECT_TRUE(test::check_test_frame(got[1].bytes.data(), 100, 2));
  auto s = v->stats();
  EXPECT_EQ(s.rx_errors, 4u) << s.to_string();
  EXPECT_EQ(s.rx_packets, 2u);
}

TEST_F(Pcap, ReplaysOtherByteOrderAndNanosecondCaptures) {
  for (auto [swapped, magic] : {std::pair{true, 0xa1b2c3d4u}, std::pair{false, 0xa1b23c4du}}) {
    capture c(swapped, magic);
    for (uint32_t i = 0; i < 5; ++i) c.record(test::make_test_frame(64 + i, B, A, i));
    c.save(dir_.file("o.pcap"));
    auto v = open("pcap:?in=" + dir_.file("o.pcap"));
    ASSERT_TRUE(v);
    auto got = test::receive_frames(*v, 5, 1s);
    ASSERT_EQ(got.size(), 5u);
    for (uint32_t i = 0; i < 5; ++i) EXPECT_TRUE(test::check_test_frame(got[i].bytes.data(), 64 + i, i));
  }
}

// speed= replays at the recorded pace: frames recorded 0, 150 and 400 ms
// apart arrive no sooner than that (divided by the speed), in order.
TEST_F(Pcap, PacedReplayKeepsTheRecordedGaps) {
  capture c;
  c.record(test::make_test_frame(60, B, A, 0), 0, 0, 100, 0);
  c.record(test::make_test_frame(60, B, A, 1), 0, 0, 100, 150000);
  c.record(test::make_test_frame(60, B, A, 2), 0, 0, 100, 400000);
  c.save(dir_.file("paced.pcap"));
  for (double speed : {1.0, 2.0}) {
    auto v = open("pcap:?in=" + dir_.file("paced.pcap") + "&speed=" + std::to_string(speed));
    ASSERT_TRUE(v);
    auto start = std::chrono::steady_clock::now();
    std::vector<double> at;
    for (uint32_t i = 0; i < 3; ++i) {
      auto got = test::receive_frames(*v, 1, 5s);
      ASSERT_EQ(got.size(), 1u) << "frame " << i << " at speed " << speed;
      EXPECT_TRUE(test::check_test_frame(got[0].bytes.data(), 60, i));
      at.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    EXPECT_GE(at[1], 150 / speed * 0.95) << "second frame came too early at speed " << speed;
    EXPECT_GE(at[2], 400 / speed * 0.95) << "third frame came too early at speed " << speed;
  }
  EXPECT_FALSE(net::Veth::open(*reg_, "pcap:?in=" + dir_.file("paced.pcap") + "&speed=-1"));
}

TEST_F(Pcap, NotACaptureIsCountedNotReplayed) {
  std::ofstream(dir_.file("junk")) << "this is not a capture file at all, not even close";
  auto v = open("pcap:?in=" + dir_.file("junk"));
  ASSERT_TRUE(v);
  EXPECT_TRUE(test::receive_frames(*v, 1, 200ms).empty());
  EXPECT_EQ(v->stats().rx_errors, 1u);
}

TEST_F(Pcap, TraceIsReadableByTcpdumpAndReplaysIntact) {
  std::string tcpdump = test::need_tool("tcpdump", "tcpdump");
  ASSERT_FALSE(tcpdump.empty());
  std::string file = dir_.file("trace.pcap");
  std::vector<std::vector<uint8_t>> frames;
  for (uint32_t i = 0; i < 10; ++i) frames.push_back(test::make_test_frame(60 + i * 100, B, A, i));
  {
    auto v = open("pcap://" + file);
    ASSERT_TRUE(v);
    ASSERT_EQ(test::send_frames(*v, frames), frames.size());
    // Large segments are cut before they are written: a trace holds wire frames.
    core::veth_frame d{};
    auto tcp = test::make_tcp4_frame(B, A, 5000, 1, &d, 1448);
    ASSERT_EQ(v->tx_burst(0, &d), 1u);
  }
  auto r = test::run_cmd({tcpdump, "-nn", "-e", "-r", file});
  ASSERT_EQ(r.status, 0) << r.output;
  size_t lines = 0;
  for (char ch : r.output) lines += ch == '\n';
  EXPECT_GE(lines, 10u + 4u) << r.output;
  EXPECT_NE(r.output.find("02:00:00:00:00:01 > 02:00:00:00:00:02"), std::string::npos) << r.output;
  auto v = open("pcap:?in=" + file);
  auto got = test::receive_frames(*v, 14, 1s);
  ASSERT_EQ(got.size(), 14u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(got[i].bytes, frames[i]);
}

TEST_F(Pcap, UnwritableTargetIsAClearError) {
  auto v = net::Veth::open(*reg_, "pcap:///nonexistent/dir/x.pcap");
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("cannot create /nonexistent/dir/x.pcap"), std::string::npos) << v.err().message;
}

// Each network transport also builds as a plugin that a bare registry loads.
TEST(NetPlugins, LoadIntoABareRegistry) {
  for (const char* path : {UVD_PLUGIN_TAP, UVD_PLUGIN_DAEMON, UVD_PLUGIN_PCAP}) {
    core::registry reg;
    ASSERT_TRUE(reg.load_plugin(path)) << path;
  }
  core::registry reg;
  ASSERT_TRUE(reg.load_plugin(UVD_PLUGIN_PCAP));
  test::temp_dir dir;
  auto v = net::Veth::open(reg, "pcap://" + dir.file("p.pcap"));
  ASSERT_TRUE(v) << v.err().what();
  EXPECT_EQ((*v)->transport_name(), "pcap");
  auto not_storage = reg.vstore("pcap");
  EXPECT_FALSE(not_storage);
}

}  // namespace
