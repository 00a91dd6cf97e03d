// SPDX-License-Identifier: Apache-2.0
#include "storage/nbd/handshake.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace uvd::storage::nbd {

handshake::handshake(std::span<const export_desc> exports, handshake_limits limits, export_lookup* more)
    : exports_(exports), limits_(limits), more_(more) {
  buf_.reserve(NBD_OPTION_HEADER_SIZE);
}

void handshake::greet(std::vector<uint8_t>& out) const {
  uint8_t g[NBD_GREETING_SIZE];
  store_be64(g, NBD_MAGIC);
  store_be64(g + 8, NBD_OPTS_MAGIC);
  store_be16(g + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  out.insert(out.end(), g, g + sizeof g);
}

void handshake::close(std::string reason, bool clean) {
  phase_ = phase::closed;
  reason_ = std::move(reason);
  clean_close_ = clean;
  buf_.clear();
}

// Moves input into buf_ until it holds `need` bytes. True when it does.
bool handshake::collect(std::span<const uint8_t> in, size_t& used, size_t need) {
  size_t take = std::min(need - buf_.size(), in.size() - used);
  buf_.insert(buf_.end(), in.begin() + static_cast<std::ptrdiff_t>(used),
              in.begin() + static_cast<std::ptrdiff_t>(used + take));
  used += take;
  return buf_.size() == need;
}

size_t handshake::feed(std::span<const uint8_t> in, std::vector<uint8_t>& out) {
  size_t used = 0;
  while (used < in.size()) {
    switch (phase_) {
      case phase::client_flags:
        if (!collect(in, used, 4)) return used;
        on_client_flags();
        break;
      case phase::option_header:
        if (!collect(in, used, NBD_OPTION_HEADER_SIZE)) return used;
        on_option_header(out);
        break;
      case phase::option_data:
        if (!collect(in, used, optlen_)) return used;
        on_option(out);
        break;
      case phase::option_discard: {
        size_t take = std::min<size_t>(discard_left_, in.size() - used);
        used += take;
        discard_left_ -= static_cast<uint32_t>(take);
        if (discard_left_ == 0) {
          reply_error(out, NBD_REP_ERR_TOO_BIG, "option data too long");
          phase_ = phase::option_header;
        }
        break;
      }
      case phase::transmission:
      case phase::closed:
        return used;
    }
  }
  return used;
}

void handshake::on_client_flags() {
  uint32_t flags = load_be32(buf_.data());
  buf_.clear();
  // Clients MUST NOT set other flags; the server MUST then drop the connection.
  if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    close("client set unknown handshake flags");
    return;
  }
  // A client without NBD_FLAG_C_FIXED_NEWSTYLE still gets fixed newstyle
  // replies (the protocol allows it); such clients send only EXPORT_NAME.
  no_zeroes_ = flags & NBD_FLAG_C_NO_ZEROES;
  phase_ = phase::option_header;
}

void handshake::on_option_header(std::vector<uint8_t>& out) {
  uint64_t magic = load_be64(buf_.data());
  option_ = load_be32(buf_.data() + 8);
  optlen_ = load_be32(buf_.data() + 12);
  buf_.clear();
  if (magic != NBD_OPTS_MAGIC) {
    close("bad option magic");
    return;
  }
  if (++options_seen_ > limits_.max_options) {
    close("too many options");
    return;
  }
  if (optlen_ > limits_.max_option_length) {
    // NBD_OPT_EXPORT_NAME cannot be answered with an error: close.
    if (option_ == NBD_OPT_EXPORT_NAME || optlen_ > limits_.max_option_discard) {
      close("option data too long (" + std::to_string(optlen_) + " bytes)");
      return;
    }
    discard_left_ = optlen_;
    phase_ = phase::option_discard;
    return;
  }
  buf_.reserve(optlen_);
  phase_ = phase::option_data;
  if (optlen_ == 0) on_option(out);
}

const export_desc* handshake::find_export(std::string_view name, size_t* index) {
  for (size_t i = 0; i < exports_.size(); ++i) {
    if (exports_[i].name == name) {
      *index = i;
      return &exports_[i];
    }
  }
  if (name.empty() && !exports_.empty()) {
    *index = 0;
    return &exports_[0];
  }
  lookup_error_ = NBD_REP_ERR_UNKNOWN;
  lookup_message_ = fmt::format("no export named '{}'", name.substr(0, 256));
  if (more_ && !name.empty()) {
    if (const export_desc* e = more_->lookup(name, &lookup_error_, &lookup_message_)) {
      *index = exports_.size();
      return e;
    }
  }
  return nullptr;
}

void handshake::reply(std::vector<uint8_t>& out, uint32_t type, std::span<const uint8_t> data) const {
  uint8_t h[NBD_OPTION_REPLY_HEADER_SIZE];
  store_be64(h, NBD_REP_MAGIC);
  store_be32(h + 8, option_);
  store_be32(h + 12, type);
  store_be32(h + 16, static_cast<uint32_t>(data.size()));
  out.insert(out.end(), h, h + sizeof h);
  out.insert(out.end(), data.begin(), data.end());
}

void handshake::reply_error(std::vector<uint8_t>& out, uint32_t type, std::string_view message) const {
  reply(out, type, {reinterpret_cast<const uint8_t*>(message.data()), message.size()});
}

void handshake::reply_info(std::vector<uint8_t>& out, uint16_t info, std::span<const uint8_t> data) const {
  std::vector<uint8_t> d(2 + data.size());
  store_be16(d.data(), info);
  if (!data.empty()) std::memcpy(d.data() + 2, data.data(), data.size());
  reply(out, NBD_REP_INFO, d);
}

