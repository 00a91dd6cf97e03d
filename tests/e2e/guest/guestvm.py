# SPDX-License-Identifier: Apache-2.0
"""Booting guests: qemu TCG machines from a base layer plus the caller's payload, private L2
segments between them, results back on the host through a 9p share.

    cache = guestlib.Cache(build_dir + "/guest-cache")
    seg = Segment(workdir)                       # optional: guests on one private L2 segment
    specs = [GuestSpec("server", nics=[seg], daemon=True), GuestSpec("client", nics=[seg])]
    results = run_guests(cache, specs, Payload(bins=[...], script="..."), workdir,
                         features=["rdma"], timeout=300)

Each guest gets a folder workdir/NAME/ (mounted at /out in the guest, the script's working
directory) holding console.log, script.log, exit-status and whatever the script writes there.
"""
from __future__ import annotations

import ctypes
import os
import re
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import guestlib
from guestlib import GuestError


class Segment:
    """A private Ethernet segment: a hub relaying frames between the guests' NICs.

    Each NIC is a qemu `-netdev stream` client on a unix socket (4-byte big-endian length,
    then the frame). Nothing touches the host's network stack or needs privileges; frames
    never leave the hub. Addresses come from `subnet` (a /24 prefix, e.g. "10.97.0"),
    host numbers in attach order starting at 1."""

    _next_id = 0

    def __init__(self, workdir: str | Path, subnet: str | None = None):
        Segment._next_id += 1
        self.id = Segment._next_id
        self.subnet = subnet or f"10.97.{self.id}"
        self.path = str(Path(workdir).resolve() / f"seg{self.id}.sock")
        self.members: list[tuple[str, str]] = []  # (guest name, address)
        self.frames = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def attach(self, guest: str) -> tuple[str, str]:
        """(mac, address/24) for the next NIC of guest on this segment."""
        n = len(self.members) + 1
        addr = f"{self.subnet}.{n}"
        self.members.append((guest, addr))
        return f"52:54:00:{self.id:02x}:00:{n:02x}", f"{addr}/24"

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._relay, name=f"segment{self.id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _relay(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        ports: dict[socket.socket, dict] = {}
        limit = 4 << 20  # per-port backlog; past it frames are dropped as a switch would

        def interest(s):
            sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if ports[s]["out"] else 0))

        def close(s):
            sel.unregister(s)
            ports.pop(s, None)
            s.close()

        while True:
            for key, ev in sel.select():
                obj = key.fileobj
                if obj == self._wake_r:
                    for s in list(ports):
                        close(s)
                    self._listener.close()
                    return
                if obj is self._listener:
                    c, _ = self._listener.accept()
                    c.setblocking(False)
                    ports[c] = {"in": bytearray(), "out": bytearray()}
                    sel.register(c, selectors.EVENT_READ)
                    continue
                p = ports.get(obj)
                if p is None:
                    continue
                if ev & selectors.EVENT_WRITE and p["out"]:
                    try:
                        n = obj.send(p["out"])
                        del p["out"][:n]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        close(obj)
                        continue
                    interest(obj)
                if ev & selectors.EVENT_READ:
                    try:
                        data = obj.recv(1 << 16)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        close(obj)
                        continue
                    buf = p["in"]
                    buf += data
                    while len(buf) >= 4:
                        n, = struct.unpack_from(">I", buf)
                        if len(buf) < 4 + n:
                            break
                        frame = bytes(buf[:4 + n])
                        del buf[:4 + n]
                        self.frames += 1
                        for other, q in ports.items():
                            if other is not obj and len(q["out"]) < limit:
                                q["out"] += frame
                                interest(other)


@dataclass
class Payload:
    """What the caller puts into every guest of a run.

    bins:  host files or folders (ELF binaries, plugins, data); each goes to the same absolute
           path in the guest unless given as "HOST:GUEST", so paths compiled into test binaries
           keep working. ELF files bring every shared library ldd finds for them.
    env:   variables exported to the script (UVD_* and sanitizer options of the caller's
           environment are passed through by default).
    script: shell (busybox sh -e) run in /out; its exit status is the guest's result."""
    bins: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    script: str = "true"


PASS_ENV_PREFIXES = ("UVD_", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "GTEST_")


@dataclass
class GuestSpec:
    name: str
    nics: list[Segment] = field(default_factory=list)
    memory_mib: int = 1024
    daemon: bool = False      # stopped when every non-daemon guest has finished
    rdma_pair: bool = False   # two rxe devices inside this guest: rxe_a/veth0, rxe_b/veth1
    shares: dict[str, str] = field(default_factory=dict)  # guest path -> host folder (read-only)
    env: dict[str, str] = field(default_factory=dict)     # this guest only
    extra_args: list[str] = field(default_factory=list)   # more qemu arguments
    # Replaces -cpu/-kernel/-initrd/-append: boot(kernel, initrd) -> qemu arguments, for a
    # hypervisor that starts the Debian kernel as its first domain (tests/e2e/xen).
    boot: Callable[[Path, Path], list[str]] | None = None
    append: str = ""          # more kernel command line (default boot only)
    # False: no 9p result share (a diskless machine has no disk of any kind); the script's
    # exit status comes back from the console ("uvd-guest: exit status N").
    out_share: bool = True


