// SPDX-License-Identifier: Apache-2.0
// The file transport's control plane: options, open (geometry, features,
// engine choice), info, probe, and the vstore_ops table. The data path is in
// file_uring.cpp / file_threadpool.cpp, sharing file_io.cpp.
#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <new>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "transports/file/file.hpp"
#include "transports/file/file_device.hpp"

namespace uvd::file {

using core::vstore_req;

namespace {

constexpr uint32_t default_block_size = 512;
constexpr uint32_t max_transfer_bytes = 1u << 20;
constexpr size_t zero_buf_bytes = 64 * 1024;

bool parse_bool(std::string_view v, bool* out) {
  if (v == "1" || v == "true" || v == "yes" || v == "on") *out = true;
  else if (v == "0" || v == "false" || v == "no" || v == "off") *out = false;
  else return false;
  return true;
}

bool parse_u32(std::string_view v, uint32_t lo, uint32_t hi, uint32_t* out) {
  uint32_t n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi) return false;
  *out = n;
  return true;
}

std::string errno_text(int err) { return std::strerror(err); }

// The message a person needs when open fails: the path, what was tried, why,
// and the way out when there is one.
core::unexpected open_error(int err, const std::string& path, bool read_only, bool direct) {
  const char* how = read_only ? " read-only" : " read-write";
  if (!read_only && (err == EACCES || err == EPERM || err == EROFS))
    return core::fail(err, "cannot open " + path + how + ": " + errno_text(err) + " (open it read-only with ro=1)");
  if (direct && err == EINVAL)
    return core::fail(err, "cannot open " + path + " with O_DIRECT: the filesystem does not support direct I/O"
                           " (drop direct=1)");
  return core::fail(err, "cannot open " + path + how + ": " + errno_text(err));
}

// Reads the geometry of a block device.
core::result<void> block_geometry(file_device& dev) {
  uint64_t bytes = 0;
  if (::ioctl(dev.fd, BLKGETSIZE64, &bytes) != 0)
    return core::fail(errno, "cannot read the size of block device " + dev.path + ": " + errno_text(errno));
  int logical = 0;
  if (::ioctl(dev.fd, BLKSSZGET, &logical) != 0 || logical < static_cast<int>(default_block_size)) logical = default_block_size;
  unsigned int opt = 0;
  if (::ioctl(dev.fd, BLKIOOPT, &opt) != 0) opt = 0;
  unsigned short rotational = 0;
  if (::ioctl(dev.fd, BLKROTATIONAL, &rotational) == 0 && rotational) dev.info.features |= core::VSTORE_F_ROTATIONAL;
  dev.info.size = bytes;
  dev.info.block_size = static_cast<uint32_t>(logical);
  if (dev.direct) dev.info.mem_align = static_cast<uint32_t>(logical);
  dev.info.opt_io_size = opt;
  if (!dev.info.read_only) {
    // A zero-length BLKDISCARD changes nothing: EOPNOTSUPP says the device
    // cannot discard, EINVAL (the empty range) that it can.
    uint64_t probe[2] = {0, 0};
    if (::ioctl(dev.fd, BLKDISCARD, probe) == 0 || errno != EOPNOTSUPP) dev.info.features |= core::VSTORE_F_DISCARD;
  }
  return core::ok();
}

// Reads the geometry of a regular file.
void file_geometry(file_device& dev, const struct stat& st) {
  uint32_t block = default_block_size;
#ifdef STATX_DIOALIGN
  if (dev.direct) {
    struct statx sx{};
    if (::statx(dev.fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) &&
        sx.stx_dio_offset_align > block) {
      block = sx.stx_dio_offset_align;
      dev.info.mem_align = sx.stx_dio_mem_align;
      spdlog::debug("file: {}: O_DIRECT needs {}-byte offsets, {}-byte buffers", dev.path, sx.stx_dio_offset_align,
                    sx.stx_dio_mem_align);
    }
  }
#endif
  const uint64_t bytes = static_cast<uint64_t>(st.st_size);
  // A file whose size is not a multiple of the block still shows all its
  // bytes: the last block reads back zero-filled past the end of the file.
  dev.info.size = (bytes + block - 1) / block * block;
  if (dev.info.size != bytes)
    spdlog::debug("file: {}: {} bytes rounded up to {} ({}-byte blocks)", dev.path, bytes, dev.info.size, block);
  dev.info.block_size = block;
  // Without statx's answer, page alignment satisfies every O_DIRECT filesystem.
  if (dev.direct && dev.info.mem_align == 0) dev.info.mem_align = 4096;
  dev.info.opt_io_size = st.st_blksize > 0 ? static_cast<uint32_t>(st.st_blksize) : 0;
  if (!dev.info.read_only) {
    // Punching past the end of the file changes nothing, and says whether
    // the filesystem can punch holes at all.
    const off_t past_end = static_cast<off_t>(dev.info.size + block);
    if (::fallocate(dev.fd, file_fallocate_mode(ZERO_PUNCH), past_end, block) == 0) {
      dev.info.features |= core::VSTORE_F_DISCARD | core::VSTORE_F_DISCARD_ZEROES;
    } else {
      dev.punch_ok = false;
      spdlog::debug("file: {}: no hole punching ({}); discard is off", dev.path, errno_text(errno));
    }
  }
}

core::result<void> start_engine(file_device& dev, const file_options& opts) {
  if (opts.engine != file_engine_kind::threads) {
    auto ring = make_uring_engine(dev, opts.entries);
    if (ring) {
      dev.engine = std::move(*ring);
      return core::ok();
    }
    if (opts.engine == file_engine_kind::uring)
      return core::fail(ring.err().errnum(), "io_uring is not available for " + dev.path + ": " + ring.err().what() +
                                                 " (engine=threads uses a thread pool instead)");
    spdlog::info("file: io_uring unavailable ({}); using the thread-pool engine", ring.err().what());
  }
  auto pool = make_thread_engine(dev, opts.threads);
  if (!pool) return core::fail(std::move(pool).err());
  dev.engine = std::move(*pool);
  return core::ok();
}

core::result<std::unique_ptr<file_device>> open_device(const core::vstore_open_params& params) {
  if (!params.host || !params.host->complete) return core::fail(EINVAL, "file: open without a completion path");
  const std::string path = params.target ? params.target : "";
  if (path.empty()) return core::fail(EINVAL, "file: no path given (write file:///path/to/image)");
  auto parsed = parse_file_options(params.options ? params.options : "");
  if (!parsed) return core::fail(std::move(parsed).err());
  file_options opts = *parsed;
  const bool read_only = opts.read_only || (params.flags & core::VSTORE_OPEN_READ_ONLY);
  const bool direct = opts.direct || (params.flags & core::VSTORE_OPEN_DIRECT);

  // Look before opening: opening a FIFO read-only would block.
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return open_error(errno, path, read_only, direct);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    return core::fail(S_ISDIR(st.st_mode) ? EISDIR : EINVAL,
                      path + " is not a regular file or a block device, so it cannot back a disk");

  auto dev = std::make_unique<file_device>();
  dev->path = path;
  dev->direct = direct;
  dev->host = *params.host;
  dev->info.read_only = read_only ? 1 : 0;
  dev->fd = ::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (dev->fd < 0) return open_error(errno, path, read_only, direct);
  if (::fstat(dev->fd, &st) != 0) return core::fail(errno, "cannot stat " + path + ": " + errno_text(errno));

  dev->block_device = S_ISBLK(st.st_mode);
  if (dev->block_device) {
    if (auto geo = block_geometry(*dev); !geo) return core::fail(std::move(geo).err());
    std::snprintf(dev->info.id, sizeof dev->info.id, "file:rdev=%u:%u", major(st.st_rdev), minor(st.st_rdev));
  } else if (S_ISREG(st.st_mode)) {
    file_geometry(*dev, st);
    std::snprintf(dev->info.id, sizeof dev->info.id, "file:dev=%llu:ino=%llu",
                  static_cast<unsigned long long>(st.st_dev), static_cast<unsigned long long>(st.st_ino));
  } else {
    return core::fail(EINVAL, path + " changed into something that is not a regular file or a block device");
  }
  dev->info.max_transfer = max_transfer_bytes;
  dev->info.max_segments = IOV_MAX;
  dev->info.features |= core::VSTORE_F_FLUSH | core::VSTORE_F_FUA;
  if (!read_only) {
    dev->info.features |= core::VSTORE_F_WRITE_ZEROES;
    dev->zero_buf_len = std::max<size_t>(zero_buf_bytes, dev->info.block_size);
    void* zeros = std::aligned_alloc(std::max<size_t>(4096, dev->info.block_size), dev->zero_buf_len);
    if (!zeros) return core::fail(ENOMEM, "file: no memory for the zero buffer");
    std::memset(zeros, 0, dev->zero_buf_len);
    dev->zero_buf.reset(static_cast<std::byte*>(zeros));
  }

  if (auto started = start_engine(*dev, opts); !started) return core::fail(std::move(started).err());
  if (opts.fence) {
    if (auto f = file_fence_start(*dev); !f) return core::fail(std::move(f).err());
  }
  spdlog::debug("file: opened {} {} ({} bytes, {}-byte blocks{}) on the {} engine", path,
               read_only ? "read-only" : "read-write", dev->info.size, dev->info.block_size,
               direct ? ", O_DIRECT" : "", dev->engine->name());
  return dev;
}

// --- the ops ---

int file_open(const core::vstore_open_params* params, void** handle) {
  if (!params || !handle) return -EINVAL;
  try {
    auto dev = open_device(*params);
    if (!dev) {
      if (params->errbuf && params->errbuf_len)
        std::snprintf(params->errbuf, params->errbuf_len, "%s", dev.err().what().c_str());
      spdlog::debug("file: {}", dev.err().what());
      return -dev.err().errnum();
    }
    *handle = dev->release();
    return 0;
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  }
}

void file_release(void* handle) { delete static_cast<file_device*>(handle); }

int file_info(void* handle, core::vstore_info* out) {
  *out = static_cast<file_device*>(handle)->info;
  return 0;
}

size_t file_ctx_size(void*) { return sizeof(file_req_ctx); }

int file_submit(void* handle, vstore_req* const* reqs, uint32_t n) {
  auto& dev = *static_cast<file_device*>(handle);
  for (uint32_t i = 0; i < n; ++i) file_init_ctx(dev, reqs[i]);
  if (dev.fence) return file_fence_submit(dev, reqs, n);
  return dev.engine->submit(reqs, n);
}

int file_fence(void* handle, uint32_t epoch) { return file_fence_op(*static_cast<file_device*>(handle), epoch); }

// Size of a block device from sysfs (512-byte sectors), without opening it.
uint64_t block_device_size(dev_t rdev) {
  std::ifstream in("/sys/dev/block/" + std::to_string(major(rdev)) + ":" + std::to_string(minor(rdev)) + "/size");
  uint64_t sectors = 0;
  return (in >> sectors) ? sectors * 512 : 0;
}

bool fill_probe_entry(const std::string& path, const struct stat& st, core::vstore_probe_entry* e) {
  std::string uri = "file://" + path;
  if (uri.size() >= sizeof e->uri) return false;
  std::snprintf(e->uri, sizeof e->uri, "%s", uri.c_str());
  if (S_ISBLK(st.st_mode)) {
    std::snprintf(e->description, sizeof e->description, "block device %u:%u", major(st.st_rdev), minor(st.st_rdev));
    e->size = block_device_size(st.st_rdev);
  } else {
    std::snprintf(e->description, sizeof e->description, "regular file");
    e->size = static_cast<uint64_t>(st.st_size);
  }
  return true;
}

int file_probe(const char* scope, core::vstore_probe_entry* out, uint32_t max) {
  try {
    std::string where = scope && *scope ? scope : ".";
    char* resolved = ::realpath(where.c_str(), nullptr);
    if (!resolved) return -errno;
    std::string base(resolved);
    std::free(resolved);

    struct stat st{};
    if (::stat(base.c_str(), &st) != 0) return -errno;
    std::vector<std::string> paths;
    if (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)) {
      paths.push_back(base);
    } else {
      DIR* dir = ::opendir(base.c_str());
      if (!dir) return -errno;
      const std::string prefix = base == "/" ? base : base + "/";
      while (dirent* d = ::readdir(dir)) {
        if (std::strcmp(d->d_name, ".") != 0 && std::strcmp(d->d_name, "..") != 0) paths.push_back(prefix + d->d_name);
      }
      ::closedir(dir);
      std::sort(paths.begin(), paths.end());
    }
    uint32_t count = 0;
    for (const std::string& p : paths) {
      if (::stat(p.c_str(), &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) continue;
      core::vstore_probe_entry entry{};
      if (!fill_probe_entry(p, st, &entry)) continue;  // too long to name in a URI field
      if (out && count < max) out[count] = entry;
      if (count == INT_MAX) break;
      ++count;
    }
    return static_cast<int>(count);
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  }
}

}  // namespace

