// SPDX-License-Identifier: Apache-2.0
// The tap transport against the Linux kernel in a namespace the test makes:
// interface creation and settings, attaching to a persistent interface,
// real IP traffic with the kernel's stack, and clear errors.
#include <arpa/inet.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <thread>

#include "net/offload.hpp"
#include "net/veth.hpp"
#include "tests/net/net_testutil.hpp"
#include "transports/builtin.hpp"

using namespace uvd;
using namespace std::chrono_literals;

namespace {

class Tap : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::require_net_privileges()) GTEST_FAIL();
    reg_ = transports::make_default_registry();
    auto ns = test::netns::create("uvdtap");
    ASSERT_TRUE(ns) << ns.err().what();
    ns_ = std::move(*ns);
  }
  std::string ip(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"ip", "-n", ns_->name()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = test::run_cmd(argv);
    EXPECT_EQ(r.status, 0) << r.output;
    return r.output;
  }
  core::result<std::unique_ptr<net::Veth>> open(const std::string& uri, net::veth_options o = {}) {
    auto g = ns_->enter();
    return net::Veth::open(*reg_, uri, o);
  }

  std::unique_ptr<core::registry> reg_;
  std::unique_ptr<test::netns> ns_;
};

TEST_F(Tap, CreatesInterfaceWithMacMtuAndLink) {
  net::veth_options o;
  o.mac = *net::parse_mac("02:12:34:56:78:9a");
  o.mtu = 9000;
  auto v = open("tap:uvdt0", o);
  ASSERT_TRUE(v) << v.err().what();
  std::string link = ip({"link", "show", "uvdt0"});
  EXPECT_NE(link.find("02:12:34:56:78:9a"), std::string::npos) << link;
  EXPECT_NE(link.find("mtu 9000"), std::string::npos) << link;
  EXPECT_NE(link.find("LOWER_UP"), std::string::npos) << link;
  EXPECT_NE(link.find(",UP"), std::string::npos) << link;

  ASSERT_TRUE((*v)->set_mtu(1400));
  EXPECT_NE(ip({"link", "show", "uvdt0"}).find("mtu 1400"), std::string::npos);
  ASSERT_TRUE((*v)->set_mac(*net::parse_mac("02:00:00:00:00:77")));
  EXPECT_NE(ip({"link", "show", "uvdt0"}).find("02:00:00:00:00:77"), std::string::npos);
  ASSERT_TRUE((*v)->set_admin_up(false));
  link = ip({"link", "show", "uvdt0"});
  EXPECT_NE(link.find("NO-CARRIER"), std::string::npos) << "the kernel sees the carrier go: " << link;
  ASSERT_TRUE((*v)->set_admin_up(true));
  EXPECT_NE(ip({"link", "show", "uvdt0"}).find("LOWER_UP"), std::string::npos);

  v->reset();
  EXPECT_EQ(ip({"-o", "link", "show"}).find("uvdt0"), std::string::npos) << "an interface it made goes with it";
}

TEST_F(Tap, AttachesToPersistentInterfaceAndLeavesIt) {
  ip({"tuntap", "add", "dev", "uvdp0", "mode", "tap", "vnet_hdr"});
  {
    auto v = open("tap:uvdp0");
    ASSERT_TRUE(v) << v.err().what();
    EXPECT_NE(ip({"link", "show", "uvdp0"}).find((*v)->mac().to_string()), std::string::npos);
  }
  EXPECT_NE(ip({"-o", "link", "show"}).find("uvdp0"), std::string::npos) << "a persistent interface stays";
  ip({"tuntap", "add", "dev", "uvdtun0", "mode", "tun"});
  auto wrong = open("tap:uvdtun0");  // a TUN is not a TAP
  ASSERT_FALSE(wrong);
  EXPECT_NE(wrong.err().message.find("uvdtun0"), std::string::npos) << wrong.err().message;
  EXPECT_NE(wrong.err().message.find("exists with other flags"), std::string::npos) << wrong.err().message;
}

TEST_F(Tap, MultiQueueGivesOneFdPerQueue) {
  net::veth_options o;
  o.nqueues = 2;
  auto v = open("tap:uvdm0", o);
  ASSERT_TRUE(v) << v.err().what();
  EXPECT_EQ((*v)->nqueues(), 2u);
  EXPECT_GE((*v)->rx_fd(0), 0);
  EXPECT_GE((*v)->rx_fd(1), 0);
  EXPECT_NE((*v)->rx_fd(0), (*v)->rx_fd(1));
  std::string d = ip({"-d", "link", "show", "uvdm0"});
  EXPECT_NE(d.find("multi_queue"), std::string::npos) << d;
}

