// SPDX-License-Identifier: Apache-2.0
// blkback's data path: every request is copied off the ring once and then
// validated as hostile before any byte of the disk or of a granted page moves.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cstring>
#include <random>

#include "transports/xen/blkback_conn.hpp"

namespace uvd::xen {

core::result<std::unique_ptr<blk_conn>> blk_conn::start(blk_conn_params p) {
  auto c = std::unique_ptr<blk_conn>(new blk_conn(std::move(p)));
  if (auto r = c->init(); !r) return core::fail(std::move(r).err());
  return c;
}

core::result<void> blk_conn::init() {
  auto m = p_.hv->map_grants(p_.front, p_.ring_refs, true);
  if (!m) return core::fail(m.err().code.value(), "map ring: " + m.err().message);
  ring_map_ = std::move(*m);
  if (!ring_.attach(ring_map_->addr(), ring_map_->count() * page_size))
    return core::fail(EINVAL, "ring too small");
  auto e = p_.hv->bind_interdomain(p_.front, p_.port);
  if (!e) return core::fail(e.err().code.value(), "bind event channel: " + e.err().message);
  evt_ = std::move(*e);
  capacity_sectors_ = p_.disk->size() / blk_sector;
  if (p_.opts.max_indirect_segments > max_segs_) max_segs_ = p_.opts.max_indirect_segments;
  for (uint32_t i = 0; i < ring_.size(); ++i) {
    auto pd = std::make_unique<pending>();
    pd->conn = this;
    pd->iov.reserve(max_segs_);
    pd->io.user = pd.get();
    pd->io.done = on_done;
    free_.push_back(pd.get());
    pool_.push_back(std::move(pd));
  }
  std::random_device rd;
  ids_.init(ring_.size(), (uint64_t{rd()} << 32) ^ rd());
  batch_.resize(ring_.size());
  submit_.reserve(ring_.size());
  segs_.resize(max_segs_);
  refs_.resize(max_segs_);
  pages_.resize(max_segs_);
  missing_.reserve(max_segs_);
  where_.reserve(max_segs_);
  kick_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (kick_fd_ < 0) return core::fail(errno, "eventfd");
  thread_ = std::thread([this] { run(); });
  return core::ok();
}

blk_conn::~blk_conn() {
  stop_ = true;
  if (kick_fd_ >= 0) {
    uint64_t one = 1;
    (void)::write(kick_fd_, &one, sizeof one);
  }
  if (thread_.joinable()) thread_.join();
  {
    // Requests the disk still holds write into pages we are about to unmap: wait for them.
    std::unique_lock lk(ring_mu_);
    idle_cv_.wait(lk, [&] { return busy_ == 0; });
  }
  persistent_.clear();
  evt_.reset();
  ring_map_.reset();
  if (kick_fd_ >= 0) ::close(kick_fd_);
}

void blk_conn::fill_stats(blkback_device_stats& s) const {
  s.requests = requests_;
  s.errors = errors_;
  s.persistent_maps = persistent_maps_;
  s.transient_maps = transient_maps_;
  s.connected = !broken_;
  s.broken = broken_;
}

void blk_conn::id_set::init(uint32_t ring_size, uint64_t key) {
  size_t cap = 2;
  shift_ = 63;
  while (cap < size_t{ring_size} * 2) {
    cap *= 2;
    --shift_;
  }
  ids_.assign(cap, 0);
  used_.assign(cap, 0);
  key_ = key;
}

// Never full: at most a ring's worth of ids is in flight, in twice the slots.
bool blk_conn::id_set::insert(uint64_t id) {
  const size_t mask = ids_.size() - 1;
  for (size_t i = home(id);; i = (i + 1) & mask) {
    if (!used_[i]) {
      used_[i] = 1;
      ids_[i] = id;
      return true;
    }
    if (ids_[i] == id) return false;
  }
}

// Linear probing with backward-shift deletion: no tombstones, so probes stay short.
void blk_conn::id_set::erase(uint64_t id) {
  const size_t mask = ids_.size() - 1;
  size_t i = home(id);
  while (used_[i] && ids_[i] != id) i = (i + 1) & mask;
  if (!used_[i]) return;
  for (size_t j = i;;) {
    j = (j + 1) & mask;
    if (!used_[j]) break;
    size_t h = home(ids_[j]);
    bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);  // home cyclically in (i, j]
    if (!stays) {
      ids_[i] = ids_[j];
      i = j;
    }
  }
  used_[i] = 0;
}

