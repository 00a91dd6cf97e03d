// SPDX-License-Identifier: Apache-2.0
// Names, provisioning, listing and removal of per-client overlays (roots.hpp).
#include "storage/roots/roots.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace uvd::storage {

namespace {

core::result<void> check_name(std::string_view name, const char* what) {
  auto printable = [&] {
    std::string s;
    for (char c : name.substr(0, 80)) {
      if (c >= 0x20 && c < 0x7f) {
        s += c;
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned char>(c));
        s += hex;
      }
    }
    return s + (name.size() > 80 ? "..." : "");
  };
  if (name.empty()) return core::fail(EINVAL, std::string(what) + " name is empty");
  if (name.size() > max_client_name)
    return core::fail(EINVAL, std::string(what) + " name '" + printable() + "' is longer than " +
                                  std::to_string(max_client_name) + " characters");
  auto alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); };
  if (!alnum(name.front()))
    return core::fail(EINVAL, std::string(what) + " name '" + printable() + "' must start with a letter or digit");
  for (char c : name)
    if (!alnum(c) && c != '.' && c != '_' && c != '-')
      return core::fail(EINVAL, std::string(what) + " name '" + printable() +
                                    "' may hold only letters, digits, '.', '_' and '-'");
  return core::ok();
}

std::string errno_text(const std::string& what, int err) { return what + ": " + std::strerror(err); }

void sync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

core::result<void> make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return core::fail(errno, errno_text("cannot create " + dir, errno));
  struct stat st{};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return core::fail(ENOTDIR, dir + " is not a folder");
  return core::ok();
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;  // ".", "..", temporaries
    out.emplace_back(e->d_name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool is_dir(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

core::result<void> check_client_name(std::string_view name) { return check_name(name, "client"); }
core::result<void> check_root_name(std::string_view name) { return check_name(name, "root"); }

std::string overlay_path(std::string_view dir, std::string_view root, std::string_view client) {
  std::string p(dir);
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p + "/" + std::string(root) + "/" + std::string(client) + ".cow";
}

core::result<std::pair<std::string, std::string>> split_overlay_name(std::string_view export_name) {
  size_t slash = export_name.find('/');
  if (slash == std::string_view::npos)
    return core::fail(ENOENT, "no export named '" + std::string(export_name.substr(0, 80)) +
                                  "' (a client's overlay is ROOT/CLIENT)");
  std::string_view root = export_name.substr(0, slash), client = export_name.substr(slash + 1);
  if (auto r = check_root_name(root); !r) return core::fail(std::move(r).err());
  if (auto r = check_client_name(client); !r) return core::fail(std::move(r).err());
  return std::make_pair(std::string(root), std::string(client));
}

core::result<provisioned> provision_overlay(core::registry& reg, std::string_view dir, std::string_view root,
                                            std::string_view client, std::string_view base_uri) {
  if (auto r = check_root_name(root); !r) return core::fail(std::move(r).err());
  if (auto r = check_client_name(client); !r) return core::fail(std::move(r).err());
  provisioned out;
  out.path = overlay_path(dir, root, client);
  if (::access(out.path.c_str(), F_OK) == 0) return out;
  const std::string folder = out.path.substr(0, out.path.rfind('/'));
  if (auto r = make_dir(std::string(dir)); !r) return core::fail(std::move(r).err());
  if (auto r = make_dir(folder); !r) return core::fail(std::move(r).err());
  // Made whole under a name of this process, then linked into place: link()
  // never replaces, so of two processes racing here exactly one overlay wins
  // and the loser's copy is dropped before anyone opened it.
  char suffix[40];
  std::snprintf(suffix, sizeof suffix, ".tmp-%d-%d", static_cast<int>(::getpid()), static_cast<int>(::gettid()));
  const std::string tmp = folder + "/." + std::string(client) + ".cow" + suffix;
  ::unlink(tmp.c_str());
  auto made = create_cow_file(reg, tmp, base_uri);
  if (!made) return core::fail(made.err().errnum(), "provisioning " + out.path + ": " + made.err().message);
  int rc = ::link(tmp.c_str(), out.path.c_str());
  int err = errno;
  ::unlink(tmp.c_str());
  if (rc != 0 && err != EEXIST) return core::fail(err, errno_text("cannot link " + out.path, err));
  sync_dir(folder);
  out.created = rc == 0;
  return out;
}

core::result<std::vector<overlay_listing>> list_overlays(core::registry& reg, std::string_view dir_view) {
  const std::string dir(dir_view);
  if (!is_dir(dir)) return core::fail(ENOENT, dir + " is not a folder");
  std::vector<overlay_listing> out;
  for (const std::string& root : entries(dir)) {
    if (!check_root_name(root) || !is_dir(dir + "/" + root)) continue;
    for (const std::string& f : entries(dir + "/" + root)) {
      if (f.size() <= 4 || f.compare(f.size() - 4, 4, ".cow") != 0) continue;
      std::string client = f.substr(0, f.size() - 4);
      if (!check_client_name(client)) continue;
      overlay_listing l;
      l.root = root;
      l.client = client;
      l.path = overlay_path(dir, root, client);
      auto rep = inspect_cow(reg, l.path, false);
      if (rep) {
        l.ok = true;
        l.report = std::move(*rep);
      } else {
        l.error = rep.err().what();
      }
      l.attached = list_attachments(l.path);
      out.push_back(std::move(l));
    }
  }
  return out;
}

core::result<void> remove_overlay(std::string_view dir, std::string_view root, std::string_view client, bool force) {
  if (auto r = check_root_name(root); !r) return core::fail(std::move(r).err());
  if (auto r = check_client_name(client); !r) return core::fail(std::move(r).err());
  const std::string path = overlay_path(dir, root, client);
  if (::access(path.c_str(), F_OK) != 0) return core::fail(ENOENT, "no overlay " + path);
  auto live = list_attachments(path);
  if (!live.empty() && !force) {
    std::string who;
    for (auto& a : live) who += (who.empty() ? "" : ", ") + a.transport + " " + a.server + " from " + a.client + " (pid " + std::to_string(a.pid) + ")";
    return core::fail(EBUSY, path + " is attached (" + who + "); detach the client first, or --force");
  }
  if (::unlink(path.c_str()) != 0) return core::fail(errno, errno_text("cannot remove " + path, errno));
  ::unlink((path + ".fence").c_str());
  const std::string att = path + ".attached";
  for (auto& a : list_attachments(path, true)) ::unlink(a.record.c_str());
  if (DIR* d = ::opendir(att.c_str())) {  // temporaries of writers that died mid-record
    std::vector<std::string> left;
    while (dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) left.emplace_back(e->d_name);
    ::closedir(d);
    for (auto& n : left) ::unlink((att + "/" + n).c_str());
    ::rmdir(att.c_str());
  }
  sync_dir(path.substr(0, path.rfind('/')));
  return core::ok();
}

}  // namespace uvd::storage
