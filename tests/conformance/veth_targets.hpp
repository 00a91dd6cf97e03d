// SPDX-License-Identifier: Apache-2.0
#pragma once
// The network transports the veth conformance suite runs over. Each target
// makes a pair of Veths: frames transmitted on `a` arrive at `b` (they may be
// one and the same Veth, as with the loopback rings). Adding a transport
// means adding one entry to veth_conformance_targets().
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "net/veth.hpp"
#include "tests/testutil.hpp"

namespace uvd::test {

struct veth_pair {
  std::shared_ptr<void> env;    // what must outlive the Veths (a namespace, a switch); destroyed last
  std::unique_ptr<net::Veth> a;
  std::unique_ptr<net::Veth> b_owned;  // null when b is a
  net::Veth* b = nullptr;
  // Frames dropped between a and b by what the target puts there (a kernel
  // bridge's queues, a switch), as that thing counts them; null when nothing can drop.
  std::function<uint64_t()> outside_drops;

  ~veth_pair() {  // Veths first, then their environment
    b_owned.reset();
    a.reset();
    env.reset();
  }
};

struct veth_target {
  std::string name;  // letters, digits, underscores
  bool lossless;     // nothing between a and b adds frames of its own
  bool needs_root;   // namespaces, /dev/net/tun
  std::function<core::result<std::unique_ptr<veth_pair>>(const temp_dir& dir, core::registry& reg,
                                                          const net::veth_options& opts)>
      make;
};

std::vector<veth_target> veth_conformance_targets();

inline void PrintTo(const veth_target& t, std::ostream* os) { *os << t.name; }

}  // namespace uvd::test
