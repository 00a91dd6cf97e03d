// SPDX-License-Identifier: Apache-2.0
// Soft-RoCE for real: Debian's kernel with rdma_rxe in qemu TCG guests built by the guest
// harness (tests/e2e/guest), rping from rdma-core with data verification between two rxe
// devices. Passes only if the transfer happened and crossed both devices (their packet
// counters moved); any failure prints the guest console.
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tests/testutil.hpp"

namespace uvd::test {
namespace {

using namespace std::chrono_literals;

constexpr int rounds = 20;
// Both ends need the same -S: the server registers its RDMA READ buffer with its own size.
const std::string size = " -S 512";

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// rping prints one "ping data: rdma-ping-N: ..." line per verified round (-v -V).
int count_lines(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) ++n;
  return n;
}

// A counter from `rdma statistic show link DEV/1` saved by the guest script.
int64_t counter(const std::string& stats, const std::string& name) {
  std::smatch m;
  if (!std::regex_search(stats, m, std::regex("\\b" + name + " ([0-9]+)"))) return -1;
  return std::stoll(m[1]);
}

struct guest_run {
  cmd_result cmd;
  std::string out;  // results folder: out/<guest>/...
};

// Runs the harness; its output (the console of a failed guest included) is printed on failure.
guest_run run_guest(const std::string& name, const std::vector<std::string>& args) {
  guest_run r;
  r.out = std::string(UVD_GUEST_BUILD_DIR) + "/guest-runs/" + name;
  std::string python = need_tool("python3", "python3");
  need_tool("qemu-system-x86_64", "qemu-system-x86");
  if (python.empty()) return r;
  // the package cache lives in this build tree and outlives the run
  std::vector<std::string> argv{python, UVD_GUEST_TOOL, "run", "--out", r.out, "--timeout", "240",
                                "--cache", std::string(UVD_GUEST_BUILD_DIR) + "/guest-cache"};
  argv.insert(argv.end(), args.begin(), args.end());
  r.cmd = run_cmd(argv, 290s);
  return r;
}

// Script pieces: counters of an rxe device into a file before and after.
std::string save_stats(const std::string& dev, const std::string& file) {
  return "rdma statistic show link " + dev + "/1 > " + file + "\n";
}

TEST(RdmaGuest, RpingBetweenTwoRxeDevicesOfOneGuest) {
  std::string script =
      "rping -s -a \"$UVD_RDMA_PEER_ADDR\" -v" + size + " -C " + std::to_string(rounds) + " > server.log 2>&1 &\n"
      "server=$!\n"
      "i=0; until rdma res show cm_id | grep -q LISTEN; do i=$((i+1)); [ $i -lt 100 ]; sleep 0.1; done\n" +
      save_stats("rxe_a", "a.before") + save_stats("rxe_b", "b.before") +
      "rping -c -a \"$UVD_RDMA_PEER_ADDR\" -I \"$UVD_RDMA_ADDR\" -v -V" + size + " -C " + std::to_string(rounds) +
      " > client.log 2>&1\n"
      "wait $server\n" +
      save_stats("rxe_a", "a.after") + save_stats("rxe_b", "b.after") +
      "cat /sys/class/net/veth1/statistics/rx_packets > veth1.rx\n";
  auto r = run_guest("rping-pair", {"--rdma-pair", "-c", script});
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  std::string client = slurp(r.out + "/guest/client.log");
  std::string server = slurp(r.out + "/guest/server.log");
  EXPECT_EQ(count_lines(client, "ping data: rdma-ping-"), rounds) << client << r.cmd.output;
  EXPECT_EQ(count_lines(server, "server ping data: rdma-ping-"), rounds) << server;
  EXPECT_EQ(client.find("mismatch"), std::string::npos) << client;
  // The client sent from rxe_a, the server received on rxe_b: the two devices talked.
  std::string a0 = slurp(r.out + "/guest/a.before"), a1 = slurp(r.out + "/guest/a.after");
  std::string b0 = slurp(r.out + "/guest/b.before"), b1 = slurp(r.out + "/guest/b.after");
  EXPECT_GE(counter(a1, "sent_pkts") - counter(a0, "sent_pkts"), rounds) << a0 << a1;
  EXPECT_GE(counter(b1, "rcvd_pkts") - counter(b0, "rcvd_pkts"), rounds) << b0 << b1;
  EXPECT_GE(counter(a1, "rcvd_pkts") - counter(a0, "rcvd_pkts"), rounds) << a0 << a1;
  EXPECT_GE(std::stoll("0" + slurp(r.out + "/guest/veth1.rx")), rounds) << "no packets crossed the veth pair";
}

TEST(RdmaGuest, RpingBetweenTwoGuestsOnOneSegment) {
  std::string script =
      "case $UVD_GUEST_NAME in\n"
      "server)\n" +
      save_stats("rxe0", "before") +
      "  rping -s -a \"$UVD_GUEST_ADDR\" -v" + size + " -C " + std::to_string(rounds) + " > rping.log 2>&1\n" +
      save_stats("rxe0", "after") +
      "  ;;\n"
      "client)\n" +
      save_stats("rxe0", "before") +
      // the server guest may still be booting: retry until it listens (bounded)
      "  i=0\n"
      "  until rping -c -a server -v -V" + size + " -C " + std::to_string(rounds) + " > rping.log 2>&1; do\n"
      "    i=$((i+1)); [ $i -lt 100 ] || { cat rping.log; exit 1; }; sleep 0.3\n"
      "  done\n" +
      save_stats("rxe0", "after") +
      "  ;;\n"
      "*) echo \"unexpected guest $UVD_GUEST_NAME\"; exit 1 ;;\n"
      "esac\n";
  auto r = run_guest("rping-segment", {"--rdma", "--guest", "server", "--guest", "client", "-c", script});
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.output;
  std::string client = slurp(r.out + "/client/rping.log");
  std::string server = slurp(r.out + "/server/rping.log");
  EXPECT_EQ(count_lines(client, "ping data: rdma-ping-"), rounds) << client << r.cmd.output;
  EXPECT_EQ(count_lines(server, "server ping data: rdma-ping-"), rounds) << server;
  EXPECT_EQ(client.find("mismatch"), std::string::npos) << client;
  std::string c0 = slurp(r.out + "/client/before"), c1 = slurp(r.out + "/client/after");
  std::string s0 = slurp(r.out + "/server/before"), s1 = slurp(r.out + "/server/after");
  EXPECT_GE(counter(c1, "sent_pkts") - counter(c0, "sent_pkts"), rounds) << c0 << c1;
  EXPECT_GE(counter(s1, "rcvd_pkts") - counter(s0, "rcvd_pkts"), rounds) << s0 << s1;
}

// The harness itself must fail loudly: a script that fails reports its status and the
// console, so a broken guest can never pass silently.
TEST(RdmaGuest, FailingScriptFailsLoudly) {
  auto r = run_guest("fail", {"-c", "echo about-to-fail; exit 7"});
  EXPECT_EQ(r.cmd.status, 7) << r.cmd.output;
  EXPECT_NE(r.cmd.output.find("GUEST guest FAILED"), std::string::npos) << r.cmd.output;
  EXPECT_NE(r.cmd.output.find("about-to-fail"), std::string::npos) << r.cmd.output;
}

}  // namespace
}  // namespace uvd::test
