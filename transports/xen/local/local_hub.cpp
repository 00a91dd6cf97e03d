// SPDX-License-Identifier: Apache-2.0
// The hub of the host-local hypervisor (see local.hpp): one thread, one poll
// loop over every connection, every message parsed as hostile.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <deque>
#include <map>
#include <thread>

#include "transports/xen/local/local.hpp"
#include "transports/xen/local/local_proto.hpp"
#include "transports/xen/local/store_tree.hpp"

namespace uvd::xen {

namespace {

using namespace local;

constexpr size_t max_map_refs = 4096;
constexpr size_t max_grant_pages = 65536;
constexpr size_t max_grants_per_domain = 1 << 20;
constexpr size_t max_ports_per_domain = 4096;
constexpr size_t max_outq = 4096;
// Xen reserves the first grant entries for the toolstack (GNTTAB_NR_RESERVED_ENTRIES).
constexpr grant_ref_t first_ref = 8;

struct fd_owner {
  int fd = -1;
  explicit fd_owner(int f) : fd(f) {}
  ~fd_owner() {
    if (fd >= 0) ::close(fd);
  }
  fd_owner(const fd_owner&) = delete;
  fd_owner& operator=(const fd_owner&) = delete;
};

// One memfd granted in one call: all its pages go to the same peer, same access.
struct share {
  fd_owner rw;
  fd_owner ro;
  uint32_t pages;
  share(int rwfd, int rofd, uint32_t n) : rw(rwfd), ro(rofd), pages(n) {}
};

struct grant_entry {
  domid_t peer;
  std::shared_ptr<share> sh;
  uint32_t page;
  bool writable;
  bool ended = false;
  uint32_t maps = 0;
  uint64_t conn;  // the granting connection
};

struct evt_pair {
  fd_owner a;  // the allocating side waits on a
  fd_owner b;  // the binding side waits on b
  evt_pair(int x, int y) : a(x), b(y) {}
};

struct port_entry {
  domid_t peer;
  std::shared_ptr<evt_pair> fds;
  bool allocator;  // true: made by alloc_unbound, waits on fds->a
  bool bound;      // allocator side: a peer bound to it (one binding per port)
  uint64_t conn;
};

struct domain {
  std::map<grant_ref_t, grant_entry> grants;
  grant_ref_t next_ref = first_ref;
  std::map<evtchn_port_t, port_entry> ports;
  evtchn_port_t next_port = 1;
  uint32_t connections = 0;  // main connections: the domain "runs" while it has one
};

struct mapping {
  uint64_t conn;
  domid_t granter;
  std::vector<grant_ref_t> refs;
};

struct connection {
  int fd;
  uint64_t id;
  bool hello = false;
  bool is_store = false;
  domid_t dom = 0;
  std::deque<std::pair<msg_header, buf>> outq;
};

class hub_impl final : public local_hub {
 public:
  ~hub_impl() override {
    uint64_t one = 1;
    if (stop_fd_ >= 0) (void)::write(stop_fd_, &one, sizeof one);
    if (thread_.joinable()) thread_.join();
    for (auto& [id, c] : conns_) ::close(c.fd);
    if (listen_fd_ >= 0) ::close(listen_fd_);
    if (stop_fd_ >= 0) ::close(stop_fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  const std::string& socket_path() const override { return path_; }

  core::result<void> init(const std::string& path) {
    sockaddr_un sa{};
    if (path.size() >= sizeof sa.sun_path) return core::fail(ENAMETOOLONG, "hub socket path too long: " + path);
    listen_fd_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) return core::fail(errno, "socket");
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.data(), path.size());
    ::unlink(path.c_str());
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) return core::fail(errno, "bind " + path);
    path_ = path;
    // Whoever can connect may claim any domain id: only this user may.
    if (::chmod(path.c_str(), 0600) < 0) return core::fail(errno, "chmod " + path);
    if (::listen(listen_fd_, 64) < 0) return core::fail(errno, "listen " + path);
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (stop_fd_ < 0) return core::fail(errno, "eventfd");
    tree_.on_watch = [this](uint64_t conn, const std::string& p, const std::string& tok) {
      auto it = conns_.find(conn);
      if (it == conns_.end()) return;
      // As xenstored: a domain hears of nodes it may read (or that are gone), nothing else.
      if (auto r = tree_.read(0, it->second.dom, no_txn, p); !r && r.err().errnum() == EACCES) return;
      buf b;
      b.put_str(p);
      b.put_str(tok);
      queue(it->second, {OP_S_WATCH_EVENT, 0}, std::move(b));
    };
    thread_ = std::thread([this] { run(); });
    return core::ok();
  }

