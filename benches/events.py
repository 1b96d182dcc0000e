#!/usr/bin/env python3
"""The event log's cost on the pull path, measured (issue 14): in one invocation, two Lighters
serve the same image, one with the event log on (the default: every pull recorded in its core's
ring, drained by the control plane into the log) and one with it off (`events_ring_records =
0`: no record, the data plane's counters still kept, so the difference is the log's alone).
wrk drives manifest and 4 KiB blob GETs of both, alternating, `--repeat` times; the report
gives the on/off ratio (target >= 0.97) with the pairwise spread, the CPU per request, and the
events the log holds after the runs (every request of the "on" runs, none dropped, or the count
of those dropped).

    python3 benches/events.py [--duration 6] [--repeat 3] [--connections 64] [--server-cores N]
                              [--pipeline N] [--no-build]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Failure, log  # noqa: E402
from bench import procs, report, servers, wrk  # noqa: E402
from bench.images import OCI_MANIFEST, SEED_REPO, SEED_TAG, make_seed  # noqa: E402
from bench.registry import push_seed, request  # noqa: E402


def metrics(port: int) -> dict[str, float]:
    st, body, _ = request(port, "GET", "/v2/_lighter/metrics", None)
    if st != 200:
        raise Failure(f"metrics: {st}")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="benches/events.py")
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--server-cores", type=int, default=0,
                    help="data plane threads of both Lighters (default: every CPU; 1 on a "
                         "2-core machine leaves wrk a core, as loadtest.py's --server-cores 1)")
    ap.add_argument("--pipeline", type=int, default=1,
                    help="requests wrk sends at once on each connection (default 1); with "
                         "--server-cores 1 and 16, the data plane's core, not wrk, sets the rate, "
                         "so the ratio is the pull path's own cost of the log")
    ap.add_argument("--no-build", action="store_true", help="use the release binary as it is")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary; skips cargo build")
    args = ap.parse_args()
    servers.ensure_tools(False, False)
    binary = servers.lighter_binary(args.lighter_bin, not args.no_build)
    head = report.machine()
    for h in head:
        log(h)
    work = Path(tempfile.mkdtemp(prefix="lighter-events-"))
    started: list[servers.Started] = []
    try:
        seed = make_seed()
        sides = {}
        for name, extra in [("on", []), ("off", ["--events-ring-records", "0"])]:
            port = procs.free_port()
            s = servers.start_lighter(
                binary, port, work / f"lighter-{name}.log",
                ["--listen", f"127.0.0.1:{port}", "--data-dir", str(work / f"data-{name}"),
                 *(["--cores", str(args.server_cores)] if args.server_cores else []), *extra])
            started.append(s)
            push_seed(port, SEED_REPO, SEED_TAG, seed)
            sides[name] = s
        cases = [
            ("manifest", f"/v2/{SEED_REPO}/manifests/{SEED_TAG}", [f"Accept: {OCI_MANIFEST}"]),
            ("blob-4KiB", f"/v2/{SEED_REPO}/blobs/{seed.digests['4KiB']}", []),
        ]
        def data_plane(s: servers.Started) -> int:
            for pid in procs.tree(s.proc.pid):
                try:
                    if b"data-plane" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
                except OSError:
                    pass
            raise Failure("no data plane process")

        dps = {side: data_plane(s) for side, s in sides.items()}
        # The data plane's own CPU per request of each run: the pull path's cost of the log,
        # apart from the drain's (which runs in the control plane, on idle CPU time).
        dp_us: dict[tuple[str, str], list[float]] = {}
        rows = []
        served_on = 0
        for name, path, hs in cases:
            on, off = [], []
            for i in range(args.repeat):
                order = [("on", on), ("off", off)]
                for side, runs in order if i % 2 == 0 else order[::-1]:
                    s = sides[side]
                    c0 = procs.cpu_seconds([dps[side]])
                    runs.append(wrk.run(f"http://127.0.0.1:{s.port}{path}", hs,
                                        args.connections, 1, args.duration,
                                        lambda s=s: procs.tree(s.proc.pid), args.pipeline))
                    used = procs.cpu_seconds([dps[side]]) - c0
                    dp_us.setdefault((name, side), []).append(
                        used / max(runs[-1].requests, 1) * 1e6)
                log(f"  {name} run {i + 1}: on {on[-1].rps:,.0f} req/s, "
                    f"off {off[-1].rps:,.0f} req/s")
            if any(r.errors for r in on + off):
                raise Failure(f"{name}: wrk saw errors")
            served_on += sum(r.requests for r in on)
            rows.append((name, on, off))
        time.sleep(1)  # a drain or four
        m = metrics(sides["on"].port)
        logged = int(m.get("lighter_events_logged_total", 0))
        dropped = int(m.get("lighter_events_dropped_total", 0))
        log_bytes = sum(f.stat().st_size for f in (work / "data-on" / "events").glob("*.jsonl"))
    finally:
        for s in started:
            procs.stop(s.proc, grace=5)

    print("## Event log on against off")
    print()
    for h in head:
        print(f"- {h}")
    pipelined = f", {args.pipeline} requests pipelined" if args.pipeline > 1 else ""
    print(f"- wrk -t1 -c{args.connections} -d{args.duration:g}s{pipelined}, {args.repeat} runs "
          "per side, alternating; " + (f"{args.server_cores} data plane thread(s) each"
                             if args.server_cores else "both servers on all cores"))
    print()
    print("\n".join(report.ratio_table("Pulls, event log on against off", rows, "on", "off")))
    for name, on, off in rows:
        other = lambda runs: statistics.median(r.other_cpu_s / r.seconds * 100 for r in runs)  # noqa: E731
        print(f"{name}: CPU of everything else on the machine (the kernel's writeback of the log "
              f"among it), median run: on {other(on):.1f} %, off {other(off):.1f} % of a core.")
    print()
    print("Data plane CPU per request (the pull path's own cost of the log; the drain's is the "
          "control plane's), lowest and median run:")
    print()
    print("| workload | on µs/req | off µs/req | on − off |")
    print("|---|---:|---:|---:|")
    for name, _, _ in rows:
        on_us, off_us = sorted(dp_us[(name, "on")]), sorted(dp_us[(name, "off")])
        med = lambda v: v[len(v) // 2]  # noqa: E731
        print(f"| {name} | {on_us[0]:.2f} / {med(on_us):.2f} | {off_us[0]:.2f} / {med(off_us):.2f}"
              f" | {on_us[0] - off_us[0]:+.2f} / {med(on_us) - med(off_us):+.2f} |")
    print()
    print(f"Events logged: {logged:,} (requests served with the log on, warm-ups and checks "
          f"excluded: {served_on:,}); dropped: {dropped:,}; log on disk: "
          f"{log_bytes / 1048576:.1f} MiB ({log_bytes / max(logged, 1):.0f} bytes an event).")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"events benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
