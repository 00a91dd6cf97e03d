// SPDX-License-Identifier: Apache-2.0
#pragma once
// One connected Xen virtual interface as a port of the netback switch: the
// front end's tx ring feeds the switch (rx_burst), the switch's frames are
// copied into the buffers the front end posted on its rx ring (tx_burst).
// Private to vif_back; runs on the switch thread.
#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "net/port.hpp"
#include "transports/xen/netif.hpp"

namespace uvd::xen {

// What the control thread and the switch's port share.
struct vif_shared {
  std::atomic<uint64_t> mac{0};  // mac_addr::key(); 0: none yet
  std::atomic<bool> dead{false};    // disconnected by the control thread
  std::atomic<bool> broken{false};  // the port found an impossible ring index
  std::atomic<uint64_t> dropped{0};  // frames for the front end that found no rx buffer posted (or it could not take)
  std::atomic<uint64_t> sw_csum{0};  // checksums filled here because the front end takes no partial ones
  std::atomic<uint64_t> sw_gso{0};   // large segments cut here because the front end takes no GSO
};

class vif_port final : public net::port {
 public:
  static core::result<std::unique_ptr<vif_port>> connect(std::shared_ptr<hypervisor> hv, domid_t front,
                                                         grant_ref_t tx_ref, grant_ref_t rx_ref, evtchn_port_t port,
                                                         std::shared_ptr<vif_shared> shared, std::string name,
                                                         bool persistent, const netif_features& front_features);
  std::string name() const override { return name_; }
  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, net::port_stats& st) override;
  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override;
  void fds(std::vector<int>& out) const override { out.push_back(evt_->fd()); }
  bool alive() const override { return !shared_->dead && !shared_->broken; }
  // Offloaded frames come whole: what the front end did not ask for is
  // finished here, per feature (IPv4/IPv6 checksums, TCPv4/TCPv6 GSO, SG).
  bool offloads() const override { return true; }
  uint32_t mtu() const override { return net_max_mtu; }
  std::optional<net::mac_addr> owned_mac() const override;

 private:
  // A frame waiting for the front end's rx buffers, with its NETRXF flags.
  struct rx_item {
    std::vector<uint8_t> data;
    uint16_t flags = 0;
    uint16_t gso_size = 0;
    uint8_t gso_type = 0;  // XEN_NETIF_GSO_TYPE_*
  };
  vif_port() = default;
  // A whole tx chain is in chain_: check it, copy it into buf, describe it in
  // out, answer every slot. False if the frame was refused.
  bool finish_chain(std::vector<uint8_t>& buf, core::veth_frame& out, net::port_stats& st);
  void respond_tx(uint16_t id, int16_t status);
  // Pages for refs_ into pages_: from the persistent cache when the front end
  // asked for it, else one transient mapping of them all into *transient.
  bool map_refs(bool writable, std::unique_ptr<foreign_mapping>* transient);
  // Copies one frame into buffers the front end posted (plus a GSO extra-info
  // slot); false if it has not posted enough (nothing taken then).
  bool deliver(const uint8_t* data, uint32_t len, uint16_t flags, uint16_t gso_size, uint8_t gso_type);
  // One frame for the front end as its features allow: now, into the backlog, or dropped.
  void emit(const uint8_t* data, uint32_t len, uint16_t flags, uint16_t gso_size = 0, uint8_t gso_type = 0);
  // A switch frame made fit for the front end (checksum filled, segmented) and emitted.
  void offer(const core::veth_frame& f);
  // Delivers queued frames while buffers last; with some left, asks the front
  // end to notify when it posts more.
  void flush_backlog();

  std::shared_ptr<hypervisor> hv_;
  domid_t front_ = 0;
  std::string name_;
  std::shared_ptr<vif_shared> shared_;
  netif_features feat_;  // what the front end takes
  std::unique_ptr<foreign_mapping> tx_map_, rx_map_;
  std::unique_ptr<event_channel> evt_;
  net_tx_back_ring tx_;
  net_rx_back_ring rx_;
  // A frame's slots taken so far, in ring order; extra_[i]: slot i is extra info.
  std::vector<netif_tx_request> chain_;
  std::vector<bool> extra_;
  bool chain_more_ = false;   // the last data slot said NETTXF_more_data
  bool extra_next_ = false;   // the next slot is extra info
  std::vector<std::vector<uint8_t>> bufs_;  // frames handed to the switch, valid until the next rx_burst
  std::vector<grant_ref_t> refs_;
  std::vector<uint8_t*> pages_;
  std::vector<netif_rx_request> rxreq_;
  // Frames for the front end waiting for rx buffers (as Linux netback queues
  // them in the vif's qdisc), bounded; past that the switch drops.
  std::deque<rx_item> backlog_;
  std::vector<std::vector<uint8_t>> spare_;  // recycled backlog buffers
  std::vector<uint8_t> scratch_;             // a frame whose checksum is filled here
  std::unique_ptr<uint8_t[]> seg_arena_;     // segments of a GSO frame cut here
  uint32_t seg_arena_len_ = 0;
  // feature-persistent (a uvd extension for netif; Linux netfront never asks):
  // the front end's pages stay granted for the connection, so mappings are kept.
  bool persistent_ = false;
  std::unordered_map<grant_ref_t, std::unique_ptr<foreign_mapping>> ro_cache_, rw_cache_;
};

}  // namespace uvd::xen
