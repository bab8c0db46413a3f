#!/bin/sh
# Usage: gen-replaces.sh v1.37.2  > replaces.txt
# Emits "replace k8s.io/X => k8s.io/X v0.37.2" for every staging module that
# k8s.io/kubernetes@v1.x.y's go.mod points at ./staging, and that the module
# proxy actually has at v0.x.y (some staging dirs are never published).
set -eu
KV=${1:?kubernetes version, e.g. v1.37.2}
SV=v0.${KV#v1.}
GOMOD=$(go mod download -json "k8s.io/kubernetes@$KV" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
echo "# k8s.io/kubernetes $KV -> staging $SV" >&2
grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$GOMOD" | awk '{print $1}' | while read -r m; do
  if go list -m "$m@$SV" >/dev/null 2>&1; then
    echo "replace $m => $m $SV"
  else
    echo "# skipped (not on proxy at $SV): $m" >&2
  fi
done
