// SPDX-License-Identifier: Apache-2.0
#pragma once
// blkif as both halves speak it: Xen's own structures (xen/io/blkif.h) on the
// core ring, and the xenstore paths and keys of the handshake.
#include <cstdint>
// The Xen public headers assume <stdint.h> came first.
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>
#include <xen/io/xenbus.h>

#include <string>

#include "core/ring.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen {

using blk_front_ring = core::front_ring<blkif_request, blkif_response>;
using blk_back_ring = core::back_ring<blkif_request, blkif_response>;

inline constexpr uint32_t blk_sector = 512;  // blkif counts in 512-byte sectors whatever sector-size says
inline constexpr uint32_t blk_sectors_per_page = page_size / blk_sector;
// Segments one indirect page holds (blkif.h: PAGE_SIZE / sizeof(struct blkif_request_segment)).
inline constexpr uint32_t blk_segs_per_indirect_page = page_size / sizeof(blkif_request_segment);
// Most ring pages either half uses: 2^4 = 16 pages, 512 requests (Linux's default limit).
inline constexpr uint32_t blk_max_ring_page_order = 4;
// Most segments per indirect request we offer/accept: 8 indirect pages' worth
// is the protocol's ceiling; 256 (1 MiB) is plenty and keeps a slot's pages bounded.
inline constexpr uint32_t blk_max_indirect_segments = 256;

// The two store directories of one virtual block device (as the toolstack makes them).
inline std::string blk_frontend_dir(domid_t front, uint32_t vdev) {
  return "/local/domain/" + std::to_string(front) + "/device/vbd/" + std::to_string(vdev);
}
inline std::string blk_backend_dir(domid_t back, domid_t front, uint32_t vdev) {
  return "/local/domain/" + std::to_string(back) + "/backend/vbd/" + std::to_string(front) + "/" +
         std::to_string(vdev);
}

}  // namespace uvd::xen
