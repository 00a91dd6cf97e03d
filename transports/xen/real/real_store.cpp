// SPDX-License-Identifier: Apache-2.0
// The store over libxenstore. libxenstore reports through errno (ENOENT for a
// missing node, EAGAIN for a conflicting transaction, EACCES for permissions),
// which is what hv.hpp promises, so errors pass through with the path added.
// The Xen tool library headers have no C++ guards.
extern "C" {
#include <xenstore.h>
}

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "transports/xen/real/real.hpp"

namespace uvd::xen::real {

namespace {

// libxenstore's allocations are malloc'd.
struct free_deleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
template <class T>
using c_ptr = std::unique_ptr<T, free_deleter>;

// libxenstore takes NUL-terminated strings.
std::string z(std::string_view s) { return std::string(s); }

class xs_store final : public store {
 public:
  explicit xs_store(xs_handle* h) : h_(h) {}
  ~xs_store() override { xs_close(h_); }
  xs_store(const xs_store&) = delete;
  xs_store& operator=(const xs_store&) = delete;

  core::result<std::string> read(txn_t t, std::string_view path) override {
    unsigned int len = 0;
    c_ptr<char> v(static_cast<char*>(xs_read(h_, t, z(path).c_str(), &len)));
    if (!v) return sys_fail(errno, "xenstore read " + z(path));
    return std::string(v.get(), len);
  }

  core::result<void> write(txn_t t, std::string_view path, std::string_view value) override {
    if (!xs_write(h_, t, z(path).c_str(), value.data(), static_cast<unsigned int>(value.size())))
      return sys_fail(errno, "xenstore write " + z(path));
    return core::ok();
  }

  core::result<void> mkdir(txn_t t, std::string_view path) override {
    if (!xs_mkdir(h_, t, z(path).c_str())) return sys_fail(errno, "xenstore mkdir " + z(path));
    return core::ok();
  }

  core::result<void> rm(txn_t t, std::string_view path) override {
    // xenstored removes a missing node silently (xs_rm succeeds); the contract
    // says ENOENT, so look first, inside the same transaction.
    unsigned int len = 0;
    c_ptr<char> v(static_cast<char*>(xs_read(h_, t, z(path).c_str(), &len)));
    if (!v && errno == ENOENT) return sys_fail(ENOENT, "xenstore rm " + z(path));
    if (!xs_rm(h_, t, z(path).c_str())) return sys_fail(errno, "xenstore rm " + z(path));
    return core::ok();
  }

  core::result<std::vector<std::string>> directory(txn_t t, std::string_view path) override {
    unsigned int n = 0;
    c_ptr<char*> v(xs_directory(h_, t, z(path).c_str(), &n));
    if (!v) return sys_fail(errno, "xenstore directory " + z(path));
    std::vector<std::string> out;
    out.reserve(n);
    for (unsigned int i = 0; i < n; ++i) out.emplace_back(v.get()[i]);
    return out;
  }

  core::result<void> set_perms(txn_t t, std::string_view path, std::span<const store_perm> perms) override {
    if (perms.empty()) return core::fail(EINVAL, "xenstore set_perms " + z(path) + ": no owner given");
    std::vector<xs_permissions> p(perms.size());
    for (size_t i = 0; i < perms.size(); ++i) {
      p[i].id = perms[i].domid;
      p[i].perms = (perms[i].read ? XS_PERM_READ : 0u) | (perms[i].write ? XS_PERM_WRITE : 0u);
    }
    if (!xs_set_permissions(h_, t, z(path).c_str(), p.data(), static_cast<unsigned int>(p.size())))
      return sys_fail(errno, "xenstore set_perms " + z(path));
    return core::ok();
  }

  core::result<txn_t> transaction_start() override {
    xs_transaction_t t = xs_transaction_start(h_);
    if (t == XBT_NULL) return sys_fail(errno, "xenstore transaction start");
    return static_cast<txn_t>(t);
  }

  core::result<void> transaction_end(txn_t t, bool commit) override {
    if (!xs_transaction_end(h_, t, !commit)) {
      int e = errno;
      return sys_fail(e, e == EAGAIN ? "xenstore transaction conflicted" : "xenstore transaction end");
    }
    return core::ok();
  }

  core::result<void> watch(std::string_view path, std::string_view token) override {
    if (!xs_watch(h_, z(path).c_str(), z(token).c_str())) return sys_fail(errno, "xenstore watch " + z(path));
    return core::ok();
  }

  core::result<void> unwatch(std::string_view path, std::string_view token) override {
    if (!xs_unwatch(h_, z(path).c_str(), z(token).c_str())) return sys_fail(errno, "xenstore unwatch " + z(path));
    return core::ok();
  }

  int watch_fd() const override { return xs_fileno(h_); }

  core::result<std::optional<store_watch_event>> read_watch() override {
    c_ptr<char*> v(xs_check_watch(h_));
    if (!v) {
      if (errno == EAGAIN) return std::optional<store_watch_event>{};
      return sys_fail(errno, "xenstore watch events");
    }
    return std::optional<store_watch_event>{store_watch_event{v.get()[XS_WATCH_PATH], v.get()[XS_WATCH_TOKEN]}};
  }

 private:
  xs_handle* h_;
};

}  // namespace

core::unexpected sys_fail(int e, const std::string& what) {
  if (e == 0) e = EIO;  // a library that failed without saying why
  return core::fail(e, what + ": " + std::strerror(e));
}

core::result<std::unique_ptr<store>> open_xenstore() {
  xs_handle* h = xs_open(0);
  if (!h) {
    int e = errno;
    return sys_fail(e, "cannot connect to xenstore (is xenstored running and /dev/xen/xenbus present?)");
  }
  // xs_fileno() starts libxenstore's reader thread and its watch pipe; do it now
  // so a failure shows here rather than as an fd of -1 later.
  if (xs_fileno(h) < 0) {
    int e = errno;
    xs_close(h);
    return sys_fail(e, "xenstore: cannot set up watch delivery");
  }
  return std::unique_ptr<store>(std::make_unique<xs_store>(h));
}

core::result<domid_t> find_self_domid(store& s) {
  std::ifstream caps("/proc/xen/capabilities");
  std::string word;
  while (caps >> word)
    if (word == "control_d") return domid_t{0};
  auto v = s.read(no_txn, "domid");
  if (!v) return core::fail(v.err().errnum(), "cannot find our domain id: " + v.err().what());
  char* end = nullptr;
  unsigned long n = std::strtoul(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || n >= 0x7ff0)  // DOMID_FIRST_RESERVED
    return core::fail(EINVAL, "xenstore domid is not a domain id: \"" + *v + "\"");
  return static_cast<domid_t>(n);
}

}  // namespace uvd::xen::real
