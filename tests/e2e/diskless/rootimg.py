# SPDX-License-Identifier: Apache-2.0
"""The shared root filesystem of the diskless clients: busybox (Debian's busybox-static,
from the guest harness's package cache) plus sbin-init.sh as /sbin/init, packed into an
ext4 image with `mkfs.ext4 -d` (no privileges, nothing mounted)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import guestlib

HERE = Path(__file__).resolve().parent


def build_root_image(cache: guestlib.Cache, out: Path, size_mib: int = 64) -> Path:
    """Writes the image to out (replacing it) and returns out."""
    with cache.locked():
        bb_dir = cache.fetch(["busybox-static"])["busybox-static"]
    busybox = bb_dir / "bin/busybox"
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="uvd-root-") as tmp:
        root = Path(tmp) / "root"
        for d in ("usr/bin", "usr/sbin", "usr/lib", "proc", "sys", "dev", "run", "tmp", "etc", "root",
                  "mnt", "var/lib/uvd-diskless", "var/log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        for d in ("bin", "sbin", "lib"):  # merged /usr, as Debian 12
            os.symlink("usr/" + d, root / d)
        shutil.copy2(busybox, root / "usr/bin/busybox")
        os.chmod(root / "usr/bin/busybox", 0o755)
        applets = guestlib.run([str(busybox), "--list-full"]).stdout.split()
        for a in applets:
            p = root / guestlib.norm(a).lstrip("/")
            if p.name == "busybox" or p.exists() or p.name == "init":
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/usr/bin/busybox", p)
        shutil.copy2(HERE / "sbin-init.sh", root / "usr/sbin/init")
        os.chmod(root / "usr/sbin/init", 0o755)
        (root / "etc/hostname").write_text("uvd-base\n")
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "etc/uvd-release").write_text("uvd diskless shared root (busybox)\n")
        tmp_img = out.with_name(out.name + ".tmp")
        tmp_img.unlink(missing_ok=True)
        with open(tmp_img, "wb") as f:
            f.truncate(size_mib << 20)
        # root_owner: files belong to root whoever builds the image
        guestlib.run(["mkfs.ext4", "-q", "-F", "-L", "uvd-root", "-E", "root_owner=0:0",
                      "-d", str(root), str(tmp_img)])
        os.replace(tmp_img, out)
    return out
