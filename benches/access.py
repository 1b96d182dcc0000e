#!/usr/bin/env python3
"""Access control and HTTPS, measured (issue 12): in one invocation, on one machine,

1. **Authorised against anonymous pulls**: one Lighter with access rules; the same image in a
   repository anyone may pull (`bench/app`, no credentials) and in one that needs a token
   (`private/app`, `Authorization: Bearer <token>` from Lighter's token endpoint). wrk drives
   manifest and 4 KiB blob GETs of both, alternating, `--repeat` times. The data plane checks
   the token itself (a per-core cache of verified tokens), so the ratio should stay near 1.
2. **HTTPS against nginx**: Lighter with `tls_cert_path` and nginx with `ssl` on the same
   ECDSA P-256 certificate, same bytes, same wrk; the negotiated protocol and cipher of both
   are checked with `openssl s_client` and printed (nginx is pinned to Lighter's if they differ).
   Neither has kernel TLS here: both encrypt in user space.

Ratios are best-of-runs with the pairwise spread, as in loadtest.py, whose helpers this uses.

    python3 benches/access.py [--duration 6] [--repeat 3] [--connections 64] [--no-build]
"""

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest as lt  # noqa: E402

PRIVATE = "private/app"

CONFIG = """\
listen = "127.0.0.1:{port}"
data_dir = "{data}"
{tls}
[auth]
htpasswd_file = "{htpasswd}"

[[auth.rules]]
prefix = ""
pull = ["anonymous"]
push = ["user:ci"]

[[auth.rules]]
prefix = "private/"
pull = ["user:ci"]
push = ["user:ci"]
"""

NGINX_TLS = """\
worker_processes auto;
daemon off;
pid {work}/nginx-tls.pid;
error_log {work}/nginx-tls-error.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        {ciphers}
        root {root};
        location /v2/{repo}/manifests/ {{ default_type {manifest_type}; }}
    }}
}}
"""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def start(binary: Path, config: Path, port: int, work: Path, name: str, https: bool):
    logf = work / f"{name}.log"
    with open(logf, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
        )
    scheme = "https" if https else "http"
    for _ in range(3000):
        if proc.poll() is not None:
            raise lt.Failure(f"{name} exited:\n{logf.read_text(errors='replace')[-2000:]}")
        if f"listening on {scheme}://" in logf.read_text(errors="replace"):
            return proc
        time.sleep(0.01)
    lt.stop(proc)
    raise lt.Failure(f"{name} did not start")


def seed(port: int, repo: str, s: lt.Seed, auth: str) -> None:
    for name, data in s.blobs.items():
        st, body, _ = lt.request(port, "POST", f"/v2/{repo}/blobs/uploads/?digest={s.digests[name]}",
                                 data, {"Content-Length": str(len(data)), "Authorization": auth})
        if st != 201:
            raise lt.Failure(f"pushing {name} to {repo}: {st} {body[:200]!r}")
    st, body, _ = lt.request(port, "PUT", f"/v2/{repo}/manifests/{lt.TAG}", s.manifest,
                             {"Content-Type": lt.OCI_MANIFEST, "Authorization": auth})
    if st != 201:
        raise lt.Failure(f"pushing the manifest to {repo}: {st} {body[:200]!r}")


def wrk(url: str, headers: list[str], conns: int, seconds: float, pids) -> lt.Run:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "30s"]
    for h in headers:
        cmd += ["-H", h]
    cpu0 = lt.cpu_seconds(pids())
    r = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 120)
    cpu1 = lt.cpu_seconds(pids())
    if r.returncode != 0:
        raise lt.Failure(f"wrk failed: {r.stdout}{r.stderr}")
    p = lt.parse_wrk(r.stdout)
    return lt.Run(**p, server_cpu_s=cpu1 - cpu0, wrk_cpu_s=0.0, other_cpu_s=0.0, steal_s=0.0)


