// SPDX-License-Identifier: Apache-2.0
#pragma once
// Subcommands of the uvd tool. Each add_* registers one CLI11 subcommand whose
// callback does the work; a failure prints one clear line to stderr and
// throws CLI::RuntimeError(exit_code).
#include <CLI/CLI.hpp>

#include "core/registry.hpp"

namespace uvd::cli {

struct context {
  core::registry* reg = nullptr;
};

void add_info_command(CLI::App& app, context& ctx);    // uvd info, uvd transports
void add_cow_commands(CLI::App& app, context& ctx);    // uvd cow create|info|commit
void add_serve_command(CLI::App& app, context& ctx);   // uvd serve (NBD export)

// Print "uvd: <message>" to stderr and throw CLI::RuntimeError(code).
[[noreturn]] void die(int code, const std::string& message);

}  // namespace uvd::cli
