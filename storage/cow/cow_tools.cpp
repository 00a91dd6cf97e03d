// SPDX-License-Identifier: Apache-2.0
// COW control plane: creating, inspecting and committing overlays.
#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "core/uri.hpp"
#include "storage/cow/cow.hpp"

namespace uvd::storage {

namespace {

struct aligned_buf {
  std::byte* p = nullptr;
  explicit aligned_buf(uint64_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, (n + 4095) / 4096 * 4096))) {}
  ~aligned_buf() { std::free(p); }
  aligned_buf(const aligned_buf&) = delete;
  aligned_buf& operator=(const aligned_buf&) = delete;
};

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

bool is_uri(std::string_view s) { return !s.empty() && s[0] != '/' && core::parse_uri(s).has_value(); }

// A path named directly or as file://path.
core::result<std::string> file_path_of(std::string_view path_or_uri) {
  if (!is_uri(path_or_uri)) return std::string(path_or_uri);
  auto u = core::parse_uri(path_or_uri);
  if (u->transport != "file") {
    std::string msg(path_or_uri);
    msg += " is not a file: overlays are created as files (use format_cow for other stores)";
    return core::fail(EINVAL, std::move(msg));
  }
  return u->target;
}

void sync_parent_dir(const std::string& path) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
}

core::result<void> check_geometry(const cow_header& h, const Vstore& base, const Vstore& overlay) {
  const uint32_t lbs = std::max({base.block_size(), overlay.block_size(), 512u});
  if (overlay.block_size() > cow_bitmap_page || h.block_size % lbs != 0 || h.virtual_size % lbs != 0)
    return core::fail(EINVAL, "COW block size " + std::to_string(h.block_size) + " and size " +
                                  std::to_string(h.virtual_size) + " do not fit the block sizes of base (" +
                                  std::to_string(base.block_size()) + ") and overlay (" +
                                  std::to_string(overlay.block_size()) + ")");
  return core::ok();
}

}  // namespace

std::string cow_overlay_store_uri(std::string_view target) {
  if (is_uri(target)) return std::string(target);
  return "file://" + std::string(target);
}

std::string cow_normalize_uri(std::string_view path_or_uri) {
  if (is_uri(path_or_uri)) return std::string(path_or_uri);
  std::error_code ec;
  auto abs = std::filesystem::absolute(std::filesystem::path(std::string(path_or_uri)), ec);
  return "file://" + (ec ? std::string(path_or_uri) : abs.lexically_normal().string());
}

core::result<uint64_t> cow_overlay_size(uint64_t base_size, uint32_t block_size) {
  auto h = make_cow_header(base_size, block_size, {}, {});
  if (!h) return core::fail(std::move(h).err());
  return h->store_size();
}

core::result<cow_header> format_cow(Vstore& overlay, Vstore& base, std::string base_uri,
                                    const cow_create_options& opts) {
  if (overlay.read_only()) return core::fail(EROFS, "the overlay store is read-only");
  auto fp = fingerprint_base(base);
  if (!fp) return core::fail(std::move(fp).err());
  auto h = make_cow_header(base.size(), opts.block_size, *fp, std::move(base_uri));
  if (!h) return core::fail(std::move(h).err());
  if (auto r = check_geometry(*h, base, overlay); !r) return core::fail(std::move(r).err());
  if (overlay.size() < h->store_size())
    return core::fail(ENOSPC, "the overlay store has " + std::to_string(overlay.size()) +
                                  " bytes; an overlay for this base needs " + std::to_string(h->store_size()));
  // An empty bitmap first, durable, and only then the header that makes the
  // store an overlay: a crash in between leaves no half-made overlay.
  if (auto r = overlay.write_zeroes(h->bitmap_offset, h->bitmap_length); !r) return core::fail(std::move(r).err());
  if (auto r = overlay.flush(); !r) return core::fail(std::move(r).err());
  auto bytes = encode_cow_header(*h);
  aligned_buf buf(bytes.size());
  if (!buf.p) return core::fail(ENOMEM, "no memory for a COW header");
  std::memcpy(buf.p, bytes.data(), bytes.size());
  if (auto r = overlay.write(0, buf.p, bytes.size()); !r) return core::fail(std::move(r).err());
  if (auto r = overlay.flush(); !r) return core::fail(std::move(r).err());
  return h;
}

