// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one explicit list of in-tree transports and storage layers linked into
// uvd. Out-of-tree transports arrive as plugins instead (core/plugin.hpp).
#include <memory>

#include "core/registry.hpp"

namespace uvd::transports {

void add_builtin(core::registry& reg);

// A registry with the builtins and the default plugin folders.
std::unique_ptr<core::registry> make_default_registry();

}  // namespace uvd::transports
