// SPDX-License-Identifier: Apache-2.0
#pragma once
// The data path of one connected blkif device in the back end: the mapped
// ring, the event channel and a thread that, per wake-up, takes every request
// on the ring, validates them, maps their grants (persistent grants stay
// mapped across requests) and hands them to the Vstore in one submit; the
// answers of a disk that completes at once go out with one push and at most
// one notification per batch. Private to blkback.
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
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

  // The ids of requests taken and not yet answered, to refuse an id the front
  // end reuses while it is in flight. Open addressing over a table sized
  // once (twice the ring), so the data path never allocates; the hash is
  // keyed per connection so a front end cannot aim its ids at one bucket.
  class id_set {
   public:
    void init(uint32_t ring_size, uint64_t key);
    bool insert(uint64_t id);  // false: already present
    void erase(uint64_t id);

   private:
    size_t home(uint64_t id) const { return static_cast<size_t>(((id ^ key_) * 0x9e3779b97f4a7c15ull) >> shift_); }
    std::vector<uint64_t> ids_;
    std::vector<uint8_t> used_;
    uint64_t key_ = 0;
    unsigned shift_ = 63;
  };

  explicit blk_conn(blk_conn_params p) : p_(std::move(p)) {}
  core::result<void> init();
  void run();
  // Copies up to a ring's worth of requests off the ring at once. 0: the
  // ring is empty (event index re-armed), every slot is owed a response
  // (stalled_), or the producer index is impossible (*broken).
  uint32_t take_batch(bool* broken);
  void handle(const blkif_request& req);
  // Pages for `refs` (persistent cache, else one transient mapping held by
  // *transient) into pages_[0..n). False if any ref fails to map.
  bool map_pages(const grant_ref_t* refs, size_t n, bool writable, std::unique_ptr<foreign_mapping>* transient);
  bool read_indirect(const blkif_request_indirect& ind, uint32_t nseg, blkif_request_segment* out);
  // Writes a response at the private producer index (ring_mu_ held); it is
  // published by publish_locked(), once per batch.
  void answer_locked(uint64_t id, uint8_t op, int16_t status);
  void publish_locked();
  // Answers a request refused before it reached the disk and frees its pending.
  void reject(pending* pd, uint64_t id, uint8_t op, int16_t status);
  static void on_done(storage::vstore_io* io, int status);
  void queue_io(pending* pd);
  // Hands the queued ios to the disk in one submit, then pushes every answer
  // written so far (one notification at most).
  void submit_and_publish();
  // A slice of a batch is submitted and answered once it carries this much
  // data: 4 KiB requests still go 64 to a push, 128 KiB ones two at a time.
  static constexpr uint64_t publish_bytes = 256 << 10;

  blk_conn_params p_;
  std::unique_ptr<foreign_mapping> ring_map_;
  std::unique_ptr<event_channel> evt_;
  blk_back_ring ring_;
  uint64_t capacity_sectors_ = 0;
  uint32_t max_segs_ = BLKIF_MAX_SEGMENTS_PER_REQUEST;

  std::mutex ring_mu_;  // ring_, ids_, free_, stalled_, busy_
  std::condition_variable idle_cv_;
  id_set ids_;
  std::vector<std::unique_ptr<pending>> pool_;
  std::vector<pending*> free_;
  bool stalled_ = false;
  uint32_t busy_ = 0;         // pendings handed to the Vstore
  uint32_t unpublished_ = 0;  // answers written but not yet pushed

  // The I/O thread while it runs: a completion on it (a disk that completes
  // inside submit) leaves publishing to the end of the batch; one on any
  // other thread publishes at once.
  std::atomic<std::thread::id> io_thread_{};

  // Persistent grants: mapped on first use, kept until disconnect (I/O thread only).
  std::unordered_map<grant_ref_t, std::unique_ptr<foreign_mapping>> persistent_;
  // Scratch of the I/O thread, sized once, so no request allocates.
  std::vector<blkif_request> batch_;
  std::vector<storage::vstore_io*> submit_;
  uint64_t submit_bytes_ = 0;
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
