// SPDX-License-Identifier: Apache-2.0
#pragma once
// Subcommands of the uvd tool. Each add_* registers one CLI11 subcommand whose
// callback does the work; a failure prints one clear line to stderr and
// throws CLI::RuntimeError(exit_code).
#include <CLI/CLI.hpp>

#include <memory>
#include <string>

#include "core/registry.hpp"
#include "storage/vstore.hpp"

namespace uvd::cli {

struct context {
  core::registry* reg = nullptr;
};

void add_info_command(CLI::App& app, context& ctx);    // uvd info, uvd transports
void add_cow_commands(CLI::App& app, context& ctx);    // uvd cow create|info|commit
void add_fence_commands(CLI::App& app, context& ctx);  // uvd fence show|advance
void add_serve_command(CLI::App& app, context& ctx);   // uvd serve (NBD export)
void add_net_commands(CLI::App& app, context& ctx);    // uvd switch, switch-stats, veth
void add_xen_commands(CLI::App& app, context& ctx);    // uvd xen-back (blkif back end)
void add_attach_commands(CLI::App& app, context& ctx); // uvd attach|detach (the kernel's nbd driver)
void add_overlay_commands(CLI::App& app, context& ctx);  // uvd overlay list|create|remove

// Opens a device named by URI, or by a bare path with `transport` (default
// "file"): "disk.img", "file:///disk.img", "memory:64M", "cow:///o.cow".
core::result<std::unique_ptr<storage::Vstore>> open_device(context& ctx, const std::string& spec,
                                                           const storage::open_options& opts = {},
                                                           const std::string& transport = {});
// The URI form of spec (a bare path becomes file:///abs/path).
std::string device_uri(const std::string& spec, const std::string& transport = {});

// "64.0 MiB", "512 B": a byte count for a person.
std::string human_size(uint64_t bytes);

// Print "uvd: <message>" to stderr and throw CLI::RuntimeError(code).
[[noreturn]] void die(int code, const std::string& message);

// The entry function `symbol` of the rdma transport plugin (uvd-transport-rdma.so,
// looked up in the registry's plugin folders; uvd itself does not link libibverbs).
// The plugin stays loaded for the life of the process. Dies with a clear message
// when the plugin is missing or cannot load.
void* rdma_plugin_entry(core::registry& reg, const char* symbol);

}  // namespace uvd::cli
