#!/usr/bin/env bash
# Starts three `enmesh broker`s (3 shards, 3 replicas each) and one `enmesh router` on this
# machine, with data and logs under DIR (default ./enmesh-cluster).
#
#   bash scripts/local-cluster.sh start [DIR]   # prints the router's AMQP and HTTP addresses
#   bash scripts/local-cluster.sh stop [DIR]
#
# Ports: brokers 5801-5803 (routers) and 5901-5903 (Raft), router 5672 / HTTP 8080; set
# BASE_CLIENT, BASE_RAFT, AMQP, HTTP to move them. SHARDS (default 3) sets the number of
# shards; ENMESH (default: the release binary, built if missing) picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-start}
dir=${2:-./enmesh-cluster}
BASE_CLIENT=${BASE_CLIENT:-5800}
BASE_RAFT=${BASE_RAFT:-5900}
AMQP=${AMQP:-127.0.0.1:5672}
HTTP=${HTTP:-127.0.0.1:8080}
SHARDS=${SHARDS:-3}
bin=${ENMESH:-target/release/enmesh}

cluster() {  # [node_id]
  local i
  echo "broker:"
  echo "  cluster:"
  if [ -n "${1:-}" ]; then echo "    node_id: $1"; fi
  echo "    shards: $SHARDS"
  echo "    replicas: 3"
  echo "    brokers:"
  for i in 1 2 3; do
    echo "      $i: {raft: \"127.0.0.1:$((BASE_RAFT + i))\", client: \"127.0.0.1:$((BASE_CLIENT + i))\"}"
  done
}

case "$cmd" in
  start)
    [ -x "$bin" ] || cargo build --release --locked -p enmesh
    mkdir -p "$dir"
    for i in 1 2 3; do
      cluster "$i" > "$dir/broker-$i.yaml"
      "$bin" broker --config "$dir/broker-$i.yaml" --data "$dir/broker-$i" > "$dir/broker-$i.log" 2>&1 &
      echo $! > "$dir/broker-$i.pid"
    done
    for i in 1 2 3; do
      for _ in $(seq 300); do grep -q "enmesh broker ready" "$dir/broker-$i.log" && break; sleep 0.1; done
    done
    { cluster; printf 'addresses:\n  - prefix: "q/"\n    type: queue\n  - prefix: "t/"\n    type: topic\n'; } > "$dir/router.yaml"
    "$bin" router --config "$dir/router.yaml" --listen "$AMQP" --http "$HTTP" > "$dir/router.log" 2>&1 &
    echo $! > "$dir/router.pid"
    for _ in $(seq 300); do grep -q "enmesh ready" "$dir/router.log" && break; sleep 0.1; done
    grep "enmesh ready" "$dir/router.log"
    ;;
  stop)
    for f in "$dir"/*.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
