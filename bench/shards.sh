#!/usr/bin/env bash
# Throughput as shards are added: one Enmesh cluster (3 brokers, SHARDS shards x 3 replicas,
# a router; scripts/local-cluster.sh), then K producer/consumer pairs (one load generator on
# core 1), durable 1 KB unsettled, for K = 1, 2, 3, ... up to SHARDS:
#   spread   the K queues sit on K different shards (found with GET /api/v1/placement)
#   one      the K queues sit on the same shard (the control: same clients, one Raft group)
# Median of RUNS per line. Every broker and the router share this machine's two cores, so the
# figures show what a shard costs, not what more machines would give.
#
#   bash bench/shards.sh            RUNS=3 COUNT=30000 SHARDS=6 bash bench/shards.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-3}
COUNT=${COUNT:-30000}
SHARDS=${SHARDS:-6}
KS=${KS:-"1 2 3 6"}
out=${OUT:-$root/bench-data/shards-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release --locked -p enmesh -p enmesh-bench >&2
bench="$root/target/release/enmesh-bench"
. bench/lib.sh
export AMQP=127.0.0.1:5796 HTTP=127.0.0.1:8796 BASE_CLIENT=5860 BASE_RAFT=5960 SHARDS
bash scripts/local-cluster.sh start "$out/enmesh" >&2
trap 'bash scripts/local-cluster.sh stop "$out/enmesh"' EXIT
# Spread the leaders: shard s led by broker s mod 3 + 1 (the broker that initialised every
# group leads them all at first).
for s in $(seq 0 $((SHARDS - 1))); do
  "$root/target/release/enmesh" cluster --config "$out/enmesh/router.yaml" lead --shard "$s" --to $((s % 3 + 1)) >&2
done

shard_of() { curl -sf "http://$HTTP/api/v1/placement/$1" | grep -o '"shard":[0-9]*' | cut -d: -f2; }

# addrs RUN K MODE: K queue names for run RUN, on K shards (spread) or on shard 0 (one).
addrs() {
  local run=$1 k=$2 mode=$3 i=0 s picked=() seen=" "
  while [ "${#picked[@]}" -lt "$k" ]; do
    i=$((i + 1))
    s=$(shard_of "q/$mode-$k-$run-$i")
    if [ "$mode" = one ] && [ "$s" != 0 ]; then continue; fi
    if [ "$mode" = spread ] && [[ "$seen" == *" $s "* ]]; then continue; fi
    seen="$seen$s "
    picked+=("q/$mode-$k-$run-$i")
  done
  local IFS=,
  echo "${picked[*]}"
}

run() {  # K MODE
  local k=$1 mode=$2 lines=() r
  for r in $(seq "$RUNS"); do
    lines+=("$(taskset -c 1 "$bench" amqp --label "$mode-k$k" --address "$(addrs "$r" "$k" "$mode")" \
      --durable --size 1024 --url "$AMQP" --count "$COUNT" --warmup $((COUNT / 10)) 2>&1 | tail -1)")
    echo "  ${lines[-1]}" >&2
  done
  printf '%s\n' "${lines[@]}" | awk '{ match($0, /rate=[0-9]+/); print substr($0, RSTART+5, RLENGTH-5) "\t" $0 }' |
    sort -n | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { sub(/^[0-9]+\t/, ""); print }'
}

{
  echo "# bench/shards.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS SHARDS=$SHARDS COUNT=$COUNT"
  "$root/target/release/enmesh" cluster --config "$out/enmesh/router.yaml" status 2>/dev/null |
    python3 -c 'import json, sys
lead = {s["shard"]: b["broker"] for b in map(json.loads, sys.stdin) for s in b.get("shards", []) if s["leading"]}
print("# leaders (shard: broker):", dict(sorted(lead.items())))' || true
  for k in $KS; do
    [ "$k" -le "$SHARDS" ] || continue
    run "$k" spread
    [ "$k" = 1 ] || run "$k" one
  done
} | tee "$out/summary.txt"
