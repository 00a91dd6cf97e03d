// SPDX-License-Identifier: Apache-2.0
#include "storage/nbd/connection.hpp"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

namespace uvd::storage::nbd::detail {

namespace {

constexpr size_t rbuf_size = 256 * 1024;   // staged input: many small requests per recv
constexpr size_t keep_bytes = 16u << 20;   // payload buffers a connection keeps for reuse
constexpr size_t buf_align = 4096;         // O_DIRECT-friendly payload buffers
constexpr size_t buf_round = 64 * 1024;
constexpr int max_iov = 256;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool is_write_type(uint16_t t) { return t == NBD_CMD_WRITE || t == NBD_CMD_TRIM || t == NBD_CMD_WRITE_ZEROES; }

}  // namespace

void traffic_counters::count(uint16_t type, uint64_t bytes, bool failed) noexcept {
  constexpr auto r = std::memory_order_relaxed;
  if (failed) {
    errors.fetch_add(1, r);
    return;
  }
  switch (type) {
    case NBD_CMD_READ:
      reads.fetch_add(1, r);
      read_bytes.fetch_add(bytes, r);
      break;
    case NBD_CMD_WRITE:
      writes.fetch_add(1, r);
      write_bytes.fetch_add(bytes, r);
      break;
    case NBD_CMD_FLUSH: flushes.fetch_add(1, r); break;
    case NBD_CMD_TRIM: trims.fetch_add(1, r); break;
    case NBD_CMD_WRITE_ZEROES: write_zeroes.fetch_add(1, r); break;
    default: break;
  }
}

void traffic_counters::add(const traffic_stats& s) noexcept {
  constexpr auto r = std::memory_order_relaxed;
  reads.fetch_add(s.reads, r);
  writes.fetch_add(s.writes, r);
  flushes.fetch_add(s.flushes, r);
  trims.fetch_add(s.trims, r);
  write_zeroes.fetch_add(s.write_zeroes, r);
  read_bytes.fetch_add(s.read_bytes, r);
  write_bytes.fetch_add(s.write_bytes, r);
  errors.fetch_add(s.errors, r);
}

traffic_stats traffic_counters::snapshot() const noexcept {
  constexpr auto r = std::memory_order_relaxed;
  traffic_stats s;
  s.reads = reads.load(r);
  s.writes = writes.load(r);
  s.flushes = flushes.load(r);
  s.trims = trims.load(r);
  s.write_zeroes = write_zeroes.load(r);
  s.read_bytes = read_bytes.load(r);
  s.write_bytes = write_bytes.load(r);
  s.errors = errors.load(r);
  return s;
}

connection::connection(const server_shared& shared, int fd, uint64_t id, std::string peer, size_t preset_export)
    : shared_(shared), fd_(fd), id_(id), peer_(std::move(peer)), preset_export_(preset_export) {
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  slots_ = std::vector<slot>(shared.opts.max_in_flight);
  free_.reserve(slots_.size());
  for (size_t i = slots_.size(); i-- > 0;) {
    slots_[i].conn = this;
    slots_[i].io.user = &slots_[i];
    free_.push_back(&slots_[i]);
  }
  to_submit_.reserve(slots_.size());
}

connection::~connection() {
  if (fd_ >= 0) ::close(fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  for (slot& s : slots_) free_buf(s);
}

void connection::free_buf(slot& s) {
  if (s.buf) ::operator delete(s.buf, std::align_val_t{buf_align});
  s.buf = nullptr;
  s.cap = 0;
}

void connection::wake() noexcept {
  uint64_t one = 1;
  ssize_t n = ::write(wake_fd_, &one, sizeof one);
  (void)n;  // EAGAIN: the counter is already nonzero, the thread will wake
}

void connection::request_stop() noexcept {
  stop_requested_.store(true, std::memory_order_release);
  wake();
}

void connection::run() {
  if (wake_fd_ < 0) {
    spdlog::error("nbd: connection {} from {}: eventfd: {}", id_, peer_, std::strerror(errno));
    return;
  }
  bool ready = true;
  if (preset_export_ < shared_.exports.size())
    enter_transmission(preset_export_);
  else
    ready = do_handshake();
  if (ready) transmission();
  if (fd_ >= 0) ::close(fd_);  // the client learns at once, not when the server reaps this connection
  fd_ = -1;
  // Nothing is in flight any more: a resolved export (and the resolver's
  // hold, e.g. an attachment record) goes now too, not at the reaping.
  if (dyn_) {
    exp_ = nullptr;
    disk_ = nullptr;
    dyn_.reset();
  }
}

bool connection::send_all_blocking(std::span<const uint8_t> data, int64_t deadline_ms) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
    int64_t left = deadline_ms - now_ms();
    if (left <= 0 || stop_requested_.load(std::memory_order_acquire)) return false;
    pollfd p[2] = {{fd_, POLLOUT, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(p, 2, static_cast<int>(std::min<int64_t>(left, 1000))) < 0 && errno != EINTR) return false;
  }
  return true;
}

bool connection::do_handshake() {
  if (shared_.opts.resolver) dyn_ = std::make_unique<dynamic_exports>(shared_, client_info{peer_, listener_});
  handshake hs(shared_.descs, {}, dyn_.get());
  std::vector<uint8_t> out;
  hs.greet(out);
  int64_t deadline = now_ms() + shared_.opts.handshake_timeout_ms;
  bool stopping = false;
  uint8_t buf[4096];
  for (;;) {
    if (!out.empty()) {
      if (!send_all_blocking(out, deadline)) {
        spdlog::debug("nbd: connection {} from {}: handshake reply not delivered", id_, peer_);
        return false;
      }
      out.clear();
    }
    if (hs.closed()) {
      if (hs.clean_close())
        spdlog::debug("nbd: connection {} from {}: {}", id_, peer_, hs.close_reason());
      else
        spdlog::warn("nbd: connection {} from {}: handshake failed: {}", id_, peer_, hs.close_reason());
      return false;
    }
    if (hs.in_transmission()) break;
    if (!stopping && stop_requested_.load(std::memory_order_acquire)) {
      // Answer what the client asks next with NBD_REP_ERR_SHUTDOWN, briefly.
      stopping = true;
      hs.set_shutting_down();
      deadline = std::min(deadline, now_ms() + 200);
    }
    int64_t left = deadline - now_ms();
    if (left <= 0) {
      if (stopping)
        spdlog::debug("nbd: connection {} from {}: closed during the handshake, server stopping", id_, peer_);
      else
        spdlog::warn("nbd: connection {} from {}: handshake not finished within {} ms", id_, peer_,
                     shared_.opts.handshake_timeout_ms);
      return false;
    }
    pollfd p[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(p, 2, static_cast<int>(left)) < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (p[1].revents & POLLIN) {
      uint64_t v;
      ssize_t r = ::read(wake_fd_, &v, sizeof v);
      (void)r;
    }
    if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n == 0) {
      spdlog::debug("nbd: connection {} from {}: client left during the handshake", id_, peer_);
      return false;
    }
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      spdlog::debug("nbd: connection {} from {}: recv: {}", id_, peer_, std::strerror(errno));
      return false;
    }
    size_t used = hs.feed({buf, static_cast<size_t>(n)}, out);
    if (hs.in_transmission() && used < static_cast<size_t>(n)) {
      // Requests sent right behind NBD_OPT_GO / EXPORT_NAME.
      rbuf_ = std::make_unique<uint8_t[]>(rbuf_size);
      std::memcpy(rbuf_.get(), buf + used, static_cast<size_t>(n) - used);
      rend_ = static_cast<size_t>(n) - used;
    }
  }

