// SPDX-License-Identifier: Apache-2.0
#pragma once
// Private to the daemon transport: socket helpers both ends share.
#include <sys/socket.h>
#include <sys/uio.h>

#include <cstdint>
#include <string>

#include "core/veth_ops.hpp"
#include "transports/daemon/daemon_proto.hpp"

namespace uvd::daemon {

// Large socket buffers so that a few 64 KiB segments are in flight (FORCE
// as root, else up to the system's limit).
void size_buffers(int fd);

inline void to_wire(const core::veth_frame& f, frame_hdr* h) {
  *h = frame_hdr{.type = msg_frame};
  if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {
    h->flags |= frame_csum_partial;
    h->csum_start = f.csum_start;
    h->csum_offset = f.csum_offset;
  }
  if (f.flags & core::VETH_FRAME_CSUM_VALID) h->flags |= frame_csum_valid;
  if (f.flags & core::VETH_FRAME_GSO) {
    h->flags |= frame_gso;
    h->gso_type = f.gso_type;
    h->gso_size = f.gso_size;
  }
}

// Fills f (data and len already set) from a received header; false when
// the header makes no sense (unknown flags).
inline bool from_wire(const frame_hdr& h, core::veth_frame* f) {
  if (h.flags & ~(frame_csum_partial | frame_csum_valid | frame_gso)) return false;
  f->flags = 0;
  f->gso_size = 0;
  f->gso_type = 0;
  f->csum_start = f->csum_offset = 0;
  if (h.flags & frame_csum_partial) {
    f->flags |= core::VETH_FRAME_CSUM_PARTIAL;
    f->csum_start = h.csum_start;
    f->csum_offset = h.csum_offset;
  }
  if (h.flags & frame_csum_valid) f->flags |= core::VETH_FRAME_CSUM_VALID;
  if (h.flags & frame_gso) {
    f->flags |= core::VETH_FRAME_GSO;
    f->gso_type = h.gso_type;
    f->gso_size = h.gso_size;
  }
  return true;
}

// Sends one message (none when msg is null: it went already) and waits up to
// timeout_ms for one reply into buf; returns the reply's length or -errno.
int exchange(int fd, const void* msg, size_t len, void* buf, size_t cap, int timeout_ms);

}  // namespace uvd::daemon
