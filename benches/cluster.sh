#!/usr/bin/env bash
# Cluster benchmark of the node tier: N nodes, each in its own network namespace behind a link
# limited by tc, pull one image at once from CNCF Distribution directly, through one central
# Lighter, and through a Lighter on every node that are peers of each other. Installs
# docker-registry and iproute2 with apt-get if missing, builds the release binary (unless
# --no-build or --lighter-bin), prints Markdown tables. Needs root (namespaces, tc).
# See benches/cluster.py --help for every option.
#
#   bash benches/cluster.sh [--nodes 16] [--link-mbit 100] [--layer-mib 128] [--repeat 1] \
#       [--cases ref,a,b,c,kill,ctrd] [--out FILE] [--json FILE] [--keep] [--no-build]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

build=1 help=0
for arg in "$@"; do
    case "$arg" in
        --no-build | --lighter-bin | --lighter-bin=*) build=0 ;;
        -h | --help) build=0 help=1 ;;
    esac
done

missing=()
command -v python3 >/dev/null || missing+=(python3)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)  # CNCF Distribution
{ command -v ip >/dev/null && command -v tc >/dev/null; } || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ] && [ "$help" = 0 ]; then
    echo "cluster.sh: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi

if [ "$build" = 1 ]; then
    echo "cluster.sh: cargo build --release -p lighter-controlplane" >&2
    (cd "$root" && cargo build --release -p lighter-controlplane)
fi
exec python3 "$here/cluster.py" "$@"
