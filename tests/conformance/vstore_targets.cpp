// SPDX-License-Identifier: Apache-2.0
#include "tests/conformance/vstore_targets.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "storage/cow/cow.hpp"
#include "tests/conformance/vstore_rdma_targets.hpp"
#include "storage/vstore.hpp"
#include "transports/xen/blkback.hpp"
#include "transports/xen/local/local.hpp"
#include "storage/multipath/multipath.hpp"

namespace uvd::test {

namespace {

constexpr uint64_t device_size = 64ull << 20;

core::result<std::string> memory_uri(const std::string& options) {
  return std::string("memory:64M") + (options.empty() ? "" : "?" + options);
}

core::result<std::string> file_uri(const temp_dir& dir, const std::string& options) {
  std::string path = make_sparse_file(dir.file("disk.img"), device_size);
  return "file://" + path + (options.empty() ? "" : "?" + options);
}

// A base image full of a known pattern (so reads that fall through to it are
// checked) and a fresh overlay over it.
core::result<std::string> cow_uri(const temp_dir& dir, core::registry& reg,
                                  const std::function<std::string(const std::string&)>& base_uri = {}) {
  std::string base = dir.file("base.img");
  int fd = ::open(base.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return core::fail(errno, "create " + base);
  std::vector<std::byte> chunk(1 << 20);
  for (uint64_t off = 0; off < device_size; off += chunk.size()) {
    fill_pattern(chunk, 0xba5e, off);
    if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size())) {
      int e = errno;
      ::close(fd);
      return core::fail(e, "write " + base);
    }
  }
  ::close(fd);
  std::string overlay = dir.file("guest.cow");
  auto h = storage::create_cow_file(reg, overlay, base_uri ? base_uri(base) : "file://" + base);
  if (!h) return core::fail(std::move(h).err());
  return "cow://" + overlay;
}

// Two paths to one file: the io_uring and the thread-pool engine each hold
// their own descriptor, so requests really take different ways to the medium
// (round-robin sends every other one down each).
std::string multipath_2x_file_uri(const std::string& path) {
  return storage::multipath_uri({"file://" + path + "?engine=uring", "file://" + path + "?engine=threads"},
                                "policy=round-robin&check_interval=200ms");
}

// cow over multipath: the shared base reached over two paths, the overlay a file.
core::result<std::string> cow_over_multipath_uri(const temp_dir& dir, core::registry& reg) {
  return cow_uri(dir, reg, [](const std::string& base) { return multipath_2x_file_uri(base); });
}

// xen_local: the blkif front end ("xen" transport) against blkback serving a
// file, through the host-local hypervisor (grant tables, event channels and a
// store in this process; the protocol is the same as between two domains).
struct xen_local_backend {
  std::unique_ptr<xen::local_hub> hub;
  std::unique_ptr<xen::blkback> back;  // declared after hub: stops before it
};

core::result<std::string> xen_local_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep) {
  std::string path = make_sparse_file(dir.file("xen-disk.img"), device_size);
  auto disk = storage::Vstore::open(reg, "file://" + path);
  if (!disk) return core::fail(std::move(disk).err());
  auto be = std::make_shared<xen_local_backend>();
  auto hub = xen::local_hub::start(dir.file("xen-hub.sock"));
  if (!hub) return core::fail(std::move(hub).err());
  be->hub = std::move(*hub);
  auto hv = xen::open_local_hypervisor(be->hub->socket_path(), 0);
  if (!hv) return core::fail(std::move(hv).err());
  auto back = xen::blkback::start(std::move(*hv));
  if (!back) return core::fail(std::move(back).err());
  be->back = std::move(*back);
  if (auto r = be->back->add_device(1, 51712, std::shared_ptr<storage::Vstore>(std::move(*disk))); !r)
    return core::fail(std::move(r).err());
  keep = be;
  return "xen://0/51712?hv=local&domid=1&hub=" + be->hub->socket_path();
}

// xen_real: the same blkfront -> blkback pair through real Xen (grants through
// gntalloc/gntdev, an interdomain event channel, xenstore), both ends in this
// domain talking to itself. Runs inside the nested-Xen harness (tests/e2e/xen);
// anywhere else there is no /dev/xen, and the target reports ENODEV (skipped).
struct xen_real_backend {
  std::unique_ptr<xen::blkback> back;
  xen::domid_t front = 0;
  uint32_t vdev = 51712;
  ~xen_real_backend() {
    if (back) (void)back->remove_device(front, vdev);  // the next test attaches the same vdev afresh
  }
};

