#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Nested Xen: Debian's Xen 4.17 hypervisor booting Debian's kernel as PV dom0 under qemu TCG,
with grant devices, event channels and xenstored up before the caller's script runs.

Built on the guest harness (tests/e2e/guest): the same package cache, initramfs layers,
9p result share and console handling; this file adds only what is Xen's:
  * xen-hypervisor-4.17-amd64 (the hypervisor, gunzipped once: qemu's multiboot loader
    takes the 32-bit ELF, not the .gz), xen-utils-4.17 (xenstored, xen-init-dom0) and
    xenstore-utils (xenstore-read/write/ls...), fetched with apt-get download, never installed;
  * the boot: `-kernel xen -append XEN-ARGS -initrd "vmlinuz LINUX-ARGS,initramfs"`;
  * a prologue in dom0: xenfs on /proc/xen, xenstored, xen-init-dom0, and a higher
    gntalloc page limit (a blkif front end grants a whole pool of data pages).
Kernel modules loaded at boot: xen-evtchn, xen-privcmd, xen-gntdev, xen-gntalloc, xenfs,
loop. The kernel's own xen-blkback, xen-blkfront and xen-netfront are in the image but not
loaded (they would claim the xenstore directories of our own ends): a script loads them with
`insmod $XEN_MODULES/xen-blkback.ko` when it wants Linux as the peer.

    tests/e2e/xen/xenguest.py run --out OUT --bin build/debug/tools/uvd/uvd ... -c 'script'

Exit status as tests/e2e/guest/uvd-guest: 0 when the script exited 0, its status when it
failed, 124 on timeout, 125 when the image could not be built, 126 when dom0 died; on any
failure the console tail (Xen's and dom0's messages) is printed between ===== bars.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guest"))
import guestlib  # noqa: E402
import guestvm   # noqa: E402

XEN_PACKAGES = ("xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xenstore-utils")
XEN_ARGS = "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 loglvl=all guest_loglvl=all"
LINUX_ARGS = "console=hvc0 panic=-1 loglevel=5 quiet"
BOOT_MODULES = ["xen_evtchn", "xen_privcmd", "xen_gntdev", "xen_gntalloc", "xenfs", "loop"]
# In the image, loaded by scripts that want Linux's own block drivers as the peer.
PEER_MODULES = {"xen_blkback": "drivers/block/xen-blkback/xen-blkback.ko",
                "xen_blkfront": "drivers/block/xen-blkfront.ko",
                # Linux's netif front end as the peer of our vif back end (netfront_interop.sh)
                "xen_netfront": "drivers/net/xen-netfront.ko",
                # TAP interfaces for the netif ping (tests/e2e/xen/netif_ping.sh)
                "tun": "drivers/net/tun.ko"}
MODULE_DIR = "/lib/xen-peer-modules"
# Host tools the scripts use on block devices (scripts/install-deps installs them).
HOST_TOOLS = {"/sbin/mke2fs": "/opt/uvd-tools/mke2fs", "/sbin/e2fsck": "/opt/uvd-tools/e2fsck",
              "/sbin/debugfs": "/opt/uvd-tools/debugfs", "/usr/bin/nbdcopy": "/opt/uvd-tools/nbdcopy"}

PROLOGUE = f"""\
# nested-Xen dom0 set-up (tests/e2e/xen/xenguest.py)
export XEN_MODULES={MODULE_DIR}
# busybox sh runs its own applets (mke2fs...) before PATH; functions come first. Each is
# bounded: a block device whose driver gave up must fail the step, not hang the run.
{"".join(f'{os.path.basename(g)}() {{ timeout 300 {g} "$@"; }}' + chr(10) for g in HOST_TOOLS.values())}grep -q control_d /proc/xen/capabilities 2>/dev/null || mount -t xenfs xenfs /proc/xen
grep -q control_d /proc/xen/capabilities || {{ echo "xen: not dom0 (no control_d in /proc/xen/capabilities)"; exit 90; }}
mkdir -p /var/run/xenstored /var/lib/xenstored /var/lib/xen /var/log/xen
xenstored --pid-file /run/xenstored.pid
i=0; until xenstore-read /tool/xenstored >/dev/null 2>&1 || xenstore-ls / >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 100 ] || {{ echo "xen: xenstored did not come up"; exit 91; }}; sleep 0.1; done
xen-init-dom0 >/tmp/xen-init-dom0.log 2>&1 || {{ cat /tmp/xen-init-dom0.log; echo "xen: xen-init-dom0 failed"; exit 92; }}
# A blkif front end grants its whole data-page pool at connect; gntalloc allows 1024 pages.
echo 65536 > /sys/module/xen_gntalloc/parameters/limit
echo "xen: dom0 ready after $(cut -d' ' -f1 /proc/uptime) s: $(xenstore-read /local/domain/0/name)"
"""


