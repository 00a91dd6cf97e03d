// SPDX-License-Identifier: Apache-2.0
#pragma once
// The file transport: a virtual disk backed by a host file or block device,
// as UML's ubd driver does with its os_* calls. Requests run asynchronously
// on io_uring, or on a pool of worker threads where io_uring is refused
// (seccomp in containers, old kernels) or asked for with engine=threads.
//
// Address: file:///path/to/image?direct=1&engine=threads
// Options (all optional):
//   ro=1                 open read-only (also VSTORE_OPEN_READ_ONLY)
//   direct=1             O_DIRECT, bypass the host page cache (also VSTORE_OPEN_DIRECT)
//   engine=auto|uring|threads   auto: io_uring, else the thread pool (default auto)
//   entries=N            io_uring queue depth, requests in flight (default 128)
//   threads=N            thread-pool workers (default 4)
//   fence=1              fence requests against the image's shared epoch record
//                        ("<image>.fence", storage/fence.hpp): every request runs
//                        inside a fence pass, one carrying an epoch older than the
//                        record's is refused with ESTALE, and vstore_ops::fence
//                        advances the record (waiting for older requests in every
//                        process serving the image). Without it fence is ENOTSUP.
#include <cstdint>
#include <string_view>

#include "core/result.hpp"
#include "core/vstore_ops.hpp"

namespace uvd::file {

// The ops table, registered by name "file" (transports/builtin.cpp) and
// exported by the uvd-transport-file plugin.
extern const core::vstore_ops file_vstore_ops;

enum class file_engine_kind : uint8_t { automatic, uring, threads };

struct file_options {
  file_engine_kind engine = file_engine_kind::automatic;
  bool read_only = false;
  bool direct = false;
  uint32_t entries = 128;  // 1..4096
  uint32_t threads = 4;    // 1..256
  bool fence = false;
};

// Parses the "key=value&key=value" option string of a file:// address.
// Unknown keys and bad values are errors naming the offending text, so a
// typo never silently opens a disk with the wrong caching or engine.
core::result<file_options> parse_file_options(std::string_view options);

const char* to_string(file_engine_kind kind) noexcept;

}  // namespace uvd::file
