// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one place that sorts errors. A *path* error means the way to the medium
// failed (connection lost, timeout, device gone): multipath fails over and
// reissues. A *request/media* error is the medium's answer to this request
// (EIO, EINVAL, ENOSPC, EROFS...): it goes back to the caller unchanged,
// because another path would give the same answer.
namespace uvd::core {

enum class error_class { none, path, request };

// err: an errno, positive or negative; 0 is none.
error_class classify_error(int err) noexcept;
inline bool is_path_error(int err) noexcept { return classify_error(err) == error_class::path; }

}  // namespace uvd::core
