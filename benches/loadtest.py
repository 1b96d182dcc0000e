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
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Failure, MiB, log, run_main  # noqa: E402
from bench import mirror, procs, report, servers, wrk  # noqa: E402
from bench.images import (OCI_MANIFEST, SEED_REPO, SEED_TAG, Seed,  # noqa: E402
                          lay_out_for_nginx, make_seed, sha256)
from bench.registry import curl_get, push_seed  # noqa: E402
from bench.report import cell, fmt_kib, fmt_ms, fmt_rps, ratio_cell  # noqa: E402

REPO, TAG = SEED_REPO, SEED_TAG
RANGE_START, RANGE_END = 65536, 131071  # 64 KiB, inclusive, of the 64 MiB blob


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    path: str
    headers: list[str]
    status: int
    body: bytes
    connections: int
    # What `bound` sends: the bytes offset..offset+len(body) of the file at `path` under nginx's
    # root, with this type.
    offset: int = 0
    content_type: str = "application/octet-stream"


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
            content_type=OCI_MANIFEST,
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
            offset=RANGE_START,
        ),
    ]




def run_wrk(w: Workload, port: int, threads: int, seconds: float, server_pids,
            pipeline: int = 1) -> wrk.Run:
    return wrk.run(f"http://127.0.0.1:{port}{w.path}", w.headers, w.connections, threads,
                   seconds, server_pids, pipeline)


# ---------------------------------------------------------------- report

# The servers, in the order of the first repetition (each later one starts one further on).
SIDES = ("lighter", "nginx", "bound")


