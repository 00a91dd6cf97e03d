// SPDX-License-Identifier: Apache-2.0
#include "net/veth_port.hpp"

namespace uvd::net {

namespace {

class veth_port final : public port {
 public:
  veth_port(std::unique_ptr<Veth> v, const veth_port_options& o) : v_(std::move(v)), o_(o) {}
  std::string name() const override { return v_->transport_name() + ":" + v_->target(); }
  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, port_stats&) override {
    v_->clear_events();
    v_->watchdog();
    v_->tx_flush(0);
    uint32_t got = 0;
    for (uint32_t q = 0; q < v_->nqueues() && got < n; ++q) got += v_->rx_burst(q, frames + got, n - got);
    // Frames of one queue stay valid until that queue's next rx_burst, which
    // is the next call here: safe to hand several queues' frames at once.
    return got;
  }
  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override { return v_->tx_burst(0, frames, n); }
  void fds(std::vector<int>& out) const override {
    out.push_back(v_->event_fd());
    for (uint32_t q = 0; q < v_->nqueues(); ++q)
      if (int fd = v_->rx_fd(q); fd >= 0) out.push_back(fd);
  }
  bool alive() const override { return true; }
  bool link_up() const override { return v_->link_up(); }
  bool offloads() const override { return true; }  // the Veth finishes what its transport cannot
  uint32_t mtu() const override { return v_->mtu(); }
  std::optional<mac_addr> owned_mac() const override {
    if (o_.trusted) return std::nullopt;
    return v_->mac();
  }
  bool trunk() const override { return o_.trunk; }

 private:
  std::unique_ptr<Veth> v_;
  veth_port_options o_;
};

}  // namespace

std::unique_ptr<port> make_veth_port(std::unique_ptr<Veth> v, const veth_port_options& o) {
  return std::make_unique<veth_port>(std::move(v), o);
}

}  // namespace uvd::net
