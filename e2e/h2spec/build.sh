#!/bin/sh
# Build h2spec (the HTTP/2 conformance suite the dataplane's h2c and TLS listeners are tested
# against, dataplane/daemon/tests/h2spec.rs) from the version pinned in go.mod (a `tool` line)
# into $HOME/.cache/wasmfilter/e2e/h2spec-<version>/h2spec. Returns at once when that binary
# exists. Progress goes to stderr; the binary's path is printed last, on stdout.
# Usage: ./build.sh [OUT]
set -eu
cd "$(dirname "$0")"
. ../go-build.sh
PKG=github.com/summerwind/h2spec
RV=$(go list -m -f '{{.Version}}' $PKG)
OUT=${1:-${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}/e2e/h2spec-$RV/h2spec}
if [ -x "$OUT" ]; then
	echo "$OUT"
	exit 0
fi
started=$(date +%s)
echo "building h2spec ($PKG/cmd/h2spec $RV) from source, once (about 30 packages)" >&2
mkdir -p "$(dirname "$OUT")"
export CGO_ENABLED=0
go_build -trimpath -ldflags "-s -w -X main.VERSION=$RV" -o "$OUT.tmp.$$" $PKG/cmd/h2spec
mv "$OUT.tmp.$$" "$OUT"
echo "built $OUT in $(($(date +%s) - started))s" >&2
echo "$OUT"
