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

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

KiB, MiB = 1024, 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "/usr/bin/docker-registry"

# Names: every namespace and host interface this script creates starts with PREFIX; leftovers
# with it are removed on start.
PREFIX = "lcb-"
SWITCH_NS = PREFIX + "sw"
HOST_IF = PREFIX + "host"  # the host's end of its veth to the bridge
BRIDGE = "br0"  # inside SWITCH_NS
HOST_IP = "198.18.0.1"
UPSTREAM_IP = "198.18.0.2"
CENTRAL_IP = "198.18.0.3"
PREFIX_LEN = 16  # 198.18.0.0/16: inside the benchmarking range 198.18.0.0/15 (RFC 2544), nothing
# else; 198.19.0.0/16 is left to the cluster tests (controlplane/tests/common/netns.rs)
PORT = 5000

UPSTREAM_NAME = "docker.io"  # the upstream's name in Lighter: /v2/docker.io/bench/big/...
REPO = "bench/big"
TAG = "1.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join([
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
SMALL_LAYERS = (16 * KiB, 256 * KiB, 2 * MiB)
PULL_READ_BYTES = 1 * MiB
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Failure(Exception):
    pass


def child_env() -> dict[str, str]:
    """The environment for every process started here: no proxies (reqwest would send the
    upstream's traffic to one), no LIGHTER_* settings from the caller's shell."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items()
            if k.lower() not in drop and not k.startswith("LIGHTER_")}


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env())
    if check and r.returncode != 0:
        raise Failure(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


# ---------------------------------------------------------------- processes and /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_children() -> dict[int, list[int]]:
    """ppid -> children, for every process."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(root: int) -> list[int]:
    """root and its live descendants."""
    if not Path(f"/proc/{root}").exists():
        return []
    kids, out, todo = proc_children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, by kind, from /proc/stat's first line."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return {n: x / CLK_TCK for n, x in zip(names, v)}


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL,
              family: list[int] | None = None) -> None:
    """Sends `sig` to a process this script started, its process group (a session of its own)
    and every descendant, by pid (plus `family`: pids seen in its tree earlier, which may have
    been orphaned since)."""
    family = sorted(set(tree(proc.pid)) | set(family or []))
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then after `grace` seconds SIGKILL to the whole tree; reaps it."""
    if proc is None:
        return
    family = tree(proc.pid)  # before: a child may outlive its parent and be orphaned
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    deadline = time.monotonic() + grace
    while any(alive(p) for p in family if p != proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the children finishing their own shutdown
    left = [p for p in family if p != proc.pid and alive(p)]
    if left:
        log(f"  note: pid(s) {left} still running {grace:.0f} s after their parent {proc.pid} "
            "got SIGTERM; SIGKILL")
    kill_tree(proc, family=left)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"  note: pid {proc.pid} did not exit after SIGKILL")


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def disk_use(path: Path) -> int:
    """Bytes allocated under `path` (du: st_blocks, hard links counted once)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# ---------------------------------------------------------------- the network

def node_ip(i: int) -> str:
    """Address of node i (0-based): 198.18.1.1, 198.18.1.2, ..., 250 per third octet."""
    return f"198.18.{1 + i // 250}.{1 + i % 250}"


@dataclass
class Endpoint:
    """A machine of the cluster: a namespace with one interface, eth0, joined to the bridge by a
    veth whose other end, named `name`, is a port of the bridge in SWITCH_NS."""
    name: str  # "upstream", "central", "n01", ...
    ip: str

    @property
    def ns(self) -> str:
        return PREFIX + self.name


