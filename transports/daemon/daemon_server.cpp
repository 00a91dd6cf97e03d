// SPDX-License-Identifier: Apache-2.0
// The switch side of the daemon transport: the listening socket, the hello
// handshake, and the port each front end becomes. Everything a front end
// sends is hostile input.
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "transports/daemon/daemon.hpp"
#include "transports/daemon/daemon_shm.hpp"
#include "transports/daemon/daemon_socket.hpp"

namespace uvd::daemon {

void size_buffers(int fd) {
  int sz = 4 << 20;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) != 0)
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz) != 0)
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
}

int exchange(int fd, const void* msg, size_t len, void* buf, size_t cap, int timeout_ms) {
  if (msg && ::send(fd, msg, len, MSG_NOSIGNAL) != static_cast<ssize_t>(len)) return -errno;
  pollfd p{fd, POLLIN, 0};
  int r = ::poll(&p, 1, timeout_ms);
  if (r == 0) return -ETIMEDOUT;
  if (r < 0) return -errno;
  ssize_t n = ::recv(fd, buf, cap, MSG_DONTWAIT);
  if (n < 0) return -errno;
  return static_cast<int>(n);
}

namespace {

using clock = std::chrono::steady_clock;

class daemon_port final : public net::port {
 public:
  daemon_port(int fd, const hello_msg& h, uint32_t max_mtu, std::unique_ptr<shm_conn> shm)
      : fd_(fd), max_mtu_(max_mtu), shm_(std::move(shm)) {
    mac_ = net::mac_addr::from(h.mac);
    mtu_ = h.mtu;
    offload_ = h.flags & hello_offload;
    name_.assign(h.name, strnlen(h.name, sizeof h.name));
  }
  ~daemon_port() override { ::close(fd_); }

  std::string name() const override { return name_; }

  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, net::port_stats& st) override {
    if (dead_) return 0;
    grow_rx(n);
    if (shm_) return ring_rx(frames, n, st);
    return socket_rx(frames, 0, n, st);
  }

  // Frames from the front end's transmit ring, copied out of shared memory
  // before anything looks at them (the peer may rewrite them meanwhile).
  uint32_t ring_rx(core::veth_frame* frames, uint32_t n, net::port_stats& st) {
    ring_consumer& in = shm_->in();
    uint32_t k = 0;
    for (;;) {
      while (k < n) {
        uint8_t* buf = rx_buf_.get() + size_t(k) * rx_slot_;
        uint32_t len = 0;
        frame_hdr h;
        auto r = in.pop(buf, rx_slot_ - 1, &len, &h);
        if (r == ring_consumer::status::empty) break;
        if (r == ring_consumer::status::broken) {
          spdlog::warn("switch: port '{}' corrupted its transmit ring; dropping the port", name_);
          ++st.rx_bad_msg;
          dead_ = true;
          return k;
        }
        if (r == ring_consumer::status::too_big) {
          ++st.rx_oversize;
          continue;
        }
        core::veth_frame& f = frames[k];
        f.data = buf;
        f.len = len;
        if (h.type != msg_frame || !from_wire(h, &f)) {
          ++st.rx_bad_msg;
          continue;
        }
        ++k;
      }
      if (in.release()) shm_->kick_peer();
      // The socket carries only control messages now, and the hang-up: look
      // at it when idle, and now and then under load.
      if (k < n || ++bursts_ % 64 == 0) k += socket_rx(frames, k, n, st);
      if (k == n || dead_) break;
      // Idle: clear the doorbell, ask for a kick, and look once more (a
      // frame that came meanwhile would bring no kick).
      shm_->drain_bell();
      if (!in.arm_data()) break;
    }
    return k;
  }