core::result<file_options> parse_file_options(std::string_view options) {
  file_options o;
  while (!options.empty()) {
    const auto amp = options.find('&');
    std::string_view kv = options.substr(0, amp);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
    if (kv.empty()) continue;
    const auto eq = kv.find('=');
    const std::string_view key = kv.substr(0, eq);
    const std::string_view value = eq == std::string_view::npos ? std::string_view("1") : kv.substr(eq + 1);
    bool good = true;
    if (key == "ro") {
      good = parse_bool(value, &o.read_only);
    } else if (key == "direct") {
      good = parse_bool(value, &o.direct);
    } else if (key == "engine") {
      if (value == "auto") o.engine = file_engine_kind::automatic;
      else if (value == "uring") o.engine = file_engine_kind::uring;
      else if (value == "threads") o.engine = file_engine_kind::threads;
      else good = false;
    } else if (key == "entries") {
      good = parse_u32(value, 1, 4096, &o.entries);
    } else if (key == "threads") {
      good = parse_u32(value, 1, 256, &o.threads);
    } else if (key == "fence") {
      good = parse_bool(value, &o.fence);
    } else {
      return core::fail(EINVAL, "unknown file option '" + std::string(key) +
                                    "' (known: ro, direct, engine, entries, threads, fence)");
    }
    if (!good) {
      const char* want = key == "engine"    ? "auto, uring or threads"
                         : key == "entries" ? "1..4096"
                         : key == "threads" ? "1..256"
                                            : "1 or 0";
      return core::fail(EINVAL, "bad value for file option " + std::string(kv) + " (want " + want + ")");
    }
  }
  return o;
}

const char* to_string(file_engine_kind kind) noexcept {
  switch (kind) {
    case file_engine_kind::uring:
      return "uring";
    case file_engine_kind::threads:
      return "threads";
    default:
      return "auto";
  }
}

file_device& file_device_of(void* handle) { return *static_cast<file_device*>(handle); }

constexpr core::vstore_ops file_vstore_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "file",
    .description = "host file or block device (io_uring, or a thread pool)",
    .open = file_open,
    .release = file_release,
    .info = file_info,
    .ctx_size = file_ctx_size,
    .submit = file_submit,
    .probe = file_probe,
    .poll = nullptr,
    // -ENOTSUP unless the device was opened with fence=1.
    .fence = file_fence,
};

}  // namespace uvd::file
