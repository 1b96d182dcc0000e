"""cluster.py's pullers: one node's pull, run in its namespace (`cluster.py _pull`), as
containerd does it: the manifest by tag, then the config and every layer in parallel, one
connection each, every body's sha256 checked. `Pullers` starts N of them, waits until each is
ready, releases them together through their standard input and collects their results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import Failure
from .images import BIG_TAG
from .netns import PORT, Endpoint
from .procs import child_env, kill_tree
from .registry import fetch_blob, fetch_manifest


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
    return fetch_manifest(host, PORT, repo, BIG_TAG, digest)


def get_blob(target: str, digest: str, size: int, store: Path | None) -> None:
    host, repo = split_target(target)
    fetch_blob(host, PORT, repo, digest, size, store, timeout=60)


@dataclass
class PullSpec:
    node: Endpoint
    target: str  # HOST/REPO
    fallback: str | None = None
    store: Path | None = None


class Pullers:
    """N puller processes, one per node, released together. `command` starts puller_main
    (cluster.py's `_pull`)."""

    def __init__(self, specs: list[PullSpec], digest: str, command: list[str]):
        self.specs, self.digest, self.command = specs, digest, command
        self.procs: list[subprocess.Popen] = []
        self.go_t = 0.0

    def start(self, deadline_s: float = 60) -> None:
        """Starts every puller and waits until each has printed "ready"."""
        for s in self.specs:
            argv = ["ip", "netns", "exec", s.node.ns, *self.command,
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

