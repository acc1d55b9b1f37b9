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
# in memory).
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
cargo build --release --locked -p enmesh -p enmesh-bench >&2
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
fi
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
rm -rf "$out/enmesh-data"
taskset -c 0 "$root/target/release/enmesh" standalone --listen 127.0.0.1:0 --http 127.0.0.1:0 \
  --mqtt "127.0.0.1:$E_PORT" --data "$out/enmesh-data" > "$out/enmesh.log" 2>&1 &
epid=$!
trap 'kill $epid 2>/dev/null || true; kill ${mpid:-0} 2>/dev/null || true; bash bench/peers/activemq.sh stop "$A_PORT"' EXIT
for _ in $(seq 100); do grep -q "enmesh ready" "$out/enmesh.log" && break; sleep 0.1; done
E=$(run_all enmesh "$E_PORT" "$epid")
kill "$epid"; wait "$epid" 2>/dev/null || true

echo "== mosquitto 2.0.11" >&2
cat > "$out/mosquitto.conf" <<CONF
listener $M_PORT 127.0.0.1
allow_anonymous true
max_queued_messages 1000000
max_inflight_messages 0
persistence false
log_dest none
CONF
taskset -c 0 "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$out/mosquitto.conf" &
mpid=$!
sleep 0.5
M=$(run_all mosquitto "$M_PORT" "$mpid")
kill "$mpid"; wait "$mpid" 2>/dev/null || true

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
    e=$(grep "qos=$q " <<<"$E" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2)
    m=$(grep "qos=$q " <<<"$M" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2)
    a=$(grep "qos=$q " <<<"$A" | grep -v -- "-latency:" | grep -o 'rate=[0-9]*' | head -1 | cut -d= -f2)
    awk -v e="$e" -v m="$m" -v q="$q" 'BEGIN { if (m > 0) printf "ratio qos %d enmesh/mosquitto: %.2fx\n", q, e / m }'
    awk -v e="$e" -v m="${a:-0}" -v q="$q" 'BEGIN { if (m > 0) printf "ratio qos %d enmesh/activemq: %.2fx\n", q, e / m }'
  done
} | tee "$out/summary.txt"
