# SPDX-License-Identifier: Apache-2.0
"""Guest images for qemu harnesses, built from Debian packages without installing them.

Packages are fetched with `apt-get download` into a cache that outlives a run and unpacked
with `dpkg-deb -x`; an initramfs (cpio newc) is assembled from busybox, kernel modules with
their dependencies, package files and the caller's binaries with every shared library
`ldd` finds for them. The host is only read: nothing is installed on it.

Layout of the cache (one per build tree, shared by concurrent runs through a lock):
    debs/       the downloaded .deb files, reused while present
    x/NAME/     each .deb unpacked (a stamp file marks a complete unpack)
    base/KEY/   initramfs base layers, keyed by everything that goes into them
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMAT = "3"  # bump when the layout of a base layer changes


class GuestError(RuntimeError):
    pass


@dataclass(frozen=True)
class Feature:
    """What a guest capability needs: packages to unpack into the image and kernel modules
    to load at boot, in this order (their dependencies are added before them)."""
    packages: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    optional_modules: tuple[str, ...] = ()  # loaded if the kernel has them


# Modules are named as modinfo names them; built-in ones are skipped.
FEATURES: dict[str, Feature] = {
    "base": Feature(packages=("busybox-static", "iproute2")),
    # virtio NICs on a private L2 segment
    "net": Feature(modules=("virtio_pci", "virtio_net", "veth")),
    # 9p shares: results back to the host, read-only host folders
    "share": Feature(modules=("virtio_pci", "9pnet_virtio", "9p")),
    # Soft-RoCE
    "rdma": Feature(
        packages=("libibverbs1", "ibverbs-providers", "librdmacm1", "rdmacm-utils", "ibverbs-utils"),
        modules=("crc32_generic", "configfs", "veth", "udp_tunnel", "ip6_udp_tunnel", "ib_core",
                 "ib_uverbs", "iw_cm", "ib_cm", "rdma_cm", "rdma_ucm", "rdma_rxe")),
    # the kernel's NBD client (diskless boot)
    "nbd": Feature(modules=("nbd",)),
}

KERNEL_META = "linux-image-amd64"
# Files of a package that never go into an image.
SKIP_PREFIXES = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/locale/", "/usr/share/lintian/",
                 "/usr/share/bash-completion/", "/usr/share/info/")


def norm(path: str) -> str:
    """The image uses merged /usr (like Debian 12): /bin, /sbin, /lib, /lib64 are links."""
    path = os.path.normpath("/" + path.lstrip("/"))
    for d in ("/bin", "/sbin", "/lib", "/lib64"):
        if path == d or path.startswith(d + "/"):
            return "/usr" + path
    return path


def run(argv: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


# ---------------------------------------------------------------- package cache

class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.debs = self.root / "debs"
        self.x = self.root / "x"
        for d in (self.debs, self.x, self.root / "base"):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """Concurrent harness runs share one cache; fetching and base builds are serialized."""
        with open(self.root / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _cached_deb(self, name: str) -> Path | None:
        hits = sorted(self.debs.glob(f"{name}_*.deb"))
        return hits[-1] if hits else None

    def kernel_package(self) -> str:
        """linux-image-amd64 is a metapackage; the kernel is the linux-image-<abi>-amd64 it
        depends on. Offline, fall back to the newest one already in the cache."""
        p = run(["apt-cache", "depends", "--important", KERNEL_META], check=False)
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", p.stdout)
        if m:
            return m.group(1)
        hits = sorted(self.debs.glob("linux-image-[0-9]*-amd64_*.deb"))
        if hits:
            return hits[-1].name.split("_")[0]
        raise GuestError(f"cannot resolve {KERNEL_META}: run `apt-get update` (apt-cache said: "
                         f"{p.stdout.strip()} {p.stderr.strip()})")

    def _download(self, names: list[str]) -> None:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:  # apt's _apt sandbox user cannot write into our cache folder
            argv += ["-o", "APT::Sandbox::User=root"]
        p = subprocess.run(argv + names, cwd=self.debs, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0 and os.geteuid() == 0:
            # stale package lists name versions the archive no longer has
            run(["apt-get", "update", "-qq"], check=False)
            p = subprocess.run(argv + names, cwd=self.debs, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            raise GuestError(f"apt-get download {' '.join(names)} failed:\n{p.stdout}{p.stderr}")

    def fetch(self, names: list[str]) -> dict[str, Path]:
        """Unpacked folder of each package, downloading and unpacking only what is missing."""
        missing = [n for n in names if self._cached_deb(n) is None]
        if missing:
            self._download(missing)
        out = {}
        for n in names:
            deb = self._cached_deb(n)
            if deb is None:
                raise GuestError(f"apt-get download gave no .deb for {n}")
            dest = self.x / deb.name[:-4]
            stamp = dest / ".unpacked"
            if not stamp.exists():
                if dest.exists():
                    shutil.rmtree(dest)
                run(["dpkg-deb", "-x", str(deb), str(dest)])
                stamp.touch()
            out[n] = dest
        return out


# ---------------------------------------------------------------- kernel modules

def _modinfo_depends(data: bytes) -> list[str]:
    """depends= from a module's .modinfo ELF section (no modinfo/depmod needed on the host)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestError("not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def sect(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = sect(shstrndx)
    for i in range(shnum):
        name, off, size = sect(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.zst"):
        return run_bytes(["zstd", "-dc", str(path)])
    return raw


def run_bytes(argv: list[str]) -> bytes:
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    if p.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


class Kernel:
    def __init__(self, root: Path):
        mods = sorted((root / "lib/modules").iterdir())
        if not mods:
            raise GuestError(f"no lib/modules in {root}")
        self.moddir = mods[-1]
        self.version = self.moddir.name
        self.vmlinuz = root / "boot" / f"vmlinuz-{self.version}"
        if not self.vmlinuz.exists():
            raise GuestError(f"missing {self.vmlinuz}")
        key = lambda n: n.replace("-", "_")
        self.builtin = set()
        bl = self.moddir / "modules.builtin"
        if bl.exists():
            for line in bl.read_text().split():
                self.builtin.add(key(re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(line))))
        self.index: dict[str, Path] = {}
        for p in (self.moddir / "kernel").rglob("*.ko*"):
            self.index[key(re.sub(r"\.ko(\.\w+)?$", "", p.name))] = p
        self._deps: dict[str, list[str]] = {}
        dep = self.moddir / "modules.dep"  # present only if depmod ran; modinfo otherwise
        if dep.exists():
            for line in dep.read_text().splitlines():
                mod, _, rest = line.partition(":")
                n = key(re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(mod)))
                self._deps[n] = [key(re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(d))) for d in rest.split()]

    def has(self, name: str) -> bool:
        n = name.replace("-", "_")
        return n in self.builtin or n in self.index

    def deps(self, name: str) -> list[str]:
        if name not in self._deps:
            self._deps[name] = [d.replace("-", "_") for d in _modinfo_depends(_read_module(self.index[name]))]
        return self._deps[name]

    def closure(self, names: list[str]) -> list[str]:
        """Loadable modules in load order (dependencies first), built-ins dropped."""
        order: list[str] = []
        seen: set[str] = set()
        def visit(n: str, chain: tuple[str, ...]):
            n = n.replace("-", "_")
            if n in seen or n in self.builtin:
                return
            if n not in self.index:
                raise GuestError(f"kernel {self.version} has no module {n} (needed by {' <- '.join(chain) or 'the guest'})")
            seen.add(n)
            for d in self.deps(n):
                visit(d, chain + (n,))
            order.append(n)
        for n in names:
            visit(n, ())
        return order