  enter_transmission(hs.export_index());
  return true;
}

void connection::enter_transmission(size_t export_index) {
  exp_ = export_index < shared_.exports.size() ? shared_.exports[export_index].get() : dyn_->chosen();
  disk_ = exp_->cfg.disk.get();
  geo_ = exp_->geometry;
  exp_->connections.fetch_add(1, std::memory_order_relaxed);
  if (!rbuf_) rbuf_ = std::make_unique<uint8_t[]>(rbuf_size);
  spdlog::info("nbd: connection {} from {}: export '{}'", id_, peer_, exp_->cfg.name);
}

// ---- receive side (connection thread) ----

connection::slot* connection::acquire(uint64_t bytes) {
  slot* s;
  {
    std::lock_guard lk(mu_);
    if (free_.empty() || (bytes && in_flight_ > 0 && buffered_ + bytes > shared_.opts.max_buffered)) {
      thread_waiting_ = true;  // a release will wake us
      return nullptr;
    }
    s = free_.back();
    free_.pop_back();
    ++in_flight_;
    buffered_ += bytes;
    s->charged = bytes;
  }
  s->error = 0;
  s->with_data = false;
  s->next = nullptr;
  return s;
}

void connection::end(end_kind k, std::string why) {
  if (end_ != end_kind::none) return;
  end_ = k;
  end_why_ = std::move(why);
  if (rx_slot_) {  // a request whose payload never fully arrived: not executed, not answered
    release(rx_slot_);
    rx_slot_ = nullptr;
  }
  rxs_ = rx_state::header;
  // A client out of step gets no more replies; what is in flight still
  // completes (its buffers are ours until then) and its replies are dropped.
  if (k == end_kind::hard) ::shutdown(fd_, SHUT_RDWR);
}

