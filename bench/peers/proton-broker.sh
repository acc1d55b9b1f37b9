#!/usr/bin/env bash
# The Qpid Proton-C example broker (built by bench/peers/install.sh) on 127.0.0.1:PORT.
#
#   bench/peers/proton-broker.sh start [PORT]   start (default 5673), wait for the port, print pid
#   bench/peers/proton-broker.sh stop  [PORT]   SIGTERM, then SIGKILL after 3 s
#   bench/peers/proton-broker.sh status [PORT]  exit 0 if running
#
# Addresses are queue names created on first use (e.g. `examples`); no SASL, no durability.
# The broker runs 4 proactor threads (hard-coded in the example); pin it with
# `taskset -c 0 bench/peers/proton-broker.sh start 5673`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
BIN="$PEERS_DIR/proton-broker"

cmd="${1:-}"
PORT="${2:-5673}"
case "$PORT" in ''|*[!0-9]*) echo "bad port: $PORT" >&2; exit 2;; esac
D="$PEERS_DIR/proton-broker.d"
PIDF="$D/$PORT.pid"

log() { echo "[peers/proton-broker:$PORT] $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { [ -s "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

start() {
    [ -x "$BIN" ] || { log "$BIN missing: run bench/peers/install.sh"; exit 1; }
    if alive; then log "already running"; cat "$PIDF"; return 0; fi
    if port_open "$PORT"; then log "port $PORT already in use by something else"; exit 1; fi
    mkdir -p "$D"
    local t0; t0=$(date +%s%N)
    setsid "$BIN" 127.0.0.1 "$PORT" > "$D/$PORT.log" 2>&1 < /dev/null &
    echo $! > "$PIDF"
    local i=0
    until port_open "$PORT"; do
        if ! alive; then log "broker exited:"; cat "$D/$PORT.log" >&2; rm -f "$PIDF"; exit 1; fi
        i=$((i + 1))
        if [ $i -gt 100 ]; then log "timeout waiting for port"; stop; exit 1; fi
        sleep 0.05
    done
    log "ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms (log $D/$PORT.log)"
    cat "$PIDF"
}

stop() {
    if ! alive; then log "not running"; rm -f "$PIDF"; return 0; fi
    local p; p="$(cat "$PIDF")"
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then log "SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
    rm -f "$PIDF"
    log "stopped"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) alive ;;
    *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
