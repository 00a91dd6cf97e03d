// SPDX-License-Identifier: Apache-2.0
#pragma once
// vstore_ops: the one ops table between the generic virtual disk (storage::Vstore)
// and a storage transport. Plain C-compatible types so that a transport can live
// in a shared-object plugin. Errors cross as 0 / negative errno; no exception
// crosses this boundary. Only append fields; the loader copies what it knows.
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

namespace uvd::core {

inline constexpr uint32_t VSTORE_ABI_VERSION = 1;

enum vstore_opcode : uint16_t {
  VSTORE_OP_READ = 0,
  VSTORE_OP_WRITE = 1,
  VSTORE_OP_FLUSH = 2,
  VSTORE_OP_DISCARD = 3,
  VSTORE_OP_WRITE_ZEROES = 4,
};

// Per-request flags.
enum : uint16_t {
  VSTORE_REQ_FUA = 1u << 0,       // write, write-zeroes or discard is durable before completion
  VSTORE_REQ_NO_UNMAP = 1u << 1,  // write-zeroes must keep the range allocated
};

// Feature bits in vstore_info::features. An op whose feature is absent is
// emulated by the front half (write-zeroes as writes of zeros, FUA as write +
// flush), so every transport gets the same semantics.
enum : uint64_t {
  VSTORE_F_FLUSH = 1u << 0,           // has a volatile cache; FLUSH reaches the transport
  VSTORE_F_FUA = 1u << 1,             // honours VSTORE_REQ_FUA natively
  VSTORE_F_DISCARD = 1u << 2,         // DISCARD reaches the transport
  VSTORE_F_DISCARD_ZEROES = 1u << 3,  // a discarded range reads back as zeros
  VSTORE_F_WRITE_ZEROES = 1u << 4,    // WRITE_ZEROES reaches the transport
  VSTORE_F_ROTATIONAL = 1u << 5,
};

// Flags for vstore_open_params::flags.
enum : uint32_t {
  VSTORE_OPEN_READ_ONLY = 1u << 0,
  VSTORE_OPEN_DIRECT = 1u << 1,  // bypass host caches (O_DIRECT) where that means something
};

struct vstore_info {
  uint64_t size;          // bytes
  uint32_t block_size;    // logical block; offsets and lengths are multiples of it
  uint32_t max_transfer;  // largest request the transport takes, bytes (0: no limit)
  uint32_t max_segments;  // most iovecs in one request (0: no limit)
  uint32_t opt_io_size;   // preferred request size, bytes (0: unknown)
  uint64_t features;      // VSTORE_F_*
  uint32_t read_only;     // nonzero: writes, discards and write-zeroes fail with EROFS
  uint32_t mem_align;     // alignment data buffers need (O_DIRECT), bytes; 0 or 1: any
  char id[128];           // stable identity of the medium (NUL-terminated), e.g. "file:dev=...:ino=..."
};

// One request as the transport sees it. Owned by the front half: it stays valid
// and unchanged from submit until the transport completes it, exactly once.
struct vstore_req {
  uint64_t offset;  // bytes
  uint64_t length;  // bytes (0 for FLUSH)
  const struct iovec* iov;  // READ/WRITE data; caller-owned buffers until completion
  uint32_t iovcnt;
  uint16_t opcode;  // vstore_opcode
  uint16_t flags;   // VSTORE_REQ_*
  uint32_t tag;     // front-half slot, unique among in-flight requests (a ring id can be this)
  // Fencing epoch (0: unfenced). A transport that has `fence` carries it to
  // its back end, which refuses the request (-ESTALE) when the export's
  // epoch is newer, so a late request of a fenced-off path never executes.
  uint32_t epoch;
  void* ctx;        // the transport's per-request context: ctx_size bytes, preallocated, aligned 16
};

// The completion path, handed to the transport at open. complete() may be
// called from any thread, including inside submit(); it is thread-safe.
// status: 0 or a negative errno.
struct vstore_host {
  void* owner;
  void (*complete)(void* owner, struct vstore_req* req, int status);
};

struct vstore_open_params {
  const char* target;   // transport address: a path, "host:port/export", ... (never NULL)
  const char* options;  // "key=value&key=value" transport options (never NULL, may be "")
  uint32_t flags;       // VSTORE_OPEN_*
  uint32_t reserved;
  const struct vstore_host* host;
  // In-tree stacking layers (cow, multipath) open their `next` devices through
  // this; it is a uvd::core::registry*. Opaque to plugins.
  const void* registry;
  // An in-process argument from code that opens this table directly
  // (storage::Vstore::open(ops, target, opts, reg, context)): a stacking layer
  // hands over its already-open next devices this way. nullptr for URIs.
  void* context;
  char* errbuf;  // human detail for a failure, NUL-terminated, may be left empty
  size_t errbuf_len;
};

struct vstore_probe_entry {
  char uri[256];          // what to pass to open, e.g. "file:///dev/sdb"
  char description[128];  // for a person
  uint64_t size;          // bytes, 0 if unknown
};

struct vstore_ops {
  uint32_t abi_version;  // VSTORE_ABI_VERSION the table was built against
  uint32_t struct_size;  // sizeof(vstore_ops) the table was built with
  const char* name;      // transport name, also its URI scheme ("file")
  const char* description;

