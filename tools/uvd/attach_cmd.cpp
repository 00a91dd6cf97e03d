// SPDX-License-Identifier: Apache-2.0
// uvd attach / uvd detach: hand any vstore to the Linux kernel's nbd driver.
// The NBD server of storage/nbd serves one end of a socketpair in the
// transmission phase; the kernel gets the other end through the ioctl
// interface (NBD_SET_SOCK + NBD_DO_IT, as nbd-client does), so /dev/nbdN is
// a block device backed by whatever the URI names (file, cow, rdma,
// multipath...).
//
// The serving process is built to hold a root filesystem: it opens every
// library, plugin and device before the device goes live and touches no path
// afterwards (after switch_root its own root is the emptied initramfs), keeps
// its memory locked, runs as an IO_FLUSHER (its allocations never wait on the
// writeback it is itself serving) and is the last candidate of the OOM killer.
#include <fcntl.h>
#include <linux/nbd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

#include "storage/nbd/nbd.hpp"
#include "tools/uvd/commands.hpp"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace uvd::cli {

namespace {

constexpr unsigned nbd_major = 43;
constexpr int live_wait_ms = 30000;       // DO_IT to a visible size; TCG guests are slow
constexpr int disconnect_wait_ms = 30000;  // NBD_DISCONNECT to DO_IT returning

struct attach_args {
  std::string uri;
  std::string nbd;  // "/dev/nbdN", or empty: the first free one
  bool foreground = false;
  bool read_only = false;
  unsigned connections = 1;
  unsigned timeout = 0;
};

std::string errno_text(int e) { return std::strerror(e); }

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

// "/dev/nbd3", "nbd3" -> 3; -1 when it is not an nbd device name.
int nbd_index(const std::string& name) {
  std::string_view s = name;
  if (s.starts_with("/dev/")) s.remove_prefix(5);
  if (!s.starts_with("nbd") || s.size() == 3 || s.size() > 9) return -1;
  s.remove_prefix(3);
  if (s.find_first_not_of("0123456789") != std::string_view::npos) return -1;
  return std::stoi(std::string(s));
}

std::string sys_block(int index, const char* attr) { return fmt::format("/sys/block/nbd{}/{}", index, attr); }

// The pid the kernel shows for a device in use (the thread running NBD_DO_IT), or 0.
long nbd_pid(int index) {
  std::string s = read_line(sys_block(index, "pid"));
  return s.empty() ? 0 : std::strtol(s.c_str(), nullptr, 10);
}

void require_nbd_driver() {
  if (!exists("/sys/block")) die(1, "no /sys/block: mount sysfs on /sys first (`mount -t sysfs sysfs /sys`)");
  if (exists("/sys/module/nbd") || exists("/sys/block/nbd0")) return;
  die(1, "the kernel's nbd driver is not loaded: run `modprobe nbd` (as root) and try again");
}

void require_free(int index) {
  if (!exists(sys_block(index, ""))) die(1, fmt::format("/dev/nbd{} does not exist (the nbd driver has fewer devices: "
                                                        "`modprobe nbd nbds_max=N`)", index));
  if (long pid = nbd_pid(index))
    die(1, fmt::format("/dev/nbd{} is busy: already attached (served by pid {}); `uvd detach /dev/nbd{}` first, or "
                       "leave --nbd out to take the first free device", index, pid, index));
}

// Blocks every signal in the calling thread: NBD_DO_IT waits interruptibly,
// and a signal landing in it would tear the connection down.
void block_all_signals() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

// Root filesystem duty: best effort, each refusal said once.
void harden() {
#ifndef __SANITIZE_ADDRESS__
  // MCL_FUTURE makes every thread stack resident: 2 MiB each instead of the
  // 8 MiB default matters on a small diskless machine. (ASan ignores mlockall
  // and needs its big frames.)
  pthread_attr_t attr;
  if (pthread_attr_init(&attr) == 0) {
    if (pthread_attr_setstacksize(&attr, 2u << 20) == 0) pthread_setattr_default_np(&attr);
    pthread_attr_destroy(&attr);
  }
#endif
  if (::mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
    spdlog::warn("uvd attach: mlockall: {}: the serving process may be swapped out", errno_text(errno));
  if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
    spdlog::warn("uvd attach: PR_SET_IO_FLUSHER refused ({}): under memory pressure, writeback to the device "
                 "may wait on this very process", errno_text(errno));
  int fd = ::open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
  if (fd < 0 || ::write(fd, "-1000", 5) != 5)
    spdlog::warn("uvd attach: oom_score_adj -1000: {}: the OOM killer may pick this process", errno_text(errno));
  if (fd >= 0) ::close(fd);
}

// One live /dev/nbdN: the kernel end of every socketpair, the NBD_DO_IT
// thread and the server that serves our ends. The destructor disconnects.
class kernel_device {
 public:
  kernel_device() = default;
  kernel_device(const kernel_device&) = delete;
  kernel_device& operator=(const kernel_device&) = delete;
  ~kernel_device() { detach(); }

  // Sets the device up and starts NBD_DO_IT; EBUSY when another task owns it.
  core::result<void> setup(int index, storage::nbd::server& srv, const storage::Vstore& disk, bool read_only,
                           unsigned connections, unsigned timeout) {
    index_ = index;
    std::string path = fmt::format("/dev/nbd{}", index);
    // Read-only is enough for the ioctls and fsync, and opens a device a
    // previous read-only attachment left marked read-only.
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      int e = errno;
      if (e == ENOENT || e == ENXIO) return core::fail(e, path + " does not exist (is the nbd driver loaded? `modprobe nbd`)");
      return core::fail(e, "cannot open " + path + (e == EACCES || e == EPERM ? " (attaching needs root)" : ""));
    }
    // Our socket first: a device another task is setting up refuses it with EBUSY
    // before we touch its size.
    for (unsigned i = 0; i < connections; ++i) {
      int sv[2];
      if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return core::fail(errno, "socketpair");
      // A big send buffer keeps a 32 MiB READ reply from being cut into many sends.
      int bytes = 4 << 20;
      ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
      ::setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
      if (::ioctl(fd_, NBD_SET_SOCK, sv[1]) < 0) {
        int e = errno;
        ::close(sv[0]);
        ::close(sv[1]);
        if (e == EBUSY) return core::fail(EBUSY, path + " is busy: another task is attaching it");
        return core::fail(e, "NBD_SET_SOCK on " + path);
      }
      ::close(sv[1]);  // the kernel holds its own reference
      if (auto r = srv.serve_fd_transmission(sv[0]); !r) return r;
      ++socks_;
    }
    uint64_t bs = std::max<uint32_t>(disk.block_size(), 512);
    if (bs > 4096 || (bs & (bs - 1)))
      return core::fail(EINVAL, fmt::format("block size {} is not one the kernel takes (512..4096, a power of 2)", bs));
    uint16_t flags = srv.transmission_flags();
    if (read_only) flags |= NBD_FLAG_READ_ONLY;
    if (::ioctl(fd_, NBD_SET_BLKSIZE, static_cast<unsigned long>(bs)) < 0) return core::fail(errno, "NBD_SET_BLKSIZE");
    if (::ioctl(fd_, NBD_SET_SIZE, static_cast<unsigned long>(disk.size())) < 0) return core::fail(errno, "NBD_SET_SIZE");
    if (::ioctl(fd_, NBD_SET_FLAGS, static_cast<unsigned long>(flags)) < 0) return core::fail(errno, "NBD_SET_FLAGS");
    if (::ioctl(fd_, NBD_SET_TIMEOUT, static_cast<unsigned long>(timeout)) < 0) return core::fail(errno, "NBD_SET_TIMEOUT");

    done_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (done_fd_ < 0) return core::fail(errno, "eventfd");
    try {
      doit_ = std::thread([this] {
        block_all_signals();
        pthread_setname_np(pthread_self(), "uvd-nbd-doit");
        int rc = ::ioctl(fd_, NBD_DO_IT);
        doit_errno_.store(rc < 0 ? errno : 0, std::memory_order_release);
        uint64_t one = 1;
        ssize_t n = ::write(done_fd_, &one, sizeof one);
        (void)n;
      });
    } catch (const std::system_error& e) {
      return core::fail(EAGAIN, std::string("cannot start the NBD_DO_IT thread: ") + e.what());
    }
    return wait_live(disk.size());
  }

  int done_fd() const noexcept { return done_fd_; }
  bool ended() const {
    pollfd p{done_fd_, POLLIN, 0};
    return ::poll(&p, 1, 0) == 1;
  }
  int doit_errno() const noexcept { return doit_errno_.load(std::memory_order_acquire); }

  // Flushes what the kernel holds, asks it to disconnect (it sends
  // NBD_CMD_DISC after the requests in flight), waits for NBD_DO_IT to
  // return and clears the device. Uses only the open fd: no path.
  void detach() noexcept {
    if (fd_ < 0) return;
    if (doit_.joinable()) {
      if (!ended()) {
        if (::fsync(fd_) < 0) spdlog::warn("uvd attach: flushing /dev/nbd{}: {}", index_, errno_text(errno));
        if (::ioctl(fd_, NBD_DISCONNECT) < 0)
          spdlog::warn("uvd attach: NBD_DISCONNECT /dev/nbd{}: {}", index_, errno_text(errno));
        pollfd p{done_fd_, POLLIN, 0};
        while (::poll(&p, 1, disconnect_wait_ms) < 0 && errno == EINTR) {
        }
        if (!(p.revents & POLLIN)) {
          spdlog::warn("uvd attach: /dev/nbd{} did not disconnect within {} s: clearing its sockets", index_,
                       disconnect_wait_ms / 1000);
          ::ioctl(fd_, NBD_CLEAR_SOCK);
        }
      }
      doit_.join();
    }
    // Never clear a device we gave no socket: it may be another task's.
    if (socks_ > 0) {
      ::ioctl(fd_, NBD_CLEAR_QUE);
      ::ioctl(fd_, NBD_CLEAR_SOCK);
    }
    ::close(fd_);
    fd_ = -1;
    if (done_fd_ >= 0) ::close(done_fd_);
    done_fd_ = -1;
  }

 private:
  core::result<void> wait_live(uint64_t bytes) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(live_wait_ms);
    const std::string want = std::to_string(bytes / 512);
    for (;;) {
      if (ended()) {
        int e = doit_errno();
        return core::fail(e ? e : EIO, fmt::format("the kernel ended /dev/nbd{} at once (NBD_DO_IT: {}; see dmesg)",
                                                   index_, errno_text(e ? e : EIO)));
      }
      if (nbd_pid(index_) != 0 && read_line(sys_block(index_, "size")) == want) return core::ok();
      if (std::chrono::steady_clock::now() > deadline)
        return core::fail(ETIMEDOUT, fmt::format("/dev/nbd{} did not come up with its size within {} s", index_,
                                                 live_wait_ms / 1000));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  int index_ = -1;
  int fd_ = -1;
  int done_fd_ = -1;
  unsigned socks_ = 0;
  std::thread doit_;
  std::atomic<int> doit_errno_{0};
};

// After fork, in a daemon: the child says "ready" or dies; the parent
// relays the outcome as its own exit status.
[[noreturn]] void parent_wait(pid_t child, int status_fd) {
  char c = 0;
  ssize_t n;
  while ((n = ::read(status_fd, &c, 1)) < 0 && errno == EINTR) {
  }
  ::close(status_fd);
  if (n == 1 && c == 'R') throw CLI::Success();
  int st = 0;
  while (::waitpid(child, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st)) throw CLI::RuntimeError(WEXITSTATUS(st) ? WEXITSTATUS(st) : 1);
  die(1, fmt::format("the serving process died during start-up ({})",
                     WIFSIGNALED(st) ? std::string(strsignal(WTERMSIG(st))) : std::string("no status")));
}

// stdio of a daemon: the console if there is one (errors must stay visible
// on a machine whose root this serves), else /dev/null.
void detach_stdio() {
  int in = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  int out = ::open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
  if (out < 0) out = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (in >= 0) ::dup2(in, 0);
  if (out >= 0) {
    ::dup2(out, 1);
    ::dup2(out, 2);
  }
  if (in > 2) ::close(in);
  if (out > 2) ::close(out);
}

void run_attach(context& ctx, const attach_args& a) {
  require_nbd_driver();
  int want = -1;
  if (!a.nbd.empty()) {
    want = nbd_index(a.nbd);
    if (want < 0) die(2, "--nbd: '" + a.nbd + "' is not an nbd device (/dev/nbdN)");
    require_free(want);
  }

  int status_fd = -1;
  if (!a.foreground) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) < 0) die(1, "pipe: " + errno_text(errno));
    // Before any thread exists: only the forking thread survives a fork.
    pid_t pid = ::fork();
    if (pid < 0) die(1, "fork: " + errno_text(errno));
    if (pid > 0) {
      ::close(p[1]);
      parent_wait(pid, p[0]);
    }
    ::close(p[0]);
    status_fd = p[1];
    // Nothing of ours is open yet: whatever else the caller left open (a pipe
    // a script waits on for EOF) must not live on in the daemon.
    const unsigned keep = static_cast<unsigned>(status_fd);
    if (keep > 3) ::close_range(3, keep - 1, 0);
    ::close_range(std::max(3u, keep + 1), ~0u, 0);
    ::setsid();
    if (::chdir("/") < 0) spdlog::warn("uvd attach: chdir /: {}", errno_text(errno));
  }

  // Signals before threads: every thread inherits this mask, so only the
  // signalfd below sees SIGTERM. A daemon ignores the console's signals.
  ::signal(SIGPIPE, SIG_IGN);
  if (!a.foreground) {
    ::signal(SIGHUP, SIG_IGN);
    ::signal(SIGINT, SIG_IGN);
    ::signal(SIGQUIT, SIG_IGN);
    ::signal(SIGTSTP, SIG_IGN);
    ::signal(SIGTTIN, SIG_IGN);
    ::signal(SIGTTOU, SIG_IGN);
  }
  // In the foreground, Ctrl-C detaches even when a shell started us with
  // SIGINT ignored (as it does for `&` without job control).
  if (a.foreground) ::signal(SIGINT, SIG_DFL);
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  if (a.foreground) sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  int sig_fd = ::signalfd(-1, &stop, SFD_CLOEXEC);
  if (sig_fd < 0) die(1, "signalfd: " + errno_text(errno));

  harden();  // before the threads, which inherit IO_FLUSHER

  storage::open_options oo;
  oo.read_only = a.read_only;
  oo.queue_depth = 128;  // the kernel's nbd queue depth per connection
  auto v = open_device(ctx, a.uri, oo);
  if (!v) die(1, "cannot open " + a.uri + ": " + v.err().what());
  std::shared_ptr<storage::Vstore> disk(std::move(*v));
  const bool ro = a.read_only || disk->read_only();

  storage::nbd::server_options so;
  so.exports.push_back({"", a.uri, disk, ro});
  so.max_in_flight = 128;
  so.max_connections = a.connections;
  auto s = storage::nbd::server::create(std::move(so));
  if (!s) die(1, s.err().what());
  std::unique_ptr<storage::nbd::server> srv = std::move(*s);

  auto dev = std::make_unique<kernel_device>();
  int index = want;
  for (int i = want < 0 ? 0 : want;; ++i) {
    if (want < 0) {
      if (!exists(sys_block(i, ""))) {
        dev.reset();
        srv.reset();
        die(1, fmt::format("no free nbd device among /dev/nbd0../dev/nbd{} (`modprobe nbd nbds_max=N` makes more)",
                           i - 1));
      }
      if (nbd_pid(i) != 0) continue;
    }
    auto r = dev->setup(i, *srv, *disk, ro, a.connections, a.timeout);
    if (r) {
      index = i;
      break;
    }
    const int e = r.err().errnum();
    const std::string why = r.err().what();
    dev = std::make_unique<kernel_device>();  // releases the device
    if (want < 0 && e == EBUSY) continue;     // raced with another attach: take the next one
    srv.reset();
    die(1, why);
  }

  std::printf("uvd attach: %s on /dev/nbd%d (%llu bytes)\n", a.uri.c_str(), index,
              static_cast<unsigned long long>(disk->size()));
  std::fflush(stdout);
  spdlog::info("uvd attach: serving /dev/nbd{} ({}, {}{})", index, human_size(disk->size()), a.uri,
               ro ? ", read-only" : "");
  if (status_fd >= 0) {
    detach_stdio();
    char r = 'R';
    ssize_t n = ::write(status_fd, &r, 1);
    (void)n;
    ::close(status_fd);
  }

  pollfd p[2] = {{sig_fd, POLLIN, 0}, {dev->done_fd(), POLLIN, 0}};
  for (;;) {
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("uvd attach: poll: {}", errno_text(errno));
      break;
    }
    if (p[0].revents & POLLIN) {
      signalfd_siginfo si{};
      ssize_t n = ::read(sig_fd, &si, sizeof si);
      (void)n;
      spdlog::info("uvd attach: {}: disconnecting /dev/nbd{}", strsignal(static_cast<int>(si.ssi_signo)), index);
      break;
    }
    if (p[1].revents & POLLIN) {
      if (int e = dev->doit_errno())
        spdlog::error("uvd attach: /dev/nbd{} ended: {}", index, errno_text(e));
      else
        spdlog::info("uvd attach: /dev/nbd{} disconnected", index);
      break;
    }
  }
  dev->detach();
  dev.reset();
  srv->stop();  // every acknowledged write is flushed
  srv.reset();
  ::close(sig_fd);
}