void connection::submit_pending() {
  if (to_submit_.empty()) return;
  disk_->submit(std::span<vstore_io* const>(to_submit_.data(), to_submit_.size()));
  to_submit_.clear();
}

// Reads more input into rbuf_. False when nothing came (end_ may be set).
bool connection::fill_rbuf() {
  if (!readable_) return false;
  submit_pending();  // what is parsed already should not wait on the socket
  if (rpos_ > 0) {
    std::memmove(rbuf_.get(), rbuf_.get() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  size_t room = rbuf_size - rend_;
  ssize_t n = ::recv(fd_, rbuf_.get() + rend_, room, 0);
  if (n > 0) {
    rend_ += static_cast<size_t>(n);
    if (static_cast<size_t>(n) < room) readable_ = false;  // drained; poll before the next recv
    return true;
  }
  if (n == 0) {
    end(end_kind::eof, rend_ > rpos_ ? "client left in the middle of a request" : "client closed the connection");
    return false;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
    readable_ = errno == EINTR;
    return false;
  }
  end(end_kind::eof, std::string("recv: ") + std::strerror(errno));
  return false;
}

bool connection::start_request(const request& r, const request_verdict& v) {
  const bool data = v.action == request_action::execute && (r.type == NBD_CMD_READ || r.type == NBD_CMD_WRITE);
  const uint64_t bytes = data ? r.length : 0;
  slot* s = acquire(bytes);
  if (!s) {
    rx_blocked_ = true;
    return false;
  }
  rpos_ += NBD_REQUEST_SIZE;
  s->req = r;
  served_since_sleep_ = true;

  uint32_t error = v.action == request_action::reply_error ? v.error : NBD_SUCCESS;
  if (data && s->cap < bytes) {
    allocated_.fetch_sub(s->cap, std::memory_order_relaxed);
    free_buf(*s);
    size_t cap = (bytes + buf_round - 1) / buf_round * buf_round;
    s->buf = static_cast<std::byte*>(::operator new(cap, std::align_val_t{buf_align}, std::nothrow));
    if (s->buf) {
      s->cap = cap;
      allocated_.fetch_add(cap, std::memory_order_relaxed);
    } else {
      error = NBD_ENOMEM;
      spdlog::warn("nbd: connection {}: no memory for a {} byte buffer", id_, bytes);
    }
  }

  if (error != NBD_SUCCESS) {
    if (v.action == request_action::reply_error) {
      protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      spdlog::debug("nbd: connection {}: {} offset {} length {} flags {:#x}: {} ({})", id_, command_name(r.type),
                    r.offset, r.length, r.flags, error_name(error), v.why);
    }
    s->error = error;
    io_.count(r.type, 0, true);
    if (v.payload > 0) {  // drop the WRITE payload, then answer
      rx_slot_ = s;
      rx_left_ = v.payload;
      rxs_ = rx_state::discard;
    } else {
      queue_reply(s);
    }
    return true;
  }

  vstore_io& io = s->io;
  io.offset = r.offset;
  io.length = r.length;
  io.flags = 0;
  io.iov = nullptr;
  io.iovcnt = 0;
  io.done = &connection::on_done;
  const bool fua = r.flags & NBD_CMD_FLAG_FUA;
  switch (r.type) {
    case NBD_CMD_READ:
      io.opcode = core::VSTORE_OP_READ;
      break;
    case NBD_CMD_WRITE:
      io.opcode = core::VSTORE_OP_WRITE;
      if (fua) io.flags |= core::VSTORE_REQ_FUA;
      break;
    case NBD_CMD_FLUSH:
      io.opcode = core::VSTORE_OP_FLUSH;
      io.offset = io.length = 0;
      break;
    case NBD_CMD_TRIM:
      io.opcode = core::VSTORE_OP_DISCARD;
      if (fua) io.flags |= core::VSTORE_REQ_FUA;  // Vstore flushes after it where the transport lacks FUA
      break;
    case NBD_CMD_WRITE_ZEROES:
      io.opcode = core::VSTORE_OP_WRITE_ZEROES;
      if (fua) io.flags |= core::VSTORE_REQ_FUA;
      if (r.flags & NBD_CMD_FLAG_NO_HOLE) io.flags |= core::VSTORE_REQ_NO_UNMAP;
      break;
  }
  if (data) {
    s->data = {s->buf, r.length};
    io.iov = &s->data;
    io.iovcnt = 1;
  }
  if (is_write_type(r.type)) wrote_.store(true, std::memory_order_relaxed);
  if (r.type == NBD_CMD_WRITE) {
    rx_slot_ = s;
    rx_left_ = r.length;
    rxs_ = rx_state::payload;
  } else {
    to_submit_.push_back(&io);
  }
  return true;
}

// Parses the next header from rbuf_. False: wait (for input or a slot) or stop.
bool connection::rx_header() {
  if (rend_ - rpos_ < NBD_REQUEST_SIZE && (!fill_rbuf() || rend_ - rpos_ < NBD_REQUEST_SIZE)) return false;
  request r;
  if (!decode_request(std::span<const uint8_t, NBD_REQUEST_SIZE>(rbuf_.get() + rpos_, NBD_REQUEST_SIZE), &r)) {
    protocol_errors_.fetch_add(1, std::memory_order_relaxed);
    end(end_kind::hard, "bad request magic");
    return false;
  }
  request_verdict v = check_request(r, geo_);
  switch (v.action) {
    case request_action::soft_disconnect:
      rpos_ += NBD_REQUEST_SIZE;
      end(end_kind::disc, "client sent NBD_CMD_DISC");
      return false;
    case request_action::hard_disconnect:
      protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      end(end_kind::hard, std::string(command_name(r.type)) + " of " + std::to_string(r.length) + " bytes: " + v.why +
                              ", payload too long to skip");
      return false;
    default:
      return start_request(r, v);
  }
}

bool connection::rx() {
  rx_blocked_ = false;
  for (;;) {
    switch (rxs_) {
      case rx_state::header:
        if (!rx_header()) return false;
        break;
      case rx_state::payload:
      case rx_state::discard: {
        slot* s = rx_slot_;
        const bool keep = rxs_ == rx_state::payload;
        size_t avail = std::min<uint64_t>(rend_ - rpos_, rx_left_);
        if (avail > 0) {
          if (keep) std::memcpy(s->buf + (s->req.length - rx_left_), rbuf_.get() + rpos_, avail);
          rpos_ += avail;
          rx_left_ -= avail;
        }
        while (rx_left_ > 0) {
          if (!readable_) return false;
          submit_pending();
          uint8_t* dst;
          size_t want;
          if (keep) {
            dst = reinterpret_cast<uint8_t*>(s->buf) + (s->req.length - rx_left_);
            want = rx_left_;
          } else {  // rbuf_ is empty here: use it as scratch, never reading past the payload
            rpos_ = rend_ = 0;
            dst = rbuf_.get();
            want = std::min<uint64_t>(rx_left_, rbuf_size);
          }
          ssize_t n = ::recv(fd_, dst, want, 0);
          if (n > 0) {
            rx_left_ -= static_cast<size_t>(n);
            if (static_cast<size_t>(n) < want) readable_ = false;
            continue;
          }
          if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            readable_ = errno == EINTR;
            if (!readable_) return false;
            continue;
          }
          end(end_kind::eof, n == 0 ? "client left in the middle of a write payload"
                                    : std::string("recv: ") + std::strerror(errno));
          return false;
        }
        rx_slot_ = nullptr;
        rxs_ = rx_state::header;
        if (keep) to_submit_.push_back(&s->io);
        else queue_reply(s);
        break;
      }
    }
  }
}

// ---- completions and replies (any thread) ----

void connection::on_done(vstore_io* io, int status) {
  slot* s = static_cast<slot*>(io->user);
  connection* c = s->conn;
  c->callbacks_.fetch_add(1, std::memory_order_acq_rel);
  s->error = nbd_error_from_errno(status);
  s->with_data = s->req.type == NBD_CMD_READ && s->error == NBD_SUCCESS;
  c->io_.count(s->req.type, s->req.length, s->error != NBD_SUCCESS);
  if (status != 0)
    spdlog::debug("nbd: connection {}: {} offset {} length {} failed: {}", c->id_, command_name(s->req.type),
                  s->req.offset, s->req.length, std::strerror(status < 0 ? -status : status));
  c->queue_reply(s);
  c->callbacks_.fetch_sub(1, std::memory_order_acq_rel);
}

void connection::queue_reply(slot* s) {
  encode_simple_reply(s->hdr, s->error, s->req.handle);
  s->next = nullptr;
  bool drop = false, take = false;
  {
    std::lock_guard lk(mu_);
    if (broken_) {
      drop = true;
    } else {
      if (rq_tail_) rq_tail_->next = s;
      else rq_head_ = s;
      rq_tail_ = s;
      if (!sending_) sending_ = take = true;
    }
  }
  if (drop) release(s);
  else if (take) send_replies();
}

// Called holding the send role; never blocks. Gives the role back when the
// queue is empty, the socket is full (the connection thread then waits for
// POLLOUT) or the socket failed (every reply is dropped from then on).
void connection::send_replies() {
  iovec iov[max_iov];
  for (;;) {
    bool idle = false, waiting = false;
    {
      std::lock_guard lk(mu_);
      if (rq_head_) {
        if (out_tail_) out_tail_->next = rq_head_;
        else out_head_ = rq_head_;
        out_tail_ = rq_tail_;
        rq_head_ = rq_tail_ = nullptr;
      }
      if (!out_head_) {
        sending_ = false;
        want_pollout_ = false;
        idle = true;
        // The connection thread may be waiting for exactly this (the end of
        // the last send before it closes).
        waiting = thread_waiting_;
        thread_waiting_ = false;
      }
    }
    if (idle) {
      if (waiting) wake();
      return;
    }
    int n = 0;
    size_t off = out_off_;
    for (slot* s = out_head_; s && n + 2 <= max_iov; s = s->next, off = 0) {
      if (off < NBD_SIMPLE_REPLY_SIZE) {
        iov[n++] = {s->hdr + off, NBD_SIMPLE_REPLY_SIZE - off};
        if (s->with_data) iov[n++] = {s->buf, s->req.length};
      } else {
        size_t d = off - NBD_SIMPLE_REPLY_SIZE;
        iov[n++] = {s->buf + d, s->req.length - d};
      }
    }
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<size_t>(n);
    ssize_t w = ::sendmsg(fd_, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        {
          std::lock_guard lk(mu_);
          sending_ = false;
          want_pollout_ = true;
        }
        wake();
        return;
      }
      slot* drop;
      {
        std::lock_guard lk(mu_);
        broken_ = true;
        if (out_tail_) out_tail_->next = rq_head_;
        else out_head_ = rq_head_;
        drop = out_head_;
        out_head_ = out_tail_ = rq_head_ = rq_tail_ = nullptr;
        out_off_ = 0;
        sending_ = false;
        want_pollout_ = false;
      }
      while (drop) {
        slot* next = drop->next;
        release(drop);
        drop = next;
      }
      wake();
      return;
    }
    progress_.fetch_add(static_cast<uint64_t>(w), std::memory_order_relaxed);
    size_t left = static_cast<size_t>(w);
    while (left > 0 && out_head_) {
      slot* s = out_head_;
      size_t rem = NBD_SIMPLE_REPLY_SIZE + (s->with_data ? s->req.length : 0) - out_off_;
      if (left < rem) {
        out_off_ += left;
        break;
      }
      left -= rem;
      out_off_ = 0;
      out_head_ = s->next;
      if (!out_head_) out_tail_ = nullptr;
      release(s);
    }
  }
}

