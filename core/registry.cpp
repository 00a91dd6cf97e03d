// SPDX-License-Identifier: Apache-2.0
#include "core/registry.hpp"

#include <dirent.h>
#include <dlfcn.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <set>

#include "core/plugin.hpp"

#ifndef UVD_BUILD_PLUGIN_DIR
#define UVD_BUILD_PLUGIN_DIR ""
#endif

namespace uvd::core {

namespace {

constexpr std::string_view plugin_prefix = "uvd-transport-";
constexpr std::string_view plugin_suffix = ".so";

bool valid_name(std::string_view n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
  return true;
}

// Copy what the table's builder knew; later fields stay zero (nullptr ops).
template <class Ops>
result<std::unique_ptr<Ops>> copy_table(const Ops& ops, uint32_t abi_now, const char* kind) {
  std::string name = ops.name ? ops.name : "";
  if (!valid_name(name)) return fail(EINVAL, std::string(kind) + " table has no valid name");
  if (ops.abi_version == 0 || ops.abi_version > abi_now)
    return fail(EPROTO, std::string(kind) + " transport '" + name + "' is built for ABI " +
                            std::to_string(ops.abi_version) + "; this uvd speaks ABI 1.." + std::to_string(abi_now));
  if (ops.struct_size < offsetof(Ops, description) + sizeof(ops.description))
    return fail(EPROTO, std::string(kind) + " transport '" + name + "' has a truncated ops table");
  auto copy = std::make_unique<Ops>();
  std::memcpy(static_cast<void*>(copy.get()), &ops, std::min<size_t>(ops.struct_size, sizeof(Ops)));
  return copy;
}

std::string missing_required(const vstore_ops& o) {
  if (!o.open) return "open";
  if (!o.release) return "release";
  if (!o.info) return "info";
  if (!o.submit) return "submit";
  return {};
}

std::string missing_required(const veth_ops& o) {
  if (!o.open) return "open";
  if (!o.close) return "close";
  if (!o.caps) return "caps";
  if (!o.xmit) return "xmit";
  if (!o.rx_poll) return "rx_poll";
  return {};
}

}  // namespace

registry::registry() = default;

registry::~registry() {
  // Tables point into the plugins: drop them before unloading.
  vstores_.clear();
  veths_.clear();
  for (void* h : dl_handles_) dlclose(h);
}

result<void> registry::add_vstore(const vstore_ops& ops, std::string origin) {
  auto copy = copy_table(ops, VSTORE_ABI_VERSION, "storage");
  if (!copy) return fail(std::move(copy).err());
  if (auto m = missing_required(**copy); !m.empty())
    return fail(EPROTO, "storage transport '" + std::string(ops.name) + "' lacks the required op '" + m + "'");
  std::string name = (*copy)->name;
  origins_[name] = std::move(origin);
  vstores_[name] = std::move(*copy);
  return ok();
}

result<void> registry::add_veth(const veth_ops& ops, std::string origin) {
  auto copy = copy_table(ops, VETH_ABI_VERSION, "network");
  if (!copy) return fail(std::move(copy).err());
  if (auto m = missing_required(**copy); !m.empty())
    return fail(EPROTO, "network transport '" + std::string(ops.name) + "' lacks the required op '" + m + "'");
  std::string name = (*copy)->name;
  origins_[name] = std::move(origin);
  veths_[name] = std::move(*copy);
  return ok();
}

void registry::add_plugin_dir(std::string dir) {
  if (dir.empty()) return;
  for (const auto& d : plugin_dirs_)
    if (d == dir) return;
  plugin_dirs_.push_back(std::move(dir));
}

result<void> registry::load_plugin(const std::string& path) {
  dlerror();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* why = dlerror();
    std::string detail = why ? why : "unknown dlopen error";
    // dlopen names the first library it could not find; say so plainly.
    if (detail.find("cannot open shared object file") != std::string::npos && detail.find(path) != 0)
      return fail(ELIBACC, "plugin " + path + " needs a system library that is missing: " + detail);
    return fail(ELIBBAD, "cannot load plugin " + path + ": " + detail);
  }
  using entry_fn = const plugin_entry* (*)();
  auto fn = reinterpret_cast<entry_fn>(dlsym(h, UVD_PLUGIN_ENTRY_SYMBOL));
  if (!fn) {
    dlclose(h);
    return fail(ELIBBAD, "plugin " + path + " has no " UVD_PLUGIN_ENTRY_SYMBOL " symbol");
  }
  const plugin_entry* e = fn();
  if (!e || e->abi_version != PLUGIN_ABI_VERSION || e->struct_size < sizeof(plugin_entry) || !e->name) {
    dlclose(h);
    return fail(EPROTO, "plugin " + path + " has an incompatible entry (ABI " +
                            std::to_string(e ? e->abi_version : 0) + ", this uvd speaks " +
                            std::to_string(PLUGIN_ABI_VERSION) + ")");
  }
  if (!e->vstore && !e->veth) {
    dlclose(h);
    return fail(EPROTO, "plugin " + path + " carries no transport");
  }
  if (e->vstore) {
    if (auto r = add_vstore(*e->vstore, path); !r) {
      dlclose(h);
      return fail(r.err().errnum(), "plugin " + path + ": " + r.err().message);
    }
  }
  if (e->veth) {
    if (auto r = add_veth(*e->veth, path); !r) {
      if (e->vstore) vstores_.erase(e->vstore->name);
      dlclose(h);
      return fail(r.err().errnum(), "plugin " + path + ": " + r.err().message);
    }
  }
  dl_handles_.push_back(h);
  spdlog::debug("loaded transport plugin '{}' from {}", e->name, path);
  return ok();
}

