#!/usr/bin/env bash
# MQTT fan-in (design.md §9: MQTT ≥ 1× mosquitto), Enmesh standalone against mosquitto 2.0.11,
# round after round: in each round a fresh Enmesh, then a fresh mosquitto, take the same load
# (FAN publishers, QoS 1, one PUBLISH in flight each, to one subscriber on bench/fan/+; the
# same load generator, `enmesh-bench mqtt-many`); each round's ratio is taken between the two
# runs of that round, and the median of the rounds is reported. Servers on core 0, load
# generator on core 1, configured as in bench/mqtt-many.sh (mqtt-lib.sh, `fair`).
#
# Why rounds: on this machine a system's rate moves by ±10% from minute to minute; a ratio
# taken between neighbouring runs, and its median over several rounds, is what compares.
# bench/mqtt-many.sh runs fan-in once per system, after its 1k ↔ 1k load.
#
#   bash bench/mqtt-fan-in.sh          RUNS=7 FAN=10000 COUNT=400000 bash bench/mqtt-fan-in.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-5}
FAN=${FAN:-10000}
COUNT=${COUNT:-400000}
out=${OUT:-$root/bench-data/mqtt-fan-in-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
. bench/mqtt-lib.sh
mqtt_setup
ulimit -n 20000
bench="$root/target/release/enmesh-bench"
E_PORT=${E_PORT:-18884}
M_PORT=${M_PORT:-18885}
epid=""; mpid=""
trap 'for p in $epid $mpid; do kill "$p" 2>/dev/null || true; done' EXIT

fan_in() {  # LABEL PORT PID
  taskset -c 1 "$bench" mqtt-many --label "$1" --url "127.0.0.1:$2" --server-pid "$3" \
    --topic bench/fan --publishers "$FAN" --subscribers 1 --qos 1 --window 1 \
    --count "$COUNT" --warmup $((COUNT / 10)) 2>&1 | tail -1
}

out_rate() { grep -o 'out_rate=[0-9]*' | cut -d= -f2; }

{
  echo "# bench/mqtt-fan-in.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS FAN=$FAN COUNT=$COUNT"
  for i in $(seq "$RUNS"); do
    start_enmesh_mqtt "$E_PORT" fair
    e=$(fan_in enmesh-fan-in "$E_PORT" "$epid")
    stop_pid "$epid"
    start_mosquitto "$M_PORT" fair
    m=$(fan_in mosquitto-fan-in "$M_PORT" "$mpid")
    stop_pid "$mpid"
    echo "$e"
    echo "$m"
    awk -v e="$(out_rate <<<"$e")" -v m="$(out_rate <<<"$m")" -v i="$i" \
      'BEGIN { printf "round %d enmesh/mosquitto (out): %.3f\n", i, e / m }'
  done
} | tee "$out/rounds.txt"
grep '^round' "$out/rounds.txt" | awk '{ print $NF }' | sort -n |
  awk -v n="$RUNS" '{ r[NR] = $1 } END { printf "median of %d rounds enmesh/mosquitto fan-in (out): %.2fx (lowest %.2fx, highest %.2fx)\n", n, r[int((n + 1) / 2)], r[1], r[n] }' |
  tee -a "$out/rounds.txt"
