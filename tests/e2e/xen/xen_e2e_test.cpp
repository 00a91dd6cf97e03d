// SPDX-License-Identifier: Apache-2.0
// Real Xen: Debian's Xen 4.17 booting Debian's kernel as PV dom0 under qemu TCG
// (tests/e2e/xen/xenguest.py), our blkif ends on the real grant table, event channels
// and xenstore, and Linux's own xen-blkfront and xen-blkback as their peers. Every
// check reads what the guest wrote back; any failure prints the dom0 console.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tests/testutil.hpp"

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct dom0_run {
  cmd_result cmd;
  std::string out;  // what the script left in /out
};

// Boots Xen + dom0 and runs script (a file) there with our binaries copied in.
dom0_run run_dom0(const std::string& name, const std::vector<std::string>& bins, const std::string& script,
                  const std::vector<std::string>& env, int guest_timeout_s) {
  dom0_run r;
  std::string base = build_dir() + "/xen-runs/" + name;
  r.out = base + "/dom0";
  std::string python = need_tool("python3", "python3");
  std::string qemu = need_tool("qemu-system-x86_64", "qemu-system-x86");
  if (python.empty() || qemu.empty()) return r;
  std::vector<std::string> argv{python, source_dir() + "/tests/e2e/xen/xenguest.py", "run", "--out", base,
                                "--timeout", std::to_string(guest_timeout_s), "--script", script};
  for (const auto& b : bins) argv.insert(argv.end(), {"--bin", b});
  for (const auto& e : env) argv.insert(argv.end(), {"--env", e});
  r.cmd = run_cmd(argv, std::chrono::seconds(guest_timeout_s + 120));
  return r;
}

// <testsuites tests="N" failures="F" disabled="D" errors="E" ... > of gtest's XML output.
int xml_count(const std::string& xml, const std::string& attr) {
  std::smatch m;
  if (!std::regex_search(xml, m, std::regex("<testsuites[^>]*\\b" + attr + "=\"([0-9]+)\""))) return -1;
  return std::stoi(m[1]);
}

// The storage conformance suite, target xen_real: blkfront -> grants by gntalloc,
// mapped by gntdev, an interdomain event channel and the xenstore handshake ->
// blkback -> a file, both ends in dom0. On the host the same target skips.
TEST(XenDom0, StorageConformanceOverRealXen) {
  std::string conf = UVD_CONFORMANCE_BIN;
  std::filesystem::create_directories(build_dir() + "/xen-runs");
  std::string script = build_dir() + "/xen-runs/conformance.sh";
  {
    std::ofstream s(script);
    s << conf << " --gtest_filter='*xen_real*' --gtest_output=xml:/out/conformance.xml\n";
  }
  auto r = run_dom0("conformance", {conf}, script, {}, 480);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  std::string xml = slurp(r.out + "/conformance.xml");
  ASSERT_FALSE(xml.empty()) << "no conformance.xml from dom0\n" << r.cmd.output;
  // Every case ran for real: none skipped (a skip means real Xen was not reachable).
  EXPECT_GE(xml_count(xml, "tests"), 10) << xml;
  EXPECT_EQ(xml_count(xml, "failures"), 0) << xml;
  EXPECT_EQ(xml_count(xml, "errors"), 0) << xml;
  EXPECT_EQ(xml.find("<skipped"), std::string::npos) << "xen_real skipped inside dom0:\n" << xml;
}

