// SPDX-License-Identifier: Apache-2.0
#pragma once
// storage::Multipath: one virtual disk over N paths to the same medium, each
// path any Vstore (two backend servers exporting one image, two file engines
// on one file...). A stacking layer like cow: it opens its paths as `next`
// vstores, so it stacks (cow over multipath over rdma) and runs under the
// storage conformance suite.
//
// As a transport (registered as "multipath" in transports/builtin.cpp):
//
//   multipath:[LABEL]?path=URI&path=URI[&key=value...]
//
// Each path URI is percent-encoded where it holds '%', '&' or '?' (for
// example path=file%3A%2F%2F%2Fimg%3Fengine%3During); multipath_uri() builds
// one. Options:
//   path=URI               a path, in priority order (at least one, at most 16)
//   policy=failover|round-robin
//                          failover (default): all I/O on the first healthy
//                          path, the others standby; round-robin: requests
//                          spread over every healthy path in turn
//   failback=immediate|manual
//                          immediate (default): a returning path of higher
//                          priority takes the I/O back at once (failover policy)
//   queue_if_no_path=DUR   with no healthy path, requests wait this long for
//                          one to return, then every queued and new request
//                          fails with ENOLINK until a path returns (default 30s;
//                          0: fail at once). DUR: 500ms, 30s, 2m; a bare number is seconds
//   check_interval=DUR     health check period: a one-block read on every path (default 1s)
//   io_timeout=DUR         a path with a request (or check) outstanding longer
//                          than this has gone silent: it is failed, fenced and
//                          its requests are reissued elsewhere (default 5s)
//   fence=auto|required|off
//                          auto (default): fence when every path can
//                          (vstore_ops::fence); required: refuse to open
//                          otherwise; off: never fence
//   check_id=1|0           refuse paths whose vstore_info::id differ (default 1)
//   path_qd=N              queue depth of each path's front half (default 64)
//   reopen_max=DUR         longest wait between attempts to reopen a dead path
//                          (default 4 x check_interval; the first is at once,
//                          then check_interval, doubling up to this)
//   ro=1, direct=1         as for any device; passed to every path
//
// Path states: active (carries I/O), standby (healthy, held in reserve),
// failed (a path error or silence; checked every interval, returns when a
// check succeeds). A failed path whose check fails with a path error while
// nothing of this device is in it (its connection is gone for good: an rdma
// client does not reconnect) is closed and opened again from its URI, with
// backoff, as multipath-tools reinstates paths; it returns, and fails back,
// when the reopened device passes a check. Paths are reopened when the device
// knows their URIs (a multipath: URI, or open_multipath with a path_reopen).
//
// Errors: a path error (core::classify_error: connection lost, timeout,
// device gone) fails the path over; a request/media error (EIO, ENOSPC...) is
// the medium's answer and goes back to the caller, because every path would
// give it.
//
// Fencing. Every request carries the device's epoch (vstore_req::epoch). At
// open the device takes the export with epoch = current + 1. Before any
// request of a failed path is reissued, the device raises the epoch through a
// surviving path (vstore_ops::fence), which returns only when the back ends
// refuse the old epoch and run none of its requests any more; so a late write
// through the old path can never overwrite a newer one. A failback raises it
// too, through the returning path: a back end that caches state of the export
// (a COW device's bitmap) reloads it under the fence. One device owns an
// export at a time: opening a second one fences the first out (its requests
// then fail, like a preempted SCSI reservation). Without fencing (fence=off,
// or a path that cannot fence): requests that failed with an error are
// reissued (the transport said they did not run), but the requests of a
// silent path are never reissued: they wait for the path to answer or close.
//
// No acknowledged write is lost, no read returns stale data: a request is
// completed to the caller only from a path that executed it under the current
// epoch. Data moves through the device's own buffers, so a request abandoned on
// a silent path never touches the caller's memory after its completion.
// FLUSH goes to every healthy path that took writes since its last flush.
// Closing waits for what a silent path still holds: a path's transport must
// answer or time out its requests eventually (RDMA's own retry timeout does).
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.hpp"
#include "core/vstore_ops.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage {

extern const core::vstore_ops multipath_vstore_ops;

enum class mp_policy : uint8_t { failover, round_robin };
enum class mp_fence : uint8_t { automatic, required, off };
enum class path_state : uint8_t { active, standby, failed };
const char* to_string(path_state s);
const char* to_string(mp_policy p);

struct multipath_options {
  mp_policy policy = mp_policy::failover;
  bool failback = true;
  std::chrono::milliseconds queue_if_no_path{30000};
  std::chrono::milliseconds check_interval{1000};
  std::chrono::milliseconds io_timeout{5000};
  mp_fence fence = mp_fence::automatic;
  bool check_id = true;
  uint32_t path_queue_depth = 64;
  std::chrono::milliseconds reopen_max{0};  // 0: 4 x check_interval
  std::string label;  // shown in logs and status
};

// Parses the option string of a multipath: URI; path URIs (decoded) go to *paths.
core::result<multipath_options> parse_multipath_options(std::string_view options, std::vector<std::string>* paths);
// "multipath:?path=...&path=...&extra" with the path URIs percent-encoded.
std::string multipath_uri(const std::vector<std::string>& paths, std::string_view extra_options = {});

struct path_status {
  std::string name;           // transport:target
  path_state state = path_state::failed;
  bool can_fence = false;
  uint64_t requests = 0;      // requests sent down this path
  uint64_t errors = 0;        // path errors seen
  uint64_t failures = 0;      // times it went to failed
  uint64_t in_flight = 0;
  uint64_t abandoned = 0;     // requests given up on a silent path, not returned yet
  uint64_t reopens = 0;       // attempts to open it again after its device died
  uint64_t late_ok = 0;       // abandoned requests the path ran after all (before the fence took)
  uint64_t late_refused = 0;  // abandoned requests it answered with an error (refused by the fence)
  std::string last_error;
};

struct multipath_status {
  std::string label;
  mp_policy policy = mp_policy::failover;
  bool fencing = false;
  bool open = false;
  uint32_t epoch = 0;
  uint64_t failovers = 0;     // path failures handled
  uint64_t reissued = 0;      // requests sent again on another path
  uint64_t fences = 0;        // epochs raised
  uint64_t queued = 0;        // requests waiting now (no path, or a fence in progress)
  uint64_t no_path_failed = 0;  // requests failed with ENOLINK after queue_if_no_path
  std::vector<path_status> paths;
  std::string to_string() const;
};

class mp_device;

// A view of a multipath device that outlives it (status then says open=false).
class multipath_monitor {
 public:
  explicit multipath_monitor(std::shared_ptr<mp_device> d) : dev_(std::move(d)) {}
  multipath_status status() const;
  // Runs the health check now instead of at the next interval (tools, tests).
  void check_now() const;

 private:
  std::shared_ptr<mp_device> dev_;
};

// Where dead paths are opened again: uris[i] through registry (which must
// outlive the device), with options for each path's own front half.
struct path_reopen {
  core::registry* registry = nullptr;
  std::vector<std::string> uris;  // one per path, in the same order; empty: never reopen
  open_options options;
};

// Stacks a multipath device on paths already open (in priority order).
// opts applies to the multipath device's own front half. With reopen, a
// path whose device died is opened again from its URI.
core::result<std::unique_ptr<Vstore>> open_multipath(std::vector<std::unique_ptr<Vstore>> paths,
                                                     const multipath_options& mo, const open_options& opts = {},
                                                     std::shared_ptr<multipath_monitor>* monitor = nullptr,
                                                     path_reopen reopen = {});

}  // namespace uvd::storage