  // Required. Synchronous. Create the device's transport resources; on success
  // *handle is passed to every other op. Errors: -ENOENT, -EACCES, -EINVAL...
  int (*open)(const vstore_open_params* params, void** handle);

  // Required. Synchronous. Called once, after every submitted request completed.
  void (*release)(void* handle);

  // Required. Synchronous, thread-safe. Geometry and features; may change only
  // across a resize event (not in ABI 1).
  int (*info)(void* handle, vstore_info* out);

  // Optional (nullptr: 0). Bytes of private context the transport wants in
  // every vstore_req::ctx, preallocated by the front half per queue slot.
  size_t (*ctx_size)(void* handle);

  // Required. Asynchronous. Queue n requests and notify the other side once.
  // Returns how many it accepted, from the front (0..n), or a negative errno
  // if the device is unusable. Accepted requests complete through
  // vstore_host::complete; the rest are resubmitted by the front half after a
  // completion (the transport was full). Requests arrive validated: in range,
  // aligned, within max_transfer/max_segments, no write on a read-only device.
  // The front half serialises calls to submit.
  int (*submit)(void* handle, vstore_req* const* reqs, uint32_t n);

  // Optional. Synchronous. List devices this transport can reach under `scope`
  // (a folder, a server address; "" for the default). Returns the number of
  // entries that exist (may exceed max; only max are written), or -errno.
  int (*probe)(const char* scope, vstore_probe_entry* out, uint32_t max);

  // Optional. For transports that busy-poll (no interrupt-driven completion
  // thread): reap up to budget completions, calling complete() for each.
  // Returns the number reaped. Called by the front half while it waits.
  int (*poll)(void* handle, uint32_t budget);

  // Optional (nullptr: the transport cannot fence). Synchronous, thread-safe,
  // may block for a round trip but must return within the transport's own
  // timeout (-ETIMEDOUT), never hang. Fencing is per export, shared by every
  // path and back end that reaches it (storage/fence.hpp is the back-end side).
  //   epoch > 0: make `epoch` the export's current epoch. From the return of
  //     0 on, every request carrying a nonzero epoch older than it is refused
  //     with -ESTALE and none is still executing. Epochs only grow: an epoch
  //     not newer than the current one is refused with -ESTALE (someone else
  //     fenced past it), nothing changed.
  //   epoch == 0: a query; returns the export's current epoch (0..INT32_MAX).
  // Epochs are 1..INT32_MAX. Path errors (classify_error) mean the fence did
  // not reach the back end; the caller tries another path. -ENOTSUP: this
  // device was opened without fencing (file:// without fence=1); callers
  // treat it as a table without the op.
  int (*fence)(void* handle, uint32_t epoch);
};

}  // namespace uvd::core
