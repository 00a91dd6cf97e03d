// SPDX-License-Identifier: Apache-2.0
#pragma once
// Private to the daemon transport: one connection's shared-memory rings and
// doorbells, as either side sees them (protocol: daemon_proto.hpp, rings:
// frame_ring.hpp).
#include <cstdint>
#include <memory>

#include "core/result.hpp"
#include "transports/daemon/frame_ring.hpp"

namespace uvd::daemon {

class shm_conn {
 public:
  // The front end's side: a new sealed memfd and two doorbells.
  static core::result<std::unique_ptr<shm_conn>> create(uint32_t order);
  // The switch's side, from the descriptors a hello carried. Takes ownership
  // of the three fds whatever happens. Refuses a memfd that can still shrink
  // or grow (the peer could make our accesses fault) or has the wrong size.
  static core::result<std::unique_ptr<shm_conn>> attach(int memfd, uint32_t order, int front_bell, int switch_bell);
  ~shm_conn();
  shm_conn(const shm_conn&) = delete;
  shm_conn& operator=(const shm_conn&) = delete;

  // Frames this side sends, and receives.
  ring_producer& out() { return out_; }
  ring_consumer& in() { return in_; }
  // Readable when the peer kicked us.
  int bell() const { return my_bell_; }
  void kick_peer() const;
  // Clears our doorbell (before arming and re-checking the rings).
  void drain_bell() const;

  // What the front end attaches to its hello: memfd, front bell, switch bell.
  void fds(int out[3]) const;
  uint32_t order() const { return order_; }

 private:
  shm_conn() = default;
  void* base_ = nullptr;
  size_t len_ = 0;
  uint32_t order_ = 0;
  int memfd_ = -1, my_bell_ = -1, peer_bell_ = -1;
  bool front_ = false;
  ring_producer out_;
  ring_consumer in_;
};

// Sends msg with fds attached (SCM_RIGHTS); 0 or -errno.
int send_with_fds(int sock, const void* msg, size_t len, const int* fds, int nfds);
// Receives one message and up to max_fds descriptors (any beyond are closed;
// *nfds says how many arrived). Returns the length or -errno.
int recv_with_fds(int sock, void* buf, size_t cap, int* fds, int max_fds, int* nfds);

}  // namespace uvd::daemon