// ---- uvd detach ----

struct detach_args {
  std::string device;
  bool force = false;
  unsigned wait = 30;
};

// A zombie has finished: its parent may never reap it (a script that started
// `uvd attach --foreground &` and does not wait).
bool process_running(long pid) {
  std::string stat = read_line(fmt::format("/proc/{}/stat", pid));
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  char state = stat[paren + 2];
  return state != 'Z' && state != 'X';
}

void run_detach(const detach_args& a) {
  int index = nbd_index(a.device);
  if (index < 0) die(2, "'" + a.device + "' is not an nbd device (/dev/nbdN)");
  const std::string path = fmt::format("/dev/nbd{}", index);
  struct stat st{};
  if (::stat(path.c_str(), &st) < 0) die(1, path + ": " + errno_text(errno));
  if (!S_ISBLK(st.st_mode) || major(st.st_rdev) != nbd_major) die(2, path + " is not an nbd block device");
  long pid = nbd_pid(index);
  if (pid == 0) die(1, path + " is not attached");
  // The serving process, not only the thread the kernel names (which ends first).
  long tgid = pid;
  {
    std::ifstream status(fmt::format("/proc/{}/status", pid));
    for (std::string line; std::getline(status, line);)
      if (line.starts_with("Tgid:")) tgid = std::strtol(line.c_str() + 5, nullptr, 10);
  }
  // O_EXCL fails while the device is mounted or held by another driver.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (a.force ? 0 : O_EXCL));
  if (fd < 0) {
    int e = errno;
    if (e == EBUSY) die(1, path + " is in use (mounted?): unmount it first, or --force");
    die(1, "cannot open " + path + ": " + errno_text(e));
  }
  if (::fsync(fd) < 0) spdlog::warn("uvd detach: flushing {}: {}", path, errno_text(errno));
  if (::ioctl(fd, NBD_DISCONNECT) < 0) {
    int e = errno;
    ::close(fd);
    die(1, "NBD_DISCONNECT " + path + ": " + errno_text(e));
  }
  ::close(fd);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(a.wait);
  while (nbd_pid(index) != 0 || process_running(tgid)) {
    if (std::chrono::steady_clock::now() > deadline)
      die(1, fmt::format("{} was told to disconnect, but {} within {} s", path,
                         nbd_pid(index) ? "the kernel still shows it attached" :
                                          fmt::format("its serving process {} is still running", tgid),
                         a.wait));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::printf("uvd detach: %s detached\n", path.c_str());
}

}  // namespace

