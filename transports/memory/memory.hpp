// SPDX-License-Identifier: Apache-2.0
#pragma once
// The in-memory reference transport: a RAM disk, and the test double of every
// storage test. "memory:64M" or "memory:1G?block_size=4096".
// Options, for exercising the front half:
//   block_size=N     logical block size (default 512)
//   max_transfer=N   largest request it takes, so the front half must split
//   max_segments=N   most iovecs per request
//   async=1          complete from a worker thread instead of inside submit
//   depth=N          with async: requests it holds at once; more are refused
//                    (submit accepts fewer), so the front half must requeue
//   fail_offset=N    any request touching byte N fails with EIO (media error)
#include "core/vstore_ops.hpp"

namespace uvd::memory {

extern const core::vstore_ops memory_vstore_ops;

}  // namespace uvd::memory
