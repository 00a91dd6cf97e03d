// SPDX-License-Identifier: Apache-2.0
#include "core/uri.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cctype>
#include <charconv>
#include <string>

namespace uvd::core {

namespace {

bool valid_scheme(std::string_view s) {
  if (s.empty() || !std::isalpha(static_cast<unsigned char>(s[0]))) return false;
  for (char c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '+' && c != '-' && c != '.' && c != '_') return false;
  return true;
}

}  // namespace

result<device_uri> parse_uri(std::string_view text, std::string_view default_transport) {
  if (text.empty()) return fail(EINVAL, "empty device address");
  device_uri u;
  std::string_view rest = text;
  auto colon = text.find(':');
  if (colon != std::string_view::npos && valid_scheme(text.substr(0, colon)) && text[0] != '/') {
    u.transport = std::string(text.substr(0, colon));
    rest = text.substr(colon + 1);
    if (rest.substr(0, 2) == "//") rest.remove_prefix(2);
  } else if (!default_transport.empty()) {
    u.transport = std::string(default_transport);
  } else {
    return fail(EINVAL, "'" + std::string(text) +
                            "' names no transport: write it as a URI (file:///path, memory:64M) or pass --transport");
  }
  auto q = rest.find('?');
  if (q != std::string_view::npos) {
    u.options = std::string(rest.substr(q + 1));
    rest = rest.substr(0, q);
  }
  u.target = std::string(rest);
  return u;
}

bool find_option(std::string_view options, std::string_view key, std::string* value) {
  while (!options.empty()) {
    auto amp = options.find('&');
    std::string_view kv = options.substr(0, amp);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
    auto eq = kv.find('=');
    std::string_view k = kv.substr(0, eq);
    if (k != key) continue;
    if (value) *value = eq == std::string_view::npos ? std::string("1") : std::string(kv.substr(eq + 1));
    return true;
  }
  return false;
}

result<uint64_t> parse_size(std::string_view text) {
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc() || p == text.data()) return fail(EINVAL, "'" + std::string(text) + "' is not a size");
  std::string_view suffix(p, text.data() + text.size() - p);
  unsigned shift = 0;
  if (suffix.empty() || suffix == "b" || suffix == "B") shift = 0;
  else if (suffix == "k" || suffix == "K" || suffix == "KiB") shift = 10;
  else if (suffix == "m" || suffix == "M" || suffix == "MiB") shift = 20;
  else if (suffix == "g" || suffix == "G" || suffix == "GiB") shift = 30;
  else if (suffix == "t" || suffix == "T" || suffix == "TiB") shift = 40;
  else return fail(EINVAL, "'" + std::string(text) + "': unknown size suffix (use k, M, G or T)");
  if (shift && n > (UINT64_MAX >> shift)) return fail(ERANGE, "'" + std::string(text) + "' is too large");
  return n << shift;
}

std::string sockaddr_text(const sockaddr* sa) {
  if (!sa) return "?";
  char host[INET6_ADDRSTRLEN] = "?";
  if (sa->sa_family == AF_INET) {
    auto* s4 = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(s4->sin_port));
  }
  if (sa->sa_family == AF_INET6) {
    auto* s6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(s6->sin6_port));
  }
  return "?";
}

}  // namespace uvd::core
