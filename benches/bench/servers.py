"""Starting the servers the benchmarks measure and compare: Lighter, nginx (sendfile, the
static-file baseline) and CNCF Distribution (Debian's docker-registry, the upstream), with
their configs; finding or building Lighter and installing the others.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import ROOT, Failure, log
from .images import OCI_MANIFEST
from .procs import free_port, spawn, stop

DISTRIBUTION = "/usr/bin/docker-registry"


@dataclass
class Started:
    proc: subprocess.Popen
    port: int
    log: Path
    first_200_ms: float | None  # from spawn to the first 200 of GET /v2/ (Lighter over HTTP)
    listening_line_ms: float | None  # from spawn to Lighter's "listening on" line
    listening_fields: str = ""  # e.g. "cores=2 engine=IoUring", from the "listening on" line
    host: str = "127.0.0.1"


# ---------------------------------------------------------------- readiness


def get_status(port: int, path: str, host: str = "127.0.0.1", timeout: float = 1.0) -> int:
    """The status of `GET path`, from the status line alone (0 if there is none)."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
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


def wait_200(proc: subprocess.Popen, port: int, path: str, deadline_s: float, *,
             host: str = "127.0.0.1", t0: float | None = None) -> float:
    """Polls `GET path` as fast as it can; returns ms from t0 (default: now) to the first 200."""
    t0 = time.perf_counter() if t0 is None else t0
    while True:
        if proc.poll() is not None:
            raise Failure(f"process exited with {proc.returncode} before answering 200")
        try:
            if get_status(port, path, host) == 200:
                return (time.perf_counter() - t0) * 1000
        except OSError:
            pass
        if time.perf_counter() - t0 > deadline_s:
            raise Failure(f"no 200 on http://{host}:{port}{path} after {deadline_s} s")
        time.sleep(0.0002)


