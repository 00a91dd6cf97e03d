// SPDX-License-Identifier: Apache-2.0
// Exports opened on demand through server_options::resolver (connection.hpp).
#include <cerrno>

#include "storage/nbd/connection.hpp"

namespace uvd::storage::nbd::detail {

const export_desc* dynamic_exports::lookup(std::string_view name, uint32_t* error, std::string* message) {
  if (state_ && state_->cfg.name == name) return &desc_;
  // Another name: let go of the previous one first (INFO on one, GO on another).
  state_.reset();
  hold_.reset();
  auto r = shared_.opts.resolver->resolve(name, who_);
  if (!r) {
    const int e = r.err().errnum();
    *error = e == EINVAL || e == EPERM || e == EACCES ? NBD_REP_ERR_POLICY : NBD_REP_ERR_UNKNOWN;
    *message = r.err().message.substr(0, 1024);
    return nullptr;
  }
  if (!r->cfg.disk) {
    *error = NBD_REP_ERR_UNKNOWN;
    *message = "export '" + std::string(name.substr(0, 256)) + "' has no disk";
    return nullptr;
  }
  auto st = std::make_unique<export_state>();
  export_desc d;
  r->cfg.name = std::string(name);
  if (auto ok = describe_export(r->cfg, shared_.opts, *st, d); !ok) {
    *error = NBD_REP_ERR_UNKNOWN;
    *message = ok.err().message;
    return nullptr;
  }
  state_ = std::move(st);
  desc_ = std::move(d);
  hold_ = std::move(r->hold);
  return &desc_;
}

std::vector<export_desc> dynamic_exports::list() {
  std::vector<export_desc> out;
  for (auto& [name, description] : shared_.opts.resolver->list()) {
    if (name.size() > NBD_MAX_STRING) continue;
    export_desc d;
    d.name = name;
    d.description = description.substr(0, NBD_MAX_STRING);
    out.push_back(std::move(d));
  }
  return out;
}

}  // namespace uvd::storage::nbd::detail
