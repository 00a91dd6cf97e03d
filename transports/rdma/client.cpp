// SPDX-License-Identifier: Apache-2.0
// The rdma client: vstore_ops over one RC connection to a uvd storage server.
// Control path (client_conn.cpp): rdma_cm resolve/connect, OPEN, FENCE.
// Data path (here): submit() posts
// RDMA WRITE + SEND (writes) or SEND (reads); one completion thread reaps the
// CQ (sleeping on the completion channel, or polling busy_poll_us first),
// RDMA READs read data once the server replied, and completes requests.
//
// What a request costs is mostly system calls and wake-ups (Soft-RoCE does
// the transport in the kernel, and every post_send is a system call), so:
// RPC SENDs go inline and unsignaled (the reply proves the server has the
// RPC; one CQE instead of two), of the RDMA READs of one reply only the last
// is signaled (send completions come in order), the READs that one pass over
// the CQ asks for go to the device in one post, and while busy-polling the
// thread yields the CPU between polls so that the peer it waits for can run.
#include <netdb.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "core/log.hpp"
#include "core/uri.hpp"
#include "transports/rdma/protocol.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/verbs.hpp"
#include "transports/rdma/client_impl.hpp"

namespace uvd::rdma {

namespace client_detail {

// Gives sl.nseg segments to sl: the first run of that many free adjacent
// ones, else the lowest free ones. segs_free >= sl.nseg. mu held.
void client::take_segs_locked(rpc_slot& sl) {
  const uint32_t want = sl.nseg;
  if (want == 0) return;
  uint32_t run = 0;
  for (uint32_t i = 0; i < geo.nsegs; ++i) {
    run = seg_busy[i] ? 0 : run + 1;
    if (run == want) {
      for (uint32_t k = 0; k < want; ++k) sl.segs[k] = static_cast<uint16_t>(i + 1 - want + k);
      break;
    }
  }
  if (run != want)
    for (uint32_t i = 0, k = 0; k < want; ++i)
      if (!seg_busy[i]) sl.segs[k++] = static_cast<uint16_t>(i);
  for (uint32_t k = 0; k < want; ++k) seg_busy[sl.segs[k]] = 1;
  segs_free -= want;
}

void client::put_segs_locked(const rpc_slot& sl) {
  for (uint16_t i = 0; i < sl.nseg; ++i) seg_busy[sl.segs[i]] = 0;
  segs_free += sl.nseg;
}

// Adjacent segments whose server addresses are adjacent too (one MR) move as
// one RDMA op: fewer work requests, and one READ request instead of several.
uint32_t client::runs_of(const rpc_slot& sl, std::pair<uint16_t, uint32_t>* out) const {
  uint32_t n = 0;
  for (uint16_t i = 0; i < sl.nseg; ++i) {
    const uint32_t len = i + 1 == sl.nseg ? sl.last_len : geo.segment_size;
    if (n && sl.segs[i] == sl.segs[i - 1] + 1 && geo.pool[sl.segs[i]].rkey == geo.pool[sl.segs[i - 1]].rkey &&
        geo.pool[sl.segs[i]].addr == geo.pool[sl.segs[i - 1]].addr + geo.segment_size) {
      out[n - 1].second += len;
    } else {
      out[n++] = {sl.segs[i], len};
    }
  }
  return n;
}

// Builds and posts the RPC of slot s (segments already allocated). mu held.
int client::post_rpc_locked(uint32_t s, vstore_req* r) {
  rpc_slot& sl = slots[s];
  io_rpc rpc;
  switch (r->opcode) {
    case core::VSTORE_OP_READ: rpc.hdr.opcode = OP_READ; break;
    case core::VSTORE_OP_WRITE: rpc.hdr.opcode = OP_WRITE; break;
    case core::VSTORE_OP_FLUSH: rpc.hdr.opcode = OP_FLUSH; break;
    case core::VSTORE_OP_DISCARD: rpc.hdr.opcode = OP_DISCARD; break;
    case core::VSTORE_OP_WRITE_ZEROES: rpc.hdr.opcode = OP_WRITE_ZEROES; break;
    default: return -EINVAL;
  }
  rpc.hdr.id = uint64_t{sl.gen} << 32 | s;
  rpc.hdr.epoch = r->epoch;
  rpc.offset = r->opcode == core::VSTORE_OP_FLUSH ? 0 : r->offset;
  rpc.length = r->opcode == core::VSTORE_OP_FLUSH ? 0 : r->length;
  rpc.flags = r->flags & known_rpc_flags;
  rpc.nseg = sl.nseg;
  for (uint16_t i = 0; i < sl.nseg; ++i) {
    rpc.segs[i].handle = geo.pool[sl.segs[i]].handle;
    rpc.segs[i].offset = 0;
    rpc.segs[i].length = i + 1 == sl.nseg ? sl.last_len : geo.segment_size;
  }
  size_t len = encode_io(rpc, send_buf(s));

  ibv_sge sges[max_segs_per_rpc + 1];
  ibv_send_wr wrs[max_segs_per_rpc + 1] = {};
  uint32_t n = 0;
  if (r->opcode == core::VSTORE_OP_WRITE) {
    // Data first, into the server's segments; the SEND behind it on the same
    // RC queue pair is delivered only after the data was placed.
    std::pair<uint16_t, uint32_t> runs[max_segs_per_rpc];
    const uint32_t nruns = runs_of(sl, runs);
    for (uint32_t i = 0; i < nruns; ++i, ++n) {
      sges[n] = {reinterpret_cast<uintptr_t>(seg_buf(runs[i].first)), runs[i].second, staging.lkey()};
      wrs[n].wr_id = wr_id(WR_WRITE, s);
      wrs[n].sg_list = &sges[n];
      wrs[n].num_sge = 1;
      wrs[n].opcode = IBV_WR_RDMA_WRITE;
      wrs[n].wr.rdma.remote_addr = geo.pool[runs[i].first].addr;
      wrs[n].wr.rdma.rkey = geo.pool[runs[i].first].rkey;
    }
  }
  if (sq_used() + n + 1 > sq_cap) return -EAGAIN;  // wait for completions to free the queue
  // An inline SEND leaves nothing of ours for the device to read later, so
  // it needs no completion; past half the queue one is asked for anyway.
  const bool inl = len <= max_inline;
  const bool signaled = !inl || sq_used() + n + 1 > sq_cap / 2;
  sges[n] = {reinterpret_cast<uintptr_t>(send_buf(s)), static_cast<uint32_t>(len), msgs.lkey()};
  wrs[n].wr_id = wr_id(WR_SEND, s);
  wrs[n].sg_list = &sges[n];
  wrs[n].num_sge = 1;
  wrs[n].opcode = IBV_WR_SEND;
  wrs[n].send_flags = (inl ? IBV_SEND_INLINE : 0) | (signaled ? IBV_SEND_SIGNALED : 0);
  ++n;
  for (uint32_t i = 0; i + 1 < n; ++i) wrs[i].next = &wrs[i + 1];
  ibv_send_wr* bad = nullptr;
  int rc = ibv_post_send(id->qp, wrs, &bad);
  if (rc) return -rc;
  sq_posted += n;
  sl.send_done = !signaled;
  sl.send_mark = sq_posted;
  return 0;
}

int client::submit(vstore_req* const* reqs, uint32_t n) {
  std::lock_guard lk(mu);
  if (int d = dead.load()) return d;
  uint32_t taken = 0;
  for (; taken < n; ++taken) {
    vstore_req* r = reqs[taken];
    bool data = r->opcode == core::VSTORE_OP_READ || r->opcode == core::VSTORE_OP_WRITE;
    uint32_t need = data ? static_cast<uint32_t>((r->length + geo.segment_size - 1) / geo.segment_size) : 0;
    if (data && (r->length == 0 || r->length > max_transfer)) return taken ? static_cast<int>(taken) : -EINVAL;
    if (free_slots.empty() || segs_free < need) break;
    uint32_t s = free_slots.back();
    free_slots.pop_back();
    rpc_slot& sl = slots[s];
    sl.req = r;
    ++sl.gen;
    sl.busy = true;
    sl.send_done = sl.reply_done = sl.ctl = sl.ctl_done = false;
    sl.status = 0;
    sl.reads_left = 0;
    sl.nseg = static_cast<uint16_t>(need);
    take_segs_locked(sl);
    sl.last_len = need ? static_cast<uint32_t>(r->length - uint64_t{need - 1} * geo.segment_size) : 0;
    if (r->opcode == core::VSTORE_OP_WRITE) {
      // Gather the caller's iovec into the staging segments.
      uint32_t seg = 0, seg_off = 0;
      for (uint32_t i = 0; i < r->iovcnt; ++i) {
        auto* src = static_cast<const std::byte*>(r->iov[i].iov_base);
        size_t left = r->iov[i].iov_len;
        while (left) {
          size_t k = std::min<size_t>(left, geo.segment_size - seg_off);
          std::memcpy(seg_buf(sl.segs[seg]) + seg_off, src, k);
          src += k;
          left -= k;
          seg_off += static_cast<uint32_t>(k);
          if (seg_off == geo.segment_size) {
            ++seg;
            seg_off = 0;
          }
        }
      }
    }
    if (int rc = post_rpc_locked(s, r); rc < 0) {
      put_segs_locked(sl);
      uint32_t gen = sl.gen;
      sl = {};
      sl.gen = gen;
      free_slots.push_back(s);
      if (rc == -EAGAIN) break;  // the send queue is full of work in flight: resubmitted on its completion
      spdlog::warn("rdma {}: ibv_post_send failed: {}", target, std::strerror(-rc));
      return taken ? static_cast<int>(taken) : -ENOTCONN;
    }
  }
  return static_cast<int>(taken);
}

// Frees slot s and queues its request's completion. mu held.
void client::finish_slot_locked(uint32_t s, std::vector<std::pair<vstore_req*, int>>& done) {
  rpc_slot& sl = slots[s];
  if (sl.ctl) {
    sl.ctl_done = true;
    ctl_cv.notify_all();
    return;  // the waiter frees it
  }
  if (sl.req) done.emplace_back(sl.req, sl.status);
  put_segs_locked(sl);
  uint32_t gen = sl.gen;
  sl = {};
  sl.gen = gen;
  free_slots.push_back(s);
  ctl_cv.notify_all();  // a fence may be waiting for a slot
}

void client::fail_all(int err, std::vector<std::pair<vstore_req*, int>>& done) {
  int expected = 0;
  if (dead.compare_exchange_strong(expected, err))
    spdlog::warn("rdma {}: connection lost ({}); failing requests in flight", target, std::strerror(-err));
  for (uint32_t s = 0; s < slots.size(); ++s) {
    if (!slots[s].busy) continue;
    slots[s].status = dead.load();
    finish_slot_locked(s, done);
  }
}

void client::on_wc(const ibv_wc& wc, std::vector<std::pair<vstore_req*, int>>& done) {
  const uint64_t kind = wr_kind(wc.wr_id);
  const uint32_t s = wr_slot(wc.wr_id);
  if (wc.status != IBV_WC_SUCCESS) {
    if (!dead.load() && wc.status != IBV_WC_WR_FLUSH_ERR)
      spdlog::warn("rdma {}: work request failed: {}", target, wc_error_text(wc));
    fail_all(-ECONNRESET, done);
    return;
  }
  if (dead.load()) return;
  if (kind == WR_RECV) {
    if (s >= nbufs) return;
    auto rep = decode_reply({recv_buf(s), wc.byte_len});
    int prc = post_recv(id->qp, wr_id(WR_RECV, s), recv_buf(s), msg_size, msgs.lkey());
    if (!rep || prc < 0) {
      spdlog::warn("rdma {}: {}", target, rep ? "ibv_post_recv failed" : "bad reply from server: " + rep.err().message);
      fail_all(-EPROTO, done);
      return;
    }
    uint32_t rs = static_cast<uint32_t>(rep->hdr.id & 0xffffffff);
    uint32_t gen = static_cast<uint32_t>(rep->hdr.id >> 32);
    if (rs >= slots.size() || !slots[rs].busy || slots[rs].gen != gen || slots[rs].reply_done) {
      spdlog::warn("rdma {}: reply for id {:#x}, which is not in flight", target, rep->hdr.id);
      fail_all(-EPROTO, done);
      return;
    }
    rpc_slot& sl = slots[rs];
    sl.reply_done = true;
    sl.status = rep->status;
    sl.reply_epoch = rep->epoch;
    if (sl.req && sl.req->opcode == core::VSTORE_OP_READ && rep->status == 0) {
      queue_reads_locked(rs);  // the data waits in the server's segments: fetch it
      return;
    }
    if (sl.send_done) finish_slot_locked(rs, done);
    return;
  }
  if (s >= slots.size() || !slots[s].busy) return;
  rpc_slot& sl = slots[s];
  if (kind == WR_SEND) {
    sq_freed = std::max(sq_freed, sl.send_mark);
    sl.send_done = true;
    if (sl.reply_done && sl.reads_left == 0) finish_slot_locked(s, done);
  } else if (kind == WR_READ) {
    sq_freed = std::max(sq_freed, sl.read_mark);
    if (sl.reads_left && --sl.reads_left == 0) {
      // Scatter the staging segments into the caller's iovec.
      vstore_req* r = sl.req;
      uint32_t seg = 0, seg_off = 0;
      for (uint32_t i = 0; i < r->iovcnt; ++i) {
        auto* dst = static_cast<std::byte*>(r->iov[i].iov_base);
        size_t left = r->iov[i].iov_len;
        while (left) {
          size_t k = std::min<size_t>(left, geo.segment_size - seg_off);
          std::memcpy(dst, seg_buf(sl.segs[seg]) + seg_off, k);
          dst += k;
          left -= k;
          seg_off += static_cast<uint32_t>(k);
          if (seg_off == geo.segment_size) {
            ++seg;
            seg_off = 0;
          }
        }
      }
      if (sl.send_done) finish_slot_locked(s, done);
    }
  }
}

// Chains the RDMA READs of slot s's segments (only the last one signaled:
// the send queue completes in order) for flush_reads_locked. mu held.
void client::queue_reads_locked(uint32_t s) {
  rpc_slot& sl = slots[s];
  std::pair<uint16_t, uint32_t> runs[max_segs_per_rpc];
  const uint32_t nruns = runs_of(sl, runs);
  for (uint32_t i = 0; i < nruns; ++i) {
    read_sges.push_back({reinterpret_cast<uintptr_t>(seg_buf(runs[i].first)), runs[i].second, staging.lkey()});
    ibv_send_wr w{};
    w.wr_id = wr_id(WR_READ, s);
    w.num_sge = 1;
    w.opcode = IBV_WR_RDMA_READ;
    w.send_flags = i + 1 == nruns ? IBV_SEND_SIGNALED : 0;
    w.wr.rdma.remote_addr = geo.pool[runs[i].first].addr;
    w.wr.rdma.rkey = geo.pool[runs[i].first].rkey;
    read_wrs.push_back(w);
  }
  sq_posted += nruns;  // posted by the flush that follows, or the connection fails
  sl.read_mark = sq_posted;
  sl.reads_left = 1;
}

// Posts the READs queued during this pass as one chain (one system call). mu held.
void client::flush_reads_locked(std::vector<std::pair<vstore_req*, int>>& done) {
  if (read_wrs.empty()) return;
  if (dead.load()) {  // the slots were failed meanwhile
    read_wrs.clear();
    read_sges.clear();
    return;
  }
  for (size_t i = 0; i < read_wrs.size(); ++i) {
    read_wrs[i].sg_list = &read_sges[i];
    read_wrs[i].next = i + 1 < read_wrs.size() ? &read_wrs[i + 1] : nullptr;
  }
  ibv_send_wr* bad = nullptr;
  int rc = ibv_post_send(id->qp, read_wrs.data(), &bad);
  read_wrs.clear();
  read_sges.clear();
  if (rc != 0) {
    spdlog::warn("rdma {}: posting RDMA READ failed: {}", target, std::strerror(rc));
    fail_all(-ECONNRESET, done);
  }
}

int client::reap(int budget) {
  ibv_wc wc[32];
  int total = 0;
  std::vector<std::pair<vstore_req*, int>>& done = reaped;
  done.clear();
  while (total < budget) {
    int n = ibv_poll_cq(cq.get(), std::min(32, budget - total), wc);
    if (n <= 0) break;
    std::lock_guard lk(mu);
    for (int i = 0; i < n; ++i) on_wc(wc[i], done);
    flush_reads_locked(done);
    total += n;
  }
  for (auto& [r, st] : done) host_cb->complete(host_cb->owner, r, st);
  return total;
}

void client::run() {
  using clock = std::chrono::steady_clock;
  auto last_work = clock::now();
  for (;;) {
    if (stopping.load()) return;
    if (reap(256) > 0) {
      last_work = clock::now();
      continue;
    }
    if (busy_poll_us && clock::now() - last_work < std::chrono::microseconds(busy_poll_us)) {
      // Poll without holding the CPU: on a machine with few of them the
      // thread that answers (the caller, the kernel's rxe tasks) needs it.
      sched_yield();
      continue;
    }
    if (ibv_req_notify_cq(cq.get(), 0) != 0) {
      std::vector<std::pair<vstore_req*, int>> done;
      {
        std::lock_guard lk(mu);
        fail_all(-EIO, done);
      }
      for (auto& [r, st] : done) host_cb->complete(host_cb->owner, r, st);
    }
    if (reap(256) > 0) {  // the final re-check after arming
      last_work = clock::now();
      continue;
    }
    pollfd p[3] = {{cc->fd, POLLIN, 0}, {ch->fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    int n = ::poll(p, 3, 1000);
    if (n <= 0) continue;
    if (p[0].revents & POLLIN) {
      ibv_cq* ev_cq = nullptr;
      void* ctx = nullptr;
      if (ibv_get_cq_event(cc.get(), &ev_cq, &ctx) == 0) ibv_ack_cq_events(ev_cq, 1);
    }
    if (p[1].revents & POLLIN) {
      auto ev = next_cm_event(ch.get(), 0);
      if (ev && (ev->type == RDMA_CM_EVENT_DISCONNECTED || ev->type == RDMA_CM_EVENT_DEVICE_REMOVAL ||
                 ev->type == RDMA_CM_EVENT_TIMEWAIT_EXIT)) {
        std::vector<std::pair<vstore_req*, int>> done;
        {
          std::lock_guard lk(mu);
          fail_all(-ENOTCONN, done);
        }
        for (auto& [r, st] : done) host_cb->complete(host_cb->owner, r, st);
      }
    }
    if (p[2].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t rd = ::read(wake_fd, &v, sizeof v);
    }
  }
}

}  // namespace client_detail

namespace {

using client_detail::client;
using core::vstore_req;

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

// --- vstore_ops -----------------------------------------------------------

bool parse_u32_opt(const char* options, const char* key, uint32_t lo, uint32_t hi, uint32_t* out, std::string* err) {
  std::string v;
  if (!core::find_option(options, key, &v)) return true;
  char* end = nullptr;
  unsigned long n = std::strtoul(v.c_str(), &end, 10);
  if (v.empty() || *end || n < lo || n > hi) {
    *err = std::string("option ") + key + "='" + v + "' is not a number in " + std::to_string(lo) + ".." +
           std::to_string(hi);
    return false;
  }
  *out = static_cast<uint32_t>(n);
  return true;
}

int rdma_open(const core::vstore_open_params* p, void** handle) {
  // Loaded as a plugin, this copy of spdlog is unconfigured: send it to stderr.
  if (!spdlog::get("uvd")) (void)core::init_logging();
  auto c = std::make_unique<client>();
  c->target = p->target;
  std::string_view t = p->target;
  size_t slash = t.find('/');
  if (slash == std::string_view::npos || slash == 0 || slash + 1 == t.size()) {
    set_err(p, "rdma target '" + c->target + "' is not HOST[:PORT]/EXPORT");
    return -EINVAL;
  }
  auto hp = split_host_port(t.substr(0, slash), default_port);
  if (!hp) {
    set_err(p, hp.err().message);
    return -EINVAL;
  }
  c->host = hp->first;
  c->port = hp->second;
  c->export_name = std::string(t.substr(slash + 1));
  if (c->export_name.size() > max_export_name) {
    set_err(p, "export name longer than 255 bytes");
    return -ENAMETOOLONG;
  }
  std::string err;
  uint32_t tmo = 5000;
  if (!parse_u32_opt(p->options, "qd", 1, max_queue_depth, &c->want_qd, &err) ||
      !parse_u32_opt(p->options, "timeout_ms", 1, 600000, &tmo, &err) ||
      !parse_u32_opt(p->options, "busy_poll_us", 0, 1000000, &c->busy_poll_us, &err)) {
    set_err(p, err);
    return -EINVAL;
  }
  c->timeout_ms = static_cast<int>(tmo);
  core::find_option(p->options, "src", &c->src);
  c->read_only = p->flags & core::VSTORE_OPEN_READ_ONLY;
  c->host_cb = p->host;
  c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->wake_fd < 0) return -errno;
  if (auto r = c->connect(); !r) {
    set_err(p, "rdma://" + c->target + ": " + r.err().what());
    return -r.err().errnum();
  }
  if (auto r = c->open_export(); !r) {
    set_err(p, "rdma://" + c->target + ": " + r.err().what());
    return -r.err().errnum();
  }
  client* raw = c.get();
  c->reaper = std::thread([raw] { raw->run(); });
  spdlog::debug("rdma {}: export {} ({} bytes), qd {}, pool {} x {} bytes", c->target, c->geo.uuid, c->geo.size, c->qd,
                c->geo.nsegs, c->geo.segment_size);
  *handle = c.release();
  return 0;
}

void rdma_release(void* handle) { delete static_cast<client*>(handle); }

int rdma_info(void* handle, core::vstore_info* out) {
  auto* c = static_cast<client*>(handle);
  *out = {};
  out->size = c->geo.size;
  out->block_size = c->geo.block_size;
  out->max_transfer = c->max_transfer;
  out->max_segments = 0;  // the client gathers through its staging segments
  out->opt_io_size = c->geo.segment_size;
  // The server's Vstore emulates what its disk lacks (FUA, write-zeroes), so
  // these always reach it; discard only where the disk has it.
  out->features = core::VSTORE_F_FLUSH | core::VSTORE_F_FUA | core::VSTORE_F_WRITE_ZEROES |
                  (c->geo.features & (core::VSTORE_F_DISCARD | core::VSTORE_F_DISCARD_ZEROES | core::VSTORE_F_ROTATIONAL));
  out->read_only = c->geo.read_only || c->read_only;
  std::snprintf(out->id, sizeof out->id, "rdma:uuid=%s", c->geo.uuid);
  return 0;
}

int rdma_submit(void* handle, vstore_req* const* reqs, uint32_t n) {
  return static_cast<client*>(handle)->submit(reqs, n);
}

}  // namespace

// Raises the export's fencing epoch through this connection (see protocol.hpp).
int rdma_fence(void* handle, uint32_t epoch) { return static_cast<client*>(handle)->fence(epoch); }

const core::vstore_ops rdma_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "rdma",
    .description = "3leaf storage over RDMA (libibverbs/librdmacm): rdma://HOST[:PORT]/EXPORT",
    .open = rdma_open,
    .release = rdma_release,
    .info = rdma_info,
    .ctx_size = nullptr,
    .submit = rdma_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = rdma_fence,
};

}  // namespace uvd::rdma
