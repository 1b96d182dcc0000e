"""The shared parts of the Python benchmarks (loadtest.py, access.py, cluster.py, s3bench.py
beside this package). Python 3.11 standard library only; nothing here decides what is measured, the scripts
do.

Code map:
  procs     processes this package starts (spawn, stop, their trees) and what /proc says of
            them: CPU seconds, RSS, the machine's CPU, free ports, disk use
  images    test images: the seed image of the wrk workloads, random images written to disk,
            an nginx root laid out at registry URL paths
  registry  talking to a registry over HTTP: requests, pushes, verified pulls of one
            manifest or blob, curl checks
  servers   starting Lighter, nginx and CNCF Distribution (their configs), the tools they need
  wrk       one wrk run, parsed, with the CPU the servers and wrk spent
  report    the machine's description and the formatting every report shares (best, spread,
            ratios)
  mirror    loadtest's pull-through cache part: Distribution directly, Lighter cold and warm,
            nginx
  netns     cluster's network: namespaces joined by a bridge, tc-limited links, byte counters
  puller    cluster's puller: one node's pull in its namespace, N of them released at once
  garage    s3bench's object store: a single-node Garage with a bucket and a key
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
KiB, MiB = 1024, 1024 * 1024


class Failure(Exception):
    """A benchmark cannot go on; the message says what went wrong."""


def log(msg: str) -> None:
    """Progress goes to standard error; the report alone goes to standard output."""
    print(msg, file=sys.stderr, flush=True)


def run_main(name: str, main, cleaned: str = "stopped everything it started") -> None:
    """Runs a script's `main()` and exits with its code: SIGTERM and SIGHUP stop it as Ctrl-C
    does (the scripts' `finally` blocks stop what they started), a [`Failure`] exits 2 with
    its message, an interruption 130."""
    import signal

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)
    try:
        sys.exit(main())
    except Failure as e:
        log(f"{name}: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        log(f"{name}: interrupted; {cleaned}")
        sys.exit(130)
