#!/usr/bin/env bash
# Durable queue, 1 producer / 1 consumer, 100 B, durable messages, unsettled (the producer's
# `accepted` means stored): Enmesh standalone (one-replica shard, fsync before accept) against
# RabbitMQ 3.10 durable classic queue and quorum queue (AMQP 1.0 plugin), same load generator,
# same run. Server on core 0, load on core 1, median of RUNS.
#
#   bash bench/durable.sh            RUNS=5 COUNT=100000 bash bench/durable.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-3}
COUNT=${COUNT:-100000}
PEER_COUNT=${PEER_COUNT:-30000}
LAT_RATE=${LAT_RATE:-200}
LAT_COUNT=${LAT_COUNT:-2000}
out=${OUT:-$root/bench-data/durable-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release --locked -p enmesh -p enmesh-bench >&2
bash bench/peers/install.sh >&2
bench="$root/target/release/enmesh-bench"
. bench/lib.sh
RPORT=5694


echo "== enmesh" >&2
rm -rf "$out/enmesh-data"
printf 'addresses:\n  - prefix: q/\n    type: queue\n' > "$out/enmesh.yaml"
taskset -c 0 "$root/target/release/enmesh" standalone --config "$out/enmesh.yaml" \
  --data "$out/enmesh-data" --listen 127.0.0.1:5693 --http 127.0.0.1:0 > "$out/enmesh.log" 2>&1 &
EPID=$!
for _ in $(seq 100); do grep -q "enmesh ready" "$out/enmesh.log" && break; sleep 0.05; done
E=$(median enmesh q/bench --durable --url 127.0.0.1:5693 --server-pid $EPID --count "$COUNT" --warmup $((COUNT / 10)))
EL=$(latency enmesh-latency q/latency --durable --url 127.0.0.1:5693 --server-pid $EPID)
kill $EPID; wait $EPID 2>/dev/null || true

echo "== rabbitmq" >&2
RPID=$(taskset -c 0 bash bench/peers/rabbitmq.sh start $RPORT | tail -1)
for i in $(seq "$RUNS"); do
  bash bench/peers/rabbitmq.sh declare $RPORT "dq$i" durable >&2
  bash bench/peers/rabbitmq.sh declare $RPORT "qq$i" quorum >&2
done
C=$(median rabbitmq-classic /amq/queue/dq --durable --url 127.0.0.1:$RPORT --server-pid "$RPID" --count "$PEER_COUNT" --warmup $((PEER_COUNT / 10)))
Q=$(median rabbitmq-quorum /amq/queue/qq --durable --url 127.0.0.1:$RPORT --server-pid "$RPID" --count "$PEER_COUNT" --warmup $((PEER_COUNT / 10)))
bash bench/peers/rabbitmq.sh declare $RPORT dlat durable >&2
bash bench/peers/rabbitmq.sh declare $RPORT qlat quorum >&2
CL=$(latency rabbitmq-classic-latency /amq/queue/dlat --durable --url 127.0.0.1:$RPORT --server-pid "$RPID")
QL=$(latency rabbitmq-quorum-latency /amq/queue/qlat --durable --url 127.0.0.1:$RPORT --server-pid "$RPID")
bash bench/peers/rabbitmq.sh stop $RPORT >&2

{
  echo "# bench/durable.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS"
  printf '%s\n%s\n%s\n%s\n%s\n%s\n' "$E" "$C" "$Q" "$EL" "$CL" "$QL"
  awk -v e="$(rate "$E")" -v c="$(rate "$C")" -v q="$(rate "$Q")" 'BEGIN {
    if (c > 0) printf "ratio enmesh/rabbitmq-classic-durable: %.1fx\n", e / c;
    if (q > 0) printf "ratio enmesh/rabbitmq-quorum: %.1fx\n", e / q }'
} | tee "$out/summary.txt"