def wait_accepting(proc: subprocess.Popen, port: int, deadline_s: float,
                   host: str = "127.0.0.1") -> None:
    """Polls until `port` accepts a TCP connection (for servers that speak only TLS)."""
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise Failure(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            pass
        if time.perf_counter() - t0 > deadline_s:
            raise Failure(f"nothing accepts on {host}:{port} after {deadline_s} s")
        time.sleep(0.001)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------- Lighter


LISTENING = re.compile(r"listening on https?://\S+(.*)")


def lighter_path() -> Path:
    """Where cargo puts the release binary ($CARGO_TARGET_DIR, relative to the repository)."""
    return ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release" / "lighter"


def lighter_binary(given: Path | None, build: bool) -> Path:
    """`given`, else the release binary, built first when `build` (cargo, near instant when
    nothing changed)."""
    binary = given or lighter_path()
    if given is None and build:
        log("cargo build --release --bin lighter")
        subprocess.run(["cargo", "build", "--release", "--bin", "lighter"], cwd=ROOT, check=True)
    if not binary.exists():
        raise Failure(f"{binary} does not exist")
    return binary


def start_lighter(binary: Path, port: int, log_path: Path, serve_args: list[str], *,
                  host: str = "127.0.0.1", netns: str | None = None,
                  answers_200: bool = True, env: dict[str, str] | None = None) -> Started:
    """`lighter serve <serve_args>` (which must make it listen on host:port; `env` added to
    its environment), its output appended to `log_path`. Ready when `GET /v2/` answers 200, timed from spawn, and its
    "listening on" line is printed; when /v2/ cannot answer 200 over plain HTTP (access rules,
    TLS: answers_200=False), when the line is printed."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.perf_counter()
    proc = spawn([str(binary), "serve", *serve_args], log_path, netns=netns, env=env)
    try:
        ms = wait_200(proc, port, "/v2/", 30, host=host, t0=t0) if answers_200 else None
        # After a 200 the line is printed around the same time: wait for it briefly.
        line_ms, fields = None, ""
        deadline = time.perf_counter() + (1.0 if answers_200 else 30.0)
        while time.perf_counter() < deadline:
            with open(log_path, "rb") as f:
                f.seek(offset)
                m = LISTENING.search(f.read().decode(errors="replace"))
            if m:
                line_ms = (time.perf_counter() - t0) * 1000
                fields = " ".join(x for x in m.group(1).split() if not x.startswith("data_dir="))
                break
            if proc.poll() is not None:
                raise Failure(f"process exited with {proc.returncode}")
            time.sleep(0.005)
        if line_ms is None and not answers_200:
            raise Failure("no 'listening on' line after 30 s")
    except Failure as e:
        stop(proc)
        raise Failure(f"lighter did not start: {e}\n--- {log_path} ---\n{tail(log_path)}") \
            from None
    if line_ms is None:
        log(f"  note: lighter answered 200 but printed no 'listening on' line ({log_path})")
    return Started(proc, port, log_path, ms, line_ms, fields, host)


# ---------------------------------------------------------------- the ceiling


def bound_binary(build: bool) -> Path:
    """benches/src/bin/bound.rs, release, built first when `build`."""
    binary = lighter_path().parent / "bound"
    if build:
        log("cargo build --release -p lighter-benches --bin bound")
        subprocess.run(["cargo", "build", "--release", "-p", "lighter-benches", "--bin", "bound"],
                       cwd=ROOT, check=True)
    if not binary.exists():
        raise Failure(f"{binary} does not exist")
    return binary


def start_bound(binary: Path, file: Path, log_path: Path, *, threads: int, offset: int = 0,
                length: int | None = None, status: int = 200,
                content_type: str = "application/octet-stream",
                notsent_lowat_bytes: int = 64 * 1024) -> Started:
    """`bound` answering every request on a free loopback port with `file` (bytes
    offset..offset+length, as a 206 when `status` is), from `threads` threads, its sockets
    holding at most `notsent_lowat_bytes` unsent (TCP_NOTSENT_LOWAT, as Lighter's
    `send_unsent_max_bytes` default: with one core each it is worth 10-45 % on bodies)."""
    port = free_port()
    argv = [str(binary), "--listen", f"127.0.0.1:{port}", "--file", str(file),
            "--offset", str(offset), "--status", str(status), "--content-type", content_type,
            "--threads", str(threads), "--notsent-lowat-bytes", str(notsent_lowat_bytes)]
    if length is not None:
        argv += ["--length", str(length)]
    proc = spawn(argv, log_path)
    try:
        wait_accepting(proc, port, 10)
    except Failure as e:
        stop(proc)
        raise Failure(f"bound did not start: {e}\n{tail(log_path)}") from None
    return Started(proc, port, log_path, None, None)


# ---------------------------------------------------------------- nginx


NGINX_CONF = """\
# Written by benches/bench/servers.py: static files with sendfile, the comparison point for Lighter.
worker_processes {workers};
daemon off;
master_process on;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    sendfile on;
    tcp_nopush {nopush};
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
        listen 127.0.0.1:{port}{ssl};
{tls}        root {root};
{locations}    }}
}}
"""

NGINX_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
"""

NGINX_MANIFESTS = """\
        location /v2/{repo}/manifests/ {{
            default_type {manifest_type};
        }}
"""


@dataclass
class Tls:
    cert: Path
    key: Path
    ciphersuites: str = ""  # TLS 1.3 suites to pin (OpenSSL names, ':'-separated); "": nginx's


def nginx_summary(workers: int | None, nopush: bool = True) -> str:
    """The report's description of NGINX_CONF."""
    return (f"worker_processes {workers or 'auto'}, sendfile on, "
            f"tcp_nopush {'on' if nopush else 'off'}, tcp_nodelay on,"
            " access_log off, keepalive_requests 100000, open_file_cache off")