void connection::release(slot* s) {
  // Keep buffers for reuse, but not more than keep_bytes of them: memory a
  // burst of large requests needed goes back once the burst is over.
  if (s->cap && allocated_.load(std::memory_order_relaxed) > keep_bytes) {
    allocated_.fetch_sub(s->cap, std::memory_order_relaxed);
    free_buf(*s);
  }
  s->next = nullptr;
  bool w;
  {
    std::lock_guard lk(mu_);
    buffered_ -= s->charged;
    s->charged = 0;
    free_.push_back(s);
    --in_flight_;
    w = thread_waiting_;
    thread_waiting_ = false;
  }
  if (w) wake();
}

// ---- the connection thread's loop ----

// True when input arrived (or the client closed) within busy_poll_us.
bool connection::busy_poll() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(shared_.opts.busy_poll_us);
  do {
    char c;
    ssize_t n = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      readable_ = true;
      return true;
    }
    sched_yield();  // let a client or completion thread on this CPU run
  } while (std::chrono::steady_clock::now() < deadline);
  return false;
}

void connection::transmission() {
  const auto t0 = std::chrono::steady_clock::now();
  int64_t drain_since = 0;
  uint64_t drain_progress = 0;
  bool shut = false;
  for (;;) {
    if (end_ == end_kind::none && stop_requested_.load(std::memory_order_acquire))
      end(end_kind::stop, "server stopping");
    if (end_ == end_kind::none) rx();
    submit_pending();
    const bool blocked = end_ == end_kind::none && rx_blocked_;

    bool finished, want_out, broken;
    {
      std::lock_guard lk(mu_);
      finished = end_ != end_kind::none && in_flight_ == 0 && !sending_;
      want_out = want_pollout_;
      broken = broken_;
      if (!finished && (blocked || end_ != end_kind::none)) thread_waiting_ = true;
    }
    if (finished) break;
    if (broken && end_ == end_kind::none) {
      end(end_kind::eof, "client stopped taking replies");
      continue;  // re-evaluate as a connection that is ending (and wants release wake-ups)
    }

    // An ending connection only waits for its in-flight I/O to come back;
    // it re-checks every 100 ms as well as on wake-ups, so that a wake-up
    // lost to a race can delay its teardown but never leak it.
    int timeout = end_ != end_kind::none ? 100 : -1;
    if (end_ != end_kind::none && want_out) {
      // Leaving, with replies the client does not take: give it drain_timeout_ms.
      uint64_t p = progress_.load(std::memory_order_relaxed);
      int64_t now = now_ms();
      if (drain_since == 0 || p != drain_progress) {
        drain_since = now;
        drain_progress = p;
      }
      int64_t left = drain_since + shared_.opts.drain_timeout_ms - now;
      if (left <= 0 && !shut) {
        spdlog::warn("nbd: connection {}: client took no reply for {} ms, dropping the rest", id_,
                     shared_.opts.drain_timeout_ms);
        ::shutdown(fd_, SHUT_RDWR);
        shut = true;
      }
      timeout = static_cast<int>(std::clamp<int64_t>(left, 10, 1000));
    }

    const bool reading = end_ == end_kind::none && !blocked;
    if (reading && readable_) continue;  // interrupted recv: try again
    const bool want_in = reading;
    // A client that just got its replies usually sends the next request
    // within microseconds: look for it briefly before going to sleep, which
    // saves a cross-CPU wake-up per request at low queue depth.
    if (want_in && !want_out && served_since_sleep_ && shared_.opts.busy_poll_us > 0) {
      served_since_sleep_ = false;
      if (busy_poll()) continue;
    }
    pollfd p[2] = {{want_in || want_out ? fd_ : -1, static_cast<short>((want_in ? POLLIN : 0) | (want_out ? POLLOUT : 0)), 0},
                   {wake_fd_, POLLIN, 0}};
    if (::poll(p, 2, timeout) < 0 && errno != EINTR) {
      end(end_kind::hard, std::string("poll: ") + std::strerror(errno));
      continue;
    }
    if (p[1].revents & POLLIN) {
      uint64_t v;
      ssize_t r = ::read(wake_fd_, &v, sizeof v);
      (void)r;
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) readable_ = true;
    if (p[0].revents & (POLLOUT | POLLHUP | POLLERR)) {
      bool take = false;
      {
        std::lock_guard lk(mu_);
        if (!sending_ && want_pollout_) sending_ = take = true;
      }
      if (take) send_replies();
    }
  }

  // Nothing of ours is in flight; completions may still be on their way out.
  while (callbacks_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  if (wrote_.load(std::memory_order_relaxed)) {
    if (auto r = disk_->flush(); !r)
      spdlog::error("nbd: connection {}: flush of export '{}' at disconnect failed: {}", id_, exp_->cfg.name,
                    r.err().what());
  }
  ::close(fd_);
  fd_ = -1;

  traffic_stats st = io_.snapshot();
  exp_->totals.add(st);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  uint64_t perr = protocol_errors_.load(std::memory_order_relaxed);
  spdlog::info("nbd: connection {} from {} (export '{}') closed after {:.1f} s: {}; {}{}", id_, peer_,
               exp_->cfg.name, secs, end_why_, st.to_string(),
               perr ? ", " + std::to_string(perr) + " refused requests" : std::string());
}

}  // namespace uvd::storage::nbd::detail