def check(url: str, headers: list[str], want: bytes, ca: Path | None = None) -> None:
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if ca:
        cmd += ["--cacert", str(ca)]
    for h in headers:
        cmd += ["-H", h]
    r = subprocess.run(cmd + [url], capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    if code != b"200" or body != want:
        raise lt.Failure(f"{url}: {code!r}, {len(body)} bytes (want 200, {len(want)} bytes)")


def negotiated(port: int, ca: Path) -> str:
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-brief"],
        input=b"", capture_output=True, timeout=30,
    )
    text = (r.stdout + r.stderr).decode(errors="replace")
    proto = next((l.split(":", 1)[1].strip() for l in text.splitlines()
                  if l.startswith("Protocol version")), "?")
    cipher = next((l.split(":", 1)[1].strip() for l in text.splitlines()
                   if l.startswith("Ciphersuite")), "?")
    return f"{proto} {cipher}"


def table(title: str, rows: list[tuple[str, list[lt.Run], list[lt.Run]]], a: str, b: str) -> list[str]:
    out = [f"### {title}", "",
           f"| workload | {a} req/s | {b} req/s | {a}/{b} | {a} CPU µs/req | {b} CPU µs/req |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, ra, rb in rows:
        best_a, best_b = max(r.rps for r in ra), max(r.rps for r in rb)
        pairs = [x.rps / y.rps for x, y in zip(ra, rb) if y.rps]
        cpu = lambda runs: min(r.server_cpu_s / r.requests * 1e6 for r in runs if r.requests)
        out.append(
            f"| {name} | {lt.cell(ra)} | {lt.cell(rb)} | **{best_a / best_b:.2f}×** "
            f"({min(pairs):.2f}–{max(pairs):.2f}) | {cpu(ra):.1f} | {cpu(rb):.1f} |"
        )
    return out + [""]


def main() -> int:
    ap = argparse.ArgumentParser(prog="benches/access.py")
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--no-build", action="store_true", help="use target/release/lighter as it is")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary; skips cargo build")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    nginx = lt.ensure_tools(False, False)
    binary = args.lighter_bin or lt.ROOT / "target" / "release" / "lighter"
    if not args.no_build and not args.lighter_bin:
        subprocess.run(["cargo", "build", "--release", "--bin", "lighter"], cwd=lt.ROOT, check=True)
    head = lt.machine()
    for h in head:
        lt.log(h)
    work = Path(tempfile.mkdtemp(prefix="lighter-access-"))
    procs = []
    report = ["## Access control and HTTPS", ""] + [f"- {h}" for h in head] + [""]
    try:
        htpasswd = work / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "ci", "secret"], check=True,
                       capture_output=True)
        s = lt.make_seed()

        # 1. Authorised against anonymous, one server.
        port = lt.free_port()
        cfg = work / "auth.toml"
        cfg.write_text(CONFIG.format(port=port, data=work / "data", tls="", htpasswd=htpasswd))
        lighter = start(binary, cfg, port, work, "lighter-auth", False)
        procs.append(lighter)
        ci = basic("ci", "secret")
        seed(port, lt.REPO, s, ci)
        seed(port, PRIVATE, s, ci)
        st, body, _ = lt.request(
            port, "GET", f"/v2/_lighter/token?service=lighter&scope=repository:{PRIVATE}:pull",
            None, {"Authorization": ci})
        if st != 200:
            raise lt.Failure(f"token endpoint: {st} {body[:200]!r}")
        bearer = f"Authorization: Bearer {json.loads(body)['token']}"
        base = f"http://127.0.0.1:{port}"
        accept = f"Accept: {lt.OCI_MANIFEST}"
        cases = [
            ("manifest", f"/manifests/{lt.TAG}", [accept], s.manifest),
            ("blob-4KiB", f"/blobs/{s.digests['4KiB']}", [], s.blobs["4KiB"]),
        ]
        for name, tail, hs, want in cases:
            check(f"{base}/v2/{lt.REPO}{tail}", hs, want)
            check(f"{base}/v2/{PRIVATE}{tail}", hs + [bearer], want)
            st, _, _ = lt.request(port, "GET", f"/v2/{PRIVATE}{tail}", None)
            if st != 401:
                raise lt.Failure(f"{PRIVATE}{tail} without a token answered {st}, not 401")
        pids = lambda: lt.tree(lighter.pid)
        rows = []
        for name, tail, hs, _ in cases:
            anon, authd = [], []
            for i in range(args.repeat):
                authd.append(wrk(f"{base}/v2/{PRIVATE}{tail}", hs + [bearer], args.connections,
                                 args.duration, pids))
                anon.append(wrk(f"{base}/v2/{lt.REPO}{tail}", hs, args.connections,
                                args.duration, pids))
                lt.log(f"  {name} run {i + 1}: token {authd[-1].rps:,.0f} req/s, "
                       f"anonymous {anon[-1].rps:,.0f} req/s")
            if any(r.errors for r in anon + authd):
                raise lt.Failure(f"{name}: wrk saw errors")
            rows.append((name, authd, anon))
        report += table("Pulls with a token against anonymous pulls (same server, same run)",
                        rows, "token", "anonymous")
        lt.stop(lighter)
        procs.remove(lighter)

        # 2. HTTPS: Lighter against nginx, same certificate.
        cert, key = work / "cert.pem", work / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        tport = lt.free_port()
        tcfg = work / "tls.toml"
        tls = f'tls_cert_path = "{cert}"\ntls_key_path = "{key}"'
        tcfg.write_text(CONFIG.format(port=tport, data=work / "data", tls=tls, htpasswd=htpasswd))
        lighter = start(binary, tcfg, tport, work, "lighter-tls", True)
        procs.append(lighter)
        root = work / "nginx-root"
        lt.seed_nginx_root(root, s)
        lighter_cipher = negotiated(tport, cert)
        nport = lt.free_port()
        (work / "nginx-tmp").mkdir(exist_ok=True)
        conf = work / "nginx-tls.conf"

        def nginx_conf(ciphers: str) -> None:
            conf.write_text(NGINX_TLS.format(work=work, port=nport, cert=cert, key=key, root=root,
                                             repo=lt.REPO, manifest_type=lt.OCI_MANIFEST,
                                             ciphers=ciphers))
        nginx_conf("")
        ngx = subprocess.Popen([nginx, "-p", str(work), "-c", str(conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        procs.append(ngx)
        time.sleep(0.5)
        nginx_cipher = negotiated(nport, cert)
        if nginx_cipher != lighter_cipher:
            lt.stop(ngx)
            procs.remove(ngx)
            suite = lighter_cipher.split()[-1]
            nginx_conf(f"ssl_conf_command Ciphersuites {suite};")
            ngx = subprocess.Popen([nginx, "-p", str(work), "-c", str(conf)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(ngx)
            time.sleep(0.5)
            nginx_cipher = negotiated(nport, cert)
        lt.log(f"  negotiated: Lighter {lighter_cipher}, nginx {nginx_cipher}")
        cases = [
            ("manifest", f"/v2/{lt.REPO}/manifests/{lt.TAG}", [accept], s.manifest),
            ("blob-4KiB", f"/v2/{lt.REPO}/blobs/{s.digests['4KiB']}", [], s.blobs["4KiB"]),
            ("blob-1MiB", f"/v2/{lt.REPO}/blobs/{s.digests['1MiB']}", [], s.blobs["1MiB"]),
        ]
        for _, path, hs, want in cases:
            check(f"https://127.0.0.1:{tport}{path}", hs, want, cert)
            check(f"https://127.0.0.1:{nport}{path}", hs, want, cert)
        rows = []
        for name, path, hs, _ in cases:
            ls, ns = [], []
            for i in range(args.repeat):
                ls.append(wrk(f"https://127.0.0.1:{tport}{path}", hs, args.connections,
                              args.duration, lambda: lt.tree(lighter.pid)))
                ns.append(wrk(f"https://127.0.0.1:{nport}{path}", hs, args.connections,
                              args.duration, lambda: lt.tree(ngx.pid)))
                lt.log(f"  https {name} run {i + 1}: Lighter {ls[-1].rps:,.0f} req/s, "
                       f"nginx {ns[-1].rps:,.0f} req/s")
            if any(r.errors for r in ls + ns):
                raise lt.Failure(f"https {name}: wrk saw errors")
            rows.append((name, ls, ns))
        report += table(f"HTTPS, Lighter against nginx (Lighter {lighter_cipher}; "
                        f"nginx {nginx_cipher}; both in user space)", rows, "Lighter", "nginx")
    finally:
        for p in procs:
            lt.stop(p, grace=5)
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except lt.Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
