#!/usr/bin/env bash
# Install the benchmark peers (RabbitMQ 3.10 + AMQP 1.0 plugin, Qpid Proton-C example broker).
# Idempotent: skips apt when every package is installed, skips the broker build when the binary
# is newer than its sources. Needs root (or sudo) and Debian's package archive.
#
#   bench/peers/install.sh          # install + build; prints versions
#   PEERS_DIR=/elsewhere bench/peers/install.sh
#
# Results: $PEERS_DIR/proton-broker (default <repo>/.peers), $PEERS_DIR/versions.txt
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
PKGS=(rabbitmq-server libqpid-proton11-dev libqpid-proton11-dev-examples pkg-config gcc)

log() { echo "[peers/install] $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

is_installed() {
    dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

missing=()
for p in "${PKGS[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # policy-rc.d-free: the Debian rabbitmq-server postinst tries to start the service via
    # invoke-rc.d; without systemd that fails harmlessly (we run our own private instance).
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "packages already installed"
fi

# On a systemd machine the packages start the distro's RabbitMQ (0.0.0.0:5672) and epmd.socket
# (all interfaces, 4369). Our private nodes need neither and must bind loopback only, so stop and
# disable them. PEERS_KEEP_SYSTEM_SERVICES=1 leaves them alone.
if [ "${PEERS_KEEP_SYSTEM_SERVICES:-0}" != 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    for u in rabbitmq-server.service epmd.service epmd.socket; do
        if systemctl is-active --quiet "$u" || systemctl is-enabled --quiet "$u" 2>/dev/null; then
            log "stopping and disabling system unit $u"
            $SUDO systemctl disable --now "$u" >/dev/null 2>&1 || true
        fi
    done
fi

mkdir -p "$PEERS_DIR"

# ---- Proton-C example broker --------------------------------------------------------------
# Debian 12 puts the C examples (broker.c, thread.h, ...) in /usr/share/proton/examples/c; look
# them up through dpkg in case a later package moves or gzips them. Copy to a scratch dir,
# gunzip, compile broker.c alone.
find_broker_src() {
    local f
    for f in $(dpkg -L libqpid-proton11-dev-examples 2>/dev/null | grep -E '/broker\.c(\.gz)?$'); do
        echo "$f"; return 0
    done
    find /usr/share -path '*proton*' -name 'broker.c*' 2>/dev/null | head -n1
}

SRC="$(find_broker_src)"
if [ -z "$SRC" ]; then
    log "ERROR: broker.c not found in libqpid-proton11-dev-examples"
    exit 1
fi
SRC_DIR="$(dirname "$SRC")"
BIN="$PEERS_DIR/proton-broker"

SUM="$( (cat "$SRC"; pkg-config --modversion libqpid-proton) | sha256sum | cut -d' ' -f1)"
if [ -x "$BIN" ] && [ "$(cat "$BIN.sha256" 2>/dev/null)" = "$SUM" ]; then
    log "proton-broker already built ($BIN)"
else
    BUILD="$PEERS_DIR/proton-broker-src"
    rm -rf "$BUILD"; mkdir -p "$BUILD"
    cp -a "$SRC_DIR"/. "$BUILD"/
    find "$BUILD" -name '*.gz' -exec gunzip -f {} +
    log "building proton-broker from $SRC_DIR"
    # Debian ships only libqpid-proton.pc (no -core/-proactor .pc files), which is why the
    # examples' Makefile.pkgconfig fails to link. broker.c includes "thread.h" from its own dir.
    # shellcheck disable=SC2046
    gcc -O2 -o "$BIN" "$BUILD/broker.c" -I"$BUILD" \
        $(pkg-config --cflags --libs libqpid-proton) -lpthread
    echo "$SUM" > "$BIN.sha256"
    log "built $BIN"
fi

# ---- versions -------------------------------------------------------------------------------
{
    echo "# recorded $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
    for p in "${PKGS[@]}" erlang-base; do
        printf '%s\t%s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '?')"
    done
    printf 'proton-broker\tbuilt from %s\n' "$SRC"
} > "$PEERS_DIR/versions.txt"
cat "$PEERS_DIR/versions.txt" >&2
