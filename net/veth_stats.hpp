// SPDX-License-Identifier: Apache-2.0
#pragma once
// Virtual NIC counters: relaxed atomics per queue on the data path (one
// writer each), summed into a plain snapshot for reporting.
#include <atomic>
#include <cstdint>
#include <string>

namespace uvd::net {

struct veth_counters {
  uint64_t rx_packets = 0, rx_bytes = 0;
  uint64_t rx_dropped = 0;        // good frames not delivered (link down, transport drops)
  uint64_t rx_errors = 0;         // bad frames (all kinds, including the two below)
  uint64_t rx_length_errors = 0;  // runts and frames over the MTU
  uint64_t rx_offload_errors = 0; // checksum/GSO metadata that does not fit the frame
  uint64_t tx_packets = 0, tx_bytes = 0;
  uint64_t tx_dropped = 0;        // taken while the link was down, or dropped by the transport
  uint64_t tx_errors = 0;         // refused frames (all kinds, including the two below)
  uint64_t tx_length_errors = 0;  // runts and frames over the MTU
  uint64_t tx_offload_errors = 0;
  uint64_t tx_sw_csum = 0;        // checksums the front half filled in software
  uint64_t tx_sw_gso = 0;         // GSO frames the front half cut in software
  uint64_t tx_queue_stops = 0;    // the transport was full
  uint64_t tx_queue_wakes = 0;
  uint64_t tx_timeouts = 0;       // watchdog firings

  std::string to_string() const;
};

struct veth_queue_counters {
  using c = std::atomic<uint64_t>;
  c rx_packets{0}, rx_bytes{0}, rx_dropped{0}, rx_errors{0}, rx_length_errors{0}, rx_offload_errors{0};
  c tx_packets{0}, tx_bytes{0}, tx_dropped{0}, tx_errors{0}, tx_length_errors{0}, tx_offload_errors{0};
  c tx_sw_csum{0}, tx_sw_gso{0}, tx_queue_stops{0}, tx_queue_wakes{0}, tx_timeouts{0};

  static void add(c& x, uint64_t n = 1) noexcept { x.fetch_add(n, std::memory_order_relaxed); }
  void add_to(veth_counters& s) const noexcept;
};

}  // namespace uvd::net