core::result<std::string> xen_real_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep) {
  auto hv = xen::open_real_hypervisor();
  if (!hv) return core::fail(ENODEV, "needs a Xen domain with gntdev, gntalloc, evtchn and xenstore: " + hv.err().what());
  std::string path = make_sparse_file(dir.file("xen-disk.img"), device_size);
  auto disk = storage::Vstore::open(reg, "file://" + path);
  if (!disk) return core::fail(std::move(disk).err());
  auto be = std::make_shared<xen_real_backend>();
  be->front = (*hv)->self_domid();
  auto back = xen::blkback::start(std::move(*hv));
  if (!back) return core::fail(std::move(back).err());
  be->back = std::move(*back);
  if (auto r = be->back->add_device(be->front, be->vdev, std::shared_ptr<storage::Vstore>(std::move(*disk))); !r)
    return core::fail(std::move(r).err());
  keep = be;
  return "xen://" + std::to_string(be->front) + "/" + std::to_string(be->vdev) + "?hv=xen";
}

}  // namespace

std::vector<conformance_target> conformance_targets() {
  return {
      {"memory", device_size, false, [](const temp_dir&, core::registry&) { return memory_uri(""); }},
      // Completions from another thread, a transport that fills up, and
      // requests split at 64 KiB and 4 segments.
      {"memory_async_split", device_size, false,
       [](const temp_dir&, core::registry&) { return memory_uri("async=1&depth=8&max_transfer=64K&max_segments=4"); }},
      {"file_uring", device_size, true, [](const temp_dir& d, core::registry&) { return file_uri(d, "engine=uring"); }},
      {"file_threads", device_size, true,
       [](const temp_dir& d, core::registry&) { return file_uri(d, "engine=threads"); }},
      {"cow_over_file", device_size, true, [](const temp_dir& d, core::registry& r) { return cow_uri(d, r); }},
      {"multipath_2x_file", device_size, true,
       [](const temp_dir& d, core::registry&) -> core::result<std::string> {
         return multipath_2x_file_uri(make_sparse_file(d.file("disk.img"), device_size));
       }},
      // Both file engines with fence=1: every request under a pass of the image's
      // fence record, the device holding the export's epoch (fence=required).
      {"multipath_2x_file_fenced", device_size, true,
       [](const temp_dir& d, core::registry&) -> core::result<std::string> {
         std::string path = make_sparse_file(d.file("disk.img"), device_size);
         return storage::multipath_uri({"file://" + path + "?engine=uring&fence=1",
                                        "file://" + path + "?engine=threads&fence=1"},
                                       "policy=round-robin&check_interval=200ms&fence=required");
       }},
      // One path that completes from another thread, fills up and splits.
      {"multipath_1x_memory_async_split", device_size, false,
       [](const temp_dir&, core::registry&) -> core::result<std::string> {
         return storage::multipath_uri({"memory:64M?async=1&depth=8&max_transfer=64K&max_segments=4"});
       }},
      {"cow_over_multipath_2x_file", device_size, true, cow_over_multipath_uri},
      // Two COW devices over one overlay with fence=1 (as two `uvd serve` hold a
      // client's overlay), failover: every fence reloads the device's metadata.
      {"multipath_2x_cow_fenced", device_size, true,
       [](const temp_dir& d, core::registry& r) -> core::result<std::string> {
         auto cow = cow_uri(d, r);
         if (!cow) return cow;
         return storage::multipath_uri({*cow + "?fence=1", *cow + "?fence=1"},
                                       "policy=failover&check_interval=200ms&fence=required");
       }},
      // blkfront -> host-local grant ring -> blkback -> file.
      {"xen_local", device_size, true, nullptr, xen_local_uri},
      // blkfront -> real Xen grants/event channel/xenstore -> blkback -> file (nested-Xen dom0 only).
      {"xen_real", device_size, true, nullptr, xen_real_uri},
      // uvd serve --rdma (3leaf) on one Soft-RoCE device, the rdma plugin on another: a raw
      // file, a COW overlay served whole, and a local overlay over a base served read-only.
      // ENODEV (skipped) without RDMA; tests/e2e/rdma runs them in a guest.
      {"rdma", device_size, true, nullptr, rdma_file_uri},
      {"rdma_cow", device_size, true, nullptr, rdma_cow_uri},
      {"cow_over_rdma", device_size, true, nullptr, cow_over_rdma_uri},
  };
}

}  // namespace uvd::test