// Linux as the peer (tests/e2e/xen/interop.sh): xen-blkfront over our back end, and our
// front end over xen-blkback; ext4 made, copied and checked through each.
TEST(XenInterop, LinuxBlkfrontAndBlkbackAsPeers) {
  std::string uvd = UVD_TOOL_BIN;
  // Our back end offers 256 indirect segments, so Linux blkfront sends indirect
  // requests (and checks that each answer carries the inner operation).
  auto r = run_dom0("interop", {uvd}, source_dir() + "/tests/e2e/xen/interop.sh",
                    {"UVD_BIN=" + uvd, "XEN_BACK_INDIRECT=256"}, 420);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  EXPECT_EQ(slurp(r.out + "/a.result"), "pass\n") << r.cmd.output;
  EXPECT_EQ(slurp(r.out + "/b.result"), "pass\n") << r.cmd.output;
  // A: the kernel's front end negotiated with our back end through xenstore.
  std::string afront = slurp(r.out + "/a-frontend.txt");
  EXPECT_NE(afront.find("/ring-ref"), std::string::npos) << afront;
  EXPECT_NE(afront.find("/event-channel"), std::string::npos) << afront;
  EXPECT_NE(afront.find("/state = \"4\""), std::string::npos) << afront;
  // e2fsck -fn ran every pass (the script already failed on any error it found).
  std::string afsck = slurp(r.out + "/a-fsck-file.txt");
  EXPECT_NE(afsck.find("Pass 5"), std::string::npos) << afsck;
  EXPECT_NE(afsck.find("xenblk: "), std::string::npos) << afsck;
  std::string log = slurp(r.out + "/xen-back.log");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex("([0-9]+) requests, ([0-9]+) errors"))) << log;
  EXPECT_GT(std::stoll(m[1]), 100) << log;  // mke2fs, e2fsck and dd went through our back end
  EXPECT_EQ(m[2], "0") << log;
  // B: our front end negotiated with the kernel's back end, and the data is on its device.
  std::string bfront = slurp(r.out + "/b-frontend.txt");
  EXPECT_NE(bfront.find("/ring-ref"), std::string::npos) << bfront;
  std::string bback = slurp(r.out + "/b-backend.txt");
  EXPECT_NE(bback.find("/state = \"4\""), std::string::npos) << bback;
  EXPECT_NE(bback.find("/sectors = \"131072\""), std::string::npos) << bback;
  std::string bfsck = slurp(r.out + "/b-fsck-loop.txt");
  EXPECT_NE(bfsck.find("Pass 5"), std::string::npos) << bfsck;
  EXPECT_NE(bfsck.find("blkback: "), std::string::npos) << bfsck;
  EXPECT_EQ(slurp(r.out + "/b-hello.txt"), "written through a Xen block ring\n");
}

// The veth conformance suite, target xen_real: two netif front ends (vif 0 and 1
// of dom0) -> tx/rx grant rings, interdomain event channels and the xenstore
// handshake -> our vif back end, whose interfaces are ports of the netback
// switch; frames cross netfront -> switch -> netfront, all in dom0.
TEST(XenDom0, VethConformanceOverRealXen) {
  std::string conf = UVD_VETH_CONFORMANCE_BIN;
  std::filesystem::create_directories(build_dir() + "/xen-runs");
  std::string script = build_dir() + "/xen-runs/veth-conformance.sh";
  {
    std::ofstream s(script);
    s << conf << " --gtest_filter='*xen_real*' --gtest_output=xml:/out/veth-conformance.xml\n";
  }
  auto r = run_dom0("veth-conformance", {conf}, script, {}, 480);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  std::string xml = slurp(r.out + "/veth-conformance.xml");
  ASSERT_FALSE(xml.empty()) << "no veth-conformance.xml from dom0\n" << r.cmd.output;
  EXPECT_GE(xml_count(xml, "tests"), 10) << xml;
  EXPECT_EQ(xml_count(xml, "failures"), 0) << xml;
  EXPECT_EQ(xml_count(xml, "errors"), 0) << xml;
  EXPECT_EQ(xml.find("<skipped"), std::string::npos) << "xen_real skipped inside dom0:\n" << xml;
}

