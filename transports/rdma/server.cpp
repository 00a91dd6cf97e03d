// SPDX-License-Identifier: Apache-2.0
// The 3leaf storage server: exports Vstores to many RDMA clients.
//
// Threads: one rdma_cm thread (connect requests, established, disconnects),
// one service thread that visits the connections round-robin, reaping up to
// `batch` completions from each connection's CQ per turn and submitting the
// I/O RPCs it found as one batch to the export's Vstore. Vstore completions
// (any thread) post the reply on the connection's queue pair. A connection is
// torn down (QP, CQ, pool, PD, handles) by the service thread once it is
// closing and nothing of it is in flight.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "core/log.hpp"
#include "transports/rdma/protocol.hpp"
#include "transports/rdma/rdma.hpp"
#include "transports/rdma/server_check.hpp"
#include "transports/rdma/server_impl.hpp"
#include "transports/rdma/verbs.hpp"

namespace uvd::rdma {

using namespace server_detail;

server::impl::~impl() {
  for (int fd : {cm_wake, svc_wake, ep})
    if (fd >= 0) ::close(fd);
}

export_entry* server::impl::find_export(const std::string& name) {
  if (name.empty()) return exports.empty() ? nullptr : exports.front().get();
  std::string_view n = name;
  if (n.substr(0, 5) == "uuid:") n.remove_prefix(5);
  for (auto& e : exports)
    if (e->ex.name == name || e->ex.uuid == n) return e.get();
  return nullptr;
}

// --- connection management (rdma_cm thread) ---------------------------------

core::result<std::shared_ptr<conn>> server::impl::make_conn(const cm_event& ev, uint32_t qd) {
  auto c = std::make_shared<conn>();
  c->srv = this;
  c->qd = qd;
  c->nrecv = 2 * qd;
  rdma_cm_id* id = ev.id;  // owned by c only once everything is built
  auto r = build_conn(c, id);
  if (!r) {
    // The QP holds the CQ and PD: it goes first, then c frees the rest.
    if (id->qp) rdma_destroy_qp(id);
    return core::fail(std::move(r).err());
  }
  c->id.reset(id);
  return c;
}

core::result<void> server::impl::build_conn(const std::shared_ptr<conn>& c, rdma_cm_id* id) {
  ibv_pd* pd = ibv_alloc_pd(id->verbs);
  if (!pd) return core::fail(errno ? errno : ENOMEM, "ibv_alloc_pd");
  c->pd.reset(pd);
  ibv_comp_channel* cc = ibv_create_comp_channel(id->verbs);
  if (!cc) return core::fail(errno, "ibv_create_comp_channel");
  c->cc.reset(cc);
  int fl = fcntl(cc->fd, F_GETFL);
  fcntl(cc->fd, F_SETFL, fl | O_NONBLOCK);
  const uint32_t n = c->nrecv;
  ibv_cq* cq = ibv_create_cq(id->verbs, static_cast<int>(3 * n + 1), c.get(), cc, 0);
  if (!cq) return core::fail(errno ? errno : ENOMEM, "ibv_create_cq");
  c->cq.reset(cq);
  // Send queue: n replies holding their receive slot, plus up to n unsignaled
  // inline replies not yet known done (post_reply).
  if (auto r = create_rc_qp(id, pd, cq, 2 * n, n, 1, 256, &c->max_inline); !r) return core::fail(std::move(r).err());
  c->sq_cap = 2 * n;
  auto m = registered_buffer::make(pd, size_t{n} * 2 * msg_size, IBV_ACCESS_LOCAL_WRITE, "RPC buffers");
  if (!m) return core::fail(std::move(m).err());
  c->msgs = std::move(*m);
  // The client's pool: its own allocation and MR in its own PD.
  auto p = registered_buffer::make(pd, size_t{opts.segments} * opts.segment_size,
                                   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE,
                                   "client pool");
  if (!p) return core::fail(std::move(p).err());
  c->pool = std::move(*p);
  if (auto r = c->handles.assign(opts.segments); !r) return core::fail(std::move(r).err());
  c->ctx.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    c->ctx[i].c = c.get();
    c->ctx[i].slot = i;
    if (int rc = post_recv(id->qp, wr_id(WR_RECV, i), c->recv_buf(i), msg_size, c->msgs.lkey()); rc < 0)
      return core::fail(-rc, "ibv_post_recv");
  }
  epoll_event e{};
  e.events = EPOLLIN;
  e.data.ptr = c.get();
  if (epoll_ctl(ep, EPOLL_CTL_ADD, cc->fd, &e) != 0) return core::fail(errno, "epoll_ctl");
  return core::ok();
}

