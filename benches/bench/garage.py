"""A single-node Garage (the S3-compatible object store the replicated mode's tests run against,
its own process) on loopback ports over a directory of the benchmark's: config file, `garage
server`, a layout assigned and applied, one bucket, one key allowed on it. The same steps as
controlplane/tests/common/garage.rs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import Failure
from .procs import free_port, spawn, stop
from .servers import get_status, tail

BUCKET, REGION = "lighter", "garage"

CONFIG = """\
# Written by benches/bench/garage.py: a single-node Garage for a benchmark.
metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"""


@dataclass
class Garage:
    proc: subprocess.Popen
    binary: str
    dir: Path
    port: int  # the S3 API
    key_id: str = ""
    secret: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The credentials Lighter and s3raw take from the environment."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret}

    def storage_toml(self, tag_ttl_ms: int, part_size_bytes: int) -> str:
        """The `[storage.s3]` section for this Garage, as the issue writes it."""
        return (f'[storage.s3]\nbucket = "{BUCKET}"\nendpoint = "{self.endpoint}"\n'
                f'region = "{REGION}"\npath_style = true\ntag_ttl_ms = {tag_ttl_ms}\n'
                f"part_size_bytes = {part_size_bytes}\n")

    def cli(self, *args: str) -> str:
        r = subprocess.run([self.binary, "-c", str(self.dir / "config.toml"), *args],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Failure(f"garage {' '.join(args)}: {r.stderr.strip() or r.returncode}\n"
                          f"{tail(self.dir / 'garage.log')}")
        return r.stdout


def binary() -> str:
    """Garage's path; Failure saying how to install it if missing."""
    found = shutil.which("garage") or str(Path.home() / ".cargo" / "bin" / "garage")
    if not os.access(found, os.X_OK):
        raise Failure("garage is not installed: cargo install garage --version 2.5.0 --locked "
                      "(about 15 minutes; .ci/run does it)")
    return found


def version(garage: str) -> str:
    r = subprocess.run([garage, "--version"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else "garage ?"


def start(work: Path) -> Garage:
    """Garage on free loopback ports, its data and metadata under work/garage, ready: a bucket
    and a key that may read and write it."""
    d = work / "garage"
    d.mkdir()
    s3, rpc, admin = free_port(), free_port(), free_port()
    (d / "config.toml").write_text(CONFIG.format(
        d=d, rpc=rpc, s3=s3, admin=admin, region=REGION, secret=os.urandom(32).hex(),
        token=os.urandom(16).hex()))
    garage = binary()
    proc = spawn([garage, "-c", str(d / "config.toml"), "server"], d / "garage.log",
                 env={"RUST_LOG": "garage=warn"})
    g = Garage(proc, garage, d, s3)
    try:
        deadline = time.monotonic() + 60
        while True:  # `status` reaches the server over RPC: up once it answers
            if proc.poll() is not None:
                raise Failure(f"garage exited with {proc.returncode}")
            r = subprocess.run([garage, "-c", str(d / "config.toml"), "status"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise Failure("garage did not answer `status` within 60 s")
            time.sleep(0.2)
        node = g.cli("node", "id", "-q").strip().split("@")[0]
        g.cli("layout", "assign", "-z", "dc1", "-c", "10G", node[:64])
        g.cli("layout", "apply", "--version", "1")
        g.cli("bucket", "create", BUCKET)
        key = json.loads(g.cli("json-api", "CreateKey", '{"name":"lighter-bench"}'))
        g.key_id, g.secret = key["accessKeyId"], key["secretAccessKey"]
        g.cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", g.key_id)
        while True:  # any answer but 503: the layout is live
            try:
                if get_status(s3, f"/{BUCKET}") not in (0, 503):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise Failure("garage's S3 API did not come up within 60 s")
            time.sleep(0.2)
    except (Failure, subprocess.SubprocessError, KeyError, ValueError) as e:
        stop(proc)
        raise Failure(f"garage did not start: {e}\n{tail(d / 'garage.log')}") from None
    return g
