// SPDX-License-Identifier: Apache-2.0
#include "tests/e2e/multipath/mp_load.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "tests/testutil.hpp"

namespace uvd::test {

namespace {

constexpr char record_magic[8] = {'U', 'V', 'D', 'M', 'P', 'V', '0', '1'};
constexpr size_t header_size = 32;  // magic, gen, block, checksum
constexpr size_t max_problems = 50;

uint64_t get64(const std::byte* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
void put64(std::byte* p, uint64_t v) { std::memcpy(p, &v, 8); }

uint64_t xorshift(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

}  // namespace

void make_record(std::span<std::byte> buf, uint64_t gen, uint64_t block) {
  std::memcpy(buf.data(), record_magic, 8);
  put64(buf.data() + 8, gen);
  put64(buf.data() + 16, block);
  // The payload depends on both, so a block copied from elsewhere is caught
  // even where its header would be taken for valid.
  fill_pattern(buf.subspan(header_size), gen * 0x9e3779b97f4a7c15ull ^ block, 0);
  put64(buf.data() + 24, fnv1a(buf.subspan(header_size)));
}

std::string parse_record(std::span<const std::byte> buf, uint64_t block, block_record* out) {
  *out = {};
  if (std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; })) return {};
  if (std::memcmp(buf.data(), record_magic, 8) != 0) return "no record (foreign or torn data)";
  out->gen = get64(buf.data() + 8);
  out->block = get64(buf.data() + 16);
  if (out->block != block) return "holds the record of block " + std::to_string(out->block) + " (misplaced)";
  if (get64(buf.data() + 24) != fnv1a(buf.subspan(header_size)))
    return "checksum mismatch (torn block) in generation " + std::to_string(out->gen);
  return {};
}

verified_load::verified_load(storage::Vstore& dev, load_options o) : dev_(dev), o_(o) {
  size_t bytes = size_t{o_.block_size} * o_.queue_depth;
  mem_ = {static_cast<std::byte*>(std::aligned_alloc(4096, bytes)), std::free};
  lanes_.resize(o_.queue_depth);
  for (uint32_t i = 0; i < o_.queue_depth; ++i) {
    lanes_[i].self = this;
    lanes_[i].buf = mem_.get() + size_t{i} * o_.block_size;
  }
  acked_.assign(o_.blocks, 0);
  maybe_.resize(o_.blocks);
  busy_.assign(o_.blocks, 0);
  rng_ = o_.seed * 0x2545f4914f6cdd1dull | 1;
  stamps_.reserve(1 << 16);
}

verified_load::~verified_load() { stop(); }

bool verified_load::prefill() {
  std::unique_ptr<std::byte[], void (*)(void*)> buf{static_cast<std::byte*>(std::aligned_alloc(4096, o_.block_size)),
                                                    std::free};
  for (uint64_t b = 0; b < o_.blocks; ++b) {
    uint64_t gen;
    {
      std::lock_guard lk(mu_);
      gen = ++next_gen_;
    }
    make_record({buf.get(), o_.block_size}, gen, b);
    auto r = dev_.write(b * o_.block_size, buf.get(), o_.block_size);
    std::lock_guard lk(mu_);
    if (!r) {
      errors_.fetch_add(1);
      last_error_ = "prefill of block " + std::to_string(b) + ": " + r.err().what();
      return false;
    }
    acked_[b] = gen;
  }
  return true;
}

void verified_load::start() {
  std::lock_guard lk(mu_);
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { driver(); });
}

void verified_load::stop() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void verified_load::rewrite_in_flight() {
  std::lock_guard lk(mu_);
  for (auto& l : lanes_)
    if (l.gen != 0 && busy_[l.block]) priority_.push_back(l.block);
}

std::string verified_load::last_error() const {
  std::lock_guard lk(mu_);
  return last_error_;
}

load_clock::time_point verified_load::last_completion() const {
  std::lock_guard lk(mu_);
  return stamps_.empty() ? load_clock::time_point{} : stamps_.back();
}

std::vector<std::string> verified_load::problems() const {
  std::lock_guard lk(mu_);
  return problems_;
}

verified_load::gap verified_load::longest_gap(load_clock::time_point from, load_clock::time_point to) const {
  std::lock_guard lk(mu_);
  gap g;
  auto prev = from;
  auto it = std::lower_bound(stamps_.begin(), stamps_.end(), from);
  for (; it != stamps_.end() && *it <= to; ++it) {
    auto d = std::chrono::duration_cast<std::chrono::microseconds>(*it - prev);
    if (d > g.length) g = {d, prev};
    prev = *it;
  }
  auto d = std::chrono::duration_cast<std::chrono::microseconds>(to - prev);
  if (d > g.length) g = {d, prev};
  return g;
}

void verified_load::on_done(storage::vstore_io* io, int status) {
  auto* l = static_cast<lane*>(io->user);
  verified_load* self = l->self;
  {
    std::lock_guard lk(self->mu_);
    l->status = status;
    l->done_at = load_clock::now();
    self->stamps_.push_back(l->done_at);
    self->done_.push_back(static_cast<uint32_t>(l - self->lanes_.data()));
  }
  self->completions_.fetch_add(1);
  self->cv_.notify_all();
}

uint64_t verified_load::pick_block_locked() {
  uint64_t b = xorshift(rng_) % o_.blocks;
  while (busy_[b]) b = (b + 1) % o_.blocks;  // queue_depth < blocks: terminates
  return b;
}

