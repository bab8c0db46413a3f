#!/bin/sh
# Build the e2e cluster binary and a kubectl of the same Kubernetes version (from the same
# pinned modules: go.mod's `tool` line), both stamped with the version kubectl/discovery report.
# Returns at once when both exist and were built from the same main.go, go.mod and go.sum
# (their sha256 is kept in OUT.inputs). Prints OUT.
# Usage: ./build.sh [OUT]   default OUT: $HOME/.cache/wasmfilter/e2e/cluster-<k8s version>;
# kubectl goes beside it as kubectl-<k8s version>.
set -eu
cd "$(dirname "$0")"
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
go build -trimpath -ldflags "$LD" -o "$OUT.tmp" .
go build -trimpath -ldflags "$LD" -o "$KUBECTL.tmp" k8s.io/kubernetes/cmd/kubectl
mv "$OUT.tmp" "$OUT"
mv "$KUBECTL.tmp" "$KUBECTL"
echo "$INPUTS" > "$OUT.inputs"
echo "$OUT"
