#!/bin/sh
# Build the e2e cluster binary; stamps the version kubectl/discovery report.
set -eu
cd "$(dirname "$0")"
KV=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
LD="-X k8s.io/component-base/version.gitVersion=$KV -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo $KV | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
LD="$LD -X k8s.io/client-go/pkg/version.gitVersion=$KV -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$(echo $KV | cut -d. -f2)"
OUT=${1:-$HOME/.cache/wasmfilter/e2e/cluster-$KV}
mkdir -p "$(dirname "$OUT")"
exec go build -trimpath -ldflags "$LD" -o "$OUT" .
