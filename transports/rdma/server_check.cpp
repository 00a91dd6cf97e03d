// SPDX-License-Identifier: Apache-2.0
#include "transports/rdma/server_check.hpp"

#include <sys/random.h>

#include <cerrno>
#include <cstdio>

namespace uvd::rdma {

const char* refusal_name(refusal r) noexcept {
  switch (r) {
    case refusal::none: return "none";
    case refusal::malformed: return "malformed";
    case refusal::unknown_opcode: return "unknown_opcode";
    case refusal::not_open: return "not_open";
    case refusal::duplicate_id: return "duplicate_id";
    case refusal::stale_epoch: return "stale_epoch";
    case refusal::bad_handle: return "bad_handle";
    case refusal::segment_range: return "segment_range";
    case refusal::length_mismatch: return "length_mismatch";
    case refusal::misaligned: return "misaligned";
    case refusal::sector_range: return "sector_range";
    case refusal::read_only: return "read_only";
    case refusal::bad_flags: return "bad_flags";
    case refusal::count_: break;
  }
  return "?";
}

int refusal_errno(refusal r) noexcept {
  switch (r) {
    case refusal::none: return 0;
    case refusal::malformed: return -EPROTO;
    case refusal::unknown_opcode: return -EOPNOTSUPP;
    case refusal::not_open: return -EBADFD;
    case refusal::duplicate_id: return -EALREADY;
    case refusal::stale_epoch: return -ESTALE;  // a path error: this path was fenced
    case refusal::bad_handle: return -EBADF;
    case refusal::segment_range: return -EFAULT;
    case refusal::length_mismatch: return -EINVAL;
    case refusal::misaligned: return -EINVAL;
    case refusal::sector_range: return -ERANGE;
    case refusal::read_only: return -EROFS;
    case refusal::bad_flags: return -EINVAL;
    case refusal::count_: break;
  }
  return -EINVAL;
}

uint64_t refusal_counters::total() const noexcept {
  uint64_t t = 0;
  for (const auto& c : n) t += c.load(std::memory_order_relaxed);
  return t;
}

std::string refusal_counters::to_string() const {
  std::string s;
  for (size_t i = 1; i < refusal_kinds; ++i) {
    uint64_t v = n[i].load(std::memory_order_relaxed);
    if (!v) continue;
    if (!s.empty()) s += ' ';
    s += refusal_name(static_cast<refusal>(i));
    s += '=';
    s += std::to_string(v);
  }
  return s.empty() ? "none" : s;
}

core::result<void> handle_table::assign(uint32_t n) {
  revoke();
  tokens_.resize(n);
  index_.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    uint64_t t = 0;
    do {
      ssize_t got = getrandom(&t, sizeof t, 0);
      if (got != static_cast<ssize_t>(sizeof t)) return core::fail(errno ? errno : EIO, "getrandom for segment handles");
    } while (t == 0 || index_.count(t));
    tokens_[i] = t;
    index_.emplace(t, i);
  }
  return core::ok();
}

int64_t handle_table::lookup(uint64_t handle) const noexcept {
  auto it = index_.find(handle);
  return it == index_.end() ? -1 : static_cast<int64_t>(it->second);
}

void handle_table::revoke() noexcept {
  tokens_.clear();
  index_.clear();
}

refusal rpc_gate::admit_id(uint64_t id) {
  if (!in_flight_.insert(id).second) return refusal::duplicate_id;
  return refusal::none;
}

