#!/usr/bin/env python3
"""Load test: Lighter against nginx (sendfile) on the same machine, in one run.

Seeds the same blobs into Lighter (through the registry API) and into an nginx root laid out at
the same URL paths, checks once per workload that both answer the same status and the same bytes,
then drives both with wrk, interleaving Lighter and nginx, repeating each workload --repeat
times. Prints the machine, a Markdown table (req/s best and spread, Lighter/nginx ratio, MiB/s,
p99), the server CPU spent per request, the RSS of the data plane (the process owning the public
port) and of every Lighter process, and the time from spawn to the first 200 of `GET /v2/`.

Then (unless --no-mirror) the pull-through cache: an image of --mirror-layers random layers held by
CNCF Distribution (Debian's docker-registry) is pulled as containerd would (manifest, then every
blob in parallel, one connection each, sha256 checked) directly from Distribution, through a cold
Lighter (fresh data directory, `--upstream docker.io=<Distribution>`), through the same Lighter
warm, and from nginx serving the same files; best wall time, spread and ratios, and the upstream
GETs Distribution logged per blob during each cold pull.

Performance is measured here, never asserted in `cargo test`. Run through benches/loadtest.sh.
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = "bench/app"
TAG = "latest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
KiB, MiB = 1024, 1024 * 1024
RANGE_START, RANGE_END = 65536, 131071  # 64 KiB, inclusive, of the 64 MiB blob

# The pull-through cache part (`mirror`; --no-mirror skips it): an image held by CNCF
# Distribution (Debian's docker-registry) and pulled directly, through Lighter and from nginx.
DISTRIBUTION = "/usr/bin/docker-registry"
MIRROR_UPSTREAM = "docker.io"  # the upstream's name in Lighter: /v2/docker.io/bench/big/...
MIRROR_REPO = "bench/big"
MIRROR_TAG = "1.0"
MANIFEST_ACCEPT = ", ".join([
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
PULL_READ_BYTES = 1 * MiB  # each reader thread's recv-and-hash size

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# ---------------------------------------------------------------- machine, processes, /proc


def machine() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass

    def out(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if rev != "?" and dirty not in ("", "?"):
        rev += " (with uncommitted changes)"
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return [
        f"machine: {os.cpu_count()} CPUs (nproc {out(['nproc'])}), {model}, {mem} RAM, "
        f"kernel {os.uname().release}, load average at start {load}",
        f"lighter: {rev}",
        f"{out(['nginx', '-v'])}; {out(['wrk', '-v']).split(' Copyright')[0]}",
    ]


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, comm) for every process."""
    t = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        t[int(d)] = (ppid, comm)
    return t


def tree(root: int) -> list[int]:
    """root and its descendants that are alive."""
    t = proc_table()
    if root not in t:
        return []
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, (pp, _) in t.items() if pp == p)
    return sorted(out)


def listeners(port: int) -> list[int]:
    """pids holding a listening TCP socket on `port` (any address), via /proc/net/tcp inodes."""
    inodes = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                        pids.add(int(d))
                        break
                except OSError:
                    pass
        except OSError:
            pass
    return sorted(pids)


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, Threads of `pid` (kB except Threads)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode(errors="replace") for a in raw if a]
        args[0] = os.path.basename(args[0])
        s = " ".join(args)
        return s if len(s) < 60 else s[:57] + "..."
    except (OSError, IndexError):
        return "?"


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2 :].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat: busy is
    user+nice+system (irq and softirq are left out: the kernel may charge our own loopback
    traffic there); steal is time the hypervisor gave to someone else."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    return (v[0] + v[1] + v[2]) / CLK_TCK, (v[7] if len(v) > 7 else 0) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_kib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MiB"


# ---------------------------------------------------------------- servers


