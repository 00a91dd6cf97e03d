// SPDX-License-Identifier: Apache-2.0
// A plugin linked against a library the loader will not find.
#include "core/plugin.hpp"
#include "transports/memory/memory.hpp"

extern "C" int uvd_absent_dep_value();

namespace {
uvd::core::vstore_ops make_table() {
  auto t = uvd::memory::memory_vstore_ops;
  t.name = "needsdep";
  t.description = uvd_absent_dep_value() == 42 ? "needs libuvd_absent_dep" : "";
  return t;
}
const uvd::core::vstore_ops needsdep_ops = make_table();
}  // namespace

UVD_DEFINE_PLUGIN("needsdep", &needsdep_ops, nullptr)
