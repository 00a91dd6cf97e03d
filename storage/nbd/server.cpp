// SPDX-License-Identifier: Apache-2.0
// The NBD server's control plane: listeners, the accept thread, connection
// threads and their reaping, shutdown. The data path is in connection.cpp.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <mutex>
#include <set>
#include <thread>

#include "core/uri.hpp"
#include "storage/nbd/connection.hpp"
#include "storage/nbd/nbd.hpp"

namespace uvd::storage::nbd {

namespace {

std::string human_bytes(uint64_t n) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", v, unit[u]);
  return buf;
}

std::string errno_text(int e) { return std::strerror(e); }

struct listener {
  int fd = -1;
  bool is_unix = false;
  std::string path;  // unix
  std::string host;  // tcp, as given
  uint16_t port = 0;
};

core::result<listener> listen_unix(const std::string& path) {
  listener l;
  l.is_unix = true;
  l.path = path;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof sa.sun_path)
    return core::fail(ENAMETOOLONG, "unix socket path '" + path + "' is empty or longer than " +
                                        std::to_string(sizeof sa.sun_path - 1) + " bytes");
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return core::fail(EEXIST, "'" + path + "' exists and is not a socket");
    // A socket file: in use by a live server, or left behind by a dead one.
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool live = probe >= 0 && ::connect(probe, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
    if (probe >= 0) ::close(probe);
    if (live) return core::fail(EADDRINUSE, "unix socket '" + path + "' is in use by another server");
    ::unlink(path.c_str());
  }
  l.fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (l.fd < 0) return core::fail(errno, "socket(AF_UNIX)");
  if (::bind(l.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0 || ::listen(l.fd, 128) < 0) {
    int e = errno;
    ::close(l.fd);
    return core::fail(e, "cannot listen on unix socket '" + path + "'");
  }
  return l;
}

core::result<listener> listen_tcp(const std::string& spec) {
  auto hp = parse_host_port(spec);
  if (!hp) return core::fail(std::move(hp).err());
  listener l;
  l.host = hp->first;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(hp->second);
  int rc = ::getaddrinfo(hp->first.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return core::fail(EINVAL, "cannot resolve '" + hp->first + "': " + ::gai_strerror(rc));
  int err = 0;
  for (addrinfo* a = res; a; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 128) == 0) {
      l.fd = fd;
      break;
    }
    err = errno;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (l.fd < 0) return core::fail(err ? err : EADDRNOTAVAIL, "cannot listen on TCP " + spec);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(l.fd, reinterpret_cast<sockaddr*>(&ss), &len);
  l.port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return l;
}

std::string peer_name(int fd, bool is_unix) {
  if (is_unix) {
    ucred cred{};
    socklen_t clen = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0 && cred.pid > 0)
      return "unix socket, pid " + std::to_string(cred.pid);
    return "unix socket";
  }
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return "?";
  return core::sockaddr_text(reinterpret_cast<const sockaddr*>(&ss));
}

}  // namespace

std::string traffic_stats::to_string() const {
  std::string s = std::to_string(reads) + " reads (" + human_bytes(read_bytes) + "), " + std::to_string(writes) +
                  " writes (" + human_bytes(write_bytes) + "), " + std::to_string(flushes) + " flushes, " +
                  std::to_string(trims) + " trims, " + std::to_string(write_zeroes) + " write-zeroes, " +
                  std::to_string(errors) + " errors";
  return s;
}

core::result<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text) {
  std::string host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos) return core::fail(EINVAL, fmt::format("'{}': missing ']'", text));
    host = std::string(text.substr(1, close - 1));
    std::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return core::fail(EINVAL, fmt::format("'{}': expected ':PORT' after ']'", text));
      port = rest.substr(1);
    }
  } else {
    size_t colon = text.rfind(':');
    if (colon != std::string_view::npos && text.find(':') != colon)
      return core::fail(EINVAL, fmt::format("'{}': write an IPv6 address as [ADDR]:PORT", text));
    host = std::string(text.substr(0, colon));
    if (colon != std::string_view::npos) port = text.substr(colon + 1);
  }
  if (host.empty())
    return core::fail(EINVAL, fmt::format("'{}': no host (use 127.0.0.1, or 0.0.0.0 for every interface)", text));
  uint16_t p = NBD_DEFAULT_PORT;
  if (!port.empty() || (text.size() && text.back() == ':')) {
    unsigned long v = 0;
    if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos ||
        (v = std::stoul(std::string(port))) > 65535)
      return core::fail(EINVAL, fmt::format("'{}': bad port '{}'", text, port));
    p = static_cast<uint16_t>(v);
  }
  return std::make_pair(host, p);
}