@dataclass
class Started:
    proc: subprocess.Popen
    port: int
    log: Path
    first_200_ms: float
    listening_line_ms: float | None
    listening_fields: str = ""  # e.g. "cores=2 engine=IoUring", from the "listening on" line


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stops a process this script started, then anything left in its process group."""
    if proc is None:
        return
    family = tree(proc.pid)
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    # The group is the session started for it (start_new_session), so only our processes.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        if p != proc.pid:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def get_status(port: int, path: str, timeout: float = 1.0) -> int:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(256)
            if not chunk:
                break
            buf += chunk
        parts = buf.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    finally:
        s.close()


def wait_200(proc: subprocess.Popen, port: int, path: str, t0: float, deadline_s: float) -> float:
    """Polls `GET path` as fast as it can; returns ms from t0 to the first 200."""
    while True:
        if proc.poll() is not None:
            raise Failure(f"process exited with {proc.returncode} before answering 200")
        try:
            if get_status(port, path) == 200:
                return (time.perf_counter() - t0) * 1000
        except OSError:
            pass
        if time.perf_counter() - t0 > deadline_s:
            raise Failure(f"no 200 on {path} after {deadline_s} s")
        time.sleep(0.0002)


# Server threads on each side (`--server-cores`): Lighter's `--cores` and nginx's
# `worker_processes`; None: both use every CPU.
SERVER_CORES: int | None = None


def start_lighter(
    binary: Path, data_dir: Path, work: Path, n: int | str, extra: tuple[str, ...] = ()
) -> Started:
    port = free_port()
    logf = work / f"lighter-{n}.log"
    with open(logf, "wb") as err:
        t0 = time.perf_counter()
        cores = ("--cores", str(SERVER_CORES)) if SERVER_CORES else ()
        proc = subprocess.Popen(
            [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
             *cores, *extra],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    try:
        ms = wait_200(proc, port, "/v2/", t0, 30)
    except Failure as e:
        stop(proc)
        tail = logf.read_text(errors="replace")[-2000:]
        raise Failure(f"lighter did not start: {e}\n--- {logf} ---\n{tail}") from None
    # The "listening on http://ADDR" line is printed around the same time; wait for it briefly.
    line_ms, fields = None, ""
    for _ in range(200):
        m = re.search(r"listening on http://\S+(.*)", logf.read_text(errors="replace"))
        if m:
            line_ms = (time.perf_counter() - t0) * 1000
            fields = " ".join(f for f in m.group(1).split() if not f.startswith("data_dir="))
            break
        time.sleep(0.005)
    if line_ms is None:
        log(f"  note: lighter answered 200 but printed no 'listening on http://' line ({logf})")
    return Started(proc, port, logf, ms, line_ms, fields)


NGINX_CONF = """\
# Written by benches/loadtest.py: static files with sendfile, the comparison point for Lighter.
worker_processes {workers};
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /v2/{repo}/manifests/ {{
            default_type {manifest_type};
        }}
        location /v2/{mirror_repo}/manifests/ {{
            default_type {manifest_type};
        }}
    }}
}}
"""


def start_nginx(nginx: str, root: Path, work: Path) -> Started:
    port = free_port()
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(workers=SERVER_CORES or "auto", work=work, port=port, root=root, repo=REPO, manifest_type=OCI_MANIFEST,
                          mirror_repo=f"{MIRROR_UPSTREAM}/{MIRROR_REPO}")
    )
    base = [nginx, "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)]
    r = subprocess.run(base + ["-t"], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"nginx -t failed:\n{r.stderr}")
    logf = work / "nginx-stderr.log"
    with open(logf, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            base, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
    try:
        ms = wait_200(proc, port, f"/v2/{REPO}/manifests/{TAG}", t0, 30)
    except Failure as e:
        stop(proc, signal.SIGQUIT)
        raise Failure(f"nginx did not start: {e}\n{logf.read_text(errors='replace')}") from None
    return Started(proc, port, logf, ms, None)


# ---------------------------------------------------------------- seeding


def sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def request(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


@dataclass
class Seed:
    blobs: dict[str, bytes]  # name -> bytes
    digests: dict[str, str]  # name -> sha256:...
    manifest: bytes


def make_seed() -> Seed:
    rnd = random.Random(20240601)  # fixed: the same digests every run
    blobs = {
        "4KiB": rnd.randbytes(4 * KiB),
        "1MiB": rnd.randbytes(1 * MiB),
        "64MiB": rnd.randbytes(64 * MiB),
    }
    layers = ["4KiB", "1MiB", "64MiB"]
    digests = {k: sha256(v) for k, v in blobs.items()}
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digests[k] for k in layers]},
        },
        separators=(",", ":"),
    ).encode()
    blobs["config"] = config
    digests["config"] = sha256(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digests["config"], "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": digests[k], "size": len(blobs[k])}
                for k in layers
            ],
        },
        indent=2,
    ).encode()
    return Seed(blobs, digests, manifest)


def seed_lighter(port: int, seed: Seed) -> None:
    for name, data in seed.blobs.items():
        st, body, _ = request(
            port,
            "POST",
            f"/v2/{REPO}/blobs/uploads/?digest={seed.digests[name]}",
            data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        if st != 201:
            raise Failure(f"pushing blob {name}: {st} {body[:300]!r}")
    st, body, _ = request(
        port,
        "PUT",
        f"/v2/{REPO}/manifests/{TAG}",
        seed.manifest,
        {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(seed.manifest))},
    )
    if st != 201:
        raise Failure(f"pushing manifest: {st} {body[:300]!r}")


def seed_nginx_root(root: Path, seed: Seed) -> None:
    blobs = root / "v2" / REPO / "blobs"
    manifests = root / "v2" / REPO / "manifests"
    blobs.mkdir(parents=True)
    manifests.mkdir(parents=True)
    for name, data in seed.blobs.items():
        (blobs / seed.digests[name]).write_bytes(data)
    (manifests / TAG).write_bytes(seed.manifest)
    # nginx's workers run as an unprivileged user when started by root: let them read.
    os.chmod(root.parent, 0o755)
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


# ---------------------------------------------------------------- workloads, wrk


@dataclass
class Workload:
    name: str
    path: str
    headers: list[str]
    status: int
    body: bytes
    connections: int


def workloads(seed: Seed, conns: int, big_conns: int) -> list[Workload]:
    b = f"/v2/{REPO}/blobs/"
    big = seed.blobs["64MiB"]
    return [
        Workload(
            "manifest",
            f"/v2/{REPO}/manifests/{TAG}",
            [f"Accept: {OCI_MANIFEST}"],
            200,
            seed.manifest,
            conns,
        ),
        Workload("blob-4KiB", b + seed.digests["4KiB"], [], 200, seed.blobs["4KiB"], conns),
        Workload("blob-1MiB", b + seed.digests["1MiB"], [], 200, seed.blobs["1MiB"], conns),
        Workload("blob-64MiB", b + seed.digests["64MiB"], [], 200, big, big_conns),
        Workload(
            "range-64KiB",
            b + seed.digests["64MiB"],
            [f"Range: bytes={RANGE_START}-{RANGE_END}"],
            206,
            big[RANGE_START : RANGE_END + 1],
            conns,
        ),
    ]


def curl_check(w: Workload, port: int, out: Path) -> tuple[int, str]:
    cmd = ["curl", "-sS", "-o", str(out), "-w", "%{http_code}"]
    for h in w.headers:
        cmd += ["-H", h]
    r = subprocess.run(
        cmd + [f"http://127.0.0.1:{port}{w.path}"], capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        raise Failure(f"curl failed: {r.stderr.strip()}")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return int(r.stdout.strip() or 0), digest


UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
UNITS_BYTES = {"B": 1, "KB": KiB, "MB": MiB, "GB": 1024 * MiB, "TB": 1024 * 1024 * MiB}


@dataclass
class Run:
    rps: float
    bytes_per_s: float  # wrk's Transfer/sec (headers included; wrk's units are binary)
    p99_ms: float
    p50_ms: float
    requests: int
    seconds: float
    errors: int  # socket errors + non-2xx/3xx
    server_cpu_s: float
    wrk_cpu_s: float
    other_cpu_s: float  # user+system CPU of everything else on the machine during the run
    steal_s: float
    raw: str = field(repr=False, default="")


def parse_wrk(out: str) -> dict:
    def num_unit(s: str, units: dict) -> float:
        m = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", s)
        if not m or m.group(2) not in units:
            raise Failure(f"cannot parse wrk value {s!r}")
        return float(m.group(1)) * units[m.group(2)]

    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    tr = re.search(r"^Transfer/sec:\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in ([0-9.]+)(\w+),", out, re.M)
    if not (rps and tr and p99 and p50 and total):
        raise Failure(f"cannot parse wrk output:\n{out}")
    errors = 0
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        errors += sum(int(x) for x in se.groups())
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n2:
        errors += int(n2.group(1))
    return dict(
        rps=float(rps.group(1)),
        bytes_per_s=num_unit(tr.group(1), UNITS_BYTES),
        p99_ms=num_unit(p99.group(1), UNITS_TIME),
        p50_ms=num_unit(p50.group(1), UNITS_TIME),
        requests=int(total.group(1)),
        seconds=num_unit(total.group(2) + total.group(3), UNITS_TIME) / 1000,
        errors=errors,
    )


def wrk_cmd(w: Workload, port: int, threads: int, seconds: float) -> list[str]:
    cmd = ["wrk", f"-t{threads}", f"-c{w.connections}", f"-d{seconds:g}s", "--latency"]
    cmd += ["--timeout", "30s"]
    for h in w.headers:
        cmd += ["-H", h]
    return cmd + [f"http://127.0.0.1:{port}{w.path}"]


def run_wrk(w: Workload, port: int, threads: int, seconds: float, server_pids) -> Run:
    pids = server_pids()
    cpu0 = cpu_seconds(pids)
    m0 = machine_cpu()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(
        wrk_cmd(w, port, threads, seconds), capture_output=True, text=True, timeout=seconds + 120
    )
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m1 = machine_cpu()
    cpu1 = cpu_seconds(pids)
    if r.returncode != 0:
        raise Failure(f"wrk failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    p = parse_wrk(r.stdout)
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    other = max(0.0, (m1[0] - m0[0]) - (cpu1 - cpu0) - wrk_cpu)
    return Run(**p, server_cpu_s=cpu1 - cpu0, wrk_cpu_s=wrk_cpu, other_cpu_s=other,
               steal_s=m1[1] - m0[1], raw=r.stdout)


# ---------------------------------------------------------------- report


def spread(xs: list[float]) -> float:
    return 0.0 if len(xs) < 2 or max(xs) == 0 else (max(xs) - min(xs)) / max(xs) * 100


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.0f} µs" if x < 1 else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def cell(runs: list[Run]) -> str:
    rps = [r.rps for r in runs]
    s = f"{fmt_rps(max(rps))} ({spread(rps):.0f}%)"
    if any(r.errors for r in runs):
        s += f" ⚠{sum(r.errors for r in runs)} errors"
    return s


def report_table(ws: list[Workload], results: dict, args) -> tuple[list[str], dict]:
    lines = [
        "| workload | conns | Lighter req/s | nginx req/s | Lighter/nginx | Lighter MiB/s | "
        "nginx MiB/s | Lighter p99 | nginx p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for w in ws:
        lr, nr = results.get((w.name, "lighter"), []), results.get((w.name, "nginx"), [])
        if not lr or not nr:
            lines.append(f"| {w.name} | {w.connections} | not run | not run | | | | | |")
            continue
        best_l, best_n = max(r.rps for r in lr), max(r.rps for r in nr)
        ratio = best_l / best_n if best_n else float("nan")
        pairs = [a.rps / b.rps for a, b in zip(lr, nr) if b.rps]
        ratios[w.name] = ratio
        ratio_s = f"**{ratio:.2f}×**"
        if len(pairs) > 1:
            ratio_s += f" ({min(pairs):.2f}–{max(pairs):.2f})"
        lines.append(
            f"| {w.name} | {w.connections} | {cell(lr)} | {cell(nr)} | {ratio_s} | "
            f"{max(r.bytes_per_s for r in lr) / MiB:,.1f} | "
            f"{max(r.bytes_per_s for r in nr) / MiB:,.1f} | "
            f"{fmt_ms(min(r.p99_ms for r in lr))} | {fmt_ms(min(r.p99_ms for r in nr))} |"
        )
    return lines, ratios


def report_cpu(ws: list[Workload], results: dict) -> list[str]:
    lines = [
        "| workload | Lighter CPU µs/req | nginx CPU µs/req | wrk CPU vs Lighter | "
        "wrk CPU vs nginx | other CPU, worst run | steal, worst run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in ws:
        lr, nr = results.get((w.name, "lighter"), []), results.get((w.name, "nginx"), [])
        if not lr or not nr:
            continue

        def us(runs):
            v = [r.server_cpu_s / r.requests * 1e6 for r in runs if r.requests]
            return f"{min(v):,.1f}" if v else "-"

        def wrk(runs):
            return f"{max(r.wrk_cpu_s / r.seconds for r in runs) * 100:.0f}%"

        other = max(r.other_cpu_s / r.seconds for r in lr + nr) * 100
        steal = max(r.steal_s / r.seconds for r in lr + nr) * 100
        lines.append(
            f"| {w.name} | {us(lr)} | {us(nr)} | {wrk(lr)} | {wrk(nr)} | {other:.0f}% | "
            f"{steal:.0f}% |"
        )
    return lines


def rss_snapshot(root_pid: int, port: int) -> dict:
    fam = tree(root_pid)
    owners = listeners(port)
    procs = []
    for p in sorted(set(fam) | set(owners)):
        st = status(p)
        procs.append(
            dict(
                pid=p,
                cmd=cmdline(p),
                owns_port=p in owners,
                in_tree=p in fam,
                rss_kb=st.get("VmRSS"),
                hwm_kb=st.get("VmHWM"),
                anon_kb=st.get("RssAnon"),
                threads=st.get("Threads"),
            )
        )
    return dict(
        procs=procs,
        listener_rss_kb=sum(x["rss_kb"] or 0 for x in procs if x["owns_port"]) if owners else None,
        total_rss_kb=sum(x["rss_kb"] or 0 for x in procs if x["in_tree"]),
    )


# ---------------------------------------------------------------- pull-through cache (mirror)


DISTRIBUTION_CONF = """\
# Written by benches/loadtest.py: the upstream registry of the pull-through cache benchmark.
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
"""


def start_distribution(work: Path) -> tuple[Started, Path]:
    """Starts `docker-registry serve` on a loopback port over its own storage in `work`; returns
    it and its access log (Apache combined format, one line per finished request, on stdout)."""
    port = free_port()
    storage = work / "distribution-storage"
    storage.mkdir()
    conf = work / "distribution.yml"
    conf.write_text(DISTRIBUTION_CONF.format(root=storage, port=port, secret=os.urandom(16).hex()))
    access, logf = work / "distribution-access.log", work / "distribution.log"
    with open(access, "wb") as out, open(logf, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [DISTRIBUTION, "serve", str(conf)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
        )
    try:
        ms = wait_200(proc, port, "/v2/", t0, 30)
    except Failure as e:
        stop(proc)
        raise Failure(f"docker-registry did not start: {e}\n"
                      f"{logf.read_text(errors='replace')[-2000:]}") from None
    return Started(proc, port, logf, ms, None), access


@dataclass
class MirrorImage:
    layers: list[tuple[str, int]]  # (digest, size), in manifest order
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str

    @property
    def pull_bytes(self) -> int:
        """Bytes of a full pull: manifest, config and every layer."""
        return len(self.manifest) + len(self.config) + sum(n for _, n in self.layers)


def make_mirror_image(blobs_dir: Path, layers: int, layer_mib: int) -> MirrorImage:
    """Writes `layers` random (incompressible) layers of `layer_mib` MiB into `blobs_dir`, each
    named by its digest, and builds the config and the OCI manifest."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(20240602)  # fixed: the same digests every run with the same sizes
    descs = []
    for i in range(layers):
        h, tmp = hashlib.sha256(), blobs_dir / f".layer-{i}.tmp"
        with open(tmp, "wb") as f:
            left = layer_mib * MiB
            while left:
                chunk = rnd.randbytes(min(left, 8 * MiB))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = "sha256:" + h.hexdigest()
        tmp.rename(blobs_dir / digest)
        descs.append((digest, layer_mib * MiB))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in descs]},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = sha256(config)
    (blobs_dir / config_digest).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n in descs],
        },
        indent=2,
    ).encode()
    return MirrorImage(descs, config, config_digest, manifest, sha256(manifest))


