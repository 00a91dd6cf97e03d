// SPDX-License-Identifier: Apache-2.0
#include "core/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <string>

namespace uvd::core {

result<void> init_logging(std::string_view level) {
  std::string lv(level);
  if (lv.empty())
    if (const char* env = std::getenv("UVD_LOG_LEVEL")) lv = env;
  if (lv.empty()) lv = "info";
  auto parsed = spdlog::level::from_str(lv);
  if (parsed == spdlog::level::off && lv != "off")
    return fail(EINVAL, "unknown log level '" + lv + "' (trace, debug, info, warn, error, off)");
  auto logger = spdlog::get("uvd");
  if (!logger) logger = spdlog::stderr_color_mt("uvd");
  logger->set_pattern("%^%l%$ [%H:%M:%S.%e] %v");
  spdlog::set_default_logger(logger);
  spdlog::set_level(parsed);
  return ok();
}

}  // namespace uvd::core
