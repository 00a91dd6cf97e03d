// SPDX-License-Identifier: Apache-2.0
// A domain's side of the host-local hypervisor (see local.hpp).
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <deque>
#include <mutex>

#include "transports/xen/local/local.hpp"
#include "transports/xen/local/local_proto.hpp"

namespace uvd::xen {

namespace {

using namespace local;

void close_all(std::vector<int>& fds) {
  for (int fd : fds)
    if (fd >= 0) ::close(fd);
  fds.clear();
}

std::string errtext(uint32_t op, int status) {
  return "host-local hypervisor: request " + std::to_string(op) + " refused (" + std::strerror(-status) + ")";
}

// The main connection, shared by the hypervisor and every object it made.
class channel {
 public:
  explicit channel(int fd) : fd_(fd) {}
  ~channel() { ::close(fd_); }

  // One request, its reply. Reply descriptors are owned by the caller.
  core::result<buf> call(uint32_t op, const buf& body, std::vector<int>& out_fds, const int* fds = nullptr,
                         size_t nfds = 0) {
    std::lock_guard lk(mu_);
    if (int r = send_msg(fd_, {op, 0}, body, fds, nfds); r < 0)
      return core::fail(-r, "host-local hypervisor: connection lost");
    msg_header h;
    buf b;
    int r = recv_msg(fd_, h, b, out_fds);
    if (r <= 0) {
      close_all(out_fds);
      return core::fail(r == 0 ? EPIPE : -r, "host-local hypervisor: connection lost");
    }
    if (h.op != op) {
      close_all(out_fds);
      return core::fail(EPROTO, "host-local hypervisor: reply out of order");
    }
    if (h.status < 0) {
      close_all(out_fds);
      return core::fail(-h.status, errtext(op, h.status));
    }
    return b;
  }
  core::result<buf> call(uint32_t op, const buf& body) {
    std::vector<int> fds;
    auto r = call(op, body, fds);
    close_all(fds);
    return r;
  }

 private:
  std::mutex mu_;
  int fd_;
};

class local_granted final : public granted_pages {
 public:
  local_granted(std::shared_ptr<channel> ch, domid_t peer, bool writable)
      : ch_(std::move(ch)), peer_(peer), writable_(writable) {}
  ~local_granted() override {
    if (!refs_.empty()) {
      buf b;
      for (auto r : refs_) b.put_u32(r);
      (void)ch_->call(OP_END_GRANT, b);
    }
    if (addr_) ::munmap(addr_, refs_.size() * page_size);
    if (fd_ >= 0) ::close(fd_);
  }
  core::result<void> init(size_t count) {
    fd_ = ::memfd_create("uvd-xen-grant", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd_ < 0) return core::fail(errno, "memfd_create");
    if (::ftruncate(fd_, static_cast<off_t>(count * page_size)) < 0) return core::fail(errno, "ftruncate memfd");
    void* p = ::mmap(nullptr, count * page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) return core::fail(errno, "mmap granted pages");
    buf b;
    b.put_u16(peer_);
    b.put_u8(writable_ ? 1 : 0);
    b.put_u32(static_cast<uint32_t>(count));
    std::vector<int> none;
    auto r = ch_->call(OP_GRANT, b, none, &fd_, 1);
    if (!r) {
      ::munmap(p, count * page_size);
      return core::fail(std::move(r).err());
    }
    addr_ = p;
    refs_.resize(count);
    for (auto& ref : refs_)
      if (!r->get_u32(ref)) return core::fail(EPROTO, "host-local hypervisor: short grant reply");
    return core::ok();
  }
  void* addr() const override { return addr_; }
  size_t count() const override { return refs_.size(); }
  grant_ref_t ref(size_t page) const override { return refs_.at(page); }
  domid_t peer() const override { return peer_; }
  bool writable() const override { return writable_; }

 private:
  std::shared_ptr<channel> ch_;
  domid_t peer_;
  bool writable_;
  int fd_ = -1;
  void* addr_ = nullptr;
  std::vector<grant_ref_t> refs_;
};

class local_mapping final : public foreign_mapping {
 public:
  local_mapping(std::shared_ptr<channel> ch, size_t count, bool writable)
      : ch_(std::move(ch)), count_(count), writable_(writable) {}
  ~local_mapping() override {
    if (addr_) ::munmap(addr_, count_ * page_size);
    if (id_) {
      buf b;
      b.put_u64(id_);
      (void)ch_->call(OP_UNMAP, b);
    }
  }
  core::result<void> init(domid_t granter, std::span<const grant_ref_t> refs) {
    buf b;
    b.put_u16(granter);
    b.put_u8(writable_ ? 1 : 0);
    for (auto r : refs) b.put_u32(r);
    std::vector<int> fds;
    auto r = ch_->call(OP_MAP, b, fds);
    if (!r) return core::fail(std::move(r).err());
    auto res = place(*r, fds);
    close_all(fds);
    return res;
  }
  void* addr() const override { return addr_; }
  size_t count() const override { return count_; }
  bool writable() const override { return writable_; }