struct server::impl {
  detail::server_shared shared;
  std::vector<listener> listeners;
  int stop_fd = -1;  // eventfd written once by request_stop(), never drained
  std::atomic<bool> stop_requested{false};
  std::thread acceptor;
  bool started = false;
  bool stopped = false;
  std::mutex stop_mu;

  struct conn_entry {
    std::unique_ptr<detail::connection> conn;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  mutable std::mutex mu;
  std::list<conn_entry> conns;
  uint64_t next_id = 1;
  bool closing = false;  // no new connections

  ~impl() {
    for (listener& l : listeners)
      if (l.fd >= 0) ::close(l.fd);
    if (stop_fd >= 0) ::close(stop_fd);
  }

  void reap() {
    std::list<conn_entry> dead;
    {
      std::lock_guard lk(mu);
      for (auto it = conns.begin(); it != conns.end();) {
        auto next = std::next(it);
        if (it->done.load(std::memory_order_acquire)) dead.splice(dead.end(), conns, it);
        it = next;
      }
    }
    for (conn_entry& e : dead) e.thread.join();
  }

  core::result<void> add_connection(int fd, std::string peer, size_t preset_export = detail::connection::no_preset,
                                    std::string listener = {}) {
    std::lock_guard lk(mu);
    if (closing) {
      ::close(fd);
      return core::fail(ESHUTDOWN, "server is stopping");
    }
    size_t active = 0;
    for (conn_entry& e : conns) active += !e.done.load(std::memory_order_relaxed);
    if (active >= shared.opts.max_connections) {
      ::close(fd);
      spdlog::warn("nbd: refused a connection from {}: {} connections already", peer, active);
      return core::fail(EAGAIN, "too many connections");
    }
    uint64_t id = next_id++;
    spdlog::debug("nbd: connection {} from {}", id, peer);
    conn_entry& e = conns.emplace_back();
    e.conn = std::make_unique<detail::connection>(shared, fd, id, std::move(peer), preset_export);
    e.conn->set_listener(std::move(listener));
    try {
      e.thread = std::thread([&e] {
        pthread_setname_np(pthread_self(), ("uvd-nbd-" + std::to_string(e.conn->id() % 100000)).c_str());
        e.conn->run();
        e.done.store(true, std::memory_order_release);
      });
    } catch (const std::system_error& ex) {
      conns.pop_back();
      return core::fail(EAGAIN, std::string("cannot start a connection thread: ") + ex.what());
    }
    return core::ok();
  }

