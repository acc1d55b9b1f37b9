#!/usr/bin/env bash
# Runs the router workloads of design.md §9 on Enmesh and on its AMQP 1.0 peers (RabbitMQ 3.10
# with the AMQP 1.0 plugin, the Qpid Proton-C example broker) in the same run, with the same
# load generator, and prints every figure plus the ratios. Servers are pinned to core 0 and the
# load generator to core 1; each workload is run RUNS times and the median is reported.
#
#   bash bench/run.sh                 # all systems
#   SYSTEMS=enmesh bash bench/run.sh  # only Enmesh
#   RUNS=5 COUNT=400000 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-3}
COUNT=${COUNT:-200000}
PEER_COUNT=${PEER_COUNT:-50000}
IDLE_CONNS=${IDLE_CONNS:-1000}
SYSTEMS=${SYSTEMS:-"enmesh rabbitmq proton"}
out=${OUT:-$root/bench-data/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

cargo build --release --locked -p enmesh -p enmesh-bench >&2
bench="$root/target/release/enmesh-bench"
if [[ " $SYSTEMS " != " enmesh " ]]; then bash bench/peers/install.sh >&2; fi

ENMESH_PORT=5690 RABBIT_PORT=5691 PROTON_PORT=5692

start_system() {   # name -> sets PID URL ADDR N
  case $1 in
    enmesh)
      taskset -c 0 "$root/target/release/enmesh" standalone --listen 127.0.0.1:$ENMESH_PORT \
        --http 127.0.0.1:0 > "$out/enmesh.log" 2>&1 &
      PID=$!
      for _ in $(seq 100); do grep -q "enmesh ready" "$out/enmesh.log" && break; sleep 0.05; done
      URL=127.0.0.1:$ENMESH_PORT ADDR=bench N=$COUNT ;;
    rabbitmq)
      PID=$(taskset -c 0 bash bench/peers/rabbitmq.sh start $RABBIT_PORT | tail -1)
      URL=127.0.0.1:$RABBIT_PORT ADDR=/queue/bench N=$PEER_COUNT ;;
    proton)
      PID=$(taskset -c 0 bash bench/peers/proton-broker.sh start $PROTON_PORT | tail -1)
      URL=127.0.0.1:$PROTON_PORT ADDR=bench N=$PEER_COUNT ;;
  esac
}

stop_system() {
  case $1 in
    enmesh) kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true ;;
    rabbitmq) bash bench/peers/rabbitmq.sh stop $RABBIT_PORT >&2 || true ;;
    proton) bash bench/peers/proton-broker.sh stop $PROTON_PORT >&2 || true ;;
  esac
}

field() { grep -o "$2=[^ ]*" <<<"$1" | head -1 | cut -d= -f2; }

median_run() {   # label args... -> prints the median line by rate
  local label=$1 addr=$2; shift 2
  local lines=()
  for i in $(seq "$RUNS"); do
    local l
    # A fresh address per run: a broker keeps what a previous run left in its queue.
    l=$(taskset -c 1 "$bench" amqp --label "$label" --address "$addr-$RANDOM-$i" "$@" 2>&1 | tail -1)
    echo "  $l" >&2
    lines+=("$l")
  done
  printf '%s\n' "${lines[@]}" | sort -t= -k1,1 | awk '
    { match($0, /rate=[0-9]+/); r = substr($0, RSTART + 5, RLENGTH - 5); print r "\t" $0 }' |
    sort -n | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { sub(/^[0-9]+\t/, ""); print }'
}

declare -A R
for sys in $SYSTEMS; do
  echo "== $sys" >&2
  start_system "$sys"
  sleep 1
  common=(--url "$URL" --server-pid "$PID" --size 100)
  R[$sys,unsettled]=$(median_run "$sys" "$ADDR" "${common[@]}" --count "$N" --warmup $((N / 10)))
  R[$sys,presettled]=$(median_run "$sys" "$ADDR" "${common[@]}" --count "$N" --warmup $((N / 10)) --presettled)
  R[$sys,latency]=$(median_run "$sys" "$ADDR" "${common[@]}" --count 50000 --warmup 5000 --rate 10000)
  R[$sys,idle]=$(taskset -c 1 "$bench" idle --label "$sys" --url "$URL" --address "$ADDR" \
    --connections "$IDLE_CONNS" --server-pid "$PID" 2>&1 | tail -1)
  echo "  ${R[$sys,idle]}" >&2
  stop_system "$sys"
  sleep 1
done

{
  echo "# bench/run.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS"
  for w in unsettled presettled latency idle; do
    for sys in $SYSTEMS; do echo "${R[$sys,$w]}"; done
  done
  echo
  echo "| workload | $(for s in $SYSTEMS; do printf '%s | ' "$s"; done)"
  echo "|---|$(for s in $SYSTEMS; do printf -- '---|'; done)"
  for w in unsettled presettled; do
    printf '| %s msg/s |' "$w"
    for s in $SYSTEMS; do printf ' %s |' "$(field "${R[$s,$w]}" rate)"; done
    echo
  done
  printf '| latency p50/p99 µs at 10k msg/s |'
  for s in $SYSTEMS; do printf ' %s / %s |' "$(field "${R[$s,latency]}" p50)" "$(field "${R[$s,latency]}" p99)"; done
  echo
  printf '| idle connection bytes |'
  for s in $SYSTEMS; do printf ' %s |' "$(field "${R[$s,idle]}" per_connection)"; done
  echo
  if [[ " $SYSTEMS " == *" enmesh "* ]]; then
    for s in $SYSTEMS; do
      [ "$s" = enmesh ] && continue
      for w in unsettled presettled; do
        a=$(field "${R[enmesh,$w]}" rate) b=$(field "${R[$s,$w]}" rate)
        [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" -v s="$s" -v w="$w" \
          'BEGIN { if (b > 0) printf "ratio enmesh/%s %s: %.1fx\n", s, w, a / b }'
      done
    done
  fi
} | tee "$out/summary.txt"
