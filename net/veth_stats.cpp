// SPDX-License-Identifier: Apache-2.0
#include "net/veth_stats.hpp"

#include <fmt/format.h>

namespace uvd::net {

std::string veth_counters::to_string() const {
  return fmt::format(
      "rx {} pkts {} bytes, {} dropped, {} errors ({} length, {} offload); "
      "tx {} pkts {} bytes, {} dropped, {} errors ({} length, {} offload); "
      "sw csum {}, sw gso {}, queue stops {}, wakes {}, timeouts {}",
      rx_packets, rx_bytes, rx_dropped, rx_errors, rx_length_errors, rx_offload_errors, tx_packets, tx_bytes,
      tx_dropped, tx_errors, tx_length_errors, tx_offload_errors, tx_sw_csum, tx_sw_gso, tx_queue_stops,
      tx_queue_wakes, tx_timeouts);
}

void veth_queue_counters::add_to(veth_counters& s) const noexcept {
  auto g = [](const c& x) { return x.load(std::memory_order_relaxed); };
  s.rx_packets += g(rx_packets);
  s.rx_bytes += g(rx_bytes);
  s.rx_dropped += g(rx_dropped);
  s.rx_errors += g(rx_errors);
  s.rx_length_errors += g(rx_length_errors);
  s.rx_offload_errors += g(rx_offload_errors);
  s.tx_packets += g(tx_packets);
  s.tx_bytes += g(tx_bytes);
  s.tx_dropped += g(tx_dropped);
  s.tx_errors += g(tx_errors);
  s.tx_length_errors += g(tx_length_errors);
  s.tx_offload_errors += g(tx_offload_errors);
  s.tx_sw_csum += g(tx_sw_csum);
  s.tx_sw_gso += g(tx_sw_gso);
  s.tx_queue_stops += g(tx_queue_stops);
  s.tx_queue_wakes += g(tx_queue_wakes);
  s.tx_timeouts += g(tx_timeouts);
}

}  // namespace uvd::net
