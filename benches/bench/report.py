"""What every report shares: the machine's description, best-of-runs with their spread, and
ratios with the range of their back-to-back pairs."""

from __future__ import annotations

import statistics

import os
import subprocess
from pathlib import Path

from . import ROOT


# ---------------------------------------------------------------- the machine


def first_line(cmd: list[str]) -> str:
    """The first line `cmd` prints (standard output, then error), "?" if none."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return "?"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def lighter_rev() -> str:
    """The repository's commit, saying so when tracked files have changed since."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    rev = git("rev-parse", "--short", "HEAD")
    if not rev:
        return "?"
    if git("status", "--porcelain", "--untracked-files=no"):
        rev += " (with uncommitted changes)"
    return rev


def machine() -> list[str]:
    """The first lines of a report against nginx: the machine, the commit, nginx and wrk."""
    return [
        f"machine: {os.cpu_count()} CPUs (nproc {first_line(['nproc'])}), {cpu_model()}, "
        f"{mem_total()} RAM, kernel {os.uname().release}, load average at start "
        f"{load_average()}",
        f"lighter: {lighter_rev()}",
        f"{first_line(['nginx', '-v'])}; {first_line(['wrk', '-v']).split(' Copyright')[0]}",
    ]


# ---------------------------------------------------------------- numbers


def spread(xs: list[float]) -> float:
    """(max − min) / max, in %: how far the runs of one case are apart."""
    return 0.0 if len(xs) < 2 or max(xs) == 0 else (max(xs) - min(xs)) / max(xs) * 100


def ratio_cell(ratio: float, pairs: list[float], base: str = "") -> str:
    """`ratio` in bold (then the baseline's name, if given), and with more than one pair the
    lowest and highest ratio of runs done back to back; with three or more, their median too
    (on a noisy machine the steadiest figure: one disturbed run moves neither it nor the
    other pairs)."""
    s = f"**{ratio:.2f}×**" + (f" {base}" if base else "")
    if len(pairs) > 2:
        s += f" ({min(pairs):.2f}–{max(pairs):.2f}, median {statistics.median(pairs):.2f})"
    elif len(pairs) > 1:
        s += f" ({min(pairs):.2f}–{max(pairs):.2f})"
    return s


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.0f} µs" if x < 1 else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def fmt_kib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MiB"


def cell(runs) -> str:
    """req/s of wrk runs: the best, the spread, and the errors if any."""
    rps = [r.rps for r in runs]
    s = f"{fmt_rps(max(rps))} ({spread(rps):.0f}%)"
    if any(r.errors for r in runs):
        s += f" ⚠{sum(r.errors for r in runs)} errors"
    return s




def ratio_table(title: str, rows, a: str, b: str) -> list[str]:
    """A Markdown table of `rows` ((workload, runs of `a`, runs of `b`), wrk runs interleaved):
    req/s of each side (best, spread), the ratio of the bests (with the pairwise range) and the
    servers' CPU per request."""
    out = [f"### {title}", "",
           f"| workload | {a} req/s | {b} req/s | {a}/{b} | {a} CPU µs/req | {b} CPU µs/req |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, ra, rb in rows:
        best_a, best_b = max(r.rps for r in ra), max(r.rps for r in rb)
        pairs = [x.rps / y.rps for x, y in zip(ra, rb) if y.rps]
        cpu = lambda runs: min(r.server_cpu_s / r.requests * 1e6 for r in runs if r.requests)  # noqa: E731
        out.append(
            f"| {name} | {cell(ra)} | {cell(rb)} | "
            f"{ratio_cell(best_a / best_b, pairs)} | {cpu(ra):.2f} | {cpu(rb):.2f} |"
        )
    return out + [""]
