// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one symbol a transport plugin exports. A plugin is a MODULE library
// named uvd-transport-<name>.so; everything in it but this entry is hidden.
#include <cstdint>

#include "core/veth_ops.hpp"
#include "core/vstore_ops.hpp"

namespace uvd::core {

inline constexpr uint32_t PLUGIN_ABI_VERSION = 1;

struct plugin_entry {
  uint32_t abi_version;  // PLUGIN_ABI_VERSION
  uint32_t struct_size;  // sizeof(plugin_entry)
  const char* name;      // must match the file name's <name>
  const vstore_ops* vstore;  // may be nullptr (a net-only transport)
  const veth_ops* veth;      // may be nullptr (a storage-only transport)
};

}  // namespace uvd::core

#define UVD_PLUGIN_ENTRY_SYMBOL "uvd_plugin_entry"

// Use once in a plugin's source: UVD_DEFINE_PLUGIN("file", &file_ops, nullptr)
#define UVD_DEFINE_PLUGIN(NAME, VSTORE, VETH)                                                   \
  extern "C" __attribute__((visibility("default"))) const ::uvd::core::plugin_entry*             \
  uvd_plugin_entry() {                                                                            \
    static constexpr ::uvd::core::plugin_entry entry{::uvd::core::PLUGIN_ABI_VERSION,            \
                                                     sizeof(::uvd::core::plugin_entry), NAME,    \
                                                     VSTORE, VETH};                              \
    return &entry;                                                                                \
  }
