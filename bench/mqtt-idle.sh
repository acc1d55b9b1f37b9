#!/usr/bin/env bash
# MQTT CONNECT rate and idle memory per connection (design.md §9 MQTT rows): N connections
# (default 15,000) opened one after another, each CONNECT (3.1.1, clean session) + SUBSCRIBE to
# a topic of its own, each waited for; then the server's RSS growth / N. Enmesh standalone
# (gateway, router and broker shard in one process, so everything a device costs is counted)
# against mosquitto 2.0.11 and ActiveMQ 5.17's MQTT transport (Debian), same load generator,
# same run. Server on core 0, load generator on core 1.
#
#   bash bench/mqtt-idle.sh            N=5000 bash bench/mqtt-idle.sh      AMQ=0: no ActiveMQ
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
N=${N:-15000}
out=${OUT:-$root/bench-data/mqtt-idle-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
. bench/mqtt-lib.sh
mqtt_setup
# Each side holds N sockets (and Enmesh a few more for its router connections).
ulimit -n 20000
bench="$root/target/release/enmesh-bench"
E_PORT=${E_PORT:-18861}
M_PORT=${M_PORT:-18862}
A_PORT=${A_PORT:-18863}
AMQ=${AMQ:-1}

echo "== enmesh standalone (MQTT gateway)" >&2
start_enmesh_mqtt "$E_PORT"
trap 'kill $epid 2>/dev/null || true; [ -n "${mpid:-}" ] && kill "$mpid" 2>/dev/null || true; [ "$AMQ" = 1 ] && bash bench/peers/activemq.sh stop "$A_PORT"' EXIT
E=$(taskset -c 1 "$bench" mqtt-idle --label enmesh --url "127.0.0.1:$E_PORT" \
  --connections "$N" --server-pid "$epid" 2>&1 | tail -1)
echo "  $E" >&2
stop_pid "$epid"

echo "== mosquitto 2.0.11" >&2
start_mosquitto "$M_PORT"
M=$(taskset -c 1 "$bench" mqtt-idle --label mosquitto --url "127.0.0.1:$M_PORT" \
  --connections "$N" --server-pid "$mpid" 2>&1 | tail -1)
echo "  $M" >&2
stop_pid "$mpid"

A=""
if [ "$AMQ" = 1 ]; then
  echo "== activemq 5.17 (MQTT)" >&2
  apid=$(taskset -c 0 bash bench/peers/activemq.sh start "$A_PORT")
  A=$(taskset -c 1 "$bench" mqtt-idle --label activemq --url "127.0.0.1:$A_PORT" \
    --connections "$N" --server-pid "$apid" 2>&1 | tail -1)
  echo "  $A" >&2
  bash bench/peers/activemq.sh stop "$A_PORT"
fi

{
  echo "# bench/mqtt-idle.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) N=$N"
  printf '%s\n%s\n' "$E" "$M"
  [ -n "$A" ] && printf '%s\n' "$A"
  e=$(grep -o 'rate=[0-9]*' <<<"$E" | cut -d= -f2)
  for peer in "$M" "$A"; do
    p=$(grep -o 'rate=[0-9]*' <<<"$peer" | cut -d= -f2 || true)
    [ -n "$p" ] && awk -v e="$e" -v p="$p" -v l="${peer%%:*}" \
      'BEGIN { if (p > 0) printf "ratio connect+subscribe enmesh/%s: %.2fx\n", l, e / p }'
  done
  true
} | tee "$out/summary.txt"