uint32_t blk_conn::take_batch(bool* broken) {
  std::lock_guard lk(ring_mu_);
  uint32_t n = 0;
  for (;;) {
    while (n < batch_.size()) {
      if (ring_.unanswered() >= ring_.size()) {
        if (n == 0) stalled_ = true;  // every slot is owed a response; a completion wakes us
        return n;
      }
      core::ring_take t = ring_.take_request(&batch_[n]);
      if (t == core::ring_take::item) {
        ++n;
        continue;
      }
      if (t == core::ring_take::broken) *broken = true;
      break;
    }
    if (n > 0 || *broken) return n;
    if (!ring_.final_check_for_requests()) return 0;
  }
}

void blk_conn::run() {
  io_thread_.store(std::this_thread::get_id());
  pollfd fds[2] = {{evt_->fd(), POLLIN, 0}, {kick_fd_, POLLIN, 0}};
  while (!stop_) {
    bool broken = false;
    uint32_t n = take_batch(&broken);
    if (n > 0) {
      requests_ += n;
      for (uint32_t i = 0; i < n; ++i) {
        handle(batch_[i]);
        // Big requests go out in slices, so the front end gets the first
        // answers while the disk still copies the rest.
        if (submit_bytes_ >= publish_bytes) submit_and_publish();
      }
      submit_and_publish();
    }
    if (broken) {
      spdlog::warn("blkback: domain {}: request producer index is impossible; disconnecting", p_.front);
      broken_ = true;
      break;
    }
    if (n > 0) continue;
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    if (fds[0].revents)
      if (auto a = evt_->ack(); !a) break;
    if (fds[1].revents) {
      uint64_t v;
      (void)::read(kick_fd_, &v, sizeof v);
    }
  }
  // From here on every completion publishes its own answer.
  io_thread_.store(std::thread::id());
}

void blk_conn::queue_io(pending* pd) {
  submit_.push_back(&pd->io);
  submit_bytes_ += pd->io.length;
}

void blk_conn::submit_and_publish() {
  if (!submit_.empty()) {
    {
      std::lock_guard lk(ring_mu_);
      busy_ += static_cast<uint32_t>(submit_.size());
    }
    // One submit for the slice; a disk that completes inside it answers on
    // this thread, and those answers go out with the push below.
    p_.disk->submit(std::span<storage::vstore_io* const>(submit_));
    submit_.clear();
    submit_bytes_ = 0;
  }
  std::lock_guard lk(ring_mu_);
  publish_locked();
}

void blk_conn::answer_locked(uint64_t id, uint8_t op, int16_t status) {
  blkif_response rsp;
  std::memset(&rsp, 0, sizeof rsp);  // padding too: nothing of ours leaks into the guest
  rsp.id = id;
  rsp.operation = op;
  rsp.status = status;
  if (status != BLKIF_RSP_OKAY) ++errors_;
  ring_.put_response(rsp);
  ++unpublished_;
}

void blk_conn::publish_locked() {
  if (unpublished_ == 0) return;
  unpublished_ = 0;
  if (ring_.push_responses()) (void)evt_->notify();
  if (stalled_) {
    stalled_ = false;
    uint64_t one = 1;
    (void)::write(kick_fd_, &one, sizeof one);
  }
}

void blk_conn::reject(pending* pd, uint64_t id, uint8_t op, int16_t status) {
  pd->transient.reset();
  std::lock_guard lk(ring_mu_);
  free_.push_back(pd);
  ids_.erase(id);
  answer_locked(id, op, status);
}

