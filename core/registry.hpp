// SPDX-License-Identifier: Apache-2.0
#pragma once
// The transport registry: resolves a transport by name or URI scheme. In-tree
// transports are added from one explicit list (builtin_transports()); others
// are shared-object plugins found on the plugin path and loaded on first use.
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.hpp"
#include "core/uri.hpp"
#include "core/veth_ops.hpp"
#include "core/vstore_ops.hpp"

namespace uvd::core {

struct transport_info {
  std::string name;
  std::string description;
  std::string origin;  // "builtin" or the plugin's path
  bool storage = false;
  bool net = false;
};

class registry {
 public:
  registry();
  ~registry();
  registry(const registry&) = delete;
  registry& operator=(const registry&) = delete;

  // Copies the table (zero-filling fields the table was built without) after
  // checking its ABI version and required ops; the error names what is wrong.
  result<void> add_vstore(const vstore_ops& ops, std::string origin = "builtin");
  result<void> add_veth(const veth_ops& ops, std::string origin = "builtin");

  // Folders searched, in order, for uvd-transport-<name>.so.
  void add_plugin_dir(std::string dir);
  const std::vector<std::string>& plugin_dirs() const { return plugin_dirs_; }
  // dlopen one plugin file and register what it carries.
  result<void> load_plugin(const std::string& path);

  // By name: a registered transport, else a plugin of that name on the path.
  // A plugin that fails to load (say, its system library is missing) gives an
  // error naming the plugin and the missing piece.
  result<const vstore_ops*> vstore(std::string_view name);
  result<const veth_ops*> veth(std::string_view name);

  // Everything registered plus every plugin found on the path (loading each).
  std::vector<transport_info> list();

 private:
  result<void> load_by_name(std::string_view name);

  struct loaded;
  std::map<std::string, std::unique_ptr<vstore_ops>, std::less<>> vstores_;
  std::map<std::string, std::unique_ptr<veth_ops>, std::less<>> veths_;
  std::map<std::string, std::string, std::less<>> origins_;
  std::vector<std::string> plugin_dirs_;
  std::vector<void*> dl_handles_;
};

// Default plugin folders: $UVD_PLUGIN_PATH (colon-separated), the build
// tree's plugin folder, then <folder of the running binary>/../lib/uvd.
void add_default_plugin_dirs(registry& reg);

}  // namespace uvd::core
