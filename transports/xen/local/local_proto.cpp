// SPDX-License-Identifier: Apache-2.0
#include "transports/xen/local/local_proto.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace uvd::xen::local {

int send_msg(int sock, const msg_header& h, const buf& body, const int* fds, size_t nfds) {
  if (nfds > max_fds || sizeof h + body.raw().size() > max_msg) return -EMSGSIZE;
  iovec iov[2] = {{const_cast<msg_header*>(&h), sizeof h},
                  {const_cast<char*>(body.raw().data()), body.raw().size()}};
  msghdr m{};
  m.msg_iov = iov;
  m.msg_iovlen = body.raw().empty() ? 1 : 2;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * max_fds)];
  if (nfds) {
    m.msg_control = cbuf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &m, MSG_NOSIGNAL);
    if (n >= 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int recv_msg(int sock, msg_header& h, buf& body, std::vector<int>& fds, bool nonblock) {
  body.raw().resize(max_msg);
  iovec iov[2] = {{&h, sizeof h}, {body.raw().data(), body.raw().size()}};
  msghdr m{};
  m.msg_iov = iov;
  m.msg_iovlen = 2;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * max_fds)];
  m.msg_control = cbuf;
  m.msg_controllen = sizeof cbuf;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &m, MSG_CMSG_CLOEXEC | (nonblock ? MSG_DONTWAIT : 0));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    body.raw().clear();
    return -errno;
  }
  // Keep every descriptor that arrived, even on a bad message, so the caller closes them.
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.push_back(fd);
    }
  }
  if (n == 0) {
    body.raw().clear();
    return 0;
  }
  if ((m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || static_cast<size_t>(n) < sizeof h) {
    body.raw().clear();
    return -EMSGSIZE;
  }
  body.raw().resize(static_cast<size_t>(n) - sizeof h);
  return 1;
}

}  // namespace uvd::xen::local
