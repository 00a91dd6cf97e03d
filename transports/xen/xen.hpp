// SPDX-License-Identifier: Apache-2.0
#pragma once
// The "xen" storage transport: a blkif front end (like Linux xen-blkfront) as
// a vstore_ops table, so storage::Vstore runs over Xen's block protocol.
//
//   xen://<backend-domid>/<vdev>?hv=local&hub=/run/uvd/xen.sock&domid=1
//   xen://0/51712?hv=xen                        (inside a real Xen domain)
//
// <vdev> is the virtual-device number under device/vbd/ (51712 = xvda).
// The toolstack (or blkback::add_device for host-local) must have created
// /local/domain/<domid>/device/vbd/<vdev> with its backend and backend-id.
// Options:
//   hv=local|xen      hypervisor implementation (default local)
//   hub=PATH          host-local: the hub's socket (required with hv=local)
//   domid=N           host-local: our domain id (default 1)
//   ring_order=N      ring pages = 2^N, at most what the back end offers
//                     (default 2; 0 with hv=xen)
//   max_segments=N    segments per request, above 11 with indirect requests, at
//                     most what the back end offers (default 64, i.e. 256 KiB per
//                     request; 11 with hv=xen, whose gntalloc allows 1024 pages)
//   persistent=0|1    ask for persistent grants (default 1)
//   timeout_ms=N      handshake timeout (default 10000)
//
// Data moves through a pool of pages granted once at connect (persistent
// grants, as Linux blkfront does): each ring slot owns its pages, writes are
// copied in, reads copied out. Requests over 11 pages use BLKIF_OP_INDIRECT.
#include "core/veth_ops.hpp"
#include "core/vstore_ops.hpp"

namespace uvd::xen {

extern const core::vstore_ops xen_vstore_ops;

// The netif front end (netfront.cpp) as a veth_ops transport, same URI shape:
//   xen://<backend-domid>/<vif handle>?hv=local&hub=PATH&domid=N
// One tx and one rx ring, rx-copy, scatter-gather up to 9018-byte frames, no
// checksum offload (frames carry whole checksums). The MAC is the one the
// toolstack wrote in device/vif/<handle>/mac (open with it), or, when the back
// end says mac-from-front=1, the front half's own, declared in the store.
extern const core::veth_ops xen_veth_ops;

}  // namespace uvd::xen