 private:
  core::result<void> place(buf& r, const std::vector<int>& fds) {
    uint32_t nfd;
    if (!r.get_u64(id_) || !r.get_u32(nfd) || nfd != fds.size())
      return core::fail(EPROTO, "host-local hypervisor: bad map reply");
    // Reserve the whole range, then lay each run of consecutive pages of one memfd over it.
    void* base = ::mmap(nullptr, count_ * page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return core::fail(errno, "reserve mapping");
    addr_ = base;
    int prot = PROT_READ | (writable_ ? PROT_WRITE : 0);
    std::vector<std::pair<uint32_t, uint32_t>> where(count_);
    for (auto& [k, pg] : where)
      if (!r.get_u32(k) || !r.get_u32(pg) || k >= nfd) return core::fail(EPROTO, "host-local hypervisor: bad map reply");
    for (size_t i = 0; i < count_;) {
      size_t j = i + 1;
      while (j < count_ && where[j].first == where[i].first && where[j].second == where[i].second + (j - i)) ++j;
      void* at = static_cast<char*>(base) + i * page_size;
      void* p = ::mmap(at, (j - i) * page_size, prot, MAP_SHARED | MAP_FIXED, fds[where[i].first],
                       static_cast<off_t>(where[i].second) * static_cast<off_t>(page_size));
      if (p == MAP_FAILED) return core::fail(errno, "map granted pages");
      i = j;
    }
    return core::ok();
  }

  std::shared_ptr<channel> ch_;
  size_t count_;
  bool writable_;
  uint64_t id_ = 0;
  void* addr_ = nullptr;
};

class local_evtchn final : public event_channel {
 public:
  local_evtchn(std::shared_ptr<channel> ch, domid_t peer) : ch_(std::move(ch)), peer_(peer) {}
  ~local_evtchn() override {
    if (port_) {
      buf b;
      b.put_u32(port_);
      (void)ch_->call(OP_EVT_CLOSE, b);
    }
    if (wait_ >= 0) ::close(wait_);
    if (notify_ >= 0) ::close(notify_);
  }
  core::result<void> init(uint32_t op, const buf& req) {
    std::vector<int> fds;
    auto r = ch_->call(op, req, fds);
    if (!r) return core::fail(std::move(r).err());
    if (fds.size() != 2 || !r->get_u32(port_)) {
      close_all(fds);
      return core::fail(EPROTO, "host-local hypervisor: bad event channel reply");
    }
    wait_ = fds[0];
    notify_ = fds[1];
    return core::ok();
  }
  evtchn_port_t local_port() const override { return port_; }
  domid_t peer() const override { return peer_; }
  core::result<void> notify() override {
    uint64_t one = 1;
    if (::write(notify_, &one, sizeof one) < 0 && errno != EAGAIN) return core::fail(errno, "event channel notify");
    return core::ok();
  }
  int fd() const override { return wait_; }
  core::result<bool> ack() override {
    uint64_t v;
    ssize_t n = ::read(wait_, &v, sizeof v);
    if (n == sizeof v) return true;
    if (n < 0 && errno == EAGAIN) return false;
    return core::fail(n < 0 ? errno : EIO, "event channel ack");
  }

 private:
  std::shared_ptr<channel> ch_;
  domid_t peer_;
  evtchn_port_t port_ = 0;
  int wait_ = -1;
  int notify_ = -1;
};

class local_store final : public store {
 public:
  ~local_store() override {
    if (sock_ >= 0) ::close(sock_);
    if (epfd_ >= 0) ::close(epfd_);
    if (queued_fd_ >= 0) ::close(queued_fd_);
  }
  core::result<void> init(channel& ch) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return core::fail(errno, "socketpair");
    sock_ = sv[0];
    std::vector<int> none;
    auto r = ch.call(OP_STORE_OPEN, buf{}, none, &sv[1], 1);
    ::close(sv[1]);
    if (!r) return core::fail(std::move(r).err());
    epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
    queued_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (epfd_ < 0 || queued_fd_ < 0) return core::fail(errno, "epoll/eventfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, sock_, &ev) < 0 || ::epoll_ctl(epfd_, EPOLL_CTL_ADD, queued_fd_, &ev) < 0)
      return core::fail(errno, "epoll_ctl");
    return core::ok();
  }

