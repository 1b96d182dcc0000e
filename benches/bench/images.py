"""Test images: what the benchmarks push, serve and pull. Random bytes from fixed seeds, so the
same sizes give the same digests every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from . import KiB, MiB

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join([  # what containerd sends
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


def sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def config_json(diff_ids: list[str]) -> bytes:
    """An image config naming `diff_ids` as its layers."""
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        separators=(",", ":"),
    ).encode()


def manifest_json(config: bytes, layers: list[tuple[str, int]]) -> bytes:
    """An OCI image manifest of `config` and `layers` ((digest, size), in order)."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n in layers],
        },
        indent=2,
    ).encode()


# ---------------------------------------------------------------- the wrk workloads' image


SEED_REPO, SEED_TAG = "bench/app", "latest"  # where the benchmarks push the seed


@dataclass
class Seed:
    """A small image held in memory: layers of 4 KiB, 1 MiB and 64 MiB, a config, a manifest."""
    blobs: dict[str, bytes]  # name -> bytes
    digests: dict[str, str]  # name -> sha256:...
    manifest: bytes


def make_seed() -> Seed:
    rnd = random.Random(20240601)  # fixed: the same digests every run
    blobs = {
        "4KiB": rnd.randbytes(4 * KiB),
        "1MiB": rnd.randbytes(1 * MiB),
        "64MiB": rnd.randbytes(64 * MiB),
    }
    layers = ["4KiB", "1MiB", "64MiB"]
    digests = {k: sha256(v) for k, v in blobs.items()}
    config = config_json([digests[k] for k in layers])
    blobs["config"] = config
    digests["config"] = sha256(config)
    manifest = manifest_json(config, [(digests[k], len(blobs[k])) for k in layers])
    return Seed(blobs, digests, manifest)


def lay_out_for_nginx(root: Path, repo: str, tag: str, seed: Seed) -> None:
    """Writes `seed` under `root` at the registry's URL paths (/v2/<repo>/blobs/<digest>,
    /v2/<repo>/manifests/<tag>), for nginx to serve the same bytes as Lighter."""
    blobs = root / "v2" / repo / "blobs"
    manifests = root / "v2" / repo / "manifests"
    blobs.mkdir(parents=True)
    manifests.mkdir(parents=True)
    for name, data in seed.blobs.items():
        (blobs / seed.digests[name]).write_bytes(data)
    (manifests / tag).write_bytes(seed.manifest)
    let_nginx_read(root)


def let_nginx_read(root: Path) -> None:
    """nginx's workers run as an unprivileged user when started by root: lets them read
    `root` (and list its parent)."""
    os.chmod(root.parent, 0o755)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


# ---------------------------------------------------------------- images on disk

# The image the pull-through benchmarks (loadtest's mirror part, cluster.py) pull: held by
# Distribution as bench/big:1.0, asked of Lighter as docker.io/bench/big:1.0 (Lighter's
# `--upstream docker.io=<Distribution>`).
UPSTREAM_NAME = "docker.io"
BIG_REPO, BIG_TAG = "bench/big", "1.0"


@dataclass
class Image:
    """An image whose blobs are files named by digest in one directory."""
    blobs: list[tuple[str, int]]  # (digest, size): the config, then the layers in order
    manifest: bytes
    manifest_digest: str

    @property
    def config_digest(self) -> str:
        return self.blobs[0][0]

    @property
    def layers(self) -> list[tuple[str, int]]:
        return self.blobs[1:]

    @property
    def pull_bytes(self) -> int:
        """Bytes of a full pull: manifest, config and every layer."""
        return len(self.manifest) + sum(n for _, n in self.blobs)


def write_image(blobs_dir: Path, layer_sizes: list[int], seed: int) -> Image:
    """Writes random (incompressible) layers of `layer_sizes` bytes and their config into
    `blobs_dir`, each named by its digest, and builds the OCI manifest."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    layers = []
    for i, size in enumerate(layer_sizes):
        h, tmp = hashlib.sha256(), blobs_dir / f".layer-{i}.tmp"
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
    config = config_json([d for d, _ in layers])
    (blobs_dir / sha256(config)).write_bytes(config)
    manifest = manifest_json(config, layers)
    return Image([(sha256(config), len(config))] + layers, manifest, sha256(manifest))
