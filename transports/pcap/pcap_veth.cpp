// SPDX-License-Identifier: Apache-2.0
#include <fcntl.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "net/eth.hpp"
#include "transports/pcap/pcap.hpp"

namespace uvd::pcap {

namespace {

constexpr uint32_t magic_us = 0xa1b2c3d4, magic_ns = 0xa1b23c4d;
constexpr uint32_t linktype_ethernet = 1;

struct file_hdr {
  uint32_t magic;
  uint16_t major, minor;
  int32_t thiszone;
  uint32_t sigfigs, snaplen, linktype;
};
struct rec_hdr {
  uint32_t ts_sec, ts_frac, incl_len, orig_len;
};
static_assert(sizeof(file_hdr) == 24 && sizeof(rec_hdr) == 16);

uint32_t swap32(uint32_t v) { return __builtin_bswap32(v); }

struct pcap_dev {
  int out = -1, in = -1, timer = -1;
  bool follow = false, swapped = false, in_started = false, at_eof = false;
  bool nanos = false;  // the replayed file's timestamps are in nanoseconds
  // Paced replay: frames are due at their recorded offsets from the first
  // one, divided by speed (0: as fast as the receiver takes them).
  double speed = 0;
  bool paced_started = false;
  uint64_t first_ts_ns = 0;
  std::chrono::steady_clock::time_point first_at;
  uint32_t max_mtu = 65535;
  // Input buffer: records are parsed from [pos, len); refilled with read().
  std::unique_ptr<uint8_t[]> buf;
  size_t cap = 0, pos = 0, len = 0;
  uint64_t skip = 0;  // bytes of an oversize record still to pass over
  std::vector<iovec> iov;
  std::vector<rec_hdr> recs;
  std::atomic<uint64_t> rx_errors{0}, tx_dropped{0}, tx_errors{0};