void add_attach_commands(CLI::App& app, context& ctx) {
  auto a = std::make_shared<attach_args>();
  auto* att = app.add_subcommand("attach", "Hand a device to the kernel's nbd driver as /dev/nbdN, served from a "
                                           "background process (like nbd-client)");
  att->add_option("URI", a->uri, "device URI (rdma://H:P/NAME, multipath:?..., file:///x.img) or a path")->required();
  att->add_option("--nbd", a->nbd, "the nbd device to use (default: the first free /dev/nbdN)");
  att->add_flag("--foreground", a->foreground, "serve in this process until SIGTERM/SIGINT or `uvd detach`");
  att->add_flag("-r,--read-only", a->read_only, "a read-only block device");
  att->add_option("--connections", a->connections, "sockets between the kernel and the server (default 1)")
      ->check(CLI::Range(1u, 16u));
  att->add_option("--timeout", a->timeout,
                  "seconds before the kernel gives a request up and drops the device (default 0: never, it warns "
                  "every 30 s; the back end does its own failover)");
  att->callback([&ctx, a] {
    attach_args args = *a;
    args.uri = device_uri(a->uri);  // a relative path resolved here, before the daemon leaves this folder
    run_attach(ctx, args);
  });

  auto d = std::make_shared<detach_args>();
  auto* det = app.add_subcommand("detach", "Disconnect a /dev/nbdN set up by `uvd attach` (or nbd-client); its "
                                           "serving process flushes and exits");
  det->add_option("DEVICE", d->device, "/dev/nbdN")->required();
  det->add_flag("--force", d->force, "disconnect even while the device is mounted or held");
  det->add_option("--wait", d->wait, "seconds to wait for the serving process to end (default 30)");
  det->callback([d] { run_detach(*d); });
}

}  // namespace uvd::cli
