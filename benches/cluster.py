#!/usr/bin/env python3
"""Cluster benchmark of the node tier: N nodes pull one image at once.

Every node is a network namespace joined to one Linux bridge by a veth pair, its link limited by
tc (HTB, --link-mbit, both directions); CNCF Distribution (Debian's docker-registry) is the
upstream, in a namespace of its own behind a link limited the same way. Only addresses from
198.18.0.0/16 are used (inside the benchmarking range 198.18.0.0/15; IPv6 is off on every
interface this script creates). The bridge lives in
a namespace of its own ("switch", with bridge netfilter off there, so the host's conntrack never
sees the cluster's traffic); the host reaches the cluster through one more veth (198.18.0.1),
used to push the image, to check readiness and to read metrics.

The image: one --layer-mib random (incompressible) layer, three small layers, a config and an OCI
manifest, pushed to Distribution before the links are limited. A pull is what containerd does:
the manifest by tag, then the config and every layer in parallel, one connection each
(http.client, 1 MiB reads, every body's sha256 checked against its digest; a failed check fails
the run). All N pulls start together: N puller processes, one per node (`ip netns exec`), report
ready and are released at once through their standard input.

Cases (--cases, comma-separated; the reference always runs, the ratios need it):
  ref   one node alone, straight from Distribution: the single-node time;
  a     every node straight from Distribution;
  b     every node through ONE central Lighter (one more namespace, same link limit);
  c     the node tier: a Lighter on every node (`--peer` for every node, itself included,
        `--upstream`), each node pulling from its own;
  kill  c, with one peer's whole process tree killed (SIGKILL) mid-run: by default the node
        that fetched the big layer from upstream, once Distribution has sent --kill-at of the
        image; every puller may fall back to Distribution when its own Lighter fails it, as
        containerd falls back to the next host;
  ctrd  c, with --containerd-content-dir: each puller also writes what it pulled into its node's
        simulated containerd content store (blobs/sha256/<hex>), and Lighter's own disk use is
        measured after its dedupe sweep.
Fresh, empty data directories for every run.

Measured per run: the time until the last node is done (from the release), upstream bytes sent
(the bridge end of Distribution's veth), bytes every node sent, the GETs Distribution logged for
the big layer, every Lighter data directory's disk use after the run, the machine's CPU
(/proc/stat) and the CPU of the Lighter processes, of Distribution and of the pullers.

Performance is measured here, never asserted in `cargo test`. Run through benches/cluster.sh,
as root. Python 3.11 standard library only.
"""

from __future__ import annotations

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Failure, KiB, MiB, log, run_main  # noqa: E402
from bench.images import BIG_REPO, BIG_TAG, UPSTREAM_NAME, Image, write_image  # noqa: E402
from bench.netns import (CENTRAL_IP, PORT, PREFIX, SWITCH_NS, UPSTREAM_IP,  # noqa: E402
                         Endpoint, Net, node_ip)
from bench.procs import cpu_seconds, disk_use, kill_tree, machine_cpu, run, stop, tree  # noqa: E402
from bench.report import cpu_model, lighter_rev, load_average  # noqa: E402
from bench.puller import PullSpec, Pullers, puller_main  # noqa: E402
from bench.registry import push_image, request  # noqa: E402
from bench.servers import (DISTRIBUTION, Started, access_since,  # noqa: E402
                           distribution_version, lighter_path, start_distribution,
                           start_lighter as start_server)

REPO, TAG = BIG_REPO, BIG_TAG
SMALL_LAYERS = (16 * KiB, 256 * KiB, 2 * MiB)
IMAGE_SEED = 20261125  # fixed: the same digests every run with the same sizes
PEER_STALL_TIMEOUT_MS_DEFAULT = 3000  # the interface's default of peer_stall_timeout_ms
CASES = ("ref", "a", "b", "c", "kill", "ctrd")
LABELS = {
    "ref": "single node, from upstream",
    "a": "all nodes, from upstream",
    "b": "all nodes, one central Lighter",
    "c": "all nodes, node tier",
    "kill": "node tier, one peer killed",
    "ctrd": "node tier, containerd store mounted",
}



# ---------------------------------------------------------------- the image, Distribution, Lighter


def make_image(blobs_dir: Path, layer_mib: int) -> Image:
    """The small layers, then the big one."""
    return write_image(blobs_dir, [*SMALL_LAYERS, layer_mib * MiB], IMAGE_SEED)


def big_layer(image: Image) -> str:
    return image.layers[-1][0]


def blob_gets(access: Path, offset: int, digest: str) -> int:
    """GETs of blob `digest` Distribution logged after byte `offset` of its access log."""
    return sum(1 for m, path, _ in access_since(access, offset)
               if m == "GET" and path.split("?")[0].endswith(digest))


@dataclass
class Lighter:
    """One `lighter serve` in a namespace."""
    name: str
    ip: str
    data_dir: Path
    proc: subprocess.Popen
    log: Path