  ~pcap_dev() {
    if (out >= 0) ::close(out);
    if (in >= 0) ::close(in);
    if (timer >= 0) ::close(timer);
  }
  // Wake the owner now (data may remain), after a while (following), or never.
  void arm(int64_t ns) {
    itimerspec t{};
    t.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    t.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    ::timerfd_settime(timer, 0, &t, nullptr);
  }
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

// Makes sure n bytes are buffered at pos; false at the end of the file (so far).
bool fill(pcap_dev& d, size_t n) {
  if (d.len - d.pos >= n) return true;
  if (d.pos) {
    std::memmove(d.buf.get(), d.buf.get() + d.pos, d.len - d.pos);
    d.len -= d.pos;
    d.pos = 0;
  }
  while (d.len < n) {
    ssize_t r = ::read(d.in, d.buf.get() + d.len, d.cap - d.len);
    if (r <= 0) return false;
    d.len += static_cast<size_t>(r);
  }
  return true;
}

int pcap_open(const core::veth_open_params* p, void** handle) {
  auto d = std::make_unique<pcap_dev>();
  const char* opts = p->options ? p->options : "";
  std::string v;
  if (core::find_option(opts, "max_mtu", &v)) {
    auto n = core::parse_size(v);
    if (!n || *n < net::eth_min_mtu || *n > 65535) {
      set_err(p, "max_mtu wants 68..65535");
      return -EINVAL;
    }
    d->max_mtu = static_cast<uint32_t>(*n);
  }
  d->follow = core::find_option(opts, "follow", &v) && v != "0";
  if (core::find_option(opts, "speed", &v)) {
    char* end = nullptr;
    double sp = std::strtod(v.c_str(), &end);
    if (v.empty() || *end || !(sp >= 0.001 && sp <= 1e6)) {
      set_err(p, "speed wants a factor of the recorded pace, 0.001..1000000 (1: as recorded)");
      return -EINVAL;
    }
    d->speed = sp;
  }
  std::string target = p->target ? p->target : "";
  if (!target.empty()) {
    d->out = ::open(target.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (d->out < 0) {
      int e = errno;
      set_err(p, "cannot create " + target + ": " + std::strerror(e));
      return -e;
    }
    file_hdr h{magic_us, 2, 4, 0, 0, 65535 + net::eth_hlen + net::vlan_hlen, linktype_ethernet};
    if (::write(d->out, &h, sizeof h) != sizeof h) return -errno;
  }
  d->timer = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (d->timer < 0) return -errno;
  if (core::find_option(opts, "in", &v)) {
    d->in = ::open(v.c_str(), O_RDONLY | O_CLOEXEC);
    if (d->in < 0) {
      int e = errno;
      set_err(p, "cannot open " + v + ": " + std::strerror(e));
      return -e;
    }
    d->cap = 256 * 1024 + net::max_frame_for_mtu(65535);
    d->buf.reset(new uint8_t[d->cap]);
    d->arm(1);
  }
  *handle = d.release();
  return 0;
}

void pcap_close(void* h) { delete static_cast<pcap_dev*>(h); }

int pcap_caps(void* h, core::veth_caps* out) {
  *out = core::veth_caps{.min_mtu = net::eth_min_mtu, .max_mtu = static_cast<pcap_dev*>(h)->max_mtu, .nqueues = 1};
  return 0;
}

int pcap_xmit(void* h, uint32_t, core::veth_frame* const* frames, uint32_t n) {
  auto* d = static_cast<pcap_dev*>(h);
  if (d->out < 0) {
    d->tx_dropped.fetch_add(n, std::memory_order_relaxed);
    return static_cast<int>(n);
  }
  auto now = std::chrono::system_clock::now().time_since_epoch();
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
  if (d->iov.size() < 2 * size_t(n)) {
    d->iov.resize(2 * size_t(n));
    d->recs.resize(n);
  }
  size_t total = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const auto& f = *frames[i];
    d->recs[i] = rec_hdr{static_cast<uint32_t>(us / 1000000), static_cast<uint32_t>(us % 1000000), f.len, f.len};
    d->iov[2 * i] = iovec{&d->recs[i], sizeof(rec_hdr)};
    d->iov[2 * i + 1] = iovec{f.data, f.len};
    total += sizeof(rec_hdr) + f.len;
  }
  // One write per burst (in slices of IOV_MAX), so a follower sees whole records.
  size_t done = 0;
  for (uint32_t at = 0; at < 2 * n; at += 1024) {
    int cnt = static_cast<int>(std::min<uint32_t>(1024, 2 * n - at));
    ssize_t w = ::writev(d->out, d->iov.data() + at, cnt);
    if (w < 0) {
      d->tx_errors.fetch_add(n, std::memory_order_relaxed);
      return static_cast<int>(n);
    }
    done += static_cast<size_t>(w);
  }
  if (done != total) d->tx_errors.fetch_add(1, std::memory_order_relaxed);
  return static_cast<int>(n);
}

int pcap_rx_poll(void* h, uint32_t, core::veth_frame* frames, uint32_t budget) {
  auto* d = static_cast<pcap_dev*>(h);
  if (d->in < 0) return 0;
  uint64_t ticks;
  [[maybe_unused]] ssize_t r = ::read(d->timer, &ticks, sizeof ticks);
  if (!d->in_started) {
    if (!fill(*d, sizeof(file_hdr))) {
      if (d->follow) d->arm(10'000'000);
      return 0;
    }
    file_hdr fh;
    std::memcpy(&fh, d->buf.get() + d->pos, sizeof fh);
    d->pos += sizeof fh;
    if (fh.magic == magic_us || fh.magic == magic_ns) {
      d->swapped = false;
      d->nanos = fh.magic == magic_ns;
    } else if (swap32(fh.magic) == magic_us || swap32(fh.magic) == magic_ns) {
      d->swapped = true;
      d->nanos = swap32(fh.magic) == magic_ns;
    } else {
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);  // not a pcap file: nothing to replay
      ::close(d->in);
      d->in = -1;
      return 0;
    }
    uint32_t lt = d->swapped ? swap32(fh.linktype) : fh.linktype;
    if (lt != linktype_ethernet) {
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      ::close(d->in);
      d->in = -1;
      return 0;
    }
    d->in_started = true;
  }
  const uint32_t max_frame = net::max_frame_for_mtu(d->max_mtu);
  uint32_t n = 0;
  bool eof = false;
  int64_t wait_ns = 0;  // paced: the next frame is not due for this long
  while (n < budget) {
    if (d->skip) {  // passing over an oversize record
      size_t have = d->len - d->pos;
      size_t k = static_cast<size_t>(std::min<uint64_t>(have, d->skip));
      d->pos += k;
      d->skip -= k;
      if (d->skip && !fill(*d, 1)) {
        eof = true;
        break;
      }
      continue;
    }
    if (!fill(*d, sizeof(rec_hdr))) {
      eof = true;
      break;
    }
    rec_hdr rh;
    std::memcpy(&rh, d->buf.get() + d->pos, sizeof rh);  // copy, then validate
    uint32_t incl = d->swapped ? swap32(rh.incl_len) : rh.incl_len;
    uint32_t orig = d->swapped ? swap32(rh.orig_len) : rh.orig_len;
    if (d->speed > 0) {
      uint64_t sec = d->swapped ? swap32(rh.ts_sec) : rh.ts_sec;
      uint64_t frac = d->swapped ? swap32(rh.ts_frac) : rh.ts_frac;
      uint64_t ts = sec * 1'000'000'000 + frac * (d->nanos ? 1 : 1000);
      auto now = std::chrono::steady_clock::now();
      if (!d->paced_started) {
        d->paced_started = true;
        d->first_ts_ns = ts;
        d->first_at = now;
      }
      // A timestamp that goes backwards is due at once (captures merged out of order).
      double offset = ts > d->first_ts_ns ? double(ts - d->first_ts_ns) / d->speed : 0.0;
      auto due = d->first_at + std::chrono::nanoseconds(static_cast<int64_t>(offset));
      if (due > now) {
        wait_ns = std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::nanoseconds>(due - now).count());
        break;
      }
    }
    if (incl > max_frame || incl > frames[n].len) {  // oversize: skip its bytes
      d->pos += sizeof rh;
      d->skip = incl;
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (!fill(*d, sizeof rh + incl)) {
      eof = true;
      break;
    }
    const uint8_t* data = d->buf.get() + d->pos + sizeof rh;
    d->pos += sizeof rh + incl;
    if (incl < net::eth_min_frame || incl < orig) {  // undersize, or captured short of the frame
      d->rx_errors.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    std::memcpy(frames[n].data, data, incl);
    frames[n].len = incl;
    frames[n].flags = 0;
    ++n;
  }
  if (wait_ns) {
    d->arm(wait_ns);  // paced: come back when the next frame is due
  } else if (!eof) {
    d->arm(1);  // more may be waiting: come back at once
  } else if (d->follow) {
    d->arm(2'000'000);
  } else if (d->len > d->pos || d->skip) {
    // The file ends inside a record: it was cut off. Count it once.
    d->rx_errors.fetch_add(1, std::memory_order_relaxed);
    d->pos = d->len;
    d->skip = 0;
  }
  return static_cast<int>(n);
}

int pcap_link_state(void*) { return 1; }

int pcap_rx_fd(void* h, uint32_t) { return static_cast<pcap_dev*>(h)->timer; }

int pcap_stats(void* h, core::veth_stats_extra* out) {
  auto* d = static_cast<pcap_dev*>(h);
  *out = core::veth_stats_extra{.rx_errors = d->rx_errors.load(std::memory_order_relaxed),
                                .tx_dropped = d->tx_dropped.load(std::memory_order_relaxed),
                                .tx_errors = d->tx_errors.load(std::memory_order_relaxed)};
  return 0;
}

}  // namespace

const core::veth_ops pcap_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "pcap",
    .description = "transmit into a pcap file, replay received frames from one (tracing and replay)",
    .open = pcap_open,
    .close = pcap_close,
    .caps = pcap_caps,
    .xmit = pcap_xmit,
    .rx_poll = pcap_rx_poll,
    .link_state = pcap_link_state,
    .rx_fd = pcap_rx_fd,
    .stats = pcap_stats,
};

}  // namespace uvd::pcap