void server::impl::on_connect_request(const cm_event& ev) {
  auto reject = [&](int err, const std::string& why) {
    spdlog::warn("rdma server: refusing a connection: {}", why);
    rejected.fetch_add(1, std::memory_order_relaxed);
    std::byte buf[hello_size];
    conn_accept a;
    a.status = err;
    encode_accept(a, buf);
    rdma_reject(ev.id, buf, hello_size);
    rdma_destroy_id(ev.id);
  };
  auto hello = decode_hello(ev.private_data);
  if (!hello) return reject(EPROTO, hello.err().message);
  if (hello->min_version > protocol_version || hello->max_version < protocol_version)
    return reject(EPROTONOSUPPORT, "client speaks 3leaf versions " + std::to_string(hello->min_version) + ".." +
                                       std::to_string(hello->max_version));
  {
    std::lock_guard lk(conns_mu);
    if (conns.size() >= opts.max_clients) return reject(EBUSY, "already " + std::to_string(conns.size()) + " clients");
  }
  uint32_t qd = std::clamp<uint32_t>(hello->queue_depth, 1, opts.queue_depth);
  auto c = make_conn(ev, qd);
  if (!c) {
    return reject(c.err().errnum(), c.err().what());
  }
  std::byte buf[hello_size];
  conn_accept a;
  a.queue_depth = static_cast<uint16_t>(qd);
  encode_accept(a, buf);
  ibv_device_attr dev{};
  ibv_query_device(ev.id->verbs, &dev);
  rdma_conn_param cp{};
  cp.private_data = buf;
  cp.private_data_len = hello_size;
  // rdma_cm hands a connect request's values over from our side's point of
  // view: responder_resources is what the client's RDMA READs need of us.
  cp.responder_resources = static_cast<uint8_t>(std::min<int>(ev.responder_resources, dev.max_qp_rd_atom));
  cp.initiator_depth = 0;
  cp.rnr_retry_count = 7;
  {
    std::lock_guard lk(conns_mu);
    (*c)->serial = next_serial++;
    conns.emplace(ev.id, *c);
    ++conns_gen;
  }
  if (rdma_accept(ev.id, &cp) != 0) {
    spdlog::warn("rdma server: rdma_accept: {}", std::strerror(errno));
    (*c)->closing = true;
    wake_svc();
    return;
  }
  // A client that outruns its credits waits 10 us per RNR retry, not the
  // 655 ms that a zero timer (rdma_cm's usual) means.
  ibv_qp_attr qa{};
  qa.min_rnr_timer = 1;
  if (int rc = ibv_modify_qp(ev.id->qp, &qa, IBV_QP_MIN_RNR_TIMER); rc != 0)
    spdlog::debug("rdma server: cannot lower the RNR timer: {}", std::strerror(rc));
  accepted.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("rdma server: client {} connected, queue depth {}, pool {} x {} bytes", (*c)->serial, qd, opts.segments,
               opts.segment_size);
}

void server::impl::cm_loop() {
  while (!stop_cm.load()) {
    pollfd p[2] = {{ch->fd, POLLIN, 0}, {cm_wake, POLLIN, 0}};
    if (::poll(p, 2, 1000) <= 0) continue;
    if (!(p[0].revents & POLLIN)) continue;
    auto ev = next_cm_event(ch.get(), 0);
    if (!ev) continue;
    switch (ev->type) {
      case RDMA_CM_EVENT_CONNECT_REQUEST:
        on_connect_request(*ev);
        break;
      case RDMA_CM_EVENT_ESTABLISHED:
        break;
      case RDMA_CM_EVENT_DISCONNECTED:
      case RDMA_CM_EVENT_CONNECT_ERROR:
      case RDMA_CM_EVENT_UNREACHABLE:
      case RDMA_CM_EVENT_REJECTED:
      case RDMA_CM_EVENT_DEVICE_REMOVAL:
      case RDMA_CM_EVENT_TIMEWAIT_EXIT: {
        std::lock_guard lk(conns_mu);
        auto it = conns.find(ev->id);
        if (it != conns.end() && !it->second->closing.exchange(true)) {
          spdlog::info("rdma server: client {} {}", it->second->serial, cm_event_name(ev->type));
          wake_svc();
        }
        break;
      }
      default:
        spdlog::debug("rdma server: rdma_cm event {}", cm_event_name(ev->type));
    }
  }
}

