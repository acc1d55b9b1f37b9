#!/usr/bin/env bash
# Backlog: COUNT (default 10M) x 100 B durable messages into one queue with no consumer, then
# RSS of the standalone process (design.md §9: floor 512 MiB, goal 128 MiB), restart time with
# that backlog (SIGKILL, start, until "enmesh ready"), RSS after restart, and the drain rate
# with one consumer (goal: at least half the normal 1P/1C rate). Server on core 0, load on 1.
#
#   bash bench/backlog.sh           COUNT=1000000 bash bench/backlog.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
COUNT=${COUNT:-10000000}
DRAIN=${DRAIN:-$COUNT}
out=${OUT:-$root/bench-data/backlog-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release --locked -p enmesh -p enmesh-bench >&2
bench="$root/target/release/enmesh-bench"
PORT=5695
printf 'addresses:\n  - prefix: q/\n    type: queue\n' > "$out/enmesh.yaml"

N=0
start() {  # sets EPID and SECS (seconds from spawn to "enmesh ready")
  local t0 log
  N=$((N + 1)); log="$out/enmesh-$N.log"
  t0=$(date +%s.%N)
  taskset -c 0 "$root/target/release/enmesh" standalone --config "$out/enmesh.yaml" \
    --data "$out/data" --listen 127.0.0.1:$PORT --http 127.0.0.1:0 > "$log" 2>&1 &
  EPID=$!
  until grep -q "enmesh ready" "$log"; do
    kill -0 $EPID 2>/dev/null || { echo "enmesh exited" >&2; tail "$log" >&2; exit 1; }
    sleep 0.01
  done
  SECS=$(echo "$(date +%s.%N) - $t0" | bc)
}
rss() { awk '/^VmRSS/ {printf "%d MiB", $2/1024}' /proc/$EPID/status; }
hwm() { awk '/^VmHWM/ {printf "%d MiB", $2/1024}' /proc/$EPID/status; }

rm -rf "$out/data"
start
echo "== fill: $COUNT messages" >&2
taskset -c 1 "$bench" amqp --label fill --address q/backlog --durable --produce-only \
  --url 127.0.0.1:$PORT --count "$COUNT" --warmup 0 --server-pid $EPID --timeout 3600 | tee "$out/fill.txt"
sleep 2
echo "after fill: rss=$(rss) hwm=$(hwm) disk=$(du -sh "$out/data" | cut -f1)" | tee "$out/summary.txt"
kill -9 $EPID; wait $EPID 2>/dev/null || true
start
sleep 1
echo "restart (SIGKILL, start, ready) with $COUNT queued: ${SECS}s; rss=$(rss) hwm=$(hwm)" | tee -a "$out/summary.txt"
echo "== drain: $DRAIN messages" >&2
taskset -c 1 "$bench" amqp --label drain --address q/backlog --consume-only \
  --url 127.0.0.1:$PORT --count "$DRAIN" --warmup 0 --server-pid $EPID --timeout 3600 | tee "$out/drain.txt"
echo "after drain: rss=$(rss) hwm=$(hwm) disk=$(du -sh "$out/data" | cut -f1)" | tee -a "$out/summary.txt"
kill $EPID; wait $EPID 2>/dev/null || true
cat "$out/summary.txt"