void handshake::on_option(std::vector<uint8_t>& out) {
  // Whatever happens next, the option's data has been read in full.
  phase_ = phase::option_header;
  const std::string_view data(reinterpret_cast<const char*>(buf_.data()), buf_.size());

  if (shutting_down_ && option_ != NBD_OPT_ABORT) {
    if (option_ == NBD_OPT_EXPORT_NAME) {
      close("server is shutting down");
      return;
    }
    reply_error(out, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
    buf_.clear();
    return;
  }

  switch (option_) {
    case NBD_OPT_EXPORT_NAME: {
      size_t idx = 0;
      const export_desc* e = data.size() <= NBD_MAX_STRING ? find_export(data, &idx) : nullptr;
      if (!e) {
        // No way to report an error to this option: the session ends.
        close("NBD_OPT_EXPORT_NAME: " + (data.size() <= NBD_MAX_STRING ? lookup_message_ : "export name too long"));
        return;
      }
      uint8_t r[NBD_EXPORT_NAME_REPLY_SIZE] = {};
      store_be64(r, e->size);
      store_be16(r + 8, e->tflags);
      out.insert(out.end(), r, r + (no_zeroes_ ? 10 : sizeof r));
      chosen_ = idx;
      phase_ = phase::transmission;
      break;
    }
    case NBD_OPT_ABORT:
      // The reply is a courtesy: the client may already have gone.
      reply(out, NBD_REP_ACK);
      close("client sent NBD_OPT_ABORT", true);
      return;
    case NBD_OPT_LIST: {
      if (!data.empty()) {
        reply_error(out, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        break;
      }
      std::vector<export_desc> more;
      if (more_) more = more_->list();
      for (size_t i = 0; i < exports_.size() + more.size(); ++i) {
        const export_desc& e = i < exports_.size() ? exports_[i] : more[i - exports_.size()];
        std::vector<uint8_t> d(4 + e.name.size() + e.description.size());
        store_be32(d.data(), static_cast<uint32_t>(e.name.size()));
        std::memcpy(d.data() + 4, e.name.data(), e.name.size());
        std::memcpy(d.data() + 4 + e.name.size(), e.description.data(), e.description.size());
        reply(out, NBD_REP_SERVER, d);
      }
      reply(out, NBD_REP_ACK);
      break;
    }
    case NBD_OPT_STARTTLS:
      if (!data.empty()) reply_error(out, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
      else reply_error(out, NBD_REP_ERR_UNSUP, "TLS is not supported by this server");
      break;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      on_info_or_go(out);
      break;
    case NBD_OPT_STRUCTURED_REPLY:
      if (!data.empty()) reply_error(out, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
      else reply_error(out, NBD_REP_ERR_UNSUP, "structured replies are not supported");
      break;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      // Only valid after structured replies were negotiated, which they never are here.
      reply_error(out, NBD_REP_ERR_INVALID, "metadata contexts need structured replies");
      break;
    default:
      reply_error(out, NBD_REP_ERR_UNSUP, "unknown option");
      break;
  }
  buf_.clear();
}

// Data: 32-bit name length, name, 16-bit count of information requests, the requests.
void handshake::on_info_or_go(std::vector<uint8_t>& out) {
  const size_t len = buf_.size();
  const uint8_t* p = buf_.data();
  if (len < 6) {
    reply_error(out, NBD_REP_ERR_INVALID, "option data too short");
    return;
  }
  uint32_t namelen = load_be32(p);
  if (namelen > len - 6) {
    reply_error(out, NBD_REP_ERR_INVALID, "export name length exceeds the option data");
    return;
  }
  uint16_t n = load_be16(p + 4 + namelen);
  if (len != 4 + size_t{namelen} + 2 + 2 * size_t{n}) {
    reply_error(out, NBD_REP_ERR_INVALID, "information request count does not match the option length");
    return;
  }
  if (namelen > NBD_MAX_STRING) {
    reply_error(out, NBD_REP_ERR_TOO_BIG, "export name longer than 4096 bytes");
    return;
  }
  std::string_view name(reinterpret_cast<const char*>(p + 4), namelen);
  size_t idx = 0;
  const export_desc* e = find_export(name, &idx);
  if (!e) {
    reply_error(out, lookup_error_, lookup_message_);
    return;
  }

  bool want_name = false, want_description = false;
  for (uint16_t i = 0; i < n; ++i) {
    uint16_t info = load_be16(p + 4 + namelen + 2 + 2 * size_t{i});
    if (info == NBD_INFO_NAME) want_name = true;
    if (info == NBD_INFO_DESCRIPTION) want_description = true;
    // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; unknown ones are ignored.
  }

  uint8_t ex[10];
  store_be64(ex, e->size);
  store_be16(ex + 8, e->tflags);
  reply_info(out, NBD_INFO_EXPORT, ex);
  if (want_name) reply_info(out, NBD_INFO_NAME, {reinterpret_cast<const uint8_t*>(e->name.data()), e->name.size()});
  if (want_description && !e->description.empty())
    reply_info(out, NBD_INFO_DESCRIPTION,
               {reinterpret_cast<const uint8_t*>(e->description.data()), e->description.size()});
  uint8_t bs[12];
  store_be32(bs, e->min_block);
  store_be32(bs + 4, e->preferred_block);
  store_be32(bs + 8, e->max_block);
  reply_info(out, NBD_INFO_BLOCK_SIZE, bs);
  reply(out, NBD_REP_ACK);
  if (option_ == NBD_OPT_GO) {
    chosen_ = idx;
    phase_ = phase::transmission;
  }
}

}  // namespace uvd::storage::nbd