 private:
  void run() {
    std::vector<pollfd> pfds;
    std::vector<uint64_t> ids;
    for (;;) {
      pfds.clear();
      ids.clear();
      pfds.push_back({stop_fd_, POLLIN, 0});
      pfds.push_back({listen_fd_, POLLIN, 0});
      for (auto& [id, c] : conns_) {
        pfds.push_back({c.fd, static_cast<short>(POLLIN | (c.outq.empty() ? 0 : POLLOUT)), 0});
        ids.push_back(id);
      }
      if (::poll(pfds.data(), pfds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        spdlog::error("xen hub: poll: {}", std::strerror(errno));
        return;
      }
      if (pfds[0].revents) return;
      if (pfds[1].revents & POLLIN) accept_one();
      for (size_t i = 0; i < ids.size(); ++i) {
        auto it = conns_.find(ids[i]);
        if (it == conns_.end()) continue;
        short re = pfds[i + 2].revents;
        bool dead = false;
        if (re & POLLOUT) dead = !flush(it->second);
        if (!dead && (re & (POLLIN | POLLHUP | POLLERR))) dead = !serve_one(it->second);
        if (dead) close_conn(ids[i]);
      }
    }
  }

  void accept_one() {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    add_conn(fd, false, 0);
  }

  connection& add_conn(int fd, bool is_store, domid_t dom) {
    uint64_t id = next_conn_++;
    auto& c = conns_[id];
    c.fd = fd;
    c.id = id;
    c.is_store = is_store;
    c.hello = is_store;
    c.dom = dom;
    return c;
  }

  void close_conn(uint64_t id) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    connection& c = it->second;
    if (c.is_store) {
      tree_.drop_connection(id);
    } else if (c.hello) {
      // The domain's process went away: unmap what it mapped, end what it granted, close its ports.
      for (auto m = maps_.begin(); m != maps_.end();) {
        if (m->second.conn == id) {
          release_mapping(m->second);
          m = maps_.erase(m);
        } else {
          ++m;
        }
      }
      domain& d = domains_[c.dom];
      for (auto g = d.grants.begin(); g != d.grants.end();) {
        if (g->second.conn == id) {
          g->second.ended = true;
          if (g->second.maps == 0) {
            g = d.grants.erase(g);
            continue;
          }
        }
        ++g;
      }
      std::erase_if(d.ports, [&](const auto& kv) { return kv.second.conn == id; });
      if (d.connections && --d.connections == 0) {
        // The domain is gone. Do what a toolstack does when a driver domain
        // dies: the devices it served go with it, so front ends watching their
        // back end's state see it vanish and fail their requests, not hang.
        (void)tree_.rm(0, 0, no_txn, "/local/domain/" + std::to_string(c.dom) + "/backend");
      }
    }
    ::close(c.fd);
    conns_.erase(it);
  }

  void queue(connection& c, msg_header h, buf b) {
    if (c.outq.size() >= max_outq) return;  // a peer that never reads loses its events, not the hub
    c.outq.emplace_back(h, std::move(b));
    (void)flush(c);
  }
  // False if the connection is dead.
  bool flush(connection& c) {
    while (!c.outq.empty()) {
      int r = send_msg(c.fd, c.outq.front().first, c.outq.front().second);
      if (r == -EAGAIN) return true;
      if (r < 0) return false;
      c.outq.pop_front();
    }
    return true;
  }
  void reply(connection& c, uint32_t op, int status, buf b = {}, const std::vector<int>& fds = {}) {
    msg_header h{op, status};
    if (!fds.empty()) {
      // Replies with descriptors are sent at once (a reply is the only thing
      // in flight on a main connection; the client is waiting for it).
      if (!c.outq.empty()) (void)flush(c);
      (void)send_msg(c.fd, h, b, fds.data(), fds.size());
      return;
    }
    queue(c, h, std::move(b));
  }

