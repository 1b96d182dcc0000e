"""Talking to a registry (Lighter, nginx serving the same files, Distribution) over HTTP/1.1:
requests, pushes, and pulls of one manifest or blob whose bytes are checked against the digest.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

from . import Failure, MiB
from .images import MANIFEST_ACCEPT, OCI_MANIFEST, Image, Seed, sha256

PULL_READ_BYTES = 1 * MiB  # each blob reader's recv-and-hash size


def request(port: int, method: str, path: str, body=None, headers=None, *,
            host: str = "127.0.0.1", timeout: float = 120.0):
    """One request on a connection of its own: (status, body, headers)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout, blocksize=MiB)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def push_seed(port: int, repo: str, tag: str, seed: Seed, headers=None) -> None:
    """Pushes `seed` to Lighter as repo:tag, every blob in one POST (?digest=); `headers` are
    added to every request (e.g. Authorization)."""
    for name, data in seed.blobs.items():
        st, body, _ = request(
            port, "POST", f"/v2/{repo}/blobs/uploads/?digest={seed.digests[name]}", data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
             **(headers or {})})
        if st != 201:
            raise Failure(f"pushing blob {name} to {repo}: {st} {body[:300]!r}")
    st, body, _ = request(
        port, "PUT", f"/v2/{repo}/manifests/{tag}", seed.manifest,
        {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(seed.manifest)),
         **(headers or {})})
    if st != 201:
        raise Failure(f"pushing the manifest to {repo}: {st} {body[:300]!r}")


def push_image(port: int, repo: str, tag: str, image: Image, blobs_dir: Path, *,
               host: str = "127.0.0.1") -> None:
    """Pushes `image` (its blobs read from `blobs_dir`) to Distribution as repo:tag.
    Distribution 2.8 has no single-POST monolithic upload: every blob is POST (open a session)
    then PUT ?digest=."""
    for digest, size in image.blobs:
        st, body, headers = request(port, "POST", f"/v2/{repo}/blobs/uploads/", b"",
                                    {"Content-Length": "0"}, host=host)
        loc = {k.lower(): v for k, v in headers.items()}.get("location")
        if st != 202 or not loc:
            raise Failure(f"distribution: opening an upload: {st} {body[:300]!r}")
        u = urllib.parse.urlsplit(loc)
        query = (u.query + "&" if u.query else "") + "digest=" + urllib.parse.quote(digest)
        with open(blobs_dir / digest, "rb") as f:
            st, body, _ = request(port, "PUT", f"{u.path}?{query}", f, {
                "Content-Type": "application/octet-stream", "Content-Length": str(size)},
                host=host, timeout=300)
        if st != 201:
            raise Failure(f"distribution: pushing blob {digest}: {st} {body[:300]!r}")
    st, body, _ = request(port, "PUT", f"/v2/{repo}/manifests/{tag}", image.manifest, {
        "Content-Type": OCI_MANIFEST, "Content-Length": str(len(image.manifest))}, host=host)
    if st != 201:
        raise Failure(f"distribution: pushing the manifest: {st} {body[:300]!r}")


def fetch_manifest(host: str, port: int, repo: str, tag: str, digest: str) -> bytes:
    """GET of a manifest by tag, as containerd asks for it; raises Failure unless its digest is
    `digest`."""
    path = f"/v2/{repo}/manifests/{tag}"
    c = http.client.HTTPConnection(host, port, timeout=120)
    try:
        c.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        r = c.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET http://{host}:{port}{path}: {type(e).__name__}: {e}") from None
    finally:
        c.close()
    if r.status != 200 or sha256(body) != digest:
        raise Failure(f"GET http://{host}:{port}{path}: {r.status}, {len(body)} bytes "
                      f"{sha256(body)[:19]}…, expected the manifest {digest[:19]}…")
    return body


def fetch_blob(host: str, port: int, repo: str, digest: str, size: int,
               store: Path | None = None, timeout: float = 120) -> tuple[int, float]:
    """GET of one blob on a connection of its own; the body is read in PULL_READ_BYTES reads and
    hashed. With `store`, also written there as containerd would: an ingest file, renamed into
    blobs/sha256/ once verified. Returns the bytes read and the seconds between the next-to-last
    byte and the last (Lighter holds a downloading blob's last byte until it is verified and
    published); raises Failure unless the bytes are the blob."""
    path = f"/v2/{repo}/blobs/{digest}"
    url = f"http://{host}:{port}{path}"
    hexd = digest.split(":", 1)[1]
    out, ingest = None, None
    if store is not None:
        ingest = store / "ingest" / f"{hexd}.data"
        ingest.parent.mkdir(parents=True, exist_ok=True)
        out = open(ingest, "wb")
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    h, n, before_last, last_wait = hashlib.sha256(), 0, None, 0.0
    try:
        c.request("GET", path)
        r = c.getresponse()
        if r.status != 200:
            raise Failure(f"GET {url}: {r.status} {r.read(300)!r}")
        buf = memoryview(bytearray(PULL_READ_BYTES))
        while True:
            # The last byte is read on its own, to time its wait.
            want = len(buf) if n >= size else max(1, min(len(buf), size - 1 - n))
            k = r.readinto(buf[:want])
            if not k:
                break
            h.update(buf[:k])  # hashlib drops the GIL for large updates
            if out is not None:
                out.write(buf[:k])
            n += k
            if n == size - 1:
                before_last = time.perf_counter()
            elif n == size and before_last is not None:
                last_wait = time.perf_counter() - before_last
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET {url}: after {n} bytes: {type(e).__name__}: {e}") from None
    finally:
        c.close()
        if out is not None:
            out.close()
    if n != size or "sha256:" + h.hexdigest() != digest:
        raise Failure(f"GET {url}: {n} bytes, sha256:{h.hexdigest()[:12]}…; "
                      f"expected {size} bytes of {digest[:19]}…")
    if store is not None and ingest is not None:
        dst = store / "blobs" / "sha256" / hexd
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(ingest, dst)
    return n, last_wait


def curl_get(url: str, headers: list[str], ca: Path | None = None) -> tuple[int, str]:
    """GET with curl (a client that is not ours): (status, sha256 hex of the body)."""
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if ca:
        cmd += ["--cacert", str(ca)]
    for h in headers:
        cmd += ["-H", h]
    r = subprocess.run(cmd + [url], capture_output=True, timeout=120)
    if r.returncode != 0:
        raise Failure(f"curl {url} failed: {r.stderr.decode(errors='replace').strip()}")
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code.strip() or 0), hashlib.sha256(body).hexdigest()
