#!/usr/bin/env python3
"""Hostile clients, measured: memory of both planes with many idle connections and under a flood
of new ones, and what a well-behaved client gets meanwhile.

`controlplane/tests/hostile.rs` asserts the behaviour (slowloris heads cut, trickling bodies cut,
garbage answered 400, a well-behaved client served among thousands of idle connections); this
script measures what `cargo test` must not assert: resident memory (VmRSS of the control plane
and the data plane) and latencies, at sizes too big for a test.

Three scenarios, each on a fresh `lighter serve` over a fresh data directory, a 256 KiB blob
pushed first:

  idle (defaults)    --idle connections opened and left silent, with the default
                     connections_per_core_max: how many the data plane holds, the RSS, and
                     whether a new, well-behaved client's pull and push are answered;
  idle (room)        the same with connections_per_core_max raised so every one is held;
  flood              --flood-threads threads opening connections for --flood-seconds (each
                     closed at once, after half a head, after a whole request left unread, or
                     after garbage; closed with a reset), while a well-behaved client pulls the
                     blob on a new connection again and again: connections/s, the client's
                     latencies and failures, the highest RSS sampled.

Root raises RLIMIT_NOFILE as needed (otherwise the soft limit goes to the hard one). Connections
come from several loopback source addresses (127.0.0.2 and up) so ports do not run out.
Python 3.11 standard library only.

    python3 benches/hostile.py [--lighter-bin PATH] [--no-build] [--idle 20000] \\
        [--flood-seconds 10] [--flood-threads 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO = "bench/hostile"
# Connections per source address (the ephemeral port range is about 28,000 wide).
PER_SOURCE = 10_000
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile(want: int) -> int:
    """The soft limit raised to `want`, and the hard one too where allowed (CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def planes(pid: int) -> dict[str, int]:
    """The control plane's and the data plane's pids, children of `lighter serve`."""
    out = {}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for c in map(int, children):
        cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for plane in ("control-plane", "data-plane"):
            if f" {plane} " in f" {cmd} ":
                out[plane] = c
    return out


def rss(server: "Lighter") -> dict[str, int]:
    return {name: rss_kib(pid) for name, pid in server.planes.items()}


def sockets(pid: int) -> int:
    """Sockets the process holds open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(os.readlink(fds / fd).startswith("socket:") for fd in os.listdir(fds))


class Lighter:
    def __init__(self, binary: Path, work: Path, name: str, extra: list[str]):
        self.data = work / f"data-{name}"
        self.log = work / f"lighter-{name}.log"
        err = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(self.data),
             *extra],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
            env={**os.environ, "RUST_LOG": "warn,lighter_dataplane=info"},
        )
        deadline = time.monotonic() + 30
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.01)
        if not self.port:
            self.stop()
            raise SystemExit(f"lighter did not start:\n{self.log.read_text()[-2000:]}")
        for _ in range(100):
            self.planes = planes(self.proc.pid)
            if len(self.planes) == 2:
                break
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10,
         source: str = "127.0.0.1"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                   source_address=(source, 0))
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def push_blob(port: int, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, body = request(port, "POST", f"/v2/{REPO}/blobs/uploads/?digest={digest}", data)
    assert status == 201, (status, body)
    return digest


def well_behaved(port: int, blob: bytes, digest: str, source: str) -> tuple[str, float]:
    """A pull of the blob on a new connection: ("ok" or what went wrong, seconds)."""
    t0 = time.perf_counter()
    try:
        status, body = request(port, "GET", f"/v2/{REPO}/blobs/{digest}", timeout=5, source=source)
        what = "ok" if status == 200 and body == blob else f"status {status}, {len(body)} bytes"
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        what = type(e).__name__
    return what, time.perf_counter() - t0


def source(i: int) -> str:
    n = 2 + i // PER_SOURCE
    return f"127.0.{n // 250}.{n % 250 + 2}" if n >= 250 else f"127.0.0.{n}"


def still_open(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def hold(port: int, first: int, count: int, pipe) -> None:
    """In a child process (so that no process needs more than PER_SOURCE descriptors): opens
    connections `first..first + count` and keeps them; on "check" says how many the server still
    holds open, on "close" closes them."""
    socks, failed = [], 0
    for i in range(first, first + count):
        s = socket.socket()
        # Closed with a reset (no TIME_WAIT left for the next run), port chosen at connect.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source(i), 0))
        try:
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    pipe.send(failed)
    while (cmd := pipe.recv()) != "close":
        assert cmd == "check"
        pipe.send(sum(still_open(s) for s in socks))
    for s in socks:
        s.close()
    pipe.send("closed")


def idle_scenario(binary: Path, work: Path, name: str, extra: list[str], count: int) -> dict:
    server = Lighter(binary, work, name, extra)
    holders = []
    try:
        blob = os.urandom(256 << 10)
        digest = push_blob(server.port, blob)
        before = rss(server)
        t0 = time.perf_counter()
        for first in range(0, count, PER_SOURCE):
            mine, theirs = multiprocessing.Pipe()
            p = multiprocessing.Process(
                target=hold, args=(server.port, first, min(PER_SOURCE, count - first), theirs))
            p.start()
            holders.append((p, mine))
        failed = sum(mine.recv() for _, mine in holders)
        opened_s = time.perf_counter() - t0
        time.sleep(2)  # the data plane accepts (or refuses) the backlog
        for _, mine in holders:
            mine.send("check")
        held = sum(mine.recv() for _, mine in holders)
        during = rss(server)
        dp_sockets = sockets(server.planes["data-plane"])
        pulls = [well_behaved(server.port, blob, digest, "127.0.0.1") for _ in range(10)]
        try:
            pushed = push_blob(server.port, os.urandom(10_000)) and "ok"
        except (AssertionError, OSError, http.client.HTTPException) as e:
            pushed = type(e).__name__
        for p, mine in holders:
            mine.send("close")
            mine.recv()
            p.join()
        holders = []
        time.sleep(1)
        after = well_behaved(server.port, blob, digest, "127.0.0.1")
        log_tail = server.log.read_text(errors="replace").splitlines()[-5:]
        return {
            "data_plane_sockets": dp_sockets,
            "data_plane_log_tail": log_tail,
            "scenario": f"idle ({name})", "extra": extra, "connections": count,
            "connect_failed": failed, "opened_s": round(opened_s, 2), "held": held,
            "rss_before_kib": before, "rss_kib": during,
            "data_plane_kib_per_connection": round(
                (during.get("data-plane", 0) - before.get("data-plane", 0)) / max(held, 1), 2),
            "pulls": [p[0] for p in pulls],
            "pull_ms": [round(p[1] * 1000, 1) for p in pulls],
            "push": pushed,
            "pull_after_close": after[0],
        }
    finally:
        for p, _ in holders:
            p.kill()
        server.stop()


def flood_scenario(binary: Path, work: Path, threads: int, seconds: float) -> dict:
    server = Lighter(binary, work, "flood", [])
    try:
        blob = os.urandom(256 << 10)
        digest = push_blob(server.port, blob)
        before = rss(server)
        stop = threading.Event()
        counts = [0] * threads
        linger = struct.pack("ii", 1, 0)
        actions = [
            b"",
            b"GET /v2/bench/hostile/blo",
            f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        ]

        def flood(t: int) -> None:
            i = 0
            while not stop.is_set():
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.bind((f"127.0.1.{t + 2}", 0))
                try:
                    s.connect(("127.0.0.1", server.port))
                    if actions[i % 4]:
                        s.send(actions[i % 4])
                    counts[t] += 1
                except OSError:
                    pass
                s.close()
                i += 1

        peak = dict(before)
        samples = []
        pool = [threading.Thread(target=flood, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for p in pool:
            p.start()
        while time.perf_counter() - t0 < seconds:
            samples.append(well_behaved(server.port, blob, digest, "127.0.0.1"))
            now = rss(server)
            if sum(now.values()) > sum(peak.values()):
                peak = now
        stop.set()
        for p in pool:
            p.join()
        elapsed = time.perf_counter() - t0
        ok = sorted(s[1] * 1000 for s in samples if s[0] == "ok")
        failures = [s[0] for s in samples if s[0] != "ok"]
        time.sleep(1)
        return {
            "scenario": "flood",
            "data_plane_sockets_after": sockets(server.planes["data-plane"]), "threads": threads, "seconds": round(elapsed, 1),
            "connections": sum(counts), "connections_per_s": round(sum(counts) / elapsed),
            "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_kib": rss(server),
            "pulls": len(samples), "pull_failures": failures,
            "pull_ms_p50": round(statistics.median(ok), 1) if ok else None,
            "pull_ms_p99": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1) if ok else None,
            "pull_ms_max": round(ok[-1], 1) if ok else None,
        }
    finally:
        server.stop()


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(results: list[dict]) -> list[str]:
    out = ["| scenario | connections | held by the data plane | control plane RSS | "
           "data plane RSS | well-behaved client |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["scenario"].startswith("idle"):
            pulls = r["pulls"]
            served = sum(p == "ok" for p in pulls)
            what = f"{served}/{len(pulls)} pulls served"
            if served < len(pulls):
                what += f" ({', '.join(sorted(set(p for p in pulls if p != 'ok')))})"
            else:
                what += f", {statistics.median(r['pull_ms']):.1f} ms median"
            what += f"; push: {r['push']}; after closing them: {r['pull_after_close']}"
            out.append(
                f"| {r['scenario']} | {r['connections']} idle | {r['held']} | "
                f"{mib(r['rss_before_kib'].get('control-plane', 0))} → "
                f"{mib(r['rss_kib'].get('control-plane', 0))} | "
                f"{mib(r['rss_before_kib'].get('data-plane', 0))} → "
                f"{mib(r['rss_kib'].get('data-plane', 0))} "
                f"({r['data_plane_kib_per_connection']} KiB per held connection) | {what} |")
        else:
            fails = len(r["pull_failures"])
            out.append(
                f"| flood, {r['threads']} threads, {r['seconds']} s | {r['connections']} new "
                f"({r['connections_per_s']}/s) | — | "
                f"{mib(r['rss_before_kib'].get('control-plane', 0))} → peak "
                f"{mib(r['rss_peak_kib'].get('control-plane', 0))} | "
                f"{mib(r['rss_before_kib'].get('data-plane', 0))} → peak "
                f"{mib(r['rss_peak_kib'].get('data-plane', 0))}, after "
                f"{mib(r['rss_after_kib'].get('data-plane', 0))} | "
                f"{r['pulls'] - fails}/{r['pulls']} pulls served, p50 {r['pull_ms_p50']} ms, "
                f"p99 {r['pull_ms_p99']} ms, max {r['pull_ms_max']} ms |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lighter-bin", type=Path)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--idle", type=int, default=20_000)
    ap.add_argument("--flood-seconds", type=float, default=10)
    ap.add_argument("--flood-threads", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not 1 <= args.idle <= 100_000 or args.flood_threads < 1 or args.flood_seconds <= 0:
        ap.error("--idle 1..100000, --flood-threads >= 1, --flood-seconds > 0")

    binary = args.lighter_bin
    if binary is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        binary = target / "release" / "lighter"
        if not args.no_build:
            log("cargo build --release --bin lighter")
            subprocess.run(["cargo", "build", "--release", "--bin", "lighter"], cwd=ROOT,
                           check=True)
    if not binary.exists():
        raise SystemExit(f"{binary} does not exist")
    # The holders share the idle connections; the data plane holds them all (it raises its soft
    # limit to the hard one it inherits).
    limit = raise_nofile(args.idle + 1000)
    if limit < PER_SOURCE + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {PER_SOURCE} per holder")
    if limit < args.idle + 100:
        log(f"note: RLIMIT_NOFILE {limit} (hard) caps what the data plane can hold")
    log(f"RLIMIT_NOFILE {limit}, {os.cpu_count()} CPUs, {binary}")

    work = Path(tempfile.mkdtemp(prefix="lighter-hostile-"))
    results = []
    per_core = str(args.idle + 100)
    for name, extra in [("defaults", []), ("room", ["--connections-per-core-max", per_core])]:
        log(f"idle ({name}): {args.idle} connections {' '.join(extra)}")
        results.append(idle_scenario(binary, work, name, extra, args.idle))
        log(json.dumps(results[-1]))
    log(f"flood: {args.flood_threads} threads for {args.flood_seconds} s")
    results.append(flood_scenario(binary, work, args.flood_threads, args.flood_seconds))
    log(json.dumps(results[-1]))
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
