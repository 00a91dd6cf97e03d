// SPDX-License-Identifier: Apache-2.0
// xen_bench: the blkif path (storage::Vstore -> blkfront -> host-local grant
// ring -> blkback in `uvd xen-back`, another process, serving a memory disk)
// against, in the same run:
//   ring  the bare shared ring between two processes: blkif-sized requests and
//         responses on core/ring.hpp over a memfd, eventfd doorbells, no disk,
//         no grants. The limit for this design. Run twice: with the event
//         index (a side notifies only when the other asked) and notifying on
//         every push.
//   grants the 4K QD32 figure again on a second device whose front end does
//         not negotiate feature-persistent, so every request's grants are
//         mapped and unmapped through the host-local hypervisor.
//   nbd   `uvd serve` exporting the same kind of memory disk over a unix
//         socket, driven by the small NBD client below (fixed newstyle,
//         NBD_OPT_EXPORT_NAME, simple replies, QD requests pipelined on one
//         connection by one thread).
// Each figure is measured in rounds that interleave the paths (so load on the
// shared machine hits all of them alike); the median of the rounds is
// reported, with the spread.
//
//   xen_bench --uvd PATH [--seconds 2] [--rounds 3] [--size 256M] [--only "4K randread QD32"]
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core/uri.hpp"
#include "storage/vstore.hpp"
#include "transports/builtin.hpp"
#include "transports/xen/blkif.hpp"

extern char** environ;

