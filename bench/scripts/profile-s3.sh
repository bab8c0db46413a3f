#!/bin/bash
# Profiles S3 (GET through the dataplane with one header filter) with callgrind, for the
# no-filter, native-filter and Wasm-filter chains, and prints instructions per request and the
# top inclusive costs of each. perf is not available on the development VM; callgrind counts
# instructions (not time), deterministically. Usage (after `cargo xtask bench` built things):
#
#   bash bench/scripts/profile-s3.sh [REQUESTS]       # default 3000 per chain
#
# Output: target/bench/profile/{none,native,wasm}.callgrind and .txt (callgrind_annotate).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
requests=${1:-3000}
out=$root/target/bench/profile
mkdir -p "$out"
dp=$root/target/release/wasmfilter-dataplane
module=$root/target/filters/wasm32-wasip1/release/header_rewrite.wasm
[ -x "$dp" ] && [ -f "$module" ] || { echo "build first: cargo xtask bench (or cargo build --release -p wasmfilter-dataplane; cargo xtask filters)" >&2; exit 1; }
backend=18680 proxy=18681 admin=18682

cat > "$out/backend.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $out/backend.pid; error_log $out/backend.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $out; proxy_temp_path $out; fastcgi_temp_path $out; uwsgi_temp_path $out; scgi_temp_path $out;
  server { listen 127.0.0.1:$backend; location / { return 200 "hello"; } } }
CONF
nginx -c "$out/backend.conf" -p "$out" &
nginx_pid=$!
trap 'kill $nginx_pid 2>/dev/null || true' EXIT

wait_port() {
  i=0
  while ! (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo "port $1 never opened" >&2; exit 1; }
    sleep 0.1
  done
}
wait_port $backend

for chain in none native wasm; do
  case $chain in
    none) filters="  []" ;;
    native) filters="  - name: f0
    native: header_rewrite
    config: '{\"response\": {\"add\": {\"x-bench\": \"1\"}}}'" ;;
    wasm) filters="  - name: f0
    module: $module
    config: '{\"response\": {\"add\": {\"x-bench\": \"1\"}}}'" ;;
  esac
  cat > "$out/$chain.yaml" <<CONF
listen: 127.0.0.1:$proxy
admin: 127.0.0.1:$admin
workers: 1
routes: [{name: all, cluster: backend}]
clusters: [{name: backend, endpoints: ["127.0.0.1:$backend"]}]
filters:
$filters
CONF
  # Instrumentation starts after the dataplane listens, so compiling and starting the filter
  # are not counted; 200 warm-up requests are not counted either.
  WASMFILTER_ON_DEMAND_INSTANCES=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/$chain.callgrind" \
    "$dp" --config "$out/$chain.yaml" > "$out/$chain.log" 2>&1 &
  vg=$!
  wait_port $proxy
  i=0; while [ $i -lt 200 ]; do curl -s -o /dev/null "http://127.0.0.1:$proxy/w"; i=$((i + 1)); done
  callgrind_control -i on $vg > /dev/null
  # One keep-alive connection, a fixed number of requests (oha -n), so the count is per request.
  "${OHA:-$HOME/.cache/wasmfilter/tools/oha-1.16.0/bin/oha}" -n "$requests" -c 1 --no-tui --output-format quiet "http://127.0.0.1:$proxy/bench"
  callgrind_control -i off $vg > /dev/null
  kill -TERM $vg; wait $vg || true
  total=$(grep '^totals:' "$out/$chain.callgrind" | awk '{print $2}')
  echo "$chain: $((total / requests)) instructions per request ($total over $requests requests)"
  callgrind_annotate --inclusive=yes "$out/$chain.callgrind" 2>/dev/null | head -60 > "$out/$chain.txt"
  wait_port_free=0; while (exec 3<>/dev/tcp/127.0.0.1/$proxy) 2>/dev/null; do sleep 0.1; wait_port_free=$((wait_port_free + 1)); [ $wait_port_free -lt 100 ] || break; done
done
