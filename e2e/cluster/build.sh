#!/bin/sh
# Build the e2e cluster binary and a kubectl of the same Kubernetes version (from the same
# pinned modules: go.mod's `tool` line), both stamped with the version kubectl/discovery report.
# Returns at once when both exist and were built from the same main.go, go.mod and go.sum
# (their sha256 is kept in OUT.inputs). Prints OUT.
# Usage: ./build.sh [OUT]   default OUT: $HOME/.cache/wasmfilter/e2e/cluster-<k8s version>;
# kubectl goes beside it as kubectl-<k8s version>.
set -eu
cd "$(dirname "$0")"
. ../go-build.sh
KV=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
OUT=${1:-${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}/e2e/cluster-$KV}
KUBECTL=$(dirname "$OUT")/kubectl-$KV
INPUTS=$(cat main.go go.mod go.sum | sha256sum | cut -d' ' -f1)
if [ -x "$OUT" ] && [ -x "$KUBECTL" ] && [ "$(cat "$OUT.inputs" 2>/dev/null)" = "$INPUTS" ]; then
	echo "$OUT"
	exit 0
fi
MINOR=$(echo "$KV" | cut -d. -f2)
LD="-X k8s.io/component-base/version.gitVersion=$KV -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean"
LD="$LD -X k8s.io/client-go/pkg/version.gitVersion=$KV -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"
mkdir -p "$(dirname "$OUT")"
started=$(date +%s)
echo "building kube-apiserver $KV with etcd from source (about 2200 packages: 8-10 minutes on 2 busy cores with a cold Go build cache, then cached)" >&2
go_build -trimpath -ldflags "$LD" -o "$OUT.tmp" .
echo "built the API server in $(($(date +%s) - started))s; building kubectl $KV (shares most packages)" >&2
go_build -trimpath -ldflags "$LD" -o "$KUBECTL.tmp" k8s.io/kubernetes/cmd/kubectl
mv "$OUT.tmp" "$OUT"
mv "$KUBECTL.tmp" "$KUBECTL"
echo "$INPUTS" > "$OUT.inputs"
echo "built $OUT and $KUBECTL in $(($(date +%s) - started))s" >&2
echo "$OUT"
