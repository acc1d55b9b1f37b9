# Shared by the MQTT bench scripts (sourced from the repository root, with $root and $out set).
#
#   mqtt_setup                  builds the release binaries, installs Debian's mosquitto if missing
#   start_enmesh_mqtt PORT [fair] enmesh standalone on core 0, MQTT on 127.0.0.1:PORT, data in
#                               $out/enmesh-data; waits until ready; sets $epid. `fair` matches
#                               mosquitto's: 1,000 unacknowledged messages per subscription
#                               (`mqtt.inflight`; the default 64 suits small devices)
#   start_mosquitto PORT [fair] mosquitto 2.0.11 on core 0 on 127.0.0.1:PORT, no persistence;
#                               `fair` adds what a throughput comparison needs (max_queued_messages
#                               1,000,000: the default 1,000 drops silently for a slow subscriber;
#                               no in-flight limit); sets $mpid
#   stop_pid PID                kills and reaps a server
mqtt_setup() {
  cargo build --release --locked -p enmesh -p enmesh-bench >&2
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  fi
}

start_enmesh_mqtt() {
  rm -rf "$out/enmesh-data"
  if [ "${2:-}" = fair ]; then
    printf 'mqtt:\n  inflight: 1000\n' > "$out/enmesh.yaml"
  else
    : > "$out/enmesh.yaml"
  fi
  taskset -c 0 "$root/target/release/enmesh" standalone --config "$out/enmesh.yaml" \
    --listen 127.0.0.1:0 --http 127.0.0.1:0 \
    --mqtt "127.0.0.1:$1" --data "$out/enmesh-data" > "$out/enmesh.log" 2>&1 &
  epid=$!
  for _ in $(seq 100); do grep -q "enmesh ready" "$out/enmesh.log" && break; sleep 0.1; done
}

start_mosquitto() {
  {
    echo "listener $1 127.0.0.1"
    echo "allow_anonymous true"
    echo "persistence false"
    echo "log_dest none"
    if [ "${2:-}" = fair ]; then
      echo "max_queued_messages 1000000"
      echo "max_inflight_messages 0"
    fi
  } > "$out/mosquitto.conf"
  taskset -c 0 "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$out/mosquitto.conf" &
  mpid=$!
  sleep 0.5
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
