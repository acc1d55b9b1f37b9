#!/usr/bin/env bash
# A private, loopback-only ActiveMQ 5.17 (Debian) with its MQTT transport, for benchmarks.
# Nothing under /etc or /var/lib/activemq is used: the instance lives in
# $PEERS_DIR/activemq/<PORT>/ (default <repo>/.peers/activemq/<PORT>), wiped on start.
# Debian's package lacks the MQTT transport's client jars on the broker's class path: they are
# linked into the instance's lib/ (../shared/peers.md). KahaDB persistence as shipped (QoS 1
# messages are stored, as Enmesh stores them).
#
#   bench/peers/activemq.sh start PORT     start with MQTT on 127.0.0.1:PORT, wait, print pid
#   bench/peers/activemq.sh stop PORT
# Pin to a core by wrapping: `taskset -c 0 bench/peers/activemq.sh start 1883`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
cmd=${1:?start|stop}
PORT=${2:?port}
base="$PEERS_DIR/activemq/$PORT"

install() {
  if [ ! -f /usr/share/activemq/bin/activemq.jar ] || [ ! -f /usr/share/java/mqtt-client.jar ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      activemq libmqtt-client-java >/dev/null
  fi
}

case "$cmd" in
start)
  install
  rm -rf "$base"
  mkdir -p "$base/conf" "$base/lib" "$base/data"
  for j in mqtt-client hawtdispatch hawtdispatch-transport; do
    ln -sf "/usr/share/java/$j.jar" "$base/lib/$j.jar"
  done
  cp /etc/activemq/instances-available/main/log4j2.properties "$base/conf/" 2>/dev/null || true
  cat > "$base/conf/activemq.xml" <<XML
<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" useJmx="false" brokerName="bench"
          dataDirectory="$base/data">
    <persistenceAdapter><kahaDB directory="$base/data/kahadb"/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="mqtt" uri="mqtt://127.0.0.1:$PORT?maximumConnections=100000"/>
    </transportConnectors>
  </broker>
</beans>
XML
  java -Xms1G -Xmx1G -Dactivemq.base="$base" -Dactivemq.home=/usr/share/activemq \
    -Dactivemq.conf="$base/conf" -Dactivemq.data="$base/data" \
    -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$base/conf/activemq.xml" \
    > "$base/out.log" 2>&1 &
  pid=$!
  echo "$pid" > "$base/pid"
  for _ in $(seq 120); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "$pid"; exit 0; fi
    kill -0 "$pid" 2>/dev/null || { cat "$base/out.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "activemq did not listen on $PORT" >&2; cat "$base/out.log" >&2; exit 1
  ;;
stop)
  if [ -f "$base/pid" ]; then
    pid=$(cat "$base/pid")
    kill "$pid" 2>/dev/null || true
    # Waited for: a JVM still shutting down would share the machine with the next run.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  ;;
esac
