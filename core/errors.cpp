// SPDX-License-Identifier: Apache-2.0
#include "core/errors.hpp"

#include <cerrno>

namespace uvd::core {

error_class classify_error(int err) noexcept {
  if (err < 0) err = -err;
  switch (err) {
    case 0:
      return error_class::none;
    case ENOTCONN:
    case ECONNRESET:
    case ECONNREFUSED:
    case ECONNABORTED:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case EHOSTDOWN:
    case ENETUNREACH:
    case ENETDOWN:
    case ENETRESET:
    case ENODEV:
    case ENXIO:
    case ESHUTDOWN:
    case EPIPE:
    case ENOLINK:
    case ECOMM:
    case ETIME:
    case ESTALE:
      return error_class::path;
    default:
      return error_class::request;
  }
}

}  // namespace uvd::core