def start_lighter(binary: Path, e: Endpoint, data_dir: Path, logs: Path,
                  extra: list[str]) -> Lighter:
    data_dir.mkdir(parents=True)
    logf = logs / f"lighter-{e.name}.log"
    with open(logf, "ab") as out:
        out.write(f"---- {time.strftime('%H:%M:%S')} {' '.join(extra)}\n".encode())
    s = start_server(binary, PORT, logf,
                     ["--listen", f"{e.ip}:{PORT}", "--data-dir", str(data_dir),
                      "--upstream", f"{UPSTREAM_NAME}=http://{UPSTREAM_IP}:{PORT}", *extra],
                     host=e.ip, netns=e.ns)
    return Lighter(e.name, e.ip, data_dir, s.proc, logf)


METRIC_LINE = re.compile(r"^(lighter_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def scrape(lt: Lighter, timeout: float = 5) -> dict[str, float]:
    """The node's `lighter_*` metrics: 'name{labels}' -> value ({} if it cannot be read)."""
    try:
        st, body, _ = request(PORT, "GET", "/v2/_lighter/metrics", host=lt.ip,
                              timeout=timeout)
    except (OSError, http.client.HTTPException):
        return {}
    if st != 200:
        return {}
    out = {}
    for line in body.decode(errors="replace").splitlines():
        m = METRIC_LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wait_peers(ls: list[Lighter], deadline_s: float = 20) -> str:
    """Waits until every node's `lighter_peers` gauge counts every node; returns a note when it
    does not within the deadline or the gauge is missing."""
    t0 = time.monotonic()
    while True:
        seen = [scrape(lt).get("lighter_peers") for lt in ls]
        if all(v is not None and v >= len(ls) for v in seen):
            return ""
        if time.monotonic() - t0 > deadline_s:
            if any(v is None for v in seen):
                return "lighter_peers missing from the metrics of some node"
            return f"lighter_peers after {deadline_s} s: {sorted(set(seen))} (expected {len(ls)})"
        time.sleep(0.2)


def help_lists(binary: Path, flag: str) -> bool:
    r = run([str(binary), "serve", "--help"], check=False)
    return flag in r.stdout



# ---------------------------------------------------------------- one run of one case


@dataclass
class Snapshot:
    dev: dict[str, tuple[int, int]]
    cpu: dict[str, float]
    groups: dict[str, float]  # "lighter:n01", "distribution" -> CPU seconds of that tree


def snapshot(net: Net, groups: dict[str, subprocess.Popen]) -> Snapshot:
    return Snapshot(net.counters(), machine_cpu(),
                    {k: cpu_seconds(tree(p.pid)) for k, p in groups.items()})


@dataclass
class Ctx:
    """What every run needs."""
    args: argparse.Namespace
    binary: Path
    work: Path
    net: Net
    nodes: list[Endpoint]
    central: Endpoint
    image: Image
    distribution: Started
    access: Path
    extra: list[str]  # --lighter-arg values
    stall_ms: int
    qdisc: str
    notes: list[str] = field(default_factory=list)


def ensure_distribution(ctx: Ctx, before: str) -> None:
    """Restarts Distribution (same storage) if it is no longer running or answering, and notes
    how it ended: it should never end during a run."""
    rc = ctx.distribution.proc.poll()
    if rc is None:
        try:
            if request(PORT, "GET", "/v2/", host=UPSTREAM_IP, timeout=5)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
    how = "running but not answering" if rc is None else (
        f"killed by signal {-rc}" if rc < 0 else f"exited with {rc}")
    note = f"docker-registry was {how} before {before}; restarted it"
    log(f"  note: {note}")
    ctx.notes.append(note)
    stop(ctx.distribution.proc)
    ctx.distribution, _ = start_distribution(ctx.work, UPSTREAM_IP, PORT,
                                             netns=PREFIX + "upstream", fresh=False)


def run_case(ctx: Ctx, case: str, rep: int) -> dict:
    """One run of `case`: fresh Lighters (if any), N pulls released together, the numbers."""
    ensure_distribution(ctx, f"run {rep + 1} of {case}")
    nodes = ctx.nodes[:1] if case == "ref" else ctx.nodes
    data_root = ctx.work / "data"
    shutil.rmtree(data_root, ignore_errors=True)
    data_root.mkdir()
    lighters = start_case_lighters(ctx, case, nodes, data_root)
    specs = pull_specs(ctx, case, nodes, data_root)
    groups = {f"lighter:{lt.name}": lt.proc for lt in lighters}
    groups["distribution"] = ctx.distribution.proc
    pullers = Pullers(specs, ctx.image.manifest_digest,
                      [sys.executable, "-u", str(Path(__file__).resolve()), "_pull"])
    out: dict = {"case": case, "rep": rep, "nodes": len(nodes)}
    try:
        if case in ("c", "kill", "ctrd"):
            note = wait_peers(lighters)
            if note:
                out["peer_note"] = note
                log(f"  note: {note}")
        pullers.start()
        access_off = ctx.access.stat().st_size
        s0 = snapshot(ctx.net, groups)
        killer = Killer(ctx, lighters, s0, pullers) if case == "kill" else None
        go = pullers.go()
        results = pullers.wait(run_deadline(ctx, len(nodes)), killer.tick if killer else None)
        s1 = snapshot(ctx.net, groups)
        if killer:
            out["kill"] = killer.report()
            s1.groups.update(killer.cpu_at_kill)
        out.update(measure(ctx, nodes, results, go, s0, s1, access_off))
        out["lighter_cpu_s"] = {k.split(":", 1)[1]: s1.groups.get(k, 0) - s0.groups[k]
                                for k in s0.groups if k.startswith("lighter:")}
        out["distribution_cpu_s"] = s1.groups["distribution"] - s0.groups["distribution"]
        out["metrics"] = sum_metrics([scrape(lt) for lt in lighters
                                      if lt.proc.poll() is None])
        if lighters:
            out["disk"] = {lt.name: disk_use(lt.data_dir) for lt in lighters}
        if case == "ctrd":
            out["disk_after_sweep"], out["sweep_s"] = wait_dedupe(ctx, lighters)
            out["containerd_store"] = {s.node.name: disk_use(s.store) for s in specs}
        victim = out.get("kill", {}).get("killed")
        died = {lt.name: lt.proc.returncode for lt in lighters
                if lt.proc.poll() is not None and lt.name != victim}
        if died:
            out["lighters_died"] = died
            log(f"  note: Lighter(s) ended during the run (exit code; negative: signal): {died}")
    finally:
        pullers.stop()
        for lt in lighters:
            stop(lt.proc)
        if case == "kill" and ctx.args.kill_how == "node":
            for e in nodes:  # the killed node's link back up for the next run
                run(["ip", "-n", e.ns, "link", "set", "dev", "eth0", "up"], check=False)
    return out


def start_case_lighters(ctx: Ctx, case: str, nodes: list[Endpoint],
                        data_root: Path) -> list[Lighter]:
    plan: list[tuple[Endpoint, Path, list[str]]] = []
    if case == "b":
        plan = [(ctx.central, data_root / "central", ctx.extra)]
    elif case in ("c", "kill", "ctrd"):
        peers = [a for e in nodes for a in ("--peer", f"http://{e.ip}:{PORT}")]
        for e in nodes:
            extra = peers + ctx.extra
            if case == "ctrd":
                store = data_root / "containerd" / e.name
                store.mkdir(parents=True)
                extra += ["--containerd-content-dir", str(store)]
            plan.append((e, data_root / e.name, extra))
    ls: list[Lighter] = []
    try:
        for e, data_dir, extra in plan:
            ls.append(start_lighter(ctx.binary, e, data_dir, ctx.work / "logs", extra))
    except BaseException:
        for lt in ls:
            stop(lt.proc)
        raise
    return ls


def pull_specs(ctx: Ctx, case: str, nodes: list[Endpoint], data_root: Path) -> list[PullSpec]:
    upstream = f"{UPSTREAM_IP}/{REPO}"
    if case in ("ref", "a"):
        return [PullSpec(e, upstream) for e in nodes]
    if case == "b":
        return [PullSpec(e, f"{CENTRAL_IP}/{UPSTREAM_NAME}/{REPO}") for e in nodes]
    return [PullSpec(e, f"{e.ip}/{UPSTREAM_NAME}/{REPO}",
                     fallback=upstream if case == "kill" else None,
                     store=data_root / "containerd" / e.name if case == "ctrd" else None)
            for e in nodes]


def run_deadline(ctx: Ctx, n: int) -> float:
    """Seconds a run may take: four times every node's image through one link, plus a minute."""
    bits = n * ctx.image.pull_bytes * 8
    return 60 + 4 * bits / (min(ctx.args.link_mbit, ctx.args.upstream_mbit) * 1e6)


class Killer:
    """The `kill` case: once Distribution has sent --kill-at of the image since the release,
    SIGKILLs the whole process tree of one node's Lighter: the node that fetched the most from
    upstream (the big layer's owner, by the node's metrics), or --kill-node."""

    def __init__(self, ctx: Ctx, lighters: list[Lighter], s0: Snapshot, pullers: Pullers):
        self.ctx, self.lighters, self.s0, self.pullers = ctx, lighters, s0, pullers
        self.threshold = ctx.args.kill_at * ctx.image.pull_bytes
        self.victim: Lighter | None = None
        self.at_s = 0.0
        self.how = ""
        self.cpu_at_kill: dict[str, float] = {}

    def tick(self, since_go: float) -> None:
        if self.victim is not None:
            return
        sent = self.ctx.net.counters()["upstream"][0] - self.s0.dev["upstream"][0]
        if sent < self.threshold:
            return
        self.victim, self.how = self.choose()
        key = f"lighter:{self.victim.name}"
        self.cpu_at_kill[key] = cpu_seconds(tree(self.victim.proc.pid))
        kill_tree(self.victim.proc)
        if self.ctx.args.kill_how == "node":
            # The whole node goes silent: its link down, so peers see no reset, only a stall.
            run(["ip", "-n", PREFIX + self.victim.name, "link", "set", "dev", "eth0", "down"],
                check=False)
            for spec, proc in zip(self.pullers.specs, self.pullers.procs):
                if spec.node.name == self.victim.name:
                    kill_tree(proc)  # the node is gone, its containerd with it
        self.at_s = since_go
        log(f"  kill: SIGKILL to {self.victim.name}'s Lighter ({self.how}) at {since_go:.1f} s")

    def choose(self) -> tuple[Lighter, str]:
        want = self.ctx.args.kill_node
        if want != "owner":
            name = f"n{int(want):02d}"
            return next(lt for lt in self.lighters if lt.name == name), "--kill-node"
        best, best_v = None, -1.0
        for lt in self.lighters:
            v = scrape(lt, timeout=1).get('lighter_blob_fetch_bytes_total{source="upstream"}')
            if v is not None and v > best_v:
                best, best_v = lt, v
        if best is not None and best_v > 0:
            return best, f"most fetched from upstream: {best_v / MiB:.0f} MiB"
        dev = self.ctx.net.counters()
        best = max(self.lighters, key=lambda lt: dev[lt.name][0] - self.s0.dev[lt.name][0])
        return best, "no upstream fetch metric; the node that had sent the most"

    def report(self) -> dict:
        if self.victim is None:
            return {"killed": None}
        return {"killed": self.victim.name, "at_s": self.at_s, "how": self.how,
                "kill_how": self.ctx.args.kill_how}


def measure(ctx: Ctx, nodes: list[Endpoint], results: list[dict], go: float, s0: Snapshot,
            s1: Snapshot, access_off: int) -> dict:
    """Times, bytes and CPU of one run from the pullers' results and the snapshots."""
    done = {}
    errors = {}
    fallbacks = {}
    puller_cpu = 0.0
    for e, r in zip(nodes, results):
        if r.get("ok"):
            done[e.name] = r["t_done"] - go
        else:
            at = f" (at {r['t_done'] - go:.1f} s)" if "t_done" in r else ""
            errors[e.name] = r.get("error", "?") + at
        if r.get("fallbacks"):
            fallbacks[e.name] = r["fallbacks"]
        puller_cpu += r.get("cpu_s", 0.0)
    cpu = {k: s1.cpu[k] - s0.cpu[k] for k in s0.cpu}

    def delta(name: str, i: int) -> int:
        return s1.dev.get(name, (0, 0))[i] - s0.dev.get(name, (0, 0))[i]

    return {
        "ok": not errors,
        "errors": errors,
        "fallbacks": fallbacks,
        "done_s": done,
        "last_s": max(done.values()) if done else 0.0,
        "upstream_sent": delta("upstream", 0),
        "central_sent": delta("central", 0),
        "node_sent": {e.name: delta(e.name, 0) for e in nodes},
        "node_received": {e.name: delta(e.name, 1) for e in nodes},
        "big_layer_gets": blob_gets(ctx.access, access_off, big_layer(ctx.image)),
        "machine_cpu_s": cpu,
        "elapsed_s": sum(cpu.values()) / (os.cpu_count() or 1),
        "puller_cpu_s": puller_cpu,
    }


SUMMED = ("lighter_blob_fetch_bytes_total", "lighter_peer_served_bytes_total",
          "lighter_peer_requests_total", "lighter_peer_fetch_failures_total",
          "lighter_mirror_blob_download_bytes_total", "lighter_mirror_blob_digest_mismatches_total")


def sum_metrics(ms: list[dict[str, float]]) -> dict[str, float]:
    """The node tier's counters summed over the nodes, and `lighter_peers` (a gauge) as its
    smallest value on any node."""
    out: dict[str, float] = {}
    for m in ms:
        for k, v in m.items():
            if k.split("{")[0] in SUMMED:
                out[k] = out.get(k, 0) + v
            elif k == "lighter_peers":
                out["lighter_peers (min over nodes)"] = min(v, out.get(k, v))
    return out


def wait_dedupe(ctx: Ctx, lighters: list[Lighter]) -> tuple[dict[str, int], float | None]:
    """After a ctrd run: polls every node's data directory until none holds more than a tenth of
    the image (Lighter dropped what containerd holds) or --sweep-wait seconds pass; returns the
    last disk use per node and the seconds it took (None: not within the wait)."""
    t0 = time.monotonic()
    limit = ctx.image.pull_bytes / 10
    while True:
        disk = {lt.name: disk_use(lt.data_dir) for lt in lighters}
        if max(disk.values()) <= limit:
            return disk, time.monotonic() - t0
        if time.monotonic() - t0 > ctx.args.sweep_wait:
            return disk, None
        time.sleep(0.5)


# ---------------------------------------------------------------- report


def fmt_s(x: float) -> str:
    return f"{x:.1f} s"


def fmt_mib(b: float) -> str:
    return f"{b / MiB:,.0f} MiB" if b >= 10 * MiB else f"{b / MiB:.2f} MiB"


def spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return "-"
    return f"{(max(xs) - min(xs)) / min(xs) * 100:.0f}%" if min(xs) > 0 else "-"


def mmm(xs: list[float], f) -> str:
    if not xs:
        return "-"
    return f"{f(min(xs))} / {f(statistics.median(xs))} / {f(max(xs))}"


def best_run(runs: list[dict]) -> dict | None:
    ok = ok_runs(runs)
    return min(ok, key=last_time) if ok else None


def survivors_ok(r: dict) -> bool:
    killed = r.get("kill", {}).get("killed")
    return all(n == killed for n in r["errors"])


def last_time(r: dict) -> float:
    """The run's time: the last node done; in `kill`, the last surviving node."""
    killed = r.get("kill", {}).get("killed") if r["case"] == "kill" else None
    ts = [t for n, t in r["done_s"].items() if n != killed]
    return max(ts) if ts else 0.0


def report(ctx: Ctx, runs: dict[str, list[dict]], head: list[str]) -> tuple[list[str], dict]:
    a = ctx.args
    ref = best_run(runs.get("ref", []))
    ref_t = last_time(ref) if ref else None
    L = head + [
        "",
        f"{a.nodes} nodes, every link {a.link_mbit} Mbit/s both ways ({ctx.qdisc}), upstream link "
        f"{a.upstream_mbit} Mbit/s; image: one {a.layer_mib} MiB layer, "
        f"{len(SMALL_LAYERS)} small layers and a config, {fmt_mib(ctx.image.pull_bytes)} in all; "
        f"{a.repeat} run(s) per case, best shown, spread = (worst - best) / best. Times from the "
        "release of all pulls; bytes are Ethernet frames counted on the bridge's ports (a few "
        "percent over the payload).",
        "",
        "| case | last node done | spread | × single node | median node | upstream sent "
        "(× image) | upstream GETs of the big layer | bytes each node sent, min / median / max | "
        "Lighter disk per node, min / median / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict = {"single_node_s": ref_t, "cases": {}}
    for case in [c for c in CASES if c in runs]:
        rs = runs[case]
        b = best_run(rs)
        if b is None:
            L.append(f"| {LABELS[case]} | failed: {first_error(rs)} | | | | | | | |")
            summary["cases"][case] = {"ok": False, "error": first_error(rs)}
            continue
        t = last_time(b)
        times = [last_time(r) for r in rs if r in ok_runs(rs)]
        ratio = f"{t / ref_t:.2f}×" if ref_t else "-"
        up = b["upstream_sent"]
        disk = list(b.get("disk", {}).values())
        L.append(
            f"| {LABELS[case]} | **{fmt_s(t)}** | {spread(times)} | {ratio} | "
            f"{fmt_s(statistics.median(b['done_s'].values()))} | "
            f"{fmt_mib(up)} ({up / ctx.image.pull_bytes:.2f}×) | {b['big_layer_gets']} | "
            f"{mmm(list(b['node_sent'].values()), fmt_mib)} | "
            f"{mmm(disk, fmt_mib) if disk else '-'} |")
        summary["cases"][case] = {"ok": True, "last_s": t, "spread": spread(times),
                                  "ratio": t / ref_t if ref_t else None,
                                  "upstream_sent": up, "big_layer_gets": b["big_layer_gets"]}
    L += cpu_table(ctx, runs)
    L += details(ctx, runs, ref_t, summary)
    return L, summary


def ok_runs(rs: list[dict]) -> list[dict]:
    """The runs that count: every node done (in `kill`, every surviving node)."""
    return [r for r in rs if r["ok"] or (r["case"] == "kill" and survivors_ok(r))]


def first_error(rs: list[dict]) -> str:
    for r in rs:
        for n, e in r.get("errors", {}).items():
            return f"{n}: {e[:200]}"
        if r.get("error"):
            return r["error"][:200]
    return "?"


def cpu_table(ctx: Ctx, runs: dict[str, list[dict]]) -> list[str]:
    ncpu = os.cpu_count() or 1
    L = ["", f"CPU during the best run of each case ({ncpu} CPUs; machine: /proc/stat, busy = "
         "user + nice + system + irq + softirq; softirq is mostly the bridge, the veths and tc; "
         "Lighter: every process of every node's `lighter serve`; pullers: their own getrusage; "
         "rest: user + system time of every other process, e.g. a build sharing the machine):",
         "",
         "| case | wall | machine busy | of which softirq | iowait | steal | Lighter CPU, all "
         "nodes | Lighter CPU, busiest node | Distribution CPU | pullers CPU | rest of the "
         "machine |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in [c for c in CASES if c in runs]:
        b = best_run(runs[case])
        if b is None:
            continue
        c = b["machine_cpu_s"]
        wall = b["elapsed_s"]
        busy = sum(c[k] for k in ("user", "nice", "system", "irq", "softirq"))
        pct = (lambda x: f"{x / (wall * ncpu) * 100:.0f}%") if wall > 0 else (lambda x: "-")
        lcpu = b.get("lighter_cpu_s", {})
        ours = sum(lcpu.values()) + b["distribution_cpu_s"] + b["puller_cpu_s"]
        rest = max(0.0, sum(c[k] for k in ("user", "nice", "system")) - ours)
        L.append(
            f"| {LABELS[case]} | {fmt_s(wall)} | {pct(busy)} | {pct(c['softirq'])} | "
            f"{pct(c['iowait'])} | {pct(c['steal'])} | "
            f"{sum(lcpu.values()):.1f} s | {max(lcpu.values()) if lcpu else 0:.1f} s | "
            f"{b['distribution_cpu_s']:.1f} s | {b['puller_cpu_s']:.1f} s | {rest:.1f} s |")
    return L


def details(ctx: Ctx, runs: dict[str, list[dict]], ref_t: float | None, summary: dict) -> list[str]:
    L = [""]
    c_best = best_run(runs.get("c", []))
    if ref_t and c_best:
        t = last_time(c_best)
        L.append(f"- target for the node tier: last node within 1.5× of the single node "
                 f"({fmt_s(1.5 * ref_t)}): {fmt_s(t)}, **{t / ref_t:.2f}×**, "
                 f"{'met' if t <= 1.5 * ref_t else 'NOT met'}.")
    for r in runs.get("kill", []):
        L.append(kill_line(ctx, r, c_best))
    kb = best_run(runs.get("kill", []))
    if kb and c_best:
        summary["kill_extra_s"] = last_time(kb) - last_time(c_best)
    for case in ("c", "kill", "ctrd"):
        b = best_run(runs.get(case, []))
        if b and b.get("metrics"):
            L.append(f"- Lighter metrics summed over the nodes after {LABELS[case]}: "
                     + metrics_line(b["metrics"]))
        if b and b.get("peer_note"):
            L.append(f"- {LABELS[case]}: {b['peer_note']}")
    L += ctrd_lines(ctx, runs)
    for case, rs in runs.items():
        for r in rs:
            if r.get("fallbacks") and case != "kill":
                L.append(f"- {LABELS[case]}, run {r['rep'] + 1}: fell back: {r['fallbacks']}")
            if r.get("lighters_died"):
                L.append(f"- {LABELS[case]}, run {r['rep'] + 1}: Lighter(s) ended during the "
                         f"run (exit code; negative: signal): {r['lighters_died']}")
            if not r["ok"] and not (case == "kill" and survivors_ok(r)):
                L.append(f"- {LABELS[case]}, run {r['rep'] + 1} FAILED: {first_error([r])}")
    L += [f"- {n}" for n in ctx.notes]
    return L


def kill_line(ctx: Ctx, r: dict, c_best: dict | None) -> str:
    k = r.get("kill", {})
    if not k.get("killed"):
        return f"- kill, run {r['rep'] + 1}: no peer was killed (the pull ended first)"
    victim = k["killed"]
    t = last_time(r)
    what = "Lighter killed" if k.get("kill_how") != "node" else "Lighter killed and link down"
    s = (f"- kill, run {r['rep'] + 1}: {victim}'s {what} at {k['at_s']:.1f} s "
         f"({k['how']}); last surviving node done at {fmt_s(t)}")
    if c_best:
        extra = t - last_time(c_best)
        s += (f", {extra:+.1f} s against the best node-tier run (target: at most "
              f"+{ctx.stall_ms / 1000:.1f} s, peer_stall_timeout_ms: "
              f"{'met' if extra <= ctx.stall_ms / 1000 else 'NOT met'})")
    own = r["done_s"].get(victim)
    if k.get("kill_how") == "node":
        s += "; the killed node is down (its own pull is not counted)"
    elif own is not None:
        s += (f"; the killed node's own pull (falling back to upstream) done at {fmt_s(own)}; "
              "the upstream bytes and GETs of this case include that fallback pull")
    else:
        s += f"; the killed node's own pull failed: {r['errors'].get(victim, '?')[:150]}"
    others = {n: f for n, f in r.get("fallbacks", {}).items() if n != victim}
    if others:
        s += f"; SURVIVORS THAT FELL BACK TO UPSTREAM: {others}"
    return s


def metrics_line(m: dict[str, float]) -> str:
    parts = []
    for k in sorted(m):
        v = m[k]
        is_bytes = k.split("{")[0].endswith("bytes_total")
        parts.append(f"`{k}` {fmt_mib(v) if is_bytes else f'{v:.0f}'}")
    return ", ".join(parts)


def ctrd_lines(ctx: Ctx, runs: dict[str, list[dict]]) -> list[str]:
    if "ctrd" not in runs:
        return [f"- with containerd's content store mounted: {ctx.args.ctrd_note}"] \
            if getattr(ctx.args, "ctrd_note", "") else []
    L = []
    for r in runs["ctrd"]:
        if "disk_after_sweep" not in r:
            continue
        before = list(r["disk"].values())
        after = list(r["disk_after_sweep"].values())
        store = list(r["containerd_store"].values())
        took = (f"within {r['sweep_s']:.1f} s" if r["sweep_s"] is not None
                else f"NOT within {ctx.args.sweep_wait} s")
        L.append(f"- containerd store mounted, run {r['rep'] + 1}: Lighter's data directory per "
                 f"node right after the pull {mmm(before, fmt_mib)}, after its dedupe sweep "
                 f"{mmm(after, fmt_mib)} (below a tenth of the image {took}); the simulated "
                 f"containerd store per node {mmm(store, fmt_mib)}")
    return L


# ---------------------------------------------------------------- main


def machine(binary: Path) -> list[str]:
    rev = lighter_rev()
    dist = distribution_version()
    if not binary.exists():
        rev += ", binary not built"
    return [f"machine: {os.cpu_count()} CPUs, {cpu_model()}, kernel {os.uname().release}, load "
            f"average at start {load_average()}",
            f"lighter: {rev} ({binary}); upstream: {dist or 'docker-registry'}"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benches/cluster.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cluster benchmark of the node tier: N nodes in network namespaces behind "
                    "tc-limited links\npull one image at once. Cases:\n" + "\n".join(
                        f"  {c:5} {LABELS[c]}" for c in CASES),
        epilog="Needs root. With the defaults, a and b move 16 × 128 MiB through one 100 Mbit/s "
               "link\n(about 3 minutes each): about 8 minutes in all.")
    ap.add_argument("--nodes", type=int, default=16, help="nodes (default 16)")
    ap.add_argument("--link-mbit", type=int, default=100,
                    help="every node's link, both directions, Mbit/s (default 100)")
    ap.add_argument("--upstream-mbit", type=int, default=None,
                    help="Distribution's link, Mbit/s (default: --link-mbit)")
    ap.add_argument("--layer-mib", type=int, default=128,
                    help="the big layer's size in MiB (default 128)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per case, interleaved; best and spread shown (default 1)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)} (default all; ref always "
                         "runs: the ratios need it)")
    ap.add_argument("--kill-at", type=float, default=0.5,
                    help="kill: when Distribution has sent this fraction of the image (default "
                         "0.5)")
    ap.add_argument("--kill-node", default="owner",
                    help="kill: 'owner' (the node that fetched the most from upstream) or a node "
                         "number, 1-based (default owner)")
    ap.add_argument("--kill-how", choices=("process", "node"), default="process",
                    help="kill: 'process' SIGKILLs the Lighter's process tree (peers get resets "
                         "at once); 'node' also takes the node's link down (peers get silence: "
                         "the stall timeout; its own pull then fails) (default process)")
    ap.add_argument("--sweep-wait", type=float, default=60,
                    help="ctrd: seconds to wait for Lighter's dedupe sweep (default 60)")
    ap.add_argument("--lighter-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every `lighter serve` (repeatable), e.g. "
                         "--lighter-arg=--peer-fanout-max=2")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where data directories go (default: a new directory in /dev/shm if it "
                         "has room, else in /tmp: on one shared disk, N nodes' writes would meet "
                         "in one queue no real cluster has)")
    ap.add_argument("--lighter-bin", type=Path, help="use this binary (cluster.sh: no build)")
    ap.add_argument("--no-build", action="store_true",
                    help="cluster.sh: use target/release/lighter as it is")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (logs, the last run's data directories)")
    ap.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    a = ap.parse_args(argv)
    a.upstream_mbit = a.upstream_mbit or a.link_mbit
    a.case_list = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in a.case_list if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    if not 1 <= a.nodes <= 1000:
        ap.error("--nodes must be 1..1000")
    if min(a.link_mbit, a.upstream_mbit, a.layer_mib, a.repeat) < 1:
        ap.error("--link-mbit, --upstream-mbit, --layer-mib and --repeat must be >= 1")
    if not 0 < a.kill_at < 1:
        ap.error("--kill-at must be between 0 and 1")
    return a


def work_root(a: argparse.Namespace) -> Path:
    if a.work_dir:
        a.work_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="lighter-cluster-", dir=a.work_dir))
    need = (2 * a.nodes + 4) * (a.layer_mib + 3) * MiB + 512 * MiB
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need:
        return Path(tempfile.mkdtemp(prefix="lighter-cluster-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="lighter-cluster-"))


def check_tools() -> None:
    missing = [t for t in ("ip", "tc") if not shutil.which(t)]
    if not os.path.exists(DISTRIBUTION):
        missing.append("docker-registry")
    if missing:
        raise Failure(f"missing: {' '.join(missing)} (benches/cluster.sh installs them)")
    if os.geteuid() != 0:
        raise Failure("needs root: network namespaces, veths and tc")


def plan_cases(ctx: Ctx) -> list[str]:
    cases = ["ref"] + [c for c in ctx.args.case_list if c != "ref"]
    needs_peer = {"c", "kill", "ctrd"} & set(cases)
    if needs_peer and not help_lists(ctx.binary, "--peer"):
        note = (f"{ctx.binary} serve --help lists no --peer: the node tier is not built yet; "
                f"skipped {', '.join(sorted(needs_peer))}")
        log(f"note: {note}")
        ctx.notes.append(note)
        cases = [c for c in cases if c not in needs_peer]
    if "ctrd" in cases and not help_lists(ctx.binary, "--containerd-content-dir"):
        ctx.args.ctrd_note = "not measured: `lighter serve --help` lists no --containerd-content-dir"
        cases.remove("ctrd")
    elif "ctrd" not in cases:
        ctx.args.ctrd_note = "not measured (not among --cases)"
    return cases


def estimate(ctx: Ctx, cases: list[str]) -> float:
    one = ctx.image.pull_bytes * 8 / (ctx.args.link_mbit * 1e6)
    n = len(ctx.nodes)
    per = {"ref": one, "a": n * one, "b": n * one, "c": 1.3 * one, "kill": 1.3 * one + 3,
           "ctrd": 1.3 * one + 10}
    return ctx.args.repeat * sum(per[c] + 5 for c in cases)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    check_tools()
    binary = a.lighter_bin or lighter_path()
    if set(a.case_list) - {"ref", "a"} and not binary.exists():
        raise Failure(f"{binary} does not exist (build it: cargo build --release -p "
                      "lighter-controlplane)")
    stall_ms = PEER_STALL_TIMEOUT_MS_DEFAULT
    for x in a.lighter_arg:
        if x.startswith("--peer-stall-timeout-ms="):
            stall_ms = int(x.split("=", 1)[1])
    head = machine(binary)
    for h in head:
        log(h)

    work = work_root(a)
    (work / "logs").mkdir()
    nodes = [Endpoint(f"n{i + 1:02d}", node_ip(i)) for i in range(a.nodes)]
    upstream, central = Endpoint("upstream", UPSTREAM_IP), Endpoint("central", CENTRAL_IP)
    net = Net([upstream, central] + nodes)
    dist = None
    ctx: Ctx | None = None
    runs: dict[str, list[dict]] = {}
    try:
        log(f"network: {a.nodes} node namespaces, upstream and central, bridge in {SWITCH_NS}, "
            f"198.18.0.0/16; work directory {work}")
        net.setup()
        log("upstream: docker-registry in its namespace; image pushed from the host")
        dist, access = start_distribution(work, UPSTREAM_IP, PORT, netns=upstream.ns)
        image = make_image(work / "image", a.layer_mib)
        push_image(PORT, REPO, TAG, image, work / "image", host=UPSTREAM_IP)
        shutil.rmtree(work / "image")
        ctx_qdisc = net.shape({e.name: (a.upstream_mbit if e.name == "upstream" else a.link_mbit)
                   for e in net.endpoints})
        ctx = Ctx(a, binary, work, net, nodes, central, image, dist, access, a.lighter_arg,
                  stall_ms, ctx_qdisc)
        cases = plan_cases(ctx)
        log(f"cases {','.join(cases)} × {a.repeat}: about {estimate(ctx, cases) / 60:.0f} min")
        for rep in range(a.repeat):
            for case in cases:
                log(f"run {rep + 1}/{a.repeat}: {case} ({LABELS[case]})")
                try:
                    r = run_case(ctx, case, rep)
                except Failure as e:
                    r = {"case": case, "rep": rep, "ok": False, "error": str(e), "errors": {},
                         "done_s": {}}
                log("  " + run_summary(r))
                runs.setdefault(case, []).append(r)
        lines, summary = report(ctx, runs, head)
        text = "\n".join(lines) + "\n"
        print(text)
        if a.out:
            a.out.write_text(text)
        if a.json:
            a.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(a).items()},
                                          "machine": head, "summary": summary, "runs": runs},
                                         indent=1))
        failed = any(not r["ok"] and not (r["case"] == "kill" and survivors_ok(r))
                     for rs in runs.values() for r in rs)
        return 1 if failed else 0
    finally:
        stop(ctx.distribution.proc if ctx else dist.proc if dist else None)
        net.teardown()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_summary(r: dict) -> str:
    if not r.get("done_s") and not r["ok"]:
        return f"FAILED: {first_error([r])}"
    s = f"last node done at {last_time(r):.1f} s"
    if "upstream_sent" in r:
        s += f", upstream sent {r['upstream_sent'] / MiB:.0f} MiB"
    if r.get("errors"):
        s += f"; errors: {list(r['errors'])}"
    return s


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_pull":
        sys.exit(puller_main(sys.argv[2:]))
    run_main(
        "cluster",
        lambda: main(sys.argv[1:]),
        "removed every namespace and process it started",
    )
