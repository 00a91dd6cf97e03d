// SPDX-License-Identifier: Apache-2.0
#pragma once
// The data path of one connected blkif device in the back end: the mapped
// ring, the event channel and a thread that takes requests, validates them,
// maps their grants and hands them to the Vstore. Private to blkback.
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "storage/vstore.hpp"
#include "transports/xen/blkback.hpp"
#include "transports/xen/blkif.hpp"

namespace uvd::xen {

struct blk_conn_params {
  hypervisor* hv;
  domid_t front;
  std::vector<grant_ref_t> ring_refs;
  evtchn_port_t port;
  bool persistent;
  bool read_only;
  std::shared_ptr<storage::Vstore> disk;
  blkback_options opts;
};

class blk_conn {
 public:
  static core::result<std::unique_ptr<blk_conn>> start(blk_conn_params p);
  // Stops taking requests, waits for the ones in flight, unmaps everything.
  ~blk_conn();
  blk_conn(const blk_conn&) = delete;
  blk_conn& operator=(const blk_conn&) = delete;

  void fill_stats(blkback_device_stats& s) const;
  bool broken() const { return broken_.load(); }

 private:
  struct pending {
    storage::vstore_io io;
    blk_conn* conn = nullptr;
    uint64_t id = 0;
    uint8_t op = 0;
    std::vector<iovec> iov;
    std::unique_ptr<foreign_mapping> transient;
  };

  explicit blk_conn(blk_conn_params p) : p_(std::move(p)) {}
  core::result<void> init();
  void run();
  void handle(const blkif_request& req);
  // Pages for `refs` (persistent cache, else one transient mapping held by
  // *transient) into pages_[0..n). False if any ref fails to map.
  bool map_pages(const grant_ref_t* refs, size_t n, bool writable, std::unique_ptr<foreign_mapping>* transient);
  bool read_indirect(const blkif_request_indirect& ind, uint32_t nseg, blkif_request_segment* out);
  void respond(uint64_t id, uint8_t op, int16_t status);
  static void on_done(storage::vstore_io* io, int status);
  pending* get_pending();
  void put_pending(pending* p);

  blk_conn_params p_;
  std::unique_ptr<foreign_mapping> ring_map_;
  std::unique_ptr<event_channel> evt_;
  blk_back_ring ring_;
  uint64_t capacity_sectors_ = 0;
  uint32_t max_segs_ = BLKIF_MAX_SEGMENTS_PER_REQUEST;

  std::mutex ring_mu_;  // ring_, inflight_ids_, free_, stalled_
  std::condition_variable idle_cv_;
  std::unordered_set<uint64_t> inflight_ids_;
  std::vector<std::unique_ptr<pending>> pool_;
  std::vector<pending*> free_;
  bool stalled_ = false;
  uint32_t busy_ = 0;  // pendings handed to the Vstore

  // Persistent grants: mapped on first use, kept until disconnect (I/O thread only).
  std::unordered_map<grant_ref_t, std::unique_ptr<foreign_mapping>> persistent_;
  // Scratch of the I/O thread, sized once, so no request allocates.
  std::vector<blkif_request_segment> segs_;
  std::vector<grant_ref_t> refs_, missing_;
  std::vector<std::byte*> pages_;
  std::vector<size_t> where_;

  int kick_fd_ = -1;  // completions wake a stalled I/O thread; the destructor stops it
  std::atomic<bool> stop_{false};
  std::atomic<bool> broken_{false};
  std::thread thread_;

  std::atomic<uint64_t> requests_{0}, errors_{0}, persistent_maps_{0}, transient_maps_{0};
};

}  // namespace uvd::xen
