// SPDX-License-Identifier: Apache-2.0
// The baseline the uvd path is measured against: the naive user-space
// forwarder. Two TAP interfaces (one per network namespace), no offloads,
// one read() of one frame then one write() of it, poll() between.
// Usage: naive_forwarder NS_A NS_B [ifname] [mtu]
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

int open_tap_in(const std::string& ns, const std::string& name, int mtu) {
  int nsfd = ::open(("/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
  if (nsfd < 0 || ::setns(nsfd, CLONE_NEWNET) != 0) {
    std::perror(("setns " + ns).c_str());
    std::exit(1);
  }
  ::close(nsfd);
  int fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (fd < 0 || ::ioctl(fd, TUNSETIFF, &ifr) != 0) {
    std::perror("TUNSETIFF");
    std::exit(1);
  }
  int s = ::socket(AF_INET, SOCK_DGRAM, 0);
  ifr.ifr_mtu = mtu;
  ::ioctl(s, SIOCSIFMTU, &ifr);
  ::ioctl(s, SIOCGIFFLAGS, &ifr);
  ifr.ifr_flags |= IFF_UP;
  ::ioctl(s, SIOCSIFFLAGS, &ifr);
  ::close(s);
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s NS_A NS_B [ifname] [mtu]\n", argv[0]);
    return 2;
  }
  std::string name = argc > 3 ? argv[3] : "uvd0";
  int mtu = argc > 4 ? std::atoi(argv[4]) : 1500;
  int fds[2] = {open_tap_in(argv[1], name, mtu), open_tap_in(argv[2], name, mtu)};
  std::printf("naive forwarder: %s:%s <-> %s:%s\n", argv[1], name.c_str(), argv[2], name.c_str());
  std::fflush(stdout);
  static char buf[65536];
  pollfd p[2] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}};
  for (;;) {
    if (::poll(p, 2, -1) < 0) return 0;
    for (int i = 0; i < 2; ++i) {
      if (!(p[i].revents & POLLIN)) continue;
      ssize_t n = ::read(fds[i], buf, sizeof buf);  // one frame...
      if (n > 0) [[maybe_unused]] ssize_t w = ::write(fds[1 - i], buf, static_cast<size_t>(n));  // ...one frame
    }
  }
}
