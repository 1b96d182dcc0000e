#!/usr/bin/env python3
"""Pushing a many-layer image: wall time, TCP connections and requests per connection.

Lighter's data plane hands every push request to the control plane with its connection; since
the hand-back, the control plane gives the connection back after each answer, so a client that
keeps connections alive pushes a whole image over a few of them. This measures it with real
clients in a network namespace of the benchmark's own (its TCP counters count this run only):

  http      a keep-alive HTTP/1.1 client (Python's http.client, one connection): per blob
            HEAD, POST, PUT ?digest=, then the manifest: the requests are known exactly;
  https     the same over HTTPS (Lighter with a self-signed ECDSA certificate): each TCP
            connection is a TLS handshake;
  ctr       containerd's `ctr images push --plain-http` (Go's transport, keep-alive), its
            requests counted from `--http-dump`;
  skopeo    `skopeo copy` (containers/image, as podman and buildah), which asks
            `Connection: close` on every request: one connection per request whatever the
            server does (the reference for "one request per connection").

`--baseline PATH` runs the same pushes against another `lighter` binary (e.g. one built before
the hand-back) in the same invocation. Each case runs --repeat times on a fresh data directory;
the report gives the best wall time and the spread ((worst - best) / worst).

    sudo python3 benches/push.py [--layers 50] [--layer-kib 256] [--repeat 3] \\
        [--baseline /path/to/old/lighter] [--lighter target/release/lighter]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Failure, KiB, log  # noqa: E402
from bench import report, servers  # noqa: E402
from bench.procs import spawn, stop  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PORT = 5000
NS = f"lighter-push-{os.getpid()}"


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def passive_opens() -> int:
    """TCP connections accepted in this network namespace so far (TcpPassiveOpens)."""
    lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines()
             if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("PassiveOpens")])


def write_layout(root: Path, layers: int, layer_bytes: int, seed: int) -> dict:
    """An OCI image layout with `layers` random layers (tag v1); its blobs and manifest."""
    rnd = random.Random(seed)
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    blobs = []

    def put(b: bytes) -> dict:
        d = hashlib.sha256(b).hexdigest()
        (blobs_dir / d).write_bytes(b)
        blobs.append(("sha256:" + d, b))
        return {"digest": "sha256:" + d, "size": len(b)}

    layer_descs = [dict(put(rnd.randbytes(layer_bytes)),
                        mediaType="application/vnd.oci.image.layer.v1.tar") for _ in range(layers)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [d["digest"] for d in layer_descs]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": dict(put(config),
                                          mediaType="application/vnd.oci.image.config.v1+json"),
                           "layers": layer_descs}).encode()
    m = put(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [dict(
        m, mediaType=OCI_MANIFEST, annotations={"org.opencontainers.image.ref.name": "v1"})]}))
    return {"blobs": blobs[:-1], "manifest": manifest, "manifest_digest": m["digest"]}


def push_http(image: dict, repo: str, tls: ssl.SSLContext | None = None) -> int:
    """The push over one keep-alive connection; returns the requests made."""
    # A connection the server closes (`Connection: close`) is opened again for the next
    # request: the count of connections says how often.
    if tls:
        c = http.client.HTTPSConnection("127.0.0.1", PORT, timeout=60, context=tls)
    else:
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    n = 0

    def req(method, path, body=b"", headers=None):
        nonlocal n
        n += 1
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    for digest, data in image["blobs"]:
        st, _, _ = req("HEAD", f"/v2/{repo}/blobs/{digest}")
        if st == 200:
            continue
        st, h, body = req("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        if st != 202:
            raise Failure(f"POST upload: {st} {body[:200]!r}")
        loc = h["location"]
        sep = "&" if "?" in loc else "?"
        st, _, body = req("PUT", f"{loc}{sep}digest={urllib.parse.quote(digest)}", data,
                          {"Content-Type": "application/octet-stream"})
        if st != 201:
            raise Failure(f"PUT blob: {st} {body[:200]!r}")
    st, _, body = req("PUT", f"/v2/{repo}/manifests/v1", image["manifest"],
                      {"Content-Type": OCI_MANIFEST})
    if st != 201:
        raise Failure(f"PUT manifest: {st} {body[:200]!r}")
    c.close()
    return n


class Containerd:
    """A containerd of the benchmark's own in the namespace (CRI off, native snapshotter)."""

    def __init__(self, work: Path):
        self.dir = work / "containerd"
        self.dir.mkdir()
        self.sock = self.dir / "containerd.sock"
        conf = self.dir / "config.toml"
        conf.write_text(
            f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
        self.proc = spawn(["containerd", "--config", str(conf)], self.dir / "containerd.log")
        deadline = time.time() + 30
        while sh("ctr", "--address", str(self.sock), "version", check=False).returncode:
            if time.time() > deadline:
                raise Failure("containerd did not start")
            time.sleep(0.1)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ctr", "--address", str(self.sock), *args, check=check)

    def close(self) -> None:
        stop(self.proc)


def push_ctr(ctd: Containerd, archive: Path, repo: str) -> int:
    """`ctr images push`; returns the requests the data plane answered itself (the HEADs and
    GETs of its dump: requests with a body are not all dumped, and those are counted by the
    control plane)."""
    name = f"127.0.0.1:{PORT}/{repo}"
    ctd.ctr("images", "import", "--no-unpack", "--base-name", name, str(archive))
    out = ctd.ctr("images", "push", "--plain-http", "--http-dump", f"{name}:v1")
    ctd.ctr("images", "rm", f"{name}:v1")
    return len(re.findall(r'msg="(?:GET|HEAD) /v2/', out.stderr))


def handoffs(tls: ssl.SSLContext | None) -> tuple[int, int]:
    """The control plane's count of requests handed to it, and of connections given back."""
    c = (http.client.HTTPSConnection("127.0.0.1", PORT, timeout=10, context=tls) if tls
         else http.client.HTTPConnection("127.0.0.1", PORT, timeout=10))
    c.request("GET", "/v2/_lighter/metrics")
    text = c.getresponse().read().decode()
    c.close()
    v = dict(l.rsplit(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))
    return int(v.get("lighter_handoffs_total", 0)), int(v.get("lighter_handoffs_returned_total", 0))


def push_skopeo(layout: Path, repo: str, home: Path) -> None:
    home.mkdir(exist_ok=True)
    (home / "registries.conf").write_text(
        f'[[registry]]\nlocation = "127.0.0.1:{PORT}"\ninsecure = true\n')
    env = {**os.environ, "HOME": str(home), "CONTAINERS_REGISTRIES_CONF":
           str(home / "registries.conf"), "TMPDIR": str(home)}
    subprocess.run(["skopeo", "--insecure-policy", "copy",
                    "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v1",
                    f"docker://127.0.0.1:{PORT}/{repo}:v1"],
                   check=True, capture_output=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lighter", type=Path, help="the binary (default: the release build)")
    ap.add_argument("--baseline", type=Path, help="another lighter binary to compare with")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--layer-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", default="http,https,ctr,skopeo")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.in_netns:
        # The whole run happens in a network namespace of its own, so its TCP counters count
        # this run's connections only.
        if os.geteuid() != 0:
            raise Failure("needs root (a network namespace of its own)")
        sh("ip", "netns", "add", NS)
        try:
            sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
            return subprocess.run(["ip", "netns", "exec", NS, sys.executable, __file__,
                                   "--in-netns", *sys.argv[1:]]).returncode
        finally:
            sh("ip", "netns", "del", NS, check=False)
    clients = args.clients.split(",")
    binaries = [("lighter", servers.lighter_binary(args.lighter, build=args.lighter is None))]
    if args.baseline:
        binaries.append(("baseline", args.baseline))
    work = Path(tempfile.mkdtemp(prefix="lighter-push-"))
    ctd = None
    try:
        layout = work / "layout"
        image = write_layout(layout, args.layers, args.layer_kib * KiB, seed=7)
        archive = work / "image.tar"
        sh("tar", "-C", str(layout), "-cf", str(archive), ".")
        if "ctr" in clients:
            ctd = Containerd(work)
        cert, key = work / "cert.pem", work / "key.pem"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
           "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
           "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
        tls_context = ssl.create_default_context(cafile=str(cert))
        results: dict = {}
        for run in range(args.repeat):
            for label, binary in binaries:
                for client in clients:
                    data = work / f"data-{label}-{client}-{run}"
                    tls = tls_context if client == "https" else None
                    flags = ["--tls-cert-path", str(cert), "--tls-key-path", str(key)] if tls else []
                    srv = servers.start_lighter(
                        binary, PORT, work / f"{label}.log",
                        ["--listen", f"127.0.0.1:{PORT}", "--data-dir", str(data), *flags],
                        answers_200=tls is None)
                    try:
                        repo = f"bench/{client}"
                        handed0, back0 = handoffs(tls)
                        before = passive_opens()
                        t0 = time.perf_counter()
                        if client in ("http", "https"):
                            requests = push_http(image, repo, tls)
                        elif client == "ctr":
                            requests = push_ctr(ctd, archive, repo)
                        else:
                            push_skopeo(layout, repo, work / "skopeo-home")
                            requests = None
                        wall = time.perf_counter() - t0
                        conns = passive_opens() - before
                        handed1, back1 = handoffs(tls)
                        # Less the metrics read's own (handed over, and given back if its
                        # binary gives connections back). A binary without these counters
                        # (before the hand-back) gives None.
                        handed = handed1 - handed0 - 1 if handed1 else None
                        back = max(back1 - back0 - 1, 0) if handed1 else None
                        if client == "ctr":
                            requests = requests + handed if handed is not None else None
                    finally:
                        stop(srv.proc)
                    shutil.rmtree(data, ignore_errors=True)
                    results.setdefault((client, label), []).append(
                        (wall, conns, requests, handed, back))
                    log(f"  {client:6} {label:8} run {run + 1}: {wall:.3f} s, {conns} connections,"
                        f" {requests if requests is not None else '?'} requests, {handed} handed"
                        f" over, {back} given back")
    finally:
        if ctd:
            ctd.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"# Push of a {args.layers}-layer image ({args.layer_kib} KiB layers), "
          f"best of {args.repeat}")
    for line in report.machine():
        print(line)
    print()
    print("| client | binary | wall (best, spread) | TCP connections | requests "
          "| requests per connection | to the control plane | given back |")
    print("|---|---|---|---|---|---|---|---|")
    # The same client pushing the same image makes the same requests whichever binary answers:
    # a count known for one binary stands for the others.
    known = {c: r[0][2] for (c, _), r in results.items() if r[0][2] is not None}
    na = lambda v: "n/a" if v is None else v  # noqa: E731
    for (client, label), runs in sorted(results.items()):
        walls = [r[0] for r in runs]
        conns = min(r[1] for r in runs)
        reqs, handed, back = known.get(client), runs[0][3], runs[0][4]
        per = f"{reqs / conns:.1f}" if reqs and conns else "1 (asks close)"
        print(f"| {client} | {label} | {min(walls):.3f} s ({report.spread(walls):.0f}%) "
              f"| {conns} | {reqs if reqs is not None else '?'} | {per} | {na(handed)} "
              f"| {na(back)} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"push benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