@dataclass
class GuestResult:
    name: str
    status: int | None        # the script's exit status; None if it never reported one
    outcome: str              # "exited", "timeout", "setup-failed", "crashed", "stopped"
    out_dir: Path
    console: Path
    seconds: float
    daemon: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 0 or (self.daemon and self.outcome in ("stopped", "exited") and self.status in (0, None))

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "\n".join(text[-lines:])


def build_payload(base: guestlib.Base, payload: Payload, out: Path) -> None:
    t = guestlib.Tree(below=set(base.manifest))
    for spec in payload.bins:
        host, _, guest = spec.partition(":")
        host = os.path.abspath(host)
        guest = guest or host
        if os.path.isdir(host):
            for root, _dirs, files in os.walk(host):
                for f in files:
                    h = os.path.join(root, f)
                    t.add_elf(os.path.join(guest, os.path.relpath(h, host)), h)
        elif os.path.exists(host):
            t.add_elf(guest, host)
        else:
            raise GuestError(f"payload file {host} does not exist")
    # folders of the caller's files come first in PATH, so the script can call them by name
    dirs = []
    for spec in payload.bins:
        host, _, guest = spec.partition(":")
        guest = guest or os.path.abspath(host)
        d = guest if os.path.isdir(os.path.abspath(host)) else os.path.dirname(guest)
        if d not in dirs:
            dirs.append(d)
    t.add_bytes("/etc/uvd-guest/path", ":".join(dirs + ["/usr/sbin", "/usr/bin"]) + "\n")
    t.add_bytes("/etc/uvd-guest/script", payload.script if payload.script.endswith("\n") else payload.script + "\n", 0o755)
    t.write_cpio(out, level=1)


def _env_lines(env: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))


def _guest_layer(base: guestlib.Base, spec: GuestSpec, index: int, nics: list[tuple[str, str]],
                 hosts: str, env: dict[str, str], share_tags: list[str], out: Path) -> None:
    t = guestlib.Tree(below=set(base.manifest))
    genv = {
        "UVD_GUEST_NAME": spec.name,
        "UVD_GUEST_INDEX": str(index),
        "UVD_GUEST_NICS": " ".join(f"{m}={a}" for m, a in nics),
        "UVD_GUEST_RDMA": "1" if "rdma" in base.features else "0",
        "UVD_GUEST_RDMA_PAIR": "1" if spec.rdma_pair else "0",
        "UVD_GUEST_OUT_SHARE": "1" if spec.out_share else "0",
        "UVD_GUEST_SHARES": " ".join(share_tags),
    }
    if spec.rdma_pair:
        genv.update(UVD_RDMA_ADDR="10.98.0.1", UVD_RDMA_PEER_ADDR="10.98.0.2")
    t.add_bytes("/etc/uvd-guest/guest.env", _env_lines(genv))
    script_env = dict(env)
    script_env.update({k: v for k, v in genv.items() if k.startswith("UVD_RDMA_")})
    script_env.update(UVD_GUEST_NAME=spec.name, UVD_GUEST_INDEX=str(index))
    if nics:
        script_env["UVD_GUEST_ADDR"] = nics[0][1].split("/")[0]
    script_env.update(spec.env)
    t.add_bytes("/etc/uvd-guest/env", _env_lines(script_env))
    t.add_bytes("/etc/uvd-guest/hosts", hosts)
    t.write_cpio(out, level=1)


