#!/bin/sh
# Points a node's containerd at its Lighter (the lighter-containerd-setup DaemonSet runs this as
# an init container on every node, as root, with the node's /etc/containerd at /host/etc/containerd).
#
# 1. For each file in $HOSTS_SRC (one per registry host, named after it, from hosts*.toml), writes
#    $CERTS_D/<host>/hosts.toml. containerd reads these at every pull: no restart. A hosts.toml
#    that Lighter did not write is left alone (the step fails and says so).
# 2. Notes discard_unpacked_layers = true (Lighter cannot serve from containerd's content store).
# 3. Checks that containerd's CRI plugin reads $CERTS_D (config_path). If not:
#    - by default, fails with the line to add (the pod shows Init:Error / CrashLoopBackOff);
#    - with PATCH_CONTAINERD_CONFIG=true (patch-containerd-config.yaml: privileged, hostPID),
#      sets config_path in config.toml (keeping a backup) and restarts containerd. Running
#      containers are not affected by the restart.
# Safe to run again: it does nothing that is already done.
set -eu

ETC=${ETC:-/host/etc/containerd}
CONFIG=${CONFIG:-$ETC/config.toml}
CERTS_D=${CERTS_D:-$ETC/certs.d}
HOSTS_SRC=${HOSTS_SRC:-/lighter/hosts}
PATCH_CONTAINERD_CONFIG=${PATCH_CONTAINERD_CONFIG:-false}
# The path as containerd sees it on the node.
NODE_CERTS_D=/etc/containerd/certs.d
MARKER="managed by lighter node-mirror"

log() { echo "lighter-containerd-setup: $*"; }
fail() { echo "lighter-containerd-setup: ERROR: $*" >&2; exit 1; }

# 1. hosts.toml files.
found=0
for src in "$HOSTS_SRC"/*; do
  [ -f "$src" ] || continue
  found=1
  host=$(basename "$src")
  dst="$CERTS_D/$host/hosts.toml"
  if [ -f "$dst" ] && ! grep -q "$MARKER" "$dst"; then
    fail "$NODE_CERTS_D/$host/hosts.toml exists and was not written by Lighter; merge the [host.\"http://127.0.0.1:5000\"] table into it by hand, or remove it, then restart this pod"
  fi
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    log "$NODE_CERTS_D/$host/hosts.toml is up to date"
    continue
  fi
  mkdir -p "$CERTS_D/$host"
  # Atomic replace: containerd may be reading it.
  cp "$src" "$dst.lighter-tmp"
  mv "$dst.lighter-tmp" "$dst"
  log "wrote $NODE_CERTS_D/$host/hosts.toml"
done
[ "$found" = 1 ] || fail "no hosts files in $HOSTS_SRC"

# 2. discard_unpacked_layers = true (some distributions' default) deletes layers from containerd's
# content store once unpacked: Lighter then cannot serve them from there and keeps its own copy.
# Only said, not changed: pulls work either way.
if grep -sqE '^[[:space:]]*discard_unpacked_layers[[:space:]]*=[[:space:]]*true' "$CONFIG" "$ETC"/conf.d/*.toml; then
  log "note: containerd has discard_unpacked_layers = true, so Lighter serves from its own cache, not from containerd's content store (set it to false to store layers once)"
fi

# 3. config_path, in config.toml or a drop-in. (`containerd config default` of 2.x writes
# '/etc/containerd/certs.d:/etc/docker/certs.d', of 1.x an empty one.)
configured() {
  grep -sqE "^[[:space:]]*config_path[[:space:]]*=[[:space:]]*[\"'][^\"']*$NODE_CERTS_D" \
    "$CONFIG" "$ETC"/conf.d/*.toml
}
if configured; then
  log "containerd's config_path includes $NODE_CERTS_D: done"
  exit 0
fi

if [ -f "$CONFIG" ] && grep -qE '^[[:space:]]*version[[:space:]]*=[[:space:]]*3' "$CONFIG"; then
  section='[plugins."io.containerd.cri.v1.images".registry]'
else
  section='[plugins."io.containerd.grpc.v1.cri".registry]'
fi
if [ "$PATCH_CONTAINERD_CONFIG" != true ]; then
  fail "containerd does not read $NODE_CERTS_D, so it will not use Lighter. On this node, set in /etc/containerd/config.toml
  $section
    config_path = \"$NODE_CERTS_D\"
and restart containerd (systemctl restart containerd), or let this step do it: see deploy/overlays/node-mirror/patch-containerd-config.yaml"
fi

# Patching: only the cases that can be done without understanding the whole file.
any='^[[:space:]]*config_path[[:space:]]*='
empty='^[[:space:]]*config_path[[:space:]]*=[[:space:]]*(""|'"''"')[[:space:]]*$'
tmp="$CONFIG.lighter-tmp"
if [ ! -f "$CONFIG" ]; then
  # No file: containerd runs on defaults. A version 2 file is read by containerd 1.x and 2.x.
  printf 'version = 2\n\n%s\n  config_path = "%s"\n' "$section" "$NODE_CERTS_D" > "$tmp"
else
  grep -qE '^[[:space:]]*version[[:space:]]*=' "$CONFIG" ||
    fail "$CONFIG has no version line (a version 1 file): set config_path by hand"
  ! grep -qE '^[[:space:]]*\[.*registry\.mirrors\.' "$CONFIG" ||
    fail "$CONFIG configures registry.mirrors, which containerd refuses together with config_path; move those mirrors to hosts.toml files first"
  if [ "$(grep -cE "$empty" "$CONFIG")" = 1 ]; then
    # `containerd config default` of 1.x writes config_path = "" under the registry section.
    sed -E "/$empty/ s#^([[:space:]]*)config_path.*#\\1config_path = \"$NODE_CERTS_D\"#" "$CONFIG" > "$tmp"
  elif grep -qE "$any" "$CONFIG"; then
    fail "$CONFIG sets config_path to other directories; add $NODE_CERTS_D there by hand (or install the hosts.toml files where it points)"
  elif grep -qF "$section" "$CONFIG"; then
    # The section exists without config_path: add it right under the header.
    awk -v h="$section" -v line="  config_path = \"$NODE_CERTS_D\"" \
      '{ print } index($0, h) && !done { print line; done = 1 }' "$CONFIG" > "$tmp"
  else
    { cat "$CONFIG"; printf '\n%s\n  config_path = "%s"\n' "$section" "$NODE_CERTS_D"; } > "$tmp"
  fi
  backup="$CONFIG.lighter-backup-$(date +%Y%m%d%H%M%S)"
  cp -p "$CONFIG" "$backup"
  log "saved the old config as /etc/containerd/$(basename "$backup")"
fi
# Written in place (not renamed over) to keep the file's owner, mode and labels.
cat "$tmp" > "$CONFIG"
rm -f "$tmp"
configured || fail "patched $CONFIG but config_path still does not name $NODE_CERTS_D; restore the backup and set it by hand"
log "set config_path = \"$NODE_CERTS_D\" in /etc/containerd/config.toml; restarting containerd"
nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd
log "containerd restarted: done"