  void accept_loop() {
    std::vector<pollfd> pfds;
    for (listener& l : listeners) pfds.push_back({l.fd, POLLIN, 0});
    pfds.push_back({stop_fd, POLLIN, 0});
    for (;;) {
      int n = ::poll(pfds.data(), pfds.size(), 1000);
      reap();
      if (n < 0 && errno != EINTR) {
        spdlog::error("nbd: poll on listeners: {}", errno_text(errno));
        return;
      }
      if (pfds.back().revents & POLLIN) return;
      for (size_t i = 0; i < listeners.size(); ++i) {
        if (!(pfds[i].revents & POLLIN)) continue;
        int fd = ::accept4(listeners[i].fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
          if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
            spdlog::warn("nbd: accept: {}", errno_text(errno));
          if (errno == EMFILE || errno == ENFILE) std::this_thread::sleep_for(std::chrono::milliseconds(100));
          continue;
        }
        if (!listeners[i].is_unix) {
          int one = 1;
          ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        } else {
          // A unix socket's send buffer (about 200 KiB by default) would cut
          // every large READ reply into several sends and POLLOUT wake-ups;
          // TCP tunes its own buffers.
          int bytes = 4 << 20;
          ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
        }
        const listener& l = listeners[i];
        (void)add_connection(fd, peer_name(fd, l.is_unix), detail::connection::no_preset,
                             l.is_unix ? "unix:" + l.path : "tcp:" + l.host + ":" + std::to_string(l.port));
      }
    }
  }
};

namespace detail {

core::result<void> describe_export(const export_config& e, const server_options& opts, export_state& st,
                                   export_desc& desc) {
  const Vstore& d = *e.disk;
  uint32_t bs = d.block_size();
  if (bs > opts.max_payload)
    return core::fail(EINVAL, "export '" + e.name + "': block size " + std::to_string(bs) +
                                  " exceeds the maximum payload");
  st.cfg = e;
  bool ro = e.read_only || d.read_only();
  export_geometry& g = st.geometry;
  g.size = d.size();
  g.min_block = bs;
  g.max_payload = opts.max_payload - opts.max_payload % bs;
  g.max_discard = std::max<uint32_t>(g.max_payload, 64u << 20);
  g.tflags = make_transmission_flags(ro, d.has(core::VSTORE_F_DISCARD), d.has(core::VSTORE_F_ROTATIONAL),
                                     opts.multi_conn);
  desc.name = e.name;
  desc.description = e.description;
  desc.size = g.size;
  desc.tflags = g.tflags;
  desc.min_block = bs;
  desc.preferred_block = std::max<uint32_t>(4096, bs);
  desc.max_block = g.max_payload;
  return core::ok();
}

}  // namespace detail

server::server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

server::~server() {
  if (impl_) stop();
}

core::result<std::unique_ptr<server>> server::create(server_options opts) {
  if (opts.exports.empty() && !opts.resolver) return core::fail(EINVAL, "nothing to serve: no exports");
  if (opts.max_in_flight < 1 || opts.max_in_flight > 1024)
    return core::fail(EINVAL, "requests in flight per connection must be 1..1024, not " +
                                  std::to_string(opts.max_in_flight));
  if (opts.max_payload < 4096 || opts.max_payload > (1u << 30))
    return core::fail(EINVAL, "maximum payload must be 4 KiB..1 GiB");
  if (opts.max_buffered < opts.max_payload) opts.max_buffered = opts.max_payload;
  if (opts.max_connections < 1) return core::fail(EINVAL, "max connections must be at least 1");

  auto p = std::make_unique<impl>();
  std::set<std::string> names;
  for (export_config& e : opts.exports) {
    if (!e.disk) return core::fail(EINVAL, "export '" + e.name + "' has no disk");
    if (e.name.size() > NBD_MAX_STRING) return core::fail(EINVAL, "export name longer than 4096 bytes");
    if (e.description.size() > NBD_MAX_STRING)
      return core::fail(EINVAL, "description of export '" + e.name + "' is longer than 4096 bytes");
    if (!names.insert(e.name).second) return core::fail(EINVAL, "two exports are named '" + e.name + "'");
    auto st = std::make_unique<detail::export_state>();
    export_desc desc;
    if (auto r = detail::describe_export(e, opts, *st, desc); !r) return core::fail(std::move(r).err());
    p->shared.descs.push_back(std::move(desc));
    p->shared.exports.push_back(std::move(st));
  }
  p->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (p->stop_fd < 0) return core::fail(errno, "eventfd");
  for (const std::string& path : opts.unix_paths) {
    auto l = listen_unix(path);
    if (!l) return core::fail(std::move(l).err());
    p->listeners.push_back(std::move(*l));
  }
  for (const std::string& spec : opts.tcp) {
    auto l = listen_tcp(spec);
    if (!l) return core::fail(std::move(l).err());
    p->listeners.push_back(std::move(*l));
  }
  p->shared.opts = std::move(opts);
  return std::unique_ptr<server>(new server(std::move(p)));
}

core::result<void> server::start() {
  std::lock_guard lk(impl_->stop_mu);
  if (impl_->stopped) return core::fail(ESHUTDOWN, "server already stopped");
  if (impl_->started) return core::ok();
  try {
    impl_->acceptor = std::thread([p = impl_.get()] {
      pthread_setname_np(pthread_self(), "uvd-nbd-accept");
      p->accept_loop();
    });
  } catch (const std::system_error& e) {
    return core::fail(EAGAIN, std::string("cannot start the accept thread: ") + e.what());
  }
  impl_->started = true;
  for (const std::string& u : uris()) spdlog::debug("nbd: listening on {}", u);
  return core::ok();
}

void server::request_stop() noexcept {
  impl_->stop_requested.store(true, std::memory_order_release);
  uint64_t one = 1;
  ssize_t n = ::write(impl_->stop_fd, &one, sizeof one);
  (void)n;
}

void server::wait() {
  pollfd p{impl_->stop_fd, POLLIN, 0};
  while (!impl_->stop_requested.load(std::memory_order_acquire)) {
    if (::poll(&p, 1, 1000) < 0 && errno != EINTR) break;
  }
}

core::result<void> server::run() {
  if (auto r = start(); !r) return r;
  wait();
  stop();
  return core::ok();
}

void server::stop() {
  std::lock_guard lk(impl_->stop_mu);
  if (impl_->stopped) return;
  impl_->stopped = true;
  request_stop();
  if (impl_->acceptor.joinable()) impl_->acceptor.join();
  for (listener& l : impl_->listeners) {
    if (l.fd >= 0) ::close(l.fd);
    l.fd = -1;
    if (l.is_unix) ::unlink(l.path.c_str());
  }
  std::list<impl::conn_entry> conns;
  {
    std::lock_guard cl(impl_->mu);
    impl_->closing = true;
    for (auto& e : impl_->conns) e.conn->request_stop();
    conns.splice(conns.end(), impl_->conns);
  }
  for (auto& e : conns) e.thread.join();
  conns.clear();

  // Every acknowledged write is durable before stop() returns.
  std::set<const Vstore*> flushed;
  for (auto& e : impl_->shared.exports) {
    Vstore* d = e->cfg.disk.get();
    const char* state = "flushed";
    if (!flushed.insert(d).second) {
      state = "flushed (same disk as another export)";
    } else if (auto r = d->flush(); !r) {
      spdlog::error("nbd: flush of export '{}' at shutdown failed: {}", e->cfg.name, r.err().what());
      state = "FLUSH FAILED";
    }
    spdlog::info("nbd: export '{}' {}: {} connections; {}", e->cfg.name, state,
                 e->connections.load(std::memory_order_relaxed), e->totals.snapshot().to_string());
  }
}

core::result<void> server::serve_fd(int fd) { return serve_connected(fd, detail::connection::no_preset); }

core::result<void> server::serve_fd_transmission(int fd, size_t export_index) {
  if (export_index >= impl_->shared.exports.size()) {
    ::close(fd);
    return core::fail(EINVAL, "no export " + std::to_string(export_index));
  }
  return serve_connected(fd, export_index);
}

uint16_t server::transmission_flags(size_t export_index) const {
  return export_index < impl_->shared.exports.size() ? impl_->shared.exports[export_index]->geometry.tflags : 0;
}

core::result<void> server::serve_connected(int fd, size_t preset_export) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    int e = errno;
    ::close(fd);
    return core::fail(e, "cannot make the socket non-blocking");
  }
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  {
    std::lock_guard lk(impl_->stop_mu);
    if (impl_->stopped) {
      ::close(fd);
      return core::fail(ESHUTDOWN, "server already stopped");
    }
  }
  impl_->reap();
  return impl_->add_connection(fd, "fd " + std::to_string(fd), preset_export);
}

