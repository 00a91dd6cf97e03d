// SPDX-License-Identifier: Apache-2.0
// uvd serve: export virtual disks over NBD (storage/nbd) and over RDMA (the
// 3leaf server of the rdma plugin) from flags or a small config file, until
// SIGINT or SIGTERM.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/uri.hpp"
#include "storage/nbd/nbd.hpp"
#include "storage/roots/rdma_resolver.hpp"
#include "storage/roots/roots.hpp"
#include "storage/vstore.hpp"
#include "tools/uvd/commands.hpp"
#include "transports/rdma/rdma.hpp"

namespace uvd::cli {

namespace {

constexpr const char* serve_footer = R"(Exports:
  NAME=URI[,ro]   URI is any device URI (file:///path/disk.img, memory:64M,
                  cow:///path/overlay.cow) or a plain path, read as a file.
                  ",ro" (or "?ro=1" in the URI) exports it read-only. NAME may
                  be empty ("=memory:1G"); the first export is also the
                  default one, which clients reach with the empty name.
  Exports may be given with --export, as positional arguments, or in a config
  file, which may also set the listeners and limits:

    # uvd serve --config FILE
    [server]
    unix = /run/uvd/nbd.sock        # repeatable
    tcp = 127.0.0.1:10809           # repeatable
    queue-depth = 64
    max-in-flight = 64
    max-connections = 256
    busy-poll-us = 50
    rdma = 192.168.1.10:7171        # repeatable: an RDMA listener
    rdma-queue-depth = 64           # RPCs in flight per RDMA client
    rdma-segments = 64              # pool segments per RDMA client
    rdma-segment-size = 128K

    overlay-dir = /srv/uvd/overlays # per-client overlays of the roots

    [root debian]                   # repeatable, like --root debian=BASE
    base = /srv/uvd/debian.img

    [export disk0]
    uri = file:///var/lib/images/disk0.img
    read-only = no
    description = the first disk
    uuid = 6f1c0d4e-27a3-8b15-9c2e-4d5f60718293   # optional, RDMA

  Flags add to what the file says.

Shared roots and per-client overlays (diskless machines):
  --root NAME=BASE --overlay-dir DIR   BASE is a path or device URI, opened
                  read-only. Export NAME is BASE itself, read-only. Export
                  NAME/CLIENT is CLIENT's own copy-on-write overlay over BASE,
                  DIR/NAME/CLIENT.cow: the first client to open NAME/CLIENT
                  creates it, later opens (after reboots and server restarts
                  too) find it again. CLIENT is 1 to 63 of [A-Za-z0-9._-],
                  starting with a letter or digit; other names are refused.
                  Several uvd serve processes may share DIR (say, one per
                  RDMA device for multipath clients): overlays are provisioned
                  atomically and opened with the shared fencing record
                  (fence=1), and all connections of one process to one
                  overlay share one device. While a connection has an
                  overlay open, DIR/NAME/CLIENT.cow.attached/ holds a record of
                  it; `uvd overlay list DIR` shows them. NBD_OPT_LIST and the
                  RDMA LIST show the roots and the overlays that exist.
  Clients: nbd+unix:///NAME/CLIENT?socket=PATH, rdma://ADDR:PORT/NAME/CLIENT.

Listening: without --unix, --tcp or --rdma (here or in the config), uvd serves
TCP on 127.0.0.1:10809. Clients: qemu-img info nbd+unix:///NAME?socket=PATH,
nbdinfo nbd://127.0.0.1:10809/NAME, nbd-client, the Linux nbd driver.

RDMA: --rdma ADDR[:PORT] (port 7171 by default, 0 for any) serves every export
over RDMA in the 3leaf model to many clients at once, each with its own
registered pool; clients open rdma://ADDR:PORT/NAME or rdma://ADDR:PORT/UUID.
An export's UUID is derived from its medium and name, so it stays the same
across restarts (or set it with uuid = in the config). RDMA comes from the
rdma plugin (uvd-transport-rdma.so, needs libibverbs and librdmacm); the rest
of uvd runs without it.

Shutdown: SIGINT or SIGTERM stops accepting, lets every connection finish its
in-flight requests and send their replies, flushes every export, logs
per-export statistics and exits 0.

Exit status: 0 after a clean shutdown, 1 if a disk or listener cannot be
opened, 2 for a usage or config error. Logging: uvd --log-level LEVEL serve ...
(or $UVD_LOG_LEVEL).)";

struct export_spec {
  std::string name;
  std::string uri;
  std::string description;
  std::string uuid;  // RDMA export identity; empty: derived
  bool read_only = false;
};

struct root_spec {
  std::string name;
  std::string base;  // a URI
};

struct serve_config {
  std::vector<export_spec> exports;
  std::vector<root_spec> roots;
  std::string overlay_dir;
  std::vector<std::string> unix_paths, tcp;
  uint32_t queue_depth = 64;
  uint32_t max_in_flight = 64;
  uint32_t max_connections = 256;
  uint32_t busy_poll_us = 50;
  std::vector<std::string> rdma;
  uint32_t rdma_queue_depth = 64;
  uint32_t rdma_segments = 64;
  uint32_t rdma_segment_size = 128 * 1024;
};

std::string trim(std::string s) {
  size_t b = s.find_first_not_of(" \t\r");
  size_t e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}


export_spec parse_export_flag(const std::string& text) {
  size_t eq = text.find('=');
  if (eq == std::string::npos)
    die(2, "export '" + text + "' is not NAME=URI[,ro] (e.g. disk=file:///srv/disk.img or a=memory:64M,ro)");
  export_spec e;
  e.name = text.substr(0, eq);
  std::string rest = text.substr(eq + 1);
  for (;;) {
    size_t comma = rest.rfind(',');
    if (comma == std::string::npos) break;
    std::string flag = rest.substr(comma + 1);
    if (flag == "ro" || flag == "read-only") {
      e.read_only = true;
    } else if (flag == "rw") {
      e.read_only = false;
    } else {
      break;  // part of the URI
    }
    rest.resize(comma);
  }
  if (rest.empty()) die(2, "export '" + text + "' has no URI");
  e.uri = device_uri(rest);
  return e;
}

bool parse_bool(const std::string& v, const std::string& where) {
  if (v == "1" || v == "yes" || v == "true" || v == "on") return true;
  if (v == "0" || v == "no" || v == "false" || v == "off") return false;
  die(2, where + ": '" + v + "' is not yes or no");
}

uint32_t parse_count(const std::string& v, const std::string& where, uint32_t lo, uint32_t hi) {
  char* end = nullptr;
  errno = 0;
  unsigned long n = std::strtoul(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || n < lo || n > hi)
    die(2, where + ": '" + v + "' is not a number in " + std::to_string(lo) + ".." + std::to_string(hi));
  return static_cast<uint32_t>(n);
}

void read_config(const std::string& path, serve_config& cfg) {
  std::ifstream in(path);
  if (!in) die(2, "cannot read config '" + path + "': " + std::strerror(errno));
  std::string line, section;
  export_spec* cur = nullptr;
  root_spec* cur_root = nullptr;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    const std::string where = path + ":" + std::to_string(lineno);
    size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    line = trim(line);
    if (line.empty()) continue;
    if (line.front() == '[') {
      if (line.back() != ']') die(2, where + ": section header without ']'");
      std::string s = trim(line.substr(1, line.size() - 2));
      if (s == "server") {
        section = "server";
        cur = nullptr;
      } else if (s.rfind("export", 0) == 0 && (s.size() == 6 || s[6] == ' ' || s[6] == '\t')) {
        section = "export";
        export_spec e;
        e.name = trim(s.substr(6));
        if (e.name.size() >= 2 && e.name.front() == '"' && e.name.back() == '"') e.name = e.name.substr(1, e.name.size() - 2);
        cfg.exports.push_back(std::move(e));
        cur = &cfg.exports.back();
      } else if (s.rfind("root", 0) == 0 && s.size() > 5 && (s[4] == ' ' || s[4] == '\t')) {
        section = "root";
        cfg.roots.push_back({trim(s.substr(4)), {}});
        cur_root = &cfg.roots.back();
      } else {
        die(2, where + ": unknown section [" + s + "] (use [server], [export NAME] or [root NAME])");
      }
      continue;
    }
    size_t eq = line.find('=');
    if (eq == std::string::npos) die(2, where + ": expected key = value");
    std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    if (section == "server") {
      if (key == "unix") cfg.unix_paths.push_back(value);
      else if (key == "tcp") cfg.tcp.push_back(value);
      else if (key == "queue-depth") cfg.queue_depth = parse_count(value, where, 1, 4096);
      else if (key == "max-in-flight") cfg.max_in_flight = parse_count(value, where, 1, 1024);
      else if (key == "max-connections") cfg.max_connections = parse_count(value, where, 1, 65536);
      else if (key == "busy-poll-us") cfg.busy_poll_us = parse_count(value, where, 0, 1000000);
      else if (key == "rdma") cfg.rdma.push_back(value);
      else if (key == "overlay-dir") cfg.overlay_dir = value;
      else if (key == "rdma-queue-depth") cfg.rdma_queue_depth = parse_count(value, where, 1, 256);
      else if (key == "rdma-segments") cfg.rdma_segments = parse_count(value, where, 1, 128);
      else if (key == "rdma-segment-size") {
        auto n = core::parse_size(value);
        if (!n || *n < 4096 || *n > (16u << 20) || (*n & (*n - 1)))
          die(2, where + ": rdma-segment-size '" + value + "' is not a power of two in 4K..16M");
        cfg.rdma_segment_size = static_cast<uint32_t>(*n);
      }
      else die(2, where + ": unknown [server] key '" + key + "'");
    } else if (section == "export") {
      if (key == "uri") cur->uri = device_uri(value);
      else if (key == "read-only") cur->read_only = parse_bool(value, where);
      else if (key == "description") cur->description = value;
      else if (key == "uuid") cur->uuid = value;
      else die(2, where + ": unknown [export] key '" + key + "'");
    } else if (section == "root") {
      if (key == "base") cur_root->base = device_uri(value);
      else die(2, where + ": unknown [root] key '" + key + "' (known: base)");
    } else {
      die(2, where + ": '" + key + "' outside a section");
    }
  }
  for (const export_spec& e : cfg.exports)
    if (e.uri.empty()) die(2, path + ": [export " + e.name + "] has no uri");
  for (const root_spec& r : cfg.roots)
    if (r.base.empty()) die(2, path + ": [root " + r.name + "] has no base");
}

root_spec parse_root_flag(const std::string& text) {
  size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size())
    die(2, "root '" + text + "' is not NAME=BASE (e.g. debian=/srv/debian.img)");
  return {text.substr(0, eq), device_uri(text.substr(eq + 1))};
}

