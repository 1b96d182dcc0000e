#!/usr/bin/env bash
# Load test: Lighter against nginx (sendfile), the same bytes at the same paths, driven by the
# same wrk in one run; then the pull-through cache: full image pulls from CNCF Distribution
# directly, through Lighter cold and warm, and from nginx. Installs nginx, wrk and docker-registry
# with apt-get if missing, builds the release binary, prints the machine and Markdown tables.
# See benches/loadtest.py --help for every option.
#
#   bash benches/loadtest.sh [--duration 8] [--connections 64] [--threads 1] [--repeat 3] \
#       [--no-mirror | --mirror-layers 3 --mirror-layer-mib 100]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v python3 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y python3
fi
exec python3 "$here/loadtest.py" "$@"