class Net:
    """The namespaces, the bridge, the veths and the qdiscs, and the byte counters of the
    bridge's ports (read through /proc/<pid>/net/dev of a process kept in SWITCH_NS)."""

    def __init__(self, endpoints: list[Endpoint]):
        self.endpoints = endpoints
        self.holder: subprocess.Popen | None = None

    # -- setup

    def setup(self) -> None:
        cleanup_leftovers()
        add_ns(SWITCH_NS)
        # Bridged frames skip iptables and conntrack in the switch (a setting of this namespace
        # only); the host's own setting is left as it is.
        ns_sh(SWITCH_NS, "for f in /proc/sys/net/bridge/bridge-nf-call-*; do "
                         "[ -w \"$f\" ] && echo 0 > \"$f\"; done; true")
        ip("-n", SWITCH_NS, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
           "forward_delay", "0")
        ip("-n", SWITCH_NS, "link", "set", "dev", BRIDGE, "up")
        # The host's veth: HOST_IF here, "host" on the bridge.
        ip("link", "add", "name", HOST_IF, "type", "veth", "peer", "name", "host", "netns", SWITCH_NS)
        v6 = Path(f"/proc/sys/net/ipv6/conf/{HOST_IF}/disable_ipv6")
        if v6.exists():
            v6.write_text("1")
        ip("addr", "add", f"{HOST_IP}/{PREFIX_LEN}", "dev", HOST_IF)
        ip("link", "set", "dev", HOST_IF, "up")
        ip("-n", SWITCH_NS, "link", "set", "dev", "host", "master", BRIDGE, "up")
        for e in self.endpoints:
            self.add_endpoint(e)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", SWITCH_NS, "sleep", "14400"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while "br0" not in Path(f"/proc/{self.holder.pid}/net/dev").read_text():
            if time.monotonic() > deadline:
                raise Failure("the switch namespace's counter reader did not start")
            time.sleep(0.01)
        self.check_reachable()

    def add_endpoint(self, e: Endpoint) -> None:
        add_ns(e.ns)
        ip("link", "add", "name", e.name, "netns", SWITCH_NS, "type", "veth",
           "peer", "name", "eth0", "netns", e.ns)
        ip("-n", e.ns, "addr", "add", f"{e.ip}/{PREFIX_LEN}", "dev", "eth0")
        ip("-n", e.ns, "link", "set", "dev", "eth0", "up")
        ip("-n", e.ns, "link", "set", "dev", "lo", "up")
        ip("-n", SWITCH_NS, "link", "set", "dev", e.name, "master", BRIDGE, "up")

    def check_reachable(self) -> None:
        """Every endpoint answers a ping from the host (bounded: 2 s each)."""
        for e in self.endpoints:
            r = run(["ping", "-c", "1", "-W", "2", "-I", HOST_IF, e.ip], check=False) \
                if shutil.which("ping") else None
            if r is not None and r.returncode != 0:
                raise Failure(f"{e.name} ({e.ip}) does not answer a ping from the host")

    def shape(self, mbit: dict[str, int]) -> str:
        """Limits every endpoint's link to mbit[name] Mbit/s in both directions: HTB on eth0 in
        its namespace (its uplink) and on its port of the bridge (its downlink), with an fq_codel
        leaf (Linux's default queue) where the kernel has it, else HTB's default pfifo. Returns
        a description of the qdiscs."""
        leaf = "fq_codel"
        for e in self.endpoints:
            rate = f"{mbit[e.name]}mbit"
            for ns, dev in ((e.ns, "eth0"), (SWITCH_NS, e.name)):
                tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
                tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                   "rate", rate, "ceil", rate)
                if leaf == "fq_codel":
                    r = run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1",
                             "handle", "10:", "fq_codel"], check=False)
                    if r.returncode != 0:
                        leaf = "pfifo (no fq_codel in this kernel)"
        return f"HTB, leaf {leaf}"

    # -- counters

    def counters(self) -> dict[str, tuple[int, int]]:
        """port name -> (bytes the endpoint sent, bytes it received), i.e. the bridge port's
        (rx_bytes, tx_bytes): what an endpoint sends arrives on its port and the reverse."""
        if self.holder is None:
            return {}
        out = {}
        for line in Path(f"/proc/{self.holder.pid}/net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            f = rest.split()
            out[name.strip()] = (int(f[0]), int(f[8]))
        return out

    # -- teardown

    def teardown(self) -> None:
        if self.holder is not None:
            kill_tree(self.holder)
            try:
                self.holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.holder = None
        cleanup_leftovers()


def ip(*args: str) -> None:
    run(["ip", *args])


def tc(ns: str, *args: str) -> None:
    run(["tc", "-n", ns, *args])


def ns_sh(ns: str, script: str) -> None:
    run(["ip", "netns", "exec", ns, "sh", "-c", script])


def add_ns(ns: str) -> None:
    ip("netns", "add", ns)
    # No IPv6 (so no link-local addresses) on any interface made in it from now on.
    ns_sh(ns, "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
              "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6")


def cleanup_leftovers() -> None:
    """Removes every namespace named PREFIX* (after SIGKILL to the processes in it: they are
    this script's, from this run or a run that died) and the host's veth; the bridge, the other
    veths and their qdiscs go with the namespaces."""
    r = run(["ip", "netns", "list"], check=False)
    for line in r.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith(PREFIX):
            continue
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            time.sleep(0.05)
        run(["ip", "netns", "del", ns], check=False)
    if Path(f"/sys/class/net/{HOST_IF}").exists():
        run(["ip", "link", "del", HOST_IF], check=False)


# ---------------------------------------------------------------- HTTP from the host

def request(host: str, method: str, path: str, body=None, headers=None, timeout: float = 30):
    c = http.client.HTTPConnection(host, PORT, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def wait_200(host: str, path: str, proc: subprocess.Popen, what: str, deadline_s: float) -> None:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise Failure(f"{what} exited with {proc.returncode} before answering 200")
        try:
            if request(host, "GET", path, timeout=1)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() - t0 > deadline_s:
            raise Failure(f"{what}: no 200 on http://{host}:{PORT}{path} after {deadline_s} s")
        time.sleep(0.02)


def sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- the image and Distribution

@dataclass
class Image:
    blobs: list[tuple[str, int]]  # (digest, size): the config, then the layers
    big: str  # the big layer's digest
    manifest: bytes
    manifest_digest: str

    @property
    def pull_bytes(self) -> int:
        return len(self.manifest) + sum(n for _, n in self.blobs)


def make_image(blobs_dir: Path, layer_mib: int) -> Image:
    """Writes the blobs into `blobs_dir` (named by digest) and builds the OCI manifest: the small
    layers, then the big one, all random (incompressible); a fixed seed, so the same digests
    every run with the same sizes."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(20261125)
    layers = []
    for size in (*SMALL_LAYERS, layer_mib * MiB):
        h, tmp = hashlib.sha256(), blobs_dir / "layer.tmp"
        with open(tmp, "wb") as f:
            left = size
            while left:
                chunk = rnd.randbytes(min(left, 8 * MiB))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = "sha256:" + h.hexdigest()
        tmp.rename(blobs_dir / digest)
        layers.append((digest, size))
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
    }, separators=(",", ":")).encode()
    (blobs_dir / sha256(config)).write_bytes(config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n in layers],
    }, indent=2).encode()
    return Image([(sha256(config), len(config))] + layers, layers[-1][0], manifest,
                 sha256(manifest))


DISTRIBUTION_CONF = """\
# Written by benches/cluster.py: the upstream registry of the cluster benchmark.
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
  addr: {ip}:{port}
  secret: {secret}
"""


def start_distribution(work: Path, ns: str, fresh: bool = True) -> tuple[subprocess.Popen, Path]:
    """`docker-registry serve` in the upstream's namespace; returns it and its access log
    (Apache combined format on stdout, one line per finished request; appended to when
    started again over the same storage, fresh=False)."""
    storage = work / "distribution-storage"
    storage.mkdir(exist_ok=not fresh)
    conf = work / "distribution.yml"
    conf.write_text(DISTRIBUTION_CONF.format(root=storage, ip=UPSTREAM_IP, port=PORT,
                                             secret=os.urandom(16).hex()))
    access = work / "distribution-access.log"
    with open(access, "ab") as out, open(work / "distribution.log", "ab") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, DISTRIBUTION, "serve", str(conf)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            env=child_env())
    try:
        wait_200(UPSTREAM_IP, "/v2/", proc, "docker-registry", 30)
    except Failure:
        stop(proc)
        raise
    return proc, access


def push_image(image: Image, blobs_dir: Path) -> None:
    """Pushes the image to Distribution as REPO:TAG from the host (POST, then PUT ?digest=)."""
    for digest, size in image.blobs:
        st, body, headers = request(UPSTREAM_IP, "POST", f"/v2/{REPO}/blobs/uploads/", b"",
                                    {"Content-Length": "0"})
        loc = {k.lower(): v for k, v in headers.items()}.get("location")
        if st != 202 or not loc:
            raise Failure(f"distribution: opening an upload: {st} {body[:300]!r}")
        u = urllib.parse.urlsplit(loc)
        query = (u.query + "&" if u.query else "") + "digest=" + urllib.parse.quote(digest)
        with open(blobs_dir / digest, "rb") as f:
            st, body, _ = request(UPSTREAM_IP, "PUT", f"{u.path}?{query}", f, {
                "Content-Type": "application/octet-stream", "Content-Length": str(size)},
                timeout=300)
        if st != 201:
            raise Failure(f"distribution: pushing blob {digest}: {st} {body[:300]!r}")
    st, body, _ = request(UPSTREAM_IP, "PUT", f"/v2/{REPO}/manifests/{TAG}", image.manifest, {
        "Content-Type": OCI_MANIFEST, "Content-Length": str(len(image.manifest))})
    if st != 201:
        raise Failure(f"distribution: pushing the manifest: {st} {body[:300]!r}")


ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


def blob_gets(access: Path, offset: int, digest: str) -> int:
    """GETs of blob `digest` Distribution logged after byte `offset` of its access log."""
    with open(access, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return sum(1 for m in map(ACCESS_LINE.search, text.splitlines())
               if m and m.group(1) == "GET" and m.group(2).split("?")[0].endswith(digest))


# ---------------------------------------------------------------- Lighter


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
        out.flush()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", e.ns, str(binary), "serve", "--listen", f"{e.ip}:{PORT}",
             "--data-dir", str(data_dir),
             "--upstream", f"{UPSTREAM_NAME}=http://{UPSTREAM_IP}:{PORT}", *extra],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env=child_env())
    return Lighter(e.name, e.ip, data_dir, proc, logf)


def wait_lighters(ls: list[Lighter], deadline_s: float = 30) -> None:
    for lt in ls:
        try:
            wait_200(lt.ip, "/v2/", lt.proc, f"lighter on {lt.name}", deadline_s)
        except Failure as e:
            tail = lt.log.read_text(errors="replace")[-1500:]
            raise Failure(f"{e}\n--- {lt.log} ---\n{tail}") from None


METRIC_LINE = re.compile(r"^(lighter_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def scrape(lt: Lighter, timeout: float = 5) -> dict[str, float]:
    """The node's `lighter_*` metrics: 'name{labels}' -> value ({} if it cannot be read)."""
    try:
        st, body, _ = request(lt.ip, "GET", "/v2/_lighter/metrics", timeout=timeout)
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


# ---------------------------------------------------------------- the puller (in a node)


def puller_main(argv: list[str]) -> int:
    """`cluster.py _pull`: one node's pull, run in its namespace. Prints "ready", waits for "go"
    on standard input, pulls, prints one line of JSON (times are time.monotonic(), the same clock
    as the parent's)."""
    ap = argparse.ArgumentParser(prog="cluster.py _pull")
    ap.add_argument("--target", required=True, help="HOST/REPO to pull from")
    ap.add_argument("--fallback", help="HOST/REPO to retry a failed request from")
    ap.add_argument("--store", type=Path, help="also write every blob to STORE/blobs/sha256/")
    ap.add_argument("--digest", required=True, help="the manifest's expected digest")
    a = ap.parse_args(argv)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    res: dict = {"t_go": time.monotonic(), "fallbacks": []}
    try:
        pull(a.target, a.fallback, a.store, a.digest, res)
        res["ok"] = True
    except Failure as e:
        res["ok"], res["error"] = False, str(e)
    res["t_done"] = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_s"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(res), flush=True)
    return 0


def split_target(t: str) -> tuple[str, str]:
    host, _, repo = t.partition("/")
    return host, repo


def pull(target: str, fallback: str | None, store: Path | None, digest: str, res: dict) -> None:
    """The manifest by tag, then the config and every layer in parallel, one connection each;
    each request is retried once from `fallback` (if given) when it fails at `target`."""
    def with_fallback(what: str, fn):
        try:
            return fn(target)
        except Failure as e:
            if not fallback:
                raise
            res["fallbacks"].append(f"{what}: {e}")
            return fn(fallback)

    body = with_fallback("manifest", lambda t: get_manifest(t, digest))
    res["t_manifest"] = time.monotonic()
    m = json.loads(body)
    descs = [m["config"]] + m["layers"]
    errors: list[str] = []
    done: dict[str, float] = {}

    def one(d: dict) -> None:
        try:
            with_fallback(d["digest"][:19], lambda t: get_blob(t, d["digest"], d["size"], store))
            done[d["digest"]] = time.monotonic()
        except Failure as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - a thread must report, never die silently
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(d,), daemon=True) for d in descs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["blob_done"] = done
    if errors:
        raise Failure("; ".join(errors))


def get_manifest(target: str, digest: str) -> bytes:
    host, repo = split_target(target)
    path = f"/v2/{repo}/manifests/{TAG}"
    c = http.client.HTTPConnection(host, PORT, timeout=60)
    try:
        c.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        r = c.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET {host}{path}: {type(e).__name__}: {e}") from None
    finally:
        c.close()
    if r.status != 200 or sha256(body) != digest:
        raise Failure(f"GET {host}{path}: {r.status}, {len(body)} bytes {sha256(body)[:19]}…, "
                      f"expected {digest[:19]}…")
    return body


def get_blob(target: str, digest: str, size: int, store: Path | None) -> None:
    """GET of one blob on a connection of its own, read in 1 MiB reads and hashed; written to
    `store` as containerd would (an ingest file, renamed into blobs/sha256/ once verified)."""
    host, repo = split_target(target)
    path = f"/v2/{repo}/blobs/{digest}"
    hexd = digest.split(":", 1)[1]
    out, ingest = None, None
    if store is not None:
        ingest = store / "ingest" / f"{hexd}.data"
        ingest.parent.mkdir(parents=True, exist_ok=True)
        out = open(ingest, "wb")
    c = http.client.HTTPConnection(host, PORT, timeout=60)
    h, n = hashlib.sha256(), 0
    try:
        c.request("GET", path)
        r = c.getresponse()
        if r.status != 200:
            raise Failure(f"GET {host}{path}: {r.status} {r.read(300)!r}")
        buf = memoryview(bytearray(PULL_READ_BYTES))
        while True:
            k = r.readinto(buf)
            if not k:
                break
            h.update(buf[:k])
            if out is not None:
                out.write(buf[:k])
            n += k
    except (OSError, http.client.HTTPException) as e:
        raise Failure(f"GET {host}{path}: after {n} bytes: {type(e).__name__}: {e}") from None
    finally:
        c.close()
        if out is not None:
            out.close()
    if n != size or "sha256:" + h.hexdigest() != digest:
        raise Failure(f"GET {host}{path}: {n} bytes, sha256:{h.hexdigest()[:12]}…; expected "
                      f"{size} bytes of {digest[:19]}…")
    if store is not None and ingest is not None:
        dst = store / "blobs" / "sha256" / hexd
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(ingest, dst)


@dataclass
class PullSpec:
    node: Endpoint
    target: str  # HOST/REPO
    fallback: str | None = None
    store: Path | None = None


class Pullers:
    """N puller processes, one per node, released together."""

    def __init__(self, specs: list[PullSpec], digest: str):
        self.specs, self.digest = specs, digest
        self.procs: list[subprocess.Popen] = []
        self.go_t = 0.0

    def start(self, deadline_s: float = 60) -> None:
        """Starts every puller and waits until each has printed "ready"."""
        for s in self.specs:
            argv = ["ip", "netns", "exec", s.node.ns, sys.executable, "-u", __file__, "_pull",
                    "--target", s.target, "--digest", self.digest]
            if s.fallback:
                argv += ["--fallback", s.fallback]
            if s.store:
                argv += ["--store", str(s.store)]
            self.procs.append(subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, env=child_env()))
        t0 = time.monotonic()
        for s, p in zip(self.specs, self.procs):
            line = read_line(p, t0 + deadline_s - time.monotonic())
            if line != "ready":
                raise Failure(f"puller on {s.node.name} did not get ready: {line!r} "
                              f"{p.stderr.read(2000) if p.poll() is not None else b''!r}")

    def go(self) -> float:
        self.go_t = time.monotonic()
        for p in self.procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        for p in self.procs:
            p.stdin.close()
        return self.go_t

    def wait(self, deadline_s: float, tick=None) -> list[dict]:
        """Each puller's result (None-safe: a puller that died or timed out gets ok=False);
        `tick(seconds since go)` is called about every 50 ms meanwhile."""
        sel = selectors.DefaultSelector()
        bufs = {}
        for i, p in enumerate(self.procs):
            os.set_blocking(p.stdout.fileno(), False)
            sel.register(p.stdout, selectors.EVENT_READ, i)
            bufs[i] = b""
        open_ = set(range(len(self.procs)))
        end = self.go_t + deadline_s
        while open_ and time.monotonic() < end:
            for key, _ in sel.select(timeout=0.05):
                i = key.data
                chunk = os.read(key.fileobj.fileno(), 65536)
                if chunk:
                    bufs[i] += chunk
                else:
                    sel.unregister(key.fileobj)
                    open_.discard(i)
            if tick is not None:
                tick(time.monotonic() - self.go_t)
        sel.close()
        results = []
        for i, (s, p) in enumerate(zip(self.specs, self.procs)):
            if i in open_:
                results.append({"ok": False, "error": f"no result after {deadline_s:.0f} s"})
                continue
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                results.append(json.loads(bufs[i].decode().strip().splitlines()[-1]))
            except (ValueError, IndexError):
                err = p.stderr.read(2000).decode(errors="replace") if p.poll() is not None else ""
                results.append({"ok": False, "error": f"puller exited {p.returncode}: {err}"})
        return results

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                kill_tree(p)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    f.close()
                except (OSError, ValueError):
                    pass


