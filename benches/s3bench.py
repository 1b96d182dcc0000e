#!/usr/bin/env python3
"""The replicated mode (`[storage.s3]`) measured (issue 16), in one invocation, against a
single-node Garage it starts itself:

1. Cached pulls: a replica serving from its cache (replica B, filled from the bucket by the
   pushes to replica A) against nginx serving the same files with sendfile, and a Lighter in
   local mode against the same nginx, driven by the same wrk, the three interleaved
   (loadtest.py's workloads and wrk runs). Target: the replica at the local mode's ratio.
2. Push throughput: --layers blobs of --layer-mib MiB pushed at once to replica A (one
   monolithic `POST ?digest=` each: the bytes land in Lighter's ingest, are hashed, synced, then
   sent to the bucket, before the 201), then a manifest tagging them; against the object
   store's own PUT of as many fresh bytes (s3raw: the same S3 client, multipart shape and part
   size as Lighter), and the same push to the local-mode Lighter (all but the upload),
   interleaved, --repeat times.
3. A cold pull: a fresh replica (empty data directory) pulls the image pushed in 2 as
   containerd does (manifest by tag, then every blob in parallel, each one's sha256 checked:
   loadtest's mirror pull), every blob filled from the bucket while it streams; against the
   object store's own GET of the same objects (s3raw, all at once), interleaved, --repeat times.

Ratios are throughputs over the object store's (1.0 = as fast as the store alone; a push
through Lighter also writes and syncs every byte to local disk first, so below 1.0 is expected).
Every process it starts is stopped at the end; nothing is asserted in `cargo test`.

    python3 benches/s3bench.py [--duration 8] [--connections 64] [--repeat 3] \\
        [--layers 4] [--layer-mib 64] [--server-cores N] [--quick]

`--quick` checks the whole path end to end in about half a minute with tiny sizes and runs
(numbers meaningless). Needs garage (`cargo install garage --version 2.5.0 --locked`), nginx,
wrk and curl (installed with apt-get when missing, unless --no-install).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # noqa: E402  (its workloads and wrk runs)
from events import metrics  # noqa: E402
from bench import ROOT, Failure, MiB, log, run_main  # noqa: E402
from bench import garage, mirror, procs, report, servers  # noqa: E402
from bench.images import (OCI_MANIFEST, SEED_REPO, SEED_TAG, Image,  # noqa: E402
                          lay_out_for_nginx, make_seed, sha256, write_image)
from bench.registry import curl_get, push_seed, request  # noqa: E402
from bench.report import cell, fmt_ms, ratio_cell, spread  # noqa: E402

PUSH_REPO = "bench/push"
SIDES = ("replica", "local", "nginx")
DEFAULT_WORKLOADS = "manifest,blob-4KiB,blob-1MiB"


def s3raw_path() -> Path:
    return servers.lighter_path().parent / "s3raw"


def build(args) -> tuple[Path, Path]:
    """The lighter and s3raw binaries: given, or built in release (one cargo invocation, so the
    S3 client is compiled once for both)."""
    if not args.no_build and not (args.lighter_bin and args.s3raw_bin):
        log("cargo build --release --bin lighter --bin s3raw")
        subprocess.run(["cargo", "build", "--release", "-p", "lighter-controlplane", "-p",
                        "lighter-benches", "--bin", "lighter", "--bin", "s3raw"],
                       cwd=ROOT, check=True)
    lighter = args.lighter_bin or servers.lighter_path()
    raw = args.s3raw_bin or s3raw_path()
    for b in (lighter, raw):
        if not b.exists():
            raise Failure(f"{b} does not exist")
    return lighter, raw


class Raw:
    """The object store's own PUT and GET speed: s3raw, timed by itself, with the CPU it and
    Garage spent."""

    def __init__(self, binary: Path, g: garage.Garage, part_size: int):
        self.binary, self.g, self.part_size = binary, g, part_size

    def run(self, op: str, objects: list[str]) -> dict:
        argv = [str(self.binary), op, "--endpoint", self.g.endpoint, "--bucket", garage.BUCKET,
                "--region", garage.REGION, "--part-size-bytes", str(self.part_size), *objects]
        garage_pids = procs.tree(self.g.proc.pid)
        g0, ru0 = procs.cpu_seconds(garage_pids), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                           env={**procs.child_env(), **self.g.env()})
        ru1, g1 = resource.getrusage(resource.RUSAGE_CHILDREN), procs.cpu_seconds(garage_pids)
        if r.returncode != 0:
            raise Failure(f"s3raw {op} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["cpu"] = {"garage": g1 - g0,
                      "s3raw": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}
        return out


def push_image_parallel(port: int, repo: str, tag: str, image: Image, blobs_dir: Path,
                        pool: ThreadPoolExecutor) -> None:
    """Every blob at once, one monolithic `POST ?digest=` each (its own connection), then the
    manifest: acknowledged only once the bucket holds them."""
    def one(digest: str, size: int) -> None:
        with open(blobs_dir / digest, "rb") as f:
            st, body, _ = request(port, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", f,
                                  {"Content-Type": "application/octet-stream",
                                   "Content-Length": str(size)}, timeout=600)
        if st != 201:
            raise Failure(f"pushing {digest[:19]}… to {repo}: {st} {body[:300]!r}")

    for f in [pool.submit(one, d, n) for d, n in image.blobs]:
        f.result()
    st, body, _ = request(port, "PUT", f"/v2/{repo}/manifests/{tag}", image.manifest,
                          {"Content-Type": OCI_MANIFEST,
                           "Content-Length": str(len(image.manifest))})
    if st != 201:
        raise Failure(f"pushing the manifest to {repo}: {st} {body[:300]!r}")


def content_key(digest: str) -> str:
    """The bucket's key of content (layout/src/bucket.rs)."""
    alg, hexd = digest.split(":", 1)
    return f"blobs/{alg}/{hexd}"


