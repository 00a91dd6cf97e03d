// SPDX-License-Identifier: Apache-2.0
#pragma once
// Shared roots and per-client overlays: one read-only base image (a "root",
// e.g. the root filesystem of diskless machines) and, under an overlay
// folder DIR, one persistent COW overlay per client of that root:
//
//   DIR/NAME/CLIENT.cow            the overlay (storage/cow format) over NAME's base
//   DIR/NAME/CLIENT.cow.fence      its fencing epoch record (file transport, fence=1)
//   DIR/NAME/CLIENT.cow.attached/  one record per connection that has it open
//
// A client's overlay is provisioned on its first attach and found again by
// name afterwards. Several server processes may share DIR (one per RDMA
// device, for multipath): provisioning is atomic (the overlay is made whole
// under a temporary name, then linked into place without replacing, so two
// processes racing on a first attach both end up with the one that won), and
// overlays are opened through the shared epoch record so a multipath client's
// fence reaches every server of it.
//
// Attachment records: a small text file per open connection in
// CLIENT.cow.attached/, named PID-XXXXXX, of "key=value" lines:
//   transport=nbd|rdma  server=LISTEN-ADDRESS  client=PEER-ADDRESS
//   pid=N  pid_start=N (the process' start time, /proc/PID/stat field 22)
//   host=HOSTNAME  since=UNIX-SECONDS  export=NAME/CLIENT
// written whole under a dot-name and renamed into place (readers never see a
// partial record), removed when the connection closes. A record whose process
// is gone (or whose pid now belongs to another process: pid_start differs) is
// dead and ignored; one written on another host cannot be checked and counts
// as live.
#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "storage/cow/cow.hpp"
#include "storage/vstore.hpp"

namespace uvd::storage {

// Longest client (and root) name: [A-Za-z0-9][A-Za-z0-9._-]{0,62}.
inline constexpr size_t max_client_name = 63;

// EINVAL, saying what is wrong, unless name matches [A-Za-z0-9][A-Za-z0-9._-]{0,62}.
// Names come from the network: the check is the only thing between them and a path.
core::result<void> check_client_name(std::string_view name);
// The same rule for root names (given by the operator).
core::result<void> check_root_name(std::string_view name);

// DIR/NAME/CLIENT.cow (names unchecked: check them first).
std::string overlay_path(std::string_view dir, std::string_view root, std::string_view client);

// "NAME/CLIENT" -> its two parts, both checked. ENOENT when there is no '/',
// EINVAL for a bad name (a/b/c, empty parts, bad characters, too long).
core::result<std::pair<std::string, std::string>> split_overlay_name(std::string_view export_name);

struct provisioned {
  std::string path;
  bool created = false;  // false: it was there already
};
// Makes DIR/NAME/CLIENT.cow over the base at base_uri unless it exists (and
// DIR/NAME). Safe against another process provisioning the same overlay at
// the same time.
core::result<provisioned> provision_overlay(core::registry& reg, std::string_view dir, std::string_view root,
                                            std::string_view client, std::string_view base_uri);

struct attachment_info {
  std::string transport;  // "nbd", "rdma"
  std::string server;     // the listener the client reached
  std::string client;     // the client's address as the server saw it
  std::string export_name;
  pid_t pid = 0;
  uint64_t pid_start = 0;
  std::string host;
  int64_t since = 0;      // unix seconds
  bool live = true;       // filled in by list_attachments
  std::string record;     // the record's path
};

// An attachment record, removed by the destructor.
class attachment {
 public:
  // Writes a record for this process in overlay_path + ".attached/".
  static core::result<std::unique_ptr<attachment>> write(const std::string& overlay_path, attachment_info info);
  ~attachment();
  attachment(const attachment&) = delete;
  attachment& operator=(const attachment&) = delete;
  const std::string& record() const noexcept { return path_; }

 private:
  attachment() = default;
  std::string path_;
};

// The records of an overlay, dead ones only with include_dead (marked live=false).
std::vector<attachment_info> list_attachments(const std::string& overlay_path, bool include_dead = false);

struct overlay_listing {
  std::string root, client, path;
  bool ok = false;
  cow_report report;       // when ok
  std::string error;       // why the overlay could not be read
  std::vector<attachment_info> attached;  // live records only
};
// Every DIR/*/*.cow whose names are valid, sorted by root and client.
core::result<std::vector<overlay_listing>> list_overlays(core::registry& reg, std::string_view dir);

// Removes an overlay, its fence record and its attachment folder. EBUSY while
// a live record exists, unless force. ENOENT when there is no such overlay.
core::result<void> remove_overlay(std::string_view dir, std::string_view root, std::string_view client, bool force);

// The server side: resolves "NAME/CLIENT" export names to COW devices over the
// root NAME's base, provisioning on first use. An overlay opened by several
// connections at once is one device, shared, and closed when the last
// connection lets go. Thread-safe.
class overlay_exports {
 public:
  struct root {
    std::string name;
    std::string base_uri;              // recorded in new overlays
    std::shared_ptr<Vstore> base;      // opened read-only by the caller, shared by every overlay
  };
  // One connection's hold on an overlay: the shared device and its
  // attachment record. Dropping it removes the record and, for the last
  // holder, closes the device.
  struct lease {
    std::string name;                  // NAME/CLIENT
    std::string path;                  // the overlay file
    std::shared_ptr<Vstore> disk;
    bool created = false;              // provisioned by this open
    std::unique_ptr<attachment> record;
  };
  struct listed {
    std::string name;
    uint64_t size = 0;
    bool read_only = false;
    std::string description;
  };

  // queue_depth applies to each COW device's front half.
  static core::result<std::unique_ptr<overlay_exports>> create(core::registry& reg, std::string dir,
                                                               std::vector<root> roots, uint32_t queue_depth = 64);
  ~overlay_exports();
  overlay_exports(const overlay_exports&) = delete;
  overlay_exports& operator=(const overlay_exports&) = delete;

  // Opens NAME/CLIENT for a connection (who: the record to keep; its
  // transport empty: no record). ENOENT: not a NAME/CLIENT of a known root;
  // EINVAL: a bad client name; other errors: the overlay could not be made or opened.
  core::result<std::unique_ptr<lease>> open(std::string_view export_name, attachment_info who);
  // The overlays of DIR under known roots, as export names, with sizes.
  std::vector<listed> list() const;
  const std::string& dir() const noexcept { return dir_; }
  const std::vector<root>& roots() const noexcept { return roots_; }
  // Overlay devices open now.
  size_t open_devices() const;

 private:
  // The open devices by NAME/CLIENT. Each device's deleter holds this too,
  // so a lease may outlive the overlay_exports that made it.
  struct device_table {
    std::mutex mu;
    std::condition_variable cv;
    std::map<std::string, std::weak_ptr<Vstore>> open;  // an expired entry: being closed
  };
  overlay_exports() = default;
  core::result<std::shared_ptr<Vstore>> get_device(const root& r, const std::string& key, const std::string& client,
                                                   bool* created);

  core::registry* reg_ = nullptr;
  std::string dir_;
  std::vector<root> roots_;
  uint32_t queue_depth_ = 64;
  std::shared_ptr<device_table> devices_;
};

}  // namespace uvd::storage
