#!/usr/bin/env bash
# Replicated queue, 3 replicas on 3 processes of this machine, 1 producer / 1 consumer, 1 KB
# durable messages, unsettled (`accepted` = committed on a majority): Enmesh (3 brokers, 3
# shards x 3 replicas, a router; scripts/local-cluster.sh) against a 3-node RabbitMQ 3.10
# cluster with quorum queues (AMQP 1.0 plugin), same load generator, same run. Median of RUNS,
# plus latency with one message in flight (LAT_RATE msg/s).
#
#   bash bench/replicated.sh            RUNS=5 COUNT=50000 bash bench/replicated.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-3}
COUNT=${COUNT:-50000}
PEER_COUNT=${PEER_COUNT:-20000}
LAT_RATE=${LAT_RATE:-200}
LAT_COUNT=${LAT_COUNT:-2000}
out=${OUT:-$root/bench-data/replicated-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release --locked -p enmesh -p enmesh-bench >&2
bash bench/peers/install.sh >&2
bench="$root/target/release/enmesh-bench"
. bench/lib.sh


echo "== enmesh (3 brokers + router)" >&2
AMQP=127.0.0.1:5795 HTTP=127.0.0.1:8795 BASE_CLIENT=5840 BASE_RAFT=5940 \
  bash scripts/local-cluster.sh start "$out/enmesh" >&2
E=$(median enmesh-3-replicas q/bench --durable --size 1024 --url 127.0.0.1:5795 --count "$COUNT" --warmup $((COUNT / 10)))
EL=$(latency enmesh-3-replicas-latency q/latency --durable --size 1024 --url 127.0.0.1:5795)
bash scripts/local-cluster.sh stop "$out/enmesh"

echo "== rabbitmq (3-node cluster, quorum queues)" >&2
P=(5697 5698 5699)
cookie=$(head -c 15 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
for p in "${P[@]}"; do
  d="$root/.peers/rabbitmq/$p"
  mkdir -p "$d"
  rm -f "$d/.erlang.cookie"
  printf '%s' "$cookie" > "$d/.erlang.cookie"
  chmod 400 "$d/.erlang.cookie"
  bash bench/peers/rabbitmq.sh start "$p" >&2
done
for p in "${P[@]:1}"; do
  bash bench/peers/rabbitmq.sh ctl "$p" stop_app >&2
  bash bench/peers/rabbitmq.sh ctl "$p" join_cluster "rabbit-${P[0]}@localhost" >&2
  bash bench/peers/rabbitmq.sh ctl "$p" start_app >&2
done
bash bench/peers/rabbitmq.sh ctl "${P[0]}" cluster_status >&2 || true
for i in $(seq "$RUNS"); do bash bench/peers/rabbitmq.sh declare "${P[0]}" "qq$i" quorum >&2; done
bash bench/peers/rabbitmq.sh declare "${P[0]}" qlat quorum >&2
Q=$(median rabbitmq-quorum-3-nodes /amq/queue/qq --durable --size 1024 --url "127.0.0.1:${P[0]}" --count "$PEER_COUNT" --warmup $((PEER_COUNT / 10)))
QL=$(latency rabbitmq-quorum-3-nodes-latency /amq/queue/qlat --durable --size 1024 --url "127.0.0.1:${P[0]}")
for p in "${P[@]}"; do bash bench/peers/rabbitmq.sh stop "$p" >&2 || true; done

{
  echo "# bench/replicated.sh $(git rev-parse --short HEAD) $(date -u +%Y-%m-%dT%H:%MZ) RUNS=$RUNS"
  printf '%s\n%s\n%s\n%s\n' "$E" "$Q" "$EL" "$QL"
  awk -v e="$(rate "$E")" -v q="$(rate "$Q")" 'BEGIN {
    if (q > 0) printf "ratio enmesh/rabbitmq-quorum-3-nodes: %.1fx\n", e / q }'
} | tee "$out/summary.txt"
