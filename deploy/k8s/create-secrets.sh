#!/usr/bin/env sh
# Create the namespace and the Secrets the manifests reference, with random passwords. Run once,
# before `kubectl apply -k deploy/k8s/overlays/<overlay>`; re-running keeps existing Secrets.
#   deploy/k8s/create-secrets.sh                  # Redis ACL passwords
#   UPSTREAM_API_KEY=sk-... deploy/k8s/create-secrets.sh   # also the upstream token (openai engine)
set -eu
NS="${NAMESPACE:-breakwater}"
HERE="$(cd "$(dirname "$0")" && pwd)"

kubectl apply -f "$HERE/base/namespace.yaml"
# Hex passwords: safe in a Redis ACL file and a URL without escaping.
pw() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

if ! kubectl -n "$NS" get secret breakwater-redis >/dev/null 2>&1; then
  kubectl -n "$NS" create secret generic breakwater-redis \
    --from-literal=gateway-password="$(pw)" \
    --from-literal=worker-password="$(pw)" \
    --from-literal=metrics-username=metrics \
    --from-literal=metrics-password="$(pw)"
fi
# The pepper API keys are hashed with: rotating it invalidates every key.
if ! kubectl -n "$NS" get secret breakwater-auth >/dev/null 2>&1; then
  kubectl -n "$NS" create secret generic breakwater-auth --from-literal=pepper="$(pw)"
fi
if [ -n "${UPSTREAM_API_KEY:-}" ] && ! kubectl -n "$NS" get secret breakwater-upstream >/dev/null 2>&1; then
  kubectl -n "$NS" create secret generic breakwater-upstream --from-literal=api-key="$UPSTREAM_API_KEY"
fi
