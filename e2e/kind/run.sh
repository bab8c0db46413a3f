#!/usr/bin/env bash
# The e2e suite against a throwaway kind cluster, then what needs real pods: the images built
# from docker/, the operator's leader election, a filter pushed to a registry in the cluster,
# applied as a WasmFilter, and requests through a dataplane. Needs Docker, kind, cargo, and
# kubectl and Helm (the pinned builds from e2e/cluster and e2e/helm if present, else PATH).
#
#   e2e/kind/run.sh              # KEEP=1 keeps the cluster; KIND_CLUSTER names it
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
name=${KIND_CLUSTER:-wasmfilter-e2e}
work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
ns=wasmfilter-system
pids=()

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	if [ "${KEEP:-0}" = 1 ]; then
		echo "kept kind cluster $name (KUBECONFIG=$KUBECONFIG)"
	else
		kind delete cluster --name "$name" >/dev/null 2>&1 || true
		rm -rf "$work"
	fi
}
trap cleanup EXIT

cache=${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}/e2e
kube_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' e2e/cluster/go.mod | head -n1)
helm_version=$(awk '$1 == "helm.sh/helm/v3" {print $2}' e2e/helm/go.mod | head -n1)
kubectl=$cache/kubectl-$kube_version
[ -x "$kubectl" ] || kubectl=$(command -v kubectl) || fail "no kubectl: run e2e/cluster/build.sh"
helm=$cache/helm-$helm_version/helm
[ -x "$helm" ] || helm=$(command -v helm) || fail "no helm: run e2e/helm/build.sh"
for tool in docker kind cargo curl; do
	command -v "$tool" >/dev/null || fail "$tool is not installed"
done
k() { "$kubectl" "$@"; }

step "kind cluster $name"
kind create cluster --name "$name" --kubeconfig "$KUBECONFIG" --wait 120s

step "images (docker/*.Dockerfile), tagged as the chart's defaults and loaded into kind"
app_version=$(awk '$1 == "appVersion:" {gsub(/"/, "", $2); print $2}' charts/wasmfilter/Chart.yaml)
for component in operator dataplane; do
	image=wasmfilter/$component:$app_version
	docker build -f "docker/$component.Dockerfile" -t "$image" .
	kind load docker-image "$image" --name "$name"
done

step "the Rust e2e suite against kind (installs the chart as release wasmfilter in $ns)"
WASMFILTER_E2E_KUBECONFIG=$KUBECONFIG WASMFILTER_E2E_KUBECTL=$kubectl WASMFILTER_E2E_HELM=$helm \
	cargo test -p wasmfilter-e2e

step "a registry in the cluster"
k create namespace registry
k -n registry create deployment registry --image=registry:2 --port=5000
k -n registry expose deployment registry --port=5000
k -n registry rollout status deployment/registry --timeout=180s
registry=registry.registry.svc:5000

step "the release with that registry allowed over plain HTTP and the built-in echo upstream"
"$helm" upgrade wasmfilter charts/wasmfilter --namespace "$ns" --reuse-values \
	--set "operator.insecureRegistries={$registry}" \
	--set-json 'dataplane.clusters=[{"name":"backend","builtin":"echo"}]'
# Not `rollout status` for the operator: only its leader is ever ready (see values.yaml).
k -n "$ns" rollout status daemonset/wasmfilter-dataplane --timeout=300s

step "one leader: the Lease holder is the only ready operator pod"
leader() { k -n "$ns" get lease wasmfilter-operator -o jsonpath='{.spec.holderIdentity}'; }
ready_operators() {
	k -n "$ns" get pods -l app.kubernetes.io/component=operator \
		-o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
		awk '$2 == "True" {print $1}'
}
for _ in $(seq 150); do [ -n "$(leader)" ] && [ "$(ready_operators)" = "$(leader)" ] && break; sleep 2; done
[ "$(ready_operators)" = "$(leader)" ] || fail "ready operators [$(ready_operators)] != lease holder [$(leader)]"
echo "leader: $(leader)"

step "push the header_rewrite filter (built from source) through a port-forward"
module=$(cargo xtask filters | grep '/header_rewrite.wasm$')
k -n registry port-forward svc/registry 5001:5000 >/dev/null 2>&1 &
pids+=($!)
sleep 2
cargo run -q -p wasmfilter-operator -- push --insecure "$module" 127.0.0.1:5001/filters/header_rewrite:v1

step "apply the example WasmFilter, pointed at the in-cluster registry"
sed "s|image: .*|image: $registry/filters/header_rewrite:v1|" examples/wasmfilter.yaml | k apply -f -
nodes=$(k get nodes -o name | wc -l)
k wait wasmfilter/header-rewrite -n default --timeout=180s \
	--for=jsonpath='{.status.dataplanes.ready}'="$nodes"
k get wasmfilters -A -o wide

step "a request through a dataplane runs the filter"
k -n "$ns" port-forward svc/wasmfilter-dataplane 18080:80 >/dev/null 2>&1 &
pids+=($!)
sleep 2
check_request() {
	curl -fsS -D - -o /dev/null -H 'Host: api.test' http://127.0.0.1:18080/api/hello |
		tr -d '\r' | grep -qi '^x-filtered-by: wasmfilter$'
}
check_request || fail "the response lacks x-filtered-by from the filter"

step "failover: delete the leader; another replica takes the Lease; the dataplanes keep serving"
old=$(leader)
k -n "$ns" delete pod "$old" --wait=false
for _ in $(seq 60); do
	new=$(leader)
	[ -n "$new" ] && [ "$new" != "$old" ] && [ "$(ready_operators)" = "$new" ] && break
	check_request || fail "a request failed during the failover"
	sleep 2
done
[ "$(leader)" != "$old" ] || fail "the Lease stayed with the deleted pod $old"
echo "new leader: $(leader)"
check_request || fail "no filter after the failover"
k wait wasmfilter/header-rewrite -n default --timeout=120s \
	--for=jsonpath='{.status.dataplanes.ready}'="$nodes"

step "passed"