// NAME/CLIENT exports for the NBD server.
class nbd_overlays final : public storage::nbd::export_resolver {
 public:
  explicit nbd_overlays(storage::overlay_exports& x) : x_(x) {}
  core::result<storage::nbd::resolved_export> resolve(std::string_view name,
                                                      const storage::nbd::client_info& who) override {
    storage::attachment_info a;
    a.transport = "nbd";
    a.server = who.listener;
    a.client = who.peer;
    auto l = x_.open(name, std::move(a));
    if (!l) return core::fail(std::move(l).err());
    storage::nbd::resolved_export r;
    r.cfg.name = (*l)->name;
    r.cfg.description = "copy-on-write overlay " + (*l)->name;
    r.cfg.disk = (*l)->disk;
    r.hold = std::shared_ptr<storage::overlay_exports::lease>(std::move(*l));
    return r;
  }
  std::vector<std::pair<std::string, std::string>> list() override {
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& o : x_.list()) out.emplace_back(o.name, o.description);
    return out;
  }

 private:
  storage::overlay_exports& x_;
};


struct serve_flags {
  std::vector<std::string> exports, positional, roots;
  std::string overlay_dir;
  std::vector<std::string> unix_paths, tcp, rdma;
  std::string config;
  uint32_t queue_depth = 0;
  uint32_t max_in_flight = 0;
  uint32_t max_connections = 0;
  int64_t busy_poll_us = -1;
  bool read_only = false;
};