  core::result<std::string> read(txn_t t, std::string_view path) override {
    auto r = call(OP_S_READ, t, {path});
    if (!r) return core::fail(std::move(r).err());
    std::string v;
    if (!r->get_str(v)) return core::fail(EPROTO, "store: short reply");
    return v;
  }
  core::result<void> write(txn_t t, std::string_view path, std::string_view value) override {
    return status(call(OP_S_WRITE, t, {path, value}));
  }
  core::result<void> mkdir(txn_t t, std::string_view path) override { return status(call(OP_S_MKDIR, t, {path})); }
  core::result<void> rm(txn_t t, std::string_view path) override { return status(call(OP_S_RM, t, {path})); }
  core::result<std::vector<std::string>> directory(txn_t t, std::string_view path) override {
    auto r = call(OP_S_DIRECTORY, t, {path});
    if (!r) return core::fail(std::move(r).err());
    std::vector<std::string> out;
    std::string s;
    while (!r->at_end()) {
      if (!r->get_str(s)) return core::fail(EPROTO, "store: short reply");
      out.push_back(s);
    }
    return out;
  }
  core::result<void> set_perms(txn_t t, std::string_view path, std::span<const store_perm> perms) override {
    std::vector<std::string> words;
    for (const auto& p : perms)
      words.push_back(std::string(1, p.read && p.write ? 'b' : p.read ? 'r' : p.write ? 'w' : 'n') +
                      std::to_string(p.domid));
    std::vector<std::string_view> args{path};
    for (const auto& w : words) args.push_back(w);
    return status(call(OP_S_SET_PERMS, t, args));
  }
  core::result<txn_t> transaction_start() override {
    auto r = call(OP_S_TXN_START, no_txn, {});
    if (!r) return core::fail(std::move(r).err());
    uint32_t t;
    if (!r->get_u32(t)) return core::fail(EPROTO, "store: short reply");
    return t;
  }
  core::result<void> transaction_end(txn_t t, bool commit) override {
    return status(call(OP_S_TXN_END, t, {commit ? "1" : "0"}));
  }
  core::result<void> watch(std::string_view path, std::string_view token) override {
    return status(call(OP_S_WATCH, no_txn, {path, token}));
  }
  core::result<void> unwatch(std::string_view path, std::string_view token) override {
    return status(call(OP_S_UNWATCH, no_txn, {path, token}));
  }
  int watch_fd() const override { return epfd_; }
  core::result<std::optional<store_watch_event>> read_watch() override {
    // Nothing else is in flight between calls, so whatever waits on the socket is an event.
    for (;;) {
      msg_header h;
      buf b;
      std::vector<int> fds;
      int r = recv_msg(sock_, h, b, fds, true);
      close_all(fds);
      if (r == -EAGAIN) break;
      if (r <= 0) return core::fail(r == 0 ? EPIPE : -r, "store: connection lost");
      if (auto q = enqueue_event(h, b); !q) return core::fail(std::move(q).err());
    }
    if (events_.empty()) {
      uint64_t v;
      (void)::read(queued_fd_, &v, sizeof v);
      return std::optional<store_watch_event>{};
    }
    auto ev = std::move(events_.front());
    events_.pop_front();
    return std::optional<store_watch_event>{std::move(ev)};
  }