def best_and_spread(xs: list[float]) -> str:
    return f"{min(xs):.2f} s ({spread(xs):.0f}%)"


def main() -> int:
    ap = argparse.ArgumentParser(prog="benches/s3bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8, help="seconds per wrk run (default 8)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case and side (default 3)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of discarded wrk per "
                    "workload and side (default 1)")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"loadtest.py's wrk workloads to run (default {DEFAULT_WORKLOADS}; "
                         "'none' skips the cached pulls)")
    ap.add_argument("--server-cores", type=int, default=None,
                    help="data plane threads of every Lighter and nginx's worker_processes "
                         "(default every CPU; 1 on a 2-core machine leaves wrk a core)")
    ap.add_argument("--layers", type=int, default=4, help="blobs pushed and pulled (default 4)")
    ap.add_argument("--layer-mib", type=int, default=64, help="MiB per blob (default 64)")
    ap.add_argument("--part-size-bytes", type=int, default=16 * MiB,
                    help="storage.s3.part_size_bytes of the replicas and s3raw's part size "
                         "(default 16 MiB, Lighter's default)")
    ap.add_argument("--tag-ttl-ms", type=int, default=1000,
                    help="storage.s3.tag_ttl_ms of the replicas (default 1000, the issue's)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and runs, to check the benchmark works end to end: "
                         "--duration 1 --warmup 0 --repeat 1 --connections 4 --layers 2 "
                         "--layer-mib 6 --part-size-bytes 5242880 (two parts a blob)")
    ap.add_argument("--lighter-bin", type=Path, help="use this lighter binary")
    ap.add_argument("--s3raw-bin", type=Path, help="use this s3raw binary")
    ap.add_argument("--no-build", action="store_true",
                    help="use the release binaries as they are")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat, args.connections = 1, 0, 1, 4
        args.layers, args.layer_mib, args.part_size_bytes = 2, 6, 5 * MiB
    if min(args.repeat, args.connections, args.threads, args.layers, args.layer_mib) < 1:
        ap.error("--repeat, --connections, --threads, --layers and --layer-mib must be >= 1")

    began = time.monotonic()
    nginx_bin = servers.ensure_tools(args.no_install, False)
    binary, raw_bin = build(args)
    head = report.machine() + [garage.version(garage.binary())]
    for h in head:
        log(h)

    work = Path(tempfile.mkdtemp(prefix="lighter-s3bench-"))
    started: list[servers.Started] = []
    nginx: servers.Started | None = None
    g: garage.Garage | None = None
    problems: list[str] = []
    results: dict[tuple[str, str], list] = {}
    pushes: dict[str, list[dict]] = {"lighter": [], "raw": [], "local": []}
    pulls: dict[str, list[dict]] = {"lighter": [], "raw": []}
    cores = ["--cores", str(args.server_cores)] if args.server_cores else []
    n = 0

    try:
        log("starting garage")
        g = garage.start(work)
        conf = work / "s3.toml"
        conf.write_text(g.storage_toml(args.tag_ttl_ms, args.part_size_bytes))
        raw = Raw(raw_bin, g, args.part_size_bytes)

        def start(name: str, s3: bool) -> servers.Started:
            nonlocal n
            n += 1
            port = procs.free_port()
            s = servers.start_lighter(
                binary, port, work / f"lighter-{name}.log",
                ["--listen", f"127.0.0.1:{port}", "--data-dir", str(work / f"data-{name}"),
                 *cores, *(["--config", str(conf)] if s3 else [])],
                env=g.env() if s3 else None)
            started.append(s)
            return s

        def stop(s: servers.Started, data: str) -> None:
            procs.stop(s.proc)
            started.remove(s)
            shutil.rmtree(work / f"data-{data}", ignore_errors=True)

        log("starting replica A (takes the pushes), replica B (serves from its cache), a "
            "local-mode Lighter and nginx")
        a, b, local = start("a", True), start("b", True), start("local", False)
        seed = make_seed()
        for s in (a, local):
            push_seed(s.port, SEED_REPO, SEED_TAG, seed)
        root = work / "nginx-root"
        lay_out_for_nginx(root, SEED_REPO, SEED_TAG, seed)
        nginx = servers.start_nginx(nginx_bin, root, work, [SEED_REPO],
                                    workers=args.server_cores)

        # 1. Cached pulls. B's first GET of each is a miss filled from the bucket (the check
        #    below); everything after is its cache.
        wanted = [x.strip() for x in args.workloads.split(",") if x.strip() not in ("", "none")]
        ws = [w for w in loadtest.workloads(seed, args.connections, args.connections)
              if w.name in wanted]
        unknown = set(wanted) - {w.name for w in ws}
        if unknown:
            raise Failure(f"unknown workloads {sorted(unknown)}")
        sides = {"replica": b, "local": local, "nginx": nginx}
        good = []
        for w in ws:
            want = sha256(w.body).split(":", 1)[1]
            got = {s: curl_get(f"http://127.0.0.1:{st.port}{w.path}", w.headers)
                   for s, st in sides.items()}
            bad = [f"{s} answered {code} sha256:{h[:12]}…" for s, (code, h) in got.items()
                   if code != w.status or h != want]
            if bad:
                problems.append(f"{w.name}: not benchmarked, expected {w.status} "
                                f"sha256:{want[:12]}…, " + "; ".join(bad))
                log("  MISMATCH " + problems[-1])
            else:
                log(f"  {w.name}: all three answer {w.status} with the same {len(w.body)} bytes")
                good.append(w)
        pids = {s: (lambda st=st: procs.tree(st.proc.pid)) for s, st in sides.items()}
        if args.warmup > 0:
            for w in good:
                for s in SIDES:
                    loadtest.run_wrk(w, sides[s].port, args.threads, args.warmup, pids[s])
        for rep in range(args.repeat):
            for w in good:
                order = SIDES[rep % 3:] + SIDES[:rep % 3]
                for s in order:
                    r = loadtest.run_wrk(w, sides[s].port, args.threads, args.duration, pids[s])
                    results.setdefault((w.name, s), []).append(r)
                    err = f", {r.errors} ERRORS" if r.errors else ""
                    log(f"  {w.name:<10} {s:<7} {report.fmt_rps(r.rps):>9} req/s  "
                        f"p99 {fmt_ms(r.p99_ms)}{err}")
        stop(b, "b")
        servers.stop_nginx(nginx)
        nginx = None

        # 2. Pushes through A against the store's own PUTs, fresh bytes each time (Garage
        #    keeps a block once: the same bytes again would be cheaper for it); and to the
        #    local-mode Lighter, which does all a replica does but the upload.
        sizes = [args.layer_mib * MiB] * args.layers
        log(f"pushes: {args.layers} × {args.layer_mib} MiB at once, {args.repeat} time(s) "
            "per side")
        pool = ThreadPoolExecutor(max_workers=args.layers + 2)
        image = None
        push_sides = ("lighter", "raw", "local")
        for rep in range(args.repeat):
            for side in push_sides[rep % 3:] + push_sides[:rep % 3]:
                d = work / f"push-{rep}-{side}"
                img = write_image(d, sizes, 1600 + 3 * rep + push_sides.index(side))
                if side in ("lighter", "local"):
                    to = a if side == "lighter" else local
                    l_pids, g_pids = procs.tree(to.proc.pid), procs.tree(g.proc.pid)
                    c0 = (procs.cpu_seconds(l_pids), procs.cpu_seconds(g_pids))
                    t0 = time.perf_counter()
                    push_image_parallel(to.port, PUSH_REPO, mirror.MIRROR_TAG, img, d, pool)
                    t = time.perf_counter() - t0
                    c1 = (procs.cpu_seconds(l_pids), procs.cpu_seconds(g_pids))
                    cpu = {"lighter": c1[0] - c0[0], "garage": c1[1] - c0[1]}
                    if side == "local":
                        del cpu["garage"]
                    pushes[side].append(dict(seconds=t, bytes=img.pull_bytes, cpu=cpu))
                    if side == "lighter":
                        image = img
                else:
                    layers = [f"raw/{rep}/{dg.split(':', 1)[1]}={d / dg}" for dg, _ in img.layers]
                    pushes["raw"].append(raw.run("put", layers))
                p = pushes[side][-1]
                log(f"  push {side:<7} {p['bytes'] / MiB:7.1f} MiB in {p['seconds']:.2f} s "
                    f"({p['bytes'] / MiB / p['seconds']:.1f} MiB/s)")
                shutil.rmtree(d)
        assert image is not None
        stop(local, "local")

        # 3. Cold pulls of that image, each through a fresh replica, against the store's own
        #    GETs of the same objects.
        keys = [content_key(image.manifest_digest)] + [content_key(d) for d, _ in image.blobs]
        log(f"cold pulls: {image.pull_bytes / MiB:.1f} MiB, {args.repeat} time(s) per side")
        for rep in range(args.repeat):
            for side in (("lighter", "raw") if rep % 2 == 0 else ("raw", "lighter")):
                if side == "lighter":
                    c = start(f"cold-{rep}", True)
                    p = mirror.timed_pull(c.port, PUSH_REPO, image, pool, {
                        "lighter": procs.tree(c.proc.pid), "garage": procs.tree(g.proc.pid)})
                    fetched = int(metrics(c.port).get(
                        'lighter_blob_fetch_bytes_total{source="bucket"}', -1))
                    pulls["lighter"].append(dict(
                        seconds=p.seconds, bytes=p.bytes, cpu=p.cpu_by_server,
                        client_cpu=p.client_cpu_s, last_byte_wait_s=p.last_byte_wait_s,
                        bucket_bytes=fetched))
                    stop(c, f"cold-{rep}")
                    blob_bytes = sum(n for _, n in image.blobs)
                    if fetched != blob_bytes:
                        problems.append(f"cold pull {rep + 1}: the replica fetched {fetched} "
                                        f"bytes from the bucket for {blob_bytes} bytes of blobs "
                                        "(expected each blob once)")
                else:
                    pulls["raw"].append(raw.run("get", keys))
                p = pulls[side][-1]
                log(f"  pull {side:<7} {p['bytes'] / MiB:7.1f} MiB in {p['seconds']:.2f} s "
                    f"({p['bytes'] / MiB / p['seconds']:.1f} MiB/s)")
        pool.shutdown()
        if a.proc.poll() is not None:
            problems.append(f"replica A exited with {a.proc.returncode} during the run")
    finally:
        servers.stop_nginx(nginx)
        for s in list(started):
            procs.stop(s.proc)
        if g is not None:
            procs.stop(g.proc)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    out = ["## The replicated mode: cached pulls against nginx, pushes and cold pulls against "
           "the object store", ""]
    out += [f"- {h}" for h in head]
    out.append(f"- Garage: single node on loopback (sqlite metadata, data on the same disk); "
               f"replicas: tag_ttl_ms {args.tag_ttl_ms}, part_size_bytes {args.part_size_bytes}"
               + (f", --cores {args.server_cores}" if args.server_cores else ""))
    out.append(f"- wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
               f"{args.repeat} run(s) per side, the three sides interleaved, "
               f"{args.warmup:g} s warm-up; nginx {servers.nginx_summary(args.server_cores)}"
               + ("; **--quick: numbers meaningless**" if args.quick else ""))
    out += ["", "### Cached pulls: a replica and a local-mode Lighter against nginx", "",
            "| workload | replica req/s | local req/s | nginx req/s | replica/nginx | "
            "local/nginx | replica/local |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for w in ws:
        rs = [results.get((w.name, s), []) for s in SIDES]
        if not all(rs):
            out.append(f"| {w.name} | not run | | | | | |")
            continue
        best = [max(r.rps for r in x) for x in rs]

        def rc(i: int, j: int) -> str:
            pairs = [x.rps / y.rps for x, y in zip(rs[i], rs[j]) if y.rps]
            return ratio_cell(best[i] / best[j], pairs)

        ratios[w.name] = best[0] / best[1]
        out.append(f"| {w.name} | {cell(rs[0])} | {cell(rs[1])} | {cell(rs[2])} | {rc(0, 2)} | "
                   f"{rc(1, 2)} | {rc(0, 1)} |")
    out += ["", "req/s: best run (spread (max−min)/max). Ratios: best over best (in brackets the "
            "lowest and highest of runs done back to back)." if ws else "(not run)"]

    def rate(x: dict) -> float:
        return x["bytes"] / x["seconds"]

    def section(title: str, res: dict, what_l: str, what_r: str, what_local: str = "") -> list[str]:
        lines = ["", f"### {title}", "",
                 "| side | what | best | MiB/s (best) | CPU s (best run) |", "|---|---|---:|---:|---:|"]
        if not res["lighter"] or not res["raw"]:
            return lines + ["| not run | | | | |"]
        rows = [("lighter", what_l), ("raw", what_r)]
        rows += [("local", what_local)] if res.get("local") else []
        for side, what in rows:
            xs = res[side]
            b = min(xs, key=lambda x: x["seconds"])
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in b["cpu"].items())
            lines.append(f"| {side} | {what} | {best_and_spread([x['seconds'] for x in xs])} | "
                         f"{rate(b) / MiB:,.1f} | {cpu} |")
        ratio = max(rate(x) for x in res["lighter"]) / max(rate(x) for x in res["raw"])
        pairs = [rate(x) / rate(y) for x, y in zip(res["lighter"], res["raw"])]
        lines += ["", f"Lighter / object store (throughput): {ratio_cell(ratio, pairs)}"]
        if res.get("local"):
            ratio = max(rate(x) for x in res["local"]) / max(rate(x) for x in res["raw"])
            pairs = [rate(x) / rate(y) for x, y in zip(res["local"], res["raw"])]
            lines.append(f"Local mode / object store (throughput): {ratio_cell(ratio, pairs)}; a "
                         "replica receives, hashes and syncs as the local mode does, then uploads")
        return lines

    mib = args.layer_mib
    out += section(
        "Push: through replica A against the object store's own PUT",
        pushes,
        f"{args.layers} × {mib} MiB `POST ?digest=` at once + manifest (201 once in the bucket)",
        f"s3raw PUT of {args.layers} × {mib} MiB fresh bytes at once",
        "the same push to the local-mode Lighter (no bucket)")
    out += section(
        "Cold pull: a fresh replica against the object store's own GET",
        pulls,
        "manifest by tag, then config and layers in parallel, sha256 checked by the client",
        "s3raw GET of the same objects at once, bodies read and dropped")
    if pulls["lighter"]:
        out.append(f"Longest wait for a blob's last byte (held until verified): "
                   f"{fmt_ms(min(x['last_byte_wait_s'] for x in pulls['lighter']) * 1000)}; "
                   "fetched from the bucket per cold pull: "
                   + ", ".join(f"{x['bucket_bytes'] / MiB:.1f} MiB" for x in pulls["lighter"])
                   + f" (the blobs: {sum(n for _, n in image.blobs) / MiB:.1f} MiB)")
    out += ["", "Targets:"]
    for name, r in ratios.items():
        out.append(f"- {name}: replica at the local mode's ratio to nginx (replica/local ≥ 0.97): "
                   f"{'PASS' if r >= 0.97 else 'FAIL'} ({r:.2f}×)")
    if problems:
        out += ["", "Problems:"] + [f"- {p}" for p in problems]
    text = "\n".join(out) + "\n"
    print("\n" + text, flush=True)
    log(f"the whole run took {(time.monotonic() - began) / 60:.1f} min")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(dict(
            machine=head, args={k: str(v) for k, v in vars(args).items()},
            wrk={f"{w}/{s}": [{k: v for k, v in vars(r).items() if k != "raw"} for r in rs]
                 for (w, s), rs in results.items()},
            pushes=pushes, pulls=pulls, problems=problems), indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    run_main("s3bench", main)