def push_distribution(port: int, image: MirrorImage, blobs_dir: Path) -> None:
    """Pushes the image to Distribution under MIRROR_REPO:MIRROR_TAG. Distribution 2.8 has no
    single-POST monolithic upload: every blob is POST (open a session) then PUT ?digest=."""
    for digest, size in [(image.config_digest, len(image.config))] + image.layers:
        st, body, headers = request(port, "POST", f"/v2/{MIRROR_REPO}/blobs/uploads/", b"",
                                    {"Content-Length": "0"})
        loc = {k.lower(): v for k, v in headers.items()}.get("location")
        if st != 202 or not loc:
            raise Failure(f"distribution: opening an upload: {st} {body[:300]!r}")
        u = urllib.parse.urlsplit(loc)
        query = (u.query + "&" if u.query else "") + "digest=" + urllib.parse.quote(digest)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=MiB)
        try:
            with open(blobs_dir / digest, "rb") as f:
                c.request("PUT", f"{u.path}?{query}", body=f, headers={
                    "Content-Type": "application/octet-stream", "Content-Length": str(size)})
                r = c.getresponse()
                body = r.read()
        finally:
            c.close()
        if r.status != 201:
            raise Failure(f"distribution: pushing blob {digest}: {r.status} {body[:300]!r}")
    st, body, _ = request(
        port, "PUT", f"/v2/{MIRROR_REPO}/manifests/{MIRROR_TAG}", image.manifest,
        {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(image.manifest))},
    )
    if st != 201:
        raise Failure(f"distribution: pushing the manifest: {st} {body[:300]!r}")