 private:
  static core::result<void> status(core::result<buf> r) {
    if (!r) return core::fail(std::move(r).err());
    return core::ok();
  }
  core::result<void> enqueue_event(const msg_header& h, buf& b) {
    if (h.op != OP_S_WATCH_EVENT) return core::fail(EPROTO, "store: unexpected message");
    store_watch_event ev;
    if (!b.get_str(ev.path) || !b.get_str(ev.token)) return core::fail(EPROTO, "store: bad watch event");
    events_.push_back(std::move(ev));
    uint64_t one = 1;
    (void)::write(queued_fd_, &one, sizeof one);
    return core::ok();
  }
  core::result<buf> call(uint32_t op, txn_t t, std::initializer_list<std::string_view> args) {
    return call(op, t, std::vector<std::string_view>(args));
  }
  core::result<buf> call(uint32_t op, txn_t t, const std::vector<std::string_view>& args) {
    buf body;
    body.put_u32(t);
    for (auto a : args) body.put_str(a);
    if (int r = send_msg(sock_, {op, 0}, body); r < 0) return core::fail(-r, "store: connection lost");
    for (;;) {
      msg_header h;
      buf b;
      std::vector<int> fds;
      int r = recv_msg(sock_, h, b, fds);
      close_all(fds);
      if (r <= 0) return core::fail(r == 0 ? EPIPE : -r, "store: connection lost");
      if (h.op == OP_S_WATCH_EVENT) {
        if (auto q = enqueue_event(h, b); !q) return core::fail(std::move(q).err());
        continue;
      }
      if (h.op != op) return core::fail(EPROTO, "store: reply out of order");
      if (h.status < 0) {
        std::string what = args.empty() ? std::string() : std::string(args[0]) + ": ";
        return core::fail(-h.status, "store: " + what + std::strerror(-h.status));
      }
      return b;
    }
  }

  int sock_ = -1;
  int epfd_ = -1;
  int queued_fd_ = -1;
  std::deque<store_watch_event> events_;
};

class local_hv final : public hypervisor {
 public:
  local_hv(std::shared_ptr<channel> ch, domid_t dom) : ch_(std::move(ch)), dom_(dom) {}
  std::string_view kind() const override { return "local"; }
  domid_t self_domid() const override { return dom_; }

  core::result<std::unique_ptr<granted_pages>> grant_pages(domid_t peer, size_t count, bool writable) override {
    if (count == 0) return core::fail(EINVAL, "grant of zero pages");
    auto g = std::make_unique<local_granted>(ch_, peer, writable);
    if (auto r = g->init(count); !r) return core::fail(std::move(r).err());
    return std::unique_ptr<granted_pages>(std::move(g));
  }
  core::result<std::unique_ptr<foreign_mapping>> map_grants(domid_t granter, std::span<const grant_ref_t> refs,
                                                            bool writable) override {
    if (refs.empty()) return core::fail(EINVAL, "map of zero grant refs");
    auto m = std::make_unique<local_mapping>(ch_, refs.size(), writable);
    if (auto r = m->init(granter, refs); !r) return core::fail(std::move(r).err());
    return std::unique_ptr<foreign_mapping>(std::move(m));
  }
  core::result<std::unique_ptr<event_channel>> alloc_unbound(domid_t peer) override {
    buf b;
    b.put_u16(peer);
    auto e = std::make_unique<local_evtchn>(ch_, peer);
    if (auto r = e->init(OP_EVT_ALLOC, b); !r) return core::fail(std::move(r).err());
    return std::unique_ptr<event_channel>(std::move(e));
  }
  core::result<std::unique_ptr<event_channel>> bind_interdomain(domid_t peer, evtchn_port_t remote_port) override {
    buf b;
    b.put_u16(peer);
    b.put_u32(remote_port);
    auto e = std::make_unique<local_evtchn>(ch_, peer);
    if (auto r = e->init(OP_EVT_BIND, b); !r) return core::fail(std::move(r).err());
    return std::unique_ptr<event_channel>(std::move(e));
  }
  core::result<std::unique_ptr<store>> open_store() override {
    auto s = std::make_unique<local_store>();
    if (auto r = s->init(*ch_); !r) return core::fail(std::move(r).err());
    return std::unique_ptr<store>(std::move(s));
  }

 private:
  std::shared_ptr<channel> ch_;
  domid_t dom_;
};

}  // namespace

core::result<std::unique_ptr<hypervisor>> open_local_hypervisor(const std::string& socket_path, domid_t domid) {
  sockaddr_un sa{};
  if (socket_path.size() >= sizeof sa.sun_path) return core::fail(ENAMETOOLONG, "hub socket path too long");
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return core::fail(errno, "socket");
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, socket_path.data(), socket_path.size());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) {
    int e = errno;
    ::close(fd);
    return core::fail(e, "connect to host-local hypervisor at " + socket_path);
  }
  auto ch = std::make_shared<channel>(fd);
  buf b;
  b.put_u16(domid);
  if (auto r = ch->call(OP_HELLO, b); !r) return core::fail(std::move(r).err());
  return std::unique_ptr<hypervisor>(std::make_unique<local_hv>(std::move(ch), domid));
}

}  // namespace uvd::xen