bool blk_conn::map_pages(const grant_ref_t* refs, size_t n, bool writable,
                         std::unique_ptr<foreign_mapping>* transient) {
  missing_.clear();
  where_.clear();
  for (size_t i = 0; i < n; ++i) {
    auto it = persistent_.find(refs[i]);
    if (it != persistent_.end()) {
      pages_[i] = static_cast<std::byte*>(it->second->addr());
      continue;
    }
    if (p_.persistent && persistent_.size() < p_.opts.max_persistent_grants) {
      // Persistent grants are granted read-write by the front end and stay mapped.
      auto m = p_.hv->map_grants(p_.front, std::span<const grant_ref_t>(&refs[i], 1), true);
      if (m) {
        ++persistent_maps_;
        pages_[i] = static_cast<std::byte*>((*m)->addr());
        persistent_.emplace(refs[i], std::move(*m));
        continue;
      }
    }
    missing_.push_back(refs[i]);
    where_.push_back(i);
  }
  if (missing_.empty()) return true;
  ++transient_maps_;
  auto m = p_.hv->map_grants(p_.front, missing_, writable);
  if (!m) return false;
  for (size_t k = 0; k < where_.size(); ++k) pages_[where_[k]] = static_cast<std::byte*>((*m)->addr()) + k * page_size;
  *transient = std::move(*m);
  return true;
}

bool blk_conn::read_indirect(const blkif_request_indirect& ind, uint32_t nseg, blkif_request_segment* out) {
  uint32_t npages = (nseg + blk_segs_per_indirect_page - 1) / blk_segs_per_indirect_page;
  grant_ref_t refs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
  std::memcpy(refs, ind.indirect_grefs, npages * sizeof(grant_ref_t));
  std::unique_ptr<foreign_mapping> scratch;  // a transient mapping only for the copy below
  if (!map_pages(refs, npages, false, &scratch)) return false;
  // Copy the segment list out of the guest's page once; only the copy is validated and used.
  for (uint32_t i = 0; i < npages; ++i) {
    uint32_t k = std::min(blk_segs_per_indirect_page, nseg - i * blk_segs_per_indirect_page);
    core::ring_detail::copy_out(out + i * blk_segs_per_indirect_page, pages_[i], k * sizeof(blkif_request_segment));
  }
  return true;
}