def qemu_argv(base: guestlib.Base, spec: GuestSpec, initrd: Path, out_dir: Path,
              nics: list[tuple[str, Segment]], shares: list[tuple[str, str]]) -> list[str]:
    boot = spec.boot(base.kernel, initrd) if spec.boot else [
        "-cpu", "max", "-kernel", str(base.vmlinux or base.kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 loglevel=5 quiet {spec.append}".strip()]
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(spec.memory_mib),
            "-smp", "1", "-nographic", "-no-reboot", "-nic", "none", *boot]
    if spec.out_share:
        argv += ["-fsdev", f"local,id=out,path={out_dir},security_model=none",
                 "-device", "virtio-9p-pci,fsdev=out,mount_tag=out"]
    for tag, host in shares:
        argv += ["-fsdev", f"local,id={tag},path={host},security_model=none,readonly=on",
                 "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    for i, (mac, seg) in enumerate(nics):
        argv += ["-netdev", f"stream,id=n{i},server=off,addr.type=unix,addr.path={seg.path}",
                 "-device", f"virtio-net-pci,netdev=n{i},mac={mac},romfile="]  # no iPXE: we boot -kernel
    return argv + spec.extra_args


def _own_group_dies_with_parent() -> None:
    """qemu in its own process group (stopped with killpg), killed if the harness dies:
    a harness killed by a test runner's timeout must not leave machines running."""
    os.setpgid(0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def run_guests(cache: guestlib.Cache, specs: list[GuestSpec], payload: Payload, workdir: str | Path,
               features: list[str], timeout: float = 300, extra_modules: list[str] = (),
               extra_packages: list[str] = (), log=print) -> list[GuestResult]:
    """Boots every guest at once, waits for the non-daemon ones (at most timeout seconds),
    stops the daemons and returns one result per guest. Never raises for a guest that
    fails; raises GuestError when the images cannot be built."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    feats = list(features)
    if any(s.nics for s in specs) and "net" not in feats:
        feats.append("net")
    if "share" not in feats:
        feats.append("share")
    t0 = time.monotonic()
    base = guestlib.build_base(cache, feats, list(extra_modules), list(extra_packages))
    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES)}
    env.update(payload.env)
    common = workdir / "payload.cpio.gz"
    build_payload(base, payload, common)
    log(f"guest: images ready in {time.monotonic() - t0:.1f} s (kernel {base.version})")

    segments = []
    for s in specs:
        for seg in s.nics:
            if seg not in segments:
                segments.append(seg)
    plan = []
    for i, s in enumerate(specs):
        nics = [(seg,) + seg.attach(s.name) for seg in s.nics]
        plan.append(nics)
    hosts = "".join(f"{addr} {name}\n" for seg in segments for name, addr in seg.members)

    procs = []
    try:
        for seg in segments:
            seg.start()
        for i, s in enumerate(specs):
            out_dir = workdir / s.name
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in ("exit-status", "setup-error", "script.log", "console.log"):
                (out_dir / f).unlink(missing_ok=True)
            shares = []
            for j, (gpath, host) in enumerate(sorted(s.shares.items())):
                shares.append((f"share{j}", os.path.abspath(host), gpath))
            layer = workdir / f"{s.name}.layer.cpio.gz"
            _guest_layer(base, s, i, [(m, a) for _, m, a in plan[i]], hosts, env,
                         [f"{tag}:{g}" for tag, _, g in shares], layer)
            initrd = workdir / f"{s.name}.initrd"
            with open(initrd, "wb") as f:  # concatenated archives: the kernel unpacks each
                for part in (base.initrd, common, layer):
                    with open(part, "rb") as src:
                        f.write(src.read())
            argv = qemu_argv(base, s, initrd, out_dir, [(m, seg) for seg, m, _ in plan[i]],
                             [(tag, h) for tag, h, _ in shares])
            (out_dir / "qemu-argv").write_text(" ".join(shlex.quote(a) for a in argv) + "\n")
            console = open(out_dir / "console.log", "wb")
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                 preexec_fn=_own_group_dies_with_parent)
            procs.append((s, p, console, time.monotonic(), out_dir))
        deadline = time.monotonic() + timeout
        ends: dict[str, float] = {}
        timed_out: set[str] = set()
        while True:
            for s, p, _, _, _ in procs:
                if p.poll() is not None and s.name not in ends:
                    ends[s.name] = time.monotonic()
            if all(s.name in ends for s, _, _, _, _ in procs if not s.daemon):
                break
            if time.monotonic() > deadline:
                for s, p, _, _, _ in procs:
                    if p.poll() is None and not s.daemon:
                        timed_out.add(s.name)
                break
            time.sleep(0.1)
    finally:
        for s, p, console, _, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            console.close()
        for seg in segments:
            seg.stop()

    results = []
    for s, p, _, start, out_dir in procs:
        status = None
        st = out_dir / "exit-status"
        if not s.out_share:  # no share: /init's last word on the console
            st.unlink(missing_ok=True)
            status_from_console(out_dir / "console.log", st)
        if st.exists():
            try:
                status = int(st.read_text().strip())
            except ValueError:
                status = None
        if s.name in timed_out:
            outcome = "timeout"
        elif (out_dir / "setup-error").exists():
            outcome = "setup-failed"
        elif status is not None:
            outcome = "exited"
        elif s.daemon:
            outcome = "stopped"
        else:
            outcome = "crashed"
        r = GuestResult(s.name, status, outcome, out_dir, out_dir / "console.log",
                        ends.get(s.name, time.monotonic()) - start, s.daemon)
        results.append(r)
    return results


def status_from_console(console: Path, dest: Path) -> None:
    """Writes the status of the last "uvd-guest: exit status N" line of console to dest."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return
    found = re.findall(r"^uvd-guest: exit status (\d+)", text, re.M)
    if found:
        dest.write_text(found[-1] + "\n")


def report(results: list[GuestResult], log=print) -> bool:
    """One line per guest; for any failed guest the tail of its console, loudly."""
    ok = True
    for r in results:
        log(f"guest {r.name}: {r.outcome}, status {r.status}, {r.seconds:.1f} s, results in {r.out_dir}")
        if r.ok:
            try:
                lines = (r.out_dir / "script.log").read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            if lines:
                log(f"--- {r.name}: script output{' (last 30 lines)' if len(lines) > 30 else ''}")
                log("\n".join(lines[-30:]))
        else:
            ok = False
            bar = "=" * 30
            log(f"{bar} GUEST {r.name} FAILED ({r.outcome}, status {r.status}): console tail {bar}")
            log(r.console_tail())
            log(f"{bar} end of console of {r.name} (full log: {r.console}) {bar}")
    return ok
