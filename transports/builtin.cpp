// SPDX-License-Identifier: Apache-2.0
#include "transports/builtin.hpp"

#include <spdlog/spdlog.h>

#include "net/loop_veth.hpp"
#include "storage/cow/cow.hpp"
#include "storage/multipath/multipath.hpp"
#include "transports/daemon/daemon.hpp"
#include "transports/file/file.hpp"
#include "transports/memory/memory.hpp"
#include "transports/pcap/pcap.hpp"
#include "transports/tap/tap.hpp"
#include "transports/xen/xen.hpp"

namespace uvd::transports {

void add_builtin(core::registry& reg) {
  const core::vstore_ops* builtin_vstores[] = {
      &memory::memory_vstore_ops,
      &file::file_vstore_ops,
      &storage::cow_vstore_ops,
      &xen::xen_vstore_ops,
      &storage::multipath_vstore_ops,
  };
  for (const auto* ops : builtin_vstores)
    if (auto r = reg.add_vstore(*ops); !r) spdlog::error("builtin transport: {}", r.err().what());
  const core::veth_ops* builtin_veths[] = {
      &net::loop_veth_ops,
      &tap::tap_veth_ops,
      &daemon::daemon_veth_ops,
      &pcap::pcap_veth_ops,
      &xen::xen_veth_ops,
  };
  for (const auto* ops : builtin_veths)
    if (auto r = reg.add_veth(*ops); !r) spdlog::error("builtin transport: {}", r.err().what());
}

std::unique_ptr<core::registry> make_default_registry() {
  auto reg = std::make_unique<core::registry>();
  add_builtin(*reg);
  core::add_default_plugin_dirs(*reg);
  return reg;
}

}  // namespace uvd::transports
