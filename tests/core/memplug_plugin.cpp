// SPDX-License-Identifier: Apache-2.0
// The memory transport again, as a shared-object plugin named "memplug".
#include "core/plugin.hpp"
#include "transports/memory/memory.hpp"

namespace {
uvd::core::vstore_ops make_table() {
  auto t = uvd::memory::memory_vstore_ops;
  t.name = "memplug";
  return t;
}
const uvd::core::vstore_ops memplug_ops = make_table();
}  // namespace

UVD_DEFINE_PLUGIN("memplug", &memplug_ops, nullptr)
