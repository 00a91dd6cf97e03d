// SPDX-License-Identifier: Apache-2.0
// The rdma conformance targets: a real `uvd serve --rdma` process per test on
// one Soft-RoCE device, the rdma plugin as the client on another. They run for
// real inside the guest harness (tests/e2e/guest, --rdma-pair), which sets
// $UVD_RDMA_PEER_ADDR (server) and $UVD_RDMA_ADDR (client); anywhere without an
// RDMA device they report ENODEV, which the suite turns into a loud skip.
#include "tests/conformance/vstore_rdma_targets.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>
#include <vector>

#include "storage/cow/cow.hpp"

namespace uvd::test {

namespace {

constexpr uint64_t device_size = 64ull << 20;

// A `uvd serve` child; SIGTERM and reaped when the test ends.
struct server_process {
  pid_t pid = -1;
  std::string log;
  ~server_process() {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 200 && waitpid(pid, &st, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (waitpid(pid, &st, WNOHANG) == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
    }
  }
};

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

core::result<void> rdma_present() {
  const char* server = std::getenv("UVD_RDMA_PEER_ADDR");
  DIR* d = opendir("/sys/class/infiniband");
  int devices = 0;
  if (d) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++devices;
    closedir(d);
  }
  if (devices == 0)
    return core::fail(ENODEV, "no RDMA device here (/sys/class/infiniband is empty); the guest harness runs this "
                              "target with Soft-RoCE (ctest -L e2e -R RdmaConformance)");
  if (!server || !*server)
    return core::fail(ENODEV, "set UVD_RDMA_PEER_ADDR (server) and UVD_RDMA_ADDR (client) to addresses of two RDMA "
                              "devices");
  return core::ok();
}

// Starts `uvd serve --rdma $UVD_RDMA_PEER_ADDR:0` exporting `uri` as "disk" and
// returns the client URI.
core::result<std::string> serve(const temp_dir& dir, const std::string& uri, std::shared_ptr<void>& keep,
                                const std::string& flags = "") {
  if (auto r = rdma_present(); !r) return core::fail(std::move(r).err());
  std::string server = std::getenv("UVD_RDMA_PEER_ADDR");
  const char* client = std::getenv("UVD_RDMA_ADDR");
  auto proc = std::make_shared<server_process>();
  proc->log = dir.file("serve.log");
  std::vector<std::string> argv{build_dir() + "/uvd", "serve", "--rdma", server + ":0", "--export", "disk=" + uri + flags};
  pid_t pid = fork();
  if (pid < 0) return core::fail(errno, "fork");
  if (pid == 0) {
    int fd = ::open(proc->log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  proc->pid = pid;
  keep = proc;
  // "serving export 'disk' (...) on rdma://ADDR:PORT/disk (rdma://ADDR:PORT/UUID)"
  const std::regex line("on rdma://[^ :]+:([0-9]+)/disk");
  for (int i = 0; i < 600; ++i) {
    std::smatch m;
    std::string text = slurp(proc->log);
    if (std::regex_search(text, m, line)) {
      std::string u = "rdma://" + server + ":" + m[1].str() + "/disk";
      if (client && *client) u += std::string("?src=") + client;
      return u;
    }
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      proc->pid = -1;
      return core::fail(EIO, "uvd serve --rdma exited early: " + text);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return core::fail(ETIMEDOUT, "uvd serve --rdma did not come up in 30 s: " + slurp(proc->log));
}

// A base image full of a known pattern, so reads that fall through are checked.
core::result<std::string> pattern_base(const temp_dir& dir) {
  std::string base = dir.file("base.img");
  int fd = ::open(base.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return core::fail(errno, "create " + base);
  std::vector<std::byte> chunk(1 << 20);
  for (uint64_t off = 0; off < device_size; off += chunk.size()) {
    fill_pattern(chunk, 0xba5e, off);
    if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size())) {
      int e = errno;
      ::close(fd);
      return core::fail(e, "write " + base);
    }
  }
  ::close(fd);
  return base;
}

}  // namespace

core::result<std::string> rdma_file_uri(const temp_dir& dir, core::registry&, std::shared_ptr<void>& keep) {
  if (auto r = rdma_present(); !r) return core::fail(std::move(r).err());
  return serve(dir, "file://" + make_sparse_file(dir.file("disk.img"), device_size), keep);
}

core::result<std::string> rdma_cow_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep) {
  if (auto r = rdma_present(); !r) return core::fail(std::move(r).err());
  auto base = pattern_base(dir);
  if (!base) return core::fail(std::move(base).err());
  std::string overlay = dir.file("guest.cow");
  if (auto h = storage::create_cow_file(reg, overlay, "file://" + *base); !h) return core::fail(std::move(h).err());
  return serve(dir, "cow://" + overlay, keep);
}

core::result<std::string> cow_over_rdma_uri(const temp_dir& dir, core::registry& reg, std::shared_ptr<void>& keep) {
  if (auto r = rdma_present(); !r) return core::fail(std::move(r).err());
  auto base = pattern_base(dir);
  if (!base) return core::fail(std::move(base).err());
  auto base_uri = serve(dir, "file://" + *base, keep, ",ro");
  if (!base_uri) return base_uri;
  std::string overlay = dir.file("guest.cow");
  if (auto h = storage::create_cow_file(reg, overlay, *base_uri); !h) return core::fail(std::move(h).err());
  return "cow://" + overlay;
}

}  // namespace uvd::test
