#!/usr/bin/env bash
# A private, loopback-only RabbitMQ 3.10 node with the AMQP 1.0 plugin, for benchmarks.
# Nothing under /etc or /var/lib/rabbitmq is read or written: every path comes from env vars
# pointing into $PEERS_DIR/rabbitmq/<PORT>/ (default <repo>/.peers/rabbitmq/<PORT>).
#
#   bench/peers/rabbitmq.sh start [PORT]          start (default 5672), wait until ready, print pid
#   bench/peers/rabbitmq.sh stop  [PORT]          stop cleanly (rabbitmqctl stop, then signals)
#   bench/peers/rabbitmq.sh status [PORT]         exit 0 if running
#   bench/peers/rabbitmq.sh declare PORT NAME [classic|durable|quorum]
#                                                 declare queue NAME (default: classic, non-durable)
#   bench/peers/rabbitmq.sh ctl PORT ARGS...      run rabbitmqctl against this node
#
# Env: RABBITMQ_KEEP_DATA=1 keeps the node's mnesia dir across starts (default: wiped on start).
#      RABBITMQ_START_TIMEOUT seconds (default 90).
# Pin to a core by wrapping: `taskset -c 0 bench/peers/rabbitmq.sh start 5672` (erl inherits it).
#
# AMQP 1.0 addressing in 3.10 (checked): anonymous SASL = guest, vhost /.
#   /queue/NAME      the link declares NAME as a *classic* queue, durable iff the link's terminus
#                    `durable` field is >= 1; if NAME exists with other durability or as a quorum
#                    queue, attach fails (session ends with amqp:precondition-failed).
#   /amq/queue/NAME  no declare: NAME must exist (use `declare`); the only way to reach a quorum
#                    queue. A *sender* to a missing /amq/queue/NAME is accepted and its messages
#                    are silently dropped (accepted, unroutable); a receiver gets amqp:not-found.
#   /exchange/X/KEY  publish to exchange X with routing key KEY.
#
# Ports used: PORT (AMQP 0-9-1 and 1.0 share it), PORT+20000 (Erlang distribution; override with
# RABBITMQ_DIST_PORT), 4369 (epmd), 35672-35682 (CLI tools' distribution). All on 127.0.0.1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
RMQ_BIN=/usr/lib/rabbitmq/bin   # the real scripts; /usr/sbin/* wrappers su to user rabbitmq

cmd="${1:-}"; shift || true
PORT="${1:-5672}"; [ $# -gt 0 ] && shift
case "$PORT" in ''|*[!0-9]*) echo "bad port: $PORT" >&2; exit 2;; esac

D="$PEERS_DIR/rabbitmq/$PORT"
NODE="rabbit-$PORT@localhost"
DIST_PORT="${RABBITMQ_DIST_PORT:-$((PORT + 20000))}"
if [ "$DIST_PORT" -gt 65535 ]; then DIST_PORT=$((PORT - 20000)); fi

log() { echo "[peers/rabbitmq:$PORT] $*" >&2; }

rmq_env() {
    export HOME="$D"                         # .erlang.cookie lives here (server and CLI)
    export RABBITMQ_CONF_ENV_FILE="$D/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$D/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$D/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$D/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$D/mnesia"
    export RABBITMQ_MNESIA_DIR="$D/mnesia/$NODE"
    export RABBITMQ_LOG_BASE="$D/log"
    export RABBITMQ_PID_FILE="$D/rabbitmq.pid"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export ERL_EPMD_ADDRESS=127.0.0.1
    # Distribution listeners on loopback (server and CLI tools).
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    unset RABBITMQ_ENABLED_PLUGINS RABBITMQ_USE_LONGNAME
}

