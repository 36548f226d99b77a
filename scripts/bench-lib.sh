# Shared by the scripts/bench-* programs (sourced, not run): a release gateway on a
# random port with a fresh PKI and store in a temporary directory, and simulated devices.
#
#   bench_setup N            build, make the PKI with N devices; sets $work, $bin
#   bench_gateway [ARGS...]  start the gateway (API on $api); sets $gw, $port, $api, $token
#   bench_sim N ARGS...      start device-sim in the background; sets $sim
#   bench_wait_connected N   wait until the simulator says all N are connected; sets $ramp
#   bench_nats_ports         pick the ports of a 3-node NATS cluster; sets $base, $urls
#   bench_nats_start         start it (JetStream, a cluster on loopback), wait for its
#                            meta leader; sets $nodes (their pids)
#
# $bench_data (default $work/data) is the data directory bench_gateway uses.

bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bench_cleanup() {
  kill "${gw:-}" "${sim:-}" "${nodes[@]:-}" 2>/dev/null || true
  rm -rf "${work:-}"
}

bench_setup() {
  work="$(mktemp -d)"
  trap bench_cleanup EXIT
  cargo build -q --release --manifest-path "$bench_root/Cargo.toml" -p gateway -p certs
  cargo build -q --release --manifest-path "$bench_root/Cargo.toml" -p device-client \
    --features sim --bin device-sim
  bin="$bench_root/target/release"
  "$bin/certs" init --dir "$work/certs" >/dev/null
  "$bin/certs" devices --dir "$work/certs" --prefix sim- --count "$1" >/dev/null 2>&1
}

bench_gateway() {
  port=$((20000 + RANDOM % 20000))
  api=$((port + 1))
  "$bin/gateway" run --ca "$work/certs/ca.pem" --cert "$work/certs/gateway.pem" \
    --key "$work/certs/gateway.key.pem" --crl "$work/certs/crl.pem" --data-dir "${bench_data:-$work/data}" \
    --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$api" "$@" 2>"$work/gw.log" &
  gw=$!
  until grep -q "listening for devices" "$work/gw.log"; do
    kill -0 "$gw" || { tail "$work/gw.log"; exit 1; }
    sleep 0.2
  done
  token="$(cat "${bench_data:-$work/data}/api-token" 2>/dev/null || true)"
}

bench_sim() {
  local n="$1"
  shift
  "$bin/device-sim" --gateway "127.0.0.1:$port" --certs "$work/certs" --devices "$n" "$@" \
    >"$work/sim.out" 2>"$work/sim.log" &
  sim=$!
}

bench_wait_connected() {
  local start=$SECONDS
  until grep -qs "all $1 devices connected" "$work/sim.log"; do
    kill -0 "$sim" || { tail "$work/sim.log"; exit 1; }
    sleep 0.2
  done
  ramp=$((SECONDS - start))
}

bench_nats_ports() {
  nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
  [ -x "$nats_bin" ] || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 1; }
  base=$((30000 + RANDOM % 20000))
  urls="nats://127.0.0.1:$base,nats://127.0.0.1:$((base + 1)),nats://127.0.0.1:$((base + 2))"
}

# One key per line (nats-server 2.9's parser wants a newline or comma after a quoted
# value in a block) and commas between routes.
bench_nats_start() {
  local routes i
  routes="nats-route://127.0.0.1:$((base + 10)), nats-route://127.0.0.1:$((base + 11)), nats-route://127.0.0.1:$((base + 12))"
  nodes=()
  for i in 0 1 2; do
    cat >"$work/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((base + i))
http: 127.0.0.1:$((base + 20 + i))
jetstream {
  store_dir: "$work/nats-n$i"
}
cluster {
  name: bench
  listen: 127.0.0.1:$((base + 10 + i))
  routes: [ $routes ]
}
CONF
    "$nats_bin" -c "$work/n$i.conf" 2>"$work/n$i.log" &
    nodes+=($!)
  done
  until curl -sf "http://127.0.0.1:$((base + 20))/jsz" | grep -q '"leader"'; do sleep 0.1; done
}