def start_nginx(nginx: str, root: Path, work: Path, repos: list[str], *,
                workers: int | None = None, name: str = "nginx", tls: Tls | None = None,
                nopush: bool = True) -> Started:
    """nginx serving `root` on a free loopback port (every CPU when `workers` is None), with
    the manifest media type under /v2/<repo>/manifests/ of every repository in `repos`.
    `nopush=False` turns tcp_nopush off: with requests pipelined, nginx keeps the socket
    corked between answers and they wait for the delayed ACK (23k req/s, p99 44 ms, against
    63k with it off)."""
    port = free_port()
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / f"{name}.conf"
    tls_lines = ""
    if tls:
        tls_lines = NGINX_TLS.format(cert=tls.cert, key=tls.key)
        if tls.ciphersuites:
            tls_lines += f"        ssl_conf_command Ciphersuites {tls.ciphersuites};\n"
    conf.write_text(NGINX_CONF.format(
        workers=workers or "auto", work=work, name=name, port=port, root=root,
        nopush="on" if nopush else "off",
        ssl=" ssl" if tls else "", tls=tls_lines,
        locations="".join(NGINX_MANIFESTS.format(repo=r, manifest_type=OCI_MANIFEST)
                          for r in repos)))
    base = [nginx, "-p", str(work), "-e", str(work / f"{name}-error.log"), "-c", str(conf)]
    r = subprocess.run(base + ["-t"], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"nginx -t failed:\n{r.stderr}")
    logf = work / f"{name}-stderr.log"
    proc = spawn(base, logf)
    try:
        # The master listens before its workers start; connections wait in the backlog.
        wait_accepting(proc, port, 30)
    except Failure as e:
        stop(proc, signal.SIGQUIT)
        raise Failure(f"nginx did not start: {e}\n{tail(logf)}") from None
    return Started(proc, port, logf, None, None)


def stop_nginx(s: Started | None) -> None:
    """SIGQUIT: nginx's graceful shutdown."""
    if s is not None:
        stop(s.proc, signal.SIGQUIT)


# ---------------------------------------------------------------- CNCF Distribution


DISTRIBUTION_CONF = """\
# Written by benches/bench/servers.py: the upstream registry of a benchmark.
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
  addr: {host}:{port}
  secret: {secret}
"""


def start_distribution(work: Path, host: str = "127.0.0.1", port: int | None = None, *,
                       netns: str | None = None, fresh: bool = True) -> tuple[Started, Path]:
    """`docker-registry serve` on host:port (default: a free loopback port) over its storage in
    `work` (fresh=False: started again over the same storage); returns it and its access log
    (Apache combined format on stdout, one line per finished request, appended to)."""
    port = port or free_port()
    storage = work / "distribution-storage"
    storage.mkdir(exist_ok=not fresh)
    conf = work / "distribution.yml"
    conf.write_text(DISTRIBUTION_CONF.format(root=storage, host=host, port=port,
                                             secret=os.urandom(16).hex()))
    access, logf = work / "distribution-access.log", work / "distribution.log"
    t0 = time.perf_counter()
    proc = spawn([DISTRIBUTION, "serve", str(conf)], logf, stdout_path=access, netns=netns)
    try:
        ms = wait_200(proc, port, "/v2/", 30, host=host, t0=t0)
    except Failure as e:
        stop(proc)
        raise Failure(f"docker-registry did not start: {e}\n{tail(logf)}") from None
    return Started(proc, port, logf, ms, None, host=host), access


ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


def access_since(access: Path, offset: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of the requests Distribution logged after byte `offset` of its
    access log."""
    with open(access, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(m.group(1), m.group(2), int(m.group(3)))
            for m in map(ACCESS_LINE.search, text.splitlines()) if m]


def distribution_version() -> str:
    r = subprocess.run([DISTRIBUTION, "--version"], capture_output=True, text=True)
    return r.stdout.strip()


# ---------------------------------------------------------------- tools


def ensure_tools(no_install: bool, distribution: bool) -> str:
    """Installs nginx, wrk and curl (and Distribution) with apt-get where missing, unless
    `no_install`; returns nginx's path."""
    tools = [("nginx", "nginx"), ("wrk", "wrk"), ("curl", "curl")]
    if distribution:
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
