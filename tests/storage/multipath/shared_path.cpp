// SPDX-License-Identifier: Apache-2.0
#include "tests/storage/multipath/shared_path.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "storage/fence.hpp"

namespace uvd::test {

namespace {

using clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct job {
  core::vstore_req* req = nullptr;
  uint16_t op = 0;
  uint64_t offset = 0, length = 0;
  uint32_t epoch = 0;
  std::vector<std::byte> data;
  clock::time_point arrived{}, due{};
  bool replied = false;  // the client has its answer; the server may still run it
};

struct sp_dev {
  int fd = -1;
  uint64_t size = 0;
  bool read_only = false;
  std::string id;
  std::unique_ptr<storage::fence_record> rec;
  path_faults own;
  path_faults* f = nullptr;
  const core::vstore_host* host = nullptr;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::unique_ptr<job>> q;
  bool stopping = false;
  std::thread worker;

  // Answers are collected under mu and sent after it is released: a
  // completion may come straight back into submit.
  std::vector<std::pair<core::vstore_req*, int>> answers;
  void reply(job& j, int status) {
    j.replied = true;
    answers.emplace_back(j.req, status);
  }
  void send_answers(std::unique_lock<std::mutex>& lk) {
    if (answers.empty()) return;
    auto batch = std::move(answers);
    answers.clear();
    lk.unlock();
    for (auto& [req, st] : batch) host->complete(host->owner, req, st);
    lk.lock();
  }
  int execute(job& j);
  void run();
};

int sp_dev::execute(job& j) {
  const uint64_t bad = f->eio_offset.load();
  if (j.op != core::VSTORE_OP_FLUSH && bad >= j.offset && bad < j.offset + j.length) return -EIO;
  return rec->run(j.epoch, [&]() -> int {
    f->executed.fetch_add(1);
    switch (j.op) {
      case core::VSTORE_OP_READ: {
        j.data.resize(j.length);
        ssize_t n = pread(fd, j.data.data(), j.length, static_cast<off_t>(j.offset));
        return n == static_cast<ssize_t>(j.length) ? 0 : -EIO;
      }
      case core::VSTORE_OP_WRITE: {
        f->writes.fetch_add(1);
        ssize_t n = pwrite(fd, j.data.data(), j.length, static_cast<off_t>(j.offset));
        return n == static_cast<ssize_t>(j.length) ? 0 : -EIO;
      }
      case core::VSTORE_OP_FLUSH:
        return fdatasync(fd) == 0 ? 0 : -errno;
    }
    return -EINVAL;
  });
}

void sp_dev::run() {
  std::unique_lock lk(mu);
  for (;;) {
    const auto now = clock::now();
    const auto mode = f->get();
    const auto client_timeout = std::chrono::milliseconds(f->client_timeout_ms.load());
    if (stopping || mode == path_fault::closed) {
      // The connection is gone: the client hears so, the server drops the work.
      for (auto& j : q)
        if (!j->replied) reply(*j, -ENOTCONN);
      q.clear();
      send_answers(lk);
      if (stopping) return;
    }
    for (auto& j : q)
      if (!j->replied && now - j->arrived > client_timeout) reply(*j, -ETIMEDOUT);
    send_answers(lk);
    job* next = nullptr;
    auto wake = now + 5ms;
    if (mode != path_fault::silent) {
      for (auto& j : q) {
        if (j->due <= now) {
          next = j.get();
          break;
        }
        wake = std::min(wake, j->due);
      }
    }
    if (!next) {
      cv.wait_until(lk, wake);
      continue;
    }
    std::unique_ptr<job> j;
    for (auto it = q.begin(); it != q.end(); ++it)
      if (it->get() == next) {
        j = std::move(*it);
        q.erase(it);
        break;
      }
    lk.unlock();
    int st = execute(*j);
    if (st == -ESTALE) {
      f->refused.fetch_add(1);
      if (j->replied) f->late_refused.fetch_add(1);
      if (j->op == core::VSTORE_OP_WRITE) f->refused_writes.fetch_add(1);
    }
    lk.lock();
    if (!j->replied) {
      if (st == 0 && j->op == core::VSTORE_OP_READ) {
        const std::byte* src = j->data.data();
        uint64_t left = j->length;
        for (uint32_t i = 0; i < j->req->iovcnt && left; ++i) {
          uint64_t n = std::min<uint64_t>(left, j->req->iov[i].iov_len);
          std::memcpy(j->req->iov[i].iov_base, src, n);
          src += n;
          left -= n;
        }
      }
      reply(*j, st);
      send_answers(lk);
    }
  }
}

void set_err(const core::vstore_open_params* p, const std::string& msg) {
  if (p->errbuf && p->errbuf_len) std::snprintf(p->errbuf, p->errbuf_len, "%s", msg.c_str());
}

int sp_open(const core::vstore_open_params* p, void** handle) {
  auto d = std::make_unique<sp_dev>();
  d->f = p->context ? static_cast<path_faults*>(p->context) : &d->own;
  d->host = p->host;
  d->read_only = p->flags & core::VSTORE_OPEN_READ_ONLY;
  d->fd = ::open(p->target, (d->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (d->fd < 0) {
    set_err(p, std::string("open ") + p->target + ": " + std::strerror(errno));
    return -errno;
  }
  struct stat st {};
  fstat(d->fd, &st);
  d->size = static_cast<uint64_t>(st.st_size);
  d->id = "shared:dev=" + std::to_string(st.st_dev) + ":ino=" + std::to_string(st.st_ino);
  auto rec = storage::fence_record::open(storage::fence_record::path_for(p->target));
  if (!rec) {
    ::close(d->fd);
    set_err(p, rec.err().what());
    return -rec.err().errnum();
  }
  d->rec = std::move(*rec);
  sp_dev* raw = d.get();
  d->worker = std::thread([raw] { raw->run(); });
  *handle = d.release();
  return 0;
}

void sp_release(void* handle) {
  auto* d = static_cast<sp_dev*>(handle);
  {
    std::lock_guard lk(d->mu);
    d->stopping = true;
    d->cv.notify_all();
  }
  d->worker.join();
  ::close(d->fd);
  delete d;
}

int sp_info(void* handle, core::vstore_info* out) {
  auto* d = static_cast<sp_dev*>(handle);
  *out = {};
  out->size = d->size;
  out->block_size = 512;
  out->features = core::VSTORE_F_FLUSH;
  out->read_only = d->read_only;
  std::snprintf(out->id, sizeof out->id, "%s", d->id.c_str());
  return 0;
}

int sp_submit(void* handle, core::vstore_req* const* reqs, uint32_t n) {
  auto* d = static_cast<sp_dev*>(handle);
  const auto mode = d->f->get();
  if (mode == path_fault::closed) return -ENOTCONN;
  const auto now = clock::now();
  const auto delay = std::chrono::milliseconds(d->f->write_delay_ms.load());
  std::vector<core::vstore_req*> refuse_now;
  {
    std::lock_guard lk(d->mu);
    for (uint32_t i = 0; i < n; ++i) {
      core::vstore_req* r = reqs[i];
      if (mode == path_fault::fail) {
        refuse_now.push_back(r);
        continue;
      }
      auto j = std::make_unique<job>();
      j->req = r;
      j->op = r->opcode;
      j->offset = r->offset;
      j->length = r->length;
      j->epoch = r->epoch;
      j->arrived = now;
      j->due = now + (r->opcode == core::VSTORE_OP_WRITE ? delay : 0ms);
      if (r->opcode == core::VSTORE_OP_WRITE) {  // "sent over the wire"
        j->data.resize(r->length);
        std::byte* dst = j->data.data();
        for (uint32_t k = 0; k < r->iovcnt; ++k) {
          std::memcpy(dst, r->iov[k].iov_base, r->iov[k].iov_len);
          dst += r->iov[k].iov_len;
        }
      }
      if (mode == path_fault::fail_late) {
        refuse_now.push_back(r);
        j->replied = true;
      }
      d->q.push_back(std::move(j));
    }
    d->cv.notify_all();
  }
  for (auto* r : refuse_now) d->host->complete(d->host->owner, r, -ECONNRESET);
  return static_cast<int>(n);
}

int sp_fence(void* handle, uint32_t epoch) {
  auto* d = static_cast<sp_dev*>(handle);
  const auto give_up = clock::now() + std::chrono::milliseconds(d->f->fence_timeout_ms.load());
  for (;;) {
    auto mode = d->f->get();
    if (mode == path_fault::fail || mode == path_fault::fail_late) return -ECONNRESET;
    if (mode == path_fault::closed) return -ENOTCONN;
    if (mode != path_fault::silent) break;
    if (clock::now() >= give_up) return -ETIMEDOUT;
    std::this_thread::sleep_for(2ms);
  }
  if (epoch == 0) {
    auto e = d->rec->current();
    return e ? static_cast<int>(*e) : -e.err().errnum();
  }
  auto r = d->rec->advance(epoch);
  if (!r) return -r.err().errnum();
  d->f->fences.fetch_add(1);
  return 0;
}

}  // namespace

const core::vstore_ops shared_path_ops{
    .abi_version = core::VSTORE_ABI_VERSION,
    .struct_size = sizeof(core::vstore_ops),
    .name = "shared-path",
    .description = "test back end over a shared image with a fence record and fault injection",
    .open = sp_open,
    .release = sp_release,
    .info = sp_info,
    .ctx_size = nullptr,
    .submit = sp_submit,
    .probe = nullptr,
    .poll = nullptr,
    .fence = sp_fence,
};

}  // namespace uvd::test