refusal rpc_gate::check_io(const io_rpc& rpc, uint32_t epoch_now, checked_io* out) {
  const uint16_t op = rpc.hdr.opcode;
  if (!is_io_opcode(op)) return refusal::unknown_opcode;
  if (in_flight_.count(rpc.hdr.id)) return refusal::duplicate_id;
  if (rpc.hdr.epoch != 0 && rpc.hdr.epoch < epoch_now) return refusal::stale_epoch;
  if (rpc.flags & ~known_rpc_flags) return refusal::bad_flags;
  const bool data = op == OP_READ || op == OP_WRITE;
  const bool writes = op != OP_READ && op != OP_FLUSH;
  if (writes && read_only_) return refusal::read_only;
  if (rpc.nseg > max_segs_per_rpc) return refusal::malformed;

  out->opcode = op;
  out->flags = rpc.flags;
  out->id = rpc.hdr.id;
  out->epoch = rpc.hdr.epoch;
  out->offset = rpc.offset;
  out->length = rpc.length;
  out->nseg = 0;

  if (op == OP_FLUSH) {
    if (rpc.nseg != 0 || rpc.length != 0 || rpc.offset != 0) return refusal::malformed;
  } else {
    if (rpc.length == 0) return refusal::sector_range;
    const uint64_t bs = geom_.block_size;
    if (rpc.offset % bs || rpc.length % bs) return refusal::misaligned;
    if (rpc.offset > geom_.size || rpc.length > geom_.size - rpc.offset) return refusal::sector_range;
    if (!data && rpc.nseg != 0) return refusal::malformed;
  }
  if (data) {
    if (rpc.nseg == 0) return refusal::length_mismatch;
    if (geom_.max_transfer && rpc.length > geom_.max_transfer) return refusal::sector_range;
    uint64_t sum = 0;
    for (uint16_t i = 0; i < rpc.nseg; ++i) {
      const seg_ref& s = rpc.segs[i];
      int64_t idx = handles_.lookup(s.handle);
      if (idx < 0) return refusal::bad_handle;
      if (s.length == 0 || s.offset > segment_size_ || s.length > segment_size_ - s.offset)
        return refusal::segment_range;
      sum += s.length;
      out->segs[i] = {static_cast<uint32_t>(idx), s.offset, s.length};
    }
    if (sum != rpc.length) return refusal::length_mismatch;
    out->nseg = rpc.nseg;
  }
  in_flight_.insert(rpc.hdr.id);
  return refusal::none;
}

uint32_t epoch_record::current() const {
  std::lock_guard lk(mu_);
  return epoch_;
}

bool epoch_record::admit(uint32_t epoch) {
  std::lock_guard lk(mu_);
  if (epoch != 0 && epoch < epoch_) return false;
  ++in_flight_[epoch];
  return true;
}

uint64_t epoch_record::in_flight_below(uint32_t epoch) const {
  std::lock_guard lk(mu_);
  uint64_t n = 0;
  for (auto it = in_flight_.begin(); it != in_flight_.end() && it->first < epoch; ++it) n += it->second;
  return n;
}

std::vector<uint64_t> epoch_record::finish(uint32_t epoch) {
  std::vector<uint64_t> fired;
  std::lock_guard lk(mu_);
  auto it = in_flight_.find(epoch);
  if (it == in_flight_.end()) return fired;
  if (--it->second == 0) in_flight_.erase(it);
  if (waiters_.empty()) return fired;
  const uint32_t oldest = in_flight_.empty() ? UINT32_MAX : in_flight_.begin()->first;
  for (size_t i = 0; i < waiters_.size();) {
    if (oldest >= waiters_[i].first) {
      fired.push_back(waiters_[i].second);
      waiters_[i] = waiters_.back();
      waiters_.pop_back();
    } else {
      ++i;
    }
  }
  return fired;
}

int epoch_record::fence(uint32_t epoch, uint64_t cookie) {
  std::lock_guard lk(mu_);
  if (epoch == 0 || epoch <= epoch_) return -ESTALE;
  epoch_ = epoch;
  if (in_flight_.empty() || in_flight_.begin()->first >= epoch) return 1;
  waiters_.emplace_back(epoch, cookie);
  return 0;
}

namespace {

uint64_t fnv1a64(std::string_view a, std::string_view b, uint64_t h) {
  auto mix = [&](std::string_view s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
    h ^= 0xff;  // separator, so ("ab","c") differs from ("a","bc")
    h *= 1099511628211ull;
  };
  mix(a);
  mix(b);
  // Final avalanche (splitmix64) so close inputs give unrelated bits.
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

}  // namespace

std::string export_uuid(std::string_view medium_id, std::string_view export_name) {
  uint64_t hi = fnv1a64(medium_id, export_name, 14695981039346656037ull);
  uint64_t lo = fnv1a64(export_name, medium_id, 0x6c62272e07bb0142ull);
  hi = (hi & ~0xf000ull) | 0x8000ull;                       // version 8
  lo = (lo & ~(0xc0ull << 56)) | (0x80ull << 56);            // RFC 9562 variant
  char buf[uuid_chars + 1];
  std::snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%012llx", static_cast<unsigned>(hi >> 32),
                static_cast<unsigned>((hi >> 16) & 0xffff), static_cast<unsigned>(hi & 0xffff),
                static_cast<unsigned>(lo >> 48), static_cast<unsigned long long>(lo & 0xffffffffffffull));
  return buf;
}

bool looks_like_uuid(std::string_view s) noexcept {
  if (s.size() != uuid_chars) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    char c = s[i];
    if (dash ? c != '-' : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace uvd::rdma
