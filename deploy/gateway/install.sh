#!/bin/sh
# Install the OpenSense site gateway on a Debian/Raspberry Pi OS box (run as root from
# the repository root). Then edit /etc/opensense-gateway.conf (url, token, passwords)
# and: systemctl enable --now opensense-gateway opensense-gateway-broker.path
set -eu
apt-get install -y -qq mosquitto python3-venv >/dev/null
id opensense-gateway >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin \
  --groups mosquitto opensense-gateway
install -d -o opensense-gateway -g mosquitto -m 0750 /etc/mosquitto/opensense
touch /etc/mosquitto/opensense/site.passwd /etc/mosquitto/opensense/site.acl
chown opensense-gateway:mosquitto /etc/mosquitto/opensense/site.passwd /etc/mosquitto/opensense/site.acl
chmod 0640 /etc/mosquitto/opensense/site.passwd /etc/mosquitto/opensense/site.acl
# the site config replaces Debian's default one (which would set persistence twice)
[ -e /etc/mosquitto/mosquitto.conf.dist ] || cp /etc/mosquitto/mosquitto.conf /etc/mosquitto/mosquitto.conf.dist
install -m 0644 deploy/gateway/mosquitto-site.conf /etc/mosquitto/mosquitto.conf
python3 -m venv /opt/opensense-gateway
/opt/opensense-gateway/bin/pip install -q ./gateway
[ -e /etc/opensense-gateway.conf ] || install -o opensense-gateway -m 0600 \
  deploy/gateway/opensense-gateway.conf.example /etc/opensense-gateway.conf
install -m 0644 deploy/gateway/opensense-gateway.service deploy/gateway/opensense-gateway-broker.path \
  deploy/gateway/opensense-gateway-broker.service /etc/systemd/system/
systemctl daemon-reload
echo "now: edit /etc/opensense-gateway.conf, put the site certificate in /etc/mosquitto/certs/,"
echo "     systemctl enable --now opensense-gateway opensense-gateway-broker.path; systemctl restart mosquitto"
