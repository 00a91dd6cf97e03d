// SPDX-License-Identifier: Apache-2.0
// Grants and event channels on real Xen (see real.hpp).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
// The Xen tool library headers have no C++ guards.
extern "C" {
#include <xenevtchn.h>
#include <xengnttab.h>
}

#include <cstring>
#include <vector>

#include "transports/xen/real/real.hpp"

namespace uvd::xen::real {

namespace {

// A device node the Xen libraries need: a clear error before they print theirs.
core::result<void> need_device(const char* path, const char* module) {
  if (::access(path, R_OK | W_OK) == 0) return core::ok();
  int e = errno;
  return sys_fail(e, std::string("real Xen: ") + path + " not usable (not running on Xen, or the " + module +
                         " module is not loaded, or no permission)");
}

// Handles shared by the hypervisor and every object it made, so objects may
// outlive the hypervisor object itself.
struct gntshr_handle {
  xengntshr_handle* h;
  explicit gntshr_handle(xengntshr_handle* x) : h(x) {}
  ~gntshr_handle() { xengntshr_close(h); }
};
struct gnttab_handle {
  xengnttab_handle* h;
  explicit gnttab_handle(xengnttab_handle* x) : h(x) {}
  ~gnttab_handle() { xengnttab_close(h); }
};

class xen_granted final : public granted_pages {
 public:
  xen_granted(std::shared_ptr<gntshr_handle> g, void* addr, std::vector<uint32_t> refs, domid_t peer, bool writable)
      : g_(std::move(g)), addr_(addr), refs_(std::move(refs)), peer_(peer), writable_(writable) {}
  // Unmapping drops gntalloc's last hold on the pages; the kernel then ends
  // foreign access, deferring the free while the peer still has them mapped.
  ~xen_granted() override { (void)xengntshr_unshare(g_->h, addr_, static_cast<uint32_t>(refs_.size())); }

  void* addr() const override { return addr_; }
  size_t count() const override { return refs_.size(); }
  grant_ref_t ref(size_t page) const override { return refs_.at(page); }
  domid_t peer() const override { return peer_; }
  bool writable() const override { return writable_; }

 private:
  std::shared_ptr<gntshr_handle> g_;
  void* addr_;
  std::vector<uint32_t> refs_;
  domid_t peer_;
  bool writable_;
};

class xen_mapping final : public foreign_mapping {
 public:
  xen_mapping(std::shared_ptr<gnttab_handle> g, void* addr, size_t count, bool writable)
      : g_(std::move(g)), addr_(addr), count_(count), writable_(writable) {}
  ~xen_mapping() override { (void)xengnttab_unmap(g_->h, addr_, static_cast<uint32_t>(count_)); }

  void* addr() const override { return addr_; }
  size_t count() const override { return count_; }
  bool writable() const override { return writable_; }

 private:
  std::shared_ptr<gnttab_handle> g_;
  void* addr_;
  size_t count_;
  bool writable_;
};

// Each channel has its own /dev/xen/evtchn handle: the contract gives every
// channel its own descriptor, and a handle's pending() would otherwise hand
// one channel's events to another's waiter.
class xen_channel final : public event_channel {
 public:
  xen_channel(xenevtchn_handle* h, evtchn_port_t port, domid_t peer) : h_(h), port_(port), peer_(peer) {}
  ~xen_channel() override {
    (void)xenevtchn_unbind(h_, port_);
    xenevtchn_close(h_);
  }
  xen_channel(const xen_channel&) = delete;
  xen_channel& operator=(const xen_channel&) = delete;

  evtchn_port_t local_port() const override { return port_; }
  domid_t peer() const override { return peer_; }

  core::result<void> notify() override {
    if (xenevtchn_notify(h_, port_) < 0) return sys_fail(errno, "event channel notify port " + std::to_string(port_));
    return core::ok();
  }

  int fd() const override { return xenevtchn_fd(h_); }

  core::result<bool> ack() override {
    // The descriptor is non-blocking, so pending() returns -1/EAGAIN once the
    // kernel's queue for this handle is empty. Linux masks a port when it
    // delivers it; unmask re-arms it.
    bool got = false;
    for (;;) {
      xenevtchn_port_or_error_t p = xenevtchn_pending(h_);
      if (p < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR) continue;
        return sys_fail(errno, "event channel pending port " + std::to_string(port_));
      }
      got = true;
      if (xenevtchn_unmask(h_, static_cast<evtchn_port_t>(p)) < 0)
        return sys_fail(errno, "event channel unmask port " + std::to_string(p));
    }
    return got;
  }

 private:
  xenevtchn_handle* h_;
  evtchn_port_t port_;
  domid_t peer_;
};

core::result<xenevtchn_handle*> open_evtchn() {
  xenevtchn_handle* h = xenevtchn_open(nullptr, 0);
  if (!h) return sys_fail(errno, "real Xen: cannot open /dev/xen/evtchn");
  int fd = xenevtchn_fd(h);
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    int e = errno;
    xenevtchn_close(h);
    return sys_fail(e, "real Xen: event channel descriptor");
  }
  return h;
}

class xen_hypervisor final : public hypervisor {
 public:
  xen_hypervisor(std::shared_ptr<gntshr_handle> shr, std::shared_ptr<gnttab_handle> tab, domid_t self)
      : shr_(std::move(shr)), tab_(std::move(tab)), self_(self) {}

