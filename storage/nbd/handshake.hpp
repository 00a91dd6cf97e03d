// SPDX-License-Identifier: Apache-2.0
#pragma once
// The fixed newstyle handshake as a state machine over byte buffers: bytes
// from the client go in, replies come out, no I/O. It ends in transmission
// (with the chosen export) or closed (with the reason). The server feeds it
// from a socket; the fuzzer feeds it raw input.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "storage/nbd/protocol.hpp"

namespace uvd::storage::nbd {

// What a client can learn about one export.
struct export_desc {
  std::string name;
  std::string description;
  uint64_t size = 0;
  uint16_t tflags = NBD_FLAG_HAS_FLAGS;
  uint32_t min_block = 1;          // NBD_INFO_BLOCK_SIZE minimum (the Vstore's block size)
  uint32_t preferred_block = 4096;
  uint32_t max_block = 32u << 20;  // the maximum payload
};

// Bounds on what one client may make the server hold or do.
struct handshake_limits {
  uint32_t max_option_length = 16 * 1024;  // option data the server reads and parses
  uint32_t max_option_discard = 1u << 20;  // longer data is dropped (NBD_REP_ERR_TOO_BIG) up to this; past it, close
  uint32_t max_options = 256;              // options per connection before the server gives up
};

// Exports the handshake does not hold itself, found by name when a client
// asks for one (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME) and shown by
// NBD_OPT_LIST after the fixed ones.
class export_lookup {
 public:
  virtual ~export_lookup() = default;
  // The export called name (valid until the next lookup), or nullptr with
  // *error an NBD_REP_ERR_* and *message the reason for the client.
  virtual const export_desc* lookup(std::string_view name, uint32_t* error, std::string* message) = 0;
  virtual std::vector<export_desc> list() = 0;
};

class handshake {
 public:
  enum class phase : uint8_t { client_flags, option_header, option_data, option_discard, transmission, closed };

  // exports[0] is the default export (the one the empty name selects, unless
  // an export is called ""). The span must outlive the handshake.
  // more (may be null, must outlive the handshake) finds exports not in the span;
  // one it finds has export_index() == exports.size().
  explicit handshake(std::span<const export_desc> exports, handshake_limits limits = {},
                     export_lookup* more = nullptr);

  // The server's first words: NBDMAGIC, IHAVEOPT, handshake flags.
  void greet(std::vector<uint8_t>& out) const;

  // Consumes client bytes and appends the replies to out. Returns how many
  // bytes it consumed; it stops right after the option that ends the
  // handshake, so later bytes (early transmission requests) stay with the caller.
  size_t feed(std::span<const uint8_t> in, std::vector<uint8_t>& out);

  // The server is stopping: options other than NBD_OPT_ABORT now get
  // NBD_REP_ERR_SHUTDOWN, and NBD_OPT_EXPORT_NAME closes.
  void set_shutting_down() noexcept { shutting_down_ = true; }

  phase state() const noexcept { return phase_; }
  bool in_transmission() const noexcept { return phase_ == phase::transmission; }
  bool closed() const noexcept { return phase_ == phase::closed; }
  // True when the client ended it properly (NBD_OPT_ABORT), false for a
  // protocol violation or an unsatisfiable NBD_OPT_EXPORT_NAME.
  bool clean_close() const noexcept { return clean_close_; }
  const std::string& close_reason() const noexcept { return reason_; }
  // Index into the exports of the one chosen; valid in transmission.
  size_t export_index() const noexcept { return chosen_; }
  bool no_zeroes() const noexcept { return no_zeroes_; }
  uint32_t options_seen() const noexcept { return options_seen_; }

 private:
  bool collect(std::span<const uint8_t> in, size_t& used, size_t need);
  void on_client_flags();
  void on_option_header(std::vector<uint8_t>& out);
  void on_option(std::vector<uint8_t>& out);
  void on_info_or_go(std::vector<uint8_t>& out);
  void close(std::string reason, bool clean = false);
  const export_desc* find_export(std::string_view name, size_t* index);
  void reply(std::vector<uint8_t>& out, uint32_t type, std::span<const uint8_t> data = {}) const;
  void reply_error(std::vector<uint8_t>& out, uint32_t type, std::string_view message) const;
  void reply_info(std::vector<uint8_t>& out, uint16_t info, std::span<const uint8_t> data) const;

  std::span<const export_desc> exports_;
  handshake_limits limits_;
  export_lookup* more_ = nullptr;
  uint32_t lookup_error_ = 0;    // why the last find_export failed (NBD_REP_ERR_*)
  std::string lookup_message_;
  phase phase_ = phase::client_flags;
  std::vector<uint8_t> buf_;  // the record being collected
  uint32_t option_ = 0;
  uint32_t optlen_ = 0;
  uint32_t discard_left_ = 0;
  uint32_t options_seen_ = 0;
  size_t chosen_ = 0;
  bool no_zeroes_ = false;
  bool shutting_down_ = false;
  bool clean_close_ = false;
  std::string reason_;
};

}  // namespace uvd::storage::nbd
