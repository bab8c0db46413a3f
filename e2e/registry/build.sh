#!/bin/sh
# Build the CNCF distribution registry (`registry serve CONFIG`, the OCI registry the tests and
# e2e/local.sh run) from the version pinned in go.mod (a `tool` line), stamped as its own
# Makefile stamps releases, into $HOME/.cache/wasmfilter/e2e/registry-<version>/registry.
# Returns at once when that binary exists. Progress goes to stderr; the binary's path is
# printed last, on stdout.
# Usage: ./build.sh [OUT]
set -eu
cd "$(dirname "$0")"
. ../go-build.sh
PKG=github.com/distribution/distribution/v3
RV=$(go list -m -f '{{.Version}}' $PKG)
OUT=${1:-${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}/e2e/registry-$RV/registry}
if [ -x "$OUT" ]; then
	echo "$OUT"
	exit 0
fi
started=$(date +%s)
echo "building the OCI registry ($PKG/cmd/registry $RV) from source, once (about 1000 packages: about 4 minutes on 2 busy cores with a cold Go build cache)" >&2
LD="-s -w -X $PKG/version.version=$RV -X $PKG/version.mainpkg=$PKG"
mkdir -p "$(dirname "$OUT")"
export CGO_ENABLED=0
go_build -trimpath -ldflags "$LD" -o "$OUT.tmp.$$" $PKG/cmd/registry
mv "$OUT.tmp.$$" "$OUT"
echo "built $OUT in $(($(date +%s) - started))s" >&2
echo "$OUT"
