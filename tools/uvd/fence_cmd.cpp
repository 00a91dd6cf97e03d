// SPDX-License-Identifier: Apache-2.0
// uvd fence show|advance: the fencing epoch of an exported image, as back ends
// check it (storage/fence.hpp). advance is the operator's preempt: it waits
// for every request of the older epochs to finish on every back end, then
// makes them refuse that epoch, so the current owner (a multipath device)
// is fenced out.
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "core/uri.hpp"
#include "storage/fence.hpp"
#include "tools/uvd/commands.hpp"

namespace uvd::cli {

namespace {

struct fence_args {
  std::string image;
  std::string record;
  uint32_t to = 0;
};

std::unique_ptr<storage::fence_record> open_record(const fence_args& a) {
  const std::string path = a.record.empty() ? storage::fence_record::path_for(a.image) : a.record;
  auto r = storage::fence_record::open(path);
  if (!r) die(1, "fence: " + r.err().what());
  return std::move(*r);
}

}  // namespace

void add_fence_commands(CLI::App& app, context&) {
  auto* fence = app.add_subcommand("fence", "The fencing epoch back ends check requests against "
                                            "(the IMAGE.fence record beside an exported image)");
  fence->require_subcommand(1);

  auto sa = std::make_shared<fence_args>();
  auto* show = fence->add_subcommand("show", "Print the image's current fencing epoch (0: never fenced)");
  show->add_option("IMAGE", sa->image, "the exported image file")->required();
  show->add_option("--record", sa->record, "the record file, if not IMAGE.fence");
  show->callback([sa] {
    auto rec = open_record(*sa);
    auto e = rec->current();
    if (!e) die(1, "fence show: " + e.err().what());
    std::printf("%s: epoch %u\n", rec->path().c_str(), *e);
  });

  auto aa = std::make_shared<fence_args>();
  auto* adv = fence->add_subcommand("advance", "Fence out the current owner: wait for its requests in flight on "
                                               "every back end, then refuse its epoch");
  adv->add_option("IMAGE", aa->image, "the exported image file")->required();
  adv->add_option("--record", aa->record, "the record file, if not IMAGE.fence");
  adv->add_option("--to", aa->to, "the new epoch (default: current + 1)")->check(CLI::Range(1u, 2147483647u));
  adv->callback([aa] {
    auto rec = open_record(*aa);
    uint32_t to = aa->to;
    if (to == 0) {
      auto e = rec->current();
      if (!e) die(1, "fence advance: " + e.err().what());
      if (*e >= 2147483647u) die(1, "fence advance: the epoch is exhausted");
      to = *e + 1;
    }
    auto r = rec->advance(to);
    if (!r) die(r.err().errnum() == ESTALE ? 3 : 1, "fence advance: " + r.err().what());
    std::printf("%s: epoch %u\n", rec->path().c_str(), to);
  });
}

}  // namespace uvd::cli
