// SPDX-License-Identifier: Apache-2.0
// uvd info, uvd transports, uvd probe: what a device is and what can be reached.
#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>

#include "core/uri.hpp"
#include "tools/uvd/commands.hpp"

namespace uvd::cli {

std::string device_uri(const std::string& spec, const std::string& transport) {
  auto parsed = core::parse_uri(spec);
  if (parsed && transport.empty()) return spec;
  std::string t = transport.empty() ? "file" : transport;
  std::string target = spec;
  if (t == "file" && !spec.empty() && spec[0] != '/') {
    char abs[PATH_MAX];
    if (realpath(spec.c_str(), abs)) target = abs;
  }
  return t + "://" + target;
}

core::result<std::unique_ptr<storage::Vstore>> open_device(context& ctx, const std::string& spec,
                                                           const storage::open_options& opts,
                                                           const std::string& transport) {
  return storage::Vstore::open(*ctx.reg, device_uri(spec, transport), opts);
}

std::string human_size(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", b) : fmt::format("{:.4g} {}", v, units[u]);
}

namespace {

std::string features_text(uint64_t f) {
  std::string s;
  auto add = [&](uint64_t bit, const char* name) {
    if (f & bit) s += (s.empty() ? "" : " ") + std::string(name);
  };
  add(core::VSTORE_F_FLUSH, "flush");
  add(core::VSTORE_F_FUA, "fua");
  add(core::VSTORE_F_DISCARD, "discard");
  add(core::VSTORE_F_DISCARD_ZEROES, "discard-zeroes");
  add(core::VSTORE_F_WRITE_ZEROES, "write-zeroes");
  add(core::VSTORE_F_ROTATIONAL, "rotational");
  return s.empty() ? "none" : s;
}


}  // namespace

void add_info_command(CLI::App& app, context& ctx) {
  auto* info = app.add_subcommand("info", "Show a device's size, block size, features and identity");
  auto device = std::make_shared<std::string>();
  auto transport = std::make_shared<std::string>();
  auto ro = std::make_shared<bool>(true);
  info->add_option("device", *device, "device URI (file:///x.img, memory:64M, cow:///o.cow) or a path")->required();
  info->add_option("-t,--transport", *transport, "transport for a bare path (default: file)");
  info->callback([&ctx, device, transport, ro] {
    auto v = open_device(ctx, *device, {.queue_depth = 1, .read_only = *ro}, *transport);
    if (!v) die(1, v.err().what());
    const auto& i = (*v)->info();
    fmt::print("device:        {}\n", device_uri(*device, *transport));
    fmt::print("transport:     {}\n", (*v)->transport_name());
    fmt::print("size:          {} ({} bytes)\n", human_size(i.size), i.size);
    fmt::print("block size:    {}\n", i.block_size);
    fmt::print("max transfer:  {}\n", i.max_transfer ? human_size(i.max_transfer) : std::string("unlimited"));
    fmt::print("features:      {}\n", features_text(i.features));
    fmt::print("identity:      {}\n", i.id);
  });

  auto* list = app.add_subcommand("transports", "List the transports this uvd can load, built in or as plugins");
  list->callback([&ctx] {
    for (const auto& t : ctx.reg->list()) {
      std::string kind = t.storage && t.net ? "storage+net" : t.storage ? "storage" : t.net ? "net" : "-";
      fmt::print("{:<10} {:<12} {}  [{}]\n", t.name, kind, t.description, t.origin);
    }
  });

  auto* probe = app.add_subcommand("probe", "List the devices a transport can reach");
  auto scope = std::make_shared<std::string>();
  auto ptransport = std::make_shared<std::string>();
  probe->add_option("transport", *ptransport, "transport name, e.g. file")->required();
  probe->add_option("scope", *scope, "where to look: a folder for file (default: current folder)");
  probe->callback([&ctx, scope, ptransport] {
    auto ops = ctx.reg->vstore(*ptransport);
    if (!ops) die(1, ops.err().what());
    if (!(*ops)->probe) die(1, "transport '" + *ptransport + "' cannot probe for devices");
    std::vector<core::vstore_probe_entry> entries(256);
    int n = (*ops)->probe(scope->c_str(), entries.data(), static_cast<uint32_t>(entries.size()));
    if (n < 0) die(1, "probe " + *ptransport + " '" + *scope + "': " + core::make_error(-n, "").what());
    for (int k = 0; k < std::min<int>(n, static_cast<int>(entries.size())); ++k)
      fmt::print("{:<50} {:>10}  {}\n", entries[k].uri, human_size(entries[k].size), entries[k].description);
    if (n > static_cast<int>(entries.size())) fmt::print("... and {} more\n", n - static_cast<int>(entries.size()));
  });
}

}  // namespace uvd::cli
