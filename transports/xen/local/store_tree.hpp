// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host-local store: xenstore's tree of nodes with values and per-node
// permissions, transactions and watches, as xenstored keeps them. Pure data
// structure; the hub serialises every call (one thread).
//
// Transactions are coarse, like the original xenstored's: a transaction works
// on a private copy of the tree, and commits only if no other commit happened
// since it started; otherwise transaction_end fails with EAGAIN and the
// caller retries (with_transaction()). Watches fire after a commit.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.hpp"
#include "transports/xen/hv.hpp"

namespace uvd::xen::local {

class store_tree {
 public:
  store_tree();

  // Every call acts for domain `dom` (permissions) in transaction t (0: none).
  // A transaction belongs to the connection that started it: `conn`.
  core::result<std::string> read(uint64_t conn, domid_t dom, txn_t t, std::string_view path);
  core::result<void> write(uint64_t conn, domid_t dom, txn_t t, std::string_view path, std::string_view value);
  core::result<void> mkdir(uint64_t conn, domid_t dom, txn_t t, std::string_view path);
  core::result<void> rm(uint64_t conn, domid_t dom, txn_t t, std::string_view path);
  core::result<std::vector<std::string>> directory(uint64_t conn, domid_t dom, txn_t t, std::string_view path);
  core::result<void> set_perms(uint64_t conn, domid_t dom, txn_t t, std::string_view path,
                               std::vector<store_perm> perms);

  core::result<txn_t> transaction_start(uint64_t conn);
  core::result<void> transaction_end(uint64_t conn, txn_t t, bool commit);

  core::result<void> watch(uint64_t conn, std::string_view path, std::string_view token);
  core::result<void> unwatch(uint64_t conn, std::string_view path, std::string_view token);

  // Forget a closed connection's transactions and watches.
  void drop_connection(uint64_t conn);

  // Called for every watch that fires: (connection, node path, token).
  std::function<void(uint64_t, const std::string&, const std::string&)> on_watch;

  // A syntactically valid absolute path (xenstore's rules, bounded length).
  static bool valid_path(std::string_view p);

 private:
  struct node {
    std::string value;
    std::vector<store_perm> perms;  // [0]: owner and default
    std::map<std::string, std::unique_ptr<node>, std::less<>> children;
    std::unique_ptr<node> clone() const;
  };
  struct txn {
    uint64_t conn;
    uint64_t base_generation;
    std::unique_ptr<node> root;
    std::vector<std::string> changed;
  };
  struct watch_entry {
    uint64_t conn;
    std::string path, token;
  };

  core::result<node*> root_for(uint64_t conn, txn_t t, std::vector<std::string>** changed);
  static node* find(node* root, std::string_view path, node** parent = nullptr);
  static bool can(const node& n, domid_t dom, bool write);
  core::result<node*> create(node* root, domid_t dom, std::string_view path);
  void changed(std::vector<std::string>* log, std::string_view path);
  void fire(const std::string& path);

  std::unique_ptr<node> root_;
  uint64_t generation_ = 0;
  uint32_t next_txn_ = 1;
  std::map<txn_t, txn> txns_;
  std::vector<watch_entry> watches_;
};

}  // namespace uvd::xen::local
