"""python-zeroconf side of .ci/interop/run.sh; prints one JSON object per line.

  browse SECONDS        ServiceBrowser on _gambiarra._tcp: {"event": "added"|"removed"|"updated", "name": ...}
  info SECONDS [PREFIX] find an instance (whose name starts with PREFIX) by browsing, then
                        get_service_info() on it
  legacy SECONDS [QTYPE [NAME]]   what old `dig @224.0.0.251 -p 5353` did: one query from an
                        ephemeral port to the group on every interface, replies read by unicast
Run with the venv that has zeroconf (not with gambiarra's interpreter requirements).
"""
import json, queue, signal, socket, struct, sys, threading, time
import ifaddr
from zeroconf import DNSIncoming, ServiceBrowser, ServiceStateChange, Zeroconf

TYPE = "_gambiarra._tcp.local."
LOCK = threading.Lock()  # print() from two threads can interleave two lines


def out(**kw):
    with LOCK:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()


def browse(events=None):
    zc = Zeroconf()
    def handler(zeroconf, service_type, name, state_change):
        if events is not None and state_change is ServiceStateChange.Added:
            events.put(name)
        out(event=state_change.name.lower(), name=name, t=round(time.time(), 3))
    return zc, ServiceBrowser(zc, TYPE, handlers=[handler])


def main():
    mode, seconds = sys.argv[1], float(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if mode == "browse":
        zc, browser = browse()
        try:
            time.sleep(seconds)
        finally:
            browser.cancel()
            zc.close()
    elif mode == "info":
        events = queue.Queue()
        zc, browser = browse(events)
        try:
            prefix, deadline = (sys.argv[3] if len(sys.argv) > 3 else ""), time.time() + seconds
            name = events.get(timeout=seconds)
            while not name.startswith(prefix):
                name = events.get(timeout=max(0.01, deadline - time.time()))
            info = zc.get_service_info(TYPE, name, timeout=int(seconds * 1000))
            if info is None:
                out(event="info", name=name, error="get_service_info returned None")
            else:
                out(event="info", name=name, port=info.port, server=info.server,
                    addresses=info.parsed_addresses(),
                    txt={k.decode(): (v or b"").decode() for k, v in info.properties.items()})
        except queue.Empty:
            out(event="info", error="no instance of %s within %ss" % (TYPE, seconds))
        finally:
            browser.cancel()
            zc.close()
    elif mode == "legacy":
        legacy(seconds, sys.argv[3] if len(sys.argv) > 3 else "PTR",
               sys.argv[4] if len(sys.argv) > 4 else TYPE)


def legacy(seconds, qtype, name):
    qtypes = {"A": 1, "PTR": 12, "TXT": 16, "SRV": 33, "ANY": 255}
    qid = 0x4242
    packet = struct.pack("!6H", qid, 0, 1, 0, 0, 0)
    packet += b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split(".")) + b"\0"
    packet += struct.pack("!HH", qtypes[qtype], 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip.ip))
                try:
                    s.sendto(packet, ("224.0.0.251", 5353))
                except OSError as e:
                    out(event="send-error", interface=ip.ip, error=str(e))
    deadline = time.time() + seconds
    s.settimeout(0.2)
    while time.time() < deadline:
        try:
            data, src = s.recvfrom(9000)
        except socket.timeout:
            continue
        msg = DNSIncoming(data)
        out(event="reply", source="%s:%d" % src, id=msg.id, id_ok=msg.id == qid,
            questions=[q.name for q in msg.questions],
            answers=[str(r) for r in msg.answers()])


if __name__ == "__main__":
    main()
