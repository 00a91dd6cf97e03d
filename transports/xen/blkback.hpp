// SPDX-License-Identifier: Apache-2.0
#pragma once
// The blkif back end: serves any storage::Vstore (file, COW, memory...) to
// front ends in other domains over Xen's block protocol, through the
// hypervisor interface (real Xen or host-local alike).
//
// Negotiation follows xen/io/blkif.h and Linux xen-blkback: the back end
// advertises feature-flush-cache, feature-discard, feature-max-indirect-
// segments, feature-persistent, max-ring-page-order and
// multi-queue-max-queues in InitWait; when the front end is Initialised it
// maps ring-ref / ring-ref<N>, binds event-channel, writes sectors,
// sector-size, physical-sector-size and info, and goes Connected. Closing or
// Closed from the front end disconnects; Initialising again reconnects.
//
// Everything a front end writes (store values, ring indices, requests,
// indirect pages) is hostile input: a request that is malformed gets
// BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP, a ring whose producer index is
// impossible is disconnected, and no request ever touches a byte outside the
// sectors it names or the pages it was granted. One bad front end never
// disturbs the others.
#include <cstdint>
#include <memory>
#include <string>

#include "core/result.hpp"
#include "core/stats.hpp"
#include "storage/vstore.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

struct blkback_options {
  uint32_t max_ring_page_order = 4;       // offered max-ring-page-order (<= 4)
  uint32_t max_indirect_segments = 256;   // offered feature-max-indirect-segments (0: no indirect)
  bool persistent = true;                 // offer feature-persistent
  uint32_t max_persistent_grants = 8192;  // per device; more are mapped per request
};

struct blkback_device_stats {
  uint64_t requests = 0;        // taken off the ring
  uint64_t errors = 0;          // answered BLKIF_RSP_ERROR / EOPNOTSUPP
  uint64_t persistent_maps = 0; // grants mapped once and kept
  uint64_t transient_maps = 0;  // map calls for one request
  bool connected = false;
  bool broken = false;          // disconnected because the ring was impossible
};

class blkback {
 public:
  // Takes the hypervisor of the serving domain; watches the store from a thread.
  static core::result<std::unique_ptr<blkback>> start(std::unique_ptr<hypervisor> hv, blkback_options opts = {});
  virtual ~blkback() = default;

  // The toolstack's part of attaching a disk (what `xl block-attach` writes):
  // creates the front end's device/vbd/<vdev> and our backend/vbd/<front>/<vdev>
  // directories with their permissions, then serves `disk` there. read_only
  // serves it read-only whatever the disk allows.
  virtual core::result<void> add_device(domid_t front, uint32_t vdev, std::shared_ptr<storage::Vstore> disk,
                                        bool read_only = false) = 0;
  // Disconnects and removes both directories.
  virtual core::result<void> remove_device(domid_t front, uint32_t vdev) = 0;

  virtual core::result<blkback_device_stats> device_stats(domid_t front, uint32_t vdev) = 0;
  virtual domid_t domid() const = 0;
};

}  // namespace uvd::xen