// --- service thread ----------------------------------------------------------

void server::impl::answer_fences(const std::vector<uint64_t>& cookies) {
  for (uint64_t cookie : cookies) {
    auto* x = reinterpret_cast<io_ctx*>(cookie);
    conn& c = *x->c;
    {
      std::lock_guard lk(c.mu);
      c.gate->done(x->id);
    }
    reply_status(c, x->slot, x->id, 0);
    if (c.in_flight.fetch_sub(1) == 1) wake_svc();
  }
}

void server::impl::on_recv(conn& c, uint32_t slot, uint32_t len) {
  // Receive buffers are local-write only: the client cannot change this
  // message after it arrived, and it is decoded (copied) once below.
  std::span<const std::byte> msg{c.recv_buf(slot), std::min<size_t>(len, msg_size)};
  auto h = decode_hdr(msg);
  if (!h) return refuse(c, slot, 0, refusal::malformed);
  const uint64_t id = h->id;
  switch (h->opcode) {
    case OP_LIST: {
      std::vector<list_entry> all;
      for (auto& e : exports) all.push_back({e->ex.name, e->ex.uuid, e->geom.read_only, e->geom.size});
      if (resolver.list) {
        std::vector<resolver_entry> more;
        resolver.list(resolver.ctx, &more);
        for (auto& m : more) {
          auto d = dynamic.find(m.name);  // an open one has its UUID already
          all.push_back({m.name, d != dynamic.end() ? d->second.entry->ex.uuid : std::string(), m.read_only, m.size});
        }
      }
      post_reply(c, slot, encode_list_reply(id, all, c.send_buf(slot)));
      return;
    }
    case OP_OPEN: {
      if (c.gate) return refuse(c, slot, id, refusal::not_open);
      auto o = decode_open(msg);
      if (!o) return refuse(c, slot, id, refusal::malformed);
      export_entry* e = find_export(o->name);
      open_reply rep;
      rep.hdr.id = id;
      int status = -ENOENT;
      if (!e && resolver.open) e = open_resolved(c, o->name, &status);
      if (!e) {
        rep.status = status;
        if (status == -ENOENT) spdlog::info("rdma server: client {} asked for unknown export '{}'", c.serial, o->name);
        post_reply(c, slot, encode_open_reply(rep, c.send_buf(slot)));
        return;
      }
      rep.block_size = e->geom.block_size;
      rep.size = e->geom.size;
      rep.features = e->ex.features;
      rep.read_only = e->geom.read_only || (o->flags & OPEN_READ_ONLY) ? 1 : 0;
      rep.segment_size = opts.segment_size;
      rep.nsegs = opts.segments;
      rep.max_segs = opts.max_segs_per_rpc;
      rep.epoch = e->epochs.current();
      std::snprintf(rep.uuid, sizeof rep.uuid, "%s", e->ex.uuid.c_str());
      for (uint32_t i = 0; i < opts.segments; ++i)
        rep.pool[i] = {c.handles.handle_of(i), c.pool.addr() + uint64_t{i} * opts.segment_size, c.pool.rkey(),
                       opts.segment_size};
      {
        std::lock_guard lk(c.mu);
        c.exp = e;
        c.gate.emplace(opts.segment_size, e->geom, (o->flags & OPEN_READ_ONLY) != 0, std::move(c.handles));
      }
      spdlog::info("rdma server: client {} opened export '{}' ({})", c.serial, e->ex.name, e->ex.uuid);
      post_reply(c, slot, encode_open_reply(rep, c.send_buf(slot)));
      return;
    }
    case OP_FENCE: {
      if (!c.gate) return refuse(c, slot, id, refusal::not_open);
      if (h->length != hdr_size) return refuse(c, slot, id, refusal::malformed);
      refusal why;
      {
        std::lock_guard lk(c.mu);
        why = c.gate->admit_id(id);
      }
      if (why != refusal::none) return refuse(c, slot, id, why);
      io_ctx& x = c.ctx[slot];
      x.id = id;
      c.in_flight.fetch_add(1);
      const uint32_t e = h->epoch;
      if (e) spdlog::info("rdma server: client {} fences export '{}' at epoch {}", c.serial, c.exp->ex.name, e);
      if (c.exp->ex.fence) {
        // The disk keeps the epoch (storage/fence: shared by every back end
        // of the image); advancing it waits for I/O in flight, maybe in other
        // processes, so not on the service thread.
        callbacks.fetch_add(1);
        std::thread([this, &c, &x, e] {
          int rc = c.exp->ex.fence(c.exp->ex.disk, e);
          {
            std::lock_guard lk(c.mu);
            c.gate->done(x.id);
          }
          reply_status(c, x.slot, x.id, rc < 0 ? rc : 0, rc < 0 ? 0 : (e ? e : rc));
          if (c.in_flight.fetch_sub(1) == 1) wake_svc();
          callbacks.fetch_sub(1);
        }).detach();
        return;
      }
      if (e == 0) {  // a query
        {
          std::lock_guard lk(c.mu);
          c.gate->done(id);
        }
        reply_status(c, slot, id, 0);
        if (c.in_flight.fetch_sub(1) == 1) wake_svc();
        return;
      }
      int rc = c.exp->epochs.fence(e, reinterpret_cast<uint64_t>(&x));
      if (rc == 1) {
        answer_fences({reinterpret_cast<uint64_t>(&x)});
      } else if (rc < 0) {
        {
          std::lock_guard lk(c.mu);
          c.gate->done(id);
        }
        reply_status(c, slot, id, rc);
        if (c.in_flight.fetch_sub(1) == 1) wake_svc();
      }
      return;
    }
    case OP_READ:
    case OP_WRITE:
    case OP_FLUSH:
    case OP_DISCARD:
    case OP_WRITE_ZEROES:
      break;
    default:
      return refuse(c, slot, id, refusal::unknown_opcode);
  }
  if (!c.gate) return refuse(c, slot, id, refusal::not_open);
  io_rpc rpc;
  if (auto r = decode_io(msg, &rpc); !r) return refuse(c, slot, id, refusal::malformed);
  checked_io chk;
  refusal why;
  {
    std::lock_guard lk(c.mu);
    // A disk that fences checks epochs itself, under its record's lock.
    why = c.gate->check_io(rpc, c.exp->ex.fence ? 0 : c.exp->epochs.current(), &chk);
  }
  if (why != refusal::none) return refuse(c, slot, id, why);
  // The authoritative epoch check, atomic with counting the I/O in flight.
  if (!c.exp->epochs.admit(c.exp->ex.fence ? 0 : chk.epoch)) {
    std::lock_guard lk(c.mu);
    c.gate->done(id);
    why = refusal::stale_epoch;
  }
  if (why != refusal::none) return refuse(c, slot, id, why);
  io_ctx& x = c.ctx[slot];
  x.id = id;
  x.epoch = chk.epoch;
  x.io = {};
  x.io.opcode = vstore_opcode(chk.opcode);
  x.io.flags = chk.flags;
  x.io.epoch = chk.epoch;
  x.io.offset = chk.offset;
  x.io.length = chk.length;
  for (uint16_t i = 0; i < chk.nseg; ++i)
    x.iov[i] = {c.pool.data() + size_t{chk.segs[i].segment} * opts.segment_size + chk.segs[i].offset, chk.segs[i].length};
  x.io.iov = chk.nseg ? x.iov : nullptr;
  x.io.iovcnt = chk.nseg;
  x.io.done = &impl::on_io_done;
  x.io.user = &x;
  uint64_t now = c.in_flight.fetch_add(1) + 1;
  for (uint64_t m = max_in_flight.load(); now > m && !max_in_flight.compare_exchange_weak(m, now);) {
  }
  c.batch.push_back(&x.io);
}