core::result<cow_header> create_cow_file(core::registry& reg, const std::string& overlay_path,
                                         std::string_view base_uri, const cow_create_options& opts) {
  auto path = file_path_of(overlay_path);
  if (!path) return core::fail(std::move(path).err());
  const std::string normalized_base = cow_normalize_uri(base_uri);
  open_options bo;
  bo.read_only = true;
  auto base = Vstore::open(reg, normalized_base, bo);
  if (!base) return core::fail(base.err().errnum(), "base: " + base.err().message);
  auto size = cow_overlay_size((*base)->size(), opts.block_size);
  if (!size) return core::fail(std::move(size).err());

  int fd = ::open(path->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return core::fail(EEXIST, *path + " already exists; refusing to replace it");
    return core::fail(errno, errno_text("cannot create " + *path));
  }
  int rc = ::ftruncate(fd, static_cast<off_t>(*size));
  int err = errno;
  ::close(fd);
  auto undo = [&](core::error e) -> core::result<cow_header> {
    ::unlink(path->c_str());
    return core::fail(std::move(e));
  };
  if (rc != 0) return undo(core::make_error(err, "cannot size " + *path + ": " + std::strerror(err)));

  auto overlay = Vstore::open(reg, cow_overlay_store_uri(*path), {});
  if (!overlay) return undo(core::make_error(overlay.err().errnum(), "overlay: " + overlay.err().message));
  auto h = format_cow(**overlay, **base, normalized_base, opts);
  overlay->reset();
  if (!h) return undo(std::move(h).err());
  sync_parent_dir(*path);
  return h;
}

core::result<cow_report> inspect_cow(core::registry& reg, std::string_view overlay, bool check_base,
                                     std::string_view base_override) {
  open_options oo;
  oo.read_only = true;
  auto ov = Vstore::open(reg, cow_overlay_store_uri(overlay), oo);
  if (!ov) return core::fail(ov.err().errnum(), "overlay: " + ov.err().message);
  Vstore& store = **ov;
  if (store.size() < cow_header_size)
    return core::fail(EUCLEAN, std::string(overlay) + " is too small to be a COW overlay");
  aligned_buf head(cow_header_size);
  if (!head.p) return core::fail(ENOMEM, "no memory for a COW header");
  if (auto r = store.read(0, head.p, cow_header_size); !r) return core::fail(std::move(r).err());
  auto h = parse_cow_header({head.p, cow_header_size});
  if (!h) return core::fail(h.err().errnum(), std::string(overlay) + ": " + h.err().message);
  // Header and bitmap, validated exactly as opening does.
  const uint64_t meta = h->bitmap_offset + h->bitmap_length;
  if (auto r = check_cow_layout(*h, store.size()); !r)
    return core::fail(r.err().errnum(), std::string(overlay) + ": " + r.err().message);
  aligned_buf image(meta);
  if (!image.p) return core::fail(ENOMEM, "no memory for a COW bitmap");
  if (auto r = store.read(0, image.p, meta); !r) return core::fail(std::move(r).err());
  auto st = load_cow_state({image.p, meta}, store.size());
  if (!st) return core::fail(st.err().errnum(), std::string(overlay) + ": " + st.err().message);

  cow_report rep;
  rep.header = std::move(st->header);
  rep.store_size = store.size();
  rep.allocated = st->allocated;
  if (!check_base) return rep;
  rep.base_checked = true;
  std::string base_uri = base_override.empty() ? rep.header.base_uri : std::string(base_override);
  if (base_uri.empty()) {
    rep.base_message = "the overlay records no base address";
    return rep;
  }
  open_options bo;
  bo.read_only = true;
  auto base = Vstore::open(reg, cow_normalize_uri(base_uri), bo);
  if (!base) {
    rep.base_message = "cannot open " + base_uri + ": " + base.err().what();
    return rep;
  }
  if ((*base)->size() != rep.header.base_size) {
    rep.base_message = base_uri + " has " + std::to_string((*base)->size()) + " bytes, the overlay expects " +
                       std::to_string(rep.header.base_size);
    return rep;
  }
  auto fp = fingerprint_base(**base);
  if (!fp) {
    rep.base_message = "cannot read " + base_uri + ": " + fp.err().what();
    return rep;
  }
  if (!(*fp == rep.header.base_fingerprint)) {
    rep.base_message = base_uri + " has content fingerprint " + fp->hex() + ", the overlay expects " +
                       rep.header.base_fingerprint.hex();
    return rep;
  }
  rep.base_ok = true;
  rep.base_message = "size and content fingerprint match";
  return rep;
}