void blk_conn::handle(const blkif_request& req) {
  const uint64_t id = req.id;
  uint8_t op = req.operation;  // an indirect request is answered with its inner op, as Linux blkback does
  pending* pd;
  {
    std::lock_guard lk(ring_mu_);
    if (!ids_.insert(id)) {
      // The front end reused an id it has not been answered for. Answer the
      // impostor without touching the original (whose answer is still owed).
      spdlog::debug("blkback: domain {}: id {} reused while in flight", p_.front, id);
      answer_locked(id, op, BLKIF_RSP_ERROR);
      return;
    }
    // Never empty: the ring lets at most ring_.size() requests be unanswered.
    pd = free_.back();
    free_.pop_back();
  }
  auto refuse = [&](int16_t status) { reject(pd, id, op, status); };

  uint16_t vop;
  uint64_t sector = 0, nsect = 0;
  blkif_request_segment* segs = segs_.data();
  uint32_t nseg = 0;
  bool is_write = false;

  switch (op) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
      nseg = req.nr_segments;
      if (nseg == 0 || nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST) return refuse(BLKIF_RSP_ERROR);
      std::memcpy(segs, req.seg, nseg * sizeof(blkif_request_segment));
      is_write = op == BLKIF_OP_WRITE;
      sector = req.sector_number;
      break;
    case BLKIF_OP_INDIRECT: {
      if (p_.opts.max_indirect_segments == 0) return refuse(BLKIF_RSP_EOPNOTSUPP);
      blkif_request_indirect ind;
      std::memcpy(&ind, &req, sizeof ind);
      if (ind.indirect_op != BLKIF_OP_READ && ind.indirect_op != BLKIF_OP_WRITE) return refuse(BLKIF_RSP_ERROR);
      op = ind.indirect_op;  // Linux blkfront checks the response's operation against it
      nseg = ind.nr_segments;
      if (nseg == 0 || nseg > p_.opts.max_indirect_segments) return refuse(BLKIF_RSP_ERROR);
      if (!read_indirect(ind, nseg, segs)) return refuse(BLKIF_RSP_ERROR);
      is_write = ind.indirect_op == BLKIF_OP_WRITE;
      sector = ind.sector_number;
      break;
    }
    case BLKIF_OP_FLUSH_DISKCACHE: {
      pd->id = id;
      pd->op = op;
      pd->io.opcode = core::VSTORE_OP_FLUSH;
      pd->io.flags = 0;
      pd->io.offset = 0;
      pd->io.length = 0;
      pd->io.iov = nullptr;
      pd->io.iovcnt = 0;
      queue_io(pd);
      return;
    }
    case BLKIF_OP_DISCARD: {
      blkif_request_discard d;
      std::memcpy(&d, &req, sizeof d);
      if (!p_.disk->has(core::VSTORE_F_DISCARD)) return refuse(BLKIF_RSP_EOPNOTSUPP);
      if (d.flag & BLKIF_DISCARD_SECURE) return refuse(BLKIF_RSP_EOPNOTSUPP);  // we offer no discard-secure
      if (p_.read_only) return refuse(BLKIF_RSP_ERROR);
      if (d.nr_sectors == 0 || d.sector_number > capacity_sectors_ ||
          d.nr_sectors > capacity_sectors_ - d.sector_number)
        return refuse(BLKIF_RSP_ERROR);
      pd->id = id;
      pd->op = op;
      pd->io.opcode = core::VSTORE_OP_DISCARD;
      pd->io.flags = 0;
      pd->io.offset = d.sector_number * blk_sector;
      pd->io.length = d.nr_sectors * blk_sector;
      pd->io.iov = nullptr;
      pd->io.iovcnt = 0;
      queue_io(pd);
      return;
    }
    default:  // WRITE_BARRIER, RESERVED_1 and anything unknown
      return refuse(BLKIF_RSP_EOPNOTSUPP);
  }

  if (is_write && p_.read_only) return refuse(BLKIF_RSP_ERROR);
  grant_ref_t* refs = refs_.data();
  for (uint32_t i = 0; i < nseg; ++i) {
    const auto& s = segs[i];
    if (s.first_sect > s.last_sect || s.last_sect >= blk_sectors_per_page) return refuse(BLKIF_RSP_ERROR);
    nsect += s.last_sect - s.first_sect + 1u;
    refs[i] = s.gref;
  }
  if (sector > capacity_sectors_ || nsect > capacity_sectors_ - sector) return refuse(BLKIF_RSP_ERROR);

  // A read writes into the guest's pages; a write only reads them.
  if (!map_pages(refs, nseg, !is_write, &pd->transient)) return refuse(BLKIF_RSP_ERROR);
  pd->id = id;
  pd->op = op;
  for (uint32_t i = 0; i < nseg; ++i)
    pd->iov.push_back({pages_[i] + segs[i].first_sect * blk_sector,
                       (segs[i].last_sect - segs[i].first_sect + 1u) * size_t{blk_sector}});
  vop = is_write ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
  pd->io.opcode = vop;
  pd->io.flags = 0;
  pd->io.offset = sector * blk_sector;
  pd->io.length = nsect * blk_sector;
  pd->io.iov = pd->iov.data();
  pd->io.iovcnt = nseg;
  queue_io(pd);
}

void blk_conn::on_done(storage::vstore_io* io, int status) {
  auto* pd = static_cast<pending*>(io->user);
  blk_conn* c = pd->conn;
  int16_t st = status == 0                ? BLKIF_RSP_OKAY
               : status == -EOPNOTSUPP ? BLKIF_RSP_EOPNOTSUPP
                                        : BLKIF_RSP_ERROR;
  pd->transient.reset();  // the disk is done with the guest's pages
  pd->iov.clear();
  const bool on_io_thread = c->io_thread_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  std::lock_guard lk(c->ring_mu_);
  c->ids_.erase(pd->id);
  c->answer_locked(pd->id, pd->op, st);
  c->free_.push_back(pd);
  if (!on_io_thread) c->publish_locked();
  // Last: once busy_ is 0 the destructor may run (it takes ring_mu_ first).
  if (--c->busy_ == 0) c->idle_cv_.notify_all();
}

}  // namespace uvd::xen
