"""Processes the benchmarks start, and what /proc says of them and of the machine.

Every process is started by `spawn` in a session of its own, so `stop` can end it and
everything it started without touching anyone else's processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import Failure, log

CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment for every process started here: no proxies (reqwest would send an
    upstream's traffic to one), no LIGHTER_* settings from the caller's shell."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items()
            if k.lower() not in drop and not k.startswith("LIGHTER_")}


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs a short command to its end, its output captured; raises Failure if it fails and
    `check`."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env())
    if check and r.returncode != 0:
        raise Failure(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


def spawn(argv: list[str], log_path: Path, stdout_path: Path | None = None,
          netns: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `argv` (in network namespace `netns`, if given) in a new session, standard input
    closed, standard error and output appended to `log_path` (output to `stdout_path`, if
    given), with `env` added to `child_env()`."""
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    with open(log_path, "ab") as err, open(stdout_path or log_path, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, env={**child_env(), **(env or {})})


# ---------------------------------------------------------------- process trees


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
    """root and its live descendants, sorted."""
    if not Path(f"/proc/{root}").exists():
        return []
    kids, out, todo = proc_children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return sorted(out)


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL,
              family: list[int] | None = None) -> None:
    """Sends `sig` to a process started here, its process group (a session of its own) and
    every descendant, by pid (plus `family`: pids seen in its tree earlier, which may have been
    orphaned since)."""
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


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """`sig` (nginx: SIGQUIT), then after `grace` seconds SIGKILL to the whole tree; reaps it."""
    if proc is None:
        return
    family = tree(proc.pid)  # before: a child may outlive its parent and be orphaned
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    deadline = time.monotonic() + grace
    while any(alive(p) for p in family if p != proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the children finishing their own shutdown
    left = [p for p in family if p != proc.pid and alive(p)]
    if left:
        log(f"  note: pid(s) {left} still running {grace:.0f} s after their parent {proc.pid} "
            f"got {signal.Signals(sig).name}; SIGKILL")
    kill_tree(proc, family=left)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"  note: pid {proc.pid} did not exit after SIGKILL")


# ---------------------------------------------------------------- CPU


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds of `pids` (the ones still alive), in 1/CLK_TCK ticks."""
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


def busy_and_steal(cpu: dict[str, float]) -> tuple[float, float]:
    """(busy, steal) of a machine_cpu() reading: busy is user+nice+system (irq and softirq are
    left out: the kernel may charge our own loopback traffic there); steal is time the
    hypervisor gave to someone else."""
    return cpu["user"] + cpu["nice"] + cpu["system"], cpu.get("steal", 0.0)


# ---------------------------------------------------------------- memory, sockets, disk


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, Threads of `pid` (kB except Threads)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def rss_kb(root: int) -> int:
    """RSS of `root` and its descendants, kB."""
    return sum(status(p).get("VmRSS", 0) for p in tree(root))


def cmdline(pid: int) -> str:
    """`pid`'s command line, its program's base name first, cut at 60 characters."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode(errors="replace") for a in raw if a]
        args[0] = os.path.basename(args[0])
        s = " ".join(args)
        return s if len(s) < 60 else s[:57] + "..."
    except (OSError, IndexError):
        return "?"


def listeners(port: int) -> list[int]:
    """pids holding a listening TCP socket on `port` (any address), via /proc/net/tcp inodes."""
    inodes = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                        pids.add(int(d))
                        break
                except OSError:
                    pass
        except OSError:
            pass
    return sorted(pids)


def rss_snapshot(root_pid: int, port: int) -> dict:
    """Memory of a server: every process of its tree and every process listening on `port`
    (the data plane), and the sums: `listener_rss_kb` (None: nobody listens) and
    `total_rss_kb` (the tree)."""
    fam = tree(root_pid)
    owners = listeners(port)
    procs = []
    for p in sorted(set(fam) | set(owners)):
        st = status(p)
        procs.append(dict(
            pid=p,
            cmd=cmdline(p),
            owns_port=p in owners,
            in_tree=p in fam,
            rss_kb=st.get("VmRSS"),
            hwm_kb=st.get("VmHWM"),
            anon_kb=st.get("RssAnon"),
            threads=st.get("Threads"),
        ))
    return dict(
        procs=procs,
        listener_rss_kb=sum(x["rss_kb"] or 0 for x in procs if x["owns_port"]) if owners else None,
        total_rss_kb=sum(x["rss_kb"] or 0 for x in procs if x["in_tree"]),
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
