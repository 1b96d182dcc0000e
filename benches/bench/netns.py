"""cluster.py's network: every machine of the cluster a network namespace joined to one Linux
bridge by a veth pair, its link limited by tc, the bridge in a namespace of its own ("switch",
bridge netfilter off there, so the host's conntrack never sees the cluster's traffic); the host
reaches the cluster through one more veth (HOST_IP). Only addresses from 198.18.0.0/16 are used
(inside the benchmarking range 198.18.0.0/15); IPv6 is off on every interface made here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import Failure
from .procs import kill_tree, run

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