  std::string_view kind() const override { return "xen"; }
  domid_t self_domid() const override { return self_; }

  core::result<std::unique_ptr<granted_pages>> grant_pages(domid_t peer, size_t count, bool writable) override {
    if (count == 0 || count > (1u << 20)) return core::fail(EINVAL, "grant_pages: bad page count");
    std::vector<uint32_t> refs(count);
    void* addr = xengntshr_share_pages(shr_->h, peer, static_cast<int>(count), refs.data(), writable ? 1 : 0);
    if (!addr)
      return sys_fail(errno, "grant " + std::to_string(count) + " pages to domain " + std::to_string(peer) +
                                 " (gntalloc; its `limit` parameter caps the pages one domain may grant)");
    return std::unique_ptr<granted_pages>(
        std::make_unique<xen_granted>(shr_, addr, std::move(refs), peer, writable));
  }

  core::result<std::unique_ptr<foreign_mapping>> map_grants(domid_t granter, std::span<const grant_ref_t> refs,
                                                            bool writable) override {
    if (refs.empty() || refs.size() > (1u << 20)) return core::fail(EINVAL, "map_grants: bad page count");
    // gntdev refuses the whole mmap if Xen refuses any single grant (unknown
    // ref, another domain's, read-only asked writable): never a partial map.
    void* addr = xengnttab_map_domain_grant_refs(tab_->h, static_cast<uint32_t>(refs.size()), granter,
                                                 const_cast<uint32_t*>(refs.data()),
                                                 PROT_READ | (writable ? PROT_WRITE : 0));
    if (!addr) {
      int e = errno;
      if (e == EFAULT || e == 0) e = EINVAL;  // gntdev's word for "Xen refused a grant"
      return sys_fail(e, "map " + std::to_string(refs.size()) + " grants of domain " + std::to_string(granter) +
                             (writable ? " writable" : " read-only"));
    }
    return std::unique_ptr<foreign_mapping>(std::make_unique<xen_mapping>(tab_, addr, refs.size(), writable));
  }

  core::result<std::unique_ptr<event_channel>> alloc_unbound(domid_t peer) override {
    auto h = open_evtchn();
    if (!h) return core::fail(std::move(h).err());
    xenevtchn_port_or_error_t p = xenevtchn_bind_unbound_port(*h, peer);
    if (p < 0) {
      int e = errno;
      xenevtchn_close(*h);
      return sys_fail(e, "event channel for domain " + std::to_string(peer));
    }
    return std::unique_ptr<event_channel>(
        std::make_unique<xen_channel>(*h, static_cast<evtchn_port_t>(p), peer));
  }

  core::result<std::unique_ptr<event_channel>> bind_interdomain(domid_t peer, evtchn_port_t remote_port) override {
    auto h = open_evtchn();
    if (!h) return core::fail(std::move(h).err());
    xenevtchn_port_or_error_t p = xenevtchn_bind_interdomain(*h, peer, remote_port);
    if (p < 0) {
      int e = errno;
      xenevtchn_close(*h);
      return sys_fail(e, "bind event channel port " + std::to_string(remote_port) + " of domain " +
                             std::to_string(peer));
    }
    return std::unique_ptr<event_channel>(
        std::make_unique<xen_channel>(*h, static_cast<evtchn_port_t>(p), peer));
  }

  core::result<std::unique_ptr<store>> open_store() override { return open_xenstore(); }

 private:
  std::shared_ptr<gntshr_handle> shr_;
  std::shared_ptr<gnttab_handle> tab_;
  domid_t self_;
};

}  // namespace

}  // namespace uvd::xen::real

namespace uvd::xen {

core::result<std::unique_ptr<hypervisor>> open_real_hypervisor() {
  using namespace real;
  for (auto [dev, mod] : {std::pair{"/dev/xen/gntalloc", "xen-gntalloc"}, std::pair{"/dev/xen/gntdev", "xen-gntdev"},
                          std::pair{"/dev/xen/evtchn", "xen-evtchn"}}) {
    if (auto r = need_device(dev, mod); !r) return core::fail(std::move(r).err());
  }
  xengntshr_handle* shr = xengntshr_open(nullptr, 0);
  if (!shr) return sys_fail(errno, "real Xen: cannot open /dev/xen/gntalloc");
  auto shr_h = std::make_shared<gntshr_handle>(shr);
  xengnttab_handle* tab = xengnttab_open(nullptr, 0);
  if (!tab) return sys_fail(errno, "real Xen: cannot open /dev/xen/gntdev");
  auto tab_h = std::make_shared<gnttab_handle>(tab);
  // Old gntdev drivers cap each open file's mappings low; ask for plenty (a
  // newer driver ignores this and has only its global limit).
  (void)xengnttab_set_max_grants(tab, 65536);
  auto st = open_xenstore();
  if (!st) return core::fail(std::move(st).err());
  auto self = find_self_domid(**st);
  if (!self) return core::fail(std::move(self).err());
  return std::unique_ptr<hypervisor>(std::make_unique<xen_hypervisor>(shr_h, tab_h, *self));
}

}  // namespace uvd::xen