namespace {

using namespace uvd;
using clk = std::chrono::steady_clock;

[[noreturn]] void die(const std::string& m) {
  std::fprintf(stderr, "xen_bench: %s\n", m.c_str());
  std::exit(1);
}

struct opts {
  std::string uvd;
  double seconds = 2;
  int rounds = 3;
  uint64_t size = 256ull << 20;
  std::string only;  // run only the figures whose label contains this (profiling)
};

uint64_t xorshift(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

// ---- servers: `uvd xen-back` and `uvd serve`, each its own process ----

struct server {
  pid_t pid = -1;
  ~server() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

void spawn(server& s, std::vector<std::string> args, int out_fd) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (out_fd >= 0) posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  if (posix_spawn(&s.pid, args[0].c_str(), &fa, nullptr, argv.data(), environ) != 0) die("cannot run " + args[0]);
  posix_spawn_file_actions_destroy(&fa);
}

std::string read_line(int fd, int timeout_ms) {
  std::string line;
  auto deadline = clk::now() + std::chrono::milliseconds(timeout_ms);
  while (clk::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char c;
    if (::read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

// ---- the blkif path ----

// Runs `qd` requests of `bs` bytes (random 4K-aligned offsets, or sequential)
// for `secs`, every completion submitting the next. Returns requests per second.
double vstore_rate(storage::Vstore& v, uint32_t bs, uint32_t qd, bool random, double secs, uint64_t size) {
  struct state;
  // Each slot draws its own offsets, so the completion path shares no lock
  // with the others (the NBD client below has none either).
  struct slot {
    storage::vstore_io io;
    iovec iov;
    std::vector<std::byte> buf;
    state* st;
    uint64_t seed;
  };
  struct state {
    storage::Vstore* v;
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> done{0}, errors{0}, next{0};
    std::atomic<uint32_t> live{0};
    uint64_t size = 0;
    uint32_t bs = 0;
    bool random = false;
    uint64_t offset(slot& s) {
      uint64_t b = random ? xorshift(s.seed) % (size / 4096) * 4096 / bs * bs
                          : (next.fetch_add(1, std::memory_order_relaxed) % (size / bs)) * bs;
      return std::min(b, size - bs);
    }
  } st;
  st.v = &v;
  st.size = size;
  st.bs = bs;
  st.random = random;
  std::vector<slot> slots(qd);
  uint64_t seed = 88172645463325252ull;
  for (auto& s : slots) {
    s.buf.resize(bs);
    s.iov = {s.buf.data(), bs};
    s.st = &st;
    s.seed = xorshift(seed) | 1;
    s.io.opcode = core::VSTORE_OP_READ;
    s.io.length = bs;
    s.io.iov = &s.iov;
    s.io.iovcnt = 1;
    s.io.user = &s;
    s.io.done = [](storage::vstore_io* io, int status) {
      auto* sl = static_cast<slot*>(io->user);
      state* t = sl->st;
      if (status) t->errors.fetch_add(1);
      t->done.fetch_add(1, std::memory_order_relaxed);
      if (t->stop.load(std::memory_order_relaxed)) {
        t->live.fetch_sub(1);
        return;
      }
      io->offset = t->offset(*sl);
      t->v->submit(io);
    };
  }
  st.live = qd;
  for (auto& s : slots) {
    s.io.offset = st.offset(s);
    v.submit(&s.io);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // warm-up
  uint64_t d0 = st.done.load();
  auto t0 = clk::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  uint64_t d1 = st.done.load();
  auto t1 = clk::now();
  st.stop = true;
  while (st.live.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (st.errors.load()) die("blkif requests failed");
  return double(d1 - d0) / std::chrono::duration<double>(t1 - t0).count();
}

// ---- the bare ring: two processes, one memfd, two eventfds ----

struct ring_shared {
  std::atomic<uint32_t> stop;
};

// The back side: answer every request, push once per batch.
[[noreturn]] void ring_back(void* mem, size_t ring_bytes, int req_fd, int rsp_fd, bool every) {
  xen::blk_back_ring r;
  if (!r.attach(mem, ring_bytes)) _exit(2);
  auto* sh = reinterpret_cast<ring_shared*>(static_cast<std::byte*>(mem) + ring_bytes);
  blkif_request req;
  for (;;) {
    bool any = false;
    core::ring_take t;
    while ((t = r.take_request(&req)) == core::ring_take::item) {
      blkif_response rsp{};
      rsp.id = req.id;
      rsp.operation = req.operation;
      rsp.status = BLKIF_RSP_OKAY;
      r.put_response(rsp);
      any = true;
    }
    if (t == core::ring_take::broken) _exit(3);
    if (any && (r.push_responses() || every)) {
      uint64_t one = 1;
      (void)::write(rsp_fd, &one, sizeof one);
    }
    if (sh->stop.load()) _exit(0);
    if (!r.final_check_for_requests()) {
      pollfd p{req_fd, POLLIN, 0};
      (void)::poll(&p, 1, 100);
      uint64_t v;
      (void)::read(req_fd, &v, sizeof v);
    }
  }
}

// Round trips per second at queue depth qd; every=true notifies on every push.
double ring_rate(uint32_t qd, bool every, double secs, uint32_t order) {
  size_t ring_bytes = (size_t{1} << order) * xen::page_size;
  int mfd = ::memfd_create("xen-bench-ring", MFD_CLOEXEC);
  if (mfd < 0 || ::ftruncate(mfd, static_cast<off_t>(ring_bytes + xen::page_size)) < 0) die("memfd");
  void* mem = ::mmap(nullptr, ring_bytes + xen::page_size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  if (mem == MAP_FAILED) die("mmap");
  int req_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), rsp_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  xen::blk_front_ring f;
  if (!f.init(mem, ring_bytes)) die("ring init");
  auto* sh = new (static_cast<std::byte*>(mem) + ring_bytes) ring_shared{};
  pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid == 0) ring_back(mem, ring_bytes, req_fd, rsp_fd, every);
  uint64_t id = 0, done = 0, d0 = 0;
  uint32_t out = 0;
  clk::time_point t0 = clk::now() + std::chrono::milliseconds(200);
  clk::time_point end = t0 + std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(secs));
  bool counting = false;
  blkif_response rsp;
  for (;;) {
    bool produced = false;
    while (out < qd && !f.full()) {
      blkif_request* r = f.next_request();
      r->operation = BLKIF_OP_READ;
      r->nr_segments = 1;
      r->id = id++;
      f.produce();
      ++out;
      produced = true;
    }
    if (produced && (f.push_requests() || every)) {
      uint64_t one = 1;
      (void)::write(req_fd, &one, sizeof one);
    }
    bool got = false;
    while (f.take_response(&rsp) == core::ring_take::item) {
      --out;
      ++done;
      got = true;
    }
    auto now = clk::now();
    if (!counting && now >= t0) {
      counting = true;
      d0 = done;
      t0 = now;
    }
    if (now >= end) break;
    if (!got && !f.final_check_for_responses()) {
      pollfd p{rsp_fd, POLLIN, 0};
      (void)::poll(&p, 1, 100);
      uint64_t v;
      (void)::read(rsp_fd, &v, sizeof v);
    }
  }
  double rate = double(done - d0) / std::chrono::duration<double>(clk::now() - t0).count();
  sh->stop = 1;
  uint64_t one = 1;
  (void)::write(req_fd, &one, sizeof one);
  int st;
  ::waitpid(pid, &st, 0);
  ::munmap(mem, ring_bytes + xen::page_size);
  ::close(mfd);
  ::close(req_fd);
  ::close(rsp_fd);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) die("ring back side failed");
  return rate;
}

// ---- a raw NBD client: one connection, qd requests pipelined ----

void put_be(uint8_t* p, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
uint64_t get_be(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | p[i];
  return v;
}
void full_write(int fd, const void* b, size_t n) {
  auto* p = static_cast<const uint8_t*>(b);
  while (n) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) die("nbd: send failed");
    p += k;
    n -= static_cast<size_t>(k);
  }
}
void full_read(int fd, void* b, size_t n) {
  auto* p = static_cast<uint8_t*>(b);
  while (n) {
    ssize_t k = ::recv(fd, p, n, 0);
    if (k <= 0) die("nbd: connection closed");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

int nbd_connect(const std::string& sock, const std::string& name) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) die("nbd: connect " + sock);
  uint8_t hello[18];
  full_read(fd, hello, sizeof hello);
  if (get_be(hello, 8) != 0x4e42444d41474943ull || get_be(hello + 8, 8) != 0x49484156454F5054ull)
    die("nbd: not a newstyle server");
  uint16_t sflags = static_cast<uint16_t>(get_be(hello + 16, 2));
  uint8_t cflags[4];
  put_be(cflags, (sflags & 1) | (sflags & 2), 4);  // FIXED_NEWSTYLE, NO_ZEROES as offered
  full_write(fd, cflags, 4);
  std::vector<uint8_t> opt(16 + name.size());
  put_be(opt.data(), 0x49484156454F5054ull, 8);
  put_be(opt.data() + 8, 1, 4);  // NBD_OPT_EXPORT_NAME
  put_be(opt.data() + 12, name.size(), 4);
  std::memcpy(opt.data() + 16, name.data(), name.size());
  full_write(fd, opt.data(), opt.size());
  uint8_t info[10 + 124];
  full_read(fd, info, (sflags & 2) ? 10 : sizeof info);
  return fd;
}

double nbd_rate(const std::string& sock, uint32_t bs, uint32_t qd, bool random, double secs, uint64_t size) {
  int fd = nbd_connect(sock, "disk");
  std::vector<uint8_t> data(bs);
  uint64_t seed = 88172645463325252ull, next = 0, done = 0, d0 = 0;
  auto send_one = [&](uint64_t handle) {
    uint8_t rq[28];
    uint64_t off = random ? xorshift(seed) % (size / 4096) * 4096 / bs * bs : (next++ % (size / bs)) * bs;
    put_be(rq, 0x25609513, 4);
    put_be(rq + 4, 0, 2);
    put_be(rq + 6, 0, 2);  // NBD_CMD_READ
    put_be(rq + 8, handle, 8);
    put_be(rq + 16, std::min(off, size - bs), 8);
    put_be(rq + 24, bs, 4);
    full_write(fd, rq, sizeof rq);
  };
  for (uint32_t i = 0; i < qd; ++i) send_one(i);
  clk::time_point t0 = clk::now() + std::chrono::milliseconds(200);
  clk::time_point end = t0 + std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(secs));
  bool counting = false;
  uint32_t out = qd;
  for (;;) {
    uint8_t rp[16];
    full_read(fd, rp, sizeof rp);
    if (get_be(rp, 4) != 0x67446698 || get_be(rp + 4, 4) != 0) die("nbd: bad reply");
    full_read(fd, data.data(), bs);
    ++done;
    --out;
    auto now = clk::now();
    if (!counting && now >= t0) {
      counting = true;
      d0 = done;
      t0 = now;
    }
    if (now >= end) break;
    send_one(get_be(rp + 8, 8));
    ++out;
  }
  double rate = double(done - d0) / std::chrono::duration<double>(clk::now() - t0).count();
  while (out--) {  // drain before closing, so the server sees a clean disconnect
    uint8_t rp[16];
    full_read(fd, rp, sizeof rp);
    full_read(fd, data.data(), bs);
  }
  uint8_t disc[28] = {};
  put_be(disc, 0x25609513, 4);
  put_be(disc + 6, 2, 2);  // NBD_CMD_DISC
  full_write(fd, disc, sizeof disc);
  ::close(fd);
  return rate;
}

// ---- the run ----

struct figure {
  std::string name;
  std::vector<double> v;
  double median() const {
    auto s = v;
    std::sort(s.begin(), s.end());
    return s.empty() ? 0 : s[s.size() / 2];
  }
  double lo() const { return v.empty() ? 0 : *std::min_element(v.begin(), v.end()); }
  double hi() const { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }
};

}  // namespace

int main(int argc, char** argv) {
  opts o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--uvd") o.uvd = next();
    else if (a == "--seconds") o.seconds = std::stod(next());
    else if (a == "--rounds") o.rounds = std::stoi(next());
    else if (a == "--only") o.only = next();
    else if (a == "--size") {
      auto n = core::parse_size(next());
      if (!n) die("bad --size");
      o.size = *n;
    } else {
      std::fprintf(stderr, "usage: xen_bench --uvd PATH [--seconds S] [--rounds N] [--size 256M] [--only LABEL]\n");
      return 2;
    }
  }
  if (o.uvd.empty() || ::access(o.uvd.c_str(), X_OK) != 0) die("--uvd PATH to a uvd binary (Release build) is needed");
  ::signal(SIGPIPE, SIG_IGN);
  char tmpl[] = "/tmp/xen-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) die("mkdtemp");
  std::string dir = tmpl, hub = dir + "/hub.sock", nbd = dir + "/nbd.sock";
  std::string disk = "memory:" + std::to_string(o.size >> 20) + "M";