void server::impl::teardown(conn& c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c.cc->fd, nullptr);
  close_resolved(c);
  if (c.gate) c.gate->revoke();
  c.handles.revoke();
  rdma_disconnect(c.id.get());
  if (c.id->qp) rdma_destroy_qp(c.id.get());
  c.cq.reset();
  c.cc.reset();
  c.msgs.reset();
  c.pool.reset();
  c.pd.reset();
  c.id.reset();
  spdlog::info("rdma server: client {} gone after {} RPCs; its handles are revoked", c.serial, c.rpcs.load());
}

void server::impl::svc_loop() {
  using clock = std::chrono::steady_clock;
  std::vector<std::shared_ptr<conn>> snap;
  uint64_t gen = ~0ull;
  size_t rr = 0;
  auto last_work = clock::now();
  for (;;) {
    {
      std::lock_guard lk(conns_mu);
      if (gen != conns_gen) {
        snap.clear();
        for (auto& [id, c] : conns) snap.push_back(c);
        std::sort(snap.begin(), snap.end(), [](auto& a, auto& b) { return a->serial < b->serial; });
        gen = conns_gen;
      }
    }
    if (stop_svc.load() && snap.empty()) return;
    bool work = false;
    for (size_t k = 0; k < snap.size(); ++k) {
      conn& c = *snap[(rr + k) % snap.size()];
      if (stop_svc.load() && !c.closing.exchange(true)) rdma_disconnect(c.id.get());
      if (!c.closing.load()) work |= service(c);
    }
    ++rr;
    for (auto& c : snap) {
      if (!c->closing.load() || c->in_flight.load() != 0) continue;
      std::lock_guard lk(conns_mu);
      if (conns.erase(c->id.get())) ++conns_gen;
      teardown(*c);
    }
    if (work) {
      last_work = clock::now();
      continue;
    }
    if (opts.busy_poll_us && clock::now() - last_work < std::chrono::microseconds(opts.busy_poll_us)) {
      sched_yield();  // poll without holding the CPU: the disk's completion thread may need it
      continue;
    }
    for (auto& c : snap)
      if (c->cq) ibv_req_notify_cq(c->cq.get(), 0);
    for (auto& c : snap)  // the final re-check after arming
      if (!c->closing.load()) work |= service(*c);
    if (work) continue;
    epoll_event evs[32];
    int n = epoll_wait(ep, evs, 32, 100);
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.ptr == nullptr) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = ::read(svc_wake, &v, sizeof v);
        continue;
      }
      auto* c = static_cast<conn*>(evs[i].data.ptr);
      ibv_cq* cq = nullptr;
      void* ctx = nullptr;
      // One event per wake-up: another one pending keeps the (level-triggered)
      // descriptor ready for the next epoll_wait, without a read that fails here.
      if (ibv_get_cq_event(c->cc.get(), &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
    }
  }
}

