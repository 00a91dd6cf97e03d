// SPDX-License-Identifier: Apache-2.0
// The blkif front end (see xen.hpp): handshake, shadow table with an id
// freelist, request building (direct, indirect, flush, discard) and a
// completion thread that treats the back end's responses as untrusted.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "core/uri.hpp"
#include "transports/xen/blkif.hpp"
#include "transports/xen/hv_open.hpp"
#include "transports/xen/xenbus.hpp"
#include "transports/xen/xen.hpp"

namespace uvd::xen {

namespace {

using core::vstore_req;

constexpr uint32_t no_id = UINT32_MAX;

struct shadow_entry {
  vstore_req* req = nullptr;  // nullptr: free
  uint32_t next_free = no_id;
  uint32_t pages = 0;
  uint8_t op = 0;
};

struct blkfront {
  std::unique_ptr<hypervisor> hv;
  std::unique_ptr<store> st;
  domid_t back = 0;
  uint32_t vdev = 0;
  std::string fdir, bdir;
  uint32_t timeout_ms = 10000;

  std::unique_ptr<granted_pages> ring_pages;
  std::unique_ptr<granted_pages> pool;  // data pages, then indirect pages, per slot
  std::unique_ptr<event_channel> evt;
  uint32_t segs_per_slot = 0;           // data pages each ring slot owns
  uint32_t ind_pages_per_slot = 0;
  uint32_t max_indirect = 0;            // negotiated; 0: direct requests only

  core::vstore_info info{};
  const core::vstore_host* host = nullptr;

  std::mutex mu;  // ring, shadow, free list, dead
  blk_front_ring ring;
  std::vector<shadow_entry> shadow;
  uint32_t shadow_free = no_id;
  bool dead = false;
  // Set while the completer runs completion callbacks: requests they submit
  // (a queue refilling itself) are produced but pushed, and notified, once at
  // the end of the batch, as blk-mq's commit_rqs does.
  bool plugged = false;

  int stop_fd = -1;
  std::thread completer;
  uint64_t bad_responses = 0;