namespace {

struct commit_slot {
  std::unique_ptr<aligned_buf> buf;
  iovec iov{};
  vstore_io io;
  bool busy = false;
  bool done = false;
  int status = 0;
};

struct commit_state {
  std::mutex mu;
  std::condition_variable cv;

  static void on_done(vstore_io* io, int status) {
    auto* self = static_cast<commit_state*>(io->user);
    std::lock_guard lk(self->mu);
    for (auto* s : self->slots)
      if (&s->io == io) {
        s->done = true;
        s->status = status;
      }
    self->cv.notify_all();
  }
  std::vector<commit_slot*> slots;
};

bool all_zero(const std::byte* p, uint64_t n) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w) return false;
  }
  for (; i < n; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

}  // namespace

core::result<void> commit_cow(Vstore& cow, const std::string& output_path, const cow_commit_options& opts) {
  const uint64_t size = cow.size();
  uint64_t chunk = std::max<uint64_t>(opts.chunk, cow.block_size());
  chunk -= chunk % cow.block_size();
  const uint32_t depth = std::clamp<uint32_t>(opts.in_flight, 1, 64);

  int fd = ::open(output_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return core::fail(EEXIST, output_path + " already exists; refusing to replace it");
    return core::fail(errno, errno_text("cannot create " + output_path));
  }
  auto undo = [&](core::error e) -> core::result<void> {
    ::close(fd);
    ::unlink(output_path.c_str());
    return core::fail(std::move(e));
  };
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
    return undo(core::make_error(errno, errno_text("cannot size " + output_path)));

  commit_state state;
  std::vector<commit_slot> slots(depth);
  for (auto& s : slots) {
    s.buf = std::make_unique<aligned_buf>(chunk);
    if (!s.buf->p) return undo(core::make_error(ENOMEM, "no memory for commit buffers"));
    state.slots.push_back(&s);
  }
  // Slot k carries chunks k, k + depth, ...: reads run ahead, writes go in order.
  uint64_t next_read = 0, written = 0;
  auto issue = [&](commit_slot& s) {
    uint64_t len = std::min(chunk, size - next_read);
    s.iov = {s.buf->p, static_cast<size_t>(len)};
    s.io = vstore_io{};
    s.io.opcode = core::VSTORE_OP_READ;
    s.io.offset = next_read;
    s.io.length = len;
    s.io.iov = &s.iov;
    s.io.iovcnt = 1;
    s.io.done = &commit_state::on_done;
    s.io.user = &state;
    {
      std::lock_guard lk(state.mu);
      s.busy = true;
      s.done = false;
    }
    next_read += len;
    cow.submit(&s.io);
  };
  auto wait_all = [&] {
    std::unique_lock lk(state.mu);
    state.cv.wait(lk, [&] {
      for (auto& s : slots)
        if (s.busy && !s.done) return false;
      return true;
    });
  };
  for (auto& s : slots)
    if (next_read < size) issue(s);

  size_t k = 0;
  while (written < size) {
    commit_slot& s = slots[k];
    {
      std::unique_lock lk(state.mu);
      state.cv.wait(lk, [&] { return s.done; });
      s.busy = false;
    }
    if (s.status < 0) {
      wait_all();
      return undo(core::make_error(s.status, "reading " + std::to_string(s.io.length) + " bytes at offset " +
                                                 std::to_string(s.io.offset) + " of the COW device failed"));
    }
    const uint64_t off = s.io.offset, len = s.io.length;
    if (!all_zero(s.buf->p, len)) {
      uint64_t done = 0;
      while (done < len) {
        ssize_t n = ::pwrite(fd, s.buf->p + done, len - done, static_cast<off_t>(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          int err = n < 0 ? errno : EIO;
          wait_all();
          return undo(core::make_error(err, "writing " + output_path + " at offset " + std::to_string(off + done) +
                                                ": " + std::strerror(err)));
        }
        done += static_cast<uint64_t>(n);
      }
    }
    written += len;
    if (opts.progress) opts.progress(written, size);
    if (next_read < size) issue(s);
    k = (k + 1) % depth;
  }
  if (::fsync(fd) != 0) return undo(core::make_error(errno, errno_text("cannot sync " + output_path)));
  ::close(fd);
  sync_parent_dir(output_path);
  if (opts.progress && size == 0) opts.progress(0, 0);
  return core::ok();
}

}  // namespace uvd::storage