// The rdma plugin's server table.
const rdma::server_api* load_rdma_server(core::registry& reg) {
  using entry_fn = const rdma::server_api* (*)();
  const rdma::server_api* api = reinterpret_cast<entry_fn>(rdma_plugin_entry(reg, UVD_RDMA_SERVER_ENTRY_SYMBOL))();
  if (!api || api->abi_version != rdma::SERVER_API_VERSION || api->struct_size < rdma::server_api_base_size)
    die(1, "uvd-transport-rdma.so does not carry an rdma server table of this uvd version");
  return api;
}

void run_serve(context& ctx, const serve_flags& f) {
  serve_config cfg;
  if (!f.config.empty()) read_config(f.config, cfg);
  for (const std::string& e : f.exports) cfg.exports.push_back(parse_export_flag(e));
  for (const std::string& e : f.positional) cfg.exports.push_back(parse_export_flag(e));
  cfg.unix_paths.insert(cfg.unix_paths.end(), f.unix_paths.begin(), f.unix_paths.end());
  cfg.tcp.insert(cfg.tcp.end(), f.tcp.begin(), f.tcp.end());
  cfg.rdma.insert(cfg.rdma.end(), f.rdma.begin(), f.rdma.end());
  if (f.queue_depth) cfg.queue_depth = f.queue_depth;
  if (f.max_in_flight) cfg.max_in_flight = f.max_in_flight;
  if (f.max_connections) cfg.max_connections = f.max_connections;
  if (f.busy_poll_us >= 0) cfg.busy_poll_us = static_cast<uint32_t>(f.busy_poll_us);
  for (const std::string& r : f.roots) cfg.roots.push_back(parse_root_flag(r));
  if (!f.overlay_dir.empty()) cfg.overlay_dir = f.overlay_dir;
  if (!cfg.roots.empty() && cfg.overlay_dir.empty())
    die(2, "--root needs --overlay-dir DIR (or overlay-dir = in [server]): the folder that keeps the clients' overlays");
  if (cfg.roots.empty() && !cfg.overlay_dir.empty())
    die(2, "--overlay-dir without --root: give the shared base as --root NAME=BASE");
  for (const root_spec& r : cfg.roots)
    if (auto ok = storage::check_root_name(r.name); !ok) die(2, "--root " + r.name + ": " + ok.err().message);
  if (cfg.exports.empty() && cfg.roots.empty())
    die(2, "nothing to serve: give --export NAME=URI (or NAME=URI arguments, --root NAME=BASE, or --config FILE)");
  if (cfg.unix_paths.empty() && cfg.tcp.empty() && cfg.rdma.empty()) cfg.tcp.push_back("127.0.0.1:10809");
  const bool nbd = !cfg.unix_paths.empty() || !cfg.tcp.empty();
  const rdma::server_api* rdma_api = cfg.rdma.empty() ? nullptr : load_rdma_server(*ctx.reg);
  // A root is also an export of its base, read-only, under its name.
  const size_t first_root = cfg.exports.size();
  for (const root_spec& r : cfg.roots) {
    export_spec e;
    e.name = r.name;
    e.uri = r.base;
    e.description = "shared root (read-only base)";
    e.read_only = true;
    cfg.exports.push_back(std::move(e));
  }
  for (size_t i = 0; i < cfg.exports.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (cfg.exports[i].name == cfg.exports[j].name) die(2, "two exports are named '" + cfg.exports[i].name + "'");

  // Block the stop signals before any thread exists (transports start
  // threads when they open), so that only sigwait below receives them.
  sigset_t stop_signals, old_mask;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &old_mask);

  storage::nbd::server_options opts;
  opts.unix_paths = cfg.unix_paths;
  opts.tcp = cfg.tcp;
  opts.max_in_flight = cfg.max_in_flight;
  opts.max_connections = cfg.max_connections;
  opts.busy_poll_us = cfg.busy_poll_us;
  for (const export_spec& e : cfg.exports) {
    storage::open_options oo;
    oo.queue_depth = cfg.queue_depth;
    oo.read_only = e.read_only || f.read_only;
    auto v = storage::Vstore::open(*ctx.reg, e.uri, oo);
    if (!v) die(1, "export '" + e.name + "': " + v.err().what());
    opts.exports.push_back({e.name, e.description, std::shared_ptr<storage::Vstore>(std::move(*v)), oo.read_only});
  }
  std::unique_ptr<storage::overlay_exports> overlays;
  if (!cfg.roots.empty()) {
    std::vector<storage::overlay_exports::root> roots;
    for (size_t i = first_root; i < cfg.exports.size(); ++i)
      roots.push_back({cfg.exports[i].name, cfg.exports[i].uri, opts.exports[i].disk});
    auto x = storage::overlay_exports::create(*ctx.reg, cfg.overlay_dir, std::move(roots), cfg.queue_depth);
    if (!x) die(1, x.err().what());
    overlays = std::move(*x);
    opts.resolver = std::make_shared<nbd_overlays>(*overlays);
  }
  std::unique_ptr<storage::nbd::server> srv;
  if (nbd) {
    auto s = storage::nbd::server::create(opts);
    if (!s) die(1, s.err().what());
    srv = std::move(*s);
    if (auto r = srv->start(); !r) die(1, r.err().what());
  }
  void* rdma_srv = nullptr;
  std::vector<std::pair<std::string, std::string>> rdma_ids;
  if (rdma_api) {
    rdma::server_options ro;
    ro.listen = cfg.rdma;
    ro.queue_depth = cfg.rdma_queue_depth;
    ro.segments = cfg.rdma_segments;
    ro.segment_size = cfg.rdma_segment_size;
    ro.busy_poll_us = cfg.busy_poll_us;
    ro.log_level = std::string(spdlog::level::to_string_view(spdlog::get_level()).data());
    for (size_t i = 0; i < cfg.exports.size(); ++i) {
      auto e = rdma::export_of(*opts.exports[i].disk, cfg.exports[i].name, opts.exports[i].read_only);
      e.uuid = cfg.exports[i].uuid;
      ro.exports.push_back(std::move(e));
    }
    char err[512] = {};
    if (overlays) {
      if (rdma_api->struct_size < sizeof(rdma::server_api) || !rdma_api->start_resolving)
        die(1, "uvd-transport-rdma.so is too old to serve --root overlays");
      rdma::export_resolver res = storage::rdma_overlay_resolver(*overlays);
      if (int rc = rdma_api->start_resolving(&ro, &res, &rdma_srv, err, sizeof err); rc < 0) die(1, err);
    } else if (int rc = rdma_api->start(&ro, &rdma_srv, err, sizeof err); rc < 0) {
      die(1, err);
    }
    rdma_api->export_ids(rdma_srv, &rdma_ids);
  }

  for (size_t i = 0; i < cfg.exports.size(); ++i) {
    const auto& d = *opts.exports[i].disk;
    std::vector<std::string> uris;
    if (srv) uris = srv->uris(cfg.exports[i].name);
    for (size_t k = 0; rdma_api && k < cfg.rdma.size(); ++k) {
      auto hp = storage::nbd::parse_host_port(cfg.rdma[k]);
      std::string host = hp ? hp->first : cfg.rdma[k];
      if (host.find(':') != std::string::npos) host = "[" + host + "]";
      std::string base = "rdma://" + host + ":" + std::to_string(rdma_api->port(rdma_srv, k)) + "/";
      uris.push_back(base + cfg.exports[i].name + " (" + base + rdma_ids[i].second + ")");
    }
    std::string where;
    for (size_t k = 0; k < uris.size(); ++k) where += (k ? " and " : "") + uris[k];
    fmt::print("serving export '{}' ({}, {}{}) on {}\n", cfg.exports[i].name, human_size(d.size()), cfg.exports[i].uri,
               d.read_only() || opts.exports[i].read_only ? ", read-only" : "", where);
  }
  if (overlays)
    fmt::print("serving per-client overlays NAME/CLIENT of root{} {} in {}\n", cfg.roots.size() > 1 ? "s" : "",
               [&] {
                 std::string n;
                 for (auto& r : cfg.roots) n += (n.empty() ? "" : ", ") + r.name;
                 return n;
               }(),
               overlays->dir());
  std::fflush(stdout);

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  fmt::print(stderr, "uvd: {} received, stopping: finishing in-flight requests and flushing\n",
             sig == SIGINT ? "SIGINT" : "SIGTERM");
  if (rdma_srv) {
    // Clients first: their in-flight I/O completes and their pools go.
    rdma::server_stats st;
    rdma_api->stats(rdma_srv, &st);
    rdma_api->stop_and_free(rdma_srv);
    fmt::print(stderr, "uvd: rdma: {} clients, {} RPCs served, {} refused ({})\n", st.connections, st.rpcs, st.refused,
               st.refusals);
  }
  if (srv) {
    srv->stop();  // flushes every export
    srv.reset();
  } else {
    for (auto& e : opts.exports)
      if (auto r = e.disk->flush(); !r) fmt::print(stderr, "uvd: export '{}': {}\n", e.name, r.err().what());
  }
  opts.exports.clear();
  opts.resolver.reset();
  overlays.reset();
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
}

}  // namespace