// The kernel pings across our netif ends (tests/e2e/xen/netif_ping.sh): TAP in one
// namespace -> `uvd veth` (netfront) -> real grant rings -> `uvd xen-back --hv xen`
// (vif back end on the netback switch) -> netfront -> TAP in another namespace.
TEST(XenDom0, PingThroughNetif) {
  std::string uvd = UVD_TOOL_BIN;
  auto r = run_dom0("netif-ping", {uvd}, source_dir() + "/tests/e2e/xen/netif_ping.sh", {"UVD_BIN=" + uvd}, 300);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  EXPECT_EQ(slurp(r.out + "/ping.result"), "pass\n") << r.cmd.output;
  std::string ping = slurp(r.out + "/ping.txt");
  // busybox: "5 packets received"; iputils: "5 received"
  EXPECT_TRUE(std::regex_search(ping, std::regex(", 5 (packets )?received, 0% packet loss"))) << ping;
  std::string large = slurp(r.out + "/ping-large.txt");
  EXPECT_TRUE(std::regex_search(large, std::regex(", 3 (packets )?received, 0% packet loss"))) << large;
  // Both netfronts negotiated with our back end through xenstore.
  std::string back = slurp(r.out + "/backend.txt");
  EXPECT_NE(back.find("/0/state = \"4\""), std::string::npos) << back;
  EXPECT_NE(back.find("/1/state = \"4\""), std::string::npos) << back;
  std::string front = slurp(r.out + "/frontend.txt");
  EXPECT_NE(front.find("/tx-ring-ref"), std::string::npos) << front;
  EXPECT_NE(front.find("/rx-ring-ref"), std::string::npos) << front;
}

// Linux's own xen-netfront as the peer of our vif back end (tests/e2e/xen/netfront_interop.sh):
// two Linux netfront interfaces, each in a namespace, joined by `uvd xen-back --hv xen`
// (the netback switch) over real grant rings, with checksum offload and GSO.
TEST(XenInterop, LinuxNetfrontAsPeer) {
  std::string uvd = UVD_TOOL_BIN;
  auto r = run_dom0("netfront-interop", {uvd}, source_dir() + "/tests/e2e/xen/netfront_interop.sh",
                    {"UVD_BIN=" + uvd}, 300);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  EXPECT_EQ(slurp(r.out + "/netfront.result"), "pass\n") << r.cmd.output;
  std::string ping = slurp(r.out + "/ping.txt");
  EXPECT_TRUE(std::regex_search(ping, std::regex(", 5 (packets )?received, 0% packet loss"))) << ping;
  std::string large = slurp(r.out + "/ping-large.txt");
  for (int seq = 0; seq < 3; ++seq)
    EXPECT_NE(large.find("1408 bytes from 10.77.0.1: seq=" + std::to_string(seq) + " "), std::string::npos) << large;
  // Linux netfront asked for the offloads our back end offered.
  std::string front = slurp(r.out + "/frontend.txt");
  for (const char* k : {"/feature-sg = \"1\"", "/feature-gso-tcpv4 = \"1\"", "/feature-rx-notify = \"1\"",
                        "/request-rx-copy = \"1\""})
    EXPECT_NE(front.find(k), std::string::npos) << k << "\n" << front;
  std::string back = slurp(r.out + "/backend.txt");
  EXPECT_NE(back.find("/0/state = \"4\""), std::string::npos) << back;
  EXPECT_NE(back.find("/1/state = \"4\""), std::string::npos) << back;
  // The switch refused nothing Linux sent (xen-back prints its counters on SIGTERM).
  std::string log = slurp(r.out + "/xen-back.log");
  EXPECT_NE(log.find("xen-vif0.1"), std::string::npos) << log;
  EXPECT_FALSE(std::regex_search(log, std::regex("rx_bad_(offload|msg)=[1-9]"))) << log;
  // Linux's TCP went through as large segments: frames from vif 0/0 average over a 1514-byte frame.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex("name=xen-vif0.0 [^\n]* rx_frames=([0-9]+) rx_bytes=([0-9]+)")))
      << log;
  uint64_t frames = std::stoull(m[1]), bytes = std::stoull(m[2]);
  EXPECT_GT(bytes, 4u << 20);
  EXPECT_GT(bytes, frames * 1514) << "no GSO frame crossed the switch";
}

}  // namespace
}  // namespace uvd::test
