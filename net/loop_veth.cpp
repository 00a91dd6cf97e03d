// SPDX-License-Identifier: Apache-2.0
#include "net/loop_veth.hpp"

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

namespace uvd::net {

namespace {

struct slot_meta {
  uint32_t len;
  uint32_t flags;
  uint16_t csum_start, csum_offset, gso_size;
  uint8_t gso_type;
};

// Single producer (xmit on queue q), single consumer (rx_poll on queue q).
// Free-running indices; a slot is published by the release store of head.
struct ring {
  uint32_t depth = 0, slot_len = 0;
  std::unique_ptr<uint8_t[]> data;
  std::unique_ptr<slot_meta[]> meta;
  alignas(64) std::atomic<uint32_t> head{0};  // next slot the producer fills
  alignas(64) std::atomic<uint32_t> tail{0};  // next slot the consumer drains
  std::atomic<bool> want_wake{false};
};

struct loop_dev {
  const core::veth_host* host = nullptr;
  uint32_t nqueues = 1, max_mtu = 9000;
  bool offload = false;
  std::vector<std::unique_ptr<ring>> rings;
  std::atomic<uint64_t> tx_too_big{0};
};

void set_err(const core::veth_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

int option_u32(const core::veth_open_params* p, const char* key, uint32_t lo, uint32_t hi, uint32_t* out) {
  std::string v;
  if (!core::find_option(p->options ? p->options : "", key, &v)) return 0;
  auto n = core::parse_size(v);
  if (!n || *n < lo || *n > hi) {
    set_err(p, std::string("option ") + key + " wants " + std::to_string(lo) + ".." + std::to_string(hi));
    return -EINVAL;
  }
  *out = static_cast<uint32_t>(*n);
  return 0;
}

int loop_open(const core::veth_open_params* p, void** handle) {
  auto d = std::make_unique<loop_dev>();
  d->host = p->host;
  uint32_t depth = 256, queues = 8, offload = 0;
  if (int rc = option_u32(p, "depth", 1, 65536, &depth); rc < 0) return rc;
  if (int rc = option_u32(p, "queues", 1, 64, &queues); rc < 0) return rc;
  if (int rc = option_u32(p, "offload", 0, 1, &offload); rc < 0) return rc;
  if (int rc = option_u32(p, "max_mtu", eth_min_mtu, 65535, &d->max_mtu); rc < 0) return rc;
  d->offload = offload != 0;
  d->nqueues = std::min(queues, std::max<uint32_t>(p->nqueues, 1));
  uint32_t slot_len = max_frame_for_mtu(d->max_mtu);
  if (d->offload) slot_len = std::max(slot_len, gso_max_frame);
  for (uint32_t q = 0; q < d->nqueues; ++q) {
    auto r = std::make_unique<ring>();
    r->depth = depth;
    r->slot_len = slot_len;
    r->data.reset(new uint8_t[size_t(depth) * slot_len]);
    r->meta.reset(new slot_meta[depth]);
    d->rings.push_back(std::move(r));
  }
  *handle = d.release();
  return 0;
}

void loop_close(void* h) { delete static_cast<loop_dev*>(h); }

int loop_caps(void* h, core::veth_caps* out) {
  auto* d = static_cast<loop_dev*>(h);
  *out = core::veth_caps{.min_mtu = eth_min_mtu, .max_mtu = d->max_mtu, .nqueues = d->nqueues};
  if (d->offload) out->features = core::VETH_F_TX_CSUM | core::VETH_F_RX_CSUM | core::VETH_F_TSO | core::VETH_F_SG;
  return 0;
}

int loop_xmit(void* h, uint32_t q, core::veth_frame* const* frames, uint32_t n) {
  auto* d = static_cast<loop_dev*>(h);
  ring& r = *d->rings[q];
  uint32_t head = r.head.load(std::memory_order_relaxed);
  uint32_t tail = r.tail.load(std::memory_order_acquire);
  uint32_t i = 0;
  for (; i < n; ++i) {
    if (head - tail == r.depth) {
      // Full: ask for a wake-up, then look once more (the consumer may have
      // drained in between and will not see want_wake).
      r.want_wake.store(true, std::memory_order_seq_cst);
      tail = r.tail.load(std::memory_order_seq_cst);
      if (head - tail == r.depth) break;
      r.want_wake.store(false, std::memory_order_relaxed);
    }
    const core::veth_frame& f = *frames[i];
    if (f.len > r.slot_len) {  // cannot carry it: taken, counted
      d->tx_too_big.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    uint32_t s = head % r.depth;
    std::memcpy(r.data.get() + size_t(s) * r.slot_len, f.data, f.len);
    r.meta[s] = slot_meta{f.len, f.flags, f.csum_start, f.csum_offset, f.gso_size, f.gso_type};
    ++head;
  }
  r.head.store(head, std::memory_order_release);
  if (i > 0 && d->host) d->host->rx_ready(d->host->owner, q);
  return static_cast<int>(i);
}

int loop_rx_poll(void* h, uint32_t q, core::veth_frame* frames, uint32_t budget) {
  auto* d = static_cast<loop_dev*>(h);
  ring& r = *d->rings[q];
  uint32_t tail = r.tail.load(std::memory_order_relaxed);
  uint32_t head = r.head.load(std::memory_order_acquire);
  uint32_t n = 0;
  while (n < budget && tail != head) {
    uint32_t s = tail % r.depth;
    const slot_meta& m = r.meta[s];
    core::veth_frame& f = frames[n];
    if (m.len <= f.len) {
      std::memcpy(f.data, r.data.get() + size_t(s) * r.slot_len, m.len);
      f.len = m.len;
      f.flags = m.flags;
      f.csum_start = m.csum_start;
      f.csum_offset = m.csum_offset;
      f.gso_size = m.gso_size;
      f.gso_type = m.gso_type;
      ++n;
    }
    ++tail;
  }
  r.tail.store(tail, std::memory_order_seq_cst);
  if (r.want_wake.load(std::memory_order_seq_cst) && r.want_wake.exchange(false) && d->host)
    d->host->tx_done(d->host->owner, q);
  if (tail != r.head.load(std::memory_order_acquire) && d->host) d->host->rx_ready(d->host->owner, q);
  return static_cast<int>(n);
}

int loop_link_state(void*) { return 1; }

int loop_stats(void* h, core::veth_stats_extra* out) {
  auto* d = static_cast<loop_dev*>(h);
  *out = core::veth_stats_extra{};
  out->tx_errors = d->tx_too_big.load(std::memory_order_relaxed);
  return 0;
}

}  // namespace

const core::veth_ops loop_veth_ops{
    .abi_version = core::VETH_ABI_VERSION,
    .struct_size = sizeof(core::veth_ops),
    .name = "loop",
    .description = "loopback NIC made of rings (reference transport and test double)",
    .open = loop_open,
    .close = loop_close,
    .caps = loop_caps,
    .xmit = loop_xmit,
    .rx_poll = loop_rx_poll,
    .link_state = loop_link_state,
    .stats = loop_stats,
};

}  // namespace uvd::net
