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

Ratios are best-of-runs with the pairwise spread, as in loadtest.py; both use the `bench`
package beside this file.

    python3 benches/access.py [--duration 6] [--repeat 3] [--connections 64] [--no-build]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Failure, log  # noqa: E402
from bench import procs, report, servers, wrk  # noqa: E402
from bench.images import (OCI_MANIFEST, SEED_REPO, SEED_TAG,  # noqa: E402
                          lay_out_for_nginx, make_seed, sha256)
from bench.registry import curl_get, push_seed, request  # noqa: E402

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


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def start(binary: Path, config: Path, port: int, work: Path, name: str) -> servers.Started:
    # With access rules /v2/ answers 401, and with TLS nothing answers plain HTTP: ready is
    # the "listening on" line.
    return servers.start_lighter(binary, port, work / f"{name}.log", ["--config", str(config)],
                                 answers_200=False)


def run_wrk(url: str, headers: list[str], conns: int, seconds: float, pids) -> wrk.Run:
    return wrk.run(url, headers, conns, 1, seconds, pids)


def check(url: str, headers: list[str], want: bytes, ca: Path | None = None) -> None:
    code, digest = curl_get(url, headers, ca)
    if code != 200 or "sha256:" + digest != sha256(want):
        raise Failure(f"{url}: {code}, sha256:{digest[:12]}… (want 200, {len(want)} bytes "
                      f"{sha256(want)[:19]}…)")


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