def read_line(p: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=max(0.0, timeout)):
            return "<timeout>"
        return p.stdout.readline().decode(errors="replace").strip()
    finally:
        sel.close()


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
    distribution: subprocess.Popen
    access: Path
    extra: list[str]  # --lighter-arg values
    stall_ms: int
    qdisc: str
    notes: list[str] = field(default_factory=list)


def ensure_distribution(ctx: Ctx, before: str) -> None:
    """Restarts Distribution (same storage) if it is no longer running or answering, and notes
    how it ended: it should never end during a run."""
    rc = ctx.distribution.poll()
    if rc is None:
        try:
            if request(UPSTREAM_IP, "GET", "/v2/", timeout=5)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
    how = "running but not answering" if rc is None else (
        f"killed by signal {-rc}" if rc < 0 else f"exited with {rc}")
    note = f"docker-registry was {how} before {before}; restarted it"
    log(f"  note: {note}")
    ctx.notes.append(note)
    stop(ctx.distribution)
    ctx.distribution, _ = start_distribution(ctx.work, PREFIX + "upstream", fresh=False)


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
    groups["distribution"] = ctx.distribution
    pullers = Pullers(specs, ctx.image.manifest_digest)
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
    logs = ctx.work / "logs"
    if case == "b":
        ls = [start_lighter(ctx.binary, ctx.central, data_root / "central", logs, ctx.extra)]
    elif case in ("c", "kill", "ctrd"):
        peers = [a for e in nodes for a in ("--peer", f"http://{e.ip}:{PORT}")]
        ls = []
        for e in nodes:
            extra = peers + ctx.extra
            if case == "ctrd":
                store = data_root / "containerd" / e.name
                store.mkdir(parents=True)
                extra += ["--containerd-content-dir", str(store)]
            ls.append(start_lighter(ctx.binary, e, data_root / e.name, logs, extra))
    else:
        return []
    try:
        wait_lighters(ls)
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
        "big_layer_gets": blob_gets(ctx.access, access_off, ctx.image.big),
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
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    d = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                       capture_output=True, text=True)
    rev = r.stdout.strip() + (" (with uncommitted changes)" if d.stdout.strip() else "")
    dist = run([DISTRIBUTION, "--version"], check=False).stdout.strip()
    if not binary.exists():
        rev += ", binary not built"
    return [f"machine: {os.cpu_count()} CPUs, {model}, kernel {os.uname().release}, load average "
            f"at start {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
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
    binary = a.lighter_bin or ROOT / "target" / "release" / "lighter"
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
        dist, access = start_distribution(work, upstream.ns)
        image = make_image(work / "image", a.layer_mib)
        push_image(image, work / "image")
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
        stop(ctx.distribution if ctx else dist)
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


def _raise(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_pull":
        sys.exit(puller_main(sys.argv[2:]))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    try:
        sys.exit(main(sys.argv[1:]))
    except Failure as e:
        log(f"cluster: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("cluster: interrupted; removed every namespace and process it started")
        sys.exit(130)
