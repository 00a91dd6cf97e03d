// SPDX-License-Identifier: Apache-2.0
// overlay_exports (roots.hpp): NAME/CLIENT export names -> shared COW devices.
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cerrno>

#include <spdlog/spdlog.h>

#include "storage/roots/roots.hpp"

namespace uvd::storage {

core::result<std::unique_ptr<overlay_exports>> overlay_exports::create(core::registry& reg, std::string dir,
                                                                       std::vector<root> roots,
                                                                       uint32_t queue_depth) {
  if (dir.empty()) return core::fail(EINVAL, "no overlay folder");
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return core::fail(errno, "cannot create the overlay folder " + dir);
  char abs[PATH_MAX];
  if (!::realpath(dir.c_str(), abs)) return core::fail(errno, "overlay folder " + dir);
  struct stat st{};
  if (::stat(abs, &st) != 0 || !S_ISDIR(st.st_mode)) return core::fail(ENOTDIR, dir + " is not a folder");
  for (size_t i = 0; i < roots.size(); ++i) {
    if (auto r = check_root_name(roots[i].name); !r) return core::fail(std::move(r).err());
    if (!roots[i].base) return core::fail(EINVAL, "root '" + roots[i].name + "' has no base device");
    for (size_t j = 0; j < i; ++j)
      if (roots[i].name == roots[j].name) return core::fail(EINVAL, "two roots are named '" + roots[i].name + "'");
  }
  std::unique_ptr<overlay_exports> x(new overlay_exports());
  x->reg_ = &reg;
  x->dir_ = abs;
  x->roots_ = std::move(roots);
  x->queue_depth_ = queue_depth;
  x->devices_ = std::make_shared<device_table>();
  return x;
}

overlay_exports::~overlay_exports() = default;

core::result<std::shared_ptr<Vstore>> overlay_exports::get_device(const root& r, const std::string& key,
                                                                   const std::string& client, bool* created) {
  device_table& t = *devices_;
  std::unique_lock lk(t.mu);
  for (;;) {
    auto it = t.open.find(key);
    if (it == t.open.end()) break;
    if (auto d = it->second.lock()) return d;
    t.cv.wait(lk);  // its last holder is closing it: open it afresh once that is done
  }
  // Under the lock: one process provisions and opens an overlay once, even
  // when several of its connections ask for it at the same moment.
  auto p = provision_overlay(*reg_, dir_, r.name, client, r.base_uri);
  if (!p) return core::fail(std::move(p).err());
  *created = p->created;
  open_options so;
  so.queue_depth = 128;  // data, copy-up, bitmap and flushes of a full COW queue
  so.options = "fence=1";  // the epoch record every server of this overlay shares
  auto store = Vstore::open(*reg_, cow_normalize_uri(p->path), so);
  if (!store) return core::fail(store.err().errnum(), "overlay " + p->path + ": " + store.err().message);
  open_options co;
  co.queue_depth = queue_depth_;
  auto dev = open_cow(r.base, std::move(*store), co);
  if (!dev) return core::fail(dev.err().errnum(), "overlay " + p->path + ": " + dev.err().message);
  std::shared_ptr<device_table> table = devices_;
  std::shared_ptr<Vstore> shared(dev->release(), [table, key](Vstore* v) {
    delete v;  // drains and closes before anyone may open the overlay again
    std::lock_guard g(table->mu);
    table->open.erase(key);
    table->cv.notify_all();
  });
  t.open[key] = shared;
  return shared;
}

core::result<std::unique_ptr<overlay_exports::lease>> overlay_exports::open(std::string_view export_name,
                                                                            attachment_info who) {
  auto parts = split_overlay_name(export_name);
  if (!parts) return core::fail(std::move(parts).err());
  const root* r = nullptr;
  for (const root& x : roots_)
    if (x.name == parts->first) r = &x;
  if (!r) return core::fail(ENOENT, "no root named '" + parts->first + "'");
  auto l = std::make_unique<lease>();
  l->name = parts->first + "/" + parts->second;
  l->path = overlay_path(dir_, parts->first, parts->second);
  auto disk = get_device(*r, l->name, parts->second, &l->created);
  if (!disk) return core::fail(std::move(disk).err());
  l->disk = std::move(*disk);
  if (l->created) spdlog::info("provisioned overlay {} ({})", l->name, l->path);
  if (!who.transport.empty()) {
    who.export_name = l->name;
    auto rec = attachment::write(l->path, std::move(who));
    if (!rec) return core::fail(std::move(rec).err());
    l->record = std::move(*rec);
  }
  return l;
}

std::vector<overlay_exports::listed> overlay_exports::list() const {
  std::vector<listed> out;
  auto all = list_overlays(*reg_, dir_);
  if (!all) return out;
  for (const overlay_listing& o : *all) {
    bool known = false;
    for (const root& r : roots_) known |= r.name == o.root;
    if (!known || !o.ok) continue;
    listed l;
    l.name = o.root + "/" + o.client;
    l.size = o.report.header.virtual_size;
    l.description = "overlay of " + o.root + " for " + o.client;
    out.push_back(std::move(l));
  }
  return out;
}

size_t overlay_exports::open_devices() const {
  std::lock_guard g(devices_->mu);
  size_t n = 0;
  for (auto& [k, w] : devices_->open) n += !w.expired();
  return n;
}

}  // namespace uvd::storage
