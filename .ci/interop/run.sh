#!/usr/bin/env bash
# Interop checks of gambiarra's mDNS responder against real browsers (MDNS.md §8 items 22-25).
# Not run by .ci/run: needs root, iproute2 and the tools that install.sh puts in $INTEROP_TOOLS.
#
#   .ci/interop/run.sh [--netns] [--host-network] [--no-avahi] [-- HUB COMMAND...]
#
# Default hub command (run from the repository root):
#   python3 gambiarra.py serve --mdns --port $INTEROP_PORT --state ''
# Everything runs in a fresh network namespace "gbbrowse" with only lo (and the veth below), so
# no mDNS packet leaves the machine; --host-network (INTEROP_ISOLATE=0) runs in the current one.
# --netns (INTEROP_NETNS=1) runs the hub in a second namespace "gbhub" joined by a veth pair
# (browsers on 10.99.0.1, hub on 10.99.0.2): a second host.
# Env: INTEROP_TOOLS (/tmp/interop), INTEROP_PORT (3000), INTEROP_TIMEOUT (10 s per wait),
# INTEROP_GAMBIARRA (python3 gambiarra.py, the CLI for the discover checks), INTEROP_AVAHI=0.
# Prints one PASS/FAIL/XFAIL/SKIP line per check and "N passed, N failed"; exits 1 on any FAIL.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=${INTEROP_TOOLS:-/tmp/interop}
PORT=${INTEROP_PORT:-3000}
T=${INTEROP_TIMEOUT:-10}
NETNS=${INTEROP_NETNS:-0}
AVAHI=${INTEROP_AVAHI:-1}
ISOLATE=${INTEROP_ISOLATE:-1}
read -r -a CLI <<<"${INTEROP_GAMBIARRA:-python3 gambiarra.py}"
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --netns) NETNS=1 ;;
    --host-network) ISOLATE=0 ;;
    --no-avahi) AVAHI=0 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--netns] [--host-network] [--no-avahi] [-- HUB COMMAND...]" >&2; exit 2 ;;
  esac
  shift
