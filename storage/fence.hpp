// SPDX-License-Identifier: Apache-2.0
#pragma once
// The back-end side of fencing (vstore_ops::fence, vstore_req::epoch): one
// epoch record per export, shared by every back-end process that serves the
// same image, in the spirit of SCSI persistent reservations.
//
// The record is a small sidecar file beside the image ("<image>.fence"):
//   bytes 0..7   magic "UVDFENC1"
//   bytes 8..11  the current epoch, little endian (0: never fenced)
//   bytes 12..15 the epoch's bitwise complement (a torn or foreign file is refused)
// Two byte-range locks on it, taken with open-file-description locks
// (F_OFD_SETLKW: owned by the open file, not the process, so two back ends in
// one process exclude each other too, and closing an unrelated descriptor
// does not drop them):
//   byte 16 "gate":  a writer holds it while it waits for byte 17, so new
//                    readers queue behind the writer instead of starving it
//   byte 17 "epoch": shared by every request executing, exclusive while the
//                    epoch changes
//
// A request runs inside a pass (enter): the shared lock is held, and the
// epoch it carries was checked against the current one under that lock. An
// advance(e) takes the exclusive lock, so it waits until every request that
// was admitted (under any older epoch) has finished, writes e durably, and
// from then on a request carrying a nonzero epoch older than e is refused
// with ESTALE. Epoch 0 means "unfenced": such requests are always admitted
// (clients that never fence, e.g. a plain single-path front end).
//
// Within one process the shared lock is counted: the first pass takes the
// file lock and reads the epoch, later passes share both while the lock is
// held, for at most `lease` (10 ms) after it was taken, then new passes wait
// for the holders to finish so a writer in another process gets its turn.
// Locks and the record live on one host's file system (or a cluster file
// system with coherent POSIX locks).
//
// Safety never depends on timing; liveness does: advance() waits for every
// pass, so a back end that is frozen (SIGSTOP, a paused VM) while it holds
// one delays the advance until it runs again, because a request it admitted
// may still be about to write. A frozen back end that holds no pass delays
// nothing, and its queued requests are refused when it wakes. Hold passes
// only around the disk I/O itself (not while data crosses the network), so
// the window is as small as it can be.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "core/result.hpp"

namespace uvd::storage {

class fence_record {
 public:
  // Opens (creating, with epoch 0, when absent) the record at path.
  static core::result<std::unique_ptr<fence_record>> open(const std::string& path);
  // The record that belongs to an image file: image + ".fence".
  static std::string path_for(std::string_view image) { return std::string(image) + ".fence"; }

  ~fence_record();
  fence_record(const fence_record&) = delete;
  fence_record& operator=(const fence_record&) = delete;

  // A shared hold on the record: while it lives, the epoch cannot advance.
  class pass {
   public:
    pass() = default;
    pass(pass&& o) noexcept : rec_(o.rec_) { o.rec_ = nullptr; }
    pass& operator=(pass&& o) noexcept;
    ~pass() { reset(); }
    void reset();
    explicit operator bool() const { return rec_ != nullptr; }

   private:
    friend class fence_record;
    explicit pass(fence_record* r) : rec_(r) {}
    fence_record* rec_ = nullptr;
  };

  // Admits a request carrying `epoch`: a pass, or ESTALE when the epoch is
  // nonzero and older than the current one (nothing is held then). Other
  // errors are I/O errors on the record.
  core::result<pass> enter(uint32_t epoch);

  // check-and-run: fn() runs under a pass; returns its result, or -ESTALE /
  // -errno when the request was not admitted.
  template <class F>
  int run(uint32_t epoch, F&& fn) {
    auto p = enter(epoch);
    if (!p) return -p.err().errnum();
    return fn();
  }

  // The same pass without an object, for a data path that keeps it in a
  // preallocated per-request context (one flag) instead: admit() is enter()
  // (0, -ESTALE, or -errno), and every 0 it returns is ended by one leave().
  // try_admit() never blocks: -EAGAIN when taking the pass would wait (an
  // advance is under way here or in another process, or the in-process
  // share of the lock is past its lease), so a completion thread that must
  // not sleep can hand the request to one that may.
  int admit(uint32_t epoch);
  int try_admit(uint32_t epoch);
  void leave();

  // Makes epoch the current one: waits for every pass to end (here and in
  // other processes), then writes it durably. ESTALE (nothing changed) when
  // epoch is 0 or not newer than the current epoch.
  core::result<void> advance(uint32_t epoch);

  // The current epoch, read under the shared lock.
  core::result<uint32_t> current();

  const std::string& path() const { return path_; }

 private:
  fence_record() = default;
  int admit_locked(std::unique_lock<std::mutex>& lk, uint32_t epoch, bool wait);
  core::result<uint32_t> read_epoch() const;
  int lock(short type, off_t byte, bool wait = true) const;

  static constexpr std::chrono::milliseconds lease{10};

  std::string path_;
  int fd_ = -1;

  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t readers_ = 0;          // passes alive in this process (they share the file lock)
  uint32_t writers_waiting_ = 0;  // local advance() calls queued
  bool writer_active_ = false;
  bool acquiring_ = false;        // a thread is taking the shared file lock
  uint32_t held_epoch_ = 0;       // the epoch read when the shared file lock was taken
  std::string last_error_;        // why the record could not be locked or read, last time
  std::chrono::steady_clock::time_point held_since_{};
};

}  // namespace uvd::storage
