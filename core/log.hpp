// SPDX-License-Identifier: Apache-2.0
#pragma once
// Logging goes through spdlog (stderr). This sets it up once per program.
#include <string_view>

#include "core/result.hpp"

namespace uvd::core {

// level: trace, debug, info, warn, error, off. Also honours $UVD_LOG_LEVEL
// when level is empty.
result<void> init_logging(std::string_view level = {});

}  // namespace uvd::core
