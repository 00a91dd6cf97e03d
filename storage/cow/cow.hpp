// SPDX-License-Identifier: Apache-2.0
#pragma once
// storage::Cow: a read-only base shared by any number of guests plus one
// persistent writable overlay per guest (format: storage/cow/cow_format.hpp).
//
// Reads come from the overlay where its bitmap says so, else from the base.
// Writes go to the overlay; the base is never written. The first write to a
// block copies the rest of the block up from the base. Order on media for a
// write that allocates: data (block with copied-up remainder) -> sync ->
// bitmap bits (batched) -> sync -> acknowledge. A write to an allocated block
// is written in place and synced before it is acknowledged. Syncs are shared
// by every request waiting for one (group commit), so a busy disk pays one
// fdatasync for many writes. FLUSH and FUA therefore cost nothing extra.
//
// As a transport: "cow:///path/overlay.cow" (the overlay through the file
// transport), or "cow:STORE-URI" naming the overlay's store by URI
// ("cow:file:///path/overlay.cow").
// Options:
//   base=URI   open this base instead of the one recorded in the header
//              (it must still match the recorded size and fingerprint;
//              the URI cannot carry options of its own, as '&' splits)
//   ro=1, direct=1   as for any device; passed down to base and overlay
//   fence=1    open the overlay store with its transport's fence=1 (the file
//              transport: requests under passes of "<overlay>.fence") and
//              offer vstore_ops::fence; the open fails if the store cannot
//              fence. "cow:///dir/c.cow?fence=1" and
//              "cow:file:///dir/c.cow?fence=1" are the same device (the '?'
//              ends the store URI, so the option is the cow layer's).
// The open needs the registry (vstore_open_params::registry) to open the base
// (read-only) and the overlay store.
//
// Fencing (storage/cow/README.md). A COW device caches the overlay's header
// and bitmap, so two processes exporting one overlay (two `uvd serve` behind
// a client's multipath) must hand it over: the device's fence(e) advances the
// overlay store's epoch, lets its own requests end, re-reads and validates the
// header and bitmap, and only then serves requests again (it queues them in
// the meantime; submit never blocks). Requests carry their epoch to every
// overlay step (data, flush, bitmap), so once fence(e) returned no write of
// an older epoch, a late bitmap update included, changes the overlay, and
// the device sees every block the other one allocated. Only one device may
// write an overlay at a time: over multipath use policy=failover with
// fence=required (multipath fences on every change of the active path,
// failback included; round-robin would have two devices rewrite the same
// bitmap pages). Without fence=1, fence is ENOTSUP.
// open_cow() over an overlay store that fences (opened with the file
// transport's fence=1) gives a device that fences the same way.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "core/vstore_ops.hpp"
#include "storage/cow/cow_format.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage {

// The ops table, registered as "cow" in transports/builtin.cpp.
extern const core::vstore_ops cow_vstore_ops;

// Stacks a COW device on stores already open (any transports): the overlay
// must hold a formatted overlay (format_cow) made for this base. The base is
// shared: any number of COW devices may use one base Vstore at once, and
// none writes to it. opts applies to the COW device's own front half.
// A wrong base fails with EMEDIUMTYPE, a corrupt overlay with EUCLEAN.
core::result<std::unique_ptr<Vstore>> open_cow(std::shared_ptr<Vstore> base, std::unique_ptr<Vstore> overlay,
                                               const open_options& opts = {});

// The store address that "cow:TARGET" opens as its overlay: a plain path
// goes through the file transport, anything else is taken as a URI.
std::string cow_overlay_store_uri(std::string_view target);

// A plain path becomes file:///absolute/path; URIs are left alone.
std::string cow_normalize_uri(std::string_view path_or_uri);

struct cow_create_options {
  uint32_t block_size = cow_default_block_size;
};

// Bytes an overlay store needs for a base of base_size bytes.
core::result<uint64_t> cow_overlay_size(uint64_t base_size, uint32_t block_size = cow_default_block_size);

// Writes a fresh header and an empty bitmap into overlay (at least
// cow_overlay_size() bytes), recording base's size, fingerprint and base_uri.
core::result<cow_header> format_cow(Vstore& overlay, Vstore& base, std::string base_uri,
                                    const cow_create_options& opts = {});

// Creates the overlay file overlay_path (refusing to replace one) for the base
// at base_uri (a URI, or a plain path for the file transport), sparse, durable.
core::result<cow_header> create_cow_file(core::registry& reg, const std::string& overlay_path,
                                         std::string_view base_uri, const cow_create_options& opts = {});

// What `uvd cow info` shows.
struct cow_report {
  cow_header header;
  uint64_t store_size = 0;
  uint64_t allocated = 0;       // blocks
  bool base_checked = false;
  bool base_ok = false;
  std::string base_message;     // why the base does not match, or could not be opened
};
// Reads and validates an overlay (a path or a store URI); with check_base
// also opens the recorded base (or base_override) and compares it.
core::result<cow_report> inspect_cow(core::registry& reg, std::string_view overlay, bool check_base,
                                     std::string_view base_override = {});

struct cow_commit_options {
  uint32_t chunk = 4u << 20;   // bytes per read
  uint32_t in_flight = 4;      // reads in flight
  // Called after every chunk written and once at the end; from the caller's thread.
  std::function<void(uint64_t done, uint64_t total)> progress;
};
// Writes the whole of a COW device (base + overlay as a guest sees it) into a
// new raw image at output_path (refusing to replace one). All-zero chunks are
// left as holes. The image is fsynced before this returns.
core::result<void> commit_cow(Vstore& cow, const std::string& output_path, const cow_commit_options& opts = {});

}  // namespace uvd::storage
