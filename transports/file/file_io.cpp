// SPDX-License-Identifier: Apache-2.0
// Request execution shared by both engines: the synchronous path the thread
// pool runs (and io_uring hands over for what it cannot express), and the
// bookkeeping both need for short transfers, end of file and write-zeroes.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include <spdlog/spdlog.h>

#include "transports/file/file_device.hpp"

namespace uvd::file {

using core::vstore_req;

file_device::~file_device() {
  fence.reset();   // its gate thread submits to the engine
  engine.reset();  // joins the engine's threads while fd is still open
  if (fd >= 0) ::close(fd);
}

void file_init_ctx(const file_device& dev, vstore_req* req) {
  file_req_ctx& c = ctx_of(req);
  c = file_req_ctx{};
  if (req->opcode == core::VSTORE_OP_WRITE_ZEROES) c.zero = file_first_zero_method(dev, *req);
}

int file_precheck(const file_device& dev, const vstore_req& req) {
  switch (req.opcode) {
    case core::VSTORE_OP_READ:
      break;
    case core::VSTORE_OP_WRITE:
    case core::VSTORE_OP_WRITE_ZEROES:
      if (dev.info.read_only) return -EROFS;
      break;
    case core::VSTORE_OP_DISCARD:
      if (dev.info.read_only) return -EROFS;
      if (!(dev.info.features & core::VSTORE_F_DISCARD)) return -EOPNOTSUPP;
      break;
    case core::VSTORE_OP_FLUSH:
      return 0;
    default:
      return -EINVAL;
  }
  if ((req.opcode == core::VSTORE_OP_READ || req.opcode == core::VSTORE_OP_WRITE) &&
      (req.iov == nullptr || req.iovcnt == 0 || req.iovcnt > IOV_MAX))
    return -EINVAL;
  return 0;
}

iov_slice file_remaining_iov(vstore_req* req) {
  file_req_ctx& c = ctx_of(req);
  if (c.done == 0) return {req->iov, req->iovcnt};
  uint64_t skip = c.done;
  uint32_t i = 0;
  while (i < req->iovcnt && skip >= req->iov[i].iov_len) {
    skip -= req->iov[i].iov_len;
    ++i;
  }
  if (skip == 0) return {req->iov + i, req->iovcnt - i};
  // Stopped inside iovec i: send its rest alone; the next step resumes at i + 1.
  c.partial.iov_base = static_cast<char*>(req->iov[i].iov_base) + skip;
  c.partial.iov_len = req->iov[i].iov_len - skip;
  return {&c.partial, 1};
}

void file_fill_past_eof(file_device& dev, vstore_req* req) {
  dev.stats.eof_fills.fetch_add(1, std::memory_order_relaxed);
  uint64_t skip = ctx_of(req).done;
  uint64_t left = req->length - std::min(skip, req->length);
  for (uint32_t i = 0; i < req->iovcnt && left > 0; ++i) {
    const iovec& v = req->iov[i];
    if (skip >= v.iov_len) {
      skip -= v.iov_len;
      continue;
    }
    size_t n = static_cast<size_t>(std::min<uint64_t>(v.iov_len - skip, left));
    std::memset(static_cast<char*>(v.iov_base) + skip, 0, n);
    left -= n;
    skip = 0;
  }
  ctx_of(req).done = req->length;
}

bool file_past_eof(const file_device& dev, uint64_t pos) {
  if (dev.block_device) return false;
  struct stat st{};
  if (::fstat(dev.fd, &st) != 0) return false;
  return pos >= static_cast<uint64_t>(st.st_size);
}

int file_fallocate_mode(uint32_t method) {
  return method == ZERO_RANGE ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
}

uint32_t file_first_zero_method(const file_device& dev, const vstore_req& req) {
  if (!(req.flags & core::VSTORE_REQ_NO_UNMAP) && dev.punch_ok.load(std::memory_order_relaxed)) return ZERO_PUNCH;
  if (dev.zero_range_ok.load(std::memory_order_relaxed)) return ZERO_RANGE;
  return ZERO_WRITE;
}

uint32_t file_next_zero_method(file_device& dev, uint32_t method) {
  if (method == ZERO_PUNCH) {
    if (dev.punch_ok.exchange(false)) spdlog::debug("file: {}: fallocate(PUNCH_HOLE) unsupported", dev.path);
    return dev.zero_range_ok.load(std::memory_order_relaxed) ? ZERO_RANGE : ZERO_WRITE;
  }
  if (dev.zero_range_ok.exchange(false))
    spdlog::debug("file: {}: fallocate(ZERO_RANGE) unsupported; write-zeroes writes zeros", dev.path);
  return ZERO_WRITE;
}

namespace {

int read_write(file_device& dev, vstore_req* req) {
  file_req_ctx& c = ctx_of(req);
  const bool is_read = req->opcode == core::VSTORE_OP_READ;
  const int rw_flags = !is_read && (req->flags & core::VSTORE_REQ_FUA) ? RWF_DSYNC : 0;
  while (c.done < req->length) {
    iov_slice s = file_remaining_iov(req);
    const off_t pos = static_cast<off_t>(req->offset + c.done);
    ssize_t r = is_read ? ::preadv2(dev.fd, s.iov, static_cast<int>(s.count), pos, 0)
                        : ::pwritev2(dev.fd, s.iov, static_cast<int>(s.count), pos, rw_flags);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (r == 0) {
      if (!is_read) return -EIO;  // a write that makes no progress would spin forever
      file_fill_past_eof(dev, req);
      return 0;
    }
    c.done += static_cast<uint64_t>(r);
    if (c.done < req->length) {
      dev.stats.short_transfers.fetch_add(1, std::memory_order_relaxed);
      if (is_read && file_past_eof(dev, req->offset + c.done)) {
        file_fill_past_eof(dev, req);
        return 0;
      }
    }
  }
  return 0;
}

int discard(file_device& dev, const vstore_req& req) {
  for (;;) {
    int rc;
    if (dev.block_device) {
      uint64_t range[2] = {req.offset, req.length};
      rc = ::ioctl(dev.fd, BLKDISCARD, range);
    } else {
      rc = ::fallocate(dev.fd, file_fallocate_mode(ZERO_PUNCH), static_cast<off_t>(req.offset),
                       static_cast<off_t>(req.length));
    }
    if (rc == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int write_zero_buffer(file_device& dev, const vstore_req& req) {
  if (!dev.zero_buf) return -EROFS;
  dev.stats.zero_writes.fetch_add(1, std::memory_order_relaxed);
  const int rw_flags = (req.flags & core::VSTORE_REQ_FUA) ? RWF_DSYNC : 0;
  constexpr uint32_t max_iov = 16;
  iovec iov[max_iov];
  uint64_t pos = req.offset;
  uint64_t left = req.length;
  while (left > 0) {
    uint32_t n = 0;
    uint64_t chunk = 0;
    while (n < max_iov && chunk < left) {
      size_t len = static_cast<size_t>(std::min<uint64_t>(dev.zero_buf_len, left - chunk));
      iov[n++] = iovec{dev.zero_buf.get(), len};
      chunk += len;
    }
    ssize_t r = ::pwritev2(dev.fd, iov, static_cast<int>(n), static_cast<off_t>(pos), rw_flags);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (r == 0) return -EIO;
    pos += static_cast<uint64_t>(r);
    left -= static_cast<uint64_t>(r);
  }
  return 0;
}

int write_zeroes(file_device& dev, vstore_req* req) {
  file_req_ctx& c = ctx_of(req);
  for (;;) {
    switch (c.zero) {
      case ZERO_PUNCH:
      case ZERO_RANGE:
        if (::fallocate(dev.fd, file_fallocate_mode(c.zero), static_cast<off_t>(req->offset),
                        static_cast<off_t>(req->length)) == 0) {
          if (!(req->flags & core::VSTORE_REQ_FUA)) return 0;
          c.zero = ZERO_SYNC;  // fallocate changes metadata only fdatasync makes durable
        } else if (errno == EOPNOTSUPP) {
          c.zero = file_next_zero_method(dev, c.zero);
        } else if (errno != EINTR) {
          return -errno;
        }
        break;
      case ZERO_WRITE:
        return write_zero_buffer(dev, *req);
      case ZERO_SYNC:
        return ::fdatasync(dev.fd) == 0 ? 0 : -errno;
      default:
        return -EINVAL;
    }
  }
}

}  // namespace

int file_execute(file_device& dev, vstore_req* req) {
  switch (req->opcode) {
    case core::VSTORE_OP_READ:
    case core::VSTORE_OP_WRITE:
      return read_write(dev, req);
    case core::VSTORE_OP_FLUSH:
      return ::fdatasync(dev.fd) == 0 ? 0 : -errno;
    case core::VSTORE_OP_DISCARD:
      return discard(dev, *req);
    case core::VSTORE_OP_WRITE_ZEROES:
      return write_zeroes(dev, req);
    default:
      return -EINVAL;
  }
}

}  // namespace uvd::file