// ICMP echo from a host the Veth plays, answered by the kernel's own stack.
TEST_F(Tap, KernelAnswersPing) {
  for (const char* uri : {"tap:uvdk0?keep_mac=1", "tap:uvdk0?keep_mac=1&offload=0"}) {
    auto v = open(uri);
    ASSERT_TRUE(v) << v.err().what();
    auto& veth = **v;
    ip({"addr", "add", "10.77.0.1/24", "dev", "uvdk0"});
    ip({"neigh", "replace", "10.77.0.2", "lladdr", veth.mac().to_string(), "dev", "uvdk0"});
    auto addr = test::run_cmd(ns_->exec({"cat", "/sys/class/net/uvdk0/address"}));
    auto ifmac = net::parse_mac(addr.output.substr(0, 17));
    ASSERT_TRUE(ifmac) << addr.output;
    std::vector<uint8_t> f(14 + 20 + 8 + 56);
    std::memcpy(f.data(), ifmac->data(), 6);
    std::memcpy(f.data() + 6, veth.mac().data(), 6);
    net::store_be16(f.data() + 12, net::ethertype_ipv4);
    uint8_t* iph = f.data() + 14;
    iph[0] = 0x45;
    net::store_be16(iph + 2, 84);
    iph[8] = 64;
    iph[9] = 1;
    uint8_t addrs[8] = {10, 77, 0, 2, 10, 77, 0, 1};
    std::memcpy(iph + 12, addrs, 8);
    net::store_be16(iph + 10, static_cast<uint16_t>(~net::ones_sum(iph, 20)));
    uint8_t* icmp = iph + 20;
    icmp[0] = 8;
    net::store_be16(icmp + 4, 0x4242);
    net::store_be16(icmp + 6, 1);
    for (int i = 0; i < 56; ++i) icmp[8 + i] = static_cast<uint8_t>(i);
    net::store_be16(icmp + 2, static_cast<uint16_t>(~net::ones_sum(icmp, 64)));
    core::veth_frame d{.data = f.data(), .len = static_cast<uint32_t>(f.size())};
    ASSERT_EQ(veth.tx_burst(0, &d), 1u);
    auto got = test::receive_frames(veth, 1, 3s, [](const uint8_t* p, uint32_t len) {
      return len >= 42 && net::frame_ethertype(p) == net::ethertype_ipv4 && p[23] == 1 && p[34] == 0;
    });
    ASSERT_EQ(got.size(), 1u) << uri << ": no echo reply from the kernel";
    auto& r = got[0].bytes;
    EXPECT_EQ(net::load_be16(r.data() + 38), 0x4242);
    EXPECT_TRUE(std::equal(r.begin() + 42, r.end(), f.begin() + 42)) << "echo payload";
    EXPECT_EQ(net::ones_sum(r.data() + 34, static_cast<uint32_t>(r.size() - 34)), 0xffff) << "ICMP checksum";
    v->reset();
  }
}

// With offload on, the kernel hands over UDP with the checksum left to us.
TEST_F(Tap, KernelUdpArrivesWithUsableChecksum) {
  for (const char* uri : {"tap:uvdu0?keep_mac=1", "tap:uvdu0?keep_mac=1&offload=0"}) {
    auto v = open(uri);
    ASSERT_TRUE(v) << v.err().what();
    auto& veth = **v;
    ip({"addr", "add", "10.78.0.1/24", "dev", "uvdu0"});
    ip({"neigh", "replace", "10.78.0.2", "lladdr", veth.mac().to_string(), "dev", "uvdu0"});
    std::thread sender([&] {
      auto g = ns_->enter();
      int s = ::socket(AF_INET, SOCK_DGRAM, 0);
      sockaddr_in to{};
      to.sin_family = AF_INET;
      to.sin_port = htons(9999);
      inet_pton(AF_INET, "10.78.0.2", &to.sin_addr);
      char msg[1000];
      std::memset(msg, 'u', sizeof msg);
      ::sendto(s, msg, sizeof msg, 0, reinterpret_cast<sockaddr*>(&to), sizeof to);
      ::close(s);
    });
    sender.join();
    auto got = test::receive_frames(veth, 1, 3s, [](const uint8_t* p, uint32_t len) {
      return len >= 42 && net::frame_ethertype(p) == net::ethertype_ipv4 && p[23] == 17;
    });
    ASSERT_EQ(got.size(), 1u) << uri;
    auto& f = got[0];
    if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {
      ASSERT_EQ(net::finish_csum(f.bytes.data(), static_cast<uint32_t>(f.bytes.size()), f.csum_start, f.csum_offset),
                0);
    }
    EXPECT_TRUE(net::verify_csums(f.bytes.data(), static_cast<uint32_t>(f.bytes.size())));
    v->reset();
  }
}

TEST_F(Tap, MissingCloneDeviceIsAClearError) {
  auto v = open("tap:uvdx0?dev=/nonexistent/tun");
  ASSERT_FALSE(v);
  EXPECT_NE(v.err().message.find("missing"), std::string::npos) << v.err().message;
  EXPECT_NE(v.err().message.find("modprobe tun"), std::string::npos) << v.err().message;
}

TEST_F(Tap, MissingPrivilegeIsAClearError) {
  std::string message;
  // Capabilities are per thread: drop CAP_NET_ADMIN in a thread of our own.
  std::thread t([&] {
    auto g = ns_->enter();
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (::syscall(SYS_capget, &hdr, data) != 0) return;
    data[0].effective &= ~(1u << CAP_NET_ADMIN);
    if (::syscall(SYS_capset, &hdr, data) != 0) return;
    auto v = net::Veth::open(*reg_, "tap:uvdn0", {});
    message = v ? "opened without CAP_NET_ADMIN" : v.err().message;
  });
  t.join();
  EXPECT_NE(message.find("CAP_NET_ADMIN"), std::string::npos) << message;
}

}  // namespace
