// SPDX-License-Identifier: Apache-2.0
#pragma once
// The transports and stacks the storage conformance suite runs over. Adding a
// transport means adding one entry to conformance_targets().
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/registry.hpp"
#include "core/result.hpp"
#include "tests/testutil.hpp"

namespace uvd::test {

struct conformance_target {
  std::string name;  // CamelCase-free test suffix: letters, digits, underscores
  uint64_t size;     // the device size the target makes
  bool persistent;   // data survives close and reopen
  // Prepares backing storage in dir and returns the URI to open.
  std::function<core::result<std::string>(const temp_dir& dir, core::registry& reg)> make;
  // Optional, used instead of make when set: for a device served by a back end
  // that must keep running while the test uses it (xen_local). The fixture
  // holds keep_alive until the test ends.
  std::function<core::result<std::string>(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep_alive)>
      make_served;
};

std::vector<conformance_target> conformance_targets();

// gtest prints a failing parameter with this instead of its bytes.
inline void PrintTo(const conformance_target& t, std::ostream* os) { *os << t.name; }

}  // namespace uvd::test
