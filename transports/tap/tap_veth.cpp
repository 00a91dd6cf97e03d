// SPDX-License-Identifier: Apache-2.0
// The tap transport's ops: frames to and from the kernel through one
// non-blocking fd per queue, with a virtio_net_hdr in front when offloading.
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "net/eth.hpp"
#include "transports/tap/tap.hpp"
#include "transports/tap/tap_device.hpp"

namespace uvd::tap {

namespace {

struct tap_dev {
  std::string name;
  std::vector<int> fds;
  int ctl = -1;
  bool offload = true;
  bool created = false;  // we made the interface (it goes away with our fds)
  std::atomic<uint64_t> tx_dropped{0}, tx_errors{0}, rx_errors{0};

  ~tap_dev() {
    for (int fd : fds) ::close(fd);
    if (ctl >= 0) ::close(ctl);
  }
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

bool option_flag(const char* options, const char* key, bool dflt) {
  std::string v;
  if (!core::find_option(options ? options : "", key, &v)) return dflt;
  return v != "0" && v != "no" && v != "off" && v != "false";
}

int tap_open(const core::veth_open_params* p, void** handle) {
  auto d = std::make_unique<tap_dev>();
  const char* opts = p->options ? p->options : "";
  d->offload = option_flag(opts, "offload", true);
  uint32_t queues = p->nqueues ? p->nqueues : 1;
  std::string v;
  if (core::find_option(opts, "queues", &v)) {
    auto n = core::parse_size(v);
    if (!n || *n < 1 || *n > 64) {
      set_err(p, "queues wants 1..64");
      return -EINVAL;
    }
    queues = static_cast<uint32_t>(*n);
  }
  tap_queue_params qp;
  qp.name = p->target ? p->target : "";
  if (core::find_option(opts, "dev", &v)) qp.dev = v;
  qp.vnet_hdr = d->offload;
  qp.multi_queue = queues > 1;
  d->created = !if_exists(qp.name);
  std::string err;
  for (uint32_t q = 0; q < queues; ++q) {
    std::string actual;
    int fd = open_tap_queue(qp, &actual, &err);
    if (fd < 0) {
      set_err(p, err);
      return fd;
    }
    d->fds.push_back(fd);
    if (q == 0) qp.name = d->name = actual;
    if (int rc = set_tap_offload(fd, d->offload, &err); rc < 0) {
      set_err(p, err);
      return rc;
    }
  }
  d->ctl = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (d->ctl < 0) {
    set_err(p, std::string("control socket: ") + std::strerror(errno));
    return -errno;
  }
  if (!option_flag(opts, "keep_mac", false) && p->mac)
    if (int rc = set_if_mac(d->ctl, d->name, p->mac, &err); rc < 0) {
      set_err(p, err);
      return rc;
    }
  if (p->mtu)
    if (int rc = set_if_mtu(d->ctl, d->name, p->mtu, &err); rc < 0) {
      set_err(p, err);
      return rc;
    }
  if (option_flag(opts, "up", true))
    if (int rc = set_if_up(d->ctl, d->name, true, &err); rc < 0) {
      set_err(p, err);
      return rc;
    }
  set_tap_carrier(d->fds[0], true, &err);  // older kernels lack it; the link is then always up
  *handle = d.release();
  return 0;
}

void tap_close(void* h) { delete static_cast<tap_dev*>(h); }

int tap_caps(void* h, core::veth_caps* out) {
  auto* d = static_cast<tap_dev*>(h);
  *out = core::veth_caps{.min_mtu = net::eth_min_mtu, .max_mtu = 65535, .nqueues = static_cast<uint32_t>(d->fds.size())};
  if (d->offload) out->features = core::VETH_F_TX_CSUM | core::VETH_F_RX_CSUM | core::VETH_F_TSO | core::VETH_F_SG;
  return 0;
}

int tap_xmit(void* h, uint32_t q, core::veth_frame* const* frames, uint32_t n) {
  auto* d = static_cast<tap_dev*>(h);
  int fd = d->fds[q];
  for (uint32_t i = 0; i < n; ++i) {
    const core::veth_frame& f = *frames[i];
    ssize_t w;
    if (d->offload) {
      vnet_hdr vh{};
      if (f.flags & core::VETH_FRAME_CSUM_PARTIAL) {
        vh.flags = vnet_f_needs_csum;
        vh.csum_start = f.csum_start;
        vh.csum_offset = f.csum_offset;
      } else if (f.flags & core::VETH_FRAME_CSUM_VALID) {
        vh.flags = vnet_f_data_valid;
      }
      if (f.flags & core::VETH_FRAME_GSO) {
        vh.gso_type = f.gso_type == 2 ? vnet_gso_tcpv6 : vnet_gso_tcpv4;
        vh.gso_type |= f.gso_type & vnet_gso_ecn;
        vh.gso_size = f.gso_size;
        // The headers the kernel copies into each segment: up to the TCP payload.
        uint32_t hl = uint32_t(f.csum_start) + 20;
        if (uint32_t(f.csum_start) + 13 < f.len) hl = f.csum_start + (f.data[f.csum_start + 12] >> 4) * 4u;
        vh.hdr_len = static_cast<uint16_t>(std::min(hl, f.len));
      }
      iovec iov[2] = {{&vh, sizeof vh}, {f.data, f.len}};
      w = ::writev(fd, iov, 2);
    } else {
      w = ::write(fd, f.data, f.len);
    }
    if (w >= 0) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return static_cast<int>(i);
    if (errno == EIO)  // the kernel interface is down: the frame falls on the floor, as on a wire
      d->tx_dropped.fetch_add(1, std::memory_order_relaxed);
    else
      d->tx_errors.fetch_add(1, std::memory_order_relaxed);
  }
  return static_cast<int>(n);
}

int tap_rx_poll(void* h, uint32_t q, core::veth_frame* frames, uint32_t budget) {
  auto* d = static_cast<tap_dev*>(h);
  int fd = d->fds[q];
  uint32_t n = 0;
  while (n < budget) {
    core::veth_frame& f = frames[n];
    ssize_t r;
    vnet_hdr vh{};
    if (d->offload) {
      iovec iov[2] = {{&vh, sizeof vh}, {f.data, f.len}};
      r = ::readv(fd, iov, 2);
      if (r >= 0) r -= static_cast<ssize_t>(sizeof vh);
    } else {
      r = ::read(fd, f.data, f.len);
    }
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    f.len = static_cast<uint32_t>(r);
    f.flags = 0;
    f.gso_size = 0;
    f.gso_type = 0;
    if (vh.flags & vnet_f_needs_csum) {
      f.flags |= core::VETH_FRAME_CSUM_PARTIAL;
      f.csum_start = vh.csum_start;
      f.csum_offset = vh.csum_offset;
    } else if (vh.flags & vnet_f_data_valid) {
      f.flags |= core::VETH_FRAME_CSUM_VALID;
    }
    uint8_t gt = vh.gso_type & ~vnet_gso_ecn;
    if (gt == vnet_gso_tcpv4 || gt == vnet_gso_tcpv6) {
      f.flags |= core::VETH_FRAME_GSO;
      f.gso_size = vh.gso_size;
      f.gso_type = static_cast<uint8_t>((gt == vnet_gso_tcpv6 ? 2 : 1) | (vh.gso_type & vnet_gso_ecn));
    } else if (gt != vnet_gso_none) {
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);  // a kind we never enabled
      continue;
    }
    ++n;
  }
  return static_cast<int>(n);
}

int tap_link_state(void*) { return 1; }

int tap_set_link(void* h, int up) {
  auto* d = static_cast<tap_dev*>(h);
  std::string err;
  int rc = set_tap_carrier(d->fds[0], up != 0, &err);
  return rc == -EINVAL || rc == -ENOTTY ? 0 : rc;
}

int tap_set_mtu(void* h, uint32_t mtu) {
  auto* d = static_cast<tap_dev*>(h);
  std::string err;
  return set_if_mtu(d->ctl, d->name, mtu, &err);
}

int tap_set_mac(void* h, const uint8_t* mac) {
  auto* d = static_cast<tap_dev*>(h);
  std::string err;
  return set_if_mac(d->ctl, d->name, mac, &err);
}

int tap_rx_fd(void* h, uint32_t q) { return static_cast<tap_dev*>(h)->fds[q]; }

int tap_stats(void* h, core::veth_stats_extra* out) {
  auto* d = static_cast<tap_dev*>(h);
  *out = core::veth_stats_extra{.rx_errors = d->rx_errors.load(std::memory_order_relaxed),
                                .tx_dropped = d->tx_dropped.load(std::memory_order_relaxed),
                                .tx_errors = d->tx_errors.load(std::memory_order_relaxed)};
  return 0;
}

}  // namespace

const core::veth_ops tap_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "tap",
    .description = "Linux TUN/TAP interface (/dev/net/tun), vnet_hdr offloads, multi-queue",
    .open = tap_open,
    .close = tap_close,
    .caps = tap_caps,
    .xmit = tap_xmit,
    .rx_poll = tap_rx_poll,
    .link_state = tap_link_state,
    .set_mtu = tap_set_mtu,
    .set_mac = tap_set_mac,
    .rx_fd = tap_rx_fd,
    .stats = tap_stats,
    .set_link = tap_set_link,
};

}  // namespace uvd::tap
