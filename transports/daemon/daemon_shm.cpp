// SPDX-License-Identifier: Apache-2.0
#include "transports/daemon/daemon_shm.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>

namespace uvd::daemon {

namespace {

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

core::result<std::unique_ptr<shm_conn>> shm_conn::create(uint32_t order) {
  if (order < ring_min_order || order > ring_max_order)
    return core::fail(EINVAL, "ring order " + std::to_string(order) + " outside " + std::to_string(ring_min_order) +
                                  ".." + std::to_string(ring_max_order));
  std::unique_ptr<shm_conn> c(new shm_conn);
  c->front_ = true;
  c->order_ = order;
  c->len_ = shm_layout::total(order);
  c->memfd_ = ::memfd_create("uvd-daemon-rings", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (c->memfd_ < 0) return core::fail(errno, "memfd_create");
  if (::ftruncate(c->memfd_, static_cast<off_t>(c->len_)) != 0) return core::fail(errno, "ftruncate of the ring memfd");
  if (::fcntl(c->memfd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return core::fail(errno, "sealing the ring memfd");
  c->base_ = ::mmap(nullptr, c->len_, PROT_READ | PROT_WRITE, MAP_SHARED, c->memfd_, 0);
  if (c->base_ == MAP_FAILED) {
    c->base_ = nullptr;
    return core::fail(errno, "mmap of the ring memfd");
  }
  c->my_bell_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  c->peer_bell_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (c->my_bell_ < 0 || c->peer_bell_ < 0) return core::fail(errno, "eventfd");
  // Fresh pages are zero: both rings start empty at index 0.
  c->out_ = ring_producer(shm_layout::tx_ctl(c->base_), shm_layout::tx_data(c->base_, order), order);
  c->in_ = ring_consumer(shm_layout::rx_ctl(c->base_), shm_layout::rx_data(c->base_, order), order);
  return c;
}

core::result<std::unique_ptr<shm_conn>> shm_conn::attach(int memfd, uint32_t order, int front_bell, int switch_bell) {
  std::unique_ptr<shm_conn> c(new shm_conn);
  c->memfd_ = memfd;
  c->peer_bell_ = front_bell;
  c->my_bell_ = switch_bell;
  c->order_ = order;
  if (order < ring_min_order || order > ring_max_order)
    return core::fail(EINVAL, "ring order " + std::to_string(order) + " outside " + std::to_string(ring_min_order) +
                                  ".." + std::to_string(ring_max_order));
  int seals = ::fcntl(memfd, F_GET_SEALS);
  if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
    return core::fail(EPERM, "the ring memfd is not sealed against shrinking and growing");
  struct stat st;
  c->len_ = shm_layout::total(order);
  if (::fstat(memfd, &st) != 0 || static_cast<size_t>(st.st_size) != c->len_)
    return core::fail(EINVAL, "the ring memfd has the wrong size");
  for (int fd : {front_bell, switch_bell}) {
    // Kicking a descriptor of the peer's choosing must not block or write
    // into a file: only a non-blocking eventfd will do.
    char path[64], link[64] = {};
    std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = ::readlink(path, link, sizeof link - 1);
    if (n <= 0 || std::strcmp(link, "anon_inode:[eventfd]") != 0) return core::fail(EINVAL, "a doorbell is not an eventfd");
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
  c->base_ = ::mmap(nullptr, c->len_, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (c->base_ == MAP_FAILED) {
    c->base_ = nullptr;
    return core::fail(errno, "mmap of the ring memfd");
  }
  // The switch's out is the front end's receive ring and the other way round.
  c->out_ = ring_producer(shm_layout::rx_ctl(c->base_), shm_layout::rx_data(c->base_, order), order);
  c->in_ = ring_consumer(shm_layout::tx_ctl(c->base_), shm_layout::tx_data(c->base_, order), order);
  return c;
}

shm_conn::~shm_conn() {
  if (base_) ::munmap(base_, len_);
  close_fd(memfd_);
  close_fd(my_bell_);
  close_fd(peer_bell_);
}

void shm_conn::kick_peer() const {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t r = ::write(peer_bell_, &one, sizeof one);
}

void shm_conn::drain_bell() const {
  uint64_t v;
  [[maybe_unused]] ssize_t r = ::read(my_bell_, &v, sizeof v);
}

void shm_conn::fds(int out[3]) const {
  out[0] = memfd_;
  out[1] = front_ ? my_bell_ : peer_bell_;
  out[2] = front_ ? peer_bell_ : my_bell_;
}

int send_with_fds(int sock, const void* msg, size_t len, const int* fds, int nfds) {
  iovec iov{const_cast<void*>(msg), len};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 4)] = {};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (nfds > 0) {
    mh.msg_control = ctl;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
  }
  if (::sendmsg(sock, &mh, MSG_NOSIGNAL) != static_cast<ssize_t>(len)) return -errno;
  return 0;
}

int recv_with_fds(int sock, void* buf, size_t cap, int* fds, int max_fds, int* nfds) {
  iovec iov{buf, cap};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 8)];
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = ctl;
  mh.msg_controllen = sizeof ctl;
  *nfds = 0;
  ssize_t n = ::recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) return -errno;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int k = static_cast<int>((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < k; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
      if (*nfds < max_fds)
        fds[(*nfds)++] = fd;
      else
        ::close(fd);  // more than the protocol allows: not ours to keep
    }
  }
  return static_cast<int>(n);
}

}  // namespace uvd::daemon
