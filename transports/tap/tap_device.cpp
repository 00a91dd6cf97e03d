// SPDX-License-Identifier: Apache-2.0
#include "transports/tap/tap_device.hpp"

#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace uvd::tap {

namespace {

std::string why(int e) { return std::strerror(e); }

ifreq make_ifreq(const std::string& name) {
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  return ifr;
}

}  // namespace

bool if_exists(const std::string& name) { return !name.empty() && if_nametoindex(name.c_str()) != 0; }

int open_tap_queue(const tap_queue_params& p, std::string* actual, std::string* err) {
  if (p.name.size() >= IFNAMSIZ) {
    *err = "interface name '" + p.name + "' is longer than " + std::to_string(IFNAMSIZ - 1) + " characters";
    return -EINVAL;
  }
  int fd = ::open(p.dev.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    if (e == ENOENT || e == ENODEV || e == ENXIO)
      *err = p.dev + " is missing (" + why(e) +
             "): this kernel needs TUN/TAP (modprobe tun) and the device node (mknod /dev/net/tun c 10 200)";
    else if (e == EACCES || e == EPERM)
      *err = "cannot open " + p.dev + " (" + why(e) + "): TAP interfaces need root or CAP_NET_ADMIN";
    else
      *err = "cannot open " + p.dev + ": " + why(e);
    return -e;
  }
  ifreq ifr = make_ifreq(p.name);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (p.vnet_hdr) ifr.ifr_flags |= IFF_VNET_HDR;
  if (p.multi_queue) ifr.ifr_flags |= IFF_MULTI_QUEUE;
  bool existed = if_exists(p.name);
  if (::ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int e = errno;
    ::close(fd);
    if (e == EPERM || e == EACCES)
      *err = std::string(existed ? "attaching to" : "creating") + " TAP interface '" + p.name +
             "' needs root or CAP_NET_ADMIN (" + why(e) + ")";
    else if (e == EBUSY)
      *err = "interface '" + p.name + "' is busy: another program holds its queue, or it is not a TAP";
    else if (e == EINVAL && existed)
      *err = "interface '" + p.name + "' exists with other flags (a TUN, or a different multi-queue or "
             "vnet_hdr setting)";
    else
      *err = "TUNSETIFF " + p.name + ": " + why(e);
    return -e;
  }
  if (p.vnet_hdr) {
    int sz = 10;  // struct virtio_net_hdr, without num_buffers
    if (::ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0) {
      int e = errno;
      ::close(fd);
      *err = "TUNSETVNETHDRSZ: " + why(e);
      return -e;
    }
  }
  *actual = ifr.ifr_name;
  return fd;
}

int set_tap_offload(int fd, bool on, std::string* err) {
  unsigned off = on ? (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) : 0;
  if (::ioctl(fd, TUNSETOFFLOAD, off) < 0) {
    int e = errno;
    *err = "TUNSETOFFLOAD: " + why(e);
    return -e;
  }
  return 0;
}

int set_if_mac(int ctl, const std::string& name, const uint8_t* mac, std::string* err) {
  ifreq ifr = make_ifreq(name);
  ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
  std::memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
  if (::ioctl(ctl, SIOCSIFHWADDR, &ifr) < 0) {
    int e = errno;
    *err = "set MAC of " + name + ": " + why(e);
    return -e;
  }
  return 0;
}

int set_if_mtu(int ctl, const std::string& name, uint32_t mtu, std::string* err) {
  ifreq ifr = make_ifreq(name);
  ifr.ifr_mtu = static_cast<int>(mtu);
  if (::ioctl(ctl, SIOCSIFMTU, &ifr) < 0) {
    int e = errno;
    *err = "set MTU " + std::to_string(mtu) + " on " + name + ": " + why(e);
    return -e;
  }
  return 0;
}

int set_if_up(int ctl, const std::string& name, bool up, std::string* err) {
  ifreq ifr = make_ifreq(name);
  if (::ioctl(ctl, SIOCGIFFLAGS, &ifr) < 0) {
    int e = errno;
    *err = "get flags of " + name + ": " + why(e);
    return -e;
  }
  if (up)
    ifr.ifr_flags |= IFF_UP;
  else
    ifr.ifr_flags &= ~IFF_UP;
  if (::ioctl(ctl, SIOCSIFFLAGS, &ifr) < 0) {
    int e = errno;
    *err = "set " + name + (up ? " up: " : " down: ") + why(e);
    return -e;
  }
  return 0;
}

int set_tap_carrier(int fd, bool on, std::string* err) {
  int v = on ? 1 : 0;
  if (::ioctl(fd, TUNSETCARRIER, &v) < 0) {
    int e = errno;
    *err = std::string("TUNSETCARRIER: ") + why(e);
    return -e;
  }
  return 0;
}

}  // namespace uvd::tap
