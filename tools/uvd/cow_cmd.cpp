// SPDX-License-Identifier: Apache-2.0
// uvd cow create|info|commit: copy-on-write overlays over a shared read-only base.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>

#include "core/uri.hpp"
#include "storage/cow/cow.hpp"
#include "tools/uvd/commands.hpp"

namespace uvd::cli {

namespace {

std::string human(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", b) : fmt::format("{:.1f} {}", v, units[u]);
}

// Progress on stderr: redrawn in place on a terminal, every 10% otherwise.
class progress_meter {
 public:
  explicit progress_meter(std::string what) : what_(std::move(what)), tty_(::isatty(STDERR_FILENO) == 1) {}

  void update(uint64_t done, uint64_t total) {
    const auto now = clock::now();
    const int pct = total ? static_cast<int>(done * 100 / total) : 100;
    const bool last = done >= total;
    if (tty_) {
      if (!last && now - last_draw_ < std::chrono::milliseconds(100)) return;
    } else if (!last && pct / 10 == last_decile_) {
      return;
    }
    last_draw_ = now;
    last_decile_ = pct / 10;
    const double secs = std::chrono::duration<double>(now - start_).count();
    const double mibs = secs > 0 ? static_cast<double>(done) / (1 << 20) / secs : 0;
    std::string line = fmt::format("{}: {:3d}% ({} of {}), {:.1f} MiB/s", what_, pct, human(done), human(total), mibs);
    if (tty_) std::fprintf(stderr, "\r%s\x1b[K%s", line.c_str(), last ? "\n" : "");
    else std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string what_;
  bool tty_;
  clock::time_point start_ = clock::now(), last_draw_{};
  int last_decile_ = -1;
};

void print_report(const std::string& overlay, const storage::cow_report& r) {
  const auto& h = r.header;
  const double pct = h.blocks() ? 100.0 * static_cast<double>(r.allocated) / static_cast<double>(h.blocks()) : 0;
  std::printf("overlay:          %s\n", overlay.c_str());
  std::printf("format:           uvd COW version %u, header %u bytes\n", h.version, h.header_size);
  std::printf("virtual size:     %llu (%s)\n", static_cast<unsigned long long>(h.virtual_size), human(h.virtual_size).c_str());
  std::printf("block size:       %u (%s)\n", h.block_size, human(h.block_size).c_str());
  std::printf("blocks:           %llu\n", static_cast<unsigned long long>(h.blocks()));
  std::printf("allocated:        %llu blocks (%.1f%%, %s)\n", static_cast<unsigned long long>(r.allocated), pct,
              human(r.allocated * h.block_size).c_str());
  std::printf("bitmap:           offset %llu, %llu bytes\n", static_cast<unsigned long long>(h.bitmap_offset),
              static_cast<unsigned long long>(h.bitmap_length));
  std::printf("data offset:      %llu\n", static_cast<unsigned long long>(h.data_offset));
  std::printf("overlay store:    %llu bytes\n", static_cast<unsigned long long>(r.store_size));
  std::printf("base:             %s\n", h.base_uri.empty() ? "(none recorded)" : h.base_uri.c_str());
  std::printf("base size:        %llu (%s)\n", static_cast<unsigned long long>(h.base_size), human(h.base_size).c_str());
  std::printf("base fingerprint: %s\n", h.base_fingerprint.hex().c_str());
  if (r.base_checked) std::printf("base check:       %s (%s)\n", r.base_ok ? "OK" : "MISMATCH", r.base_message.c_str());
  else std::printf("base check:       skipped\n");
}

}  // namespace

void add_cow_commands(CLI::App& app, context& ctx) {
  auto* cow = app.add_subcommand("cow", "Copy-on-write overlays: a read-only base shared by many guests, "
                                        "one writable overlay per guest");
  cow->require_subcommand(1);

  // uvd cow create --base BASE [--block-size 64K] OVERLAY
  struct create_args {
    std::string base, block_size = "64K", overlay;
  };
  auto ca = std::make_shared<create_args>();
  auto* create = cow->add_subcommand("create", "Create an empty overlay file for a base image");
  create->add_option("--base,-b", ca->base, "the base image: a path or a device URI (opened read-only)")->required();
  create->add_option("--block-size", ca->block_size,
                     "copy-on-write granularity: a power of two from 4K to 16M (default 64K)");
  create->add_option("OVERLAY", ca->overlay, "the overlay file to create (must not exist)")->required();
  create->callback([&ctx, ca] {
    auto bs = core::parse_size(ca->block_size);
    if (!bs) die(2, "--block-size: " + bs.err().message);
    if (*bs > UINT32_MAX) die(2, "--block-size " + ca->block_size + " is too large");
    storage::cow_create_options opts;
    opts.block_size = static_cast<uint32_t>(*bs);
    auto h = storage::create_cow_file(*ctx.reg, ca->overlay, ca->base, opts);
    if (!h) die(1, "cow create: " + h.err().what());
    std::printf("created %s: %s virtual, %s blocks, base %s (fingerprint %s)\n", ca->overlay.c_str(),
                human(h->virtual_size).c_str(), human(h->block_size).c_str(), h->base_uri.c_str(),
                h->base_fingerprint.hex().c_str());
  });

  // uvd cow info [--base URI] [--no-base-check] OVERLAY
  struct info_args {
    std::string overlay, base;
    bool no_check = false;
  };
  auto ia = std::make_shared<info_args>();
  auto* info = cow->add_subcommand("info", "Show an overlay's header, allocation and whether its base matches");
  info->add_option("--base,-b", ia->base, "check against this base instead of the one recorded in the overlay");
  info->add_flag("--no-base-check", ia->no_check, "do not open the base");
  info->add_option("OVERLAY", ia->overlay, "the overlay: a path or a device URI")->required();
  info->callback([&ctx, ia] {
    auto rep = storage::inspect_cow(*ctx.reg, ia->overlay, !ia->no_check, ia->base);
    if (!rep) die(1, "cow info: " + rep.err().what());
    print_report(ia->overlay, *rep);
    std::fflush(stdout);
    if (rep->base_checked && !rep->base_ok) die(3, "cow info: the base does not match: " + rep->base_message);
  });

  // uvd cow commit [--base URI] OVERLAY OUTPUT
  struct commit_args {
    std::string overlay, output, base;
  };
  auto ma = std::make_shared<commit_args>();
  auto* commit = cow->add_subcommand("commit", "Write base + overlay, as a guest sees it, into a new raw image");
  commit->add_option("--base,-b", ma->base, "the base to use instead of the one recorded in the overlay");
  commit->add_option("OVERLAY", ma->overlay, "the overlay: a path or a device URI")->required();
  commit->add_option("OUTPUT", ma->output, "the raw image to create (must not exist)")->required();
  commit->callback([&ctx, ma] {
    std::string uri = "cow:" + ma->overlay;
    if (!ma->base.empty()) uri += "?base=" + storage::cow_normalize_uri(ma->base);
    storage::open_options ro;
    ro.read_only = true;
    auto dev = storage::Vstore::open(*ctx.reg, uri, ro);
    if (!dev) die(1, "cow commit: " + dev.err().what());
    progress_meter meter("commit " + ma->output);
    storage::cow_commit_options opts;
    opts.progress = [&](uint64_t done, uint64_t total) { meter.update(done, total); };
    auto r = storage::commit_cow(**dev, ma->output, opts);
    if (!r) die(1, "cow commit: " + r.err().what());
    std::printf("committed %s over its base into %s (%s)\n", ma->overlay.c_str(), ma->output.c_str(),
                human((*dev)->size()).c_str());
  });
}

}  // namespace uvd::cli