// --- server -------------------------------------------------------------------

server::server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
server::~server() { stop(); }

core::result<std::unique_ptr<export_entry>> server_detail::make_export_entry(server_export e,
                                                                             const server_options& opts) {
  if (!e.submit || e.size == 0 || e.block_size == 0 || (e.block_size & (e.block_size - 1)))
    return core::fail(EINVAL, "rdma server: export '" + e.name + "' is not usable");
  if (opts.segment_size % e.block_size)
    return core::fail(EINVAL, "rdma server: segment size is not a multiple of export '" + e.name + "' block size");
  if (e.uuid.empty()) e.uuid = export_uuid(e.medium_id, e.name);
  if (!looks_like_uuid(e.uuid)) return core::fail(EINVAL, "rdma server: '" + e.uuid + "' is not a lowercase UUID");
  auto ent = std::make_unique<export_entry>();
  ent->ex = std::move(e);
  // A disk whose table fences only when opened for it (file:// without
  // fence=1) answers a query ENOTSUP: this server keeps the epoch then.
  if (ent->ex.fence && ent->ex.fence(ent->ex.disk, 0) == -ENOTSUP) ent->ex.fence = nullptr;
  ent->geom.size = ent->ex.size;
  ent->geom.block_size = ent->ex.block_size;
  ent->geom.read_only = ent->ex.read_only;
  ent->geom.max_transfer = opts.segment_size * std::min(opts.max_segs_per_rpc, opts.segments);
  return ent;
}