  // Messages from the socket into frames[k..n).
  uint32_t socket_rx(core::veth_frame* frames, uint32_t first, uint32_t n, net::port_stats& st) {
    if (first >= n) return 0;
    frames += first;
    n -= first;
    for (uint32_t i = 0; i < n; ++i) {
      rx_iov_[i] = iovec{rx_buf_.get() + size_t(first + i) * rx_slot_, rx_slot_};
      rx_msg_[i] = mmsghdr{};
      rx_msg_[i].msg_hdr.msg_iov = &rx_iov_[i];
      rx_msg_[i].msg_hdr.msg_iovlen = 1;
    }
    int r = ::recvmmsg(fd_, rx_msg_.data(), n, MSG_DONTWAIT, nullptr);
    if (r < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) dead_ = true;
      return 0;
    }
    uint32_t k = 0;
    for (int i = 0; i < r; ++i) {
      uint8_t* m = rx_buf_.get() + size_t(first + i) * rx_slot_;
      uint32_t len = rx_msg_[i].msg_len;
      if (len == 0) {  // end of stream, or an empty message from a hostile peer
        pollfd p{fd_, POLLRDHUP, 0};
        if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP))) {
          dead_ = true;
          break;
        }
        ++st.rx_truncated;
        continue;
      }
      if (rx_msg_[i].msg_hdr.msg_flags & MSG_TRUNC) {  // larger than any frame may be
        ++st.rx_oversize;
        continue;
      }
      if (m[0] == msg_frame) {
        if (len < sizeof(frame_hdr)) {
          ++st.rx_truncated;
          continue;
        }
        frame_hdr h;
        std::memcpy(&h, m, sizeof h);  // copy, then validate
        core::veth_frame& f = frames[k];
        f.data = m + sizeof h;
        f.len = len - static_cast<uint32_t>(sizeof h);
        if (!from_wire(h, &f)) {
          ++st.rx_bad_msg;
          continue;
        }
        ++k;
      } else if (m[0] == msg_mtu && len == sizeof(mtu_msg)) {
        mtu_msg mm;
        std::memcpy(&mm, m, sizeof mm);
        if (mm.mtu < net::eth_min_mtu || mm.mtu > max_mtu_) {
          ++st.rx_bad_msg;
          continue;
        }
        spdlog::info("switch: port '{}' MTU {} -> {}", name_, mtu_, mm.mtu);
        mtu_ = mm.mtu;
      } else {
        ++st.rx_bad_msg;
      }
    }
    return k;
  }

  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override {
    if (dead_) return 0;
    if (shm_) {
      // What does not fit is dropped (and counted by the switch), as a
      // hardware switch drops at a full egress queue.
      ring_producer& out = shm_->out();
      uint32_t sent = 0;
      for (; sent < n; ++sent) {
        frame_hdr h;
        to_wire(*frames[sent], &h);
        if (!out.push(h, frames[sent]->data, frames[sent]->len)) break;
      }
      if (out.publish()) shm_->kick_peer();
      if (!out.sane()) {
        spdlog::warn("switch: port '{}' corrupted its receive ring; dropping the port", name_);
        dead_ = true;
      }
      return sent;
    }
    if (tx_hdr_.size() < n) {
      tx_hdr_.resize(n);
      tx_iov_.resize(2 * size_t(n));
      tx_msg_.resize(n);
    }
    for (uint32_t i = 0; i < n; ++i) {
      to_wire(*frames[i], &tx_hdr_[i]);
      tx_iov_[2 * i] = iovec{&tx_hdr_[i], sizeof(frame_hdr)};
      tx_iov_[2 * i + 1] = iovec{frames[i]->data, frames[i]->len};
      tx_msg_[i] = mmsghdr{};
      tx_msg_[i].msg_hdr.msg_iov = &tx_iov_[2 * i];
      tx_msg_[i].msg_hdr.msg_iovlen = 2;
    }
    uint32_t sent = 0;
    while (sent < n) {
      int r = ::sendmmsg(fd_, tx_msg_.data() + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ENOBUFS) dead_ = true;
        break;
      }
      sent += static_cast<uint32_t>(r);
    }
    return sent;
  }

  void fds(std::vector<int>& out) const override {
    out.push_back(fd_);
    if (shm_) out.push_back(shm_->bell());
  }
  bool alive() const override { return !dead_; }
  bool offloads() const override { return offload_; }
  uint32_t mtu() const override { return mtu_; }
  std::optional<net::mac_addr> owned_mac() const override { return mac_; }

 private:
  void grow_rx(uint32_t n) {
    if (rx_msg_.size() >= n) return;
    // The receive slot is the largest legal message plus one byte, so that
    // anything larger shows up as MSG_TRUNC.
    rx_slot_ = max_msg + 1;
    rx_buf_.reset(new uint8_t[size_t(n) * rx_slot_]);
    rx_iov_.resize(n);
    rx_msg_.resize(n);
  }

  int fd_;
  uint32_t max_mtu_;
  net::mac_addr mac_;
  uint32_t mtu_ = 1500;
  bool offload_ = false;
  bool dead_ = false;
  std::unique_ptr<shm_conn> shm_;
  uint32_t bursts_ = 0;
  std::string name_;
  uint32_t rx_slot_ = 0;
  std::unique_ptr<uint8_t[]> rx_buf_;
  std::vector<iovec> rx_iov_;
  std::vector<mmsghdr> rx_msg_;
  std::vector<frame_hdr> tx_hdr_;
  std::vector<iovec> tx_iov_;
  std::vector<mmsghdr> tx_msg_;
};

