// SPDX-License-Identifier: Apache-2.0
#pragma once
// uvd::xen hypervisor interface: THE CONTRACT FOR BOTH IMPLEMENTATIONS.
//
//   * real Xen   (transports/xen/real/): libxengntshr/libxengnttab (gntalloc,
//                gntdev), libxenevtchn, libxenstore.
//   * host-local (transports/xen/local/): memfd pages as granted frames with a
//                grant table that enforces domid and read-only, eventfds as
//                event channels, a small store; runs on any Linux.
//
// The blkif/netif front and back halves are written once against this header
// and never know which implementation runs. Change it only when necessary and
// list every change here:
//
//   v1  initial version.
//
// Build hook for the real implementation: transports/xen/real/CMakeLists.txt
// defines a STATIC library target `uvd_xen_real` that defines
// open_real_hypervisor() below, and defines it only when the Xen libraries are
// found. transports/xen/ links it when the target exists, otherwise a fallback
// returns ENOSYS naming the missing libraries. (Debian's xengnttab.h,
// xenevtchn.h and xenstore.h carry no extern "C" guards: include them inside
// extern "C" { } from C++, or the link fails with mangled names.)
//
// Conventions: every call returns core::result; errors carry an errno (EINVAL,
// ENOENT, EACCES/EPERM, EAGAIN, EBUSY, ENOMEM...) and a message naming what
// failed. Nothing throws. Objects are RAII: destroying one releases what it
// holds (ends access, unmaps, closes the port, closes the connection).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.hpp"

namespace uvd::xen {

using domid_t = uint16_t;
using grant_ref_t = uint32_t;
using evtchn_port_t = uint32_t;
using txn_t = uint32_t;  // store transaction id; 0 = none (XBT_NULL)

inline constexpr txn_t no_txn = 0;
inline constexpr size_t page_size = 4096;  // XEN_PAGE_SIZE; grants are always 4 KiB frames

// Pages of this domain's memory granted to one peer domain (the front end's
// side: rings, data buffers). Contiguous in this process at addr().
// Destruction ends foreign access to every page. As on Xen, ending access does
// not pull a page from under a peer that already mapped it: no NEW mapping
// succeeds afterwards, and the page stays valid for the mapper until it unmaps.
class granted_pages {
 public:
  virtual ~granted_pages() = default;
  virtual void* addr() const = 0;
  virtual size_t count() const = 0;                 // pages
  virtual grant_ref_t ref(size_t page) const = 0;   // the reference for page i (0..count-1)
  virtual domid_t peer() const = 0;
  virtual bool writable() const = 0;                // false: the peer may map read-only only
};

// Foreign pages mapped into this process (the back end's side), contiguous at
// addr() in the order of the refs given. Destruction unmaps.
class foreign_mapping {
 public:
  virtual ~foreign_mapping() = default;
  virtual void* addr() const = 0;
  virtual size_t count() const = 0;  // pages
  virtual bool writable() const = 0;
};

// One end of an interdomain event channel. notify() is thread-safe and may run
// concurrently with fd()/ack() on another thread (a submit thread notifies,
// a completion thread waits). Notifications are edge-like and coalesce: many
// notify() before the peer's ack() may be seen as one.
class event_channel {
 public:
  virtual ~event_channel() = default;
  virtual evtchn_port_t local_port() const = 0;  // write this into the store for the peer
  virtual domid_t peer() const = 0;
  virtual core::result<void> notify() = 0;
  // Becomes readable (poll POLLIN) when a notification is pending. Owned by
  // the channel; do not close or read it directly.
  virtual int fd() const = 0;
  // Never blocks. Consumes pending notifications and re-enables delivery
  // (reads the eventfd / xenevtchn_pending + xenevtchn_unmask). Returns true if
  // a notification was pending. After ack(), re-check the ring before sleeping.
  virtual core::result<bool> ack() = 0;
};

struct store_watch_event {
  std::string path;   // the node that changed (at or below the watched path)
  std::string token;  // as given to watch()
};

struct store_perm {
  domid_t domid;
  bool read;
  bool write;
};

// A connection to the store (xenstore). Not thread-safe: use one per thread.
// Paths are absolute ("/local/domain/1/device/vbd/51712/state"). A missing
// node is ENOENT; a transaction that conflicts fails with EAGAIN at
// transaction_end (see with_transaction()).
class store {
 public:
  virtual ~store() = default;
  virtual core::result<std::string> read(txn_t t, std::string_view path) = 0;
  // Creates missing parents, like xs_write.
  virtual core::result<void> write(txn_t t, std::string_view path, std::string_view value) = 0;
  virtual core::result<void> mkdir(txn_t t, std::string_view path) = 0;
  // Removes the node and everything below it. Removing a missing node is ENOENT.
  virtual core::result<void> rm(txn_t t, std::string_view path) = 0;
  // Names of the children (not full paths).
  virtual core::result<std::vector<std::string>> directory(txn_t t, std::string_view path) = 0;
  // xs_set_permissions: perms[0] is the owner and the default for every other
  // domain; the rest are per-domain grants. Domain 0 always has full access.
  virtual core::result<void> set_perms(txn_t t, std::string_view path, std::span<const store_perm> perms) = 0;