core::result<std::unique_ptr<server>> server::create(server_options opts, export_resolver resolver) {
  if (opts.listen.empty()) return core::fail(EINVAL, "rdma server: no listen address");
  if (opts.exports.empty() && !resolver.open) return core::fail(EINVAL, "rdma server: no exports");
  if (opts.segments == 0 || opts.segments > max_pool_segments)
    return core::fail(EINVAL, "rdma server: segments must be 1.." + std::to_string(max_pool_segments));
  if (opts.max_segs_per_rpc == 0 || opts.max_segs_per_rpc > max_segs_per_rpc)
    return core::fail(EINVAL, "rdma server: segments per RPC must be 1.." + std::to_string(max_segs_per_rpc));
  if (opts.queue_depth == 0 || opts.queue_depth > max_queue_depth)
    return core::fail(EINVAL, "rdma server: queue depth must be 1.." + std::to_string(max_queue_depth));
  if (opts.batch == 0) opts.batch = 1;
  auto p = std::make_unique<impl>();
  for (auto& e : opts.exports) {
    auto ent = make_export_entry(e, opts);
    if (!ent) return core::fail(std::move(ent).err());
    for (auto& o : p->exports)
      if (o->ex.name == (*ent)->ex.name || o->ex.uuid == (*ent)->ex.uuid)
        return core::fail(EEXIST, "rdma server: two exports named '" + e.name + "' or with UUID " + (*ent)->ex.uuid);
    e.uuid = (*ent)->ex.uuid;
    p->exports.push_back(std::move(*ent));
  }
  p->opts = opts;
  p->resolver = resolver;
  p->cm_wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  p->svc_wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  p->ep = epoll_create1(EPOLL_CLOEXEC);
  if (p->cm_wake < 0 || p->svc_wake < 0 || p->ep < 0) return core::fail(errno, "rdma server: eventfd/epoll");
  epoll_event we{};
  we.events = EPOLLIN;
  we.data.ptr = nullptr;
  epoll_ctl(p->ep, EPOLL_CTL_ADD, p->svc_wake, &we);

  rdma_event_channel* ch = rdma_create_event_channel();
  if (!ch) return core::fail(errno, "rdma server: rdma_create_event_channel (is the rdma_ucm module loaded, "
                                    "/dev/infiniband/rdma_cm present?)");
  p->ch.reset(ch);
  for (const std::string& l : opts.listen) {
    auto hp = split_host_port(l, default_port);
    if (!hp) return core::fail(std::move(hp).err());
    addrinfo hints{};
    hints.ai_flags = AI_PASSIVE;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* ai = nullptr;
    if (int rc = getaddrinfo(hp->first.c_str(), hp->second.c_str(), &hints, &ai); rc != 0)
      return core::fail(EINVAL, "rdma server: cannot resolve '" + l + "': " + gai_strerror(rc));
    rdma_cm_id* id = nullptr;
    if (rdma_create_id(p->ch.get(), &id, p.get(), RDMA_PS_TCP) != 0) {
      freeaddrinfo(ai);
      return core::fail(errno, "rdma server: rdma_create_id");
    }
    cm_id_ptr idp(id);
    int rc = rdma_bind_addr(id, ai->ai_addr);
    int e = errno;
    freeaddrinfo(ai);
    if (rc != 0)
      return core::fail(e, "rdma server: cannot bind " + l + " (no RDMA device has that address?)");
    if (rdma_listen(id, 64) != 0) return core::fail(errno, "rdma server: rdma_listen on " + l);
    p->listeners.push_back(std::move(idp));
  }
  return std::unique_ptr<server>(new server(std::move(p)));
}