struct pending_conn {
  int fd;
  clock::time_point deadline;
};

class listener final : public net::port_source {
 public:
  listener(int lfd, int ep, std::string path, listener_options o)
      : lfd_(lfd), ep_(ep), path_(std::move(path)), o_(std::move(o)) {}
  ~listener() override {
    for (auto& p : pending_) ::close(p.fd);
    ::close(lfd_);
    ::close(ep_);
    ::unlink(path_.c_str());
  }
  int fd() const override { return ep_; }

  void service(net::Netback& nb) override {
    epoll_event evs[32];
    int n = ::epoll_wait(ep_, evs, 32, 0);
    for (int i = 0; i < n; ++i) {
      int fd = evs[i].data.fd;
      if (fd == lfd_)
        accept_all();
      else
        handshake(fd, nb);
    }
    // Peers that never said hello lose their place.
    auto now = clock::now();
    for (size_t i = 0; i < pending_.size();) {
      if (now > pending_[i].deadline) {
        drop_pending(pending_[i].fd);
      } else {
        ++i;
      }
    }
  }

 private:
  void accept_all() {
    for (;;) {
      int fd = ::accept4(lfd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (pending_.size() >= 64) drop_pending(pending_.front().fd);
      pending_.push_back({fd, clock::now() + std::chrono::seconds(5)});
      epoll_event ev{.events = EPOLLIN, .data = {.fd = fd}};
      ::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
    }
  }

  void drop_pending(int fd, bool close_it = true) {
    ::epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr);
    for (size_t i = 0; i < pending_.size(); ++i)
      if (pending_[i].fd == fd) {
        pending_.erase(pending_.begin() + static_cast<long>(i));
        break;
      }
    if (close_it) ::close(fd);
  }

  void refuse(int fd, int err, const std::string& why) {
    welcome_msg w{.type = msg_welcome, .version = proto_version, .magic = proto_magic, .status = err};
    std::snprintf(w.message, sizeof w.message, "%s", why.c_str());
    [[maybe_unused]] ssize_t r = ::send(fd, &w, sizeof w, MSG_DONTWAIT | MSG_NOSIGNAL);
    spdlog::warn("switch: refused a front end: {}", why);
    drop_pending(fd);
  }

  void handshake(int fd, net::Netback& nb) {
    uint8_t buf[sizeof(hello_msg) + 1];
    int fds[3], nfds = 0;
    int n = recv_with_fds(fd, buf, sizeof buf, fds, 3, &nfds);
    if (n == -EAGAIN || n == -EWOULDBLOCK) return;
    // Descriptors are only welcome with a hello that asks for rings.
    struct fd_guard {
      int* fds;
      int& n;
      ~fd_guard() {
        for (int i = 0; i < n; ++i) ::close(fds[i]);
      }
    } guard{fds, nfds};
    if (n <= 0) return drop_pending(fd);
    hello_msg h;
    if (n != sizeof h) return refuse(fd, EPROTO, "first message is not a hello");
    std::memcpy(&h, buf, sizeof h);
    if (h.type != msg_hello || h.magic != proto_magic) return refuse(fd, EPROTO, "first message is not a hello");
    if (h.version != proto_version)
      return refuse(fd, EPROTONOSUPPORT, "protocol version " + std::to_string(h.version) + " (switch speaks 1)");
    if (h.flags & hello_control) {
      welcome_msg w{.type = msg_welcome, .version = proto_version, .magic = proto_magic};
      std::string text = nb.stats_text();
      std::vector<uint8_t> m(1 + text.size());
      m[0] = msg_stats;
      std::memcpy(m.data() + 1, text.data(), text.size());
      drop_pending(fd, false);
      int fl = ::fcntl(fd, F_GETFL);
      ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);  // a short, bounded reply
      size_buffers(fd);
      [[maybe_unused]] ssize_t r = ::send(fd, &w, sizeof w, MSG_NOSIGNAL);
      r = ::send(fd, m.data(), m.size(), MSG_NOSIGNAL);
      ::close(fd);
      return;
    }
    if (h.flags & ~(hello_offload | hello_control | hello_shm)) return refuse(fd, EINVAL, "unknown hello flags");
    if ((h.flags & hello_shm) && nfds != 3)
      return refuse(fd, EINVAL, "a hello asking for rings must carry a memfd and two eventfds");
    net::mac_addr mac = net::mac_addr::from(h.mac);
    if (mac.is_multicast() || mac.is_zero()) return refuse(fd, EINVAL, "MAC " + mac.to_string() + " is not unicast");
    if (h.mtu < net::eth_min_mtu || h.mtu > o_.max_mtu)
      return refuse(fd, EINVAL, "MTU " + std::to_string(h.mtu) + " out of range");
    size_t nl = strnlen(h.name, sizeof h.name);
    for (size_t i = 0; i < nl; ++i)
      if (h.name[i] < 0x21 || h.name[i] > 0x7e) return refuse(fd, EINVAL, "port name is not printable");
    if (nb.port_count() >= o_.max_ports) return refuse(fd, EMFILE, "switch is full");
    std::string name(h.name, nl);
    std::optional<net::rate_limit> limit = o_.default_limit;
    if (auto it = o_.limits.find(name); it != o_.limits.end()) limit = it->second;