  virtual core::result<txn_t> transaction_start() = 0;
  // commit=false aborts. EAGAIN: the transaction conflicted and did nothing; retry.
  virtual core::result<void> transaction_end(txn_t t, bool commit) = 0;

  // As on Xen, a new watch fires once at once for its path.
  virtual core::result<void> watch(std::string_view path, std::string_view token) = 0;
  virtual core::result<void> unwatch(std::string_view path, std::string_view token) = 0;
  // Readable when a watch event may be waiting. When it is, call read_watch()
  // until it returns nullopt before polling again.
  virtual int watch_fd() const = 0;
  // Never blocks. The next queued watch event, or nullopt.
  virtual core::result<std::optional<store_watch_event>> read_watch() = 0;
};

// One domain's view of the hypervisor. The calls that create objects are
// thread-safe; the objects follow their own rules above.
class hypervisor {
 public:
  virtual ~hypervisor() = default;
  virtual std::string_view kind() const = 0;  // "local" or "xen", for messages
  virtual domid_t self_domid() const = 0;

  // Grant access to `count` fresh zero-filled pages to peer (xengntshr_share_pages).
  virtual core::result<std::unique_ptr<granted_pages>> grant_pages(domid_t peer, size_t count, bool writable) = 0;

  // Map peer's grant refs, all at once, contiguously (xengnttab_map_domain_grant_refs).
  // Any ref that is not a live grant from `granter` to this domain, or that is
  // read-only when writable is asked, fails the whole call (EINVAL/EACCES):
  // never a partial or wrong mapping.
  virtual core::result<std::unique_ptr<foreign_mapping>> map_grants(domid_t granter, std::span<const grant_ref_t> refs,
                                                                    bool writable) = 0;

  // A new port that `peer` may bind to (xenevtchn_bind_unbound_port).
  virtual core::result<std::unique_ptr<event_channel>> alloc_unbound(domid_t peer) = 0;
  // Bind to peer's unbound port (xenevtchn_bind_interdomain).
  virtual core::result<std::unique_ptr<event_channel>> bind_interdomain(domid_t peer, evtchn_port_t remote_port) = 0;

  // A new store connection for this domain.
  virtual core::result<std::unique_ptr<store>> open_store() = 0;
};

// Real Xen, from inside a domain (needs /dev/xen/{gntdev,gntalloc,evtchn} and
// xenstore). ENOSYS when built without the Xen libraries, ENOENT/EACCES when
// the devices are missing; the message says which.
core::result<std::unique_ptr<hypervisor>> open_real_hypervisor();

// ---- helpers built on the interface (hv_util.cpp), shared by every device ----

// Runs fn(t) inside a transaction and commits, retrying the whole thing on
// EAGAIN (up to `attempts` times). fn's own error aborts the transaction.
core::result<void> with_transaction(store& s, const std::function<core::result<void>(txn_t)>& fn, int attempts = 64);

// xenbus states (xen/io/xenbus.h: XenbusStateInitialising ... XenbusStateReconfigured).
core::result<int> read_state(store& s, std::string_view dir);          // reads dir + "/state"
core::result<void> write_state(store& s, std::string_view dir, int st);  // writes dir + "/state"
// Reads an unsigned integer node; ENOENT if missing, EINVAL if not a number.
core::result<uint64_t> read_uint(store& s, txn_t t, std::string_view path);
const char* state_name(int st);

}  // namespace uvd::xen
