// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the Xen back-end fuzzers share: a reader over the fuzz input, a
// host-local hub in a private directory that lives for the whole process, and
// waits with deadlines (a back end that stops answering is a finding, not a
// fuzzer that hangs).
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "transports/xen/hv.hpp"
#include "transports/xen/local/local.hpp"
#include "transports/xen/xenbus.hpp"

namespace uvd::xen::fuzz {

#define XEN_FUZZ_CHECK(c)                                                          \
  do {                                                                             \
    if (!(c)) {                                                                    \
      std::fprintf(stderr, "check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

// Reads the input front to back; past the end every value is zero, so any
// prefix of an input is itself a valid input.
class reader {
 public:
  reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool empty() const { return p_ >= n_; }
  uint8_t u8() { return p_ < n_ ? d_[p_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | u8() << 8); }
  uint32_t u32() { return u16() | static_cast<uint32_t>(u16()) << 16; }
  void bytes(void* out, size_t k) {
    auto* o = static_cast<uint8_t*>(out);
    for (size_t i = 0; i < k; ++i) o[i] = u8();
  }
  // A short string: one length byte (at most 40), then its bytes.
  std::string str() {
    size_t k = u8() % 41;
    std::string s;
    for (size_t i = 0; i < k; ++i) s.push_back(static_cast<char>(u8()));
    return s;
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t p_ = 0;
};

// A hub in a fresh directory (removed at exit).
class fuzz_hub {
 public:
  fuzz_hub() {
    char tmpl[] = "/tmp/uvd-xen-fuzz-XXXXXX";
    XEN_FUZZ_CHECK(::mkdtemp(tmpl) != nullptr);
    dir_ = tmpl;
    auto h = local_hub::start(dir_ + "/hub.sock");
    XEN_FUZZ_CHECK(h);
    hub_ = std::move(*h);
  }
  ~fuzz_hub() {
    hub_.reset();
    ::rmdir(dir_.c_str());
  }
  const std::string& path() const { return hub_->socket_path(); }
  std::unique_ptr<hypervisor> domain(domid_t d) const {
    auto hv = open_local_hypervisor(path(), d);
    XEN_FUZZ_CHECK(hv);
    return std::move(*hv);
  }

 private:
  std::string dir_;
  std::unique_ptr<local_hub> hub_;
};

// Waits until the back end's state satisfies pred (the caller watches dir/state).
inline int wait_backend(store& s, const std::string& bdir, bool (*pred)(int), uint32_t ms) {
  auto r = wait_state(s, bdir, pred, ms, "a settled state");
  return r ? *r : -1;
}

// Polls an event channel until `ready` or the deadline. True if ready.
template <class F>
bool wait_until(event_channel& evt, F ready, uint32_t ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  for (;;) {
    if (ready()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    pollfd p{evt.fd(), POLLIN, 0};
    (void)::poll(&p, 1, 5);
    (void)evt.ack();
  }
}

}  // namespace uvd::xen::fuzz