def fetch_blob(port: int, path: str, digest: str, size: int) -> tuple[int, float]:
    """GET of one blob on a connection of its own; the body is read in PULL_READ_BYTES reads,
    hashed and discarded. Returns the bytes read and the seconds between the next-to-last byte
    and the last (Lighter holds a downloading blob's last byte until it is verified and
    published); raises Failure unless the bytes are the blob."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("GET", path)
        r = c.getresponse()
        if r.status != 200:
            raise Failure(f"GET {path} on port {port}: {r.status} {r.read(300)!r}")
        buf = memoryview(bytearray(PULL_READ_BYTES))
        h, n, before_last, last_wait = hashlib.sha256(), 0, None, 0.0
        while True:
            # The last byte is read on its own, to time its wait.
            want = len(buf) if n >= size else max(1, min(len(buf), size - 1 - n))
            k = r.readinto(buf[:want])
            if not k:
                break
            h.update(buf[:k])  # hashlib drops the GIL for large updates
            n += k
            if n == size - 1:
                before_last = time.perf_counter()
            elif n == size and before_last is not None:
                last_wait = time.perf_counter() - before_last
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET {path} on port {port}: {type(e).__name__}: {e}") from None
    finally:
        c.close()
    if n != size or "sha256:" + h.hexdigest() != digest:
        raise Failure(f"GET {path} on port {port}: {n} bytes, sha256:{h.hexdigest()[:12]}…; "
                      f"expected {size} bytes of {digest[:19]}…")
    return n, last_wait


def pull_image(
    port: int, repo: str, image: MirrorImage, pool: ThreadPoolExecutor
) -> tuple[int, float, float]:
    """A full pull as containerd does it: the manifest by tag, then the config and every layer
    in parallel, one connection each. Returns the bytes received, the seconds the manifest took
    and the longest last-byte wait of a blob; raises Failure on any difference from `image`."""
    t0 = time.perf_counter()
    path = f"/v2/{repo}/manifests/{MIRROR_TAG}"
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        r = c.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET {path} on port {port}: {type(e).__name__}: {e}") from None
    finally:
        c.close()
    if r.status != 200 or sha256(body) != image.manifest_digest:
        raise Failure(f"GET {path} on port {port}: {r.status}, {len(body)} bytes "
                      f"{sha256(body)[:19]}…, expected the manifest "
                      f"{image.manifest_digest[:19]}…")
    manifest_s = time.perf_counter() - t0
    m = json.loads(body)
    descs = [m["config"]] + m["layers"]
    futures = [
        pool.submit(fetch_blob, port, f"/v2/{repo}/blobs/{d['digest']}", d["digest"], d["size"])
        for d in descs
    ]
    got = [f.result() for f in futures]
    return len(body) + sum(n for n, _ in got), manifest_s, max(w for _, w in got)


@dataclass
class Pull:
    seconds: float
    bytes: int
    manifest_s: float  # the manifest's GET
    last_byte_wait_s: float  # the longest wait for a blob's last byte (see fetch_blob)
    server_cpu_s: float  # the servers involved (cold: Lighter and Distribution)
    cpu_by_server: dict[str, float]  # the same, per server
    client_cpu_s: float  # this script's threads (receive and sha256)
    other_cpu_s: float  # everything else on the machine (user+system)
    steal_s: float


def timed_pull(port: int, repo: str, image: MirrorImage, pool,
               servers: dict[str, list[int]]) -> Pull:
    """One pull, with the CPU each server (name -> its pids), this script and the rest of the
    machine spent meanwhile (/proc counts in clock ticks: 10 ms)."""
    cpu0, m0 = {k: cpu_seconds(v) for k, v in servers.items()}, machine_cpu()
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    n, manifest_s, last_wait = pull_image(port, repo, image, pool)
    t = time.perf_counter() - t0
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu1, m1 = {k: cpu_seconds(v) for k, v in servers.items()}, machine_cpu()
    client = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    by = {k: cpu1[k] - cpu0[k] for k in servers}
    server = sum(by.values())
    other = max(0.0, (m1[0] - m0[0]) - server - client)
    return Pull(t, n, manifest_s, last_wait, server, by, client, other, m1[1] - m0[1])


ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


def access_since(access: Path, offset: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of the requests Distribution logged after byte `offset`."""
    with open(access, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(m.group(1), m.group(2), int(m.group(3)))
            for m in map(ACCESS_LINE.search, text.splitlines()) if m]


MIRROR_CASES = ("direct", "cold", "warm", "nginx")
MIRROR_LABELS = {
    "direct": "direct from Distribution",
    "cold": "cold through Lighter (fresh data dir)",
    "warm": "warm through Lighter (cached)",
    "nginx": "nginx, same files",
}