result<void> registry::load_by_name(std::string_view name) {
  if (!valid_name(name)) return fail(EINVAL, "'" + std::string(name) + "' is not a transport name");
  std::string file = std::string(plugin_prefix) + std::string(name) + std::string(plugin_suffix);
  for (const auto& dir : plugin_dirs_) {
    std::string path = dir + "/" + file;
    if (access(path.c_str(), F_OK) != 0) continue;
    return load_plugin(path);
  }
  std::string known;
  for (const auto& t : list()) known += (known.empty() ? "" : ", ") + t.name;
  std::string where;
  for (const auto& dir : plugin_dirs_) where += (where.empty() ? "" : ":") + dir;
  return fail(ENOENT, "no transport named '" + std::string(name) + "' (not built in, and no " + file + " in " +
                          (where.empty() ? std::string("an empty plugin path") : where) +
                          "); available: " + (known.empty() ? "none" : known));
}

result<const vstore_ops*> registry::vstore(std::string_view name) {
  if (auto it = vstores_.find(name); it != vstores_.end()) return it->second.get();
  if (veths_.count(name)) return fail(EINVAL, "transport '" + std::string(name) + "' is a network transport, not storage");
  if (auto r = load_by_name(name); !r) return fail(std::move(r).err());
  if (auto it = vstores_.find(name); it != vstores_.end()) return it->second.get();
  return fail(EINVAL, "transport '" + std::string(name) + "' has no storage side");
}

result<const veth_ops*> registry::veth(std::string_view name) {
  if (auto it = veths_.find(name); it != veths_.end()) return it->second.get();
  if (vstores_.count(name)) return fail(EINVAL, "transport '" + std::string(name) + "' is a storage transport, not network");
  if (auto r = load_by_name(name); !r) return fail(std::move(r).err());
  if (auto it = veths_.find(name); it != veths_.end()) return it->second.get();
  return fail(EINVAL, "transport '" + std::string(name) + "' has no network side");
}

std::vector<transport_info> registry::list() {
  // Load every plugin on the path that is not registered yet; one that fails
  // is listed with its error as the description.
  std::map<std::string, std::string> broken;
  for (const auto& dir : plugin_dirs_) {
    DIR* d = opendir(dir.c_str());
    if (!d) continue;
    while (dirent* ent = readdir(d)) {
      std::string_view f = ent->d_name;
      if (f.size() <= plugin_prefix.size() + plugin_suffix.size() || f.substr(0, plugin_prefix.size()) != plugin_prefix ||
          f.substr(f.size() - plugin_suffix.size()) != plugin_suffix)
        continue;
      std::string name(f.substr(plugin_prefix.size(), f.size() - plugin_prefix.size() - plugin_suffix.size()));
      if (origins_.count(name) || broken.count(name)) continue;
      if (auto r = load_plugin(dir + "/" + std::string(f)); !r) broken[name] = r.err().what();
    }
    closedir(d);
  }
  std::vector<transport_info> out;
  for (const auto& [name, origin] : origins_) {
    transport_info t;
    t.name = name;
    t.origin = origin;
    if (auto it = vstores_.find(name); it != vstores_.end()) {
      t.storage = true;
      t.description = it->second->description ? it->second->description : "";
    }
    if (auto it = veths_.find(name); it != veths_.end()) {
      t.net = true;
      if (t.description.empty() && it->second->description) t.description = it->second->description;
    }
    out.push_back(std::move(t));
  }
  for (const auto& [name, why] : broken) out.push_back({name, "unavailable: " + why, "plugin", false, false});
  return out;
}

void add_default_plugin_dirs(registry& reg) {
  if (const char* env = std::getenv("UVD_PLUGIN_PATH")) {
    std::string_view p = env;
    while (!p.empty()) {
      auto c = p.find(':');
      reg.add_plugin_dir(std::string(p.substr(0, c)));
      if (c == std::string_view::npos) break;
      p.remove_prefix(c + 1);
    }
  }
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    exe[n] = '\0';
    std::string dir(exe);
    dir.resize(dir.rfind('/'));
    reg.add_plugin_dir(dir + "/plugins");       // a build tree: binary beside plugins/
    reg.add_plugin_dir(dir + "/../lib/uvd");    // an installed tree
  }
  if (std::strlen(UVD_BUILD_PLUGIN_DIR)) reg.add_plugin_dir(UVD_BUILD_PLUGIN_DIR);
}

}  // namespace uvd::core