core::result<void> server::start() {
  impl& p = *impl_;
  if (p.started) return core::ok();
  p.started = true;
  p.svc_thread = std::thread([&p] { p.svc_loop(); });
  p.cm_thread = std::thread([&p] { p.cm_loop(); });
  for (size_t i = 0; i < p.listeners.size(); ++i)
    spdlog::info("rdma server: listening on {} port {}", p.opts.listen[i], port(i));
  return core::ok();
}

void server::stop() {
  impl& p = *impl_;
  if (p.stopped) return;
  p.stopped = true;
  p.stop_cm = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(p.cm_wake, &one, sizeof one);
  if (p.cm_thread.joinable()) p.cm_thread.join();
  p.listeners.clear();  // no new clients
  p.stop_svc = true;
  p.wake_svc();
  if (p.svc_thread.joinable()) p.svc_thread.join();
  while (p.callbacks.load() != 0) std::this_thread::yield();
  spdlog::info("rdma server: stopped; {} clients served, {} RPCs, refused: {}", p.accepted.load(), p.served.load(),
               p.refused.to_string());
}

uint16_t server::port(size_t i) const {
  if (i >= impl_->listeners.size()) return 0;
  return ntohs(rdma_get_src_port(impl_->listeners[i].get()));
}

server_stats server::stats() const {
  server_stats s;
  const impl& p = *impl_;
  s.connections = p.accepted.load();
  s.rejected_connections = p.rejected.load();
  s.rpcs = p.served.load();
  s.refused = p.refused.total();
  s.refusals = p.refused.to_string();
  s.max_in_flight = p.max_in_flight.load();
  for (size_t i = 0; i < refusal_kinds && i < std::size(s.refused_by); ++i)
    s.refused_by[i] = p.refused.get(static_cast<refusal>(i));
  std::lock_guard lk(p.conns_mu);
  std::vector<std::pair<uint64_t, uint64_t>> per;
  for (auto& [id, c] : p.conns) {
    if (c->closing.load()) continue;
    ++s.active;
    per.emplace_back(c->serial, c->rpcs.load());
  }
  std::sort(per.begin(), per.end());
  for (auto& [serial, n] : per) s.per_client_rpcs.push_back(n);
  return s;
}

std::vector<std::pair<std::string, std::string>> server::export_ids() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& e : impl_->exports) out.emplace_back(e->ex.name, e->ex.uuid);
  return out;
}

// --- the C table for the plugin boundary ------------------------------------

namespace {

int api_start_resolving(const server_options* opts, const export_resolver* resolver, void** out, char* err,
                        size_t errlen) {
  // Inside the plugin, spdlog is a copy of its own: point it at stderr too.
  if (auto r = core::init_logging(opts->log_level); !r) {
    std::snprintf(err, errlen, "%s", r.err().what().c_str());
    return -EINVAL;
  }
  auto s = server::create(*opts, resolver ? *resolver : export_resolver{});
  if (!s) {
    std::snprintf(err, errlen, "%s", s.err().what().c_str());
    return -s.err().errnum();
  }
  if (auto r = (*s)->start(); !r) {
    std::snprintf(err, errlen, "%s", r.err().what().c_str());
    return -r.err().errnum();
  }
  *out = s->release();
  return 0;
}
int api_start(const server_options* opts, void** out, char* err, size_t errlen) {
  return api_start_resolving(opts, nullptr, out, err, errlen);
}
void api_stats(void* srv, server_stats* out) { *out = static_cast<server*>(srv)->stats(); }
void api_export_ids(void* srv, std::vector<std::pair<std::string, std::string>>* out) {
  *out = static_cast<server*>(srv)->export_ids();
}
uint16_t api_port(void* srv, size_t i) { return static_cast<server*>(srv)->port(i); }
void api_stop_and_free(void* srv) { delete static_cast<server*>(srv); }

constexpr server_api the_api{
    .abi_version = SERVER_API_VERSION,
    .struct_size = sizeof(server_api),
    .start = api_start,
    .stats = api_stats,
    .export_ids = api_export_ids,
    .port = api_port,
    .stop_and_free = api_stop_and_free,
    .start_resolving = api_start_resolving,
};

}  // namespace

const server_api* server_entry() { return &the_api; }

}  // namespace uvd::rdma
