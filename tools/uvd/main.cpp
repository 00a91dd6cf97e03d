// SPDX-License-Identifier: Apache-2.0
// uvd: unified virtual devices. Subcommands live in *_cmd.cpp beside this file.
#include <dlfcn.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <iostream>

#include "core/log.hpp"
#include "tools/uvd/commands.hpp"
#include "transports/builtin.hpp"

namespace uvd::cli {

void die(int code, const std::string& message) {
  std::fprintf(stderr, "uvd: %s\n", message.c_str());
  throw CLI::RuntimeError(code);
}

void* rdma_plugin_entry(core::registry& reg, const char* symbol) {
  std::string where;
  for (const std::string& dir : reg.plugin_dirs()) {
    std::string path = dir + "/uvd-transport-rdma.so";
    where += (where.empty() ? "" : ", ") + dir;
    if (::access(path.c_str(), F_OK) != 0) continue;
    dlerror();
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* why = dlerror();
      die(1, "cannot load the rdma transport " + path + ": " + (why ? why : "dlopen failed") +
                 " (it needs libibverbs1 and librdmacm1: scripts/install-deps)");
    }
    void* fn = dlsym(h, symbol);
    if (!fn) die(1, path + " has no entry " + symbol + ": it was built for another uvd version");
    return fn;
  }
  die(1, "--rdma needs the rdma transport plugin (uvd-transport-rdma.so), which is in none of the plugin folders (" +
             (where.empty() ? std::string("none configured") : where) + "); build it with libibverbs-dev and librdmacm-dev");
}

}  // namespace uvd::cli

int main(int argc, char** argv) {
  CLI::App app{
      "uvd - unified virtual devices: one generic virtual disk and NIC over pluggable transports\n"
      "(file, memory, cow, and plugins such as xen, rdma, tap).\n"
      "Devices are named by URI: file:///path/disk.img, memory:64M, cow:///path/overlay.cow"};
  app.set_version_flag("--version", std::string("uvd ") + UVD_VERSION);
  app.require_subcommand(1);
  std::string log_level;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off (default info, or $UVD_LOG_LEVEL)");
  std::vector<std::string> plugin_dirs;
  app.add_option("--plugin-dir", plugin_dirs, "extra folder searched for uvd-transport-<name>.so plugins");

  auto reg = uvd::transports::make_default_registry();
  uvd::cli::context ctx{reg.get()};
  uvd::cli::add_info_command(app, ctx);
  uvd::cli::add_cow_commands(app, ctx);
  uvd::cli::add_fence_commands(app, ctx);
  uvd::cli::add_serve_command(app, ctx);
  uvd::cli::add_net_commands(app, ctx);
  uvd::cli::add_xen_commands(app, ctx);
  uvd::cli::add_attach_commands(app, ctx);
  uvd::cli::add_overlay_commands(app, ctx);

  app.parse_complete_callback([&] {
    if (auto r = uvd::core::init_logging(log_level); !r) uvd::cli::die(2, r.err().message);
    for (auto& d : plugin_dirs) reg->add_plugin_dir(d);
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return 0;
}
