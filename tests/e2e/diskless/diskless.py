#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Diskless boot over RDMA with a shared copy-on-write root (see README.md beside this file).

    diskless.py --uvd BUILD/uvd --plugins BUILD/plugins --out DIR [--short | --bench N]

A server machine exports one ext4 root image read-only plus one persistent COW overlay per
client with `uvd serve --rdma`; diskless client machines (no disk, no share) attach their
root with `uvd attach` onto the kernel's nbd driver and switch_root into it. The host then
reads every overlay back through `uvd serve --unix` (NBD) and checks it. Exit status 0 when
every check passed; the report says what was checked.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guest"))
sys.path.insert(0, str(HERE))
import guestlib  # noqa: E402
import guestvm   # noqa: E402
import rootimg   # noqa: E402
from guest_scripts import SCRIPT  # noqa: E402

STATE = "/var/lib/uvd-diskless"
REACHED = re.compile(r"uvd-diskless: (\S+) reached /sbin/init at ([0-9.]+) s, root (\S+) over (\S+), "
                     r"read (\d+) bytes from ")


class CheckFailed(Exception):
    pass


@dataclass
class Boot:
    client: str
    phase: str
    transport: str = ""
    init_at: float | None = None   # uptime when /sbin/init ran
    script_at: float | None = None  # uptime when the initramfs started attaching the root
    attach_at: float | None = None  # uptime of the attach attempt that succeeded (the server may boot later)
    read_bytes: int = 0
    root: str = ""
    done: bool = False
    marker_sha: str = ""
    previous: str = ""
    workload: str = ""
    console: Path | None = None


