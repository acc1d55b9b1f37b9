# Shared by the bench scripts (sourced): run the load generator RUNS times and keep the median.
#
#   median LABEL ADDRESS-BASE ARGS...   runs `enmesh-bench amqp` on core 1 with --address
#                                       ADDRESS-BASE1..RUNS and ARGS; prints the median line by
#                                       rate (every run's line goes to stderr). Needs $bench, $RUNS.
#   latency LABEL ADDRESS ARGS...       one run at LAT_RATE msg/s (LAT_COUNT messages): a rate far
#                                       below the capacity keeps one message in flight
#   rate LINE                           the msg/s figure of a report line
median() {
  local label=$1 addr=$2; shift 2
  local lines=()
  for i in $(seq "$RUNS"); do
    lines+=("$(taskset -c 1 "$bench" amqp --label "$label" --address "$addr$i" "$@" 2>&1 | tail -1)")
    echo "  ${lines[-1]}" >&2
  done
  printf '%s\n' "${lines[@]}" | awk '{ match($0, /rate=[0-9]+/); print substr($0, RSTART+5, RLENGTH-5) "\t" $0 }' |
    sort -n | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { sub(/^[0-9]+\t/, ""); print }'
}

latency() {
  local label=$1 addr=$2; shift 2
  taskset -c 1 "$bench" amqp --label "$label" --address "$addr" --rate "$LAT_RATE" \
    --count "$LAT_COUNT" --warmup $((LAT_COUNT / 10)) "$@" 2>&1 | tail -1
}

rate() { grep -o 'rate=[0-9]*' <<<"$1" | head -1 | cut -d= -f2; }
