// SPDX-License-Identifier: Apache-2.0
#pragma once
// result<T>: a value or an error (an errno-style code plus a human message),
// shaped like std::expected, which g++ 12 lacks in C++20.
#include <cerrno>
#include <string>
#include <system_error>
#include <utility>
#include <variant>

namespace uvd::core {

struct error {
  std::error_code code;
  std::string message;  // what happened, for a person; never parsed

  int errnum() const noexcept { return code.value(); }
  // "message: strerror" when the message does not already say it.
  std::string what() const;
};

inline error make_error(int errnum, std::string message) {
  return error{std::error_code(errnum < 0 ? -errnum : errnum, std::generic_category()), std::move(message)};
}

// Tag type so that `return fail(EINVAL, "...")` converts into any result<T>.
struct unexpected {
  error err;
};
inline unexpected fail(int errnum, std::string message) { return unexpected{make_error(errnum, std::move(message))}; }
inline unexpected fail(error e) { return unexpected{std::move(e)}; }

template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  result(unexpected u) : v_(std::in_place_index<1>, std::move(u.err)) {}

  bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const error& err() const& { return std::get<1>(v_); }
  error&& err() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, error> v_;
};

template <>
class [[nodiscard]] result<void> {
 public:
  result() = default;
  result(unexpected u) : err_(std::move(u.err)), ok_(false) {}

  bool has_value() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const error& err() const& { return err_; }
  error&& err() && { return std::move(err_); }

 private:
  error err_;
  bool ok_ = true;
};

inline result<void> ok() { return {}; }

}  // namespace uvd::core