@dataclass
class Scenario:
    uvd: Path
    plugins: Path
    out: Path
    cache: guestlib.Cache
    log: callable = print
    boots: list[Boot] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)
    timings: dict[str, float] = field(default_factory=dict)
    overlay_summary: dict[str, str] = field(default_factory=dict)  # client -> what its overlay holds
    multipath_summary: str = ""

    @property
    def srv(self) -> Path:
        return self.out / "machines" / "server"

    @property
    def base(self) -> Path:
        return self.srv / "root.img"

    @property
    def overlays(self) -> Path:
        return self.srv / "overlays"

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        self.checks.append((what, ok, detail))
        self.log(f"  [{'ok' if ok else 'FAIL'}] {what}{': ' + detail if detail else ''}")
        return ok

    # ------------------------------------------------------------ machines

    def prepare(self) -> None:
        self.srv.mkdir(parents=True, exist_ok=True)
        if not self.base.exists():
            t0 = time.monotonic()
            rootimg.build_root_image(self.cache, self.base)
            self.timings["root image"] = time.monotonic() - t0
        self.base_sha = sha256(self.base)
        self.log(f"diskless: root image {self.base} ({self.base.stat().st_size >> 20} MiB, "
                 f"sha256 {self.base_sha[:16]}...)")

    def run_phase(self, phase: str, clients: list[str], disk_clients: list[str] = (),
                  multipath: bool = False, writes: int = 0, kill_after: int = 20,
                  timeout: float = 420) -> list[Boot]:
        """Boots the server and the given clients; returns one Boot per client."""
        self.log(f"\n== {phase}: server + {', '.join(list(clients) + list(disk_clients))}")
        work = self.out / "machines"
        seg1 = guestvm.Segment(work, "10.97.1")
        segs = [seg1] + ([guestvm.Segment(work, "10.97.2")] if multipath else [])
        specs = [guestvm.GuestSpec("server", nics=segs, daemon=True, env={
            "DISKLESS_ROLE": "server",
            "DISKLESS_MP": "1" if multipath else "0", "DISKLESS_KILL_AFTER": str(kill_after)})]
        for c in clients:
            if multipath:
                paths = "&".join(f"path=rdma://{s.subnet}.1:7171/root/{c}" for s in segs)
                uri = f"multipath:?{paths}&policy=failover&fence=required&check_interval=500ms&io_timeout=3s"
                transport = "rdma-multipath"
            else:
                uri, transport = f"rdma://{seg1.subnet}.1:7171/root/{c}", "rdma"
            specs.append(guestvm.GuestSpec(
                c, nics=segs, out_share=False, env={"DISKLESS_ROLE": "client", "DISKLESS_URI": uri},
                append=f"uvd.transport={transport} uvd.writes={writes}"))
        for c in disk_clients:
            img = work / f"{c}.img"
            shutil.copyfile(self.base, img)  # its own copy: the local disk is written
            specs.append(guestvm.GuestSpec(
                c, out_share=False, env={"DISKLESS_ROLE": "disk"},
                append=f"uvd.transport=virtio-disk uvd.writes={writes}",
                extra_args=["-drive", f"file={img},if=virtio,format=raw,cache=unsafe"]))
        env = {"UVD_PLUGIN_PATH": str(self.plugins)}
        payload = guestvm.Payload(bins=[str(self.uvd), str(self.plugins)], env=env, script=SCRIPT)
        t0 = time.monotonic()
        results = guestvm.run_guests(self.cache, specs, payload, work, features=["rdma", "nbd"],
                                     timeout=timeout, extra_modules=["crc32c_generic", "ext4", "virtio_blk"],
                                     log=self.log)
        self.timings[phase] = time.monotonic() - t0
        pdir = self.out / phase
        pdir.mkdir(parents=True, exist_ok=True)
        boots = []
        for r in results:
            for f in ("console.log", "script.log"):
                if (r.out_dir / f).exists():
                    shutil.copyfile(r.out_dir / f, pdir / f"{r.name}.{f}")
            if r.name == "server":
                for f in ("serve1.log", "serve2.log", "overlay-list.txt", "overlay-list-before-kill.txt",
                          "overlay-list-after-kill.txt"):
                    if (r.out_dir / f).exists():
                        shutil.copyfile(r.out_dir / f, pdir / f"server.{f}")
                        (r.out_dir / f).unlink()
                for f in ("overlay-list.txt", "overlay-list-before-kill.txt", "overlay-list-after-kill.txt"):
                    if (pdir / f"server.{f}").exists():
                        self.log(f"  uvd overlay list on the server ({f[:-4]}):")
                        self.log("\n".join("    " + ln for ln in (pdir / f"server.{f}").read_text().splitlines()))
                continue
            b = parse_console(r.name, phase, pdir / f"{r.name}.console.log")
            boots.append(b)
            ok = self.check(f"{phase}: {r.name} booted its root to /sbin/init and powered off cleanly",
                            r.ok and b.init_at is not None and b.done,
                            f"{b.transport}, /sbin/init at {b.init_at} s, read {b.read_bytes} bytes"
                            if b.init_at is not None else f"{r.outcome}, see {pdir}/{r.name}.console.log")
            if not ok:
                self.log(r.console_tail(40))
        self.boots += boots
        return boots

    # ------------------------------------------------------------ host checks

    @contextlib.contextmanager
    def host_export(self):
        """uvd serve on a unix socket over the server's files: the base and each client's
        device (base + overlay) as NBD exports."""
        sock = Path(tempfile.mkdtemp(prefix="uvd-diskless-")) / "nbd.sock"
        argv = [str(self.uvd), "serve", "--unix", str(sock), "--root", f"root={self.base}",
                "--overlay-dir", str(self.overlays)]
        env = dict(os.environ, UVD_PLUGIN_PATH=str(self.plugins))
        logf = open(self.out / "host-serve.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            for _ in range(100):
                if sock.exists() or p.poll() is not None:
                    break
                time.sleep(0.1)
            if not sock.exists():
                raise CheckFailed(f"host uvd serve did not start: {' '.join(argv)} (see {self.out}/host-serve.log)")
            yield sock
        finally:
            p.terminate()
            p.wait(30)
            logf.close()
            shutil.rmtree(sock.parent, ignore_errors=True)

    def read_device(self, sock: Path, export: str, dest: Path) -> None:
        run(["nbdcopy", f"nbd+unix:///{export}?socket={sock}", str(dest)])

    def host_checks(self, label: str, clients: list[str], workload: tuple[str, ...] = ()) -> None:
        """workload: clients that ran the write workload (checked even if the console says
        nothing: a client that died half-way must still not have lost what it recorded)."""
        self.log(f"\n== host checks after {label}")
        self.check("base image unchanged", sha256(self.base) == self.base_sha, f"sha256 {self.base_sha[:16]}...")
        fsck = run(["e2fsck", "-fn", str(self.base)], check=False)
        self.check("e2fsck -fn of the base", fsck.returncode == 0, last_line(fsck))
        with tempfile.TemporaryDirectory(prefix="uvd-diskless-") as tmp, self.host_export() as sock:
            tmp = Path(tmp)
            self.read_device(sock, "root", tmp / "base.raw")
            self.check("the base read through uvd's NBD export equals the image",
                       sha256(tmp / "base.raw") == self.base_sha)
            for c in clients:
                raw = tmp / f"{c}.raw"
                self.read_device(sock, f"root/{c}", raw)
                fsck = run(["e2fsck", "-fn", str(raw)], check=False)
                self.check(f"e2fsck -fn of {c}'s root (base + overlay, read through uvd's NBD export)",
                           fsck.returncode == 0, last_line(fsck))
                hostname = debugfs(raw, "cat /etc/hostname").strip()
                self.check(f"{c}'s /etc/hostname is its own", hostname == c, repr(hostname))
                names = set(debugfs_ls(raw, STATE))
                foreign = sorted(n for n in names if not n.startswith(c + ".") and not n.startswith(f"w-{c}-"))
                self.check(f"{c}'s root holds none of another client's files", not foreign, ", ".join(foreign))
                marker = debugfs(raw, f"cat {STATE}/{c}.marker", binary=True)
                mine = [b for b in self.boots if b.client == c and b.marker_sha]
                want = mine[-1].marker_sha if mine else ""
                self.check(f"{c}'s marker is what its last boot wrote",
                           bool(want) and hashlib.sha256(marker).hexdigest() == want, f"sha256 {want[:16]}...")
                boots = debugfs(raw, f"cat {STATE}/{c}.boots").splitlines()
                self.check(f"{c}'s boot record lists every boot it made", len(boots) == len(mine) >= 1,
                           f"{len(boots)} recorded, {len(mine)} seen on the console")
                info = run([str(self.uvd), "cow", "info", str(self.overlays / "root" / f"{c}.cow")], check=False)
                alloc = re.search(r"(?i)allocated:\s*(.*)", info.stdout)
                own = sorted(n for n in names if not n.startswith("w-"))
                writes = len(names) - len(own)
                self.overlay_summary[c] = (f"{alloc.group(1).strip() if alloc else '?'} allocated; hostname {hostname!r}; "
                                           f"{STATE}: {', '.join(own)}" + (f" + {writes} workload files" if writes else ""))
                self.log(f"  {c}: overlay {self.overlay_summary[c]}")
                if c in workload:
                    self.check_workload(c, raw)

    def check_workload(self, c: str, raw: Path) -> None:
        """Every write the client recorded (after fsync and read-back) is on the device."""
        text = debugfs(raw, f"cat {STATE}/{c}.workload")
        # a damaged record (zeros where the file's blocks should be) is a failure too
        entries = [ln.split() for ln in text.split("\n") if ln.strip()]
        entries = [e if len(e) == 2 and re.fullmatch(r"[0-9a-f]{64}", e[1]) else ["(damaged record)", ""]
                   for e in entries]
        bad = []
        with tempfile.TemporaryDirectory(prefix="uvd-diskless-w-") as d:
            run(["debugfs", "-R", f"rdump {STATE} {d}", str(raw)])
            for name, want in entries:
                p = Path(d) / Path(STATE).name / name
                if not p.exists() or sha256(p) != want:
                    bad.append(name)
        self.check(f"{c}: every write its workload recorded survived, with its content",
                   bool(entries) and not bad, f"{len(entries)} files of 64 KiB" + (f", bad: {bad[:5]}" if bad else ""))

    # ------------------------------------------------------------ report

    def report(self) -> bool:
        self.log("\n== report")
        self.log(f"{'client':10} {'phase':12} {'root over':16} {'/sbin/init at':>13} {'read at boot':>14}  notes")
        for b in self.boots:
            at = f"{b.init_at:.1f} s" if b.init_at is not None else "-"
            note = b.previous or ""
            if b.workload:
                note = (note + "; " if note else "") + b.workload
            self.log(f"{b.client:10} {b.phase:12} {b.transport:16} {at:>13} {b.read_bytes / 1e6:>11.2f} MB  {note}")
        if self.overlay_summary:
            self.log("overlays (as the host reads them through uvd's NBD export):")
            for c, text in sorted(self.overlay_summary.items()):
                self.log(f"  root/{c}: {text}")
        fsck = [c for c in self.checks if c[0].startswith("e2fsck")]
        if fsck:
            self.log(f"e2fsck -fn: {sum(1 for c in fsck if c[1])} of {len(fsck)} runs clean (base and every overlay, "
                     "after every phase)")
        if self.multipath_summary:
            self.log(f"multipath: {self.multipath_summary}")
        failed = [c for c in self.checks if not c[1]]
        self.log(f"checks: {len(self.checks) - len(failed)} passed, {len(failed)} failed")
        for what, _, detail in failed:
            self.log(f"  FAILED: {what}{': ' + detail if detail else ''}")
        self.log("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))
        return not failed and bool(self.checks)


def parse_console(client: str, phase: str, console: Path) -> Boot:
    b = Boot(client, phase, console=console)
    try:
        text = console.read_text(errors="replace").replace("\r", "")
    except OSError:
        return b
    for line in text.splitlines():
        m = re.search(r"uvd-guest: running the script after ([0-9.]+) s", line)
        if m:
            b.script_at = float(m.group(1))
        m = re.search(r"uvd-diskless: \S+: attach attempt \d+ at ([0-9.]+) s", line)
        if m:
            b.attach_at = float(m.group(1))
        m = REACHED.search(line)
        if m and m.group(1) == client:
            b.init_at, b.root, b.transport, b.read_bytes = float(m.group(2)), m.group(3), m.group(4), int(m.group(5))
        m = re.search(r"uvd-diskless: \S+ boot (\d+) wrote .*\(sha256 ([0-9a-f]+)\)", line)
        if m:
            b.marker_sha = m.group(2)
        if f"uvd-diskless: {client} previous boot found:" in line:
            m = re.search(r"boot=(\d+)", line)
            b.previous = f"found its boot {m.group(1) if m else '?'}"
        if f"uvd-diskless: {client} first boot" in line:
            b.previous = "first boot"
        m = re.search(r"uvd-diskless: \S+ workload: (\d+) writes of 64 KiB in (\d+) s", line)
        if m:
            b.workload = f"{m.group(1)} writes verified in {m.group(2)} s"
        if re.search(rf"uvd-diskless: {re.escape(client)} done after", line):
            b.done = True
        if f"uvd-diskless: {client} FAILED" in line:
            b.done = False
    return b


def failover_seen(console: Path | None) -> str:
    """How the client's console shows a failover under load: path 1 failed, the device fenced
    through path 2, and workload writes were verified after that. "" if it does not."""
    try:
        lines = console.read_text(errors="replace").splitlines() if console else []
    except OSError:
        return ""
    failed = next((i for i, ln in enumerate(lines) if re.search(r"multipath .*: path \S+ failed", ln)), None)
    if failed is None:
        return ""
    fenced = next((ln for ln in lines[failed:] if "fenced to epoch" in ln), "")
    before = [int(m.group(1)) for ln in lines[:failed] if (m := re.search(r"workload: (\d+) writes verified", ln))]
    after = [int(m.group(1)) for ln in lines[failed:] if (m := re.search(r"workload: (\d+) writes", ln))]
    if not fenced or not after:
        return ""
    m = re.search(r"fenced to epoch (\d+) .* in (\d+) us", fenced)
    return (f"path 1 failed after {before[-1] if before else 0} verified writes, fenced to epoch "
            f"{m.group(1) if m else '?'} in {int(m.group(2)) / 1000 if m else 0:.1f} ms, {after[-1]} writes by the end")


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def debugfs(img: Path, request: str, binary: bool = False):
    p = subprocess.run(["debugfs", "-R", request, str(img)], stdin=subprocess.DEVNULL, capture_output=True)
    return p.stdout if binary else p.stdout.decode(errors="replace")


def debugfs_ls(img: Path, path: str) -> list[str]:
    out = debugfs(img, f"ls -p {path}")
    names = []
    for line in out.splitlines():  # /inode/mode/uid/gid/name/size/
        parts = line.split("/")
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            names.append(parts[5])
    return names


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stdout.strip().splitlines() or p.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {p.returncode}"


def default_cache(uvd: Path) -> Path:
    b = os.environ.get("UVD_GUEST_CACHE") or os.environ.get("UVD_BUILD_DIR")
    if os.environ.get("UVD_GUEST_CACHE"):
        return Path(b)
    return Path(b or uvd.resolve().parent) / "guest-cache"


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--uvd", required=True, type=Path, help="the uvd binary the machines run")
    ap.add_argument("--plugins", required=True, type=Path, help="folder of uvd-transport-*.so (rdma)")
    ap.add_argument("--out", required=True, type=Path, help="results: images, overlays, consoles, report")
    ap.add_argument("--cache", type=Path, help="guest package cache (default: beside the uvd binary)")


def setup(a: argparse.Namespace) -> Scenario | int:
    """The scenario over a fresh output folder, or 77 (skip) when something is missing."""
    if not (a.plugins / "uvd-transport-rdma.so").exists():
        print(f"diskless: SKIP: no rdma plugin in {a.plugins} (libibverbs-dev/librdmacm-dev missing at build time)")
        return 77
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "e2fsck", "debugfs", "nbdcopy"):
        if not shutil.which(tool):
            print(f"diskless: SKIP: {tool} not found (run scripts/install-deps)")
            return 77
    a.out = a.out.resolve()
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    cache = guestlib.Cache(a.cache or default_cache(a.uvd))
    return Scenario(a.uvd.resolve(), a.plugins.resolve(), a.out, cache)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap)
    ap.add_argument("--short", action="store_true", help="one client, one boot, host checks (the ctest)")
    ap.add_argument("--writes", type=int, default=30, help="seconds of client writes in the multipath phase")
    ap.add_argument("--kill-after", type=int, default=12,
                    help="seconds after the client opened its root on path 1 that the server kills that path")
    a = ap.parse_args()
    s = setup(a)
    if isinstance(s, int):
        return s
    t0 = time.monotonic()
    try:
        s.prepare()
        if a.short:
            s.run_phase("boot1", ["client-a"], timeout=300)
            s.host_checks("boot 1", ["client-a"])
        else:
            s.run_phase("boot1", ["client-a", "client-b"])
            s.host_checks("boot 1 of both clients", ["client-a", "client-b"])
            b2 = s.run_phase("boot2", ["client-a"])
            s.check("boot2: client-a found its previous boot's files",
                    bool(b2) and b2[0].previous.startswith("found its boot 1"), b2[0].previous if b2 else "")
            s.host_checks("boot 2 of client-a", ["client-a", "client-b"])
            mp = s.run_phase("multipath", ["client-b"], multipath=True, writes=a.writes, kill_after=a.kill_after)
            killed = (s.srv / "path1-killed").exists()
            s.check("multipath: the server killed the uvd serve of path 1 while client-b ran", killed)
            s.check("multipath: client-b's workload finished after the kill",
                    bool(mp) and bool(mp[0].workload) and mp[0].done, mp[0].workload if mp else "")
            fo = failover_seen(mp[0].console) if mp else ""
            s.check("multipath: client-b's front end failed path 1 over to path 2 and its writes went on",
                    bool(fo), fo or "no path failure, or no verified write after it, on client-b's console")
            s.host_checks("the multipath run", ["client-b"], workload=("client-b",))
            lost = [c for c in s.checks if c[0].startswith("client-b: every write") and not c[1]]
            s.multipath_summary = (
                f"path 1's uvd serve {'SIGKILLed' if killed else 'NOT killed'} {a.kill_after} s after client-b "
                f"opened its root; client-b {'finished' if mp and mp[0].done else 'did NOT finish'} "
                f"({mp[0].workload if mp and mp[0].workload else 'no workload result'}); {fo or 'no failover seen'}; "
                + ("its recorded writes are NOT all on the overlay" if lost else "every recorded write is on the overlay"))
    except (CheckFailed, guestlib.GuestError) as e:
        s.check("scenario ran to the end", False, str(e))
    s.timings["total"] = time.monotonic() - t0
    ok = s.report()
    print(f"diskless: {'PASS' if ok else 'FAIL'} ({s.timings['total']:.0f} s); details in {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
