// SPDX-License-Identifier: Apache-2.0
#include "transports/xen/local/store_tree.hpp"

#include <algorithm>

namespace uvd::xen::local {

namespace {

// xenstore's limits (xs_wire.h: XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX),
// and bounds on what one connection may hold so a hostile domain cannot grow
// the hub without limit.
constexpr size_t path_max = 3072;
constexpr size_t value_max = 4096;
constexpr size_t txns_per_conn = 16;
constexpr size_t watches_per_conn = 128;

// "/a/b/c" -> {"a","b","c"}; "/" -> {}.
std::vector<std::string_view> split(std::string_view p) {
  std::vector<std::string_view> out;
  size_t i = 1;
  while (i < p.size()) {
    size_t j = p.find('/', i);
    if (j == std::string_view::npos) j = p.size();
    out.push_back(p.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

// Is `inner` equal to `outer` or below it, component-wise?
bool under(std::string_view inner, std::string_view outer) {
  if (outer == "/") return true;
  if (inner.size() < outer.size() || inner.compare(0, outer.size(), outer) != 0) return false;
  return inner.size() == outer.size() || inner[outer.size()] == '/';
}

}  // namespace

std::unique_ptr<store_tree::node> store_tree::node::clone() const {
  auto n = std::make_unique<node>();
  n->value = value;
  n->perms = perms;
  for (const auto& [k, c] : children) n->children.emplace(k, c->clone());
  return n;
}

store_tree::store_tree() : root_(std::make_unique<node>()) {
  root_->perms = {{0, false, false}};
  auto local = create(root_.get(), 0, "/local/domain");
  (void)local;
}

bool store_tree::valid_path(std::string_view p) {
  if (p.empty() || p.size() > path_max || p[0] != '/') return false;
  if (p.size() > 1 && p.back() == '/') return false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
              c == '@' || c == '/';
    if (!ok) return false;
    if (c == '/' && i + 1 < p.size() && p[i + 1] == '/') return false;
  }
  return true;
}

bool store_tree::can(const node& n, domid_t dom, bool write) {
  if (dom == 0) return true;
  if (n.perms.empty()) return false;
  if (n.perms[0].domid == dom) return true;
  for (size_t i = 1; i < n.perms.size(); ++i)
    if (n.perms[i].domid == dom) return write ? n.perms[i].write : n.perms[i].read;
  return write ? n.perms[0].write : n.perms[0].read;
}

store_tree::node* store_tree::find(node* root, std::string_view path, node** parent) {
  node* n = root;
  node* p = nullptr;
  for (auto comp : split(path)) {
    auto it = n->children.find(comp);
    if (it == n->children.end()) return nullptr;
    p = n;
    n = it->second.get();
  }
  if (parent) *parent = p;
  return n;
}

// mkdir -p: the deepest existing ancestor must be writable by dom; new nodes
// inherit their parent's permissions, owned by the creating domain.
core::result<store_tree::node*> store_tree::create(node* root, domid_t dom, std::string_view path) {
  node* n = root;
  auto comps = split(path);
  size_t i = 0;
  for (; i < comps.size(); ++i) {
    auto it = n->children.find(comps[i]);
    if (it == n->children.end()) break;
    n = it->second.get();
  }
  if (i == comps.size()) return n;
  if (!can(*n, dom, true)) return core::fail(EACCES, "store: domain " + std::to_string(dom) + " may not create " +
                                                         std::string(path));
  for (; i < comps.size(); ++i) {
    auto c = std::make_unique<node>();
    c->perms = n->perms;
    if (dom != 0) c->perms[0].domid = dom;
    node* raw = c.get();
    n->children.emplace(std::string(comps[i]), std::move(c));
    n = raw;
  }
  return n;
}

core::result<store_tree::node*> store_tree::root_for(uint64_t conn, txn_t t, std::vector<std::string>** log) {
  if (t == no_txn) {
    *log = nullptr;
    return root_.get();
  }
  auto it = txns_.find(t);
  if (it == txns_.end() || it->second.conn != conn) return core::fail(ENOENT, "store: no such transaction");
  *log = &it->second.changed;
  return it->second.root.get();
}

void store_tree::changed(std::vector<std::string>* log, std::string_view path) {
  if (log) {
    log->emplace_back(path);
    return;
  }
  ++generation_;
  fire(std::string(path));
}

void store_tree::fire(const std::string& path) {
  if (!on_watch) return;
  for (const auto& w : watches_) {
    if (under(path, w.path))
      on_watch(w.conn, path, w.token);
    else if (under(w.path, path))  // a removed subtree takes the watched node with it
      on_watch(w.conn, w.path, w.token);
  }
}

#define UVD_STORE_ROOT(conn, t)                \
  std::vector<std::string>* log = nullptr;     \
  auto rr = root_for(conn, t, &log);           \
  if (!rr) return core::fail(std::move(rr).err()); \
  node* root = *rr

core::result<std::string> store_tree::read(uint64_t conn, domid_t dom, txn_t t, std::string_view path) {
  if (!valid_path(path)) return core::fail(EINVAL, "store: bad path");
  UVD_STORE_ROOT(conn, t);
  node* n = find(root, path);
  if (!n) return core::fail(ENOENT, "store: " + std::string(path) + ": no such node");
  if (!can(*n, dom, false)) return core::fail(EACCES, "store: " + std::string(path) + ": not readable");
  return n->value;
}

core::result<void> store_tree::write(uint64_t conn, domid_t dom, txn_t t, std::string_view path,
                                     std::string_view value) {
  if (!valid_path(path) || path == "/") return core::fail(EINVAL, "store: bad path");
  if (value.size() > value_max) return core::fail(E2BIG, "store: value too long");
  UVD_STORE_ROOT(conn, t);
  node* n = find(root, path);
  if (n && !can(*n, dom, true)) return core::fail(EACCES, "store: " + std::string(path) + ": not writable");
  if (!n) {
    auto c = create(root, dom, path);
    if (!c) return core::fail(std::move(c).err());
    n = *c;
  }
  n->value.assign(value);
  changed(log, path);
  return core::ok();
}

core::result<void> store_tree::mkdir(uint64_t conn, domid_t dom, txn_t t, std::string_view path) {
  if (!valid_path(path)) return core::fail(EINVAL, "store: bad path");
  UVD_STORE_ROOT(conn, t);
  if (find(root, path)) return core::ok();
  auto c = create(root, dom, path);
  if (!c) return core::fail(std::move(c).err());
  changed(log, path);
  return core::ok();
}

core::result<void> store_tree::rm(uint64_t conn, domid_t dom, txn_t t, std::string_view path) {
  if (!valid_path(path) || path == "/") return core::fail(EINVAL, "store: bad path");
  UVD_STORE_ROOT(conn, t);
  node* parent = nullptr;
  node* n = find(root, path, &parent);
  if (!n) return core::fail(ENOENT, "store: " + std::string(path) + ": no such node");
  if (!can(*n, dom, true)) return core::fail(EACCES, "store: " + std::string(path) + ": not writable");
  parent->children.erase(parent->children.find(split(path).back()));
  changed(log, path);
  return core::ok();
}

core::result<std::vector<std::string>> store_tree::directory(uint64_t conn, domid_t dom, txn_t t,
                                                             std::string_view path) {
  if (!valid_path(path)) return core::fail(EINVAL, "store: bad path");
  UVD_STORE_ROOT(conn, t);
  (void)log;
  node* n = find(root, path);
  if (!n) return core::fail(ENOENT, "store: " + std::string(path) + ": no such node");
  if (!can(*n, dom, false)) return core::fail(EACCES, "store: " + std::string(path) + ": not readable");
  std::vector<std::string> out;
  for (const auto& [k, c] : n->children) out.push_back(k);
  return out;
}

core::result<void> store_tree::set_perms(uint64_t conn, domid_t dom, txn_t t, std::string_view path,
                                         std::vector<store_perm> perms) {
  if (!valid_path(path) || perms.empty() || perms.size() > 64) return core::fail(EINVAL, "store: bad permissions");
  UVD_STORE_ROOT(conn, t);
  node* n = find(root, path);
  if (!n) return core::fail(ENOENT, "store: " + std::string(path) + ": no such node");
  if (dom != 0 && n->perms[0].domid != dom)
    return core::fail(EACCES, "store: " + std::string(path) + ": only its owner may change permissions");
  n->perms = std::move(perms);
  changed(log, path);
  return core::ok();
}

#undef UVD_STORE_ROOT

core::result<txn_t> store_tree::transaction_start(uint64_t conn) {
  size_t mine = std::count_if(txns_.begin(), txns_.end(), [&](const auto& kv) { return kv.second.conn == conn; });
  if (mine >= txns_per_conn) return core::fail(EBUSY, "store: too many open transactions");
  txn_t id = next_txn_++;
  if (next_txn_ == 0) next_txn_ = 1;
  txns_.emplace(id, txn{conn, generation_, root_->clone(), {}});
  return id;
}

core::result<void> store_tree::transaction_end(uint64_t conn, txn_t t, bool commit) {
  auto it = txns_.find(t);
  if (it == txns_.end() || it->second.conn != conn) return core::fail(ENOENT, "store: no such transaction");
  txn tx = std::move(it->second);
  txns_.erase(it);
  if (!commit) return core::ok();
  if (tx.base_generation != generation_) return core::fail(EAGAIN, "store: transaction conflicted");
  if (tx.changed.empty()) return core::ok();
  root_ = std::move(tx.root);
  ++generation_;
  for (const auto& p : tx.changed) fire(p);
  return core::ok();
}

core::result<void> store_tree::watch(uint64_t conn, std::string_view path, std::string_view token) {
  if (!valid_path(path) || token.size() > 256) return core::fail(EINVAL, "store: bad watch");
  size_t mine = 0;
  for (const auto& w : watches_) {
    if (w.conn != conn) continue;
    if (w.path == path && w.token == token) return core::fail(EEXIST, "store: watch exists");
    ++mine;
  }
  if (mine >= watches_per_conn) return core::fail(E2BIG, "store: too many watches");
  watches_.push_back({conn, std::string(path), std::string(token)});
  if (on_watch) on_watch(conn, std::string(path), std::string(token));  // xenstore fires a new watch once
  return core::ok();
}

core::result<void> store_tree::unwatch(uint64_t conn, std::string_view path, std::string_view token) {
  auto it = std::find_if(watches_.begin(), watches_.end(),
                         [&](const watch_entry& w) { return w.conn == conn && w.path == path && w.token == token; });
  if (it == watches_.end()) return core::fail(ENOENT, "store: no such watch");
  watches_.erase(it);
  return core::ok();
}

void store_tree::drop_connection(uint64_t conn) {
  std::erase_if(watches_, [&](const watch_entry& w) { return w.conn == conn; });
  std::erase_if(txns_, [&](const auto& kv) { return kv.second.conn == conn; });
}

}  // namespace uvd::xen::local