std::vector<std::string> server::uris(std::string_view export_name) const {
  // The export name is the URI path: percent-encode what is not unreserved.
  std::string name;
  for (unsigned char c : export_name) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      name += static_cast<char>(c);
    } else {
      char esc[4];
      std::snprintf(esc, sizeof esc, "%%%02X", c);
      name += esc;
    }
  }
  std::vector<std::string> out;
  for (const listener& l : impl_->listeners) {
    if (l.is_unix) {
      out.push_back(fmt::format("nbd+unix:///{}?socket={}", name, l.path));
    } else {
      bool v6 = l.host.find(':') != std::string::npos;
      std::string host = v6 ? fmt::format("[{}]", l.host) : l.host;
      out.push_back(fmt::format("nbd://{}:{}{}{}", host, l.port, name.empty() ? "" : "/", name));
    }
  }
  return out;
}

uint16_t server::tcp_port(size_t i) const {
  for (const listener& l : impl_->listeners) {
    if (l.is_unix) continue;
    if (i-- == 0) return l.port;
  }
  return 0;
}

size_t server::active_connections() const {
  std::lock_guard lk(impl_->mu);
  size_t n = 0;
  for (auto& e : impl_->conns) n += !e.done.load(std::memory_order_relaxed);
  return n;
}

std::vector<export_stats> server::stats() const {
  std::vector<export_stats> out;
  for (auto& e : impl_->shared.exports)
    out.push_back({e->cfg.name, e->connections.load(std::memory_order_relaxed), e->totals.snapshot()});
  return out;
}

}  // namespace uvd::storage::nbd