  bool serve_one(connection& c) {
    msg_header h;
    buf b;
    std::vector<int> fds;
    int r = recv_msg(c.fd, h, b, fds, true);
    if (r == -EAGAIN) return true;
    if (r <= 0) {
      for (int fd : fds) ::close(fd);
      return false;
    }
    int status = c.is_store ? serve_store(c, h, b, fds) : serve_main(c, h, b, fds);
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
    if (status < 0) reply(c, h.op, status);
    return true;
  }

  // Returns 0 when it replied itself, -errno for an error reply. Descriptors it
  // keeps are set to -1 in fds.
  int serve_main(connection& c, const msg_header& h, buf& b, std::vector<int>& fds) {
    if (!c.hello && h.op != OP_HELLO) return -EPROTO;
    switch (h.op) {
      case OP_HELLO: {
        uint16_t dom;
        if (c.hello || !b.get_u16(dom) || !b.at_end()) return -EPROTO;
        c.hello = true;
        c.dom = dom;
        ++domains_[dom].connections;
        std::string dir = "/local/domain/" + std::to_string(dom);
        if (!tree_.read(0, 0, no_txn, dir)) {
          (void)tree_.write(0, 0, no_txn, dir, "");
          store_perm p{dom, false, false};
          (void)tree_.set_perms(0, 0, no_txn, dir, {p});
        }
        reply(c, h.op, 0);
        return 0;
      }
      case OP_GRANT: return grant(c, b, fds);
      case OP_END_GRANT: {
        domain& d = domains_[c.dom];
        uint32_t ref;
        while (b.get_u32(ref)) {
          auto it = d.grants.find(ref);
          if (it == d.grants.end() || it->second.conn != c.id) continue;
          it->second.ended = true;
          if (it->second.maps == 0) d.grants.erase(it);
        }
        reply(c, h.op, 0);
        return 0;
      }
      case OP_MAP: return map(c, b);
      case OP_UNMAP: {
        uint64_t id;
        if (!b.get_u64(id)) return -EPROTO;
        auto it = maps_.find(id);
        if (it == maps_.end() || it->second.conn != c.id) return -ENOENT;
        release_mapping(it->second);
        maps_.erase(it);
        reply(c, h.op, 0);
        return 0;
      }
      case OP_EVT_ALLOC: {
        uint16_t peer;
        if (!b.get_u16(peer)) return -EPROTO;
        domain& d = domains_[c.dom];
        if (d.ports.size() >= max_ports_per_domain) return -ENOSPC;
        int a = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), e = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (a < 0 || e < 0) {
          int err = errno;
          if (a >= 0) ::close(a);
          if (e >= 0) ::close(e);
          return -err;
        }
        auto pair = std::make_shared<evt_pair>(a, e);
        evtchn_port_t port = d.next_port++;
        d.ports[port] = {peer, pair, true, false, c.id};
        buf out;
        out.put_u32(port);
        reply(c, h.op, 0, std::move(out), {pair->a.fd, pair->b.fd});
        return 0;
      }
      case OP_EVT_BIND: {
        uint16_t peer;
        uint32_t rport;
        if (!b.get_u16(peer) || !b.get_u32(rport)) return -EPROTO;
        auto dit = domains_.find(peer);
        if (dit == domains_.end()) return -ESRCH;
        auto pit = dit->second.ports.find(rport);
        // Only an unbound port that its owner opened for this very domain.
        if (pit == dit->second.ports.end() || !pit->second.allocator) return -EINVAL;
        if (pit->second.peer != c.dom) return -EPERM;
        if (pit->second.bound) return -EBUSY;
        domain& d = domains_[c.dom];
        if (d.ports.size() >= max_ports_per_domain) return -ENOSPC;
        pit->second.bound = true;
        auto pair = pit->second.fds;
        evtchn_port_t port = d.next_port++;
        d.ports[port] = {peer, pair, false, true, c.id};
        buf out;
        out.put_u32(port);
        reply(c, h.op, 0, std::move(out), {pair->b.fd, pair->a.fd});
        return 0;
      }
      case OP_EVT_CLOSE: {
        uint32_t port;
        if (!b.get_u32(port)) return -EPROTO;
        domain& d = domains_[c.dom];
        auto it = d.ports.find(port);
        if (it == d.ports.end() || it->second.conn != c.id) return -ENOENT;
        d.ports.erase(it);
        reply(c, h.op, 0);
        return 0;
      }
      case OP_STORE_OPEN: {
        if (fds.size() != 1) return -EPROTO;
        int fd = fds[0];
        fds[0] = -1;
        int fl = ::fcntl(fd, F_GETFL);
        (void)::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        add_conn(fd, true, c.dom);
        reply(c, h.op, 0);
        return 0;
      }
      default: return -ENOSYS;
    }
  }

