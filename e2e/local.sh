#!/bin/sh
# Brings up what the README's cluster walkthrough needs on this machine, in the background:
# a real kube-apiserver (built once from pinned Go modules, cached under
# $HOME/.cache/wasmfilter) and the CNCF distribution registry on 127.0.0.1:5000 (built once the
# same way, by e2e/registry/build.sh). State lives in target/local; `e2e/local.sh down` stops
# both.
#
#   e2e/local.sh up      # prints the KUBECONFIG to export
#   e2e/local.sh down
set -eu
cd "$(dirname "$0")/.."
STATE=$PWD/target/local
case "${1:-up}" in
up)
    mkdir -p "$STATE/registry"
    # Built once (about 10 minutes), then cached: prints the binary's path.
    cluster=$(e2e/cluster/build.sh)
    kubectl_bin=$(dirname "$cluster")/kubectl-$(basename "$cluster" | sed 's/^cluster-//')
    # Built once (a few minutes), then cached: prints the binary's path.
    registry=$(e2e/registry/build.sh)
    if [ ! -f "$STATE/cluster.pid" ] || ! kill -0 "$(cat "$STATE/cluster.pid")" 2>/dev/null; then
        rm -f "$STATE/cluster/ready"
        "$cluster" -dir "$STATE/cluster" >"$STATE/cluster.log" 2>&1 &
        echo $! >"$STATE/cluster.pid"
    fi
    cat >"$STATE/registry/config.yml" <<YAML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $STATE/registry/storage}}
http: {addr: "127.0.0.1:5000", secret: wasmfilter-local}
YAML
    if [ ! -f "$STATE/registry.pid" ] || ! kill -0 "$(cat "$STATE/registry.pid")" 2>/dev/null; then
        # OTEL_TRACES_EXPORTER=none: it would export traces to localhost:4318 otherwise.
        OTEL_TRACES_EXPORTER=none "$registry" serve "$STATE/registry/config.yml" >"$STATE/registry.log" 2>&1 &
        echo $! >"$STATE/registry.pid"
    fi
    i=0
    until [ -f "$STATE/cluster/ready" ]; do
        i=$((i + 1))
        [ $i -lt 600 ] || { echo "the API server did not start; see $STATE/cluster.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "API server ready; registry on 127.0.0.1:5000 (logs in $STATE)"
    echo "export KUBECONFIG=$STATE/cluster/kubeconfig"
    echo "# a kubectl of the API server's version (any recent kubectl works too):"
    echo "alias kubectl=$kubectl_bin"
    ;;
down)
    for p in cluster registry; do
        [ -f "$STATE/$p.pid" ] && kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true
        rm -f "$STATE/$p.pid"
    done
    echo "stopped (state kept in $STATE; rm -r it to start afresh)"
    ;;
*) echo "usage: e2e/local.sh up|down" >&2; exit 2 ;;
esac
