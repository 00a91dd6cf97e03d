// SPDX-License-Identifier: Apache-2.0
#include "storage/fence.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace uvd::storage {

namespace {

constexpr char record_magic[8] = {'U', 'V', 'D', 'F', 'E', 'N', 'C', '1'};
constexpr size_t record_size = 16;
constexpr off_t gate_byte = 16;
constexpr off_t epoch_byte = 17;

void put_le32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

uint32_t get_le32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{p[i]} << (8 * i);
  return v;
}

int write_record(int fd, uint32_t epoch) {
  unsigned char buf[record_size];
  std::memcpy(buf, record_magic, sizeof record_magic);
  put_le32(buf + 8, epoch);
  put_le32(buf + 12, ~epoch);
  ssize_t n;
  do n = pwrite(fd, buf, sizeof buf, 0);
  while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(sizeof buf)) return n < 0 ? errno : EIO;
  // The epoch must survive a crash of the back end: a restarted server that
  // forgot it would let the fenced path's late writes in again.
  if (fdatasync(fd) != 0) return errno;
  return 0;
}

}  // namespace

fence_record::pass& fence_record::pass::operator=(pass&& o) noexcept {
  if (this != &o) {
    reset();
    rec_ = o.rec_;
    o.rec_ = nullptr;
  }
  return *this;
}

void fence_record::pass::reset() {
  if (rec_) rec_->leave();
  rec_ = nullptr;
}

int fence_record::lock(short type, off_t byte, bool wait) const {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_pid = 0;  // OFD locks require 0
  while (fcntl(fd_, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) != 0) {
    if (errno != EINTR) return errno == EACCES ? EAGAIN : errno;  // busy, without wait
  }
  return 0;
}

core::result<uint32_t> fence_record::read_epoch() const {
  unsigned char buf[record_size];
  ssize_t n;
  do n = pread(fd_, buf, sizeof buf, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0) return core::fail(errno, "read fence record " + path_);
  if (n != static_cast<ssize_t>(sizeof buf) || std::memcmp(buf, record_magic, sizeof record_magic) != 0)
    return core::fail(EUCLEAN, path_ + " is not a fence record");
  uint32_t e = get_le32(buf + 8);
  if (get_le32(buf + 12) != ~e) return core::fail(EUCLEAN, "fence record " + path_ + " is corrupt");
  return e;
}

core::result<std::unique_ptr<fence_record>> fence_record::open(const std::string& path) {
  std::unique_ptr<fence_record> r(new fence_record());
  r->path_ = path;
  r->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (r->fd_ < 0) return core::fail(errno, "open fence record " + path);
  // Initialise an empty record once, under the exclusive lock, so two back
  // ends starting together do not both write it.
  if (int e = r->lock(F_WRLCK, epoch_byte); e != 0) return core::fail(e, "lock fence record " + path);
  struct stat st {};
  int err = 0;
  if (fstat(r->fd_, &st) != 0) err = errno;
  else if (st.st_size == 0) err = write_record(r->fd_, 0);
  core::result<uint32_t> e = err ? core::fail(err, "initialise fence record " + path) : r->read_epoch();
  r->lock(F_UNLCK, epoch_byte);
  if (!e) return core::fail(std::move(e).err());
  return r;
}

fence_record::~fence_record() {
  if (fd_ >= 0) ::close(fd_);
}

