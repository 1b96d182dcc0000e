"""loadtest.py's pull-through cache part: an image of random layers held by CNCF Distribution
(Debian's docker-registry) is pulled as containerd would (manifest, then every blob in parallel,
one connection each, sha256 checked) directly from Distribution, through a cold Lighter (fresh
data directory, `--upstream docker.io=<Distribution>`), through the same Lighter warm, and from
nginx serving the same files; then (--mirror-upstream-mbit) direct and cold again with
Distribution's sending limited by tc. `run` measures, `report` writes its section.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import Failure, MiB, log
from .images import BIG_REPO, BIG_TAG, UPSTREAM_NAME, Image, let_nginx_read, write_image
from .procs import busy_and_steal, cpu_seconds, machine_cpu, stop, tree
from .registry import fetch_blob, fetch_manifest, push_image
from .report import fmt_ms, ratio_cell, spread
from .servers import Started, access_since, distribution_version, start_distribution

MIRROR_UPSTREAM, MIRROR_REPO, MIRROR_TAG = UPSTREAM_NAME, BIG_REPO, BIG_TAG
MIRRORED = f"{MIRROR_UPSTREAM}/{MIRROR_REPO}"  # the repository as Lighter and nginx serve it
IMAGE_SEED = 20240602  # fixed: the same digests every run with the same sizes


def pull_image(
    port: int, repo: str, image: Image, pool: ThreadPoolExecutor
) -> tuple[int, float, float]:
    """A full pull as containerd does it: the manifest by tag, then the config and every layer
    in parallel, one connection each. Returns the bytes received, the seconds the manifest took
    and the longest last-byte wait of a blob; raises Failure on any difference from `image`."""
    t0 = time.perf_counter()
    body = fetch_manifest("127.0.0.1", port, repo, MIRROR_TAG, image.manifest_digest)
    manifest_s = time.perf_counter() - t0
    m = json.loads(body)
    descs = [m["config"]] + m["layers"]
    futures = [pool.submit(fetch_blob, "127.0.0.1", port, repo, d["digest"], d["size"])
               for d in descs]
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


def timed_pull(port: int, repo: str, image: Image, pool,
               servers: dict[str, list[int]]) -> Pull:
    """One pull, with the CPU each server (name -> its pids), this script and the rest of the
    machine spent meanwhile (/proc counts in clock ticks: 10 ms)."""
    cpu0, m0 = {k: cpu_seconds(v) for k, v in servers.items()}, busy_and_steal(machine_cpu())
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    n, manifest_s, last_wait = pull_image(port, repo, image, pool)
    t = time.perf_counter() - t0
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu1, m1 = {k: cpu_seconds(v) for k, v in servers.items()}, busy_and_steal(machine_cpu())
    client = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    by = {k: cpu1[k] - cpu0[k] for k in servers}
    server = sum(by.values())
    other = max(0.0, (m1[0] - m0[0]) - server - client)
    return Pull(t, n, manifest_s, last_wait, server, by, client, other, m1[1] - m0[1])


CASES = ("direct", "cold", "warm", "nginx")
LABELS = {
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


def floor_costs(image: Image, blobs_dir: Path, work: Path, repeat: int) -> dict:
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


def case_target(case: str, dist: Started, lighter: Started | None,
                nginx: Started | None) -> tuple[int, str, dict[str, list[int]]]:
    """Where a case pulls from: (port, repository, the pids of every server involved by name)."""
    if case == "direct":
        return dist.port, MIRROR_REPO, {"Distribution": tree(dist.proc.pid)}
    if case == "nginx":
        return nginx.port, MIRRORED, {"nginx": tree(nginx.proc.pid)}
    if case == "cold":
        return lighter.port, MIRRORED, {"Lighter": tree(lighter.proc.pid),
                                        "Distribution": tree(dist.proc.pid)}
    return lighter.port, MIRRORED, {"Lighter": tree(lighter.proc.pid)}


def run(args, work: Path, nginx: Started, nginx_root: Path, start_lighter) -> dict:
    """The pull-through cache benchmark; returns its numbers (see report).
    `start_lighter(data_dir, name, extra_args)` starts a Lighter as the wrk part does."""
    res: dict = dict(runs={c: [] for c in CASES}, upstream=[], warm_upstream=[],
                     problems=[])
    dist: Started | None = None
    lighter: Started | None = None
    pool = ThreadPoolExecutor(max_workers=args.mirror_layers + 1, thread_name_prefix="pull")
    try:
        log("mirror: starting docker-registry (CNCF Distribution) as the upstream")
        dist, access = start_distribution(work)
        res["distribution"] = distribution_version()
        log(f"mirror: {args.mirror_layers} random layers of {args.mirror_layer_mib} MiB, "
            f"pushed to Distribution as {MIRROR_REPO}:{MIRROR_TAG} and copied into nginx's root")
        blobs_dir = nginx_root / "v2" / MIRRORED / "blobs"
        t = time.perf_counter()
        image = write_image(blobs_dir, [args.mirror_layer_mib * MiB] * args.mirror_layers,
                            IMAGE_SEED)
        manifests = nginx_root / "v2" / MIRRORED / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        (manifests / MIRROR_TAG).write_bytes(image.manifest)
        let_nginx_read(nginx_root)
        push_image(dist.port, MIRROR_REPO, MIRROR_TAG, image, blobs_dir)
        log(f"  seeded in {time.perf_counter() - t:.1f} s")
        res["image"] = dict(layers=len(image.layers), layer_bytes=image.layers[0][1],
                            config_bytes=image.blobs[0][1], manifest_bytes=len(image.manifest),
                            pull_bytes=image.pull_bytes, manifest_digest=image.manifest_digest)
        layer_paths = {f"/v2/{MIRROR_REPO}/blobs/{d}": f"layer {i + 1}"
                       for i, (d, _) in enumerate(image.layers)}
        layer_paths[f"/v2/{MIRROR_REPO}/blobs/{image.config_digest}"] = "config"

        res["floor"] = floor_costs(image, blobs_dir, work, args.repeat)
        # Untimed: checks both baselines answer the image, starts the pool's threads.
        pull_image(dist.port, MIRROR_REPO, image, pool)
        pull_image(nginx.port, MIRRORED, image, pool)
        log("  direct and nginx pulls: same manifest, same blobs")

        upstream_arg = f"{MIRROR_UPSTREAM}=http://127.0.0.1:{dist.port}"
        total = args.repeat * len(CASES)
        k = 0
        for rep in range(args.repeat):
            # Each baseline runs next to the Lighter case it is compared with, the order
            # alternating: direct, cold, warm, nginx / cold, direct, nginx, warm.
            order = (("direct", "cold", "warm", "nginx") if rep % 2 == 0
                     else ("cold", "direct", "nginx", "warm"))
            data = work / f"mirror-data-{rep}"
            lighter = start_lighter(data, f"mirror-{rep}", ["--upstream", upstream_arg])
            time.sleep(0.2)
            for case in order:
                k += 1
                port, repo, servers = case_target(case, dist, lighter, nginx)
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
            lighter = run_shaped(args, work, res, dist, access, image, pool, upstream_arg,
                                 layer_paths, start_lighter)
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


def run_shaped(args, work, res, dist, access, image, pool, upstream_arg, layer_paths,
               start_lighter):
    """Direct and cold pulls again with Distribution's sending limited to
    --mirror-upstream-mbit (see Shaper); fills res["shaped"]. Returns None (Lighter stopped)."""
    shaped = dict(mbit=args.mirror_upstream_mbit, runs={"direct": [], "cold": []},
                  upstream=[], error=None)
    res["shaped"] = shaped
    lighter = None
    log(f"mirror: upstream limited to {args.mirror_upstream_mbit} Mbit/s (tc htb on loopback)")
    try:
        with Shaper(dist.port, args.mirror_upstream_mbit):
            for rep in range(args.repeat):
                data = work / f"mirror-shaped-{rep}"
                lighter = start_lighter(data, f"mirror-shaped-{rep}", ["--upstream", upstream_arg])
                time.sleep(0.2)
                for case in (("direct", "cold") if rep % 2 == 0 else ("cold", "direct")):
                    port, repo, servers = case_target(case, dist, lighter, None)
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


def report(res: dict, args) -> tuple[list[str], list[str]]:
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
    best = {c: min(p.seconds for p in runs[c]) for c in CASES if runs[c]}
    ratios = {}
    for c in CASES:
        rs = runs[c]
        if not rs:
            lines.append(f"| {LABELS[c]} | not run | | | | | | | | | |")
            continue
        ratio_s, target = "", ""
        base = {"cold": "direct", "warm": "nginx"}.get(c)
        if base and runs[base]:
            ratios[c] = best[c] / best[base]
            pairs = [a.seconds / b.seconds for a, b in zip(rs, runs[base])]
            ratio_s = ratio_cell(ratios[c], pairs, base)
            target = "≤ 1.1×" if c == "cold" else "≤ 1.0×"
        fastest = min(rs, key=lambda p: p.seconds)
        other = max((p.other_cpu_s + p.steal_s) / p.seconds for p in rs) * 100
        low = min(rs, key=lambda p: p.server_cpu_s)
        cpu = f"{low.server_cpu_s:.2f} s"
        if len(low.cpu_by_server) > 1:
            cpu += " (" + ", ".join(f"{n} {v:.2f}" for n, v in low.cpu_by_server.items()) + ")"
        lines.append(
            f"| {LABELS[c]} | {best[c]:.3f} s | {spread([p.seconds for p in rs]):.0f}% | "
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
                    ratio_s = ratio_cell(shaped_ratio, pairs, "direct")
                    target = "≤ 1.1×"
                lines.append(
                    f"| {LABELS[c]} | {fastest.seconds:.3f} s |"
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



