// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device addresses: "file:///img?direct=1", "rdma://host:port/export",
// "memory:64M", or a bare target used with an explicit transport name.
#include <sys/socket.h>

#include <string>
#include <string_view>

#include "core/result.hpp"

namespace uvd::core {

struct device_uri {
  std::string transport;  // scheme, e.g. "file"
  std::string target;     // what the transport opens, e.g. "/img"
  std::string options;    // query string without '?', e.g. "direct=1&ro=1"
};

// Splits "scheme://target?options" or "scheme:target?options". A string with
// no scheme is an error unless default_transport is given, in which case the
// whole string (less "?options") is the target.
result<device_uri> parse_uri(std::string_view text, std::string_view default_transport = {});

// Value of key in an "a=1&b=2" option string; nullopt-like empty + found flag.
bool find_option(std::string_view options, std::string_view key, std::string* value);

// "64M", "1G", "4096", "512k" -> bytes. Errors name the bad text.
result<uint64_t> parse_size(std::string_view text);

// An IPv4 or IPv6 socket address as "10.0.0.1:7171" or "[fe80::1]:7171";
// "?" for null or another family.
std::string sockaddr_text(const sockaddr* sa);

}  // namespace uvd::core
