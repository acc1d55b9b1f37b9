#!/usr/bin/env bash
# MQTT, one publisher → one subscriber on one topic, 100 B payloads (design.md §9 MQTT rows):
# Enmesh standalone (its MQTT gateway; topics are brokered topic addresses) against mosquitto
# 2.0.11 and ActiveMQ 5.17's MQTT transport (both Debian; AMQ=0 skips ActiveMQ), same load generator (`enmesh-bench mqtt`, MQTT 3.1.1), same run. Server on
# core 0, load generator on core 1. QoS 0 all-out, QoS 1 with 100 PUBLISHes in flight; median
# of RUNS; then latency at LAT_RATE msg/s.
#
# mosquitto is configured so that it loses nothing a fair comparison needs: max_queued_messages
# raised to 1,000,000 (the default 1,000 drops silently for a slow subscriber), no inflight
# limit, no persistence (Enmesh stores every message in its shard's log; mosquitto keeps them
# in memory). Enmesh likewise lets 1,000 messages per subscription go unacknowledged
# (`mqtt.inflight`, default 64) instead of mosquitto's unlimited.
#
#   bash bench/mqtt.sh            RUNS=5 COUNT=200000 bash bench/mqtt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-3}
COUNT=${COUNT:-100000}
LAT_RATE=${LAT_RATE:-1000}
LAT_COUNT=${LAT_COUNT:-5000}
out=${OUT:-$root/bench-data/mqtt-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
. bench/mqtt-lib.sh
mqtt_setup
bench="$root/target/release/enmesh-bench"
E_PORT=${E_PORT:-18851}
M_PORT=${M_PORT:-18852}
A_PORT=${A_PORT:-18853}
AMQ=${AMQ:-1}

median() {  # LABEL PORT PID ARGS...
  local label=$1 port=$2 pid=$3 lines=() i; shift 3
  for i in $(seq "$RUNS"); do
    lines+=("$(taskset -c 1 "$bench" mqtt --label "$label" --url "127.0.0.1:$port" \
      --topic "bench/$label/$i" --server-pid "$pid" "$@" 2>&1 | tail -1)")
    echo "  ${lines[-1]}" >&2
  done
  printf '%s\n' "${lines[@]}" | awk '{ match($0, /rate=[0-9]+/); print substr($0, RSTART+5, RLENGTH-5) "\t" $0 }' |
    sort -n | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { sub(/^[0-9]+\t/, ""); print }'
}

run_all() {  # LABEL PORT PID
  median "$1" "$2" "$3" --qos 0 --count "$COUNT" --warmup $((COUNT / 10))
  median "$1" "$2" "$3" --qos 1 --count "$COUNT" --warmup $((COUNT / 10)) --window 100
  taskset -c 1 "$bench" mqtt --label "$1-latency" --url "127.0.0.1:$2" --topic "bench/$1/lat" \
    --server-pid "$3" --qos 1 --rate "$LAT_RATE" --count "$LAT_COUNT" --warmup $((LAT_COUNT / 10)) 2>&1 | tail -1
}

echo "== enmesh standalone (MQTT gateway)" >&2
start_enmesh_mqtt "$E_PORT" fair
trap 'kill $epid 2>/dev/null || true; [ -n "${mpid:-}" ] && kill "$mpid" 2>/dev/null || true; bash bench/peers/activemq.sh stop "$A_PORT"' EXIT
E=$(run_all enmesh "$E_PORT" "$epid")
stop_pid "$epid"

echo "== mosquitto 2.0.11" >&2
start_mosquitto "$M_PORT" fair
M=$(run_all mosquitto "$M_PORT" "$mpid")
stop_pid "$mpid"

A=""
if [ "$AMQ" = 1 ]; then
  echo "== activemq 5.17 (MQTT)" >&2
  apid=$(taskset -c 0 bash bench/peers/activemq.sh start "$A_PORT")
  A=$(run_all activemq "$A_PORT" "$apid")
  bash bench/peers/activemq.sh stop "$A_PORT"
fi

{
  echo "# bench/mqtt.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS COUNT=$COUNT"
  printf '%s\n%s\n%s\n' "$E" "$M" "$A"
  for q in 0 1; do
    e=$(grep "qos=$q " <<<"$E" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2 || true)
    m=$(grep "qos=$q " <<<"$M" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2 || true)
    a=$(grep "qos=$q " <<<"$A" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2 || true)
    awk -v e="$e" -v m="$m" -v q="$q" 'BEGIN { if (m > 0) printf "ratio qos %d enmesh/mosquitto: %.2fx\n", q, e / m }'
    awk -v e="$e" -v m="${a:-0}" -v q="$q" 'BEGIN { if (m > 0) printf "ratio qos %d enmesh/activemq: %.2fx\n", q, e / m }'
  done
} | tee "$out/summary.txt"