  std::byte* slot_page(uint32_t id, uint32_t i) const {
    return static_cast<std::byte*>(pool->addr()) + (size_t{id} * segs_per_slot + i) * page_size;
  }
  size_t ind_index(uint32_t id, uint32_t i) const {
    return size_t{ring.size()} * segs_per_slot + size_t{id} * ind_pages_per_slot + i;
  }
};

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

core::result<uint64_t> opt_u64(const char* options, const char* key, uint64_t def) {
  std::string v;
  if (!core::find_option(options, key, &v)) return def;
  auto n = core::parse_size(v);
  if (!n) return core::fail(EINVAL, std::string("option ") + key + ": " + n.err().message);
  return *n;
}

core::result<int> wait_backend(blkfront& f, bool (*pred)(int), const char* what) {
  auto r = wait_state(*f.st, f.bdir, pred, f.timeout_ms, what);
  if (!r) return core::fail(r.err().code.value(), "blkfront: back end " + r.err().message);
  return r;
}

core::result<void> fail_from_backend(blkfront& f, const std::string& what) {
  auto e = f.st->read(no_txn, f.bdir + "/error");
  return core::fail(ECONNREFUSED, "blkfront: " + what + (e ? ": back end says: " + *e : ""));
}

core::result<void> handshake(blkfront& f, uint32_t want_order, uint32_t want_segs, bool want_persistent) {
  store& s = *f.st;
  auto b = s.read(no_txn, f.fdir + "/backend");
  if (!b) return core::fail(ENOENT, "blkfront: no virtual block device at " + f.fdir + " (" + b.err().what() + ")");
  f.bdir = *b;
  auto bid = read_uint(s, no_txn, f.fdir + "/backend-id");
  if (!bid || *bid != f.back)
    return core::fail(EINVAL, "blkfront: " + f.fdir + "/backend-id is not " + std::to_string(f.back));
  if (auto w = s.watch(f.bdir + "/state", "backend"); !w) return w;

  // A back end still connected to an earlier instance of us (which died
  // without closing) must see us Closed before it will start over.
  auto cur = read_state(s, f.bdir);
  if (!cur || *cur != XenbusStateInitWait) {
    if (auto w = write_state(s, f.fdir, XenbusStateClosed); !w) return w;
    auto c = wait_backend(f, [](int st) { return st == XenbusStateClosed || st == XenbusStateInitWait; }, "Closed");
    if (!c) return core::fail(std::move(c).err());
  }
  if (auto w = write_state(s, f.fdir, XenbusStateInitialising); !w) return w;
  if (auto c = wait_backend(f, [](int st) { return st == XenbusStateInitWait; }, "InitWait"); !c)
    return core::fail(std::move(c).err());

  auto feat = [&](const char* key) -> uint64_t {
    auto v = read_uint(s, no_txn, f.bdir + "/" + key);
    return v ? *v : 0;
  };
  bool multi_page = s.read(no_txn, f.bdir + "/max-ring-page-order").has_value();
  uint32_t order = static_cast<uint32_t>(std::min<uint64_t>({want_order, feat("max-ring-page-order"),
                                                             blk_max_ring_page_order}));
  f.max_indirect = static_cast<uint32_t>(std::min<uint64_t>({want_segs, feat("feature-max-indirect-segments"),
                                                             blk_max_indirect_segments}));
  if (f.max_indirect <= BLKIF_MAX_SEGMENTS_PER_REQUEST) f.max_indirect = 0;
  f.segs_per_slot = f.max_indirect ? f.max_indirect : BLKIF_MAX_SEGMENTS_PER_REQUEST;
  f.ind_pages_per_slot = f.max_indirect ? (f.max_indirect + blk_segs_per_indirect_page - 1) / blk_segs_per_indirect_page : 0;

  auto rp = f.hv->grant_pages(f.back, size_t{1} << order, true);
  if (!rp) return core::fail(std::move(rp).err());
  f.ring_pages = std::move(*rp);
  if (!f.ring.init(f.ring_pages->addr(), f.ring_pages->count() * page_size))
    return core::fail(EINVAL, "blkfront: ring too small");
  const uint32_t n = f.ring.size();
  auto pool = f.hv->grant_pages(f.back, size_t{n} * (f.segs_per_slot + f.ind_pages_per_slot), true);
  if (!pool) return core::fail(std::move(pool).err());
  f.pool = std::move(*pool);
  auto evt = f.hv->alloc_unbound(f.back);
  if (!evt) return core::fail(std::move(evt).err());
  f.evt = std::move(*evt);

  f.shadow.assign(n, {});
  for (uint32_t i = 0; i < n; ++i) f.shadow[i].next_free = i + 1 < n ? i + 1 : no_id;
  f.shadow_free = 0;

  auto r = with_transaction(s, [&](txn_t t) -> core::result<void> {
    if (multi_page) {
      if (auto w = s.write(t, f.fdir + "/ring-page-order", std::to_string(order)); !w) return w;
      for (uint32_t i = 0; i < (1u << order); ++i)
        if (auto w = s.write(t, f.fdir + "/ring-ref" + std::to_string(i), std::to_string(f.ring_pages->ref(i))); !w)
          return w;
    } else if (auto w = s.write(t, f.fdir + "/ring-ref", std::to_string(f.ring_pages->ref(0))); !w) {
      return w;
    }
    if (auto w = s.write(t, f.fdir + "/event-channel", std::to_string(f.evt->local_port())); !w) return w;
    if (auto w = s.write(t, f.fdir + "/protocol", XEN_IO_PROTO_ABI_NATIVE); !w) return w;
    if (auto w = s.write(t, f.fdir + "/feature-persistent", want_persistent ? "1" : "0"); !w) return w;
    return s.write(t, f.fdir + "/state", std::to_string(XenbusStateInitialised));
  });
  if (!r) return r;
  auto c = wait_backend(f, [](int st) { return st >= XenbusStateConnected; }, "Connected");
  if (!c) return core::fail(std::move(c).err());
  if (*c != XenbusStateConnected) return fail_from_backend(f, std::string("back end went ") + state_name(*c));

  auto sectors = read_uint(s, no_txn, f.bdir + "/sectors");
  if (!sectors) return core::fail(std::move(sectors).err());
  uint64_t ss = feat("sector-size");
  if (ss == 0) ss = blk_sector;
  if (ss < blk_sector || ss > page_size || (ss & (ss - 1)))
    return core::fail(EPROTO, "blkfront: back end's sector-size " + std::to_string(ss) + " is unusable");
  if (*sectors > UINT64_MAX / blk_sector) return core::fail(EPROTO, "blkfront: back end's sectors is absurd");
  f.info.size = *sectors * blk_sector / ss * ss;
  f.info.block_size = static_cast<uint32_t>(ss);
  f.info.max_transfer = f.segs_per_slot * static_cast<uint32_t>(page_size);
  f.info.max_segments = 0;  // data is copied through the slot's pages: any iovec shape works
  f.info.read_only = (feat("info") & VDISK_READONLY) ? 1 : 0;
  if (feat("feature-flush-cache")) f.info.features |= core::VSTORE_F_FLUSH;
  if (feat("feature-discard")) f.info.features |= core::VSTORE_F_DISCARD;
  std::snprintf(f.info.id, sizeof f.info.id, "xen:%s", f.bdir.c_str());
  return write_state(s, f.fdir, XenbusStateConnected);
}

int status_to_errno(int16_t st) {
  switch (st) {
    case BLKIF_RSP_OKAY: return 0;
    case BLKIF_RSP_EOPNOTSUPP: return -EOPNOTSUPP;
    default: return -EIO;
  }
}

void copy_from_iov(std::byte* dst, const vstore_req* r, uint64_t len) {
  uint64_t done = 0;
  for (uint32_t i = 0; i < r->iovcnt && done < len; ++i) {
    size_t k = std::min<uint64_t>(r->iov[i].iov_len, len - done);
    std::memcpy(dst + done, r->iov[i].iov_base, k);
    done += k;
  }
}
void copy_to_iov(const vstore_req* r, const std::byte* src, uint64_t len) {
  uint64_t done = 0;
  for (uint32_t i = 0; i < r->iovcnt && done < len; ++i) {
    size_t k = std::min<uint64_t>(r->iov[i].iov_len, len - done);
    std::memcpy(r->iov[i].iov_base, src + done, k);
    done += k;
  }
}

struct completed {
  vstore_req* req;
  uint32_t id;  // no_id: failed without a slot to free
  int status;
};

void complete_batch(blkfront* f, std::vector<completed>& done) {
  if (done.empty()) return;
  // Reads are copied out of the slot's pages before the slot is freed for reuse.
  for (auto& c : done)
    if (c.id != no_id && c.status == 0 && c.req->opcode == core::VSTORE_OP_READ)
      copy_to_iov(c.req, f->slot_page(c.id, 0), c.req->length);
  {
    std::lock_guard lk(f->mu);
    for (auto& c : done) {
      if (c.id == no_id) continue;
      f->shadow[c.id].req = nullptr;
      f->shadow[c.id].next_free = f->shadow_free;
      f->shadow_free = c.id;
    }
    f->plugged = true;
  }
  for (auto& c : done) f->host->complete(f->host->owner, c.req, c.status);
  done.clear();
  bool notify;
  {
    std::lock_guard lk(f->mu);
    f->plugged = false;
    notify = !f->dead && f->ring.push_requests();
  }
  if (notify) (void)f->evt->notify();
}

// The back end is gone: every request in flight fails with a path error, so
// a multipath layer above can reissue it elsewhere.
void fail_all_locked(blkfront& f, std::vector<completed>& out) {
  f.dead = true;
  for (uint32_t id = 0; id < f.shadow.size(); ++id)
    if (f.shadow[id].req && f.shadow[id].op != 0xff) {
      out.push_back({f.shadow[id].req, id, -ENOTCONN});
      f.shadow[id].op = 0xff;  // answered; the slot is freed by complete_batch
    }
}

void run_completions(blkfront* f) {
  pollfd p[3] = {{f->evt->fd(), POLLIN, 0}, {f->stop_fd, POLLIN, 0}, {f->st->watch_fd(), POLLIN, 0}};
  std::vector<completed> done;
  done.reserve(f->shadow.size());
  uint32_t busy_passes = 0;
  constexpr uint64_t complete_bytes = 256 << 10;
  for (;;) {
    bool idle = true;
    uint64_t done_bytes = 0;
    {
      std::lock_guard lk(f->mu);
      bool more = !f->dead;
      while (more) {
        blkif_response rsp;
        core::ring_take t;
        while ((t = f->ring.take_response(&rsp)) == core::ring_take::item) {
          // The id came back through shared memory: only a slot we filled and
          // that has not been answered yet may complete.
          if (rsp.id >= f->shadow.size() || !f->shadow[rsp.id].req || f->shadow[rsp.id].op == 0xff) {
            ++f->bad_responses;
            continue;
          }
          auto id = static_cast<uint32_t>(rsp.id);
          f->shadow[id].op = 0xff;
          done.push_back({f->shadow[id].req, id, status_to_errno(rsp.status)});
          // Complete big reads in slices: their copies out of the slot pages
          // would otherwise hold back the refills the back end waits for.
          if ((done_bytes += f->shadow[id].pages * page_size) >= complete_bytes) break;
        }
        if (t == core::ring_take::broken) {
          spdlog::warn("blkfront: {}: response producer index is impossible; failing the device", f->bdir);
          fail_all_locked(*f, done);
          break;
        }
        // Re-arm the event index only when there is nothing to complete:
        // while a batch completes (and refills the ring) the back end keeps
        // pushing without notifying, and the next pass picks its answers up.
        if (!done.empty()) {
          idle = false;
          break;
        }
        more = f->ring.final_check_for_responses();
      }
    }
    complete_batch(f, done);
    // A ring that never runs dry still gets the stop and store events looked at now and then.
    if (!idle && ++busy_passes < 64) continue;
    busy_passes = 0;
    if (::poll(p, 3, idle ? -1 : 0) < 0 && errno != EINTR) return;
    if (p[1].revents) return;
    if (auto a = f->evt->ack(); !a) return;
    if (p[2].revents) {
      for (;;) {
        auto ev = f->st->read_watch();
        if (!ev) p[2].fd = -1;  // the store is gone: stop polling it (the state read below fails too)
        if (!ev || !*ev) break;
      }
      auto s = read_state(*f->st, f->bdir);
      if (!s || *s == XenbusStateClosing || *s == XenbusStateClosed) {
        {
          std::lock_guard lk(f->mu);
          if (!f->dead) {
            spdlog::warn("blkfront: back end {} went {}; failing requests", f->bdir, s ? state_name(*s) : "away");
            fail_all_locked(*f, done);
          }
        }
        complete_batch(f, done);
      }
    }
  }
}

// ---- vstore_ops ----

int xen_open(const core::vstore_open_params* p, void** handle) {
  auto f = std::make_unique<blkfront>();
  std::string target = p->target;
  auto slash = target.find('/');
  unsigned long back = 0, vdev = 0;
  char extra;
  if (slash == std::string::npos ||
      std::sscanf(target.substr(0, slash).c_str(), "%lu%c", &back, &extra) != 1 || back > 0x7fef ||
      std::sscanf(target.substr(slash + 1).c_str(), "%lu%c", &vdev, &extra) != 1 || vdev > 0xffffffffu) {
    set_err(p, "xen: target must be <backend-domid>/<vdev>, e.g. xen://0/51712?hub=PATH");
    return -EINVAL;
  }
  f->back = static_cast<domid_t>(back);
  f->vdev = static_cast<uint32_t>(vdev);
  // Real Xen's gntalloc grants 1024 pages per process by default: stay well under it.
  const bool real = options_name_real_xen(p->options);
  auto order = opt_u64(p->options, "ring_order", real ? 0 : 2);
  auto segs = opt_u64(p->options, "max_segments", real ? 11 : 64);
  auto pers = opt_u64(p->options, "persistent", 1);
  auto tmo = opt_u64(p->options, "timeout_ms", 10000);
  for (auto* r : {&order, &segs, &pers, &tmo})
    if (!*r) {
      set_err(p, "xen: " + r->err().message);
      return -EINVAL;
    }
  f->timeout_ms = static_cast<uint32_t>(std::min<uint64_t>(*tmo, 600000));
  auto hv = open_hypervisor_from_options(p->options);
  if (!hv) {
    set_err(p, hv.err().what());
    return -hv.err().errnum();
  }
  f->hv = std::move(*hv);
  f->fdir = blk_frontend_dir(f->hv->self_domid(), f->vdev);
  auto st = f->hv->open_store();
  if (!st) {
    set_err(p, "xen: " + st.err().what());
    return -st.err().errnum();
  }
  f->st = std::move(*st);
  if (auto r = handshake(*f, static_cast<uint32_t>(*order), static_cast<uint32_t>(*segs), *pers != 0); !r) {
    set_err(p, r.err().what());
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
    return -r.err().errnum();
  }
  if (p->flags & core::VSTORE_OPEN_READ_ONLY) f->info.read_only = 1;
  f->host = p->host;
  f->stop_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (f->stop_fd < 0) {
    set_err(p, "xen: eventfd failed");
    return -errno;
  }
  blkfront* raw = f.get();
  f->completer = std::thread([raw] { run_completions(raw); });
  *handle = f.release();
  return 0;
}

void xen_release(void* handle) {
  std::unique_ptr<blkfront> f(static_cast<blkfront*>(handle));
  uint64_t one = 1;
  (void)::write(f->stop_fd, &one, sizeof one);
  if (f->completer.joinable()) f->completer.join();
  // Close as blkfront does: Closing, wait for the back end to let go, Closed.
  // A back end already gone is not waited for.
  if (f->dead) {
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
  } else if (write_state(*f->st, f->fdir, XenbusStateClosing)) {
    f->timeout_ms = std::min<uint32_t>(f->timeout_ms, 3000);
    (void)wait_backend(*f, [](int st) { return st == XenbusStateClosing || st == XenbusStateClosed; }, "Closing");
    (void)write_state(*f->st, f->fdir, XenbusStateClosed);
    (void)wait_backend(*f, [](int st) { return st == XenbusStateClosed || st == XenbusStateInitWait; }, "Closed");
  }
  if (f->bad_responses) spdlog::warn("blkfront: {}: {} responses with unknown ids ignored", f->bdir, f->bad_responses);
  ::close(f->stop_fd);
}

int xen_info(void* handle, core::vstore_info* out) {
  *out = static_cast<blkfront*>(handle)->info;
  return 0;
}

// Fills ring slot `id` for r. Returns false if r cannot be expressed (never
// for requests the front half validated against our info).
bool build_request(blkfront& f, uint32_t id, vstore_req* r) {
  blkif_request* rq = f.ring.next_request();
  std::memset(rq, 0, sizeof *rq);
  shadow_entry& sh = f.shadow[id];
  sh.pages = 0;
  switch (r->opcode) {
    case core::VSTORE_OP_FLUSH:
      rq->operation = BLKIF_OP_FLUSH_DISKCACHE;
      rq->id = id;
      rq->handle = static_cast<blkif_vdev_t>(f.vdev);
      break;
    case core::VSTORE_OP_DISCARD: {
      blkif_request_discard d{};
      d.operation = BLKIF_OP_DISCARD;
      d.handle = static_cast<blkif_vdev_t>(f.vdev);
      d.id = id;
      d.sector_number = r->offset / blk_sector;
      d.nr_sectors = r->length / blk_sector;
      std::memcpy(rq, &d, sizeof d);
      break;
    }
    case core::VSTORE_OP_READ:
    case core::VSTORE_OP_WRITE: {
      uint64_t sectors = r->length / blk_sector;
      auto pages = static_cast<uint32_t>((r->length + page_size - 1) / page_size);
      if (pages == 0 || pages > f.segs_per_slot || r->length % blk_sector) return false;
      uint8_t op = r->opcode == core::VSTORE_OP_READ ? BLKIF_OP_READ : BLKIF_OP_WRITE;
      if (op == BLKIF_OP_WRITE) copy_from_iov(f.slot_page(id, 0), r, r->length);
      auto seg = [&](uint32_t i) {
        blkif_request_segment s{};
        s.gref = f.pool->ref(size_t{id} * f.segs_per_slot + i);
        s.first_sect = 0;
        uint64_t left = sectors - uint64_t{i} * blk_sectors_per_page;
        s.last_sect = static_cast<uint8_t>(std::min<uint64_t>(left, blk_sectors_per_page) - 1);
        return s;
      };
      if (pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST) {
        rq->operation = op;
        rq->nr_segments = static_cast<uint8_t>(pages);
        rq->handle = static_cast<blkif_vdev_t>(f.vdev);
        rq->id = id;
        rq->sector_number = r->offset / blk_sector;
        for (uint32_t i = 0; i < pages; ++i) rq->seg[i] = seg(i);
      } else {
        blkif_request_indirect ind{};
        ind.operation = BLKIF_OP_INDIRECT;
        ind.indirect_op = op;
        ind.nr_segments = static_cast<uint16_t>(pages);
        ind.id = id;
        ind.sector_number = r->offset / blk_sector;
        ind.handle = static_cast<blkif_vdev_t>(f.vdev);
        auto* pool = static_cast<std::byte*>(f.pool->addr());
        for (uint32_t i = 0; i < pages; ++i) {
          uint32_t pg = i / blk_segs_per_indirect_page;
          auto* list = reinterpret_cast<blkif_request_segment*>(pool + f.ind_index(id, pg) * page_size);
          list[i % blk_segs_per_indirect_page] = seg(i);
        }
        for (uint32_t pg = 0; pg < f.ind_pages_per_slot && pg * blk_segs_per_indirect_page < pages; ++pg)
          ind.indirect_grefs[pg] = f.pool->ref(f.ind_index(id, pg));
        std::memcpy(rq, &ind, sizeof ind);
      }
      sh.pages = pages;
      break;
    }
    default: return false;
  }
  sh.req = r;
  sh.op = static_cast<uint8_t>(r->opcode);
  return true;
}

int xen_submit(void* handle, vstore_req* const* reqs, uint32_t n) {
  auto* f = static_cast<blkfront*>(handle);
  std::vector<vstore_req*> refused;
  uint32_t accepted = 0;
  bool notify = false;
  {
    std::lock_guard lk(f->mu);
    if (f->dead) return -ENOTCONN;
    for (; accepted < n && f->shadow_free != no_id && !f->ring.full(); ++accepted) {
      uint32_t id = f->shadow_free;
      if (!build_request(*f, id, reqs[accepted])) {
        refused.push_back(reqs[accepted]);
        continue;
      }
      f->shadow_free = f->shadow[id].next_free;
      f->ring.produce();
    }
    if (!f->plugged) notify = f->ring.push_requests();
  }
  if (notify) (void)f->evt->notify();
  for (auto* r : refused) f->host->complete(f->host->owner, r, -EINVAL);
  return static_cast<int>(accepted);
}

}  // namespace

const core::vstore_ops xen_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "xen",
    .description = "Xen blkif front end: xen://BACKEND-DOMID/VDEV?hv=local&hub=SOCKET&domid=N (or hv=xen)",
    .open = xen_open,
    .release = xen_release,
    .info = xen_info,
    .ctx_size = nullptr,
    .submit = xen_submit,
    .probe = nullptr,
    .poll = nullptr,
};

}  // namespace uvd::xen