  int p[2];
  if (::pipe2(p, O_CLOEXEC) < 0) die("pipe");
  int devnull = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  server xb, ns;
  // Two devices of the same back end: xvda for the front end that negotiates
  // persistent grants, xvdb for one that does not (every request's grants are
  // mapped and unmapped through the hypervisor, as without feature-persistent).
  spawn(xb,
        {o.uvd, "--log-level", "warn", "xen-back", "--hub", hub, "--disk", "1/51712=" + disk, "--disk",
         "1/51728=" + disk},
        p[1]);
  ::close(p[1]);
  std::string uri = read_line(p[0], 30000), uri_np = read_line(p[0], 30000);
  if (uri.rfind("xen://", 0) != 0 || uri_np.rfind("xen://", 0) != 0) die("uvd xen-back printed no URI");
  spawn(ns, {o.uvd, "--log-level", "warn", "serve", "--unix", nbd, "--export", "disk=" + disk}, devnull);
  for (int i = 0; i < 300 && ::access(nbd.c_str(), F_OK) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));

  // 128 ring slots of 32 segments (128 KiB, Linux blkfront's default): a 1 MiB
  // read is 4 ring requests, and 32 of them fit in flight at once.
  constexpr uint32_t order = 2;
  auto reg = transports::make_default_registry();
  storage::open_options oo;
  oo.queue_depth = 128;
  oo.options = "ring_order=" + std::to_string(order) + "&max_segments=32";
  auto v = storage::Vstore::open(*reg, uri, oo);
  if (!v) die("open " + uri + ": " + v.err().what());
  storage::open_options oo_np = oo;
  oo_np.options += "&persistent=0";
  auto v_np = storage::Vstore::open(*reg, uri_np, oo_np);
  if (!v_np) die("open " + uri_np + ": " + v_np.err().what());
  {  // write the disks once so every read finds real pages
    std::vector<std::byte> buf(1 << 20, std::byte{0x5a});
    for (auto* d : {&**v, &**v_np})
      for (uint64_t off = 0; off < o.size; off += buf.size())
        if (!d->write(off, buf.data(), buf.size())) die("fill");
  }

  std::printf("xen_bench: %u CPUs, %s disk, %.1f s per figure, %d rounds (median [min..max])\n",
              std::thread::hardware_concurrency(), disk.c_str(), o.seconds, o.rounds);
  std::fflush(stdout);
  struct wl {
    const char* label;
    uint32_t bs, qd;
    bool random;
  };
  const wl loads[] = {{"4K randread QD1", 4096, 1, true},
                      {"4K randread QD32", 4096, 32, true},
                      {"1M seqread QD1", 1 << 20, 1, false},
                      {"1M seqread QD32", 1 << 20, 32, false}};
  std::map<std::string, figure> f;
  auto wanted = [&](const std::string& label) { return o.only.empty() || label.find(o.only) != std::string::npos; };
  for (int r = 0; r < o.rounds; ++r) {
    for (const auto& l : loads) {
      if (!wanted(l.label)) continue;
      // Alternate the order each round so drift hits both paths alike.
      bool xen_first = (r % 2) == 0;
      for (int k = 0; k < 2; ++k) {
        if ((k == 0) == xen_first)
          f[std::string(l.label) + "|xen"].v.push_back(vstore_rate(**v, l.bs, l.qd, l.random, o.seconds, o.size));
        else
          f[std::string(l.label) + "|nbd"].v.push_back(nbd_rate(nbd, l.bs, l.qd, l.random, o.seconds, o.size));
      }
    }
    if (wanted("grants"))
      f["grants|per-request"].v.push_back(vstore_rate(**v_np, 4096, 32, true, o.seconds, o.size));
    for (uint32_t qd : {1u, 32u}) {
      if (!wanted("ring QD" + std::to_string(qd))) continue;
      f["ring QD" + std::to_string(qd) + "|event"].v.push_back(ring_rate(qd, false, o.seconds, order));
      f["ring QD" + std::to_string(qd) + "|every"].v.push_back(ring_rate(qd, true, o.seconds, order));
    }
    std::fprintf(stderr, "xen_bench: round %d of %d done\n", r + 1, o.rounds);
  }

  auto show = [&](const std::string& k, double scale, const char* unit) {
    const figure& x = f[k];
    std::printf("  %-26s %10.0f %-6s [%.0f..%.0f]\n", k.c_str(), x.median() * scale, unit, x.lo() * scale,
                x.hi() * scale);
  };
  // Ratios are taken per round (both sides measured back to back) and then
  // the median of those, so that load that comes and goes cancels out.
  auto ratio = [&](const std::string& a, const std::string& b) {
    figure r;
    for (size_t i = 0; i < f[a].v.size() && i < f[b].v.size(); ++i) r.v.push_back(f[a].v[i] / f[b].v[i]);
    return r;
  };
  auto show_ratio = [&](const std::string& label, const figure& r) {
    std::printf("  %-26s %10.2fx       [%.2f..%.2f]\n", label.c_str(), r.median(), r.lo(), r.hi());
  };
  std::printf("\nblkif (blkfront -> host-local ring -> blkback) vs NBD (unix socket), reads from the memory disk:\n");
  for (const auto& l : loads) {
    double scale = l.bs == 4096 ? 1.0 : double(l.bs) / (1 << 20);
    const char* unit = l.bs == 4096 ? "IOPS" : "MiB/s";
    show(std::string(l.label) + "|xen", scale, unit);
    show(std::string(l.label) + "|nbd", scale, unit);
    show_ratio(std::string(l.label) + " xen/nbd", ratio(std::string(l.label) + "|xen", std::string(l.label) + "|nbd"));
  }
  std::printf("\nblkif 4K randread QD32, persistent grants (xvda) vs grants mapped per request (xvdb):\n");
  f["grants|persistent"] = f["4K randread QD32|xen"];
  show("grants|persistent", 1, "IOPS");
  show("grants|per-request", 1, "IOPS");
  show_ratio("grants persistent/per-request", ratio("grants|persistent", "grants|per-request"));
  std::printf("\nbare ring, two processes, round trips per second:\n");
  for (const char* q : {"ring QD1", "ring QD32"}) {
    show(std::string(q) + "|event", 1, "msg/s");
    show(std::string(q) + "|every", 1, "msg/s");
    show_ratio(std::string(q) + " event/every", ratio(std::string(q) + "|event", std::string(q) + "|every"));
  }
  std::printf("\nblkif 4K IOPS / bare ring message rate (goal >= 0.25):\n");
  show_ratio("QD1", ratio("4K randread QD1|xen", "ring QD1|event"));
  show_ratio("QD32", ratio("4K randread QD32|xen", "ring QD32|event"));
  std::printf("blkif / NBD, 4K IOPS at QD32 (goal >= 3):\n");
  show_ratio("QD32", ratio("4K randread QD32|xen", "4K randread QD32|nbd"));
  v->reset();
  v_np->reset();
  ::unlink(hub.c_str());
  ::unlink(nbd.c_str());
  ::rmdir(dir.c_str());
  return 0;
}