void verified_load::issue_locked(lane& l) {
  bool write = false;
  uint64_t b = UINT64_MAX;
  for (auto it = priority_.begin(); it != priority_.end(); ++it) {
    if (!busy_[*it]) {
      b = *it;
      write = true;
      priority_.erase(it);
      break;
    }
  }
  if (b == UINT64_MAX) {
    b = pick_block_locked();
    write = xorshift(rng_) % 100 < o_.write_percent;
  }
  busy_[b] = 1;
  l.block = b;
  l.gen = write ? ++next_gen_ : 0;
  if (write) make_record({l.buf, o_.block_size}, l.gen, b);
  l.iov = {l.buf, o_.block_size};
  l.io = {};
  l.io.opcode = write ? core::VSTORE_OP_WRITE : core::VSTORE_OP_READ;
  l.io.offset = b * o_.block_size;
  l.io.length = o_.block_size;
  l.io.iov = &l.iov;
  l.io.iovcnt = 1;
  l.io.done = &verified_load::on_done;
  l.io.user = &l;
  ++in_flight_;
}

void verified_load::problem_locked(std::string p) {
  if (problems_.size() < max_problems) problems_.push_back(std::move(p));
}

std::string verified_load::check_locked(uint64_t b, std::span<const std::byte> data) {
  block_record r;
  std::string why = parse_record(data, b, &r);
  if (!why.empty()) return "block " + std::to_string(b) + ": " + why;
  if (r.gen == acked_[b]) return {};
  auto& m = maybe_[b];
  if (std::find(m.begin(), m.end(), r.gen) != m.end()) {
    // A write that failed did land: that is now the content to expect.
    acked_[b] = r.gen;
    m.clear();
    return {};
  }
  if (r.gen == 0)
    return "block " + std::to_string(b) + ": reads as zeros, acknowledged generation " + std::to_string(acked_[b]) +
           " is lost";
  if (r.gen < acked_[b])
    return "block " + std::to_string(b) + ": stale generation " + std::to_string(r.gen) +
           ", older than the acknowledged " + std::to_string(acked_[b]) + " (an old write landed late)";
  return "block " + std::to_string(b) + ": generation " + std::to_string(r.gen) +
         " was never acknowledged (acknowledged: " + std::to_string(acked_[b]) + ")";
}

void verified_load::finish_locked(lane& l) {
  --in_flight_;
  busy_[l.block] = 0;
  if (l.status != 0) {
    errors_.fetch_add(1);
    last_error_ = std::string(l.gen ? "write" : "read") + " of block " + std::to_string(l.block) + ": " +
                  std::strerror(-l.status);
    if (l.gen) maybe_[l.block].push_back(l.gen);
    return;
  }
  if (l.gen) {
    acked_[l.block] = l.gen;
    maybe_[l.block].clear();
    writes_acked_.fetch_add(1);
    return;
  }
  reads_checked_.fetch_add(1);
  if (auto p = check_locked(l.block, {l.buf, o_.block_size}); !p.empty()) problem_locked("read during the run: " + p);
}

void verified_load::driver() {
  std::vector<storage::vstore_io*> batch;
  {
    std::lock_guard lk(mu_);
    for (auto& l : lanes_) {
      issue_locked(l);
      batch.push_back(&l.io);
    }
  }
  for (;;) {
    if (!batch.empty()) dev_.submit(std::span<storage::vstore_io* const>(batch.data(), batch.size()));
    batch.clear();
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return !done_.empty() || (stopping_ && in_flight_ == 0); });
    if (done_.empty()) return;  // stopping, nothing in flight
    std::vector<uint32_t> done;
    done.swap(done_);
    for (uint32_t i : done) {
      finish_locked(lanes_[i]);
      if (!stopping_) {
        issue_locked(lanes_[i]);
        batch.push_back(&lanes_[i].io);
      }
    }
  }
}

std::vector<std::string> verified_load::verify_device(storage::Vstore& dev) {
  std::vector<std::string> out;
  std::unique_ptr<std::byte[], void (*)(void*)> buf{static_cast<std::byte*>(std::aligned_alloc(4096, o_.block_size)),
                                                    std::free};
  for (uint64_t b = 0; b < o_.blocks; ++b) {
    auto r = dev.read(b * o_.block_size, buf.get(), o_.block_size);
    std::lock_guard lk(mu_);
    if (!r) {
      if (out.size() < max_problems) out.push_back("block " + std::to_string(b) + ": read failed: " + r.err().what());
      continue;
    }
    if (auto p = check_locked(b, {buf.get(), o_.block_size}); !p.empty() && out.size() < max_problems)
      out.push_back(p);
  }
  return out;
}

std::vector<std::string> verified_load::verify_image(const std::string& path) {
  std::vector<std::string> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {"open " + path + ": " + std::strerror(errno)};
  std::vector<std::byte> buf(o_.block_size);
  for (uint64_t b = 0; b < o_.blocks; ++b) {
    ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(b * o_.block_size));
    if (n != static_cast<ssize_t>(buf.size())) {
      out.push_back("pread block " + std::to_string(b) + " of " + path + " failed");
      break;
    }
    std::lock_guard lk(mu_);
    if (auto p = check_locked(b, buf); !p.empty() && out.size() < max_problems) out.push_back(p);
  }
  ::close(fd);
  return out;
}

}  // namespace uvd::test