void add_serve_command(CLI::App& app, context& ctx) {
  auto* cmd = app.add_subcommand("serve", "Export virtual disks over NBD (and RDMA) until SIGINT or SIGTERM");
  auto f = std::make_shared<serve_flags>();
  // One value per use of a repeatable flag, so that positional exports after
  // "--tcp HOST:PORT" stay exports.
  cmd->add_option("-e,--export", f->exports, "NAME=URI[,ro]: export a disk under NAME (repeatable)")
      ->type_name("NAME=URI")
      ->allow_extra_args(false);
  cmd->add_option("exports", f->positional, "more NAME=URI[,ro] exports")->type_name("NAME=URI");
  cmd->add_option("-u,--unix", f->unix_paths, "listen on a unix socket at PATH (repeatable)")
      ->type_name("PATH")
      ->allow_extra_args(false);
  cmd->add_option("-t,--tcp", f->tcp,
                  "listen on TCP HOST:PORT, [IPV6]:PORT or HOST (port 10809) (repeatable; the default listener, "
                  "when no --unix/--tcp is given anywhere, is 127.0.0.1:10809)")
      ->type_name("HOST:PORT")
      ->allow_extra_args(false);
  cmd->add_option("--rdma", f->rdma,
                  "serve every export over RDMA (3leaf) on ADDR[:PORT] (port 7171 by default; repeatable; "
                  "needs the rdma plugin)")
      ->type_name("ADDR:PORT")
      ->allow_extra_args(false);
  cmd->add_option("--root", f->roots,
                  "NAME=BASE: serve BASE read-only as export NAME and each client's own copy-on-write overlay of "
                  "it as NAME/CLIENT, made on first use in --overlay-dir (repeatable)")
      ->type_name("NAME=BASE")
      ->allow_extra_args(false);
  cmd->add_option("--overlay-dir", f->overlay_dir,
                  "folder of the --root overlays: DIR/NAME/CLIENT.cow (may be shared by several uvd serve)")
      ->type_name("DIR");
  cmd->add_option("-c,--config", f->config, "read exports and listeners from FILE (format below)")
      ->type_name("FILE");
  cmd->add_flag("-r,--read-only", f->read_only, "export every disk read-only");
  cmd->add_option("--queue-depth", f->queue_depth, "requests each disk has in flight at its transport (default 64)")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--max-in-flight", f->max_in_flight, "NBD requests in flight per client connection (default 64)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--max-connections", f->max_connections, "client connections at once; more are closed (default 256)")
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--busy-poll-us", f->busy_poll_us,
                  "after answering, a connection looks for the client's next request this many microseconds "
                  "before sleeping: lower latency at low queue depth for a little CPU (default 50, 0: off)")
      ->check(CLI::Range(0, 1000000));
  cmd->footer(serve_footer);
  cmd->fallthrough();  // uvd serve --log-level debug ... reaches the global option
  cmd->callback([&ctx, f] { run_serve(ctx, *f); });
}

}  // namespace uvd::cli
