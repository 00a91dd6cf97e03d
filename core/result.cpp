// SPDX-License-Identifier: Apache-2.0
#include "core/result.hpp"

#include <cstring>

namespace uvd::core {

std::string error::what() const {
  std::string reason = code ? std::strerror(code.value()) : std::string("success");
  if (message.empty()) return reason;
  if (message.find(reason) != std::string::npos) return message;
  return message + ": " + reason;
}

}  // namespace uvd::core