// Takes one share of the pass (mu_ held by lk): 0, -ESTALE (nothing held),
// -EAGAIN when !wait and it would block, or -errno from the record.
int fence_record::admit_locked(std::unique_lock<std::mutex>& lk, uint32_t epoch, bool wait) {
  for (;;) {
    if (writer_active_ || writers_waiting_ || acquiring_) {
      if (!wait) return -EAGAIN;
      cv_.wait(lk);
      continue;
    }
    if (readers_ > 0) {
      if (std::chrono::steady_clock::now() - held_since_ >= lease) {
        if (!wait) return -EAGAIN;
        cv_.wait(lk);  // let the holders finish, so the lock is taken afresh
        continue;
      }
      break;
    }
    // The first pass in this process takes the file lock (behind the gate)
    // and reads the epoch; it cannot change while the lock is held.
    acquiring_ = true;
    lk.unlock();
    int err = lock(F_RDLCK, gate_byte, wait);
    if (err == 0) {
      err = lock(F_RDLCK, epoch_byte, wait);
      lock(F_UNLCK, gate_byte);
    }
    core::result<uint32_t> e = err ? core::fail(err, "lock fence record " + path_) : read_epoch();
    if (!e && err == 0) lock(F_UNLCK, epoch_byte);
    lk.lock();
    acquiring_ = false;
    cv_.notify_all();
    if (!e) {
      last_error_ = e.err().what();
      return -e.err().errnum();
    }
    held_epoch_ = *e;
    held_since_ = std::chrono::steady_clock::now();
    break;
  }
  ++readers_;
  if (epoch != 0 && epoch < held_epoch_) {
    if (--readers_ == 0) {
      lock(F_UNLCK, epoch_byte);
      cv_.notify_all();
    }
    return -ESTALE;
  }
  return 0;
}

core::result<fence_record::pass> fence_record::enter(uint32_t epoch) {
  std::unique_lock lk(mu_);
  int rc = admit_locked(lk, epoch, true);
  if (rc == -ESTALE)
    return core::fail(ESTALE, "request of epoch " + std::to_string(epoch) + " refused: the export is fenced at epoch " +
                                  std::to_string(held_epoch_));
  if (rc < 0) return core::fail(-rc, last_error_);
  return pass(this);
}

int fence_record::admit(uint32_t epoch) {
  std::unique_lock lk(mu_);
  return admit_locked(lk, epoch, true);
}

int fence_record::try_admit(uint32_t epoch) {
  std::unique_lock lk(mu_);
  return admit_locked(lk, epoch, false);
}

void fence_record::leave() {
  std::lock_guard lk(mu_);
  if (--readers_ == 0) {
    lock(F_UNLCK, epoch_byte);
    cv_.notify_all();
  }
}

core::result<void> fence_record::advance(uint32_t epoch) {
  if (epoch == 0) return core::fail(ESTALE, "epoch 0 means unfenced; fence epochs start at 1");
  {
    std::unique_lock lk(mu_);
    ++writers_waiting_;
    cv_.wait(lk, [&] { return !writer_active_ && readers_ == 0 && !acquiring_; });
    --writers_waiting_;
    writer_active_ = true;
  }
  // Holding the gate keeps new readers of other processes out while this
  // waits for the ones that hold the epoch lock.
  int err = lock(F_WRLCK, gate_byte);
  bool have_epoch_lock = false;
  if (err == 0) {
    err = lock(F_WRLCK, epoch_byte);
    have_epoch_lock = err == 0;
  }
  core::result<void> out = core::ok();
  if (err) {
    out = core::fail(err, "lock fence record " + path_);
  } else if (auto cur = read_epoch(); !cur) {
    out = core::fail(std::move(cur).err());
  } else if (epoch <= *cur) {
    out = core::fail(ESTALE, "cannot fence " + path_ + " to epoch " + std::to_string(epoch) + ": it is at epoch " +
                                 std::to_string(*cur));
  } else if (int e = write_record(fd_, epoch); e != 0) {
    out = core::fail(e, "write fence record " + path_);
  }
  if (have_epoch_lock) lock(F_UNLCK, epoch_byte);
  lock(F_UNLCK, gate_byte);
  std::lock_guard lk(mu_);
  writer_active_ = false;
  cv_.notify_all();
  return out;
}

core::result<uint32_t> fence_record::current() {
  auto p = enter(0);
  if (!p) return core::fail(std::move(p).err());
  std::lock_guard lk(mu_);
  return held_epoch_;
}

}  // namespace uvd::storage