ctl() { rmq_env; "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

beam_pid() { [ -s "$D/rabbitmq.pid" ] && cat "$D/rabbitmq.pid"; }
alive() { local p; p="$(beam_pid 2>/dev/null)" && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_config() {
    mkdir -p "$D/log" "$D/mnesia"
    : > "$D/rabbitmq-env.conf"               # empty: shadows /etc/rabbitmq/rabbitmq-env.conf
    cat > "$D/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$PORT
loopback_users = none
log.file.level = warning
log.console = false
# AMQP 1.0 plugin: anonymous (SASL ANONYMOUS or no SASL) maps to guest on vhost /.
amqp1_0.default_user = guest
amqp1_0.default_vhost = /
EOF
    cat > "$D/advanced.config" <<'EOF'
[{kernel, [{inet_dist_use_interface, {127,0,0,1}}]}].
EOF
    # What `rabbitmq-plugins enable --offline rabbitmq_amqp1_0` writes (deps resolve at boot).
    echo '[rabbitmq_amqp1_0].' > "$D/enabled_plugins"
    if [ ! -s "$D/.erlang.cookie" ]; then
        head -c 15 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F > "$D/.erlang.cookie"
        chmod 400 "$D/.erlang.cookie"
    fi
}

start() {
    [ -x "$RMQ_BIN/rabbitmq-server" ] || { log "rabbitmq-server not installed: run bench/peers/install.sh"; exit 1; }
    if alive; then log "already running"; echo "$(beam_pid)"; return 0; fi
    if port_open "$PORT"; then log "port $PORT already in use by something else"; exit 1; fi
    if [ "${RABBITMQ_KEEP_DATA:-0}" != 1 ]; then rm -rf "$D/mnesia"; fi
    rm -f "$D/rabbitmq.pid"
    write_config
    rmq_env
    local t0; t0=$(date +%s%N)
    # setsid: own session, so the caller's Ctrl-C / job control does not reach it.
    setsid "$RMQ_BIN/rabbitmq-server" > "$D/log/console.out" 2>&1 < /dev/null &
    echo $! > "$D/wrapper.pid"
    local timeout="${RABBITMQ_START_TIMEOUT:-90}" i=0
    # 1) the node writes its pid file; 2) AMQP port accepts; 3) the app reports booted.
    until alive && port_open "$PORT"; do
        if ! kill -0 "$(cat "$D/wrapper.pid")" 2>/dev/null; then
            log "rabbitmq-server exited during start; last log lines:"
            tail -n 30 "$D/log/console.out" >&2 || true
            exit 1
        fi
        i=$((i + 1))
        if [ $i -gt $((timeout * 10)) ]; then log "timeout waiting for port $PORT"; stop_node; exit 1; fi
        sleep 0.1
    done
    "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q await_startup --timeout "$timeout" >/dev/null
    log "ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms (node $NODE, logs $D/log)"
    echo "$(beam_pid)"
}

stop_node() {
    rmq_env
    local p w
    p="$(beam_pid 2>/dev/null || true)"
    w="$(cat "$D/wrapper.pid" 2>/dev/null || true)"
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
        # `stop PIDFILE` returns once the OS process is gone.
        timeout 60 "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q stop "$D/rabbitmq.pid" >/dev/null 2>&1 || true
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then log "rabbitmqctl stop failed; SIGTERM"; kill -TERM "$p" 2>/dev/null || true; sleep 3; fi
        if kill -0 "$p" 2>/dev/null; then log "still alive; SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
    fi
    if [ -n "$w" ] && kill -0 "$w" 2>/dev/null; then
        for _ in $(seq 30); do kill -0 "$w" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "$w" 2>/dev/null || true
    fi
    rm -f "$D/rabbitmq.pid" "$D/wrapper.pid"
    # epmd was started by our node; stop it when no Erlang node is registered any more.
    if command -v epmd >/dev/null && ! epmd -names 2>/dev/null | grep -q '^name '; then
        epmd -kill >/dev/null 2>&1 || true
    fi
}

declare_queue() {
    local name="${1:?queue name}" kind="${2:-classic}" durable args
    case "$kind" in
        classic) durable=false; args='[]' ;;
        durable) durable=true;  args='[]' ;;
        quorum)  durable=true;  args='[{<<"x-queue-type">>, longstr, <<"quorum">>}]' ;;
        *) echo "queue kind must be classic|durable|quorum" >&2; exit 2 ;;
    esac
    # rabbit_amqqueue:declare(QName, Durable, AutoDelete, Args, Owner, ActingUser)
    ctl -q eval "
        QName = rabbit_misc:r(<<\"/\">>, queue, <<\"$name\">>),
        case rabbit_amqqueue:declare(QName, $durable, false, $args, none, <<\"bench\">>) of
            {new, _} -> new;
            {existing, _} -> existing;
            {absent, _, R} -> {absent, R};
            Other -> Other
        end." 
}

case "$cmd" in
    start) start ;;
    stop) if alive || [ -s "$D/wrapper.pid" ]; then stop_node; log "stopped"; else log "not running"; fi ;;
    status) alive ;;
    declare) declare_queue "$@" ;;
    ctl) ctl "$@" ;;
    *) sed -n '2,27p' "$0" >&2; exit 2 ;;
esac