def report_table(ws: list[Workload], results: dict, args) -> tuple[list[str], dict]:
    lines = [
        "| workload | conns | Lighter req/s | nginx req/s | Lighter/nginx | Lighter MiB/s | "
        "nginx MiB/s | Lighter p99 | nginx p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}

    def p99(runs: list[wrk.Run]) -> str:
        # wrk times a pipelined batch, not a request: no p99 to compare.
        return fmt_ms(min(r.p99_ms for r in runs)) if args.pipeline == 1 else "-"

    for w in ws:
        lr, nr = results.get((w.name, "lighter"), []), results.get((w.name, "nginx"), [])
        if not lr or not nr:
            lines.append(f"| {w.name} | {w.connections} | not run | not run | | | | | |")
            continue
        best_l, best_n = max(r.rps for r in lr), max(r.rps for r in nr)
        ratio = best_l / best_n if best_n else float("nan")
        pairs = [a.rps / b.rps for a, b in zip(lr, nr) if b.rps]
        ratios[w.name] = ratio
        ratio_s = ratio_cell(ratio, pairs)
        lines.append(
            f"| {w.name} | {w.connections} | {cell(lr)} | {cell(nr)} | {ratio_s} | "
            f"{max(r.bytes_per_s for r in lr) / MiB:,.1f} | "
            f"{max(r.bytes_per_s for r in nr) / MiB:,.1f} | "
            f"{p99(lr)} | {p99(nr)} |"
        )
    return lines, ratios


def report_bound(ws: list[Workload], results: dict) -> list[str]:
    """The ceiling: what `bound` (a sendfile server that parses nothing) reached, as a ratio to
    nginx (the most any sendfile server can reach here) and Lighter's share of it."""
    lines = [
        "| workload | bound req/s | bound/nginx (the ceiling) | Lighter/bound | "
        "bound CPU µs/req | wrk CPU vs bound |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w in ws:
        lr, nr, br = (results.get((w.name, s), []) for s in SIDES)
        if not lr or not nr or not br:
            continue
        best_l, best_n, best_b = (max(r.rps for r in rs) for rs in (lr, nr, br))
        bn = [b.rps / n.rps for b, n in zip(br, nr) if n.rps]
        lb = [a.rps / b.rps for a, b in zip(lr, br) if b.rps]
        us = [r.server_cpu_s / r.requests * 1e6 for r in br if r.requests]
        lines.append(
            f"| {w.name} | {cell(br)} | {ratio_cell(best_b / best_n, bn)} | "
            f"{ratio_cell(best_l / best_b, lb)} | {min(us):,.1f} | "
            f"{max(r.wrk_cpu_s / r.seconds for r in br) * 100:.0f}% |"
        )
    return lines


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

        def wrk_share(runs):
            return f"{max(r.wrk_cpu_s / r.seconds for r in runs) * 100:.0f}%"

        other = max(r.other_cpu_s / r.seconds for r in lr + nr) * 100
        steal = max(r.steal_s / r.seconds for r in lr + nr) * 100
        lines.append(
            f"| {w.name} | {us(lr)} | {us(nr)} | {wrk_share(lr)} | {wrk_share(nr)} | {other:.0f}% | "
            f"{steal:.0f}% |"
        )
    return lines



# ---------------------------------------------------------------- main



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
    ap.add_argument("--pipeline", type=int, default=1,
                    help="requests wrk sends at once on each connection (default 1). With one "
                         "core each, wrk's CPU per request sets the rate of small GETs; at 16 the "
                         "servers do (TechEmpower's plaintext method). Clients that pull images "
                         "do not pipeline: this measures what a core can serve")
    ap.add_argument("--server-cores", type=int, default=None,
                    help="server threads on both sides: Lighter --cores and nginx worker_processes "
                         "(default: every CPU; on a 2-core machine shared with wrk, 1 is the fair "
                         "comparison: pinned threads cannot move off wrk's core)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per workload and server (default 3)")
    ap.add_argument("--lighter-arg", action="append", default=[], metavar="ARG",
                    help="an extra `lighter serve` argument (repeatable), e.g. "
                         "--lighter-arg=--events-ring-records --lighter-arg=0 to compare "
                         "with nginx's access_log off like for like")
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
    ap.add_argument("--no-bound", action="store_true",
                    help="skip the ceiling: benches/src/bin/bound.rs, a sendfile server that "
                         "parses nothing and answers each workload's bytes with the least a "
                         "response can carry, run like the other two; bound/nginx is the most "
                         "any sendfile server can reach over nginx on this machine")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary; skips cargo build")
    ap.add_argument("--no-build", action="store_true", help="use target/release/lighter as it is")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = ap.parse_args()
    if min(args.repeat, args.connections, args.big_connections, args.threads, args.pipeline) < 1:
        ap.error("--repeat, --connections, --big-connections, --threads and --pipeline must be "
                 ">= 1")
    if args.threads > min(args.connections, args.big_connections):
        ap.error("wrk needs at least as many connections as threads")
    if min(args.mirror_layers, args.mirror_layer_mib) < 1:
        ap.error("--mirror-layers and --mirror-layer-mib must be >= 1")

    began = time.monotonic()
    nginx_bin = servers.ensure_tools(args.no_install, not args.no_mirror)
    binary = servers.lighter_binary(args.lighter_bin, not args.no_build)
    bound_bin = None if args.no_bound else servers.bound_binary(not args.no_build)

    head = report.machine()
    for h in head:
        log(h)

    work = Path(tempfile.mkdtemp(prefix="lighter-loadtest-"))
    lighter: servers.Started | None = None
    nginx: servers.Started | None = None
    bounds: dict[str, servers.Started] = {}  # workload name -> its `bound`
    starts: list[tuple[str, float, float | None]] = []
    results: dict[tuple[str, str], list[wrk.Run]] = {}
    rss: dict[str, dict] = {}
    nginx_rss: dict[str, int] = {}
    problems: list[str] = []
    mirrored: dict | None = None
    cores = ["--cores", str(args.server_cores)] if args.server_cores else []

    def start_lighter(data_dir: Path, name: str, extra: tuple[str, ...] = ()) -> servers.Started:
        port = procs.free_port()
        return servers.start_lighter(
            binary, port, work / f"lighter-{name}.log",
            ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), *cores,
             *args.lighter_arg, *extra])

    try:
        data = work / "lighter"
        # 1. Start on an empty data directory, seed, then restart on the seeded one (--repeat
        #    times) to time the first 200 after start.
        log("starting lighter (empty data directory)")
        lighter = start_lighter(data, "0")
        starts.append(("empty data dir", lighter.first_200_ms, lighter.listening_line_ms))
        time.sleep(0.3)
        rss["at start, empty data dir"] = procs.rss_snapshot(lighter.proc.pid, lighter.port)

        log("seeding bench/app: blobs 4 KiB, 1 MiB, 64 MiB, a config and a manifest tagged latest")
        seed = make_seed()
        t = time.perf_counter()
        push_seed(lighter.port, REPO, TAG, seed)
        log(f"  seeded lighter in {time.perf_counter() - t:.2f} s")
        root = work / "nginx-root"
        lay_out_for_nginx(root, REPO, TAG, seed)

        for i in range(args.repeat):
            procs.stop(lighter.proc)
            lighter = start_lighter(data, str(i + 1))
            starts.append((f"seeded data dir, start {i + 1}", lighter.first_200_ms,
                           lighter.listening_line_ms))
        log("  first 200 after start: " + ", ".join(f"{ms:.1f} ms" for _, ms, _ in starts))
        time.sleep(0.5)
        rss["idle (seeded, before load)"] = procs.rss_snapshot(lighter.proc.pid, lighter.port)
        if lighter.listening_fields:
            head[1] += f", data plane {lighter.listening_fields}"

        log("starting nginx")
        nginx = servers.start_nginx(nginx_bin, root, work, [REPO, mirror.MIRRORED],
                                    workers=args.server_cores, nopush=args.pipeline == 1)
        nginx_rss["idle"] = procs.rss_kb(nginx.proc.pid)

        ws = workloads(seed, args.connections, args.big_connections)
        if args.workloads:
            wanted = [x.strip() for x in args.workloads.split(",")]
            wanted = [x for x in wanted if x and x != "none"]
            unknown = set(wanted) - {w.name for w in ws}
            if unknown:
                raise Failure(f"unknown workloads {sorted(unknown)}; have {[w.name for w in ws]}")
            ws = [w for w in ws if w.name in wanted]

        if bound_bin:
            log("starting bound, the ceiling: one per workload")
            for w in ws:
                bounds[w.name] = servers.start_bound(
                    bound_bin, root / w.path.lstrip("/"), work / f"bound-{w.name}.log",
                    threads=args.server_cores or os.cpu_count() or 1, offset=w.offset,
                    length=len(w.body), status=w.status, content_type=w.content_type)

        def server(w: Workload, s: str) -> servers.Started:
            return bounds[w.name] if s == "bound" else {"lighter": lighter, "nginx": nginx}[s]

        def port(w: Workload, s: str) -> int:
            return server(w, s).port

        sides = [s for s in SIDES if s != "bound" or bounds]
        # 2. Same status and same bytes from every side, once per workload, before any load.
        good = []
        for w in ws:
            want = sha256(w.body).split(":", 1)[1]
            got = {s: curl_get(f"http://127.0.0.1:{port(w, s)}{w.path}", w.headers)
                   for s in sides}
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

        def pids(w: Workload, s: str):
            proc = server(w, s).proc
            return lambda: procs.tree(proc.pid)

        if args.warmup > 0:
            log(f"warm-up: {args.warmup:g} s per workload and server")
            for w in good:
                for s in sides:
                    run_wrk(w, port(w, s), args.threads, args.warmup, pids(w, s), args.pipeline)

        total = len(good) * len(sides) * args.repeat
        n = 0
        est = total * (args.duration + 0.3)
        log(f"measuring: {total} wrk runs of {args.duration:g} s, about {est / 60:.1f} min")
        for rep in range(args.repeat):
            for w in good:
                k = rep % len(sides)
                for s in sides[k:] + sides[:k]:
                    n += 1
                    r = run_wrk(w, port(w, s), args.threads, args.duration, pids(w, s),
                                args.pipeline)
                    results.setdefault((w.name, s), []).append(r)
                    err = f", {r.errors} ERRORS" if r.errors else ""
                    busy = (r.other_cpu_s + r.steal_s) / r.seconds * 100
                    err += f"  (other CPU {busy:.0f}%)" if busy > 10 else ""
                    log(
                        f"  [{n}/{total}] {w.name:<12} {s:<7} {fmt_rps(r.rps):>9} req/s "
                        f"{r.bytes_per_s / MiB:9.1f} MiB/s  p99 {fmt_ms(r.p99_ms)}{err}"
                    )
        rss["after load"] = procs.rss_snapshot(lighter.proc.pid, lighter.port)
        nginx_rss["after load"] = procs.rss_kb(nginx.proc.pid)
        if lighter.proc.poll() is not None:
            problems.append(f"lighter exited with {lighter.proc.returncode} during the run")

        # 3. The pull-through cache: Distribution directly, Lighter cold and warm, nginx.
        if not args.no_mirror:
            try:
                mirrored = mirror.run(args, work, nginx, root, start_lighter)
                problems += mirrored["problems"]
            except Failure as e:
                problems.append(f"mirror part not finished: {e}")
                log(f"  FAILED {problems[-1]}")

        # 4. Report.
        out = ["## Lighter vs nginx load test", ""]
        out += [f"- {h}" for h in head]
        out.append(
            f"- wrk -t{args.threads} -c{args.connections} (blob-64MiB: -c{args.big_connections}) "
            f"-d{args.duration:g}s --latency"
            + (f", {args.pipeline} requests pipelined a connection" if args.pipeline > 1 else "")
            + f", {args.repeat} runs per side interleaved, "
            f"{args.warmup:g} s warm-up; "
            f"nginx {servers.nginx_summary(args.server_cores, args.pipeline == 1)}"
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
        if bounds and ws:
            out += [
                "",
                "The ceiling: `bound` (benches/src/bin/bound.rs) parses nothing and answers every"
                " request with the workload's bytes and the least a head can carry (a body up to"
                " 16 KiB from memory in one send, larger ones with sendfile; TCP_NOTSENT_LOWAT 64"
                " KiB, as Lighter's sockets), from as many threads as the servers have. No server sending these bytes with sendfile can spend less"
                " per request, so bound/nginx is the highest ratio to nginx reachable on this"
                " machine with this generator, and Lighter/bound is how close Lighter comes.",
                "",
            ]
            out += report_bound(ws, results)
            out.append("")
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
        if mirrored and mirrored.get("image"):
            section, mirror_targets = mirror.report(mirrored, args)
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
        if mirrored:
            runs += [p for ps in mirrored["runs"].values() for p in ps]
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
                mirror=None if mirrored is None else dict(
                    {k: v for k, v in mirrored.items() if k not in ("runs", "shaped")},
                    runs={c: [vars(p) for p in ps] for c, ps in mirrored["runs"].items()},
                    shaped=None if not mirrored.get("shaped") else dict(
                        {k: v for k, v in mirrored["shaped"].items() if k != "runs"},
                        runs={c: [vars(p) for p in ps]
                              for c, ps in mirrored["shaped"]["runs"].items()},
                    ),
                ),
                problems=problems,
            ), indent=2))
        return 1 if problems else 0
    finally:
        servers.stop_nginx(nginx)
        for b in bounds.values():
            procs.stop(b.proc)
        if lighter:
            procs.stop(lighter.proc)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_main("loadtest", main)
