// SPDX-License-Identifier: Apache-2.0
#include "net/eth.hpp"

#include <fmt/format.h>

#include <random>

namespace uvd::net {

std::string mac_addr::to_string() const {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5]);
}

namespace {

core::unexpected not_a_mac(std::string_view text) {
  std::string msg(1, '\'');  // built piecewise: g++ 12 warns falsely (-Wrestrict) on "..." + string
  msg.append(text).append("' is not a MAC address (want 02:00:00:00:00:01)");
  return core::fail(EINVAL, msg);
}

}  // namespace

core::result<mac_addr> parse_mac(std::string_view text) {
  mac_addr m;
  size_t pos = 0;
  for (int i = 0; i < 6; ++i) {
    if (i > 0) {
      if (pos >= text.size() || (text[pos] != ':' && text[pos] != '-'))
        return not_a_mac(text);
      ++pos;
    }
    unsigned v = 0;
    int digits = 0;
    while (pos < text.size() && digits < 2 && std::isxdigit(static_cast<unsigned char>(text[pos]))) {
      char c = static_cast<char>(std::tolower(static_cast<unsigned char>(text[pos])));
      v = v * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : c - 'a' + 10);
      ++pos;
      ++digits;
    }
    if (digits == 0)
      return not_a_mac(text);
    m.b[i] = static_cast<uint8_t>(v);
  }
  if (pos != text.size())
    return not_a_mac(text);
  return m;
}

mac_addr random_mac() {
  std::random_device rd;
  mac_addr m;
  for (auto& x : m.b) x = static_cast<uint8_t>(rd());
  m.b[0] = static_cast<uint8_t>((m.b[0] & 0xfe) | 0x02);  // unicast, locally administered
  return m;
}

}  // namespace uvd::net
