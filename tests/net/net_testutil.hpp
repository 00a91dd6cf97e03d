// SPDX-License-Identifier: Apache-2.0
#pragma once
// Helpers shared by the network tests: test frames with checkable contents,
// send/receive loops over a Veth, and network namespaces a test creates and
// removes. A test that needs root, netns or /dev/net/tun fails loudly with a
// message saying what is missing; it never skips silently.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/result.hpp"
#include "net/eth.hpp"
#include "net/veth.hpp"
#include "tests/testutil.hpp"

namespace uvd::test {

inline constexpr uint16_t test_ethertype = 0x88b5;  // IEEE local experimental

// A frame of len bytes (>= 14) from src to dst whose payload depends on seq.
std::vector<uint8_t> make_test_frame(uint32_t len, const net::mac_addr& dst, const net::mac_addr& src, uint32_t seq);
// True when f is a test frame (any seq when want_seq < 0) with intact contents.
bool check_test_frame(const uint8_t* f, uint32_t len, int64_t want_seq = -1);
// The seq a test frame carries (frames of 18 bytes or more), or -1.
int64_t test_frame_seq(const uint8_t* f, uint32_t len);

// A TCP/IPv4 frame with payload bytes, checksum left partial (pseudo-header
// sum in the field, CSUM_PARTIAL set), or GSO when gso_size is non-zero.
std::vector<uint8_t> make_tcp4_frame(const net::mac_addr& dst, const net::mac_addr& src, uint32_t payload,
                                     uint32_t seq, core::veth_frame* desc, uint16_t gso_size = 0);

// Sends every frame, waiting while the queue is stopped; gives up after timeout.
// Returns how many were taken.
size_t send_frames(net::Veth& v, std::vector<std::vector<uint8_t>>& frames,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));

struct received_frame {
  std::vector<uint8_t> bytes;
  uint32_t flags = 0;
  uint16_t gso_size = 0, csum_start = 0, csum_offset = 0;
  uint8_t gso_type = 0;
};
// Receives frames that match keep() until want of them arrived, or the
// timeout passed; returns what arrived.
std::vector<received_frame> receive_frames(net::Veth& v, size_t want, std::chrono::milliseconds timeout,
                                           bool (*keep)(const uint8_t*, uint32_t) = nullptr);
// Waits up to timeout for any event on the Veth (rx, tx wake, link).
void wait_veth(net::Veth& v, std::chrono::milliseconds timeout);

// run_cmd that records a test failure with the output when status is not 0.
bool must_run(const std::vector<std::string>& argv);


// Root, /dev/net/tun and network namespaces: fails the test naming what is missing.
bool require_net_privileges();

// A named network namespace ("ip netns add"), removed with everything in it
// at destruction. enter() switches the calling thread into it until the
// returned guard goes away.
class netns {
 public:
  static core::result<std::unique_ptr<netns>> create(const std::string& prefix);
  ~netns();
  const std::string& name() const { return name_; }
  class guard {
   public:
    explicit guard(int old_fd) : old_(old_fd) {}
    guard(guard&& o) noexcept : old_(o.old_) { o.old_ = -1; }
    ~guard();
    bool ok() const { return old_ >= 0; }

   private:
    int old_;
  };
  guard enter() const;
  // "ip netns exec <name> argv..."
  std::vector<std::string> exec(const std::vector<std::string>& argv) const;

 private:
  std::string name_;
};

}  // namespace uvd::test
