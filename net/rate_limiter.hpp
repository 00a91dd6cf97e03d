// SPDX-License-Identifier: Apache-2.0
#pragma once
// Credit-based rate limiter: "x bytes every y microseconds". Credit starts at
// x and refills continuously at x/y, capped at the larger of x and 20 ms
// worth (so a switch that wakes late under load does not lose credit). A
// port may send while its credit is positive; a frame larger than the credit
// left drives it negative, and the port waits until it is positive again, so
// the long-run rate is exact whatever the frame sizes.
#include <chrono>
#include <cstdint>

namespace uvd::net {

class rate_limiter {
 public:
  using clock = std::chrono::steady_clock;
  rate_limiter(uint64_t bytes, std::chrono::microseconds interval, clock::time_point now)
      : bytes_(bytes), interval_ns_(std::chrono::duration_cast<std::chrono::nanoseconds>(interval).count()),
        credit_(static_cast<int64_t>(bytes)), last_(now) {
    __int128 slack = static_cast<__int128>(bytes) * 20'000'000 / interval_ns_;  // 20 ms of traffic
    cap_ = static_cast<int64_t>(slack > static_cast<__int128>(bytes) ? (slack > INT64_MAX / 4 ? INT64_MAX / 4 : slack)
                                                                      : static_cast<__int128>(bytes));
  }

  bool has_credit(clock::time_point now) {
    refill(now);
    return credit_ > 0;
  }
  void charge(uint64_t n) { credit_ -= static_cast<int64_t>(n); }
  // When credit turns positive again (now if it is).
  clock::time_point next_credit(clock::time_point now) {
    refill(now);
    if (credit_ > 0) return now;
    auto ns = (static_cast<__int128>(1 - credit_) * interval_ns_ + bytes_ - 1) / bytes_;
    return now + std::chrono::nanoseconds(static_cast<int64_t>(ns));
  }
  uint64_t bytes() const { return bytes_; }
  int64_t interval_ns() const { return interval_ns_; }

 private:
  void refill(clock::time_point now) {
    auto el = std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    if (el <= 0) return;
    __int128 add = static_cast<__int128>(el) * bytes_ / interval_ns_;
    if (add == 0) return;  // keep last_ so sub-byte time is not lost
    int64_t c = credit_ + static_cast<int64_t>(add > static_cast<__int128>(INT64_MAX / 2) ? INT64_MAX / 2 : add);
    credit_ = c > cap_ ? cap_ : c;
    last_ += std::chrono::nanoseconds(static_cast<int64_t>(add * interval_ns_ / bytes_));
    if (credit_ == cap_) last_ = now;
  }

  uint64_t bytes_;
  int64_t interval_ns_;
  int64_t credit_;
  int64_t cap_;
  clock::time_point last_;
};

}  // namespace uvd::net