    std::unique_ptr<shm_conn> shm;
    if (h.flags & hello_shm) {
      auto c = shm_conn::attach(fds[0], h.ring_order, fds[1], fds[2]);
      nfds = 0;  // attach owns them now
      if (!c) return refuse(fd, c.err().errnum(), c.err().what());
      shm = std::move(*c);
    }
    drop_pending(fd, false);
    if (!shm) size_buffers(fd);
    welcome_msg w{.type = msg_welcome, .version = proto_version,
                  .flags = static_cast<uint16_t>(h.flags & (hello_offload | hello_shm)), .magic = proto_magic,
                  .status = 0, .max_mtu = o_.max_mtu};
    auto p = std::make_unique<daemon_port>(fd, h, o_.max_mtu, std::move(shm));
    uint32_t id = nb.add_port(std::move(p), limit);
    w.port_id = id;
    [[maybe_unused]] ssize_t r = ::send(fd, &w, sizeof w, MSG_DONTWAIT | MSG_NOSIGNAL);
  }

  int lfd_, ep_;
  std::string path_;
  listener_options o_;
  std::vector<pending_conn> pending_;
};

}  // namespace

core::result<std::unique_ptr<net::port_source>> listen(const std::string& path, const listener_options& o) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof sa.sun_path)
    return core::fail(ENAMETOOLONG, "socket path '" + path + "' is empty or too long");
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return core::fail(EEXIST, path + " exists and is not a socket");
    int probe = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    bool live = ::connect(probe, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
    ::close(probe);
    if (live) return core::fail(EADDRINUSE, "a switch is already listening on " + path);
    ::unlink(path.c_str());  // stale, from a switch that died
  }
  int lfd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (lfd < 0) return core::fail(errno, "socket");
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 || ::listen(lfd, 128) != 0) {
    int e = errno;
    ::close(lfd);
    return core::fail(e, "cannot listen on " + path);
  }
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{.events = EPOLLIN, .data = {.fd = lfd}};
  ::epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
  return std::unique_ptr<net::port_source>(std::make_unique<listener>(lfd, ep, path, o));
}

core::result<std::string> query_stats(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) return core::fail(ENAMETOOLONG, "socket path too long");
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    int e = errno;
    ::close(fd);
    return core::fail(e, "no switch at " + path);
  }
  hello_msg h{.type = msg_hello, .version = proto_version, .flags = hello_control, .magic = proto_magic};
  welcome_msg w{};
  int n = exchange(fd, &h, sizeof h, &w, sizeof w, 5000);
  if (n != static_cast<int>(sizeof w) || w.status != 0) {
    ::close(fd);
    return core::fail(EPROTO, "switch at " + path + " did not answer the stats query");
  }
  std::vector<char> buf(4 << 20);
  pollfd p{fd, POLLIN, 0};
  ::poll(&p, 1, 5000);
  ssize_t r = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
  ::close(fd);
  if (r < 1 || buf[0] != msg_stats) return core::fail(EPROTO, "no stats from the switch at " + path);
  return std::string(buf.data() + 1, static_cast<size_t>(r - 1));
}

}  // namespace uvd::daemon