def default_cache() -> str:
    b = os.environ.get("UVD_GUEST_CACHE")
    if b:
        return b
    b = os.environ.get("UVD_BUILD_DIR")
    if b:
        return os.path.join(b, "guest-cache")
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uvd-guest")


class XenImage:
    """The hypervisor binary and the dom0 payload pieces, from the shared package cache."""

    def __init__(self, cache: guestlib.Cache):
        with cache.locked():
            kpkg = cache.kernel_package()
            dirs = cache.fetch(list(XEN_PACKAGES) + [kpkg])
            hyp = dirs["xen-hypervisor-4.17-amd64"]
            gz = sorted((hyp / "boot").glob("xen-4.17-amd64.gz"))
            if not gz:
                raise guestlib.GuestError(f"no boot/xen-4.17-amd64.gz in {hyp}")
            self.xen = cache.root / "xen" / (hyp.name + ".elf")
            if not self.xen.exists():
                self.xen.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.xen.with_suffix(".tmp")
                with gzip.open(gz[0], "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, self.xen)
        kernel = guestlib.Kernel(dirs[kpkg])
        utils, xs = dirs["xen-utils-4.17"], dirs["xenstore-utils"]
        self.bins = [f"{utils}/usr/lib/xen-4.17/bin/xenstored:/usr/sbin/xenstored",
                     f"{utils}/usr/lib/xen-4.17/bin/xen-init-dom0:/usr/sbin/xen-init-dom0"]
        for tool in ("xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm", "xenstore-list",
                     "xenstore-exists", "xenstore-chmod", "xenstore-watch"):
            # xenstore-utils links each name to one multi-call binary
            self.bins.append(f"{xs}/usr/bin/xenstore:/usr/bin/{tool}")
        for name, rel in PEER_MODULES.items():
            ko = kernel.moddir / "kernel" / rel
            if not ko.exists():
                raise guestlib.GuestError(f"kernel {kernel.version} has no {rel}")
            self.bins.append(f"{ko}:{MODULE_DIR}/{ko.name}")
        for host, guest in HOST_TOOLS.items():
            if not os.path.exists(host):
                raise guestlib.GuestError(f"{host} missing on this host (run scripts/install-deps)")
            self.bins.append(f"{host}:{guest}")

    def boot(self, kernel: Path, initrd: Path) -> list[str]:
        for p in (kernel, initrd):
            if "," in str(p):
                raise guestlib.GuestError(f"{p}: qemu's multiboot module list cannot take a comma in a path")
        return ["-cpu", "qemu64", "-kernel", str(self.xen), "-append", XEN_ARGS,
                "-initrd", f"{kernel} {LINUX_ARGS},{initrd}"]


def run(out: str, bins: list[str], script: str, env: dict[str, str], timeout: float,
        cache_dir: str | None = None, log=print) -> list[guestvm.GuestResult]:
    cache = guestlib.Cache(cache_dir or default_cache())
    img = XenImage(cache)
    spec = guestvm.GuestSpec(name="dom0", memory_mib=2048, boot=img.boot)
    payload = guestvm.Payload(bins=img.bins + bins, env=env, script=PROLOGUE + script)
    return guestvm.run_guests(cache, [spec], payload, out, features=[], timeout=timeout,
                              extra_modules=BOOT_MODULES, log=log)


def main() -> int:
    ap = argparse.ArgumentParser(prog="xenguest.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="boot Xen + dom0, run a script in dom0, collect results in OUT/dom0/")
    r.add_argument("--out", required=True)
    r.add_argument("--cache", default=None, help="package cache (default $UVD_BUILD_DIR/guest-cache)")
    r.add_argument("--bin", action="append", default=[], help="HOST[:GUEST] file or folder to copy in")
    r.add_argument("--env", action="append", default=[], help="NAME=VALUE for the script")
    r.add_argument("--timeout", type=float, default=300)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--script")
    g.add_argument("-c", dest="snippet")
    a = ap.parse_args()
    t0 = time.monotonic()
    script = Path(a.script).read_text() if a.script else a.snippet
    try:
        results = run(a.out, a.bin, script, dict(e.split("=", 1) for e in a.env), a.timeout, a.cache)
    except guestlib.GuestError as e:
        print(f"xenguest: ERROR: {e}", file=sys.stderr)
        return 125
    ok = guestvm.report(results)
    print(f"xenguest: {'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.1f} s")
    if ok:
        return 0
    r0 = results[0]
    return 124 if r0.outcome == "timeout" else (r0.status if r0.status not in (None, 0) else 126)


if __name__ == "__main__":
    sys.exit(main())
