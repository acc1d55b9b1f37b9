#!/usr/bin/env bash
# MQTT with many clients at once (design.md §9 MQTT rows), Enmesh standalone against mosquitto
# 2.0.11 and ActiveMQ 5.17 (its MQTT transport; both Debian), same load generator (`enmesh-bench mqtt-many`, MQTT 3.1.1), same run; server
# on core 0, load generator on core 1:
#   - QoS 1, 1k publishers <-> 1k subscribers (pair i on topic bench/pairs/i), each publisher
#     with WINDOW PUBLISHes unacknowledged;
#   - fan-in: FAN publishers (default 10,000), one PUBLISH in flight each, to one subscriber
#     on bench/fan/+.
# mosquitto as in bench/mqtt.sh: max_queued_messages 1,000,000, no in-flight limit, no
# persistence (Enmesh stores every message in its shard's log); Enmesh with 1,000 in flight per
# subscription (`mqtt.inflight`). ActiveMQ: bench/peers/activemq.sh
# (KahaDB as shipped, 1 GB heap). AMQ=0 skips ActiveMQ.
#
#   bash bench/mqtt-many.sh            PAIRS=1000 FAN=10000 COUNT=200000 bash bench/mqtt-many.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PAIRS=${PAIRS:-1000}
FAN=${FAN:-10000}
COUNT=${COUNT:-200000}
WINDOW=${WINDOW:-10}
out=${OUT:-$root/bench-data/mqtt-many-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
. bench/mqtt-lib.sh
mqtt_setup
ulimit -n 20000
bench="$root/target/release/enmesh-bench"
E_PORT=${E_PORT:-18881}
M_PORT=${M_PORT:-18882}
A_PORT=${A_PORT:-18883}
AMQ=${AMQ:-1}

run_all() {  # LABEL PORT PID
  taskset -c 1 "$bench" mqtt-many --label "$1" --url "127.0.0.1:$2" --server-pid "$3" \
    --topic bench/pairs --publishers "$PAIRS" --subscribers "$PAIRS" --qos 1 --window "$WINDOW" \
    --count "$COUNT" --warmup $((COUNT / 10)) 2>&1 | tail -1
  taskset -c 1 "$bench" mqtt-many --label "$1-fan-in" --url "127.0.0.1:$2" --server-pid "$3" \
    --topic bench/fan --publishers "$FAN" --subscribers 1 --qos 1 --window 1 \
    --count "$COUNT" --warmup $((COUNT / 10)) 2>&1 | tail -1
}

echo "== enmesh standalone (MQTT gateway)" >&2
start_enmesh_mqtt "$E_PORT" fair
trap 'kill $epid 2>/dev/null || true; [ -n "${mpid:-}" ] && kill "$mpid" 2>/dev/null || true; bash bench/peers/activemq.sh stop "$A_PORT"' EXIT
E=$(run_all enmesh "$E_PORT" "$epid")
echo "$E" >&2
stop_pid "$epid"

echo "== mosquitto 2.0.11" >&2
start_mosquitto "$M_PORT" fair
M=$(run_all mosquitto "$M_PORT" "$mpid")
echo "$M" >&2
stop_pid "$mpid"

A=""
if [ "$AMQ" = 1 ]; then
  echo "== activemq 5.17 (MQTT)" >&2
  apid=$(taskset -c 0 bash bench/peers/activemq.sh start "$A_PORT")
  A=$(run_all activemq "$A_PORT" "$apid")
  echo "$A" >&2
  bash bench/peers/activemq.sh stop "$A_PORT"
fi

{
  echo "# bench/mqtt-many.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) PAIRS=$PAIRS FAN=$FAN COUNT=$COUNT WINDOW=$WINDOW"
  printf '%s\n%s\n%s\n' "$E" "$M" "$A"
  for kind in "enmesh: " "enmesh-fan-in: "; do
    e=$(grep -F -- "$kind" <<<"$E" | grep -o 'out_rate=[0-9]*' | head -1 | cut -d= -f2 || true)
    for peer in mosquitto activemq; do
      p=$(printf '%s\n%s\n' "$M" "$A" | grep -F -- "${kind/enmesh/$peer}" | grep -o 'out_rate=[0-9]*' | head -1 | cut -d= -f2 || true)
      awk -v e="$e" -v m="${p:-0}" -v k="${kind%: }" -v peer="$peer" 'BEGIN { if (m > 0) printf "ratio %s enmesh/%s (out): %.2fx\n", k, peer, e / m }'
    done
  done
} | tee "$out/summary.txt"