done
if [ $# -gt 0 ]; then HUB=("$@"); else HUB=(python3 gambiarra.py serve --mdns --port "$PORT" --state ''); fi

if [ "$ISOLATE" = 1 ] && [ -z "${INTEROP_INNER:-}" ]; then   # run this script again inside gbbrowse
  ip netns del gbbrowse 2>/dev/null
  ip netns add gbbrowse && ip -n gbbrowse link set lo up || { echo "cannot create a netns" >&2; exit 2; }
  trap 'ip netns del gbbrowse' EXIT
  trap : INT   # Ctrl-C: the inner run cleans up and exits, then the namespace goes
  INTEROP_INNER=1 ip netns exec gbbrowse bash "$0" "${ARGS[@]}"
  exit $?
fi

PY=$TOOLS/venv/bin/python
# Browsers run as an ordinary user, as on a desktop: root ones would form an SO_REUSEPORT group
# with a root hub on 0.0.0.0:5353, and Linux would spread unicast datagrams over that group.
AS_NOBODY=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
export NODE_PATH=$TOOLS/node/node_modules
W=$(mktemp -d /tmp/interop-run.XXXXXX)
PIDS=() PASSED=0 FAILED=0 XFAILED=0 NS="" DBUS_PID="" AVAHI_LOG="" CURRENT=""

exec 3>&1 4>&2   # a trap may fire inside `run ... >file`: cleanup() writes to the real ones
cleanup() {
  exec 1>&3 2>&4
  for pid in $CURRENT "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  [ -n "$DBUS_PID" ] && kill "$DBUS_PID" 2>/dev/null
  [ -n "$NS" ] && ip netns del "$NS" 2>/dev/null
  echo "logs: $W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bg() { "$@" & PIDS+=($!); }   # start a background process that cleanup() ends
# run a bounded command and wait for it: Ctrl-C then interrupts `wait` at once, whereas bash
# drops a trapped SIGINT that arrives during a foreground child that does not die of it
run() { "$@" & CURRENT=$!; wait $CURRENT; }

pass() { echo "PASS $1${2:+: $2}"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; FAILED=$((FAILED + 1)); }

wait_for() {  # FILE REGEX SECONDS: succeed as soon as FILE has a line matching REGEX
  local end=$((SECONDS + $3))
  until grep -qE "$2" "$1" 2>/dev/null; do [ $SECONDS -ge $end ] && return 1; sleep 0.2; done
}

# jcheck NAME FILE EXPR: PASS if a JSON line e of FILE makes the Python expression EXPR true
jcheck() {
  local line
  if line=$(python3 - "$2" "$3" <<'PY'
import json, os, sys
env = os.environ
for raw in open(sys.argv[1]):
    try:
        e = json.loads(raw)
    except ValueError:
        continue
    try:
        if eval(sys.argv[2], {"e": e, "PORT": int(env["PORT"]), "PREFIX": env["PREFIX"],
                              "INSTANCE": env.get("INSTANCE", "")}):
            print(raw.strip()); sys.exit(0)
    except Exception:
        pass
sys.exit(1)
PY
  ); then pass "$1" "$line"; else fail "$1" "$(tail -n 3 "$2" 2>/dev/null | tr '\n' ' ')"; fi
}
PREFIX=gambiarra-hub-$PORT   # the instance may be renamed on conflict: gambiarra-hub-3000-2, ...
export PORT PREFIX

# dig_check NAME SERVER QNAME QTYPE REGEX...: PASS if dig's answer matches every REGEX
dig_check() {
  local name=$1 server=$2 qname=$3 qtype=$4 out=$W/dig.$RANDOM re; shift 4
  run timeout $((T + 2)) dig +time=3 +tries=1 @"$server" -p 5353 "$qname" "$qtype" >"$out" 2>&1
  for re in "$@"; do grep -qE "$re" "$out" || break; re=""; done
  if [ -z "$re" ]; then pass "$name" "$(grep -cE 'IN[[:space:]]+(PTR|SRV|TXT|A)[[:space:]]' "$out") records"
  else fail "$name" "no line matching '$re' ($out)"; fi
}

# dig_mcast_check NAME QNAME QTYPE REGEX...: `dig @224.0.0.251 -p 5353`. dig >= 9.16 connect()s
# its socket to the group, so the kernel drops the unicast reply, which comes from the
# responder's address (ISC bind9 #3428); the check reads that reply from tcpdump's capture
# instead (REGEX... against tcpdump -vv's line for it).
dig_mcast_check() {
  local name=$1 qname=$2 qtype=$3 out=$W/dig.$RANDOM reply re; shift 3
  run timeout $((T + 2)) dig +time=3 +tries=1 @224.0.0.251 -p 5353 "$qname" "$qtype" >"$out" 2>&1
  if [ ! -s "$W/mdns.pcap" ]; then
    grep -q "ANSWER SECTION" "$out" && pass "$name" || { echo "XFAIL $name: dig >= 9.16 drops the reply; no tcpdump"; XFAILED=$((XFAILED + 1)); }
    return
  fi
  reply=$(tcpdump -nvvr "$W/mdns.pcap" 2>/dev/null | python3 -c '
import re, sys
qname, qtype, port, reply = sys.argv[1], sys.argv[2], None, ""
for line in sys.stdin:
    m = re.search(r"\.(\d+) > 224\.0\.0\.251\.5353: (\[[^]]*\] )?(\d+)\+.* %s \(QM\)\? %s\. " % (qtype, re.escape(qname)), line)
    if m:
        port, qid = m.group(1), m.group(3)
    elif port and re.search(r"\.5353 > [\d.]+\.%s: (\[[^]]*\] )?%s\*" % (port, qid), line):
        reply = line.strip()
print(reply)' "$qname" "$qtype")
  for re in "$@"; do grep -qE "$re" <<<"$reply" || break; re=""; done
  if [ -z "$re" ]; then
    pass "$name" "unicast reply on the wire$(grep -q 'ANSWER SECTION' "$out" || echo ' (dig >= 9.16 drops it itself)')"
  else fail "$name" "no reply on the wire matching '$re': ${reply:-none}"; fi
}

# --- setup -------------------------------------------------------------------------------------
RUN_IN_HUB_NS=()
if [ "$NETNS" = 1 ]; then
  NS=gbhub
  ip netns del $NS 2>/dev/null
  ip netns add $NS && ip link add gbv0 type veth peer name gbv1 && ip link set gbv1 netns $NS &&
    ip addr add 10.99.0.1/24 dev gbv0 && ip link set gbv0 up &&
    ip -n $NS addr add 10.99.0.2/24 dev gbv1 && ip -n $NS link set gbv1 up &&
    ip -n $NS link set lo up && ip -n $NS route add default via 10.99.0.1 ||
    { echo "netns setup failed" >&2; exit 2; }
  RUN_IN_HUB_NS=(ip netns exec $NS)
  HUB_ADDR=10.99.0.2
  MCAST_DEV=gbv0
else
  HUB_ADDR=$(ip -4 -o addr show scope global | sed -n 's/.* inet \([0-9.]*\).*/\1/p' | head -n 1)
  HUB_ADDR=${HUB_ADDR:-127.0.0.1}
  MCAST_DEV=lo
fi
# a fresh namespace has no route at all: browsers that send multicast on the default interface
# (bonjour-service, dig) need one, as any LAN host has through its default route
[ -n "${INTEROP_INNER:-}" ] && ip route add 224.0.0.0/4 dev $MCAST_DEV
command -v tcpdump >/dev/null && bg tcpdump -i any -U -s 0 -w "$W/mdns.pcap" udp port 5353 2>/dev/null

if [ "$AVAHI" = 1 ] && command -v avahi-daemon >/dev/null; then
  if avahi-daemon --check 2>/dev/null && [ -n "${INTEROP_INNER:-}" ]; then
    echo "note: an avahi-daemon already runs (outside gbbrowse): avahi checks skipped"; AVAHI=0
  elif avahi-daemon --check 2>/dev/null; then
    echo "note: using the avahi-daemon already running (its log is not checked)"
  else
    if ! dbus-send --system --dest=org.freedesktop.DBus --print-reply / org.freedesktop.DBus.GetId \
        >/dev/null 2>&1; then
      mkdir -p /run/dbus && rm -f /run/dbus/pid
      DBUS_PID=$(dbus-daemon --system --fork --print-pid)
    fi
    cat >"$W/avahi-daemon.conf" <<CONF
[server]
host-name=interop-avahi
use-ipv4=yes
use-ipv6=no
disallow-other-stacks=no
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
CONF
    AVAHI_LOG=$W/avahi.log
    bg avahi-daemon -f "$W/avahi-daemon.conf" --no-rlimits --debug >"$AVAHI_LOG" 2>&1
    wait_for "$AVAHI_LOG" "Server startup complete" "$T" || { echo "avahi did not start" >&2; AVAHI=0; }
  fi
else
  AVAHI=0
fi

# --- browsers first, so they see the announcements; then the hub --------------------------------
bg "${AS_NOBODY[@]}" "$PY" "$HERE/zeroconf_browse.py" browse 300 >"$W/zc_browse.out" 2>&1
bg "${AS_NOBODY[@]}" node "$HERE/bonjour_find.js" 300 >"$W/bonjour.out" 2>&1
[ "$AVAHI" = 1 ] && bg stdbuf -oL avahi-browse -rp _gambiarra._tcp >"$W/avahi_browse.out" 2>&1
sleep 1
cd "$ROOT" || exit 2
echo "hub: ${RUN_IN_HUB_NS[*]} ${HUB[*]} (address $HUB_ADDR, port $PORT)"
# env --default-signal: a background job of a script starts with SIGINT ignored
bg "${RUN_IN_HUB_NS[@]}" env --default-signal=INT "${HUB[@]}" >"$W/hub.log" 2>&1
HUB_PID=${PIDS[-1]}

# --- checks while the hub runs -----------------------------------------------------------------
if wait_for "$W/zc_browse.out" "\"added\", \"name\": \"$PREFIX" "$T"; then
  jcheck "zeroconf ServiceBrowser added" "$W/zc_browse.out" 'e["event"] == "added" and e["name"].startswith(PREFIX)'
else
  fail "zeroconf ServiceBrowser added" "nothing within ${T}s; hub log: $(tail -n 2 "$W/hub.log" | tr '\n' ' ')"
fi
INSTANCE=$(sed -n "s/.*\"added\", \"name\": \"\($PREFIX[-0-9]*\)\._gambiarra\._tcp\.local\.\".*/\1/p" \
  "$W/zc_browse.out" | head -n 1)
INSTANCE=${INSTANCE:-$PREFIX}
export INSTANCE
[ "$INSTANCE" != "$PREFIX" ] && echo "note: instance advertised as $INSTANCE"

wait_for "$W/bonjour.out" "\"up\",\"name\":\"$INSTANCE\"" "$T"
jcheck "bonjour-service up" "$W/bonjour.out" \
  'e["event"] == "up" and e["name"] == INSTANCE and e["port"] == PORT and e["addresses"] and {"version", "protocol", "path"} <= set(e["txt"])'

run timeout $((2 * T + 5)) "${AS_NOBODY[@]}" "$PY" "$HERE/zeroconf_browse.py" info "$T" "$INSTANCE." >"$W/zc_info.out" 2>&1
jcheck "zeroconf get_service_info" "$W/zc_info.out" \
  'e["port"] == PORT and any(a.count(".") == 3 for a in e["addresses"]) and {"version", "protocol", "path"} <= set(e["txt"])'

if [ "$AVAHI" = 1 ]; then
  run timeout $((T + 5)) avahi-browse -rpt _gambiarra._tcp >"$W/avahi_r.out" 2>&1
  if line=$(grep -E "^=;[^;]*;IPv4;$INSTANCE;_gambiarra\._tcp;local;[^;]+;[0-9.]+;$PORT;" "$W/avahi_r.out"); then
    pass "avahi-browse -rpt resolves" "$(echo "$line" | head -n 1)"
  else fail "avahi-browse -rpt resolves" "$(tr '\n' ' ' <"$W/avahi_r.out")"; fi
  run timeout $((T + 5)) avahi-browse -apt >"$W/avahi_a.out" 2>&1
  if grep -qE ";_gambiarra\._tcp;local$" "$W/avahi_a.out"; then pass "avahi-browse -apt lists _gambiarra._tcp"
  else fail "avahi-browse -apt lists _gambiarra._tcp" "$(tr '\n' ' ' <"$W/avahi_a.out")"; fi
fi

dig_mcast_check "dig @224.0.0.251 PTR" _gambiarra._tcp.local PTR "q: PTR \(QM\)\? _gambiarra" \
  "PTR $INSTANCE\._gambiarra" " ar: .*SRV [^ ]+:$PORT " " ar: .*TXT .*path=" " ar: .* A [0-9]"
dig_mcast_check "dig @224.0.0.251 SRV" "$INSTANCE._gambiarra._tcp.local" SRV "q: SRV " "SRV [^ ]+:$PORT "
# A unicast datagram to a shared port 5353 reaches one socket only, and python-zeroconf's
# browser binds 127.0.0.1:5353 and each interface address too (a better match than the hub's
# 0.0.0.0:5353), so it takes them: direct unicast queries can only be checked with --netns.
if [ "$NETNS" = 1 ]; then
  dig_check "dig @$HUB_ADDR (direct unicast) PTR" "$HUB_ADDR" _gambiarra._tcp.local PTR \
    "IN[[:space:]]+PTR[[:space:]]+$INSTANCE" "IN[[:space:]]+SRV[[:space:]]" "IN[[:space:]]+TXT[[:space:]]" "IN[[:space:]]+A[[:space:]]"
  dig_check "dig @$HUB_ADDR (direct unicast) SRV" "$HUB_ADDR" "$INSTANCE._gambiarra._tcp.local" SRV "IN[[:space:]]+SRV[[:space:]].* $PORT "
else
  echo "SKIP dig @$HUB_ADDR (direct unicast): the browsers share 5353 with the hub here; use --netns"
fi

run timeout $((T + 5)) "$PY" "$HERE/zeroconf_browse.py" legacy 3 >"$W/legacy.out" 2>&1
jcheck "legacy query to 224.0.0.251 from an ephemeral port (what dig used to do)" "$W/legacy.out" \
  'e["event"] == "reply" and e["id_ok"] and e["questions"] and any("name=%s." % INSTANCE in a for a in e["answers"]) and all(any(t in a for a in e["answers"]) for t in ("type=ptr", "type=srv", "type=txt", "type=a "))'

run timeout $((T + 10)) "${CLI[@]}" discover >"$W/discover.out" 2>&1
if [ $? -eq 0 ] && grep -q ":$PORT" "$W/discover.out" && grep -qE "$INSTANCE|$HUB_ADDR" "$W/discover.out"; then
  pass "gambiarra discover" "$(head -n 1 "$W/discover.out")"
else fail "gambiarra discover" "$(tail -n 2 "$W/discover.out" | tr '\n' ' ')"; fi
run timeout $((T + 10)) "${CLI[@]}" discover --json >"$W/discover_json.out" 2>&1
if python3 -c 'import json, sys; hubs = json.load(open(sys.argv[1]))
assert any(h.get("port") == int(sys.argv[2]) and str(h.get("name", "")).startswith(sys.argv[3]) for h in hubs)' \
    "$W/discover_json.out" "$PORT" "$INSTANCE" 2>/dev/null; then
  pass "gambiarra discover --json" "$(head -c 200 "$W/discover_json.out" | tr '\n' ' ')"
else fail "gambiarra discover --json" "$(tail -n 2 "$W/discover_json.out" | tr '\n' ' ')"; fi

# --- stop the hub: goodbyes --------------------------------------------------------------------
if kill -INT "$HUB_PID" 2>/dev/null; then
  end=$((SECONDS + T))
  while kill -0 "$HUB_PID" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
  if kill -0 "$HUB_PID" 2>/dev/null; then fail "hub exits on SIGINT" "still running after ${T}s"
  else pass "hub exits on SIGINT"; fi
else fail "hub exits on SIGINT" "it had already exited: $(tail -n 2 "$W/hub.log" | tr '\n' ' ')"; fi
wait_for "$W/zc_browse.out" "\"removed\", \"name\": \"$INSTANCE\." 5
jcheck "zeroconf ServiceBrowser removed" "$W/zc_browse.out" 'e["event"] == "removed" and e["name"].startswith(INSTANCE + ".")'
wait_for "$W/bonjour.out" "\"down\",\"name\":\"$INSTANCE\"" 5
jcheck "bonjour-service down" "$W/bonjour.out" 'e["event"] == "down" and e["name"] == INSTANCE'
if [ "$AVAHI" = 1 ]; then
  if wait_for "$W/avahi_browse.out" "^-;[^;]*;IPv4;$INSTANCE;" 5; then pass "avahi-browse sees the goodbye"
  else fail "avahi-browse sees the goodbye" "$(tail -n 2 "$W/avahi_browse.out" | tr '\n' ' ')"; fi
fi
if [ -n "$AVAHI_LOG" ]; then
  if bad=$(grep -iE "invalid response packet|invalid source port|conflict" "$AVAHI_LOG"); then
    fail "avahi log clean" "$(echo "$bad" | head -n 3 | tr '\n' ' ')"
  else pass "avahi log clean" "$(grep -c . "$AVAHI_LOG") lines, no invalid packet/source port/conflict"; fi
fi

echo "interop: $PASSED passed, $FAILED failed, $XFAILED expected failures"
[ "$FAILED" -eq 0 ]
