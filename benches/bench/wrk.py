"""One wrk run against one URL, parsed, with the CPU the server, wrk and the rest of the
machine spent meanwhile."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass, field

from . import Failure, KiB, MiB
from .procs import busy_and_steal, cpu_seconds, machine_cpu

UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
UNITS_BYTES = {"B": 1, "KB": KiB, "MB": MiB, "GB": 1024 * MiB, "TB": 1024 * 1024 * MiB}


@dataclass
class Run:
    rps: float
    bytes_per_s: float  # wrk's Transfer/sec (headers included; wrk's units are binary)
    p99_ms: float
    p50_ms: float
    requests: int
    seconds: float
    errors: int  # socket errors + non-2xx/3xx
    server_cpu_s: float
    wrk_cpu_s: float
    other_cpu_s: float  # user+system CPU of everything else on the machine during the run
    steal_s: float
    raw: str = field(repr=False, default="")


def parse(out: str) -> dict:
    """The numbers of wrk's --latency output, in ms, bytes and seconds."""
    def num_unit(s: str, units: dict) -> float:
        m = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", s)
        if not m or m.group(2) not in units:
            raise Failure(f"cannot parse wrk value {s!r}")
        return float(m.group(1)) * units[m.group(2)]

    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    tr = re.search(r"^Transfer/sec:\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in ([0-9.]+)(\w+),", out, re.M)
    if not (rps and tr and p99 and p50 and total):
        raise Failure(f"cannot parse wrk output:\n{out}")
    errors = 0
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        errors += sum(int(x) for x in se.groups())
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n2:
        errors += int(n2.group(1))
    return dict(
        rps=float(rps.group(1)),
        bytes_per_s=num_unit(tr.group(1), UNITS_BYTES),
        p99_ms=num_unit(p99.group(1), UNITS_TIME),
        p50_ms=num_unit(p50.group(1), UNITS_TIME),
        requests=int(total.group(1)),
        seconds=num_unit(total.group(2) + total.group(3), UNITS_TIME) / 1000,
        errors=errors,
    )


# wrk sends `depth` requests at once on each connection and counts each answer: the load
# generator then spends a fraction of its CPU per request, so a server on a core of its own is
# what sets the rate (the way TechEmpower's plaintext test measures servers).
PIPELINE_LUA = """
local depth = tonumber(os.getenv("WRK_PIPELINE") or "1")
init = function(args)
  local r = {}
  for i = 1, depth do r[i] = wrk.format() end
  req = table.concat(r)
end
request = function() return req end
"""


def command(url: str, headers: list[str], connections: int, threads: int,
            seconds: float, script: str | None = None) -> list[str]:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    cmd += ["--timeout", "30s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    return cmd + [url]


def run(url: str, headers: list[str], connections: int, threads: int, seconds: float,
        server_pids, pipeline: int = 1) -> Run:
    """One wrk run; `server_pids()` names the server's processes (read before the run).
    `pipeline` > 1 sends that many requests at once on each connection."""
    script, env = None, None
    if pipeline > 1:
        f = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        f.write(PIPELINE_LUA)
        f.close()
        script, env = f.name, dict(os.environ, WRK_PIPELINE=str(pipeline))
    try:
        return _run(command(url, headers, connections, threads, seconds, script), env, seconds,
                    server_pids)
    finally:
        if script:
            os.unlink(script)


def _run(cmd: list[str], env, seconds: float, server_pids) -> Run:
    pids = server_pids()
    cpu0 = cpu_seconds(pids)
    m0 = busy_and_steal(machine_cpu())
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env=env)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m1 = busy_and_steal(machine_cpu())
    cpu1 = cpu_seconds(pids)
    if r.returncode != 0:
        raise Failure(f"wrk failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    p = parse(r.stdout)
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    other = max(0.0, (m1[0] - m0[0]) - (cpu1 - cpu0) - wrk_cpu)
    return Run(**p, server_cpu_s=cpu1 - cpu0, wrk_cpu_s=wrk_cpu, other_cpu_s=other,
               steal_s=m1[1] - m0[1], raw=r.stdout)