class Shaper:
    """Limits what `port` sends on loopback to `mbit` Mbit/s (an HTB class that a u32 filter on
    the source port picks), as the link to a registry outside the cluster would: both the direct
    pull and Lighter's download of the same bytes go through it. Needs `tc` and CAP_NET_ADMIN;
    removes the qdisc on exit."""

    def __init__(self, port: int, mbit: int):
        self.port, self.mbit, self.installed = port, mbit, False

    def _tc(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tc", *argv], capture_output=True, text=True)

    def __enter__(self) -> "Shaper":
        if not shutil.which("tc"):
            raise Failure("tc (iproute2) is not installed")
        shown = self._tc("qdisc", "show", "dev", "lo").stdout
        if shown.strip() and "noqueue" not in shown:
            raise Failure(f"loopback already has a qdisc, not touching it: {shown.strip()}")
        rate = f"{self.mbit}mbit"
        steps = [
            ("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "20"),
            ("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", rate,
             "ceil", rate, "burst", "1mb", "cburst", "1mb", "quantum", "200000"),
            ("class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate",
             "100gbit", "quantum", "200000"),
            ("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "sport", str(self.port), "0xffff", "flowid", "1:10"),
        ]
        for argv in steps:
            r = self._tc(*argv)
            if r.returncode != 0:
                self.__exit__()
                raise Failure(f"tc {' '.join(argv)}: {r.stderr.strip() or r.returncode}")
            self.installed = True
        return self

    def __exit__(self, *_exc) -> None:
        if self.installed:
            self._tc("qdisc", "del", "dev", "lo", "root")
            self.installed = False


def floor_costs(image: MirrorImage, blobs_dir: Path, work: Path, repeat: int) -> dict:
    """What any verifying cache must spend on this machine per pull, whatever its code: sha256
    of every byte (hashlib, OpenSSL's SHA extensions), writing every byte to a new file on the
    data directory's filesystem (1 MiB writes, then unlinked), and one more loopback TCP
    transfer of every byte (sendfile on one end, 1 MiB recv_into on the other: the cache
    receives from upstream and sends to the client, where the direct pull has one transfer).
    CPU seconds of this process, best of `repeat`."""
    layers = [(blobs_dir / d).read_bytes() for d, _ in image.layers]

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def transfer() -> None:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        srv.close()

        def send() -> None:
            with s:
                for d, n in image.layers:
                    with open(blobs_dir / d, "rb") as f:
                        off = 0
                        while off < n:
                            off += os.sendfile(s.fileno(), f.fileno(), off, n - off)

        t = threading.Thread(target=send)
        t.start()
        buf = memoryview(bytearray(MiB))
        with c:
            while c.recv_into(buf):
                pass
        t.join()

    hash_s, write_s, transfer_s = [], [], []
    for i in range(repeat):
        c0 = cpu()
        transfer()
        transfer_s.append(cpu() - c0)
        c0 = cpu()
        for b in layers:
            hashlib.sha256(b).digest()
        hash_s.append(cpu() - c0)
        path = work / f"floor-{i}.tmp"
        c0 = cpu()
        with open(path, "wb", buffering=0) as f:
            for b in layers:
                view = memoryview(b)
                for off in range(0, len(view), MiB):
                    f.write(view[off:off + MiB])
        write_s.append(cpu() - c0)
        path.unlink()
    return dict(hash_s=min(hash_s), write_s=min(write_s), transfer_s=min(transfer_s),
                bytes=sum(map(len, layers)))


def run_mirror(args, binary: Path, work: Path, nginx: Started, nginx_root: Path) -> dict:
    """The pull-through cache benchmark; returns its numbers (see report_mirror)."""
    res: dict = dict(runs={c: [] for c in MIRROR_CASES}, upstream=[], warm_upstream=[],
                     problems=[])
    dist: Started | None = None
    lighter: Started | None = None
    pool = ThreadPoolExecutor(max_workers=args.mirror_layers + 1, thread_name_prefix="pull")
    try:
        log("mirror: starting docker-registry (CNCF Distribution) as the upstream")
        dist, access = start_distribution(work)
        res["distribution"] = subprocess.run(
            [DISTRIBUTION, "--version"], capture_output=True, text=True).stdout.strip()
        log(f"mirror: {args.mirror_layers} random layers of {args.mirror_layer_mib} MiB, "
            f"pushed to Distribution as {MIRROR_REPO}:{MIRROR_TAG} and copied into nginx's root")
        mirrored = f"{MIRROR_UPSTREAM}/{MIRROR_REPO}"
        blobs_dir = nginx_root / "v2" / mirrored / "blobs"
        t = time.perf_counter()
        image = make_mirror_image(blobs_dir, args.mirror_layers, args.mirror_layer_mib)
        manifests = nginx_root / "v2" / mirrored / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        (manifests / MIRROR_TAG).write_bytes(image.manifest)
        for d, _, files in os.walk(nginx_root):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        push_distribution(dist.port, image, blobs_dir)
        log(f"  seeded in {time.perf_counter() - t:.1f} s")
        res["image"] = dict(layers=len(image.layers), layer_bytes=image.layers[0][1],
                            config_bytes=len(image.config), manifest_bytes=len(image.manifest),
                            pull_bytes=image.pull_bytes, manifest_digest=image.manifest_digest)
        layer_paths = {f"/v2/{MIRROR_REPO}/blobs/{d}": f"layer {i + 1}"
                       for i, (d, _) in enumerate(image.layers)}
        layer_paths[f"/v2/{MIRROR_REPO}/blobs/{image.config_digest}"] = "config"

        res["floor"] = floor_costs(image, blobs_dir, work, args.repeat)
        # Untimed: checks both baselines answer the image, starts the pool's threads.
        pull_image(dist.port, MIRROR_REPO, image, pool)
        pull_image(nginx.port, mirrored, image, pool)
        log("  direct and nginx pulls: same manifest, same blobs")

        upstream_arg = f"{MIRROR_UPSTREAM}=http://127.0.0.1:{dist.port}"
        total = args.repeat * len(MIRROR_CASES)
        k = 0
        for rep in range(args.repeat):
            # Each baseline runs next to the Lighter case it is compared with, the order
            # alternating: direct, cold, warm, nginx / cold, direct, nginx, warm.
            order = (("direct", "cold", "warm", "nginx") if rep % 2 == 0
                     else ("cold", "direct", "nginx", "warm"))
            data = work / f"mirror-data-{rep}"
            lighter = start_lighter(binary, data, work, f"mirror-{rep}",
                                    ("--upstream", upstream_arg))
            time.sleep(0.2)
            for case in order:
                k += 1
                if case == "direct":
                    port, repo = dist.port, MIRROR_REPO
                    servers = {"Distribution": tree(dist.proc.pid)}
                elif case == "nginx":
                    port, repo, servers = nginx.port, mirrored, {"nginx": tree(nginx.proc.pid)}
                elif case == "cold":
                    port, repo = lighter.port, mirrored
                    servers = {"Lighter": tree(lighter.proc.pid),
                               "Distribution": tree(dist.proc.pid)}
                else:
                    port, repo = lighter.port, mirrored
                    servers = {"Lighter": tree(lighter.proc.pid)}
                offset = access.stat().st_size
                p = timed_pull(port, repo, image, pool, servers)
                res["runs"][case].append(p)
                if case == "cold":
                    res["upstream"].append(upstream_gets(access, offset, layer_paths))
                elif case == "warm":
                    time.sleep(0.1)  # requests are logged when done: give any a moment
                    res["warm_upstream"].append(len(access_since(access, offset)))
                busy = (p.other_cpu_s + p.steal_s) / p.seconds * 100
                cpu = ", ".join(f"{n} {c:.2f}" for n, c in p.cpu_by_server.items())
                log(f"  [{k}/{total}] {case:<6} {p.seconds:7.3f} s "
                    f"{p.bytes / p.seconds / 1e9:6.2f} GB/s  manifest {fmt_ms(p.manifest_s * 1e3)}"
                    f", last byte {fmt_ms(p.last_byte_wait_s * 1e3)}  CPU s: {cpu}, "
                    f"client {p.client_cpu_s:.2f}"
                    + (f"  (other CPU {busy:.0f}%)" if busy > 10 else ""))
            if lighter.proc.poll() is not None:
                res["problems"].append(f"mirror: lighter exited with {lighter.proc.returncode}")
            stop(lighter.proc)
            lighter = None
            shutil.rmtree(data, ignore_errors=True)
        if args.mirror_upstream_mbit > 0:
            lighter = run_shaped(args, binary, work, res, dist, access, image, pool,
                                 upstream_arg, layer_paths)
        if dist.proc.poll() is not None:
            res["problems"].append(f"mirror: docker-registry exited with {dist.proc.returncode}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if lighter:
            stop(lighter.proc)
        if dist:
            stop(dist.proc)
    return res


def upstream_gets(access: Path, offset: int, layer_paths: dict) -> dict:
    """The requests Distribution logged since `offset` during a cold pull: GETs per blob, the
    manifest requests, and any other; waits (up to 2 s) for every blob's GET to be logged, as
    Distribution logs a request when its response is done."""
    deadline = time.monotonic() + 2.0
    while True:
        reqs = access_since(access, offset)
        gets = {n: sum(1 for m, pa, _ in reqs if m == "GET" and pa == path)
                for path, n in layer_paths.items()}
        if min(gets.values()) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return dict(
        gets=gets,
        manifest=[f"{m} {st}" for m, pa, st in reqs if "/manifests/" in pa],
        other=len([1 for m, pa, _ in reqs if "/manifests/" not in pa and pa not in layer_paths]),
    )


def run_shaped(args, binary, work, res, dist, access, image, pool, upstream_arg, layer_paths):
    """Direct and cold pulls again with Distribution's sending limited to
    --mirror-upstream-mbit (see Shaper); fills res["shaped"]. Returns None (Lighter stopped)."""
    shaped = dict(mbit=args.mirror_upstream_mbit, runs={"direct": [], "cold": []},
                  upstream=[], error=None)
    res["shaped"] = shaped
    mirrored = f"{MIRROR_UPSTREAM}/{MIRROR_REPO}"
    lighter = None
    log(f"mirror: upstream limited to {args.mirror_upstream_mbit} Mbit/s (tc htb on loopback)")
    try:
        with Shaper(dist.port, args.mirror_upstream_mbit):
            for rep in range(args.repeat):
                data = work / f"mirror-shaped-{rep}"
                lighter = start_lighter(binary, data, work, f"mirror-shaped-{rep}",
                                        ("--upstream", upstream_arg))
                time.sleep(0.2)
                for case in (("direct", "cold") if rep % 2 == 0 else ("cold", "direct")):
                    if case == "direct":
                        port, repo = dist.port, MIRROR_REPO
                        servers = {"Distribution": tree(dist.proc.pid)}
                    else:
                        port, repo = lighter.port, mirrored
                        servers = {"Lighter": tree(lighter.proc.pid),
                                   "Distribution": tree(dist.proc.pid)}
                    offset = access.stat().st_size
                    p = timed_pull(port, repo, image, pool, servers)
                    shaped["runs"][case].append(p)
                    if case == "cold":
                        shaped["upstream"].append(upstream_gets(access, offset, layer_paths))
                    log(f"  [shaped {rep + 1}/{args.repeat}] {case:<6} {p.seconds:7.3f} s "
                        f"{p.bytes / p.seconds / 1e9:6.2f} GB/s, last byte "
                        f"{fmt_ms(p.last_byte_wait_s * 1e3)}")
                stop(lighter.proc)
                lighter = None
                shutil.rmtree(data, ignore_errors=True)
    except Failure as e:
        shaped["error"] = str(e)
        log(f"  shaped round not run: {e}")
    finally:
        if lighter:
            stop(lighter.proc)
    return None


def report_mirror(res: dict, args) -> tuple[list[str], list[str]]:
    """The mirror section of the report, and its target lines."""
    img = res["image"]
    runs: dict[str, list[Pull]] = res["runs"]
    lines = [
        "### Pull-through cache: Lighter against Distribution and nginx",
        "",
        f"- upstream: {res['distribution']} (`docker-registry serve`, filesystem storage in a"
        " temp dir, inmemory blob descriptor cache), on a loopback port",
        f"- image `{MIRROR_REPO}:{MIRROR_TAG}`: {img['layers']} random layers of "
        f"{img['layer_bytes'] / MiB:g} MiB, a config of {img['config_bytes']} B and an OCI"
        f" manifest of {img['manifest_bytes']} B: {img['pull_bytes'] / 1e6:,.1f} MB a pull",
        "- a pull: GET the manifest by tag, then GET the config and every layer in parallel"
        " (Python http.client, one connection per blob, 1 MiB reads, sha256 of every body"
        f" checked); {args.repeat} runs per case, interleaved; Lighter is addressed as"
        f" `/v2/{MIRROR_UPSTREAM}/{MIRROR_REPO}/...` with `--upstream"
        f" {MIRROR_UPSTREAM}=http://127.0.0.1:<port>`, a fresh data dir for each cold pull",
        "",
        "| case | wall time, best | spread | GB/s | ratio | target | manifest | last-byte wait |"
        " server CPU | client CPU | other CPU, worst run |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    best = {c: min(p.seconds for p in runs[c]) for c in MIRROR_CASES if runs[c]}
    ratios = {}
    for c in MIRROR_CASES:
        rs = runs[c]
        if not rs:
            lines.append(f"| {MIRROR_LABELS[c]} | not run | | | | | | | | | |")
            continue
        ratio_s, target = "", ""
        base = {"cold": "direct", "warm": "nginx"}.get(c)
        if base and runs[base]:
            ratios[c] = best[c] / best[base]
            pairs = [a.seconds / b.seconds for a, b in zip(rs, runs[base])]
            ratio_s = f"**{ratios[c]:.2f}×** {base}"
            if len(pairs) > 1:
                ratio_s += f" ({min(pairs):.2f}–{max(pairs):.2f})"
            target = "≤ 1.1×" if c == "cold" else "≤ 1.0×"
        fastest = min(rs, key=lambda p: p.seconds)
        other = max((p.other_cpu_s + p.steal_s) / p.seconds for p in rs) * 100
        low = min(rs, key=lambda p: p.server_cpu_s)
        cpu = f"{low.server_cpu_s:.2f} s"
        if len(low.cpu_by_server) > 1:
            cpu += " (" + ", ".join(f"{n} {v:.2f}" for n, v in low.cpu_by_server.items()) + ")"
        lines.append(
            f"| {MIRROR_LABELS[c]} | {best[c]:.3f} s | {spread([p.seconds for p in rs]):.0f}% | "
            f"{fastest.bytes / fastest.seconds / 1e9:.2f} | {ratio_s} | {target} | "
            f"{fmt_ms(fastest.manifest_s * 1e3)} | {fmt_ms(fastest.last_byte_wait_s * 1e3)} | "
            f"{cpu} | {low.client_cpu_s:.2f} s | {other:.0f}% |"
        )
    lines += [
        "",
        "Wall time: from the manifest request to the last blob verified, best run; spread:"
        " (slowest − fastest)/slowest. GB/s: 10⁹ bytes (manifest, config, layers) over the best"
        " time. Ratio: best time over the baseline's best time, lower is better (in brackets:"
        " the lowest and highest ratio of runs of the same round). Manifest: its GET, and"
        " last-byte wait: the longest wait of a blob's last byte after the one before (Lighter"
        " holds it until the download is verified and published), both in the best run. Server"
        " CPU: user+system of"
        " the servers involved (cold: Lighter and Distribution) in the run that used the least,"
        " and the client's (this script: receive and sha256) in that run; counted in 10 ms"
        " ticks. Other CPU: the rest of the machine (kernel threads such as writeback included),"
        " in % of one core, plus steal; above ~10% the run was disturbed.",
        "",
        "Upstream requests Distribution logged during each cold pull:",
        "",
    ]
    floor = res.get("floor")
    if floor and runs["cold"] and runs["direct"]:
        must = floor["hash_s"] + floor["write_s"] + floor["transfer_s"]
        cold = min(runs["cold"], key=lambda p: p.server_cpu_s)
        lighter_s = cold.cpu_by_server.get("Lighter", 0.0)
        direct = min(runs["direct"], key=lambda p: p.server_cpu_s + p.client_cpu_s)
        direct_cpu = direct.server_cpu_s + direct.client_cpu_s
        at = lines.index("Upstream requests Distribution logged during each cold pull:")
        lines[at:at] = [
            f"Floor on this machine, measured in this run: sha256 of the {floor['bytes'] / 1e6:,.1f}"
            f" MB of layers costs {floor['hash_s']:.2f} s of CPU, writing them to a new file"
            f" {floor['write_s']:.2f} s, and one loopback TCP transfer of them (sendfile to"
            f" recv) {floor['transfer_s']:.2f} s: {must:.2f} s that any cache receiving,"
            f" verifying, storing and serving the blobs spends, whatever its code. Lighter spent {lighter_s:.2f} s per cold pull"
            f" (least of the runs: {max(0.0, lighter_s - must):.2f} s above the floor), i.e."
            f" {img['pull_bytes'] / 1e9 / lighter_s if lighter_s else 0:.2f} GB of cold pull"
            f" per CPU-second. The direct pull already keeps both cores busy"
            f" ({direct_cpu:.2f} s of CPU, Distribution and the client, in {direct.seconds:.3f}"
            f" s), so on this machine a cold pull through any verifying cache takes at least"
            f" (direct CPU + floor) / direct CPU = **{(direct_cpu + must) / direct_cpu:.2f}×**"
            " the direct time; the target is about an upstream reached over a network link,"
            " the next table.",
            "",
        ]
    names = [f"layer {i + 1}" for i in range(img["layers"])] + ["config"]
    ok_gets = bool(res["upstream"])
    for i, u in enumerate(res["upstream"]):
        layers = ", ".join(str(u["gets"][n]) for n in names[:-1])
        ok_gets &= all(u["gets"][n] == 1 for n in names)
        extra = f"; other requests: {u['other']}" if u["other"] else ""
        lines.append(f"- cold pull {i + 1}: GETs of each layer {layers}; of the config "
                     f"{u['gets']['config']}; manifest: {', '.join(u['manifest']) or 'none'}"
                     f"{extra}")
    warm = res["warm_upstream"]
    lines.append(f"- warm pulls: {', '.join(str(n) for n in warm)} upstream requests")
    shaped = res.get("shaped")
    shaped_ratio = None
    if shaped:
        lines += ["", f"#### Upstream limited to {shaped['mbit']:,} Mbit/s", ""]
        if shaped["error"]:
            lines.append(f"Not run: {shaped['error']}")
        else:
            lines += [
                f"The same pulls, direct and cold, with everything Distribution sends limited to"
                f" {shaped['mbit']:,} Mbit/s ({shaped['mbit'] / 8e3:.2f} GB/s; `tc` HTB on"
                " loopback, filtered by Distribution's port) as by the link to a registry outside"
                " the cluster: both the direct pull and Lighter's download cross it, Lighter's"
                " answers to the client do not.",
                "",
                "| case | wall time, best | spread | GB/s | ratio | target | last-byte wait |"
                " server CPU | client CPU |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|",
            ]
            sr = shaped["runs"]
            if sr["direct"] and sr["cold"]:
                shaped_ratio = (min(p.seconds for p in sr["cold"])
                                / min(p.seconds for p in sr["direct"]))
            for c in ("direct", "cold"):
                rs = sr[c]
                if not rs:
                    continue
                fastest = min(rs, key=lambda p: p.seconds)
                low = min(rs, key=lambda p: p.server_cpu_s)
                ratio_s = target = ""
                if c == "cold" and shaped_ratio is not None:
                    pairs = [a.seconds / b.seconds for a, b in zip(rs, sr["direct"])]
                    ratio_s = f"**{shaped_ratio:.2f}×** direct"
                    if len(pairs) > 1:
                        ratio_s += f" ({min(pairs):.2f}–{max(pairs):.2f})"
                    target = "≤ 1.1×"
                lines.append(
                    f"| {MIRROR_LABELS[c]} | {fastest.seconds:.3f} s |"
                    f" {spread([p.seconds for p in rs]):.0f}% |"
                    f" {fastest.bytes / fastest.seconds / 1e9:.2f} | {ratio_s} | {target} |"
                    f" {fmt_ms(fastest.last_byte_wait_s * 1e3)} | {low.server_cpu_s:.2f} s |"
                    f" {low.client_cpu_s:.2f} s |")
            for i, u in enumerate(shaped["upstream"]):
                ok_gets &= all(u["gets"][n] == 1 for n in names)
                lines.append(f"- cold pull {i + 1}: upstream GETs of each blob "
                             f"{', '.join(str(u['gets'][n]) for n in names)}")
    targets = []
    for c, base, limit in (("cold", "direct", 1.1), ("warm", "nginx", 1.0)):
        where = " (loopback upstream)" if c == "cold" else ""
        if c in ratios:
            ok = ratios[c] <= limit
            targets.append(f"- mirror {c} pull ≤ {limit:.1f}× {base} time{where}: "
                           f"{'PASS' if ok else 'FAIL'} ({ratios[c]:.2f}×)")
        else:
            targets.append(f"- mirror {c} pull ≤ {limit:.1f}× {base} time{where}: NOT RUN")
    if shaped:
        label = f"- mirror cold pull ≤ 1.1× direct time (upstream at {shaped['mbit']:,} Mbit/s): "
        targets.append(label + ("NOT RUN" if shaped_ratio is None else
                                f"{'PASS' if shaped_ratio <= 1.1 else 'FAIL'}"
                                f" ({shaped_ratio:.2f}×)"))
    targets.append(f"- mirror: one upstream GET per blob per cold pull: "
                   f"{'PASS' if ok_gets else 'FAIL'}"
                   + (f", none upstream in warm pulls: {'PASS' if not any(warm) else 'FAIL'}"
                      if warm else ""))
    return lines, targets



# ---------------------------------------------------------------- main


def ensure_tools(no_install: bool, mirror: bool) -> str:
    tools = [("nginx", "nginx"), ("wrk", "wrk"), ("curl", "curl")]
    if mirror:
        tools.append(("docker-registry", DISTRIBUTION))  # CNCF Distribution, Debian's package
    missing = [p for p, b in tools if not (
        shutil.which(b) or (b == "nginx" and os.path.exists("/usr/sbin/nginx"))
    )]
    if missing:
        if no_install:
            raise Failure(f"missing: {' '.join(missing)} (apt-get install -y {' '.join(missing)})")
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "install", "-y", *missing], env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=True)
        # Debian's packages may start the system nginx on port 80 (and docker-registry on 5000);
        # they are not ours, leave them.
    return shutil.which("nginx") or "/usr/sbin/nginx"


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="benches/loadtest.sh",
        description="Load test: Lighter against nginx (sendfile), same bytes, same wrk, one run.",
    )
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument(
        "--big-connections", type=int, default=8, help="wrk connections for blob-64MiB (default 8)"
    )
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--server-cores", type=int, default=None,
                    help="server threads on both sides: Lighter --cores and nginx worker_processes "
                         "(default: every CPU; on a 2-core machine shared with wrk, 1 is the fair "
                         "comparison: pinned threads cannot move off wrk's core)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per workload and server (default 3)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="seconds of discarded wrk per workload and server"
    )
    ap.add_argument(
        "--workloads", default="",
        help="comma-separated subset of the wrk workload names; 'none' runs only the mirror part",
    )
    ap.add_argument("--no-mirror", action="store_true",
                    help="skip the pull-through cache part (Distribution upstream)")
    ap.add_argument("--mirror-layers", type=int, default=3,
                    help="layers of the mirrored image (default 3)")
    ap.add_argument("--mirror-layer-mib", type=int, default=100,
                    help="MiB per layer of the mirrored image (default 100)")
    ap.add_argument("--mirror-upstream-mbit", type=int, default=2000,
                    help="then pull direct and cold again with Distribution's sending limited to "
                         "this many Mbit/s (tc htb on loopback; needs CAP_NET_ADMIN), as the link "
                         "to an upstream outside the cluster; 0 skips (default 2000)")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary; skips cargo build")
    ap.add_argument("--no-build", action="store_true", help="use target/release/lighter as it is")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = ap.parse_args()
    global SERVER_CORES
    SERVER_CORES = args.server_cores
    if min(args.repeat, args.connections, args.big_connections, args.threads) < 1:
        ap.error("--repeat, --connections, --big-connections and --threads must be >= 1")
    if args.threads > min(args.connections, args.big_connections):
        ap.error("wrk needs at least as many connections as threads")
    if min(args.mirror_layers, args.mirror_layer_mib) < 1:
        ap.error("--mirror-layers and --mirror-layer-mib must be >= 1")

    began = time.monotonic()
    nginx_bin = ensure_tools(args.no_install, not args.no_mirror)
    binary = args.lighter_bin
    if binary is None:
        binary = ROOT / "target" / "release" / "lighter"
        if not args.no_build:
            log("cargo build --release --bin lighter")
            subprocess.run(
                ["cargo", "build", "--release", "--bin", "lighter"], cwd=ROOT, check=True
            )
    if not binary.exists():
        raise Failure(f"{binary} does not exist")

    head = machine()
    for h in head:
        log(h)

    work = Path(tempfile.mkdtemp(prefix="lighter-loadtest-"))
    lighter: Started | None = None
    nginx: Started | None = None
    starts: list[tuple[str, float, float | None]] = []
    results: dict[tuple[str, str], list[Run]] = {}
    rss: dict[str, dict] = {}
    nginx_rss: dict[str, int] = {}
    problems: list[str] = []
    mirror: dict | None = None
    try:
        data = work / "lighter"
        # 1. Start on an empty data directory, seed, then restart on the seeded one (--repeat
        #    times) to time the first 200 after start.
        log("starting lighter (empty data directory)")
        lighter = start_lighter(binary, data, work, 0)
        starts.append(("empty data dir", lighter.first_200_ms, lighter.listening_line_ms))
        time.sleep(0.3)
        rss["at start, empty data dir"] = rss_snapshot(lighter.proc.pid, lighter.port)

        log("seeding bench/app: blobs 4 KiB, 1 MiB, 64 MiB, a config and a manifest tagged latest")
        seed = make_seed()
        t = time.perf_counter()
        seed_lighter(lighter.port, seed)
        log(f"  seeded lighter in {time.perf_counter() - t:.2f} s")
        root = work / "nginx-root"
        seed_nginx_root(root, seed)

        for i in range(args.repeat):
            stop(lighter.proc)
            lighter = start_lighter(binary, data, work, i + 1)
            starts.append((f"seeded data dir, start {i + 1}", lighter.first_200_ms,
                           lighter.listening_line_ms))
        log("  first 200 after start: " + ", ".join(f"{ms:.1f} ms" for _, ms, _ in starts))
        time.sleep(0.5)
        rss["idle (seeded, before load)"] = rss_snapshot(lighter.proc.pid, lighter.port)
        if lighter.listening_fields:
            head[1] += f", data plane {lighter.listening_fields}"

        log("starting nginx")
        nginx = start_nginx(nginx_bin, root, work)
        nginx_rss["idle"] = sum(status(p).get("VmRSS", 0) for p in tree(nginx.proc.pid))

        ws = workloads(seed, args.connections, args.big_connections)
        if args.workloads:
            wanted = [x.strip() for x in args.workloads.split(",")]
            wanted = [x for x in wanted if x and x != "none"]
            unknown = set(wanted) - {w.name for w in ws}
            if unknown:
                raise Failure(f"unknown workloads {sorted(unknown)}; have {[w.name for w in ws]}")
            ws = [w for w in ws if w.name in wanted]

        # 2. Same status and same bytes from both, once per workload, before any load.
        sides = {"lighter": lighter, "nginx": nginx}
        good = []
        for w in ws:
            want = hashlib.sha256(w.body).hexdigest()
            got = {s: curl_check(w, st.port, work / f"check-{s}") for s, st in sides.items()}
            bad = [
                f"{s} answered {code} sha256:{h[:12]}…"
                for s, (code, h) in got.items()
                if code != w.status or h != want
            ]
            if bad:
                problems.append(
                    f"{w.name}: not benchmarked, expected {w.status} sha256:{want[:12]}…, "
                    + "; ".join(bad)
                )
                log("  MISMATCH " + problems[-1])
            else:
                log(f"  {w.name}: both answer {w.status} with the same {len(w.body)} bytes")
                good.append(w)

        pids = {
            "lighter": lambda: tree(lighter.proc.pid),
            "nginx": lambda: tree(nginx.proc.pid),
        }
        if args.warmup > 0:
            log(f"warm-up: {args.warmup:g} s per workload and server")
            for w in good:
                for s in ("lighter", "nginx"):
                    run_wrk(w, sides[s].port, args.threads, args.warmup, pids[s])

        total = len(good) * 2 * args.repeat
        n = 0
        est = total * (args.duration + 0.3)
        log(f"measuring: {total} wrk runs of {args.duration:g} s, about {est / 60:.1f} min")
        for rep in range(args.repeat):
            for w in good:
                order = ("lighter", "nginx") if rep % 2 == 0 else ("nginx", "lighter")
                for s in order:
                    n += 1
                    r = run_wrk(w, sides[s].port, args.threads, args.duration, pids[s])
                    results.setdefault((w.name, s), []).append(r)
                    err = f", {r.errors} ERRORS" if r.errors else ""
                    busy = (r.other_cpu_s + r.steal_s) / r.seconds * 100
                    err += f"  (other CPU {busy:.0f}%)" if busy > 10 else ""
                    log(
                        f"  [{n}/{total}] {w.name:<12} {s:<7} {fmt_rps(r.rps):>9} req/s "
                        f"{r.bytes_per_s / MiB:9.1f} MiB/s  p99 {fmt_ms(r.p99_ms)}{err}"
                    )
        rss["after load"] = rss_snapshot(lighter.proc.pid, lighter.port)
        nginx_rss["after load"] = sum(status(p).get("VmRSS", 0) for p in tree(nginx.proc.pid))
        if lighter.proc.poll() is not None:
            problems.append(f"lighter exited with {lighter.proc.returncode} during the run")

        # 3. The pull-through cache: Distribution directly, Lighter cold and warm, nginx.
        if not args.no_mirror:
            try:
                mirror = run_mirror(args, binary, work, nginx, root)
                problems += mirror["problems"]
            except Failure as e:
                problems.append(f"mirror part not finished: {e}")
                log(f"  FAILED {problems[-1]}")

        # 4. Report.
        out = ["## Lighter vs nginx load test", ""]
        out += [f"- {h}" for h in head]
        out.append(
            f"- wrk -t{args.threads} -c{args.connections} (blob-64MiB: -c{args.big_connections}) "
            f"-d{args.duration:g}s --latency, {args.repeat} runs per side interleaved, "
            f"{args.warmup:g} s warm-up; nginx {nginx_conf_summary()}"
        )
        out.append("")
        table, ratios = report_table(ws, results, args)
        out += table if ws else ["(no wrk workloads run)"]
        out += [] if not ws else [
            "",
            "req/s: best run (spread between runs: (max−min)/max). Lighter/nginx: best over"
            " best (in brackets: the lowest and highest ratio of runs done back to back). MiB/s:"
            " wrk's Transfer/sec of the best run (headers included). p99: lowest of the runs.",
            "",
        ]
        out += report_cpu(ws, results) if ws else []
        out += [] if not ws else [
            "",
            "CPU µs/req: user+system CPU of all the server's processes during the run over the"
            " requests served (lowest run). wrk CPU: the load generator's CPU share (100% = one"
            " core busy: the generator may then be the bottleneck, not the server). Other CPU:"
            " everything else on the machine (user+system) during the run; steal: CPU the"
            " hypervisor took. Both in % of one core; above ~10% the run was disturbed.",
        ]
        out += [
            "",
            "| Lighter process | idle (seeded, before load) RSS | after load RSS | peak RSS |",
            "|---|---:|---:|---:|",
        ]
        idle, after = rss["idle (seeded, before load)"], rss["after load"]
        by_pid_idle = {p["pid"]: p for p in idle["procs"]}
        for p in after["procs"]:
            role = " **owns the port** (data plane)" if p["owns_port"] else ""
            i = by_pid_idle.get(p["pid"], {})
            out.append(
                f"| {p['pid']} `{p['cmd']}`{role} | {fmt_kib(i.get('rss_kb'))} | "
                f"{fmt_kib(p['rss_kb'])} | {fmt_kib(p['hwm_kb'])} |"
            )
        for p in idle["procs"]:
            if p["pid"] not in {q["pid"] for q in after["procs"]}:
                out.append(f"| {p['pid']} `{p['cmd']}`: gone after load | "
                           f"{fmt_kib(p['rss_kb'])} | - | - |")
        out.append(
            f"| all Lighter processes | {fmt_kib(idle['total_rss_kb'])} | "
            f"{fmt_kib(after['total_rss_kb'])} | |"
        )
        out.append(
            f"| nginx, master + workers (for comparison) | {fmt_kib(nginx_rss['idle'])} | "
            f"{fmt_kib(nginx_rss['after load'])} | |"
        )
        out += ["", "| start | first 200 of GET /v2/ | 'listening on' line seen |", "|---|---:|---:|"]
        for what, ms, line in starts:
            out.append(f"| {what} | {ms:.1f} ms | {'-' if line is None else f'{line:.1f} ms'} |")
        mirror_targets = []
        if mirror and mirror.get("image"):
            section, mirror_targets = report_mirror(mirror, args)
            out += [""] + section

        # Targets.
        out += ["", "Targets:"]
        for w in ws:
            if w.name in ratios:
                ok = ratios[w.name] >= 1.0
                out.append(f"- {w.name} ≥ 1.0× nginx: {'PASS' if ok else 'FAIL'} "
                           f"({ratios[w.name]:.2f}×)")
            else:
                out.append(f"- {w.name} ≥ 1.0× nginx: NOT RUN")
        dp = idle["listener_rss_kb"]
        if dp is None:
            out.append("- data plane idle RSS < 10 MiB: UNKNOWN (no process found owning the port)")
        else:
            out.append(f"- data plane idle RSS < 10 MiB: {'PASS' if dp < 10 * 1024 else 'FAIL'} "
                       f"({fmt_kib(dp)})")
        best = min(ms for _, ms, _ in starts)
        worst = max(ms for _, ms, _ in starts)
        out.append(f"- first 200 within 20 ms of start: {'PASS' if best <= 20 else 'FAIL'} "
                   f"(best {best:.1f} ms, worst {worst:.1f} ms over {len(starts)} starts)")
        out += mirror_targets
        runs = [r for rs in results.values() for r in rs]
        if mirror:
            runs += [p for ps in mirror["runs"].values() for p in ps]
        noisy = [r for r in runs if (r.other_cpu_s + r.steal_s) / r.seconds > 0.10]
        if noisy:
            out += ["", f"Note: {len(noisy)} of {len(runs)} runs had more than 10% of a core"
                    " taken by other processes or the hypervisor; compare with care or run again."]
        if problems:
            out += ["", "Problems:"] + [f"- {p}" for p in problems]
        text = "\n".join(out) + "\n"
        print("\n" + text, flush=True)
        log(f"the whole run took {(time.monotonic() - began) / 60:.1f} min")
        if args.out:
            args.out.write_text(text)
        if args.json:
            args.json.write_text(json.dumps(dict(
                machine=head,
                args={k: str(v) for k, v in vars(args).items()},
                runs={f"{w}/{s}": [{k: v for k, v in vars(r).items() if k != "raw"} for r in rs]
                      for (w, s), rs in results.items()},
                rss=rss, nginx_rss_kb=nginx_rss,
                starts=[dict(what=a, first_200_ms=b, listening_line_ms=c) for a, b, c in starts],
                mirror=None if mirror is None else dict(
                    {k: v for k, v in mirror.items() if k not in ("runs", "shaped")},
                    runs={c: [vars(p) for p in ps] for c, ps in mirror["runs"].items()},
                    shaped=None if not mirror.get("shaped") else dict(
                        {k: v for k, v in mirror["shaped"].items() if k != "runs"},
                        runs={c: [vars(p) for p in ps]
                              for c, ps in mirror["shaped"]["runs"].items()},
                    ),
                ),
                problems=problems,
            ), indent=2))
        return 1 if problems else 0
    finally:
        if nginx:
            stop(nginx.proc, signal.SIGQUIT)
        if lighter:
            stop(lighter.proc)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def nginx_conf_summary() -> str:
    return (f"worker_processes {SERVER_CORES or 'auto'}, sendfile on, tcp_nopush on, tcp_nodelay on, access_log off,"
            " keepalive_requests 100000, open_file_cache off")


def _raise(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)
    try:
        sys.exit(main())
    except Failure as e:
        log(f"loadtest: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("loadtest: interrupted; stopped everything it started")
        sys.exit(130)
