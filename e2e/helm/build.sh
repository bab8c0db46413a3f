#!/bin/sh
# Build Helm from the version pinned in go.mod (a `tool` line), stamped like Helm's own Makefile
# stamps its releases, into $HOME/.cache/wasmfilter/e2e/helm-<version>/helm. Returns at once
# when that binary exists. Usage: ./build.sh [OUT]
set -eu
cd "$(dirname "$0")"
. ../go-build.sh
HV=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
OUT=${1:-${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}/e2e/helm-$HV/helm}
if [ -x "$OUT" ]; then
	echo "$OUT"
	exit 0
fi
# Helm reports the Kubernetes version of its client-go as the default for `helm template`
# and `helm lint` (.Capabilities.KubeVersion); client-go v0.X.Y is Kubernetes 1.X.
KMINOR=$(go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
LD="-s -w -X helm.sh/helm/v3/internal/version.version=$HV -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
	LD="$LD -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$KMINOR"
done
mkdir -p "$(dirname "$OUT")"
started=$(date +%s)
echo "building Helm $HV from source (about 1000 packages: 1-2 minutes once the API server's packages are in the Go build cache, then cached)" >&2
export CGO_ENABLED=0
go_build -trimpath -ldflags "$LD" -o "$OUT.tmp" helm.sh/helm/v3/cmd/helm
mv "$OUT.tmp" "$OUT"
echo "built $OUT in $(($(date +%s) - started))s" >&2
echo "$OUT"