# ---------------------------------------------------------------- initramfs content

@dataclass
class Entry:
    kind: str            # dir, file, bytes, link, char
    mode: int = 0o755
    src: str = ""        # host file for kind=file
    data: bytes = b""    # content for kind=bytes, target for kind=link
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """Files of an initramfs layer, by guest path; a later add replaces an earlier one."""
    entries: dict[str, Entry] = field(default_factory=dict)
    below: set[str] = field(default_factory=set)  # paths a lower layer already provides
    pkg_roots: list[str] = field(default_factory=list)  # unpacked packages whose libraries ldd may pick
    _ldd: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in self.entries:
            self.entries[parent] = Entry("dir")
            parent = os.path.dirname(parent)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = norm(path)
        self._parents(path)
        self.entries[path] = Entry("dir", mode)

    def add_file(self, guest: str, host: str | Path, mode: int | None = None) -> None:
        guest = norm(guest)
        st = os.stat(host)
        self._parents(guest)
        self.entries[guest] = Entry("file", mode if mode is not None else stat.S_IMODE(st.st_mode), src=str(host))

    def add_bytes(self, guest: str, data: bytes | str, mode: int = 0o644) -> None:
        guest = norm(guest)
        self._parents(guest)
        self.entries[guest] = Entry("bytes", mode, data=data.encode() if isinstance(data, str) else data)

    def add_link(self, guest: str, target: str) -> None:
        guest = os.path.normpath(guest) if guest in ("/bin", "/sbin", "/lib", "/lib64") else norm(guest)
        self._parents(guest)
        self.entries[guest] = Entry("link", 0o777, data=target.encode())

    def add_char(self, guest: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(guest)
        self.entries[guest] = Entry("char", mode, rdev=(major, minor))

    def has(self, guest: str) -> bool:
        g = norm(guest)
        return g in self.entries or g in self.below

    def libs_of(self, host: str, lib_path: list[str]) -> list[tuple[str, str]]:
        """(guest path, host file) of every shared library `ldd` resolves for host, including
        the dynamic loader; [] for static binaries and non-ELF files."""
        real = os.path.realpath(host)
        if real in self._ldd:
            return self._ldd[real]
        with open(real, "rb") as f:
            if f.read(4) != b"\x7fELF":
                self._ldd[real] = []
                return []
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(lib_path + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
        p = run(["ldd", real], env=env, check=False)
        out: list[tuple[str, str]] = []
        missing = []
        for line in p.stdout.splitlines():
            line = line.strip()
            m = re.match(r"(\S+) => not found", line)
            if m:
                missing.append(m.group(1))
                continue
            m = re.match(r"\S+ => (\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
            if m:
                lib = m.group(1)
                guest = lib
                for root in self.pkg_roots:  # a library from an unpacked package: its packaged path
                    if lib.startswith(root + "/"):
                        guest = lib[len(root):]
                        break
                out.append((guest, lib))
                if os.path.basename(lib) == "libc.so.6":
                    # glibc dlopens libgcc_s for pthread_exit/cancel unwinding; ldd cannot see it
                    gcc_s = os.path.join(os.path.dirname(lib), "libgcc_s.so.1")
                    if os.path.exists(gcc_s):
                        out.append((os.path.join(os.path.dirname(guest), "libgcc_s.so.1"), gcc_s))
        if missing:
            raise GuestError(f"{host} needs shared libraries not found on this host: {', '.join(missing)} "
                             "(run scripts/install-deps)")
        self._ldd[real] = out
        return out

    def add_elf(self, guest: str, host: str | Path, lib_path: list[str] | None = None) -> None:
        """A binary plus every shared library it needs (libraries a lower layer has are skipped)."""
        self.add_file(guest, host)
        for g, h in self.libs_of(str(host), lib_path or []):
            if not self.has(g):
                self.add_file(g, os.path.realpath(h), 0o755)

    def write_cpio(self, out: Path, level: int = 6) -> None:
        """cpio newc (what the kernel unpacks), gzip-compressed; owners are root, times 0."""
        tmp = out.with_name(out.name + ".tmp")
        opener = (lambda: gzip.open(tmp, "wb", compresslevel=level)) if level > 0 else (lambda: open(tmp, "wb"))
        with opener() as f:
            ino = 1
            def put(name: str, mode: int, body_len: int, rdev=(0, 0), nlink=1):
                nonlocal ino
                nb = name.encode() + b"\0"
                hdr = "070701" + "".join(f"{v:08X}" for v in (
                    ino, mode, 0, 0, nlink, 0, body_len, 0, 0, rdev[0], rdev[1], len(nb), 0))
                ino += 1
                f.write(hdr.encode() + nb + b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
            def pad(n: int):
                f.write(b"\0" * ((4 - n % 4) % 4))
            # parents sort before children
            for path in sorted(self.entries, key=lambda p: (p.count("/"), p)):
                e = self.entries[path]
                name = path.lstrip("/")
                if e.kind == "dir":
                    put(name, stat.S_IFDIR | e.mode, 0, nlink=2)
                elif e.kind == "link":
                    put(name, stat.S_IFLNK | 0o777, len(e.data))
                    f.write(e.data)
                    pad(len(e.data))
                elif e.kind == "char":
                    put(name, stat.S_IFCHR | e.mode, 0, rdev=e.rdev)
                elif e.kind == "bytes":
                    put(name, stat.S_IFREG | e.mode, len(e.data))
                    f.write(e.data)
                    pad(len(e.data))
                else:
                    size = os.path.getsize(e.src)
                    put(name, stat.S_IFREG | e.mode, size)
                    with open(e.src, "rb") as src:
                        shutil.copyfileobj(src, f, 1 << 20)
                    pad(size)
            put("TRAILER!!!", 0, 0)
        os.replace(tmp, out)


# ---------------------------------------------------------------- base layer

@dataclass
class Base:
    """A cached base layer: kernel, busybox, modules and package userland."""
    kernel: Path          # vmlinuz
    initrd: Path          # base cpio.gz
    manifest: set[str]    # guest paths it holds
    version: str
    modules: list[str]    # in load order
    features: list[str] = field(default_factory=list)
    vmlinux: Path | None = None  # uncompressed ELF of the same kernel, if it could be extracted


def extract_vmlinux(bzimage: Path, out: Path) -> Path | None:
    """The kernel ELF inside a bzImage (xz or gzip payload, as Debian builds them). qemu boots
    it directly through its PVH entry, skipping the decompressor, which takes seconds under
    TCG. None when the payload is in another format: callers then boot the bzImage."""
    if out.exists():
        return out
    data = bzimage.read_bytes()
    for magic, decompress in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b)),
                              (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b))):
        i = data.find(magic)
        while i >= 0:
            try:
                elf = decompress(data[i:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF":
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_bytes(elf)
                os.replace(tmp, out)
                return out
            i = data.find(magic, i + 1)
    return None


def build_base(cache: Cache, features: list[str], extra_modules: list[str] = (),
               extra_packages: list[str] = ()) -> Base:
    """The base layer for a set of features (plus more modules and Debian packages unpacked
    into the image); built once per distinct input and reused."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise GuestError(f"unknown guest features {unknown}; known: {sorted(FEATURES)}")
    feats = ["base"] + [f for f in features if f != "base"]
    with cache.locked():
        kpkg = cache.kernel_package()
        pkgs = [kpkg]
        mods: list[str] = []
        optional: list[str] = []
        for f in feats:
            pkgs += [p for p in FEATURES[f].packages if p not in pkgs]
            mods += [m for m in FEATURES[f].modules if m not in mods]
            optional += list(FEATURES[f].optional_modules)
        mods += [m for m in extra_modules if m not in mods]
        pkgs += [p for p in extra_packages if p not in pkgs]
        dirs = cache.fetch(pkgs)
        debs = sorted(p.name for p in dirs.values())
        init = (HERE / "init.sh").read_bytes()
        code = Path(__file__).read_bytes()  # a change to this builder rebuilds the layer
        key = hashlib.sha256(repr((FORMAT, debs, feats, mods, optional, init, code)).encode()).hexdigest()[:16]
        bdir = cache.root / "base" / key
        initrd = bdir / "base.cpio.gz"
        manifest_file = bdir / "manifest"
        order_file = bdir / "modules"
        if initrd.exists() and manifest_file.exists() and order_file.exists():  # warm: no module scan
            version, *order = order_file.read_text().split()
            vmlinuz = dirs[kpkg] / "boot" / f"vmlinuz-{version}"
            return Base(vmlinuz, initrd, set(manifest_file.read_text().splitlines()), version, order, feats,
                        extract_vmlinux(vmlinuz, dirs[kpkg] / "vmlinux"))
        kernel = Kernel(dirs[kpkg])
        order = kernel.closure(mods + [m for m in optional if kernel.has(m)])
        vmlinux = extract_vmlinux(kernel.vmlinuz, dirs[kpkg] / "vmlinux")
        bdir.mkdir(parents=True, exist_ok=True)
        for old in sorted((cache.root / "base").iterdir(), key=lambda p: p.stat().st_mtime)[:-6]:
            shutil.rmtree(old, ignore_errors=True)  # keep the few most recent layers
        t = Tree()
        for d in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/proc", "/sys", "/dev", "/run",
                  "/tmp", "/etc", "/root", "/out", "/mnt", "/var"):
            t.mkdir(d, 0o1777 if d == "/tmp" else 0o755)
        for d in ("bin", "sbin", "lib", "lib64"):
            t.add_link("/" + d, "usr/" + d)
        t.add_link("/var/run", "../run")
        t.add_char("/dev/console", 5, 1)
        t.add_char("/dev/null", 1, 3, 0o666)
        bb = dirs["busybox-static"] / "bin/busybox"
        t.add_file("/usr/bin/busybox", bb, 0o755)
        lib_path = []
        t.pkg_roots = [str(dirs[n]) for n in pkgs[1:]]
        for n in pkgs[1:]:
            for sub in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"):
                if (dirs[n] / sub).is_dir():
                    lib_path.append(str(dirs[n] / sub))
        for n in pkgs[1:]:
            if n == "busybox-static":
                continue
            root = dirs[n]
            for p in sorted(root.rglob("*")):
                rel = "/" + str(p.relative_to(root))
                if rel == "/.unpacked" or any(norm(rel).startswith(s) for s in SKIP_PREFIXES):
                    continue
                if p.is_symlink():
                    t.add_link(rel, os.readlink(p))
                elif p.is_dir():
                    if norm(rel) not in t.entries:
                        t.mkdir(rel)
                else:
                    t.add_elf(rel, p, lib_path)
        # busybox fills in every command no package provides (in either bin folder)
        provided = {os.path.basename(p) for p in t.entries if os.path.dirname(p) in ("/usr/bin", "/usr/sbin")}
        shadowed = []
        for applet in run([str(bb), "--list-full"]).stdout.split():
            name = os.path.basename(applet)
            if name in provided:
                shadowed.append(name)
            elif norm(applet) != "/usr/bin/busybox":
                t.add_link("/" + applet, "/usr/bin/busybox")
        # Debian's static busybox sh runs its own applets before searching PATH; functions
        # come first, so the packaged commands (ip, ...) win in /init and in scripts.
        t.add_bytes("/etc/uvd-guest/commands.sh", "".join(
            f'{n}() {{ /usr/{"bin" if "/usr/bin/" + n in t.entries else "sbin"}/{n} "$@"; }}\n'
            for n in sorted(set(shadowed))))
        # modules at their usual place, decompressed, with a modules.dep for busybox modprobe
        dep_lines = []
        for m in order:
            src = kernel.index[m]
            rel = str(src.relative_to(kernel.moddir))
            rel = re.sub(r"\.ko\.\w+$", ".ko", rel)
            t.add_bytes(f"/lib/modules/{kernel.version}/{rel}", _read_module(src))
            dep_lines.append((m, rel))
        relof = dict(dep_lines)
        t.add_bytes(f"/lib/modules/{kernel.version}/modules.dep", "".join(
            f"{rel}: {' '.join(relof[d] for d in kernel.deps(m) if d in relof)}\n" for m, rel in dep_lines))
        t.add_bytes("/etc/uvd-guest/modules", "".join(
            f"/lib/modules/{kernel.version}/{rel}\n" for _, rel in dep_lines))
        t.add_bytes("/etc/uvd-guest/features", " ".join(feats) + "\n")
        t.add_bytes("/init", init, 0o755)
        t.add_bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        t.add_bytes("/etc/group", "root:x:0:\n")
        t.write_cpio(initrd)
        manifest_file.write_text("\n".join(sorted(t.entries)) + "\n")
        order_file.write_text(" ".join([kernel.version] + order) + "\n")
        return Base(kernel.vmlinuz, initrd, set(t.entries), kernel.version, order, feats, vmlinux)
