// SPDX-License-Identifier: Apache-2.0
// uvd overlay list|create|remove: the per-client overlays that
// `uvd serve --root NAME=BASE --overlay-dir DIR` keeps (storage/roots).
#include <fmt/format.h>

#include <ctime>
#include <memory>
#include <string>

#include "storage/roots/roots.hpp"
#include "tools/uvd/commands.hpp"

namespace uvd::cli {

namespace {

constexpr const char* overlay_footer = R"(Layout of DIR (uvd serve --root NAME=BASE --overlay-dir DIR):
  DIR/NAME/CLIENT.cow            CLIENT's copy-on-write overlay over root NAME
  DIR/NAME/CLIENT.cow.fence      its fencing epoch (shared by every server of DIR)
  DIR/NAME/CLIENT.cow.attached/  one record per connection that has it open
A record names the transport, the server's listener, the client's address, the
server's pid and since when; records of processes that are gone are ignored.)";

std::string when(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  char buf[32] = "?";
  if (::localtime_r(&tt, &tm)) std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string path_text(const storage::attachment_info& a) {
  std::string host = a.host.empty() ? "" : a.host + " ";
  return fmt::format("{} {} <- {} ({}pid {}, since {})", a.transport, a.server, a.client, host, a.pid, when(a.since));
}

void run_list(context& ctx, const std::string& dir) {
  auto all = storage::list_overlays(*ctx.reg, dir);
  if (!all) die(1, all.err().what());
  if (all->empty()) {
    fmt::print("no overlays in {}\n", dir);
    return;
  }
  size_t wr = 4, wc = 6;
  for (auto& o : *all) {
    wr = std::max(wr, o.root.size());
    wc = std::max(wc, o.client.size());
  }
  fmt::print("{:<{}}  {:<{}}  {:>10}  {:>10}  {}\n", "ROOT", wr, "CLIENT", wc, "SIZE", "ALLOCATED", "ATTACHED VIA");
  for (auto& o : *all) {
    std::string size = "?", alloc = "?";
    if (o.ok) {
      size = human_size(o.report.header.virtual_size);
      alloc = human_size(o.report.allocated * o.report.header.block_size);
    }
    std::string first = o.ok ? (o.attached.empty() ? "-" : path_text(o.attached.front())) : "unreadable: " + o.error;
    fmt::print("{:<{}}  {:<{}}  {:>10}  {:>10}  {}\n", o.root, wr, o.client, wc, size, alloc, first);
    for (size_t i = 1; i < o.attached.size(); ++i)
      fmt::print("{:<{}}  {:<{}}  {:>10}  {:>10}  {}\n", "", wr, "", wc, "", "", path_text(o.attached[i]));
  }
}

}  // namespace

void add_overlay_commands(CLI::App& app, context& ctx) {
  auto* top = app.add_subcommand("overlay", "Per-client overlays of shared roots (uvd serve --root ... --overlay-dir DIR)");
  top->require_subcommand(1);
  top->footer(overlay_footer);

  auto dir = std::make_shared<std::string>();
  auto* list = top->add_subcommand("list", "Every overlay of DIR: root, client, size, allocated bytes, attached paths");
  list->add_option("DIR", *dir, "the overlay folder")->required();
  list->callback([&ctx, dir] { run_list(ctx, *dir); });

  struct create_args {
    std::string dir, root, client, base;
  };
  auto ca = std::make_shared<create_args>();
  auto* create = top->add_subcommand("create", "Provision CLIENT's overlay of root NAME ahead of its first attach");
  create->add_option("DIR", ca->dir, "the overlay folder")->required();
  create->add_option("NAME", ca->root, "the root")->required();
  create->add_option("CLIENT", ca->client, "the client's name")->required();
  create->add_option("--base", ca->base, "the root's base image (path or URI), as given to uvd serve --root")
      ->required();
  create->callback([&ctx, ca] {
    auto p = storage::provision_overlay(*ctx.reg, ca->dir, ca->root, ca->client, device_uri(ca->base));
    if (!p) die(p.err().errnum() == EINVAL ? 2 : 1, p.err().what());
    if (!p->created) die(1, p->path + " already exists");
    fmt::print("created {}\n", p->path);
  });

  struct remove_args {
    std::string dir, root, client;
    bool force = false;
  };
  auto ra = std::make_shared<remove_args>();
  auto* remove = top->add_subcommand("remove", "Delete CLIENT's overlay of root NAME (refused while it is attached)");
  remove->add_option("DIR", ra->dir, "the overlay folder")->required();
  remove->add_option("NAME", ra->root, "the root")->required();
  remove->add_option("CLIENT", ra->client, "the client's name")->required();
  remove->add_flag("--force", ra->force, "remove it even though records say it is attached");
  remove->callback([ra] {
    if (auto r = storage::remove_overlay(ra->dir, ra->root, ra->client, ra->force); !r)
      die(r.err().errnum() == EINVAL ? 2 : 1, r.err().what());
    fmt::print("removed {}\n", storage::overlay_path(ra->dir, ra->root, ra->client));
  });
}

}  // namespace uvd::cli
