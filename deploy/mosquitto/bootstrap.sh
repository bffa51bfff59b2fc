#!/bin/sh
# Set up Mosquitto 2 for OpenSense on a Debian/Ubuntu host (run as root, once; it
# keeps what exists, so running it again is harmless):
#   1. TLS: the OpenSense private CA and a server certificate, made in the server's
#      state directory (the CA `opensense ca` prints) and copied for Mosquitto;
#   2. this directory's mosquitto.conf as /etc/mosquitto/mosquitto.conf;
#   3. the dynamic-security file with the server's account (`mosquitto_ctrl dynsec
#      init`), and the OPENSENSE_MQTT_URL the server needs;
#   4. restart Mosquitto.
#
# Settings (environment):
#   OPENSENSE_STATE_DIR       the server's state directory     (/var/lib/opensense)
#   OPENSENSE_MQTT_HOSTNAMES  names/addresses in the certificate ($(hostname -f),localhost,127.0.0.1)
#   OPENSENSE_PYTHON          a python with opensense installed (python3)
#   MQTT_ADMIN_USER           the server's broker account       (opensense)
#   MQTT_ADMIN_PASSWORD       its password                      (random)
#   ROOT                      install below this directory instead of / and do not
#                             restart anything (tests and dry runs)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-}
STATE_DIR=${OPENSENSE_STATE_DIR:-/var/lib/opensense}
HOSTNAMES=${OPENSENSE_MQTT_HOSTNAMES:-$(hostname -f 2>/dev/null || hostname),localhost,127.0.0.1}
PYTHON=${OPENSENSE_PYTHON:-python3}
ADMIN=${MQTT_ADMIN_USER:-opensense}
ETC=$ROOT/etc/mosquitto
LIB=$ROOT/var/lib/mosquitto
LOG=$ROOT/var/log/mosquitto

owner() {  # chown to the mosquitto user when it exists (the Debian package makes it)
  if id mosquitto >/dev/null 2>&1; then chown "$@"; fi
}

mkdir -p "$ETC/certs" "$LIB" "$LOG"
owner mosquitto:mosquitto "$LIB" "$LOG"

# 1. TLS
"$PYTHON" - "$STATE_DIR" "$HOSTNAMES" <<'EOF'
import sys
from pathlib import Path
from opensense.mqtt.ca import ensure_tls
files = ensure_tls(Path(sys.argv[1]), [h for h in sys.argv[2].split(",") if h])
print(f"TLS: CA {files.ca_cert}, server certificate {files.server_cert}")
EOF
if [ ! -e "$ETC/certs/server.pem" ]; then
  install -m 0644 "$STATE_DIR/mqtt-tls/server.pem" "$ETC/certs/server.pem"
  install -m 0640 "$STATE_DIR/mqtt-tls/server.key" "$ETC/certs/server.key"
  install -m 0644 "$STATE_DIR/mqtt-tls/ca.pem" "$ETC/certs/opensense-ca.pem"
  owner root:mosquitto "$ETC/certs/server.key"
else
  echo "TLS: $ETC/certs/server.pem exists, kept"
fi

# 2. configuration
if [ -e "$ETC/mosquitto.conf" ] && ! cmp -s "$here/mosquitto.conf" "$ETC/mosquitto.conf"; then
  cp "$ETC/mosquitto.conf" "$ETC/mosquitto.conf.before-opensense"
fi
if [ -n "$ROOT" ]; then
  sed -e "s#/etc/mosquitto/#$ETC/#g" -e "s#/var/lib/mosquitto/#$LIB/#g" \
      -e "s#/var/log/mosquitto/#$LOG/#g" "$here/mosquitto.conf" > "$ETC/mosquitto.conf"
else
  install -m 0644 "$here/mosquitto.conf" "$ETC/mosquitto.conf"
fi

# 3. dynamic security: the server's account, admin of the plugin
if [ ! -e "$LIB/dynamic-security.json" ]; then
  PASSWORD=${MQTT_ADMIN_PASSWORD:-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')}
  mosquitto_ctrl dynsec init "$LIB/dynamic-security.json" "$ADMIN" "$PASSWORD" >/dev/null
  owner mosquitto:mosquitto "$LIB/dynamic-security.json"
  chmod 0600 "$LIB/dynamic-security.json"
  echo "dynamic security: $LIB/dynamic-security.json with the account '$ADMIN'"
  echo "Give the server (its environment file, mode 0400):"
  echo "  OPENSENSE_MQTT=external"
  echo "  OPENSENSE_MQTT_URL=mqtt://$ADMIN:$PASSWORD@127.0.0.1:1883"
else
  echo "dynamic security: $LIB/dynamic-security.json exists, kept (its admin password is unchanged)"
fi

# 4. (re)start
if [ -z "$ROOT" ]; then
  systemctl restart mosquitto
  systemctl --no-pager --lines=0 status mosquitto
fi
