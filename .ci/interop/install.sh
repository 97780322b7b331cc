#!/bin/sh
# Installs the browsers that run.sh checks the hub against, outside the project (as root):
# python-zeroconf in a venv, Node's bonjour-service, avahi, dig and tcpdump.
set -e
TOOLS=${INTEROP_TOOLS:-/tmp/interop}
mkdir -p "$TOOLS/node"
python3 -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/pip" install -q zeroconf
(cd "$TOOLS/node" && npm i -s bonjour-service)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq avahi-daemon avahi-utils dnsutils tcpdump dbus >/dev/null
chmod -R a+rX "$TOOLS"   # run.sh starts the browsers as nobody