  int grant(connection& c, buf& b, std::vector<int>& fds) {
    uint16_t peer;
    uint8_t writable;
    uint32_t count;
    if (!b.get_u16(peer) || !b.get_u8(writable) || !b.get_u32(count) || fds.size() != 1) return -EPROTO;
    if (count == 0 || count > max_grant_pages) return -EINVAL;
    domain& d = domains_[c.dom];
    if (d.grants.size() + count > max_grants_per_domain) return -ENOSPC;
    int fd = fds[0];
    struct stat st;
    if (::fstat(fd, &st) < 0 || static_cast<uint64_t>(st.st_size) < uint64_t{count} * page_size) return -EINVAL;
    // Freeze the size: a granter that could truncate would SIGBUS its mappers.
    if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
      int s = ::fcntl(fd, F_GET_SEALS);
      if (s < 0 || (s & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) return -EINVAL;
    }
    int ro = ::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_RDONLY | O_CLOEXEC);
    if (ro < 0) return -errno;
    fds[0] = -1;
    auto sh = std::make_shared<share>(fd, ro, count);
    buf out;
    for (uint32_t i = 0; i < count; ++i) {
      grant_ref_t ref = d.next_ref;
      while (d.grants.count(ref) || ref < first_ref) ++ref;
      d.next_ref = ref + 1;
      d.grants[ref] = {peer, sh, i, writable != 0, false, 0, c.id};
      out.put_u32(ref);
    }
    reply(c, OP_GRANT, 0, std::move(out));
    return 0;
  }

  int map(connection& c, buf& b) {
    uint16_t granter;
    uint8_t writable;
    if (!b.get_u16(granter) || !b.get_u8(writable)) return -EPROTO;
    if (b.remaining() % 4 || b.remaining() == 0 || b.remaining() / 4 > max_map_refs) return -EINVAL;
    std::vector<grant_ref_t> refs(b.remaining() / 4);
    for (auto& r : refs) (void)b.get_u32(r);
    auto dit = domains_.find(granter);
    if (dit == domains_.end()) return -ESRCH;
    // Validate every ref before touching any: all or nothing.
    std::vector<share*> shares;
    buf out;
    std::vector<int> fds;
    std::vector<std::pair<uint32_t, uint32_t>> where;
    for (grant_ref_t r : refs) {
      auto g = dit->second.grants.find(r);
      if (g == dit->second.grants.end() || g->second.ended) return -EINVAL;
      if (g->second.peer != c.dom) return -EPERM;
      if (writable && !g->second.writable) return -EACCES;
      share* sh = g->second.sh.get();
      size_t k = 0;
      while (k < shares.size() && shares[k] != sh) ++k;
      if (k == shares.size()) {
        if (shares.size() == max_fds) return -E2BIG;
        shares.push_back(sh);
        fds.push_back(writable ? sh->rw.fd : sh->ro.fd);
      }
      where.emplace_back(static_cast<uint32_t>(k), g->second.page);
    }
    for (grant_ref_t r : refs) ++dit->second.grants[r].maps;
    uint64_t id = next_map_++;
    maps_[id] = {c.id, granter, refs};
    out.put_u64(id);
    out.put_u32(static_cast<uint32_t>(fds.size()));
    for (auto [k, pg] : where) {
      out.put_u32(k);
      out.put_u32(pg);
    }
    reply(c, OP_MAP, 0, std::move(out), fds);
    return 0;
  }

  void release_mapping(const mapping& m) {
    auto dit = domains_.find(m.granter);
    if (dit == domains_.end()) return;
    for (grant_ref_t r : m.refs) {
      auto g = dit->second.grants.find(r);
      if (g == dit->second.grants.end()) continue;
      if (g->second.maps) --g->second.maps;
      if (g->second.ended && g->second.maps == 0) dit->second.grants.erase(g);
    }
  }

  int serve_store(connection& c, const msg_header& h, buf& b, std::vector<int>&) {
    uint32_t t;
    if (!b.get_u32(t)) return -EPROTO;
    std::vector<std::string> args;
    std::string s;
    while (!b.at_end()) {
      if (!b.get_str(s) || args.size() >= 70) return -EPROTO;
      args.push_back(std::move(s));
    }
    auto need = [&](size_t n) { return args.size() == n; };
    buf out;
    core::result<void> r = core::ok();
    switch (h.op) {
      case OP_S_READ: {
        if (!need(1)) return -EPROTO;
        auto v = tree_.read(c.id, c.dom, t, args[0]);
        if (!v) return -v.err().errnum();
        out.put_str(*v);
        break;
      }
      case OP_S_WRITE:
        if (!need(2)) return -EPROTO;
        r = tree_.write(c.id, c.dom, t, args[0], args[1]);
        break;
      case OP_S_MKDIR:
        if (!need(1)) return -EPROTO;
        r = tree_.mkdir(c.id, c.dom, t, args[0]);
        break;
      case OP_S_RM:
        if (!need(1)) return -EPROTO;
        r = tree_.rm(c.id, c.dom, t, args[0]);
        break;
      case OP_S_DIRECTORY: {
        if (!need(1)) return -EPROTO;
        auto v = tree_.directory(c.id, c.dom, t, args[0]);
        if (!v) return -v.err().errnum();
        for (const auto& n : *v) out.put_str(n);
        break;
      }
      case OP_S_SET_PERMS: {
        if (args.size() < 2) return -EPROTO;
        std::vector<store_perm> perms;
        for (size_t i = 1; i < args.size(); ++i) {
          const std::string& p = args[i];
          if (p.size() < 2 || p.size() > 6) return -EINVAL;
          unsigned long id = 0;
          for (size_t k = 1; k < p.size(); ++k) {
            if (p[k] < '0' || p[k] > '9') return -EINVAL;
            id = id * 10 + static_cast<unsigned>(p[k] - '0');
          }
          if (id > 0xffff) return -EINVAL;
          char m = p[0];
          if (m != 'r' && m != 'w' && m != 'b' && m != 'n') return -EINVAL;
          perms.push_back({static_cast<domid_t>(id), m == 'r' || m == 'b', m == 'w' || m == 'b'});
        }
        r = tree_.set_perms(c.id, c.dom, t, args[0], std::move(perms));
        break;
      }
      case OP_S_TXN_START: {
        auto v = tree_.transaction_start(c.id);
        if (!v) return -v.err().errnum();
        out.put_u32(*v);
        break;
      }
      case OP_S_TXN_END:
        if (!need(1)) return -EPROTO;
        r = tree_.transaction_end(c.id, t, args[0] == "1");
        break;
      case OP_S_WATCH:
        if (!need(2)) return -EPROTO;
        // Its first firing may reach the client before this reply; the client queues it.
        r = tree_.watch(c.id, args[0], args[1]);
        break;
      case OP_S_UNWATCH:
        if (!need(2)) return -EPROTO;
        r = tree_.unwatch(c.id, args[0], args[1]);
        break;
      default: return -ENOSYS;
    }
    if (!r) return -r.err().errnum();
    reply(c, h.op, 0, std::move(out));
    return 0;
  }

  std::string path_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;
  std::thread thread_;
  std::map<uint64_t, connection> conns_;
  uint64_t next_conn_ = 1;
  std::map<domid_t, domain> domains_;
  std::map<uint64_t, mapping> maps_;
  uint64_t next_map_ = 1;
  store_tree tree_;
};

}  // namespace

core::result<std::unique_ptr<local_hub>> local_hub::start(const std::string& socket_path) {
  auto h = std::make_unique<hub_impl>();
  if (auto r = h->init(socket_path); !r) return core::fail(std::move(r).err());
  return std::unique_ptr<local_hub>(std::move(h));
}

}  // namespace uvd::xen
