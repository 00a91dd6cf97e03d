// SPDX-License-Identifier: Apache-2.0
// Attachment records (roots.hpp): who has an overlay open, through which server.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "storage/roots/roots.hpp"

namespace uvd::storage {

namespace {

// Field 22 of /proc/PID/stat (start time in clock ticks since boot): a pid
// reused by another process has another start time. 0 if unknown.
uint64_t process_start(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = s.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return 0;
  std::istringstream rest(s.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return 0;
}

std::string host_name() {
  char h[256] = {};
  if (::gethostname(h, sizeof h - 1) != 0) return "?";
  return h;
}

// Record values are one line each: no newline reaches a record.
std::string one_line(std::string v) {
  for (char& c : v)
    if (c == '\n' || c == '\r' || c == '\0') c = ' ';
  return v;
}

bool alive(const attachment_info& a) {
  if (a.host != host_name()) return true;  // cannot tell from here
  if (a.pid <= 0) return false;
  if (::kill(a.pid, 0) != 0 && errno == ESRCH) return false;
  uint64_t start = process_start(a.pid);
  return a.pid_start == 0 || start == 0 || start == a.pid_start;
}

}  // namespace

core::result<std::unique_ptr<attachment>> attachment::write(const std::string& overlay_path, attachment_info info) {
  const std::string dir = overlay_path + ".attached";
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return core::fail(errno, "cannot create " + dir + ": " + std::strerror(errno));
  info.pid = ::getpid();
  info.pid_start = process_start(info.pid);
  info.host = host_name();
  info.since = static_cast<int64_t>(::time(nullptr));
  std::string tmpl = dir + "/." + std::to_string(info.pid) + "-XXXXXX";
  int fd = ::mkstemp(tmpl.data());
  if (fd < 0) return core::fail(errno, "cannot write a record in " + dir + ": " + std::strerror(errno));
  std::string text = "transport=" + one_line(info.transport) + "\nserver=" + one_line(info.server) +
                     "\nclient=" + one_line(info.client) + "\nexport=" + one_line(info.export_name) +
                     "\npid=" + std::to_string(info.pid) + "\npid_start=" + std::to_string(info.pid_start) +
                     "\nhost=" + one_line(info.host) + "\nsince=" + std::to_string(info.since) + "\n";
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::fchmod(fd, 0644);
  ::close(fd);
  // mkstemp's name without the leading dot: readers skip dot-names, so they
  // see the record whole or not at all.
  const size_t slash = tmpl.rfind('/');
  std::string final_path = tmpl.substr(0, slash + 1) + tmpl.substr(slash + 2);
  if (!ok || ::rename(tmpl.c_str(), final_path.c_str()) != 0) {
    int err = ok ? errno : EIO;
    ::unlink(tmpl.c_str());
    return core::fail(err, "cannot write a record in " + dir);
  }
  std::unique_ptr<attachment> a(new attachment());
  a->path_ = std::move(final_path);
  return a;
}

attachment::~attachment() {
  if (!path_.empty()) ::unlink(path_.c_str());
}

std::vector<attachment_info> list_attachments(const std::string& overlay_path, bool include_dead) {
  std::vector<attachment_info> out;
  const std::string dir = overlay_path + ".attached";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') names.emplace_back(e->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& n : names) {
    attachment_info a;
    a.record = dir + "/" + n;
    std::ifstream in(a.record);
    if (!in) continue;  // removed meanwhile
    std::string line;
    while (std::getline(in, line)) {
      size_t eq = line.find('=');
      if (eq == std::string::npos) continue;
      std::string k = line.substr(0, eq), v = line.substr(eq + 1);
      if (k == "transport") a.transport = v;
      else if (k == "server") a.server = v;
      else if (k == "client") a.client = v;
      else if (k == "export") a.export_name = v;
      else if (k == "pid") a.pid = static_cast<pid_t>(std::strtol(v.c_str(), nullptr, 10));
      else if (k == "pid_start") a.pid_start = std::strtoull(v.c_str(), nullptr, 10);
      else if (k == "host") a.host = v;
      else if (k == "since") a.since = std::strtoll(v.c_str(), nullptr, 10);
    }
    a.live = alive(a);
    if (a.live || include_dead) out.push_back(std::move(a));
  }
  std::sort(out.begin(), out.end(), [](auto& x, auto& y) { return x.since < y.since; });
  return out;
}

}  // namespace uvd::storage