def main() -> int:
    ap = argparse.ArgumentParser(prog="benches/access.py")
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--no-build", action="store_true", help="use target/release/lighter as it is")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary; skips cargo build")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    nginx = servers.ensure_tools(False, False)
    binary = servers.lighter_binary(args.lighter_bin, not args.no_build)
    head = report.machine()
    for h in head:
        log(h)
    work = Path(tempfile.mkdtemp(prefix="lighter-access-"))
    started: list[servers.Started] = []
    out = ["## Access control and HTTPS", ""] + [f"- {h}" for h in head] + [""]
    try:
        htpasswd = work / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "ci", "secret"], check=True,
                       capture_output=True)
        s = make_seed()

        # 1. Authorised against anonymous, one server.
        port = procs.free_port()
        cfg = work / "auth.toml"
        cfg.write_text(CONFIG.format(port=port, data=work / "data", tls="", htpasswd=htpasswd))
        lighter = start(binary, cfg, port, work, "lighter-auth")
        started.append(lighter)
        ci = basic("ci", "secret")
        push_seed(port, SEED_REPO, SEED_TAG, s, {"Authorization": ci})
        push_seed(port, PRIVATE, SEED_TAG, s, {"Authorization": ci})
        st, body, _ = request(
            port, "GET", f"/v2/_lighter/token?service=lighter&scope=repository:{PRIVATE}:pull",
            None, {"Authorization": ci})
        if st != 200:
            raise Failure(f"token endpoint: {st} {body[:200]!r}")
        bearer = f"Authorization: Bearer {json.loads(body)['token']}"
        base = f"http://127.0.0.1:{port}"
        accept = f"Accept: {OCI_MANIFEST}"
        cases = [
            ("manifest", f"/manifests/{SEED_TAG}", [accept], s.manifest),
            ("blob-4KiB", f"/blobs/{s.digests['4KiB']}", [], s.blobs["4KiB"]),
        ]
        for name, tail, hs, want in cases:
            check(f"{base}/v2/{SEED_REPO}{tail}", hs, want)
            check(f"{base}/v2/{PRIVATE}{tail}", hs + [bearer], want)
            st, _, _ = request(port, "GET", f"/v2/{PRIVATE}{tail}", None)
            if st != 401:
                raise Failure(f"{PRIVATE}{tail} without a token answered {st}, not 401")
        pids = lambda: procs.tree(lighter.proc.pid)
        rows = []
        for name, tail, hs, _ in cases:
            anon, authd = [], []
            for i in range(args.repeat):
                authd.append(run_wrk(f"{base}/v2/{PRIVATE}{tail}", hs + [bearer],
                                     args.connections, args.duration, pids))
                anon.append(run_wrk(f"{base}/v2/{SEED_REPO}{tail}", hs, args.connections,
                                    args.duration, pids))
                log(f"  {name} run {i + 1}: token {authd[-1].rps:,.0f} req/s, "
                    f"anonymous {anon[-1].rps:,.0f} req/s")
            if any(r.errors for r in anon + authd):
                raise Failure(f"{name}: wrk saw errors")
            rows.append((name, authd, anon))
        out += report.ratio_table("Pulls with a token against anonymous pulls (same server, same run)",
                     rows, "token", "anonymous")
        procs.stop(lighter.proc, grace=5)
        started.remove(lighter)

        # 2. HTTPS: Lighter against nginx, same certificate.
        cert, key = work / "cert.pem", work / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        tport = procs.free_port()
        tcfg = work / "tls.toml"
        tls = f'tls_cert_path = "{cert}"\ntls_key_path = "{key}"'
        tcfg.write_text(CONFIG.format(port=tport, data=work / "data", tls=tls, htpasswd=htpasswd))
        lighter = start(binary, tcfg, tport, work, "lighter-tls")
        started.append(lighter)
        root = work / "nginx-root"
        lay_out_for_nginx(root, SEED_REPO, SEED_TAG, s)
        lighter_cipher = negotiated(tport, cert)
        ngx = servers.start_nginx(nginx, root, work, [SEED_REPO], name="nginx-tls",
                                  tls=servers.Tls(cert, key))
        started.append(ngx)
        nginx_cipher = negotiated(ngx.port, cert)
        if nginx_cipher != lighter_cipher:
            servers.stop_nginx(ngx)
            started.remove(ngx)
            suite = lighter_cipher.split()[-1]
            ngx = servers.start_nginx(nginx, root, work, [SEED_REPO], name="nginx-tls",
                                      tls=servers.Tls(cert, key, suite))
            started.append(ngx)
            nginx_cipher = negotiated(ngx.port, cert)
        log(f"  negotiated: Lighter {lighter_cipher}, nginx {nginx_cipher}")
        cases = [
            ("manifest", f"/v2/{SEED_REPO}/manifests/{SEED_TAG}", [accept], s.manifest),
            ("blob-4KiB", f"/v2/{SEED_REPO}/blobs/{s.digests['4KiB']}", [], s.blobs["4KiB"]),
            ("blob-1MiB", f"/v2/{SEED_REPO}/blobs/{s.digests['1MiB']}", [], s.blobs["1MiB"]),
        ]
        for _, path, hs, want in cases:
            check(f"https://127.0.0.1:{tport}{path}", hs, want, cert)
            check(f"https://127.0.0.1:{ngx.port}{path}", hs, want, cert)
        rows = []
        for name, path, hs, _ in cases:
            ls, ns = [], []
            for i in range(args.repeat):
                ls.append(run_wrk(f"https://127.0.0.1:{tport}{path}", hs, args.connections,
                                  args.duration, lambda: procs.tree(lighter.proc.pid)))
                ns.append(run_wrk(f"https://127.0.0.1:{ngx.port}{path}", hs, args.connections,
                                  args.duration, lambda: procs.tree(ngx.proc.pid)))
                log(f"  https {name} run {i + 1}: Lighter {ls[-1].rps:,.0f} req/s, "
                    f"nginx {ns[-1].rps:,.0f} req/s")
            if any(r.errors for r in ls + ns):
                raise Failure(f"https {name}: wrk saw errors")
            rows.append((name, ls, ns))
        out += report.ratio_table(f"HTTPS, Lighter against nginx (Lighter {lighter_cipher}; "
                     f"nginx {nginx_cipher}; both in user space)", rows, "Lighter", "nginx")
    finally:
        for p in started:
            procs.stop(p.proc, grace=5)
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
