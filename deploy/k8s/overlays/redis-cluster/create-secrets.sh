#!/usr/bin/env sh
# The Secrets of overlays/redis-cluster: the base's (deploy/k8s/create-secrets.sh), plus
# breakwater-redis-cluster with the cluster's own ACL users' passwords: `replication` (replicas
# authenticate to their primary: masteruser/masterauth) and `admin` (the bootstrap Job's
# redis-cli --cluster create). Run once before `kubectl apply -k`; re-running keeps existing Secrets.
set -eu
NS="${NAMESPACE:-breakwater}"
HERE="$(cd "$(dirname "$0")" && pwd)"

"$HERE/../../create-secrets.sh"
# Hex passwords: safe in a Redis ACL file and a config line without escaping.
pw() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

if ! kubectl -n "$NS" get secret breakwater-redis-cluster >/dev/null 2>&1; then
  kubectl -n "$NS" create secret generic breakwater-redis-cluster \
    --from-literal=replication-password="$(pw)" \
    --from-literal=admin-password="$(pw)"
fi
