#!/usr/bin/env python3
"""Gambiarra: pool the local LLMs of everyone on a network into rooms.

One person runs the hub (a laptop, a Raspberry Pi)::

    python3 gambiarra.py serve --mdns          # hub on port 3000, found on the network

Anyone creates a room, participants register their OpenAI-compatible servers
(Ollama, LM Studio, LocalAI, vLLM, llama.cpp...), and any OpenAI client uses
them through the hub at ``http://HUB:3000/rooms/CODE/v1``::

    python3 gambiarra.py create "Hackathon"    # prints the room code
    python3 gambiarra.py list                  # the rooms, participants and models
    python3 gambiarra.py chat XK7P2M "Hello!"  # check that a room answers
    python3 gambiarra.py monitor XK7P2M        # follow a room's events
    python3 gambiarra.py join XK7P2M           # share your local LLM server
    python3 gambiarra.py discover              # the hubs on the local network

Client commands find the hub by mDNS when neither --hub nor $GAMBIARRA_HUB
names it.

``join`` finds a local server (Ollama, LM Studio, llama.cpp, vLLM) and serves
it through a tunnel: the hub never has to reach the participant's machine.

The hub keeps the HTTP API of the original Gambiarra (Bun/TypeScript), so its
SDK, the Vercel AI SDK and the ``openai`` package work unchanged. ``import
gambiarra`` gives ``Hub`` and ``Agent`` for scripts and tests.

Standard library only; CPython 3.8 to 3.13. MIT licence.
"""

from __future__ import annotations

import os
import sys

#: What ``serve`` runs in its fresh interpreter: import this file by its path
#: (whatever its name), then run the command line.
IMPORT_AND_RUN = ("import importlib.util, sys; path = sys.argv.pop(1); "
                  "spec = importlib.util.spec_from_file_location('gambiarra', path); "
                  "module = importlib.util.module_from_spec(spec); "
                  "sys.modules['gambiarra'] = module; spec.loader.exec_module(module); "
                  "sys.exit(module.main())")


def serve_as_import():
    """Start ``serve`` again in a fresh interpreter that imports this file.

    Run as a script, CPython keeps the file's whole syntax tree in memory until
    the script ends: about 10 MiB, more than the hub itself needs, for days on
    a Raspberry Pi. Imported, the tree is freed once compiled (or never built,
    from __pycache__). Returns only if it cannot (not POSIX, no interpreter
    path, or GAMBIARRA_REEXEC=0).
    """
    if os.name != "posix" or not sys.executable or os.environ.get("GAMBIARRA_REEXEC") == "0":
        return
    flags = [flag for flag, on in (("-E", sys.flags.ignore_environment),
                                   ("-s", sys.flags.no_user_site), ("-S", sys.flags.no_site),
                                   ("-I", sys.flags.isolated)) if on]
    flags += ["-O"] * sys.flags.optimize
    command = [sys.executable] + flags + ["-c", IMPORT_AND_RUN, os.path.abspath(__file__)]
    try:
        os.execv(sys.executable, command + sys.argv[1:])
    except OSError:
        pass  # serve from this process, as is


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve_as_import()  # before the imports below, which the fresh interpreter redoes

import argparse
import base64
import collections
import contextlib
import email.utils
import errno
import getpass
import hashlib
import heapq
import hmac
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import queue
import random
import re
import secrets
import select
import selectors
import signal
import socket
import struct
import tempfile
import threading
import time
import urllib.parse

try:
    import resource  # POSIX only: the open-file limit
except ImportError:
    resource = None

__version__ = "0.1.0"
__all__ = ["Hub", "Agent", "ApiError", "GambiarraError", "main", "__version__"]

log = logging.getLogger("gambiarra")


# === Constants ===

DEFAULT_HOST = "0.0.0.0"
#: Listen addresses that mean "every interface".
EVERY_INTERFACE = ("", "0.0.0.0", "::")
DEFAULT_PORT = 3000
DEFAULT_HUB_URL = "http://localhost:3000"
#: Where client commands read a room's password when --password has no value.
PASSWORD_VARIABLE = "GAMBIARRA_PASSWORD"
#: --password alone, or "--password -": ask for it (getpass) on a terminal,
#: else read one line of stdin. Never in the command line, so never in `ps`.
PASSWORD_FROM_INPUT = "-"

#: Largest request body the hub reads (the OpenAI API has no fixed limit;
#: 32 MiB fits long chats with images).
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
#: Memory for the request bodies the hub holds at once (serve --max-body-memory).
#: A relayed body costs up to 6 times its size (measured: a 30 MiB prompt
#: through the tunnel raised the hub's peak RSS by 175 MiB): its bytes, its
#: text while decoded, its JSON values, the bytes forwarded and the tunnel's
#: job. Bodies up to SMALL_BODY_BYTES are not counted (the connection caps
#: bound them). Without it, one laptop's 128 connections sending 32 MiB each
#: would take the hub's memory many times over.
DEFAULT_MAX_BODY_MEMORY = 384 * 1024 * 1024
BODY_MEMORY_FACTOR = 6
SMALL_BODY_BYTES = 64 * 1024
#: Time to open a TCP connection to a participant's server.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: Longest silence from a backend before its first byte or between chunks.
#: Generous because models load from disk on their first request.
DEFAULT_BACKEND_TIMEOUT_S = 300.0
#: How often participants heartbeat (the original's HEALTH_CHECK_INTERVAL).
DEFAULT_HEALTH_INTERVAL_S = 10.0
#: Missed heartbeats before a participant is offline (the original's 3 x 10 s).
PARTICIPANT_TIMEOUT_HEARTBEATS = 3
#: An offline participant is removed this long after it went offline.
DEFAULT_FORGET_AFTER_S = 600.0
#: Requests a participant serves at once when its join does not say.
DEFAULT_MAX_CONCURRENT = 4

#: An SSE comment line this often keeps idle event streams open through proxies.
SSE_KEEPALIVE_S = 15.0
#: Events queued for one subscriber before it counts as stalled and is dropped.
SUBSCRIBER_QUEUE_EVENTS = 1024
#: A client connection idle (or not reading) this long is closed: between two
#: requests, between two reads of a body, and while an answer waits to be read
#: (sendall's timeout bounds the whole call since Python 3.5).
CLIENT_IDLE_TIMEOUT_S = 120.0
#: listen() backlog; the default of 5 stalls bursts of new connections.
LISTEN_BACKLOG = 1024
#: Client connections held at once (a thread each). Past it a new connection
#: gets a canned 503 and is closed. Lowered at start to fit the open-file limit.
DEFAULT_MAX_CONNECTIONS = 1000
#: Connections one client address (an IPv6 /64) may hold at once, so one
#: laptop cannot take every slot. A joined agent holds about maxConcurrent + 2.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 128
#: Open files kept back from the connection cap: the listening socket, the
#: state file, mDNS, the watcher's selector, logging, stdio.
FD_RESERVE = 64
#: Open files a connection may need: its socket, and a backend connection
#: while it relays a request to a direct participant.
FDS_PER_CONNECTION = 2
#: When the hub holds this share of its cap, idle keep-alive connections are
#: closed after BUSY_KEEPALIVE_S instead of --client-timeout (nginx frees
#: idle keep-alive connections the same way when it runs short).
BUSY_SHARE = 0.75
BUSY_KEEPALIVE_S = 5.0
#: A whole request head (request line and headers) must arrive within this
#: from the connection's start or the request's first byte (nginx's
#: client_header_timeout); a client dribbling bytes is cut with a 408.
DEFAULT_HEADER_TIMEOUT_S = 60.0
#: A request body must keep up this rate after the grace (Apache's
#: mod_reqtimeout body=20,MinRate=500: every 500 bytes buy a second more).
DEFAULT_MIN_BODY_RATE = 500
BODY_GRACE_S = 20.0
#: accept() failing for lack of resources (out of file descriptors or
#: memory) is retried after a pause, 5 ms doubling to 1 s, like Go's net/http:
#: the pending connection keeps the listening socket readable, so retrying at
#: once is a busy loop.
ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
ACCEPT_BACKOFF_FIRST_S = 0.005
ACCEPT_BACKOFF_MAX_S = 1.0
#: Thread stack size of ``serve`` (the process default is 8 MiB on Linux,
#: which a 32-bit Raspberry Pi's 3 GiB address space holds only ~350 times).
#: Measured: 512 KiB segfaults CPython 3.8/3.9 on plain recursion to the
#: default limit; 1 MiB holds it on 3.8-3.13, and JSON nesting up to 8,000
#: levels on 3.13 (whose C recursion limit is far above what small stacks
#: hold). Bodies nested deeper than MAX_JSON_DEPTH are refused before decoding.
THREAD_STACK_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 512
#: Bytes read from a backend at once while relaying a stream.
RELAY_READ_BYTES = 16384
#: Idle keep-alive connections kept per backend.
POOL_IDLE_PER_BACKEND = 32
#: Idle backend connections are closed after this long: below the 5 s
#: keep-alive timeout of llama.cpp, Node and uvicorn servers.
POOL_IDLE_S = 4.0
#: A tunnelled participant's long poll lasts this long by default, at most the max.
TUNNEL_POLL_S = 25.0
TUNNEL_POLL_MAX_S = 60.0
#: A tunnelled participant whose agent has no poll open is still routed to for
#: this long after its last poll ended (the agent polls again at once), and
#: for this long after it joined.
TUNNEL_LISTEN_MARGIN_S = 5.0
#: Answer pieces (up to RELAY_READ_BYTES each) held per tunnelled request; past
#: that, the agent's upload waits for the client to read.
TUNNEL_PIECES = 64
#: The only paths the hub relays to a participant's server (always as POST),
#: and so the only ones a participant's agent forwards to its local server:
#: a hub (or a rogue one found by mDNS) must not make it pull models, delete
#: them or read anything else there.
RELAYED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: Interim (1xx) answers skipped before a backend's final one; more is a broken backend.
MAX_INTERIM_ANSWERS = 8
#: Answers without framing up to this size are sent whole, in one write; larger
#: ones piece by piece as they arrive.
WHOLE_ANSWER_BYTES = 65536
#: Hubs a relayed request may have passed (Via entries) before it counts as a
#: loop, and the longest Via header relayed.
MAX_VIA_HOPS = 8
MAX_VIA_BYTES = 1024
#: TCP keepalive: a peer that vanished without closing (a laptop's lid shut) is
#: noticed after IDLE + INTERVAL x PROBES seconds of silence, not at a timeout.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
#: How long a request waits for a busy participant's free slot before a 503.
DEFAULT_QUEUE_TIMEOUT_S = 60.0
#: Seconds a 503 for busy participants suggests waiting (Retry-After).
RETRY_AFTER_S = 5
#: A backend that refused a connection is picked last for this long.
BACKEND_PENALTY_S = 30.0
#: Unread request bodies up to this size are drained to keep the connection.
DRAIN_LIMIT_BYTES = 64 * 1024
#: After refusing a body, read and drop this much for this long so the client
#: gets our answer instead of a reset (a "lingering close", RFC 9112 section 9.6).
LINGER_BYTES = 4 * 1024 * 1024
LINGER_S = 2.0
#: Limits of a request's header block: lines (the stdlib's), bytes of one
#: line (the stdlib's), bytes of all header lines (nginx takes 32 KiB, Go 1 MiB).
MAX_HEADERS = 100
MAX_HEADER_LINE_BYTES = 65536
DEFAULT_MAX_HEADER_BYTES = 65536
#: A relay still waiting on its backend after this long has its client watched
#: for hanging up (and the watcher thread wakes this often).
WATCH_GRACE_S = 0.1
#: The same backend failure of one participant is logged at most this often.
WARN_EVERY_S = 60.0
#: Time-to-first-byte samples kept per participant for the median.
TTFT_SAMPLES = 100
#: Stream tail searched for a final "usage" object (metrics only).
USAGE_TAIL_BYTES = 4096

#: A room with no participant for this long is removed.
DEFAULT_ROOM_TTL_S = 24 * 3600.0
#: Temporary state files in the old naming (".hub-XXXXXXXX.tmp", which does
#: not say whose) are removed at start only once this old: a running hub
#: renames its own within milliseconds.
LEGACY_TEMPORARY_AGE_S = 60.0
#: Room password hashing: scrypt with 4 MiB of memory (about 9 ms of CPU on a
#: laptop core, 30-40 ms on a Raspberry Pi 4). The parameters are stored with
#: each hash, so they can be raised later without breaking saved rooms.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 12, 8, 1
#: The fallback where hashlib has no scrypt (Python built without OpenSSL 1.1).
PBKDF2_ITERATIONS = 100000
#: Checked passwords remembered per room (as keyed digests, in memory only),
#: so Bearer tokens on every request cost a HMAC instead of a scrypt.
PASSWORD_CACHE_ENTRIES = 64
#: Password hashes computed at once, hub-wide (serve --max-password-checks):
#: each scrypt takes 4 MiB and a core for 10-40 ms, so a burst of guesses must
#: queue, not run side by side. A check waits this long for its turn, then 503.
DEFAULT_MAX_PASSWORD_CHECKS = 2
PASSWORD_CHECK_WAIT_S = 5.0
#: Wrong passwords from one client address within the window before its
#: checks are refused (429, without hashing) for the penalty; each further
#: wrong one doubles the penalty, up to the max (serve --password-failures).
#: An address is forgiven after a right password, or after FORGIVE_S without
#: a wrong one.
DEFAULT_PASSWORD_FAILURES = 5
PASSWORD_FAILURE_WINDOW_S = 60.0
PASSWORD_PENALTY_S = 5.0
PASSWORD_PENALTY_MAX_S = 300.0
PASSWORD_FORGIVE_S = 900.0
#: Client addresses whose wrong passwords are remembered; the least recently
#: failing is forgotten first.
PASSWORD_ADDRESSES = 4096

#: Room codes: 6 characters without look-alikes (0/O, 1/I/L), upper case.
ROOM_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
ROOM_CODE_LENGTH = 6

#: Longest accepted text fields (ids end up in URLs and logs).
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 200
#: Request "model" values that ask for any participant, and the prefix that
#: asks for a model by name: never a participant's id, so nobody can join
#: under them and receive requests meant for everyone's servers.
WILDCARD_MODELS = ("*", "any")
MODEL_PREFIX = "model:"

#: Caps, so one attendee cannot fill the hub's memory or threads (each a
#: ``serve`` flag): rooms, participants per room, event streams per room and
#: per client address, and the JSON size of a join's "specs" and "config".
DEFAULT_MAX_ROOMS = 1000
DEFAULT_MAX_PARTICIPANTS = 256
DEFAULT_MAX_SUBSCRIBERS = 64
DEFAULT_MAX_SUBSCRIBERS_PER_ADDRESS = 16
DEFAULT_MAX_SPECS_BYTES = 16 * 1024
#: Longest wait for the name of a direct participant's endpoint to resolve
#: when it joins (its addresses are checked; see endpoint_trouble()).
ENDPOINT_RESOLVE_S = 2.0

CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Gambiarra-Secret"),
    ("Access-Control-Max-Age", "86400"),
)
#: A preflight's Access-Control-Request-Headers that the hub allows by echoing
#: them (OpenAI's JavaScript SDK adds its own X-Stainless-* headers): header
#: names, comma-separated, nothing else.
_HEADER_NAME = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_REQUESTED_HEADERS = re.compile(r"%s(\s*,\s*%s)*\Z" % (_HEADER_NAME, _HEADER_NAME))
#: Content types a web page may POST to any site without a CORS preflight (the
#: "CORS-safelisted" ones of the Fetch standard): with them, any page an
#: attendee opens could create rooms or join participants through her browser.
#: The hub refuses them (415), and bodies with no Content-Type at all.
SIMPLE_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded",
                        "multipart/form-data")

#: OpenAI error "type" by HTTP status, for errors on /v1/* routes.
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error",
                      429: "rate_limit_error"}


#: mDNS (RFC 6762) and DNS-SD (RFC 6763): how ``serve --mdns`` is found.
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
MDNS_SERVICE_TYPE = "_gambiarra._tcp.local"
MDNS_SERVICE_TYPES = "_services._dns-sd._udp.local"  # RFC 6763 section 9
MDNS_HOST_TTL_S = 120     # RFC 6762 section 10: records naming a host (SRV, A)
MDNS_OTHER_TTL_S = 4500   # RFC 6762 section 10: the others (PTR, TXT)
MDNS_LEGACY_TTL_S = 10    # RFC 6762 section 6.7: replies to one-shot queries
MDNS_LEGACY_MAX_BYTES = 512   # what a conventional DNS client reads
MDNS_MAX_PACKET_BYTES = 9000  # RFC 6762 section 17; larger datagrams are dropped
MDNS_MAX_POINTERS = 32        # compression pointers followed in one name
#: A record is multicast again on an interface only after this long (section 6).
MDNS_REPEAT_S = 1.0
#: Probing (section 8.1): a random wait, then 3 queries 250 ms apart.
MDNS_PROBE_WAIT_S = 0.25
MDNS_PROBE_INTERVAL_S = 0.25
MDNS_PROBES = 3
#: The loser of a simultaneous probe waits this long before probing again (section 8.2).
MDNS_TIEBREAK_WAIT_S = 1.0
#: Announcements after probing: at once, then 1 s and 2 s later (section 8.3:
#: at least two, one second apart, the gaps at least doubling).
MDNS_ANNOUNCE_GAPS_S = (1.0, 2.0)
#: Goodbyes (TTL 0) on shutdown: 3 copies, 100 ms apart, like mDNSResponder.
MDNS_GOODBYES = 3
MDNS_GOODBYE_GAP_S = 0.1
#: Shared answers (PTR) wait 20-120 ms so responders do not collide (section 6).
MDNS_SHARED_DELAY_S = (0.02, 0.12)
#: After 15 conflicts in 10 s, wait 5 s before each probe (section 8.1).
MDNS_CONFLICT_LIMIT, MDNS_CONFLICT_WINDOW_S, MDNS_CONFLICT_PAUSE_S = 15, 10.0, 5.0
#: A name is given up only when conflicting answers follow this many of the
#: probes of one series: a genuine owner answers every probe, while one
#: spoofed packet, or a burst shorter than a probe interval, follows one.
MDNS_CONFLICT_CONFIRMATIONS = 2
#: How often the responder rereads the interfaces (and re-announces if they changed).
MDNS_INTERFACE_REFRESH_S = 30.0
#: The CLI's search: the longest wait, the query repeated once after 1 s, and
#: the extra wait for other hubs once one has answered.
MDNS_BROWSE_S = 2.0
MDNS_BROWSE_RETRY_S = 1.0
MDNS_BROWSE_SETTLE_S = 0.5

# === Errors and small helpers ===

class GambiarraError(Exception):
    """An expected failure with a message meant for people (no traceback)."""


class ApiError(GambiarraError):
    """An HTTP error answer, raised deep inside and rendered once by the handler.

    ``code`` is a short machine-readable reason, used as the OpenAI error code
    on ``/v1/*`` routes.
    """

    def __init__(self, status, message, code=None, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = tuple(headers)


class ClientGone(Exception):
    """The HTTP client closed its connection or stopped reading."""


def now_ms():
    """Wall-clock milliseconds, for timestamps shown to people and clients."""
    return int(time.time() * 1000)


#: What printable() escapes: C0 controls (ESC, CR, LF...), DEL and C1 controls
#: (CSI, OSC as one byte), as \xNN; and the bidirectional overrides and
#: isolates, as \uNNNN, which make a terminal show text in another order
#: than it is (the "Trojan Source" trick).
_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + list(range(127, 160))}
_CONTROL_ESCAPES.update({c: "\\u%04x" % c for c in list(range(0x202A, 0x202F))
                         + list(range(0x2066, 0x206A))})
#: The same, but newlines and tabs pass: for text meant to span lines (a chat answer).
_TEXT_ESCAPES = {c: escape for c, escape in _CONTROL_ESCAPES.items() if c not in (9, 10)}


def printable(text, lines=False):
    """``text`` with control characters escaped, visibly (``\\x1b``): the one
    way a string from the network (a name, a model, an error message, an
    answer) reaches a terminal or a log line, so that it cannot forge lines
    or drive the terminal (move the cursor, set the title, write the
    clipboard). ``lines`` keeps newlines and tabs."""
    return str(text).translate(_TEXT_ESCAPES if lines else _CONTROL_ESCAPES)


class PrintableLog(logging.Filter):
    """Escapes every message of the gambiarra logger with printable(): a
    nickname, a model or a path sent by anyone must not drive the terminal
    of whoever reads the hub's (or the agent's) log, nor forge its lines."""

    def filter(self, record):
        message = record.getMessage()
        escaped = printable(message)
        if escaped != message:
            record.msg, record.args = escaped, ()
        return True


log.addFilter(PrintableLog())


def json_bytes(obj):
    """Compact JSON, ASCII-escaped so lone surrogates cannot break encoding."""
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def openai_error(status, message, code=None):
    """The error object OpenAI clients parse: {"error": {message, type, code}}."""
    kind = OPENAI_ERROR_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code}}


def require_string(body, field, max_chars=MAX_NAME_CHARS, required=True):
    """Return body[field] as a non-empty string, or raise a 400 naming the field."""
    value = body.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError(400, "Missing required field: %s" % field, "missing_field")
        return None
    if not isinstance(value, str):
        raise ApiError(400, "Field '%s' must be a string" % field, "invalid_field")
    if len(value) > max_chars:
        raise ApiError(400, "Field '%s' is longer than %d characters" % (field, max_chars),
                       "invalid_field")
    return value


def _reject_json_constant(name):
    """NaN and Infinity are Python's JSON extensions, not JSON: refuse them
    rather than forward them to a backend that cannot parse them."""
    raise ValueError("%s is not valid JSON" % name)


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_json_constant)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text, index):
    return _JSON_SPACE.match(text, index).end()


def decode_members(text):
    """Decode a JSON object member by member: (dict, {key: [(start, end) of
    each of its values in text]}), or None when ``text`` is JSON but not an
    object. ValueError names what is wrong; RecursionError when too deep."""
    index = _skip_space(text, 0)
    if not text.startswith("{", index):
        _JSON_DECODER.decode(text)  # raises if it is no JSON at all
        return None
    fields, spans = {}, {}
    index = _skip_space(text, index + 1)
    closed = text.startswith("}", index)
    while not closed:
        if not text.startswith('"', index):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                       text, index)
        key, index = _JSON_DECODER.raw_decode(text, index)
        index = _skip_space(text, index)
        if not text.startswith(":", index):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
        start = _skip_space(text, index + 1)
        fields[key], index = _JSON_DECODER.raw_decode(text, start)
        spans.setdefault(key, []).append((start, index))
        index = _skip_space(text, index)
        closed = text.startswith("}", index)
        if not closed and not text.startswith(",", index):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _skip_space(text, index + 1) if not closed else index
    index = _skip_space(text, index + 1)
    if index != len(text):
        raise json.JSONDecodeError("Extra data", text, index)
    return fields, spans


def _byte_spans(text, spans):
    """``spans`` (indices in ``text``) as offsets in its UTF-8 bytes, in one pass."""
    bounds = sorted({i for pairs in spans.values() for pair in pairs for i in pair})
    offsets, position, offset = {}, 0, 0
    for bound in bounds:
        offset += len(text[position:bound].encode("utf-8"))
        offsets[bound], position = offset, bound
    return {key: [(offsets[a], offsets[b]) for a, b in pairs] for key, pairs in spans.items()}


#: A JSON string once its escaped backslashes and quotes are gone (see
#: json_too_deep): one run of a character class, which the regex engine
#: matches without a backtracking entry per character (a 30 MiB string took
#: 3.6 GiB and 6 s with the obvious pattern).
_BARE_JSON_STRING = re.compile(rb'"[^"]*"')
#: Opening brackets become "(", closing ones ")", anything else is dropped.
_BRACKETS_ONLY = (bytes.maketrans(b"[{]}", b"(())"), bytes(set(range(256)) - set(b"[]{}")))
_BRACKET_RUNS = re.compile(rb"\(+|\)+")
#: Innermost pairs removed by bytes.replace before counting in Python: each
#: pass takes one level off every nest, at C speed, while it shrinks the text.
_JSON_PEEL_PASSES = 16


def json_too_deep(raw, limit=MAX_JSON_DEPTH):
    """True when the JSON in ``raw`` nests arrays and objects deeper than
    ``limit``. Decoding recurses in C once per level, and on a small thread
    stack (THREAD_STACK_BYTES) CPython 3.13 crashes the whole process before
    its own recursion limit. Counting is enough for nearly every body; one
    with more brackets than the limit is scanned, strings skipped: with their
    escaped backslashes and quotes removed first, each string is one run of
    non-quotes (the scan costs less than decoding such a body)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # left to right, as JSON reads
    brackets = _BARE_JSON_STRING.sub(b"", unescaped).translate(*_BRACKETS_ONLY)
    for _ in range(_JSON_PEEL_PASSES):
        if brackets.count(b"(") <= limit:
            return False
        before = len(brackets)
        brackets = brackets.replace(b"()", b"")
        limit -= len(brackets) < before
        if len(brackets) > before * 15 // 16:  # few short nests: count them
            break
    depth = 0
    for run in _BRACKET_RUNS.finditer(brackets):
        step = len(run.group())
        depth += step if run.group()[0] == 40 else -step  # 40 is "("
        if depth > limit:
            return True
    return False


class JsonBody:
    """A request's JSON object and the bytes it came as.

    The relay forwards a client's body exactly as sent but for the top-level
    "model", which becomes the participant's own name for it: re-encoding
    the whole object would change how numbers are spelt, escape every
    non-ASCII character (a Portuguese prompt grows, an emoji takes 12 bytes)
    and cost time on a 30 MiB prompt. So the object is decoded member by
    member, remembering where each top-level value lies in ``raw``.
    """

    __slots__ = ("raw", "fields", "_spans")

    def __init__(self, raw):
        self.raw = raw
        if json_too_deep(raw):
            raise ApiError(400, "Request body is nested too deeply to decode (keep JSON under "
                                "%d levels)" % MAX_JSON_DEPTH, "invalid_json")
        try:
            text = raw.decode("utf-8")
            decoded = decode_members(text)
        except UnicodeDecodeError:
            raise ApiError(400, "Request body is not UTF-8 text", "invalid_json")
        except RecursionError:
            raise ApiError(400, "Request body is nested too deeply to decode (keep JSON under "
                                "a few hundred levels)", "invalid_json")
        except ValueError as exc:
            raise ApiError(400, "Request body is not valid JSON (%s)" % exc, "invalid_json")
        if decoded is None:
            raise ApiError(400, "Request body must be a JSON object", "invalid_json")
        self.fields, spans = decoded
        self._spans = spans if len(text) == len(raw) else _byte_spans(text, spans)

    def raw_value(self, key):
        """The bytes of the (last) top-level value of ``key``, as sent, or None."""
        spans = self._spans.get(key)
        return self.raw[spans[-1][0]:spans[-1][1]] if spans else None

    def with_value(self, key, value):
        """The body's bytes with every top-level ``key`` set to ``value``."""
        spans = self._spans.get(key)
        if not spans:
            return self.raw
        encoded, view, parts, last = json_bytes(value), memoryview(self.raw), [], 0
        for start, end in spans:
            parts += [view[last:start], encoded]
            last = end
        parts.append(view[last:])
        return b"".join(parts)


def optional_object(body, field):
    """Return body[field] as a dict ({} when absent), or raise a 400."""
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "Field '%s' must be an object" % field, "invalid_field")
    return value


def optional_positive_int(body, field, default):
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "Field '%s' must be a positive integer" % field, "invalid_field")
    return value


def normalize_endpoint(url):
    """Validate a participant's base URL and drop a trailing "/" or "/v1".

    The hub appends "/v1/chat/completions", so both "http://h:11434" and
    "http://h:11434/v1/" must end up as "http://h:11434" (no "/v1/v1").
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, "Field 'endpoint' must be an http:// or https:// URL, "
                            "like http://192.168.1.50:11434", "invalid_field")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path.rstrip("/"), "", ""))


class MemoryBudget:
    """A number of bytes that holders take and give back; ``_lock`` guards
    ``used``. Taking never waits: a request that does not fit is refused at
    once, while it holds nothing else."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size):
        """True if ``size`` more bytes fit (and are now taken)."""
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size):
        with self._lock:
            self.used -= size


class RepeatingTimer(threading.Timer):
    """A threading.Timer that calls its function every ``interval`` until cancel()."""

    def run(self):
        while not self.finished.wait(self.interval):
            try:
                self.function(*self.args, **self.kwargs)
            except Exception:  # a failing tick must not stop the next ones
                log.exception("periodic task %s failed", self.name)


# === Data model and registry ===

def median_of(values):
    """The median (statistics.median, without importing decimal and fractions)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class Metrics:
    """Per-participant counters shown in ``participants`` and the monitor."""

    __slots__ = ("requests", "errors", "ttft_ms", "ttft_samples", "tokens_per_second")

    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.ttft_ms = None
        self.ttft_samples = collections.deque(maxlen=TTFT_SAMPLES)
        self.tokens_per_second = None

    def to_json(self):
        median = round(median_of(self.ttft_samples), 1) if self.ttft_samples else None
        return {"requests": self.requests, "errors": self.errors, "ttftMs": self.ttft_ms,
                "ttftMedianMs": median, "tokensPerSecond": self.tokens_per_second}


class Participant:
    """One registered LLM server. Mutated only under the registry's lock."""

    __slots__ = ("id", "nickname", "model", "endpoint", "config", "specs", "transport",
                 "max_concurrent", "joined_at_ms", "last_seen_ms", "last_seen",
                 "offline_since", "in_flight", "metrics", "penalized_until", "secret",
                 "polls", "listening_until", "from_hub_machine")

    def __init__(self, fields, clock):
        self.id = fields["id"]
        self.nickname = fields["nickname"]
        self.model = fields["model"]
        self.endpoint = fields["endpoint"]
        self.config = fields["config"]
        self.specs = fields["specs"]
        self.transport = fields.get("transport", "direct")
        #: Joined from the hub's own machine: its endpoint may be there too.
        self.from_hub_machine = fields.get("fromHubMachine", False)
        self.max_concurrent = fields["maxConcurrent"]
        self.joined_at_ms = self.last_seen_ms = now_ms()
        self.last_seen = clock()
        self.offline_since = None
        self.in_flight = 0
        self.metrics = Metrics()
        self.penalized_until = 0.0
        self.secret = secrets.token_urlsafe(24)  # 192 bits; only join's answer shows it
        self.polls = 0  # a tunnelled participant's polls open now
        self.listening_until = self.last_seen + TUNNEL_LISTEN_MARGIN_S  # time to poll first

    @property
    def online(self):
        return self.offline_since is None

    def reachable(self, now):
        """Whether the hub can get a request to it: always for a direct one; for
        a tunnelled one, while its agent polls (or has just polled), or while
        it is full, which is why its agent is not polling."""
        return (self.transport != "tunnel" or self.polls > 0 or now <= self.listening_until
                or self.in_flight >= self.max_concurrent)

    def tunnel_key(self):
        """Names this participant's work queue; a re-join (new secret) gets a
        new one, so polls left over from before never take its work."""
        return (self.id, self.secret)

    def status(self):
        if not self.online:
            return "offline"
        return "busy" if self.in_flight >= self.max_concurrent else "online"

    def to_json(self):
        return {"id": self.id, "nickname": self.nickname, "model": self.model,
                "endpoint": self.endpoint, "config": self.config, "specs": self.specs,
                "status": self.status(), "joinedAt": self.joined_at_ms,
                "lastSeen": self.last_seen_ms, "transport": self.transport,
                "maxConcurrent": self.max_concurrent, "inFlight": self.in_flight,
                "metrics": self.metrics.to_json()}


def hash_password(password):
    """A salted, self-describing hash of a room password (never the password)."""
    salt = os.urandom(16)
    data = password.encode("utf-8")
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(data, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
        params = "scrypt$%d$%d$%d" % (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    else:
        digest = hashlib.pbkdf2_hmac("sha256", data, salt, PBKDF2_ITERATIONS)
        params = "pbkdf2_sha256$%d" % PBKDF2_ITERATIONS
    return "%s$%s$%s" % (params, base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def password_matches(password_bytes, stored):
    """Check UTF-8 password bytes against hash_password()'s output, in
    constant time. Both hash functions release the GIL while they work."""
    try:
        kind, *params, salt, digest = stored.split("$")
        salt, digest = base64.b64decode(salt), base64.b64decode(digest)
        if kind == "scrypt":
            n, r, p = (int(x) for x in params)
            candidate = hashlib.scrypt(password_bytes, salt=salt, n=n, r=r, p=p,
                                       maxmem=256 * 1024 * 1024, dklen=len(digest))
        elif kind == "pbkdf2_sha256":
            candidate = hashlib.pbkdf2_hmac("sha256", password_bytes, salt, int(params[0]))
        else:
            return False
    except (ValueError, TypeError, AttributeError):
        return False
    return hmac.compare_digest(candidate, digest)


class Strikes:
    """The recent wrong passwords of one client address."""

    __slots__ = ("recent", "penalty_s", "blocked_until", "last_failure")

    def __init__(self):
        self.recent = collections.deque()  # times of wrong passwords before a penalty
        self.penalty_s = 0.0  # the last penalty given; 0 while there was none
        self.blocked_until = self.last_failure = 0.0


class PasswordGuard:
    """Keeps password guessing cheap for the hub and slow for the guesser.

    At most ``max_checks`` password hashes run at once, hub-wide; a check
    waits ``wait_s`` for its turn, then gets 503. An address that sent
    ``failures`` wrong passwords within PASSWORD_FAILURE_WINDOW_S gets 429
    with Retry-After, without any hashing, for PASSWORD_PENALTY_S, doubled at
    each further wrong password up to PASSWORD_PENALTY_MAX_S. ``_lock`` guards
    ``_strikes`` (address -> Strikes, least recently failing first, at most
    ``addresses`` of them); the semaphore counts the checks running.
    """

    def __init__(self, max_checks=DEFAULT_MAX_PASSWORD_CHECKS,
                 failures=DEFAULT_PASSWORD_FAILURES, wait_s=PASSWORD_CHECK_WAIT_S,
                 addresses=PASSWORD_ADDRESSES, clock=time.monotonic):
        self.failures, self.wait_s, self.addresses, self.clock = (
            failures, wait_s, addresses, clock)
        self._slots = threading.BoundedSemaphore(max_checks)
        self._lock = threading.Lock()
        self._strikes = collections.OrderedDict()

    def refuse_if_penalised(self, address):
        """429 while ``address`` serves a penalty. Asked before the cache of
        checked passwords too: else a penalised guesser could still try its
        guesses against the remembered right password, at the speed of a HMAC."""
        with self._lock:
            strikes = self._strikes.get(address)
            wait_s = strikes.blocked_until - self.clock() if strikes is not None else 0
        if wait_s > 0:
            seconds = max(1, int(wait_s + 0.999))  # whole seconds, rounded up
            raise ApiError(429, "Too many wrong passwords from %s; try again in %d s"
                           % (printable(address), seconds), "too_many_wrong_passwords",
                           headers=[("Retry-After", str(seconds))])

    @contextlib.contextmanager
    def checking(self, address):
        """Hold one of the hub's password-check slots (503 after ``wait_s``)."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise ApiError(503, "The hub is busy checking passwords; try again in a moment",
                           "password_checks_busy", headers=[("Retry-After", "1")])
        try:
            self.refuse_if_penalised(address)  # it may have begun while this one waited
            yield
        finally:
            self._slots.release()

    def failed(self, address):
        """Count a wrong password (one that was hashed) from ``address``."""
        if address is None:
            return
        now = self.clock()
        with self._lock:
            strikes = self._strikes.pop(address, None) or Strikes()
            self._strikes[address] = strikes  # now the most recent
            if len(self._strikes) > self.addresses:
                self._strikes.popitem(last=False)
            if strikes.penalty_s and now - strikes.last_failure > PASSWORD_FORGIVE_S:
                strikes.penalty_s = 0.0
            strikes.last_failure = now
            if strikes.penalty_s:
                strikes.penalty_s = min(strikes.penalty_s * 2, PASSWORD_PENALTY_MAX_S)
            else:
                strikes.recent.append(now)
                while strikes.recent[0] < now - PASSWORD_FAILURE_WINDOW_S:
                    strikes.recent.popleft()
                if len(strikes.recent) < self.failures:
                    return
                strikes.recent.clear()
                strikes.penalty_s = PASSWORD_PENALTY_S
            strikes.blocked_until = now + strikes.penalty_s
            penalty_s = strikes.penalty_s
        log.warning("too many wrong room passwords from %s: its password checks are refused "
                    "for %g s", address, penalty_s)

    def succeeded(self, address):
        """A right password: ``address`` starts afresh."""
        with self._lock:
            self._strikes.pop(address, None)


def secret_matches(offered, expected):
    """Compare secrets as UTF-8 bytes in constant time (None never matches)."""
    if offered is None:
        return False
    return hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))


class Room:
    """A room: its identity (kept in the state file) and its participants."""

    __slots__ = ("id", "code", "name", "host_id", "created_at_ms", "password_hash",
                 "empty_since_ms", "participants", "checked_passwords", "waiting",
                 "decoy_secret")

    def __init__(self, code, name, password_hash=None):
        self.id = secrets.token_urlsafe(15)
        self.code = code
        self.name = name
        self.host_id = secrets.token_hex(16)
        self.created_at_ms = self.empty_since_ms = now_ms()
        self.password_hash = password_hash
        self.participants = {}
        self.checked_passwords = {}  # keyed digest of a password -> it matched
        self.waiting = collections.deque()  # Waiters for a free slot, oldest first
        self.decoy_secret = secrets.token_urlsafe(24)  # compared when an id is unknown

    def to_json(self):
        return {"id": self.id, "code": self.code, "name": self.name,
                "hostId": self.host_id, "createdAt": self.created_at_ms}

    def to_state(self):
        """What the state file keeps: identity and password hash, no participants."""
        return dict(self.to_json(), passwordHash=self.password_hash,
                    emptySince=self.empty_since_ms)

    @classmethod
    def from_state(cls, data):
        """The room to_state() wrote, or ValueError naming what is wrong: a
        hand-edited file must stop the hub at start, not make every sweep fail.
        A lower-case code is the same room (codes are case-insensitive)."""
        if not isinstance(data, dict):
            raise ValueError("%s, not an object" % JSON_TYPE_NAMES[type(data)])
        code = saved_field(data, "code", str).upper()
        if len(code) != ROOM_CODE_LENGTH or not set(code) <= set(ROOM_CODE_ALPHABET):
            raise ValueError("the code %r is not %d characters of %s" % (
                code, ROOM_CODE_LENGTH, ROOM_CODE_ALPHABET))
        room = cls(code, saved_field(data, "name", str),
                   saved_field(data, "passwordHash", str, optional=True))
        room.id = saved_field(data, "id", str)
        room.host_id = saved_field(data, "hostId", str)
        room.created_at_ms = saved_field(data, "createdAt", int)
        empty_since = saved_field(data, "emptySince", int, optional=True)
        room.empty_since_ms = now_ms() if empty_since is None else empty_since
        return room


#: What json.load gives, named as a file's author knows it.
JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer",
                   float: "a number with a fraction or exponent", bool: "a boolean",
                   type(None): "null"}


def saved_field(data, field, kind, optional=False):
    """``data[field]`` if it is exactly a ``kind`` (or null, when optional).

    Exactly: true is not an integer here, and neither is any float (json
    reads 1e400 as infinity, which no millisecond count can be)."""
    value = data.get(field)
    if value is None and optional:
        return None
    if field not in data:
        raise ValueError("%s is missing" % field)
    if type(value) is not kind:
        raise ValueError("%s is %s, not %s" % (field, JSON_TYPE_NAMES[type(value)],
                                               JSON_TYPE_NAMES[kind]))
    return value


class Target:
    """What the relay needs of a participant, copied out of the registry."""

    __slots__ = ("id", "model", "endpoint", "tunnel_key", "by_id", "guarded")

    def __init__(self, participant, by_id):
        self.id = participant.id
        self.model = participant.model
        self.endpoint = participant.endpoint
        self.tunnel_key = participant.tunnel_key() if participant.transport == "tunnel" else None
        self.by_id = by_id
        self.guarded = not participant.from_hub_machine


class Waiter:
    """A request queued until a participant that can serve it has a free slot."""

    __slots__ = ("requested", "exclude", "ready", "target", "error")

    def __init__(self, requested, exclude):
        self.requested = requested
        self.exclude = exclude
        self.ready = threading.Event()
        self.target = None  # set, under the registry lock, with the slot it got
        self.error = None  # or the ApiError it gets when nobody can serve it any more


def model_matches(requested, served):
    """True when a request for ``requested`` may go to a server of ``served``.

    Exact names match; a name without a tag also matches its ":latest"
    (Ollama lists "llama3:latest" for "llama3").
    """
    if requested == served:
        return True
    return ":" not in requested and served == requested + ":latest"


def names_one_model(first, second):
    """True when a request for either name could reach a server of the other."""
    return model_matches(first, second) or model_matches(second, first)


def check_participant_id(participant_id):
    """400 for an id that routing reads as something else: "*" and "any" ask
    for any participant, "model:NAME" for a model."""
    if participant_id in WILDCARD_MODELS or participant_id.startswith(MODEL_PREFIX):
        raise ApiError(400, "Field 'id' may not be '*' or 'any' or start with 'model:': a "
                            "request's model uses those to ask for any participant or for a "
                            "model. Choose another id", "invalid_field")


class Registry:
    """Every room and participant of the hub.

    One lock, ``_lock``, guards all rooms, participants and their counters,
    and the codes of new rooms not kept yet. Methods copy out what callers
    need and return, so no I/O ever happens while it is held; events are
    returned to the caller to publish.

    ``keep_new_room(room)`` makes a new room last, then admits it (hands it to
    admit_rooms); it raises an ApiError when it cannot. Without a state file
    it admits at once; Hub.start() puts StateFile.keep there.
    """

    def __init__(self, participant_timeout_s, forget_after_s, room_ttl_s=DEFAULT_ROOM_TTL_S,
                 clock=time.monotonic, on_rooms_changed=None, passwords=None,
                 max_rooms=DEFAULT_MAX_ROOMS, max_participants=DEFAULT_MAX_PARTICIPANTS):
        self.participant_timeout_s = participant_timeout_s
        self.forget_after_s = forget_after_s
        self.room_ttl_s = room_ttl_s
        self.max_rooms = max_rooms
        self.max_participants = max_participants
        self.clock = clock
        self.on_rooms_changed = on_rooms_changed or (lambda: None)
        self.keep_new_room = lambda room: self.admit_rooms([room])
        self._cache_key = os.urandom(32)  # keys the digests of checked passwords
        self.passwords = passwords or PasswordGuard(clock=clock)
        self._lock = threading.Lock()
        self._rooms = {}  # code -> Room
        self._reserved = set()  # codes of new rooms being kept, not listed yet

    # -- rooms --

    def create_room(self, name, password_hash=None):
        """A new room's JSON, returned once keep_new_room() has kept and admitted it.

        Until then its code is reserved but the room is not listed, so a room
        whose save failed never existed for anyone."""
        with self._lock:
            if len(self._rooms) + len(self._reserved) >= self.max_rooms:
                raise ApiError(503, "This hub holds its maximum of %d rooms; the organiser can "
                                    "raise it with 'serve --max-rooms'" % self.max_rooms,
                               "too_many_rooms")
            code = self._unused_code()
            self._reserved.add(code)
        room = Room(code, name, password_hash)
        try:
            self.keep_new_room(room)
        finally:
            with self._lock:
                self._reserved.discard(code)
        return room.to_json()

    def admit_rooms(self, rooms):
        """List new rooms (kept on disk, when there is a state file)."""
        with self._lock:
            for room in rooms:
                self._rooms[room.code] = room

    def restore_rooms(self, saved):
        """Rooms from the state file; ValueError naming the room (by its
        place in the file) if one is malformed or has the code of another."""
        rooms, places = {}, {}
        for place, data in enumerate(saved, 1):
            try:
                room = Room.from_state(data)
            except ValueError as exc:
                raise ValueError("room %d: %s" % (place, exc))
            if room.code in rooms:
                raise ValueError("room %d has the code of room %d, %s" % (
                    place, places[room.code], room.code))
            rooms[room.code], places[room.code] = room, place
        with self._lock:
            self._rooms.update(rooms)

    def rooms_state(self):
        with self._lock:
            return [room.to_state() for room in self._rooms.values()]

    def authorize(self, code, *password_forms, address=None):
        """Raise 401 unless the room is open or one of ``password_forms`` is its
        password: the UTF-8 bytes of the password offered, read in each way the
        client may have encoded it (see bearer_password_forms). No form at all
        means no password was sent. ``address`` is the client's, for the
        slow-down of guessers (429, 503: see PasswordGuard).

        The slow hash runs outside the lock, one of a few at once, and each
        form checked is remembered as a keyed digest so the next request with
        it costs a HMAC. Only wrong passwords that were hashed count against
        an address: a known wrong one teaches a guesser nothing."""
        with self._lock:
            room = self._room(code)
            stored = room.password_hash
            if stored is None:
                return
            verdicts = [(form, room.checked_passwords.get(self._digest(form)))
                        for form in password_forms]
        if not password_forms:
            raise ApiError(401, "This room needs its password: send it as 'Authorization: "
                                "Bearer PASSWORD' (the API key of OpenAI clients)",
                           "missing_password", headers=[("WWW-Authenticate", "Bearer")])
        self.passwords.refuse_if_penalised(address)
        if any(known for _, known in verdicts) or self._check_new_forms(room, stored, [
                form for form, known in verdicts if known is None], address):
            self.passwords.succeeded(address)
            return
        raise ApiError(401, "Invalid password", "invalid_password",
                       headers=[("WWW-Authenticate", "Bearer")])

    def _check_new_forms(self, room, stored, forms, address):
        """Whether one of ``forms`` (none checked before) is the password."""
        if not forms:
            return False
        with self.passwords.checking(address):
            if any(self._check_password(room, stored, form) for form in forms):
                return True
        self.passwords.failed(address)
        return False

    def _digest(self, password_bytes):
        """The key of a checked password in a room's cache (never the password)."""
        return hmac.new(self._cache_key, password_bytes, hashlib.sha256).digest()

    def _check_password(self, room, stored, password_bytes):
        """The slow hash, called without the lock; its verdict is remembered."""
        matches = password_matches(password_bytes, stored)
        with self._lock:
            if len(room.checked_passwords) >= PASSWORD_CACHE_ENTRIES:
                room.checked_passwords.clear()
            room.checked_passwords[self._digest(password_bytes)] = matches
        return matches

    def _unused_code(self):
        while True:
            code = "".join(secrets.choice(ROOM_CODE_ALPHABET) for _ in range(ROOM_CODE_LENGTH))
            if code not in self._rooms and code not in self._reserved:
                return code

    def list_rooms(self):
        with self._lock:
            return [dict(room.to_json(), participantCount=len(room.participants),
                         protected=room.password_hash is not None)
                    for room in self._rooms.values()]

    def _room(self, code):
        room = self._rooms.get(code.upper())
        if room is None:
            raise ApiError(404, "Room not found", "room_not_found")
        return room

    def room_json(self, code):
        with self._lock:
            return self._room(code).to_json()

    # -- participants --

    def join(self, code, fields, offered_secret=None):
        """Add a participant, or replace one that proves it is the same with
        its current secret; return (participant JSON, room id, secret, the
        replaced participant's tunnel key or None).

        Ids and served models stay apart (409 otherwise), checked under the
        lock with the insert, so two joins racing cannot both pass."""
        check_participant_id(fields["id"])
        with self._lock:
            room = self._room(code)
            participant = Participant(fields, self.clock)
            old = room.participants.get(participant.id)
            replaced = None
            if old is not None:
                if not secret_matches(offered_secret, old.secret):
                    raise ApiError(401, "Participant id '%s' is taken in this room; re-joining "
                                        "with it needs its secret" % participant.id,
                                   "invalid_secret")
            elif len(room.participants) >= self.max_participants:
                raise ApiError(503, "Room %s holds its maximum of %d participants; the "
                                    "organiser can raise it with 'serve --max-participants'"
                               % (room.code, self.max_participants), "too_many_participants")
            self._keep_names_apart(room, participant)
            if old is not None:
                participant.metrics = old.metrics  # a re-join keeps its history
                participant.in_flight = old.in_flight
                replaced = old.tunnel_key() if old.transport == "tunnel" else None
            room.participants[participant.id] = participant
            self._serve_waiters(room)
            was_empty, room.empty_since_ms = room.empty_since_ms is not None, None
            joined = participant.to_json(), room.id, participant.secret, replaced
        if was_empty:
            self.on_rooms_changed()
        return joined

    @staticmethod
    def _keep_names_apart(room, newcomer):
        """409 unless the newcomer's id names no model served in the room (its
        own included) and its model is no other participant's id (under the
        lock). Otherwise a participant could take the name of someone else's
        model as its id and receive the requests meant for that model; and an
        id equal to its own model would turn away whoever serves it next."""
        if names_one_model(newcomer.id, newcomer.model):
            raise ApiError(409, "Participant id '%s' names the model it serves ('%s'): ids and "
                                "model names must differ. Choose another id"
                           % (newcomer.id, newcomer.model), "id_conflict")
        for other in room.participants.values():
            if other.id == newcomer.id:
                continue  # the participant it replaces
            if names_one_model(newcomer.id, other.model):
                raise ApiError(409, "Participant id '%s' names a model served in this room "
                                    "('%s'): requests for that model must reach its servers. "
                                    "Choose another id" % (newcomer.id, other.model),
                               "id_conflict")
            if names_one_model(newcomer.model, other.id):
                raise ApiError(409, "Model '%s' has the name of participant '%s' in this room, "
                                    "so requests for it would be ambiguous; serve it under "
                                    "another name (or ask that participant to re-join with "
                                    "another id)" % (newcomer.model, other.id), "id_conflict")

    def _own_participant(self, code, participant_id, offered_secret):
        """The participant, if ``offered_secret`` is its secret (404/401 otherwise).

        A protected room answers an unknown id and a wrong secret alike (404,
        after a comparison of the same cost), so nobody learns which ids are
        there; an agent takes 404 as "forgotten" and joins again."""
        room = self._room(code)
        participant = room.participants.get(participant_id)
        if room.password_hash is not None:
            expected = participant.secret if participant is not None else room.decoy_secret
            if participant is None or not secret_matches(offered_secret, expected):
                raise ApiError(404, "Participant not found, or not yours: send the secret that "
                                    "join answered as X-Gambiarra-Secret", "participant_not_found")
            return participant
        if participant is None:
            raise ApiError(404, "Participant not found", "participant_not_found")
        if not secret_matches(offered_secret, participant.secret):
            raise ApiError(401, "Missing or wrong participant secret (send the secret that "
                                "join answered as X-Gambiarra-Secret)", "invalid_secret")
        return participant

    def check_secret(self, code, participant_id, offered_secret):
        with self._lock:
            self._own_participant(code, participant_id, offered_secret)

    def leave(self, code, participant_id, offered_secret):
        """Remove a participant; return its tunnel key (None if direct)."""
        with self._lock:
            participant = self._own_participant(code, participant_id, offered_secret)
            room = self._room(code)
            del room.participants[participant_id]
            emptied = not room.participants
            if emptied:
                room.empty_since_ms = now_ms()
        if emptied:
            self.on_rooms_changed()
        return participant.tunnel_key() if participant.transport == "tunnel" else None

    def heartbeat(self, code, participant_id, offered_secret):
        """Record a ping; return True when it brought the participant back online."""
        with self._lock:
            participant = self._own_participant(code, participant_id, offered_secret)
            return self._seen(code, participant)

    def _seen(self, code, participant):
        participant.last_seen = self.clock()
        participant.last_seen_ms = now_ms()
        came_back = not participant.online
        participant.offline_since = None
        if came_back:
            self._serve_waiters(self._room(code))
        return came_back

    # -- the agents of tunnelled participants --

    def poll_started(self, code, participant_id, offered_secret):
        """A tunnelled participant's agent polls: a heartbeat, and proof that
        it listens until the poll ends. Returns (came back online, tunnel key);
        poll_ended() must follow."""
        with self._lock:
            participant = self._own_participant(code, participant_id, offered_secret)
            came_back = self._seen(code, participant)
            if participant.transport != "tunnel":
                raise ApiError(409, "Participant joined with transport 'direct': the hub calls "
                                    "its endpoint itself", "not_tunnelled")
            participant.polls += 1  # reachable while a poll is open (however long)
            if participant.polls == 1:
                self._serve_waiters(self._room(code))
            return came_back, participant.tunnel_key()

    def poll_ended(self, code, participant_id, tunnel_key, hung_up):
        """A poll ended. The agent polls again at once, so it stays reachable
        for a margin; unless it hung up its last poll (killed, or stopping)."""
        with self._lock:
            participant = self._present(code, participant_id)
            if participant is None or participant.tunnel_key() != tunnel_key:
                return  # it left, or re-joined: that poll counts no more
            participant.polls -= 1
            now = self.clock()
            if hung_up and not participant.polls:
                participant.listening_until = now
            else:
                participant.listening_until = max(participant.listening_until,
                                                  now + TUNNEL_LISTEN_MARGIN_S)

    def agent_gone(self, code, participant_id):
        """The agent closed the connection of a job it had confirmed: it was
        killed. Unless it has a poll open, it is not routed to any more."""
        with self._lock:
            participant = self._present(code, participant_id)
            if participant is not None and not participant.polls:
                participant.listening_until = self.clock()

    def saw_agent(self, code, participant_id):
        """The agent confirmed or answered a request: it is there."""
        with self._lock:
            participant = self._present(code, participant_id)
            if participant is not None:
                participant.listening_until = max(participant.listening_until,
                                                  self.clock() + TUNNEL_LISTEN_MARGIN_S)

    def participants_json(self, code):
        with self._lock:
            return [p.to_json() for p in self._room(code).participants.values()]

    def online_participants_json(self, code):
        with self._lock:
            return [p.to_json() for p in self._room(code).participants.values() if p.online]

    def sweep(self):
        """Mark silent participants offline and forget long-gone ones.

        Returns (events, lost): the events to publish as (room code, event,
        data) triples, and (room code, tunnel key, forgotten) of each
        tunnelled participant that went offline or was forgotten, whose
        requests must end now. A participant goes offline once per silence,
        so one event per transition. Requests queued for a participant that
        nobody can replace any more are answered at once.
        """
        now = self.clock()
        events, lost = [], []
        with self._lock:
            for room in list(self._rooms.values()):
                changes = self._sweep_participants(room, now, lost)
                if changes:
                    self._strand_waiters(room)
                events.extend(changes)
                if not room.participants and room.empty_since_ms is None:
                    room.empty_since_ms = now_ms()
                elif (room.empty_since_ms is not None
                        and now_ms() - room.empty_since_ms > self.room_ttl_s * 1000):
                    del self._rooms[room.code]
                    events.append((room.code, "room:removed", {"roomId": room.id,
                                                               "code": room.code}))
        if any(event in ("room:removed", "participant:left") for _, event, _ in events):
            self.on_rooms_changed()
        return events, lost

    def _sweep_participants(self, room, now, lost):
        events = []
        for participant in list(room.participants.values()):
            if participant.online:
                if now - participant.last_seen > self.participant_timeout_s:
                    participant.offline_since = now
                    events.append((room.code, "participant:offline",
                                   {"participantId": participant.id}))
                    if participant.transport == "tunnel":
                        lost.append((room.code, participant.tunnel_key(), False))
            elif now - participant.offline_since > self.forget_after_s:
                del room.participants[participant.id]
                events.append((room.code, "participant:left",
                               {"participantId": participant.id, "reason": "timeout"}))
                if participant.transport == "tunnel":
                    lost.append((room.code, participant.tunnel_key(), True))
        return events

    def _strand_waiters(self, room):
        """Answer at once the queued requests that no participant can serve any
        more (under the lock): waiting for their timeout would help nobody."""
        for waiter in list(room.waiting):
            try:
                self._candidates(room, waiter.requested, waiter.exclude)
            except ApiError as exc:
                waiter.error = exc
                room.waiting.remove(waiter)
                waiter.ready.set()

    # -- routing --

    def acquire(self, code, requested, exclude=(), wait_s=0.0):
        """Pick the participant for a request's ``model`` and count it in flight.

        ``requested`` is a participant id, "model:NAME", a bare model name, or
        "*"/"any". Among the matches with a free slot (fewer requests in
        flight than their maxConcurrent) the least busy wins, ties at random;
        participants whose backend recently refused a connection go last.
        When every match is full the request queues, first come first
        served, for up to ``wait_s`` seconds: then 503 with Retry-After.
        """
        with self._lock:
            room = self._room(code)
            self._candidates(room, requested, exclude)  # 404 or 503 now, not after a wait
            if not room.waiting:  # nobody is ahead in the queue
                target = self._assign(room, requested, exclude)
                if target is not None:
                    return target
            waiter = Waiter(requested, exclude)
            room.waiting.append(waiter)
            self._serve_waiters(room)
        if waiter.ready.wait(wait_s):
            if waiter.error is not None:
                raise waiter.error
            return waiter.target
        with self._lock:
            if waiter.target is not None:  # a slot came just as the wait ended
                return waiter.target
            if waiter.error is not None:
                raise waiter.error
            room.waiting.remove(waiter)
        raise ApiError(503, "Every participant that serves '%s' is busy (waited %g s); try "
                            "again shortly" % (requested, wait_s), "participants_busy",
                       headers=[("Retry-After", str(RETRY_AFTER_S))])

    def _serve_waiters(self, room):
        """Give free slots to queued requests, in arrival order (under the lock)."""
        for waiter in list(room.waiting):
            try:
                waiter.target = self._assign(room, waiter.requested, waiter.exclude)
            except ApiError:
                continue  # nobody serves it right now; it waits for its timeout
            if waiter.target is not None:
                room.waiting.remove(waiter)
                waiter.ready.set()

    def _assign(self, room, requested, exclude):
        """A slot on the least busy matching participant with one free, or None."""
        free = [p for p in self._candidates(room, requested, exclude)
                if p.in_flight < p.max_concurrent]
        if not free:
            return None
        now = self.clock()
        chosen = min(free, key=lambda p: (p.penalized_until > now, p.in_flight,
                                          random.random()))
        chosen.in_flight += 1
        chosen.metrics.requests += 1
        return Target(chosen, chosen is self._named(room, requested))

    @staticmethod
    def _named(room, requested):
        """The participant a request's model names by its id, or None. Never
        for "*", "any" or "model:NAME"; and a name that some participant
        serves as a model is the model's, even if it is an id too (joins keep
        ids and models apart, but routing does not rely on it)."""
        if requested in WILDCARD_MODELS or requested.startswith(MODEL_PREFIX):
            return None
        participant = room.participants.get(requested)
        if participant is None or any(model_matches(requested, p.model)
                                      for p in room.participants.values()):
            return None
        return participant

    def _candidates(self, room, requested, exclude):
        """The online participants a request may go to; 404/503 when none."""
        now = self.clock()
        by_id = self._named(room, requested)
        if by_id is not None:
            if not by_id.online:
                raise ApiError(503, "Participant '%s' is offline" % requested,
                               "participant_offline")
            if not by_id.reachable(now):
                raise ApiError(503, "Participant '%s' is unreachable: its agent stopped polling "
                                    "the hub" % requested, "participant_offline")
            return [by_id]
        name = requested[len(MODEL_PREFIX):] if requested.startswith(MODEL_PREFIX) else requested
        wildcard = requested in WILDCARD_MODELS
        candidates = [p for p in room.participants.values()
                      if p.online and p.reachable(now) and p.id not in exclude
                      and (wildcard or model_matches(name, p.model))]
        if not candidates:
            online = sorted({p.model for p in room.participants.values() if p.online})
            if online:
                message = "No online participant serves model '%s'. Online models: %s" % (
                    requested, ", ".join(online))
            else:
                message = "No participant is online in this room"
            raise ApiError(404, message, "model_not_found")
        return candidates

    def _present(self, code, participant_id):
        room = self._rooms.get(code.upper())
        return room.participants.get(participant_id) if room else None

    def release(self, code, participant_id):
        """The participant's server is done with one request (if still present):
        its slot goes to the first queued request that can use it."""
        with self._lock:
            participant = self._present(code, participant_id)
            if participant:
                participant.in_flight = max(0, participant.in_flight - 1)
                self._serve_waiters(self._rooms[code.upper()])

    def record(self, code, participant_id, ttft_ms=None, tokens_per_second=None,
               failed=False, refused=False):
        """Count a finished request in the participant's metrics (if still present)."""
        with self._lock:
            participant = self._present(code, participant_id)
            if not participant:
                return
            metrics = participant.metrics
            if failed:
                metrics.errors += 1
            if refused:
                participant.penalized_until = self.clock() + BACKEND_PENALTY_S
            if ttft_ms is not None:
                metrics.ttft_ms = ttft_ms
                metrics.ttft_samples.append(ttft_ms)
            if tokens_per_second is not None:
                metrics.tokens_per_second = tokens_per_second


def default_state_path(port):
    """$XDG_STATE_HOME/gambiarra/hub-PORT.json (XDG_STATE_HOME: ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return os.path.join(base, "gambiarra", "hub-%d.json" % port)


#: The temporary files of hubs before they were named after their state file.
LEGACY_TEMPORARY = re.compile(r"\.hub-[a-z0-9_]{8}\.tmp\Z")


class SaveTicket:
    """A new room waiting for the save that puts it on disk."""

    __slots__ = ("room", "done", "error")

    def __init__(self, room):
        self.room = room
        self.done = threading.Event()
        self.error = None  # the ApiError for its creator when that save failed

    def settle(self, error):
        self.error = error
        self.done.set()


class StateFile:
    """The rooms of a hub on disk, so a restart keeps their codes and passwords.

    One thread saves. Changes to existing rooms (expiry, emptiness) only ask
    for a save and never wait on the disk. A new room waits in keep() until a
    save that includes it is on disk, so a 201 is never lost to a crash; new
    rooms that come while a save runs go together into the next one, so a
    burst of creations costs a few writes, not one each. Each save writes a
    temporary file named after the state file in its folder (mode 0600),
    fsyncs it and renames it over the old one, so a crash leaves either the
    old file or the new one, never half of one.

    ``_lock`` guards ``_queued``, ``_dirty`` and ``_stopped``. ``_failing``
    belongs to the saver thread.
    """

    VERSION = 1

    def __init__(self, path, snapshot, admit):
        self.path = os.path.abspath(path)
        self.snapshot = snapshot  # callable returning the rooms to keep
        self.admit = admit  # callable given new rooms once they are on disk
        self._wake = threading.Event()
        self._closing = False
        self._thread = None
        self._lock = threading.Lock()
        self._queued = []  # SaveTickets for the next save
        self._dirty = False  # existing rooms changed since the last save
        self._stopped = False  # the saver is gone: new rooms are refused
        self._failing = None  # the kind of failure last logged at ERROR

    def load(self):
        """The saved rooms ([] when there is no file yet); GambiarraError if the
        file cannot be used, because overwriting it would lose rooms."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("rooms"), list):
                raise ValueError("no list of rooms")
            return data["rooms"]
        except FileNotFoundError:
            return []
        except RecursionError:
            raise self.unusable("its JSON is nested too deeply")
        except (OSError, ValueError, OverflowError) as exc:
            raise self.unusable(exc)

    def unusable(self, exc):
        return GambiarraError(
            "cannot use the state file %s (%s). Move it away to start with no rooms, or run "
            "with --state '' to keep no state" % (self.path, getattr(exc, "strerror", None)
                                                  or exc))

    def start(self):
        """Remove what a crash left, then save on every change from now on."""
        self._remove_leftovers()
        self._thread = threading.Thread(target=self._run, name="state-file", daemon=True)
        self._thread.start()

    def _remove_leftovers(self):
        """Remove the temporary files of saves a crash interrupted: ours, named
        after our state file, always; old-style ones, which could be another
        hub's in the same folder, only once they are too old to be in use."""
        folder, name = os.path.split(self.path)
        ours = re.compile(re.escape("." + name + ".") + r"[a-z0-9_]+\.tmp\Z")
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for leftover in names:
            path = os.path.join(folder, leftover)
            try:
                if ours.match(leftover) or (
                        LEGACY_TEMPORARY.match(leftover)
                        and time.time() - os.stat(path).st_mtime > LEGACY_TEMPORARY_AGE_S):
                    os.unlink(path)
                    log.info("removed %s, left by an interrupted save", path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc.strerror or exc)

    def changed(self):
        """Save soon; the caller does not wait."""
        with self._lock:
            self._dirty = True
        self._wake.set()

    def keep(self, room):
        """Return once ``room`` is on disk with the others and admitted.

        Raises ApiError 507 with the cause when the save fails (503 when the
        hub is stopping), and the room is then never admitted nor saved.
        No timeout: after one, a refusal could no longer promise that."""
        ticket = SaveTicket(room)
        with self._lock:
            if self._stopped:
                raise ApiError(503, "the hub is shutting down", "shutting_down")
            self._queued.append(ticket)
        self._wake.set()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    def _run(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            self._save_queued()
            if self._closing and self._stop_when_idle():
                return

    def _save_queued(self):
        """One save with every new room queued so far; then admit them, before
        the next snapshot (which must list them), or refuse them all."""
        with self._lock:
            batch, self._queued = self._queued, []
            dirty, self._dirty = self._dirty, False
        if not (batch or dirty):
            return  # woken for new rooms that the previous save took along
        new_rooms = [ticket.room for ticket in batch]
        try:
            error = self.save(new_rooms)
        except Exception:  # a bug: the creators waiting must still get an answer
            log.exception("unexpected error saving the rooms to %s", self.path)
            error = ApiError(500, "Internal error in the hub (see its log)", "internal_error")
        if error is None and new_rooms:
            self.admit(new_rooms)
        for ticket in batch:
            ticket.settle(error)

    def _stop_when_idle(self):
        """Stop unless something came in meanwhile; later new rooms get a 503."""
        with self._lock:
            self._stopped = not (self._queued or self._dirty)
            return self._stopped

    def save(self, new_rooms=()):
        """Write the rooms and ``new_rooms`` to disk. Returns None, or the
        ApiError that tells their creators why they could not be saved."""
        rooms = self.snapshot() + [room.to_state() for room in new_rooms]
        try:
            self._write(self.encode(rooms))
        except OSError as exc:
            return self._failed(exc)
        if self._failing is not None:
            self._failing = None
            log.info("the rooms are saved to %s again", self.path)
        log.debug("saved %d room(s) to %s, %d new", len(rooms), self.path, len(new_rooms))
        return None

    def encode(self, rooms):
        """The file's bytes: one room per line, still easy to read and edit,
        and encoded by json's C encoder (indent would use the slow Python
        one: 6 ms instead of 2.5 for 1,000 rooms)."""
        encode = json.JSONEncoder().encode
        lines = ",\n".join(map(encode, rooms))
        return ('{"version": %d, "rooms": [\n%s\n]}\n' % (self.VERSION, lines)).encode("ascii")

    def _write(self, data):
        """Write ``data`` to a temporary file, fsync it, rename it over the
        state file, then fsync the folder so the rename survives a power cut."""
        folder, name = os.path.split(self.path)
        fd, temporary = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        sync_folder(folder)

    def _failed(self, exc):
        """Log a failed save at ERROR once per kind (a full disk refuses every
        new room; one line says it), and return the answer for the new rooms."""
        cause = exc.strerror or str(exc)
        kind = exc.errno if exc.errno is not None else cause
        if kind != self._failing:
            self._failing = kind
            log.error("cannot save the rooms to %s: %s. New rooms are refused (507) until a "
                      "save works again", self.path, cause)
        else:
            log.debug("cannot save the rooms to %s: %s", self.path, cause)
        # The cause, not the path: a client has no business knowing the
        # organiser's home folder; the log line above names it.
        return ApiError(507, "The hub cannot save the room to its state file (%s), so the "
                             "room was not created" % cause, "state_not_saved")

    def close(self):
        """Write the last change, then stop."""
        if self._thread is None:
            return
        self._closing = True
        self.changed()
        self._thread.join(10)


def sync_folder(folder):
    """fsync a folder, so that a file just renamed in it stays renamed after a
    power cut. Where a folder cannot be opened (Windows) or synced (EINVAL on
    some file systems), the rename is as durable as the system makes it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


# === Event bus ===

class Subscriber:
    """One open ``/events`` stream: a bounded queue drained by its own thread."""

    def __init__(self, code, sock, address=None):
        self.code = code
        self.sock = sock
        self.address = address  # the client's, counted against its cap
        self.queue = queue.Queue(SUBSCRIBER_QUEUE_EVENTS)

    def disconnect(self):
        """Unblock the subscriber's thread, even mid-write to a stalled client."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def sse_frame(event, data):
    return b"event: %s\ndata: %s\n\n" % (event.encode("ascii"), json_bytes(data))


class EventBus:
    """Per-room fan-out of events to SSE subscribers.

    Publishing never blocks: a subscriber whose queue is full has stopped
    reading and is dropped. Each stream holds a thread and a connection, so
    a room and a client address get at most ``max_per_room`` and
    ``max_per_address`` of them. ``_lock`` guards the subscriber sets and
    the counts per address only.
    """

    CLOSED = None  # sentinel put in a queue to end its stream

    def __init__(self, max_per_room=DEFAULT_MAX_SUBSCRIBERS,
                 max_per_address=DEFAULT_MAX_SUBSCRIBERS_PER_ADDRESS):
        self.max_per_room = max_per_room
        self.max_per_address = max_per_address
        self._lock = threading.Lock()
        self._rooms = collections.defaultdict(set)
        self._per_address = collections.Counter()

    def subscribe(self, code, sock, address=None):
        """A new subscriber of room ``code``; 503 when the room has its
        maximum of streams, 429 when the client's address has."""
        subscriber = Subscriber(code, sock, address)
        with self._lock:
            if len(self._rooms.get(code, ())) >= self.max_per_room:
                raise ApiError(503, "Room %s has its maximum of %d event streams open; the "
                                    "organiser can raise it with 'serve --max-subscribers'"
                               % (code, self.max_per_room), "too_many_subscribers")
            if address is not None and self._per_address[address] >= self.max_per_address:
                raise ApiError(429, "This address has its maximum of %d event streams open "
                                    "on the hub; close one, or the organiser can raise it "
                                    "with 'serve --max-subscribers-per-address'"
                               % self.max_per_address, "too_many_subscribers")
            self._rooms[code].add(subscriber)
            if address is not None:
                self._per_address[address] += 1
        return subscriber

    def unsubscribe(self, subscriber):
        """Forget a subscriber (again is harmless: a stalled one is dropped
        by publish() and then by its own thread)."""
        with self._lock:
            subscribers = self._rooms.get(subscriber.code)
            if subscribers is None or subscriber not in subscribers:
                return
            subscribers.discard(subscriber)
            if not subscribers:
                del self._rooms[subscriber.code]
            if subscriber.address is not None:
                self._per_address[subscriber.address] -= 1
                if not self._per_address[subscriber.address]:
                    del self._per_address[subscriber.address]

    def publish(self, code, event, data):
        with self._lock:
            subscribers = list(self._rooms.get(code, ()))
        if not subscribers:
            return
        frame = sse_frame(event, data)
        for subscriber in subscribers:
            try:
                subscriber.queue.put_nowait(frame)
            except queue.Full:
                log.info("dropping a stalled event subscriber of room %s", code)
                self.unsubscribe(subscriber)
                subscriber.disconnect()

    def end(self, subscriber):
        """End one subscriber's stream (its client left, or the hub closes);
        its thread unsubscribes once the stream is closed."""
        try:
            subscriber.queue.put_nowait(self.CLOSED)
        except queue.Full:
            subscriber.disconnect()

    def end_room(self, code):
        with self._lock:
            subscribers = list(self._rooms.get(code, ()))
        for subscriber in subscribers:
            self.end(subscriber)

    def close(self, timeout=1.0):
        """End every stream and give their threads ``timeout`` to finish them."""
        with self._lock:
            subscribers = [s for group in self._rooms.values() for s in group]
        for subscriber in subscribers:
            self.end(subscriber)
        deadline = time.monotonic() + timeout
        while self._rooms and time.monotonic() < deadline:
            time.sleep(0.005)


# === Relay ===

def enable_keepalive(sock):
    """Have the kernel probe a connection that goes quiet, so a peer that
    vanished without closing it (a laptop's lid shut, its Wi-Fi gone) is
    noticed in about IDLE + INTERVAL x PROBES seconds instead of at a timeout
    of minutes. A live peer's kernel answers the probes even while its model
    thinks, so slow answers are never cut."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        option = getattr(socket, name, None)  # absent on some systems: their defaults then
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


#: 0.0.0.0/8 means "this host" to Linux and BSD (RFC 1122 section 3.2.1.3).
THIS_HOST_NETWORK = ipaddress.ip_network("0.0.0.0/8")
#: Documentation addresses (RFC 5737, RFC 3849) that no machine has: where a
#: socket binds to one, the system binds to any address (Linux's
#: ip_nonlocal_bind), and binding tells nothing about what is ours.
UNASSIGNED_ADDRESSES = {socket.AF_INET: "203.0.113.254", socket.AF_INET6: "2001:db8::fffe"}


def plain_address(text):
    """``text`` as an ipaddress object, an IPv4-mapped IPv6 address
    (::ffff:127.0.0.1) as the IPv4 address it carries and a zone ("%eth0")
    dropped; None when it is no address."""
    try:
        address = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _binds(family, address):
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def is_own_address(address):
    """True when ``address`` (an ipaddress object) is one of this machine's.
    A socket binds only to an address its machine has, on any interface and
    in either family (VPNs and IPv6 too, which network_links() leaves out);
    where the system binds to anything, the interface list decides."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    if not _binds(family, UNASSIGNED_ADDRESSES[family]):
        return _binds(family, str(address))
    return str(address) in {link.address for link in network_links()}


def hub_machine_reason(text):
    """Why the address ``text`` leads into the hub's own machine (a loopback,
    link-local or unspecified address, or one of its own), or None."""
    address = plain_address(text)
    if address is None:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address in THIS_HOST_NETWORK:
        return "an unspecified address"
    if is_own_address(address):
        return "an address of the hub's own machine"
    return None


def same_machine(client, arrived_on):
    """True when a connection from ``client`` that reached this machine's
    address ``arrived_on`` comes from this machine itself: a loopback
    address, the address it reached, or another address of this machine."""
    address = plain_address(client)
    if address is None:
        return False
    return (address.is_loopback or address == plain_address(arrived_on)
            or is_own_address(address))


def resolve_host(host, timeout_s):
    """The addresses of ``host``: an address literal at once (in any form
    the system reads, "127.1" and "2130706433" included), a name within
    ``timeout_s`` (getaddrinfo has no timeout of its own, so it runs in a
    thread). OSError when it does not resolve in time."""
    try:
        found = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        found = _resolve_name(host, timeout_s)
    addresses = []
    for _, _, _, _, sockaddr in found:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def _resolve_name(host, timeout_s):
    outcome = []

    def resolve():
        try:
            outcome.append(socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA refuses
            outcome.append(OSError(errno.EINVAL, "cannot resolve %s (%s)" % (host, exc)))

    thread = threading.Thread(target=resolve, name="resolve", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise socket.timeout("%s did not resolve within %g s" % (host, timeout_s))
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]


def endpoint_trouble(url, timeout_s=ENDPOINT_RESOLVE_S):
    """Why the hub must not call ``url`` for someone on another machine (its
    host is, or resolves to, an address of the hub's own machine), or None.
    A name that does not resolve (in time) passes, as it always has: the
    relay checks the addresses of every connection it opens for such a
    participant anyway (connect_outside_hub)."""
    host = urllib.parse.urlsplit(url).hostname
    try:
        addresses = resolve_host(host, timeout_s)
    except OSError:
        return None
    for address in addresses:
        reason = hub_machine_reason(address)
        if reason is not None:
            named = host if plain_address(host) is None else None
            return "%s is %s" % ("%s resolves to %s, which" % (named, address) if named
                                 else address, reason)
    return None


class HubMachineAddress(ConnectionError):
    """A connection for a participant on another machine would lead into the
    hub's own machine: refused before any packet is sent."""


def connect_outside_hub(address, timeout=None, source_address=None):
    """socket.create_connection for a direct participant that joined from
    another machine. Its name is resolved here and every address checked,
    then the connection goes to a checked address: a name that resolved
    elsewhere at join and leads to the hub's machine now (DNS rebinding)
    reaches nothing, and no timing tells which of the hub's ports are open."""
    host, port = address[:2]
    addresses = resolve_host(host, ENDPOINT_RESOLVE_S if timeout is None else timeout)
    for resolved in addresses:
        reason = hub_machine_reason(resolved)
        if reason is not None:
            raise HubMachineAddress(errno.ECONNREFUSED, "refused by the hub: %s is %s" % (
                resolved, reason))
    failure = OSError(errno.EHOSTUNREACH, "no address for %s" % host)
    for resolved in addresses:
        try:
            return socket.create_connection((resolved, port), timeout, source_address)
        except OSError as exc:
            failure = exc
    raise failure


def has_pending_input(sock):
    """True when an idle kept-alive connection has something to read: the
    server closed it, or sent bytes nobody asked for. Either way it must not
    carry the next request, whose answer those bytes would be taken for.
    (poll(), not select(): a busy hub has descriptors above FD_SETSIZE.)"""
    if not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class InvalidAnswer(http.client.BadStatusLine):
    """A backend's answer head that must not be relayed; the message is ours,
    never the backend's bytes (they could be the end of someone else's answer)."""


class BackendResponse(http.client.HTTPResponse):
    """http.client's response, reading past interim (1xx) answers.

    http.client skips "100 Continue" only: a "103 Early Hints" would be taken
    for the answer, and the real one left on the kept-alive connection for
    the next user to receive. Every 1xx but 101 is read and dropped here (RFC
    9110 section 15.2); a 101 to a POST, or endless interim answers, are a
    broken backend. (_read_status is http.client's own step, the same in
    CPython 3.8 to 3.13.)"""

    def _read_status(self):
        for _ in range(MAX_INTERIM_ANSWERS):
            version, status, reason = super()._read_status()
            if status == 101:
                raise InvalidAnswer("101 Switching Protocols to a POST")
            if status >= 200:
                return version, status, reason
            try:
                read_headers(self.fp)  # the interim answer's headers: dropped
            except ValueError:
                raise InvalidAnswer("malformed headers in an interim answer")
        raise InvalidAnswer("more than %d interim answers" % MAX_INTERIM_ANSWERS)


class _BackendMixin:
    """What the hub needs of a connection to a participant's server.

    Nagle is disabled: with it, delayed ACKs add ~40 ms to every small
    request on a kept-alive connection. post() sends the request head and
    body in one write, where http.client would make two system calls.
    """

    _corked = None
    response_class = BackendResponse

    def __init__(self, host, port, connect_timeout, read_timeout, guarded=False):
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout
        if guarded:  # for a participant that joined from another machine
            self._create_connection = connect_outside_hub

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        enable_keepalive(self.sock)
        self.sock.settimeout(self.read_timeout)

    def post(self, path, body, headers):
        if self.sock is None:
            self.connect()
        self._corked = []
        try:
            self.request("POST", path, body=body, headers=headers)
        finally:
            data, self._corked = b"".join(self._corked), None
        self.sock.sendall(data)

    def send(self, data):
        if self._corked is not None:
            self._corked.append(data)
        else:
            super().send(data)


class BackendConnection(_BackendMixin, http.client.HTTPConnection):
    """A plain-HTTP connection to a participant's server."""


class BackendHTTPSConnection(_BackendMixin, http.client.HTTPSConnection):
    """A TLS connection to a participant's server (an https:// endpoint)."""


#: Where a backend connection goes. ``guarded`` ones are opened for a
#: participant that joined from another machine: never into the hub's own.
BackendKey = collections.namedtuple("BackendKey", "scheme host port guarded",
                                    defaults=(False,))


class ConnectionPool:
    """Idle keep-alive connections to backends, most recently used last.

    Connections idle longer than ``idle_s`` are closed (by get() and by the
    hub's periodic prune()) before the backend closes them itself and leaves
    them half-closed; one with anything to read is never handed out.
    ``_lock`` guards the idle lists only; connecting and closing happen
    outside it.
    """

    def __init__(self, connect_timeout, read_timeout, idle_s=POOL_IDLE_S, clock=time.monotonic):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_s = idle_s
        self.clock = clock
        self._lock = threading.Lock()
        self._idle = collections.defaultdict(list)  # BackendKey -> [(since, conn)]
        self._closed = False

    def get(self, key, fresh=False):
        """Return (connection, reused): an idle one if any (unless ``fresh``),
        else a new one."""
        conn, expired = None, []
        with self._lock:
            idle = self._idle.get(key)
            if idle and not fresh:
                since, conn = idle.pop()
                if self.clock() - since > self.idle_s:  # and so are all older ones
                    expired = [conn] + [c for _, c in idle]
                    idle.clear()
                    conn = None
        if conn is not None and conn.sock is not None and has_pending_input(conn.sock):
            expired.append(conn)  # closed by the server, or unsolicited bytes
            conn = None
        for old in expired:
            old.close()
        if conn is not None:
            return conn, True
        scheme, host, port, guarded = BackendKey(*key)
        cls = BackendHTTPSConnection if scheme == "https" else BackendConnection
        return cls(host, port, self.connect_timeout, self.read_timeout, guarded), False

    def put(self, key, conn):
        with self._lock:
            idle = self._idle[key]
            if not self._closed and len(idle) < POOL_IDLE_PER_BACKEND:
                idle.append((self.clock(), conn))
                return
        conn.close()

    def prune(self):
        """Close connections idle for longer than ``idle_s``."""
        limit = self.clock() - self.idle_s
        expired = []
        with self._lock:
            for idle in self._idle.values():
                while idle and idle[0][0] < limit:
                    expired.append(idle.pop(0)[1])
        for conn in expired:
            conn.close()

    def close(self):
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for _, c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class Watch:
    """One relay's wish to hear of its client hanging up."""

    __slots__ = ("sock", "on_gone", "due", "settled")

    def __init__(self, sock, on_gone, due):
        self.sock = sock
        self.on_gone = on_gone
        self.due = due  # watched from then on: most answers are over sooner
        self.settled = False  # the client sent more data: it is not leaving


class ClientWatcher:
    """Notices clients that hang up while the hub waits on their backend.

    A relay thread blocked reading a slow backend cannot see its client
    leave. This one thread selects on the client sockets of the relays that
    have lasted longer than ``grace_s``; on EOF it calls the relay's
    ``on_gone`` so the backend connection is closed and the GPU stops
    working for nobody. Relays only add and discard Watch objects in
    ``_wanted`` (single set operations, atomic under the GIL); the selector
    belongs to the watcher thread alone, so short requests cost no system
    call at all.
    """

    def __init__(self, grace_s=WATCH_GRACE_S):
        self.grace_s = grace_s
        self._wanted = set()
        self._registered = set()
        self._selector = selectors.DefaultSelector()
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # ends select() at close()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="client-watcher", daemon=True)
        self._thread.start()

    def watch(self, sock, on_gone):
        watch = Watch(sock, on_gone, time.monotonic() + self.grace_s)
        self._wanted.add(watch)
        return watch

    def unwatch(self, watch):
        self._wanted.discard(watch)

    def _run(self):
        while not self._closed.is_set():
            self._sync()
            for key, _ in self._selector.select(self.grace_s):
                if key.data is not None:
                    self._check(key.data)

    def _sync(self):
        """Drop registrations of finished relays, then add relays now due."""
        wanted = self._wanted.copy()
        for watch in self._registered - wanted:
            self._forget(watch)
        now = time.monotonic()
        for watch in wanted - self._registered:
            if watch.due <= now and not watch.settled:
                try:
                    self._selector.register(watch.sock, selectors.EVENT_READ, watch)
                    self._registered.add(watch)
                except (ValueError, KeyError, OSError):
                    watch.settled = True  # closed already: its relay is ending

    def _forget(self, watch):
        self._registered.discard(watch)
        try:
            self._selector.unregister(watch.sock)
        except (ValueError, KeyError, OSError):
            pass

    def _check(self, watch):
        """EOF or error: the client is gone. Data: a pipelined request; stop watching.

        The peek goes through a non-blocking duplicate: the handler's socket
        has a timeout, and Python would wait up to it if no data were there."""
        self._forget(watch)
        if watch not in self._wanted:
            return
        try:
            with watch.sock.dup() as peek:
                peek.setblocking(False)
                gone = peek.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return  # spurious wake-up; registered again on the next sync
        except OSError:
            gone = True
        watch.settled = True
        if gone:
            watch.on_gone()

    def close(self):
        self._closed.set()
        self._wake_w.send(b"\0")
        self._thread.join(5)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class Exchange:
    """One attempt to get an answer from one backend for one client request.

    ``abort()`` may come from the client watcher or from Hub.close(); it shuts
    the backend socket down so a relay thread blocked on it wakes at once.
    ``_lock`` orders abort() against finish_backend(): once the backend's
    answer is all read, the connection may go back to the pool and an abort
    must not touch it.
    """

    def __init__(self, code, participant_id):
        self._lock = threading.Lock()
        self.code = code
        self.participant_id = participant_id
        self.key = None
        self.conn = None
        self.call = None  # the TunnelCall, for a tunnelled participant
        self.released = False
        self.backend_done = False
        self.client_gone = False
        self.aborted = False

    def abort(self, client_gone=True):
        with self._lock:
            if self.backend_done:
                return
            self.aborted = True
            self.client_gone = self.client_gone or client_gone
            sock = self.conn.sock if self.conn is not None else None
            call = self.call
        if call is not None:
            call.end(("cancelled",))
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def attach(self, call):
        """Follow a TunnelCall: an abort, even one that came first, cancels it."""
        with self._lock:
            self.call = call
            aborted = self.aborted
        if aborted:
            call.end(("cancelled",))

    def finish_backend(self):
        """Mark the backend's answer as fully read, unless aborted first."""
        with self._lock:
            self.backend_done = not self.aborted


class BackendFailure(Exception):
    """A backend could not give an answer. ``before_answer`` allows failover."""

    def __init__(self, status, message, code, before_answer=False, refused=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.before_answer = before_answer
        self.refused = refused


BACKEND_HEADERS = {"Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream"}
_USAGE_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
#: Header text from a backend or an agent (a Content-Type, a Via) that may go
#: into a header line as it is: printable ASCII, nothing that could end the
#: line or start another.
_HEADER_TEXT = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,%d}\Z" % (MAX_VIA_BYTES - 1))


def invalid_answer(message):
    """A backend (or agent) whose answer's head cannot be passed on: nothing
    reached the client yet, so another participant may be tried."""
    return BackendFailure(502, "Participant's server sent an invalid answer (%s)" % message,
                          "backend_invalid_answer", before_answer=True)


def checked_answer_head(status, content_type):
    """The Content-Type to relay with a final status, or BackendFailure."""
    if not 200 <= status <= 599:
        raise invalid_answer("status %d" % status)
    if content_type is None:
        return "application/json"
    if not _HEADER_TEXT.match(content_type):
        raise invalid_answer("a Content-Type with control characters")
    return content_type


class StreamStats:
    """What the relay learns on the side for metrics; never alters the bytes."""

    __slots__ = ("first_byte_at", "events", "tail", "done")

    def __init__(self):
        self.first_byte_at = None
        self.events = 0
        self.tail = b""
        self.done = False  # the client was sent "data: [DONE]": the answer is whole

    def saw(self, data, streaming):
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if len(data) >= USAGE_TAIL_BYTES:  # the common case of big pieces: no copy
            self.tail = data[-USAGE_TAIL_BYTES:]
        else:
            self.tail = (self.tail + data)[-USAGE_TAIL_BYTES:]
        if streaming:
            self.events += data.count(b"data:") - data.count(b"data: [DONE]")
            self.done = self.done or b"data: [DONE]" in self.tail  # even if split across reads

    def tokens(self):
        """Completion tokens from the backend's usage, else the count of events."""
        found = _USAGE_TOKENS.findall(self.tail)
        if found:
            return int(found[-1])
        return self.events or None


class Channel:
    """A bounded hand-over of pieces from one thread to another.

    put() waits while the channel is full, so a slow reader slows the writer
    down instead of filling the hub's memory; get() waits while it is empty.
    Either side may end it with a reason: put() then refuses (False), and
    get() returns the reason once the pieces kept are read. ``_ready``
    guards the pieces.
    """

    def __init__(self, capacity):
        self._ready = threading.Condition(threading.Lock())
        self._pieces = collections.deque()
        self._capacity = capacity
        self.ended = None  # the reason, once ended

    def put(self, piece):
        with self._ready:
            while len(self._pieces) >= self._capacity and self.ended is None:
                self._ready.wait()
            if self.ended is not None:
                return False
            self._pieces.append(piece)
            self._ready.notify_all()
            return True

    def get(self, timeout):
        """The next piece, or the reason the channel ended; socket.timeout
        when nothing comes for ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._pieces or self.ended is not None,
                                        timeout):
                raise socket.timeout("nothing came for %g s" % timeout)
            if not self._pieces:
                return self.ended
            piece = self._pieces.popleft()
            self._ready.notify_all()
            return piece

    def end(self, reason, keep=False):
        """End the channel (the first reason stays); drop what it holds unless
        ``keep``, so the reader gets that first."""
        with self._ready:
            if self.ended is None:
                self.ended = reason
            if not keep:
                self._pieces.clear()
            self._ready.notify_all()


class TunnelCall:
    """One request handed to a tunnelled participant's agent, and its answer
    coming back through ``answer``.

    Its life: queued, taken by one of the agent's polls, accepted (the agent
    confirmed it got the job, or it does not confirm), uploading; or ended at
    any point (withdrawn, cancelled, abandoned). ``_lock`` guards ``state``;
    whoever loses a race for a transition does nothing.
    """

    def __init__(self, code, tunnel_key, path, body, via):
        self.id = secrets.token_hex(16)
        self.code = code
        self.tunnel_key = tunnel_key
        self.participant_id = tunnel_key[0]
        self.path = path
        self.body = body  # the JSON body to forward, as bytes
        self.via = via
        self.state = "queued"
        self.answer = Channel(TUNNEL_PIECES)
        self.settled = threading.Event()  # accepted, or ended
        self._lock = threading.Lock()

    def job(self, confirm):
        """The poll's answer: the request, its body spliced in as it came."""
        head = json_bytes({"requestId": self.id, "path": self.path, "via": self.via,
                           "accept": confirm})
        return head[:-1] + b',"body":' + self.body + b"}"

    def _move(self, allowed, state):
        with self._lock:
            if self.state not in allowed:
                return False
            self.state = state
        return True

    def take(self, confirm):
        """A poll takes the call (False if it is no longer queued)."""
        taken = self._move(("queued",), "taken" if confirm else "accepted")
        if taken and not confirm:
            self.settled.set()
        return taken

    def accept(self):
        """The agent confirms it has the job and starts on it."""
        accepted = self._move(("taken", "accepted"), "accepted")
        if accepted:
            self.settled.set()
        return accepted

    def begin_upload(self):
        """The agent's answer arrives: proof enough that it took the call."""
        started = self._move(("taken", "accepted"), "uploading")
        if started:
            self.settled.set()
        return started

    def lose(self, reason):
        """The agent that took the call is gone before its answer started;
        False if the answer had started (or the call was over)."""
        if not self._move(("taken", "accepted"), "ended"):
            return False
        self.answer.end(("gone", reason))
        self.settled.set()
        return True

    def withdraw(self):
        """Give up on a call that no agent accepted in time (False if one just did)."""
        withdrawn = self._move(("queued", "taken"), "ended")
        if withdrawn:
            self.answer.end(("unreachable", None))
            self.settled.set()
        return withdrawn

    def end(self, reason, unless_taken=False, keep=False):
        """End the call whatever its state (or only while queued); ``keep``
        delivers the pieces already uploaded before the reason."""
        if not self._move(("queued",) if unless_taken else
                          ("queued", "taken", "accepted", "uploading"), "ended"):
            return False
        self.answer.end(reason, keep)
        self.settled.set()
        return True


class TunnelPoll:
    """One long poll of an agent, which its client hanging up can end early."""

    __slots__ = ("line", "gone")

    def __init__(self, line):
        self.line = line  # (room code, tunnel key)
        self.gone = False


class TunnelLine:
    """The calls waiting for one tunnelled participant's polls."""

    __slots__ = ("calls", "wakeup", "polls")

    def __init__(self, lock):
        self.calls = collections.deque()
        self.wakeup = threading.Condition(lock)
        self.polls = 0


class TunnelBroker:
    """Work queues of tunnelled participants: a participant's agent long-polls
    for calls and uploads each answer on a connection of its own, so its LLM
    server never has to be reachable from the hub.

    ``_lock`` guards the lines, the calls and the retired keys; each line's
    condition shares it, so a new call wakes one poll of its participant
    only. Lock order: broker, then a call's own lock.
    """

    RETIRED = "retired"  # what a poll of a participant that re-joined or left gets

    def __init__(self):
        self._lock = threading.Lock()
        self._lines = {}  # (room code, tunnel key) -> TunnelLine
        self._calls = {}  # call id -> TunnelCall not yet finished
        self._retired = {}  # (room code, tunnel key) -> when; its polls end at once
        self._closed = False

    def _line(self, line_key):
        line = self._lines.get(line_key)
        if line is None:
            line = self._lines[line_key] = TunnelLine(self._lock)
        return line

    def _drop_line_if_idle(self, line_key):
        line = self._lines.get(line_key)
        if line is not None and not line.polls and not line.calls:
            del self._lines[line_key]

    def submit(self, code, tunnel_key, path, body, via):
        """Queue a call for the participant's next poll (only for RELAYED_PATHS:
        an agent refuses any other)."""
        if path not in RELAYED_PATHS:
            raise ValueError("the tunnel carries only %s, not %r" % (RELAYED_PATHS, path))
        call = TunnelCall(code, tunnel_key, path, body, via)
        line_key = (code, tunnel_key)
        with self._lock:
            if self._closed or line_key in self._retired:
                call.withdraw()
                return call
            self._calls[call.id] = call
            line = self._line(line_key)
            line.calls.append(call)
            line.wakeup.notify()
        return call

    def next_call(self, poll, wait_s, confirm):
        """The next call for the poll's participant; None after ``wait_s``
        (or when the poll's client hangs up or the hub closes); RETIRED once
        the participant re-joined or left."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            line = self._line(poll.line)
            line.polls += 1
            try:
                while True:
                    if poll.line in self._retired:
                        return self.RETIRED
                    if self._closed or poll.gone:
                        return None
                    while line.calls:
                        call = line.calls.popleft()
                        if call.take(confirm):
                            return call
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    line.wakeup.wait(remaining)
            finally:
                line.polls -= 1
                if line.calls:
                    line.wakeup.notify()  # a call came as this poll left: wake another
                self._drop_line_if_idle(poll.line)

    def hang_up(self, poll):
        """The poll's client closed its connection: end that poll now."""
        with self._lock:
            poll.gone = True
            line = self._lines.get(poll.line)
            if line is not None:
                line.wakeup.notify_all()

    def withdraw(self, call):
        """Take back a call that no agent accepted in time; False if one just did."""
        with self._lock:
            if not call.withdraw():
                return False
            line_key = (call.code, call.tunnel_key)
            line = self._lines.get(line_key)
            if line is not None and call in line.calls:
                line.calls.remove(call)
                self._drop_line_if_idle(line_key)
            self._calls.pop(call.id, None)
        return True

    def call(self, call_id):
        with self._lock:
            return self._calls.get(call_id)

    def finish(self, call):
        with self._lock:
            self._calls.pop(call.id, None)

    def abandon(self, code, tunnel_key, reason, queued_only=False):
        """End the participant's calls: those still queued as unreachable (the
        relay fails over), the others with ``reason`` unless ``queued_only``."""
        with self._lock:
            calls = [c for c in self._calls.values()
                     if c.code == code and c.tunnel_key == tunnel_key]
            line = self._lines.get((code, tunnel_key))
            if line is not None:
                line.calls.clear()
                self._drop_line_if_idle((code, tunnel_key))
        for call in calls:
            if not call.end(("unreachable", None), unless_taken=True) and not queued_only:
                call.end(reason)

    def retire(self, code, tunnel_key):
        """The participant re-joined (new secret) or left: its queued calls
        move on, and its polls end at once (their agent re-joins or stops)."""
        now = time.monotonic()
        with self._lock:
            for key, since in list(self._retired.items()):
                if now - since > TUNNEL_POLL_MAX_S + TUNNEL_LISTEN_MARGIN_S:
                    del self._retired[key]  # no poll with that key can still be open
            self._retired[(code, tunnel_key)] = now
            line = self._lines.get((code, tunnel_key))
            if line is not None:
                line.wakeup.notify_all()
        self.abandon(code, tunnel_key, None, queued_only=True)

    def close(self):
        with self._lock:
            self._closed = True
            calls = list(self._calls.values())
            for line in self._lines.values():
                line.wakeup.notify_all()
        for call in calls:
            call.end(("closing",))


class TunnelResponse:
    """The answer of a tunnelled participant, read like an http.client
    response, so the relay streams it exactly as a direct one."""

    chunked = True
    length = None
    will_close = False

    def __init__(self, call, timeout):
        self.call = call
        self.timeout = timeout
        piece = self._next()
        if piece[0] != "head":
            raise self._failure(piece, before_answer=True)
        _, self.status, self._type = piece

    def _next(self):
        return self.call.answer.get(self.timeout)

    def getheader(self, name, default=None):
        return self._type or default if name.lower() == "content-type" else default

    def read1(self, n=-1):
        piece = self._next()
        if piece[0] == "data":
            return piece[1]
        if piece[0] == "end":
            return b""
        raise self._failure(piece, before_answer=False)

    def read(self):
        parts = []
        while True:
            data = self.read1()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def close(self):
        pass

    @staticmethod
    def _failure(piece, before_answer):
        """The BackendFailure for a piece that ends the answer early."""
        kind, detail = piece[0], (piece[1:] or (None,))[0]
        if kind == "unreachable":
            return BackendFailure(502, "Participant's server is unreachable (%s)" % (
                detail or "its agent did not take the request"), "backend_unreachable",
                before_answer=before_answer, refused=True)
        if kind == "gone":
            return BackendFailure(502, "Participant's agent is gone (%s)" % detail,
                                  "participant_gone", before_answer=before_answer)
        if kind == "invalid":
            return invalid_answer(detail)
        if kind == "cancelled":
            return BackendFailure(503, "The request was cancelled", "cancelled")
        if kind == "closing":
            return BackendFailure(503, "The hub is shutting down", "hub_closing")
        return BackendFailure(502, "Participant's server broke off the answer (%s)" % detail,
                              "backend_disconnected")


class Relay:
    """Forwards OpenAI requests to participants and their answers back.

    Answers are relayed piece by piece as they arrive, never buffered whole;
    errors that happen after a streamed answer started end the client's
    stream with an OpenAI-style error event so SDKs raise instead of
    returning half an answer.
    """

    def __init__(self, registry, bus, watcher, tunnels, connect_timeout, backend_timeout,
                 queue_timeout=DEFAULT_QUEUE_TIMEOUT_S):
        self.registry = registry
        self.bus = bus
        self.watcher = watcher
        self.tunnels = tunnels
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.queue_timeout = queue_timeout
        self.pool = ConnectionPool(connect_timeout, backend_timeout)
        self._warned = {}  # (participant id, error code) -> last warning time
        self._lock = threading.Lock()  # guards _active and _warned
        self._active = set()
        self._boot = int(time.time()) & 0xFFFFFF  # request ids differ across restarts
        self._request_numbers = itertools.count(1)  # next() is atomic under the GIL

    def close(self, timeout=2.0):
        """Abort every relay, give them ``timeout`` to tell their clients
        (an error event ends each stream), then close pooled connections."""
        with self._lock:
            active = list(self._active)
        for exchange in active:
            exchange.abort(client_gone=False)
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pool.close()

    def forward(self, handler, code, api_path, body, via):
        """Answer ``handler``'s request from the best participant, failing over.

        ``body`` is the request's JsonBody; ``via`` the Via header to send on.
        A failure before the backend answered (refused, reset, a tunnel no
        agent took) moves on to the next matching participant, unless the
        client named one by id.
        """
        requested = require_string(body.fields, "model", MAX_NAME_CHARS)
        tried = set()
        failure = None
        while True:
            try:
                target = self.registry.acquire(code, requested, exclude=tried,
                                               wait_s=self.queue_timeout)
            except ApiError:
                if failure is None:
                    raise
                raise ApiError(failure.status, failure.message, failure.code)
            tried.add(target.id)
            failure = self._attempt(handler, code, target, api_path, body, via)
            if failure is None or not failure.before_answer or target.by_id:
                if failure is not None:
                    raise ApiError(failure.status, failure.message, failure.code)
                return

    def _attempt(self, handler, code, target, api_path, body, via):
        """One try against one participant; returns a BackendFailure or None."""
        request_id = "%x-%x" % (self._boot, next(self._request_numbers))
        started = time.monotonic()
        model = body.fields["model"]
        self.bus.publish(code, "llm:request", {"participantId": target.id,
                                               "model": model, "requestId": request_id})
        forwarded = body.with_value("model", target.model)
        stats = StreamStats()
        exchange = Exchange(code, target.id)
        with self._lock:
            self._active.add(exchange)
        watch = self.watcher.watch(handler.connection, exchange.abort)
        status = None
        try:
            status = self._exchange(handler, exchange, target, api_path, forwarded, via, stats)
            failure = None
        except BackendFailure as exc:
            failure = exc
        finally:
            self.watcher.unwatch(watch)
            with self._lock:
                self._active.discard(exchange)
            self._done_with_backend(exchange)
        self._report(code, target, request_id, model, started, stats, status,
                     failure, exchange.client_gone)
        if exchange.client_gone:
            handler.close_connection = True
            return None  # nobody is left to answer
        return failure

    def _report(self, code, target, request_id, model, started, stats, status, failure,
                client_gone):
        """Publish llm:complete, llm:cancelled or llm:error, and update the
        participant's metrics. A client that hangs up is its own doing: not
        the participant's error."""
        ttft_ms = None
        if stats.first_byte_at is not None:
            ttft_ms = round((stats.first_byte_at - started) * 1000, 1)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if client_gone and not stats.done:
            self.registry.record(code, target.id, ttft_ms=ttft_ms)
            self.bus.publish(code, "llm:cancelled", {
                "participantId": target.id, "requestId": request_id, "model": model,
                "reason": "the client went away before the answer finished",
                "ttftMs": ttft_ms, "durationMs": duration_ms})
            return
        if failure is not None:
            if failure.code != "hub_closing":  # the hub stopping is nobody's fault
                self.registry.record(code, target.id, failed=True, refused=failure.refused)
                self._warn(target.id, failure)
            self.bus.publish(code, "llm:error", {"participantId": target.id,
                                                 "requestId": request_id, "model": model,
                                                 "error": failure.message})
            return
        tokens = stats.tokens()
        tokens_per_second = None
        if tokens and stats.first_byte_at is not None:
            generating_s = time.monotonic() - stats.first_byte_at
            if generating_s > 0.001 and stats.events > 1:
                tokens_per_second = round(tokens / generating_s, 1)
        self.registry.record(code, target.id, ttft_ms=ttft_ms,
                              tokens_per_second=tokens_per_second,
                              failed=status is not None and status >= 500)
        self.bus.publish(code, "llm:complete", {
            "participantId": target.id, "requestId": request_id, "model": model,
            "status": status, "ttftMs": ttft_ms, "durationMs": duration_ms,
            "tokens": tokens, "tokensPerSecond": tokens_per_second})

    def _warn(self, participant_id, failure):
        """Log a backend failure, once a minute per participant and kind, so a
        dead server polled all day does not fill a Pi's SD card."""
        key = (participant_id, failure.code)
        now = time.monotonic()
        with self._lock:
            if now - self._warned.get(key, -WARN_EVERY_S) < WARN_EVERY_S:
                return
            self._warned[key] = now
        log.warning("participant %s: %s", printable(participant_id), printable(failure.message))

    def _done_with_backend(self, exchange):
        """Pool the exchange's connection (or close it) and free the
        participant's slot, once.

        Called as soon as the backend's answer is all read, before the last
        bytes go to the client, so the client's next request finds both the
        connection pooled and the participant no longer busy. A connection
        goes back to the pool only when its answer was read to its very end.
        """
        if exchange.released:
            return
        exchange.released = True
        if exchange.call is not None:
            self.tunnels.finish(exchange.call)
            if not exchange.backend_done:  # the client left mid-answer: 410 the upload
                exchange.call.end(("cancelled",))
        conn, exchange.conn = exchange.conn, None
        if conn is not None and exchange.backend_done and conn.sock is not None:
            self.pool.put(exchange.key, conn)  # (sock is None if the backend said close)
        elif conn is not None:
            conn.close()
        self.registry.release(exchange.code, exchange.participant_id)

    def _exchange(self, handler, exchange, target, api_path, forwarded, via, stats):
        if target.tunnel_key is not None:
            response = self._call_tunnel(exchange, target, api_path, forwarded, via)
        else:
            parts = urllib.parse.urlsplit(target.endpoint)
            exchange.key = BackendKey(parts.scheme, parts.hostname,
                                      parts.port or (443 if parts.scheme == "https" else 80),
                                      target.guarded)
            response = self._send(exchange.key, parts.path + api_path, forwarded, via, exchange)
        self._relay_response(handler, exchange, response, stats)
        return response.status

    def _call_tunnel(self, exchange, target, api_path, forwarded, via):
        """Hand the request to a tunnelled participant; wait for its answer's head.

        No poll of its agent taking (and accepting) the call within the
        connect timeout is "unreachable", like a refused connection: the
        relay fails over. Then the agent's server has the backend timeout
        to start answering, as a direct one has."""
        call = self.tunnels.submit(exchange.code, target.tunnel_key, api_path, forwarded, via)
        exchange.attach(call)
        if not call.settled.wait(self.connect_timeout) and self.tunnels.withdraw(call):
            raise BackendFailure(502, "Participant's agent did not take the request within %g s "
                                 "(is its 'join' still running?)" % self.connect_timeout,
                                 "backend_unreachable", before_answer=True, refused=True)
        try:
            return TunnelResponse(call, self.backend_timeout)
        except socket.timeout as exc:
            raise BackendFailure(504, "Participant's server sent nothing for %g s"
                                 % self.backend_timeout, "backend_timeout") from exc
        except BackendFailure as exc:
            if exchange.aborted:
                raise BackendFailure(503, *self._read_failure(exchange, exc)) from exc
            raise

    def _send(self, key, path, payload, via, exchange):
        """Send the request and read the answer's head, retrying a stale pooled
        connection once. Failures here happen before any answer: failover-safe."""
        headers = dict(BACKEND_HEADERS, Via=via)
        for attempt in (1, 2):
            conn, reused = self.pool.get(key, fresh=attempt > 1)
            exchange.conn = conn
            try:
                conn.post(path, payload, headers)
                if exchange.aborted:
                    raise ConnectionAbortedError("aborted")
                return conn.getresponse()
            except socket.timeout as exc:
                connected = conn.sock is not None
                conn.close()
                if not connected:  # the TCP connect itself timed out
                    raise BackendFailure(502, "Participant's server at %s:%s is unreachable "
                                         "(no connection within %g s)" % (
                                             key[1], key[2], self.connect_timeout),
                                         "backend_unreachable", before_answer=True,
                                         refused=True) from exc
                raise BackendFailure(504, "Participant's server at %s:%s did not answer "
                                     "within %g s" % (key[1], key[2], self.backend_timeout),
                                     "backend_timeout") from exc
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                if exchange.aborted:
                    raise BackendFailure(503, *self._read_failure(exchange, exc))
                if isinstance(exc, InvalidAnswer):
                    raise invalid_answer(str(exc))
                if isinstance(exc, http.client.BadStatusLine) and not isinstance(
                        exc, http.client.RemoteDisconnected):
                    raise invalid_answer("a malformed status line")  # not echoed: see InvalidAnswer
                if reused and attempt == 1:
                    continue  # the backend closed an idle connection; try a fresh one
                raise BackendFailure(502, "Participant's server at %s:%s is unreachable (%s)" % (
                    key[1], key[2], _describe(exc)), "backend_unreachable",
                    before_answer=True, refused=isinstance(exc, OSError))
        raise AssertionError("unreachable")

    def _relay_response(self, handler, exchange, response, stats):
        """Pass the backend's answer through: small ones whole, in one write;
        others piece by piece as they come, whatever their framing."""
        content_type = checked_answer_head(response.status, response.getheader("Content-Type"))
        length = None if response.chunked else response.length
        if length is not None and length <= WHOLE_ANSWER_BYTES:
            return self._relay_whole(handler, exchange, response, content_type, stats)
        if length is None:
            handler.start_chunked(response.status, content_type, [("X-Accel-Buffering", "no")])
        else:
            handler.start_sized(response.status, content_type, length)
        failure = self._pipe(handler, exchange, response, stats, length)
        if exchange.client_gone:
            handler.close_connection = True
        elif failure is not None:
            if length is None:
                handler.end_chunked(b"data: " + json_bytes(openai_error(502, *failure))
                                    + b"\n\n")
            else:
                handler.close_connection = True  # a short body: the client sees it broke
            raise BackendFailure(502, failure[0], failure[1])
        elif length is None:
            handler.end_chunked()

    def _pipe(self, handler, exchange, response, stats, length):
        """Copy the answer's body to the client as it arrives, ``length``
        bytes or up to its end. Returns (message, code) if it broke off."""
        left = length
        while True:
            try:
                data = response.read1(RELAY_READ_BYTES)
            except (BackendFailure, http.client.HTTPException, OSError, ValueError) as exc:
                return self._read_failure(exchange, exc)
            if not data and (exchange.aborted or left):  # cut by close(), or short
                return self._read_failure(exchange, http.client.IncompleteRead(b""))
            if not data:
                response.close()  # read to its end: the connection may be reused
                exchange.finish_backend()
                self._done_with_backend(exchange)
                return None
            if left is not None:
                left -= len(data)
            stats.saw(data, length is None)
            try:
                handler.write_chunk(data)
            except ClientGone:
                exchange.client_gone = True
                return None

    def _read_failure(self, exchange, exc):
        """(message, code) for an answer that could not be read to its end."""
        if exchange.aborted and not exchange.client_gone:
            return "The hub is shutting down", "hub_closing"
        if isinstance(exc, BackendFailure):
            return exc.message, exc.code
        if isinstance(exc, socket.timeout):
            return ("Participant's server sent nothing for %g s" % self.backend_timeout,
                    "backend_timeout")
        return ("Participant's server broke off the answer (%s)" % _describe(exc),
                "backend_disconnected")

    def _relay_whole(self, handler, exchange, response, content_type, stats):
        """A small answer: read it (at most WHOLE_ANSWER_BYTES), send it in one write."""
        try:
            data = response.read()
        except (http.client.HTTPException, OSError) as exc:
            if exchange.client_gone:
                handler.close_connection = True
                return
            message, code = self._read_failure(exchange, exc)
            raise BackendFailure(504 if code == "backend_timeout" else 502, message, code)
        exchange.finish_backend()
        self._done_with_backend(exchange)
        stats.saw(data, False)
        handler.send_body(response.status, content_type, data)


def _describe(exc):
    """A short, path-free description of a network error for messages."""
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed mid-answer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return exc.__class__.__name__


# === HTTP handler and routes ===

#: Paths whose errors use the OpenAI shape, because OpenAI clients parse them.
OPENAI_PATH = re.compile(r"^/rooms/[^/]+/v1(/|$)")

#: Every route: (method, path pattern, handler method). HEAD is served by GET.
ROUTES = (
    ("GET", r"/health", "route_health"),
    ("GET", r"/rooms", "route_list_rooms"),
    ("POST", r"/rooms", "route_create_room"),
    ("POST", r"/rooms/(?P<code>[^/]+)/join", "route_join"),
    ("DELETE", r"/rooms/(?P<code>[^/]+)/leave/(?P<participant_id>[^/]+)", "route_leave"),
    ("POST", r"/rooms/(?P<code>[^/]+)/health", "route_heartbeat"),
    ("GET", r"/rooms/(?P<code>[^/]+)/participants", "route_participants"),
    ("GET", r"/rooms/(?P<code>[^/]+)/events", "route_events"),
    ("GET", r"/rooms/(?P<code>[^/]+)/tunnel/(?P<participant_id>[^/]+)", "route_tunnel_poll"),
    ("POST", r"/rooms/(?P<code>[^/]+)/tunnel/(?P<participant_id>[^/]+)/(?P<call_id>[^/]+)",
     "route_tunnel_answer"),
    ("POST", r"/rooms/(?P<code>[^/]+)/tunnel/(?P<participant_id>[^/]+)/(?P<call_id>[^/]+)"
             r"/accept", "route_tunnel_accept"),
    ("GET", r"/rooms/(?P<code>[^/]+)/v1/models", "route_models"),
    ("GET", r"/rooms/(?P<code>[^/]+)/v1/models/(?P<model_id>.+)", "route_model"),
    ("POST", r"/rooms/(?P<code>[^/]+)/v1/chat/completions", "route_chat_completions"),
    ("POST", r"/rooms/(?P<code>[^/]+)/v1/completions", "route_completions"),
    ("POST", r"/rooms/(?P<code>[^/]+)/v1/embeddings", "route_embeddings"),
)


class Router:
    """Matches (method, path) against ROUTES: 404 for unknown paths, 405 with
    ``Allow`` for a known path asked with the wrong method."""

    def __init__(self, routes):
        self.routes = [(method, re.compile("^%s$" % pattern), name)
                       for method, pattern, name in routes]

    def match(self, method, path):
        if method == "HEAD":
            method = "GET"
        allowed = []
        for route_method, pattern, name in self.routes:
            found = pattern.match(path)
            if found is None:
                continue
            if route_method == method:
                params = {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}
                return name, params
            allowed.append(route_method)
        if allowed:
            methods = set(allowed) | {"OPTIONS"}
            if "GET" in methods:
                methods.add("HEAD")
            allow = ", ".join(sorted(methods))
            raise ApiError(405, "Method %s is not allowed here; use %s" % (method, allow),
                           "method_not_allowed", headers=[("Allow", allow)])
        raise ApiError(404, "Not found: %s" % path, "not_found")


ROUTER = Router(ROUTES)

_date_cache = [0, ""]


def http_date():
    """The Date header, formatted once per second (formatdate is slow)."""
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache[:] = [second, email.utils.formatdate(second, usegmt=True)]
    return _date_cache[1]


_DECIMAL = re.compile(r"[0-9]{1,4000}\Z")
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}\Z")


def parse_decimal(text):
    """A Content-Length: ASCII digits only (int() would take "+1", "1_0", "١")."""
    if not _DECIMAL.match(text):
        raise ValueError(text)
    return int(text)


def parse_hex(data):
    """A chunk size: hex digits only (int(..., 16) would take "-1")."""
    if not _HEX.match(data):
        raise ValueError(data)
    return int(data, 16)


class Headers(dict):
    """Request headers by lower-case name; a repeated header's values are
    joined with ", " (RFC 9110 section 5.3)."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


_REQUEST_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")


class HeadTooLarge(ValueError):
    """A header block over one of its limits (431)."""


def read_headers(rfile, max_bytes=DEFAULT_MAX_HEADER_BYTES):
    """Read a header block up to its blank line, reading no more than
    ``max_bytes`` in all; ValueError if malformed, HeadTooLarge if too big."""
    headers = Headers()
    left = max_bytes
    for _ in range(MAX_HEADERS):
        line = rfile.readline(min(MAX_HEADER_LINE_BYTES, left) + 1)
        if len(line) > left:
            raise HeadTooLarge("Request headers are larger than the hub's limit of %d bytes"
                               % max_bytes)
        if len(line) > MAX_HEADER_LINE_BYTES:
            raise HeadTooLarge("Header line too long")
        left -= len(line)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, colon, value = line.decode("iso-8859-1").partition(":")
        if not colon or not name or name != name.strip():  # also refuses obs-fold
            raise ValueError("Malformed header line")
        name = name.lower()
        value = value.strip()
        headers[name] = headers[name] + ", " + value if name in headers else value
    raise HeadTooLarge("Too many headers")


def bearer_password_forms(token):
    """The UTF-8 bytes a Bearer password may stand for. Clients disagree on how
    to send a non-ASCII header: curl from a UTF-8 terminal sends UTF-8 bytes;
    http.client, requests and browsers' fetch send Latin-1, one byte per
    character. read_headers decoded the bytes as ISO-8859-1, so encoding back
    recovers the bytes sent (the UTF-8 reading), and encoding as UTF-8 gives
    the Latin-1 reading. Both are tried; for ASCII they are the same."""
    sent = token.encode("latin-1")
    as_latin1 = token.encode("utf-8")
    return (sent,) if as_latin1 == sent else (sent, as_latin1)


class ConnectionReader(io.RawIOBase):
    """The raw stream under a client connection's ``rfile``: ``recv`` with an
    optional deadline for everything read until it is lifted (a request
    head, a body at its minimum rate). A socket timeout bounds one ``recv``
    only, so a client sending a byte every few seconds never trips it.

    The deadline is kept with poll(), never by changing the socket's timeout
    (which writes use too): settimeout() releases the GIL for an ioctl, and
    three of them per request cost 15 % of a busy hub's throughput.
    Unlike socket.SocketIO it can be read again after a timeout, so an idle
    keep-alive connection can be checked on in slices.
    """

    def __init__(self, sock, timeout):
        super().__init__()
        self.sock = sock
        self.timeout = timeout  # the longest wait for one recv
        self.deadline = None    # time.monotonic() by which reading must be over
        self._poller = None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0 or not self._readable_within(min(left, self.timeout)):
                raise socket.timeout("timed out")
        return self.sock.recv_into(buffer)

    def _readable_within(self, seconds):
        """Whether the socket has bytes (or an end) to read within ``seconds``."""
        if not hasattr(select, "poll"):  # Windows
            return bool(select.select([self.sock], [], [], seconds)[0])
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        return bool(self._poller.poll(seconds * 1000))

    def lift_deadline(self):
        """Back to the plain per-recv timeout."""
        self.deadline = None

    def set_timeout(self, timeout):
        self.deadline = None
        self.timeout = timeout
        self.sock.settimeout(timeout)


class HubRequestHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: parses requests, dispatches through ROUTER,
    writes JSON, bodies and chunked streams.

    Responses are written with one ``sendall`` per head, body or chunk;
    HTTP/1.1 keep-alive is the default.
    """

    protocol_version = "HTTP/1.1"
    server_version = "gambiarra/" + __version__
    disable_nagle_algorithm = True

    # -- plumbing --

    def setup(self):
        self.hub = self.server.hub
        self.timeout = self.hub.client_timeout  # applied to the socket by setup()
        self._started = time.monotonic()
        super().setup()
        self.rfile.close()  # the stdlib's, for ours: a deadline can span many reads
        self._reader = ConnectionReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)
        self._fresh = True  # no request yet
        enable_keepalive(self.connection)
        self._linger = False
        self._lifeline = None  # the TunnelCall this connection accepted, until its upload
        self._head_sent = self._chunked = self._openai = False  # a 414 comes before
        self._body_read = True                                  # parse_request()
        self._pace = None  # (start of the body's grace, bytes read) while a body is paced
        self._held = 0  # bytes of the hub's body memory this request holds

    def finish(self):
        call = self._lifeline
        if call is not None and call.lose("its connection closed before the answer"):
            self.hub.registry.agent_gone(call.code, call.participant_id)  # killed
        if self._linger:
            self._lingering_close()
        super().finish()

    def _lingering_close(self):
        """Drain what the client still sends after we refused its body, so it
        reads our 413 instead of a connection reset."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline = time.monotonic() + LINGER_S
            drained = 0
            while drained < LINGER_BYTES and time.monotonic() < deadline:
                data = self.connection.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), printable(format % args))

    def handle_one_request(self):
        """The stdlib's, with deadlines it lacks: a fresh connection's first
        head must arrive within --header-timeout of its start, a later one
        within --header-timeout of its first byte; a kept-alive connection
        waits --client-timeout for its next request, less when the hub is
        crowded."""
        self.close_connection = True
        try:
            if not self._request_begins():
                return
            if not self._read_head():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, "Unsupported method %r" % printable(self.command[:20]))
                return
            method()
        except socket.timeout as exc:  # a read or a write timed out: drop the connection
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def _request_begins(self):
        """Wait for the next request's first byte; False if none comes in time."""
        if self._fresh:
            self._fresh = False
            self._reader.deadline = self._started + self.hub.header_timeout
            return bool(self.rfile.peek(1))
        if self._lifeline is not None:  # the upload comes when the model answers
            return bool(self.rfile.peek(1))
        return self._idle_until_request()

    def _idle_until_request(self):
        """A kept-alive connection waits for its next request in slices of
        BUSY_KEEPALIVE_S: closed after --client-timeout, or at the end of a
        slice while the hub is crowded (its slots go to new clients)."""
        end = time.monotonic() + self.hub.client_timeout
        while True:
            self._reader.deadline = min(end, time.monotonic() + BUSY_KEEPALIVE_S)
            try:
                return bool(self.rfile.peek(1))
            except socket.timeout:
                if time.monotonic() >= end or self.server.crowded():
                    return False
            finally:
                self._reader.deadline = None

    def _read_head(self):
        """Read and parse the request line and headers within --header-timeout
        of their first byte: False once answered (an error) or dropped."""
        self.command, self.request_version, self.requestline = None, "HTTP/0.9", ""
        if self._reader.deadline is None:
            self._reader.deadline = time.monotonic() + self.hub.header_timeout
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "Request line too long")
                return False
            return bool(self.raw_requestline) and self.parse_request()
        except socket.timeout:
            self._reader.lift_deadline()
            self.send_error(408, "The request head did not arrive within the hub's limit "
                                 "of %g s" % self.hub.header_timeout)
            return False
        finally:
            self._reader.lift_deadline()

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _dispatch(self):
        self._body_read = not (self.headers.get("Content-Length") not in (None, "0")
                               or self.headers.get("Transfer-Encoding"))
        path = self.path.split("?", 1)[0]
        self._openai = OPENAI_PATH.match(path) is not None
        try:
            if self.command == "OPTIONS":
                self._preflight()
                return
            name, params = ROUTER.match(self.command, path)
            self._refuse_cross_site_body(name)
            getattr(self, name)(**params)
        except ApiError as exc:
            self.send_api_error(exc)
        except ClientGone:
            self.close_connection = True
        except Exception:
            log.exception("internal error answering %s %s", self.command, path[:200])
            self.send_api_error(ApiError(500, "Internal error in the hub (see its log)",
                                         "internal_error"))
        finally:
            self._discard_unread_body()
            self._release_body_memory()

    def _preflight(self):
        """Answer a CORS preflight: any origin, the hub's methods, and the
        headers asked for; but only for reading and for the OpenAI routes. A
        page of any site may use a room's models as an API client would, and
        never change rooms or speak for a participant: JSON bodies need a
        preflight, so refusing it stops the page. A Private Network Access
        preflight (Chrome asks one before a page of a public web site reaches
        a private address) is refused: a hub on a LAN serves apps of its own
        network, never pages of the internet."""
        if self.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            raise ApiError(403, "This hub does not answer web pages of public sites (Private "
                                "Network Access); use a page or an app served from this network",
                           "private_network_refused")
        method = self.headers.get("Access-Control-Request-Method", "GET").strip().upper()
        if method not in ("GET", "HEAD") and not self._openai:
            raise ApiError(403, "Web pages of other sites may read the hub and use a room's /v1 "
                                "API, but not create rooms, join, leave or answer as a "
                                "participant: use gambiarra.py or curl", "cross_origin_refused")
        headers = list(CORS_HEADERS[1:])
        requested = self.headers.get("Access-Control-Request-Headers", "").strip()
        if requested and len(requested) <= MAX_VIA_BYTES and _REQUESTED_HEADERS.match(requested):
            headers[1] = ("Access-Control-Allow-Headers", requested)
        self.send_body(204, None, b"", headers)

    def _refuse_cross_site_body(self, route):
        """415 for a body that a web page of any site could send through the
        browser of someone on the network without a CORS preflight: text/plain,
        a form, or no Content-Type at all (see SIMPLE_CONTENT_TYPES). The media
        type is compared without case or parameters ("text/plain;charset=UTF-8").
        A tunnelled answer carries the local server's own type, maybe text/plain:
        it passes with the participant's secret header, which no page can send
        without a preflight (route_tunnel_answer then checks the secret)."""
        if self.command in ("GET", "HEAD"):
            return
        self._body_is_chunked()  # a framing error (501, 400) or 413 comes first: each
        self._content_length()   # closes the connection, a 415 may keep it
        media_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type not in SIMPLE_CONTENT_TYPES and (media_type or self._body_read):
            return
        if route == "route_tunnel_answer" and "x-gambiarra-secret" in self.headers:
            return
        raise ApiError(415, "Send the request body as JSON with 'Content-Type: application/json'"
                            " (the hub refuses %s, which any web page could send it)"
                       % (printable(media_type)[:80] if media_type else "a body without "
                          "Content-Type"), "unsupported_media_type",
                       headers=[("Accept", "application/json")])

    def parse_request(self):
        """The stdlib's parse_request without the email package, whose header
        parser is the largest pure-Python cost of a relayed request."""
        self.command = None
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        self._head_sent = self._chunked = self._openai = False  # per request, on a kept
        self._body_read = True                                  # alive connection
        if self._lifeline is not None:  # the agent's next request: its answer, normally
            self._lifeline = None
            self._reader.set_timeout(self.hub.client_timeout)
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        version = _REQUEST_VERSION.match(words[-1]) if len(words) == 3 else None
        if version is None:
            self.send_error(400, "Bad request line")
            return False
        if version.group(1) != "1":
            self.send_error(505, "Only HTTP/1.0 and HTTP/1.1 are supported")
            return False
        self.command, self.path, self.request_version = words
        if self.path.startswith("//"):  # gh-87389: never an absolute URI
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile, self.hub.max_header_bytes)
        except ValueError as exc:
            self.send_error(431 if isinstance(exc, HeadTooLarge) else 400, str(exc))
            return False
        self._reader.lift_deadline()
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if (self.headers.get("Expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self):
        """Refuse an oversized body before the client sends it."""
        self._openai = OPENAI_PATH.match(self.path.split("?", 1)[0]) is not None
        try:
            self._content_length()
        except ApiError as exc:
            self.send_api_error(exc)
            return False
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        """JSON instead of the stdlib's HTML, for malformed request lines too."""
        self.close_connection = True
        self.send_api_error(ApiError(code, message or self.responses.get(code, ("Error",))[0]))

    # -- reading requests --

    def _body_is_chunked(self):
        """True for a chunked body; 501 for any other transfer coding."""
        coding = self.headers.get("Transfer-Encoding")
        if coding is None:
            return False
        if coding.strip().lower() != "chunked":
            self.close_connection = True
            raise ApiError(501, "Transfer-Encoding %r is not supported; send the body plain "
                                "or chunked" % printable(coding), "unsupported_encoding")
        return True

    def _declared_length(self):
        """The Content-Length, or None; 400 unless it is plain digits."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            return parse_decimal(raw)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Invalid Content-Length header", "invalid_request")

    def _content_length(self):
        """The Content-Length, or None; 413 when it is over --max-body."""
        length = self._declared_length()
        if length is not None and length > self.hub.max_body:
            raise self._too_large()
        return length

    def _too_large(self):
        self.close_connection = self._linger = True
        return ApiError(413, "Request body is larger than the hub's limit of %d bytes"
                        % self.hub.max_body, "request_too_large")

    def read_body(self):
        """The whole request body (Content-Length or chunked), within
        --max-body and the hub's memory for bodies (--max-body-memory), which
        it holds until the request is answered."""
        pieces, size = [], 0
        if not self._body_is_chunked():
            self._hold_body_memory(self._content_length() or 0)  # refused before reading
        with contextlib.closing(self._body_pieces(self.hub.max_body)) as arriving:
            for data in arriving:
                size += len(data)
                self._hold_body_memory(size)
                pieces.append(data)
        return b"".join(pieces)

    def _hold_body_memory(self, size):
        """Count a body of ``size`` bytes in the hub's memory for bodies: 503
        when it does not fit (the client may retry; other bodies are being
        answered and will give theirs back)."""
        wanted = size * BODY_MEMORY_FACTOR if size > SMALL_BODY_BYTES else 0
        if wanted <= self._held:
            return
        if not self.hub.body_memory.take(wanted - self._held):
            self.close_connection = self._linger = True
            raise ApiError(503, "The hub holds as many request bodies as its memory for them "
                                "allows (--max-body-memory %d bytes); try again in a few seconds"
                           % self.hub.body_memory.limit, "hub_busy",
                           headers=[("Retry-After", str(RETRY_AFTER_S))])
        self._held = wanted

    def _release_body_memory(self):
        if self._held:
            self.hub.body_memory.give(self._held)
            self._held = 0

    def _body_pieces(self, limit, paced=True):
        """The request body piece by piece as it arrives (at most
        RELAY_READ_BYTES each), counting the bytes really read: 413 past
        ``limit`` (None: no limit, for streamed uploads). A ``paced`` body
        must keep up --min-body-rate after BODY_GRACE_S (408 otherwise; a
        tunnelled answer's upload is as slow as its model and is not paced).
        A client that stalls or hangs up mid-body is gone: ClientGone."""
        self._body_read = True
        chunked = self._body_is_chunked()
        length = None if chunked else self._declared_length() or 0
        if limit is not None and length is not None and length > limit:
            raise self._too_large()
        if paced and self.hub.min_body_rate:
            self._pace = (time.monotonic() + BODY_GRACE_S, 0)
            self._paced(0)
        try:
            yield from self._chunked_pieces(limit) if chunked else self._sized_pieces(length)
        except OSError:  # timeout or reset
            self.close_connection = True
            deadline = self._reader.deadline
            if self._pace is not None and deadline is not None and time.monotonic() >= deadline:
                self._linger = True
                raise ApiError(408, "The request body came slower than the hub's minimum of "
                                    "%d bytes/s" % self.hub.min_body_rate, "request_timeout")
            raise ClientGone()
        finally:
            self._pace = None
            self._reader.lift_deadline()

    def _paced(self, received):
        """Move the body's deadline: each --min-body-rate bytes buy a second."""
        if self._pace is not None:
            start, total = self._pace
            self._pace = start, total + received
            self._reader.deadline = start + (total + received) / self.hub.min_body_rate

    def _sized_pieces(self, length):
        while length:
            data = self.rfile.read1(min(length, RELAY_READ_BYTES))
            if not data:
                raise ClientGone()
            length -= len(data)
            self._paced(len(data))
            yield data

    def _chunked_pieces(self, limit):
        total = 0
        while True:
            size = self._next_chunk_size()
            total += size
            if limit is not None and total > limit:
                raise self._too_large()
            if size == 0:
                return
            yield from self._sized_pieces(size)
            end = self.rfile.readline(3)
            if not end:
                raise ClientGone()
            if end not in (b"\r\n", b"\n"):
                raise self._malformed_chunks()

    def _malformed_chunks(self):
        self.close_connection = True
        return ApiError(400, "Malformed chunked request body", "invalid_request")

    def _next_chunk_size(self):
        """Read a chunk-size line (and the trailers after the last chunk)."""
        line = self.rfile.readline(1024)
        if not line:
            raise ClientGone()
        try:
            size = parse_hex(line.split(b";", 1)[0].strip())
        except ValueError:
            raise self._malformed_chunks()
        if size == 0:
            while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        return size

    def read_json_body(self):
        """The body as a JsonBody (400 unless it is a JSON object)."""
        return JsonBody(self.read_body())

    def read_json_object(self):
        return self.read_json_body().fields

    def _discard_unread_body(self):
        """Keep the connection usable when a route answered without the body."""
        if self._body_read or self.close_connection:
            return
        try:
            length = self._content_length()
        except ApiError:
            return
        if length is None or length > DRAIN_LIMIT_BYTES:
            self.close_connection = self._linger = True
            return
        self._reader.deadline = time.monotonic() + self.hub.header_timeout  # no slow drip
        try:
            self.rfile.read(length)
        except OSError:
            self.close_connection = True
        finally:
            self._reader.lift_deadline()

    # -- writing responses --

    def _head(self, status, headers):
        self._reader.lift_deadline()  # a write waits --client-timeout, never what is left of one
        reason = self.responses.get(status, ("Unknown",))[0]
        lines = ["HTTP/1.1 %d %s" % (status, reason), "Server: " + self.server_version,
                 "Date: " + http_date(), "Access-Control-Allow-Origin: *"]
        lines.extend("%s: %s" % header for header in headers)
        if self.close_connection:
            lines.append("Connection: close")
        self._head_sent = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %d", printable(self.requestline[:200]), status)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write(self, data):
        try:
            self.wfile.write(data)
        except OSError:  # reset, broken pipe, or a client that stopped reading
            self.close_connection = True
            raise ClientGone()

    def send_body(self, status, content_type, body, headers=()):
        # RFC 9110 section 8.6: no Content-Length on a 204.
        head = [] if status == 204 else [("Content-Length", str(len(body)))]
        if content_type:
            head.append(("Content-Type", content_type))
        head.extend(headers)
        data = self._head(status, head)
        if self.command != "HEAD":
            data += body
        self._write(data)

    def send_json(self, status, obj, headers=()):
        self.send_body(status, "application/json", json_bytes(obj), headers)

    def send_api_error(self, exc):
        """Render an ApiError in the shape the route's clients parse."""
        if self._head_sent:  # mid-stream: nothing sensible left to say
            self.close_connection = True
            return
        if self._openai:
            body = openai_error(exc.status, exc.message, exc.code)
        else:
            body = {"error": exc.message}
        try:
            self.send_json(exc.status, body, exc.headers)
        except ClientGone:
            pass

    def start_chunked(self, status, content_type, headers=()):
        """Send the head of a streamed answer. HTTP/1.0 clients get a
        close-delimited body instead of chunked encoding."""
        self._chunked = self.request_version == "HTTP/1.1"
        head = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
        if self._chunked:
            head.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        head.extend(headers)
        self._write(self._head(status, head))

    def start_sized(self, status, content_type, length):
        """Send the head of an answer whose ``length`` bytes follow in pieces."""
        self._chunked = False
        self._write(self._head(status, [("Content-Length", str(length)),
                                        ("Content-Type", content_type)]))

    def write_chunk(self, data):
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._write(data)

    def end_chunked(self, final=b""):
        """Send ``final`` (if any) and the last chunk; errors are ignored
        because the answer is over either way."""
        data = final
        if self._chunked:
            data = (b"%x\r\n%s\r\n" % (len(final), final) if final else b"") + b"0\r\n\r\n"
        try:
            self._write(data)
        except ClientGone:
            pass

    # -- routes: hub and rooms --

    def route_health(self):
        self.send_json(200, {"status": "ok", "timestamp": now_ms()})

    def route_list_rooms(self):
        self.send_json(200, {"rooms": self.hub.registry.list_rooms()})

    def route_create_room(self):
        body = self.read_json_object()
        name = body.get("name")
        if not name or (isinstance(name, str) and not name.strip()):
            raise ApiError(400, "Name is required", "missing_field")
        name = require_string(body, "name")
        password = require_string(body, "password", MAX_NAME_CHARS, required=False)
        room = self.hub.registry.create_room(name, password and hash_password(password))
        log.info("room %s created: %s%s", room["code"], printable(name),
                 " (protected)" if password else "")
        self.send_json(201, {"room": room, "hostId": room["hostId"]})

    def route_join(self, code):
        body = self.read_json_object()
        fields = self._join_fields(body)
        password = require_string(body, "password", required=False) or ""
        self.hub.registry.authorize(code, password.encode("utf-8"),
                                    address=self.client_address[0])
        if fields["transport"] == "direct" and not fields["fromHubMachine"]:
            self._check_endpoint(fields["endpoint"])
        participant, room_id, secret, replaced = self.hub.registry.join(
            code, fields, self._participant_secret(body))
        code = code.upper()
        if replaced is not None:  # polls with the old secret end: the agent re-polls
            self.hub.tunnels.retire(code, replaced)
        log.info("%s joined room %s serving %s", printable(participant["nickname"]), code,
                 printable(participant["model"]))
        self.hub.bus.publish(code, "participant:joined", participant)
        self.send_json(201, {"participant": participant, "roomId": room_id, "secret": secret,
                             "healthInterval": int(self.hub.health_interval * 1000)})

    def _join_fields(self, body):
        """The participant's fields from a join's body; 400/413 naming a bad one."""
        fields = {
            "id": require_string(body, "id", MAX_ID_CHARS),
            "nickname": require_string(body, "nickname"),
            "model": require_string(body, "model"),
            "endpoint": normalize_endpoint(require_string(body, "endpoint", 2048)),
            "specs": self._small_object(body, "specs"),
            "config": self._small_object(body, "config"),
            "maxConcurrent": optional_positive_int(body, "maxConcurrent",
                                                   DEFAULT_MAX_CONCURRENT),
            "transport": require_string(body, "transport", required=False) or "direct",
            "fromHubMachine": self.hub.same_machine(self.client_address[0],
                                                    self.connection.getsockname()[0]),
        }
        if fields["transport"] not in ("direct", "tunnel"):
            raise ApiError(400, "Field 'transport' must be \"direct\" or \"tunnel\"",
                           "invalid_field")
        check_participant_id(fields["id"])
        return fields

    def _small_object(self, body, field):
        """An optional object field of join ("specs", "config"): 413 when its
        JSON is larger than --max-specs-bytes (every participant listing
        and joined event carries it)."""
        value = optional_object(body, field)
        limit = self.hub.max_specs_bytes
        try:
            size = len(json_bytes(value))
        except RecursionError:
            size = None
        if size is None or size > limit:
            raise ApiError(413, "Field '%s' is larger than this hub's limit of %d bytes as JSON; "
                                "the organiser can raise it with 'serve --max-specs-bytes'"
                           % (field, limit), "field_too_large")
        return value

    def _check_endpoint(self, endpoint):
        """400 when a direct participant on another machine names an endpoint
        on the hub's own machine: the hub would call services that listen
        only there (and tell which ports are open) for whoever asks."""
        reason = endpoint_trouble(endpoint)
        if reason is not None:
            raise ApiError(400, "Field 'endpoint' is off limits to a participant on another "
                                "machine (%s): the hub calls loopback, link-local and its own "
                                "addresses only for participants that join from its own "
                                "machine. The organiser can register a server running on the "
                                "hub's machine by joining from that machine itself; anyone "
                                "else names an address of their own machine, or joins with "
                                "the default tunnel (python3 gambiarra.py join CODE)" % reason,
                           "invalid_endpoint")

    def _participant_secret(self, body):
        """The participant secret: X-Gambiarra-Secret, else "secret" in the body."""
        header = self.headers.get("X-Gambiarra-Secret")
        if header is not None:
            return header.encode("latin-1").decode("utf-8", "replace")
        value = body.get("secret")
        return value if isinstance(value, str) else None

    def _authorize(self, code):
        """404 for an unknown room; 401 unless it is open or the request carries
        its password as 'Authorization: Bearer PASSWORD', in UTF-8 or Latin-1."""
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        forms = bearer_password_forms(token.strip()) if scheme.lower() == "bearer" else ()
        self.hub.registry.authorize(code, *forms, address=self.client_address[0])

    def route_leave(self, code, participant_id):
        body = self.read_json_object() if not self._body_read else {}
        tunnel_key = self.hub.registry.leave(code, participant_id, self._participant_secret(body))
        if tunnel_key is not None:
            self.hub.tunnels.retire(code.upper(), tunnel_key)
        self.hub.bus.publish(code.upper(), "participant:left",
                             {"participantId": participant_id, "reason": "left"})
        self.send_json(200, {"success": True})

    def route_heartbeat(self, code):
        body = self.read_json_object()
        participant_id = require_string(body, "id", MAX_ID_CHARS)
        if self.hub.registry.heartbeat(code, participant_id, self._participant_secret(body)):
            self.hub.bus.publish(code.upper(), "participant:online",
                                 {"participantId": participant_id})
        self.send_json(200, {"success": True})

    def route_participants(self, code):
        self._authorize(code)
        self.send_json(200, {"participants": self.hub.registry.participants_json(code)})

    def route_events(self, code):
        """Server-sent events of one room until the client or the hub goes."""
        self._authorize(code)
        code = self.hub.registry.room_json(code)["code"]
        self.close_connection = True  # an event stream ends its connection
        if self.command == "HEAD":
            self.start_chunked(200, "text/event-stream")
            return
        subscriber = self.hub.bus.subscribe(code, self.connection, self.client_address[0])
        watch = self.hub.watcher.watch(self.connection, lambda: self.hub.bus.end(subscriber))
        try:
            self.start_chunked(200, "text/event-stream", [("X-Accel-Buffering", "no")])
            self.write_chunk(sse_frame("connected", {"clientId": secrets.token_hex(8)}))
            while True:
                try:
                    frame = subscriber.queue.get(timeout=self.hub.sse_keepalive)
                except queue.Empty:
                    frame = b": keep-alive\n\n"
                if frame is EventBus.CLOSED:
                    break
                self.write_chunk(frame)
            self.end_chunked()
        finally:
            self.hub.watcher.unwatch(watch)
            self.hub.bus.unsubscribe(subscriber)

    # -- routes: the tunnel of participants whose server the hub cannot reach --

    def route_tunnel_poll(self, code, participant_id):
        """A tunnelled participant's long poll: its next request as JSON
        {requestId, path, via, accept, body}, or 204 after ``?wait=`` seconds.
        A poll is also a heartbeat, and proof that the agent listens. With
        ``?accept=1`` the agent promises to confirm each request it gets
        (route_tunnel_accept): a request handed to a poll whose agent has
        vanished then moves on to another participant within seconds."""
        query = urllib.parse.parse_qs(self.path.partition("?")[2])
        try:
            wait_s = min(max(float(query.get("wait", [TUNNEL_POLL_S])[0]), 0.0),
                         TUNNEL_POLL_MAX_S)
        except ValueError:
            raise ApiError(400, "Query parameter 'wait' must be a number of seconds",
                           "invalid_field")
        confirm = query.get("accept") == ["1"]
        secret = self._participant_secret({})
        if self.command == "HEAD":  # a HEAD must not take work it cannot deliver
            self.hub.registry.check_secret(code, participant_id, secret)
            self.send_body(204, None, b"")
            return
        came_back, key = self.hub.registry.poll_started(code, participant_id, secret)
        if came_back:
            self.hub.bus.publish(code.upper(), "participant:online",
                                 {"participantId": participant_id})
        call = self._wait_for_call(TunnelPoll((code.upper(), key)), wait_s, confirm)
        if call is TunnelBroker.RETIRED:
            raise ApiError(404, "Participant not found (it re-joined or left): join again",
                           "participant_not_found")
        if call is None:
            self.send_body(204, None, b"")
            return
        try:
            self.send_body(200, "application/json", call.job(confirm))
        except ClientGone:
            call.end(("unreachable", "the agent's poll broke off"))
            raise

    def _wait_for_call(self, poll, wait_s, confirm):
        """The broker's next call for this poll, ending early if the agent
        hangs up; the registry hears when the poll ends and how."""
        participant_id = poll.line[1][0]
        watch = self.hub.watcher.watch(self.connection, lambda: self.hub.tunnels.hang_up(poll))
        try:
            return self.hub.tunnels.next_call(poll, wait_s, confirm)
        finally:
            self.hub.watcher.unwatch(watch)
            self.hub.registry.poll_ended(poll.line[0], participant_id, poll.line[1],
                                         hung_up=poll.gone)

    def _own_call(self, code, participant_id, call_id):
        """The tunnelled call ``call_id``, if it was given to this participant
        and the request carries that participant's secret (401/404 otherwise)."""
        self.hub.registry.check_secret(code, participant_id, self._participant_secret({}))
        call = self.hub.tunnels.call(call_id)
        if call is None or call.code != code.upper() or call.participant_id != participant_id:
            raise ApiError(404, "No request %s is waiting for this participant's answer"
                           % call_id[:64], "unknown_request")
        self.hub.registry.saw_agent(code, participant_id)
        return call

    def route_tunnel_accept(self, code, participant_id, call_id):
        """An agent confirms it got a request and starts on it: 200, or 410
        when nobody waits for it any more (the agent then drops it).

        The connection then waits for the answer's upload and is the
        request's lifeline: if the agent is killed, the kernel closes it and
        the request moves on to another participant at once, instead of when
        the agent is found offline."""
        call = self._own_call(code, participant_id, call_id)
        if not call.accept():
            raise ApiError(410, "Nobody waits for this request any more; drop it", "gone")
        self.send_json(200, {"success": True})
        self._lifeline = call
        self._reader.set_timeout(self.hub.backend_timeout)  # as long as the relay waits

    def route_tunnel_answer(self, code, participant_id, call_id):
        """The answer to a tunnelled request, uploaded as it comes (chunked):
        X-Gambiarra-Status and Content-Type of the participant's server, then
        its body; or X-Gambiarra-Error when the server could not be reached.
        Only the participant the request was given to may answer it; only
        the status, the Content-Type and the body reach the client."""
        call = self._own_call(code, participant_id, call_id)
        error = self.headers.get("X-Gambiarra-Error")
        if error is not None:
            call.end(("unreachable", printable(error)[:500]))
            self.send_json(200, {"success": True})
            return
        try:
            status, content_type = self._answer_head()
        except ApiError as exc:
            call.end(("invalid", exc.message))
            raise
        if not call.begin_upload():
            self.close_connection = True
            raise ApiError(410, "The client went away (or the request was answered); stop "
                                "this answer", "client_gone")
        try:
            delivered = self._upload_to(call, status, content_type)
        except Exception as exc:
            detail = exc.message if isinstance(exc, ApiError) else "the connection broke"
            call.end(("error", "its upload broke off: %s" % detail), keep=True)
            raise
        if not delivered:
            self.close_connection = True
            raise ApiError(410, "The client went away; stop this answer", "client_gone")
        self.send_json(200, {"success": True})

    def _answer_head(self):
        """(status, Content-Type) of an upload; 400 unless a final status and
        a Content-Type that can go into a header line as it is."""
        try:
            status = parse_decimal(self.headers.get("X-Gambiarra-Status", "200"))
            return status, checked_answer_head(status, self.headers.get("Content-Type"))
        except (ValueError, BackendFailure):
            raise ApiError(400, "X-Gambiarra-Status must be a final HTTP status (200 to 599) "
                                "and Content-Type printable text", "invalid_field")

    def _upload_to(self, call, status, content_type):
        """Pass the upload's head and body to the waiting relay, piece by
        piece; False when the relay stopped wanting them (client gone)."""
        self._reader.set_timeout(self.hub.backend_timeout)  # a model may pause that long
        if not call.answer.put(("head", status, content_type)):
            return False
        for data in self._body_pieces(None, paced=False):  # streamed on: no --max-body
            if not call.answer.put(("data", data)):
                return False
        self.hub.registry.saw_agent(call.code, call.participant_id)
        return call.answer.put(("end",))

    # -- routes: the OpenAI-compatible API --

    def _models(self, code):
        self._authorize(code)
        return [{"id": p["id"], "object": "model", "created": p["joinedAt"] // 1000,
                 "owned_by": p["nickname"],
                 "gambiarra": {"nickname": p["nickname"], "model": p["model"],
                               "endpoint": p["endpoint"]}}
                for p in self.hub.registry.online_participants_json(code)]

    def route_models(self, code):
        self.send_json(200, {"object": "list", "data": self._models(code)})

    def route_model(self, code, model_id):
        """One model, as OpenAI's models.retrieve() asks for it."""
        for model in self._models(code):
            if model["id"] == model_id:
                return self.send_json(200, model)
        raise ApiError(404, "No online participant has the id '%s'" % model_id,
                       "model_not_found")

    def _relay(self, code, api_path):
        via = self._via()  # a loop, 404 or 401 before reading a body for nothing
        self._authorize(code)
        self.hub.relay.forward(self, code.upper(), api_path, self.read_json_body(), via)

    def _via(self):
        """The Via header to send on: the hops so far, then this hub. 508 when
        the request already passed through this hub (a participant whose
        endpoint leads back to it) or through too many hubs."""
        received = self.headers.get("Via", "")
        if received and (len(received) > MAX_VIA_BYTES - 40  # room for this hub's entry
                         or not _HEADER_TEXT.match(received)):
            raise ApiError(400, "The Via header must be printable text of at most %d "
                                "characters" % (MAX_VIA_BYTES - 40), "invalid_request")
        hops = [hop.strip() for hop in received.split(",") if hop.strip()]
        if any(hop.split()[1:2] == [self.hub.via_name] for hop in hops):
            raise ApiError(508, "Loop detected: this request already passed through this hub. "
                                "A participant's endpoint leads back to the hub; it must name "
                                "its own LLM server", "loop_detected")
        if len(hops) >= MAX_VIA_HOPS:
            raise ApiError(508, "Loop detected: this request passed through %d hubs already"
                           % len(hops), "loop_detected")
        return ", ".join(hops + ["1.1 " + self.hub.via_name])

    def route_chat_completions(self, code):
        self._relay(code, "/v1/chat/completions")

    def route_completions(self, code):
        self._relay(code, "/v1/completions")

    def route_embeddings(self, code):
        self._relay(code, "/v1/embeddings")


def address_key(host):
    """Whom a connection counts against for the per-address cap: its IPv4
    address, or the /64 of an IPv6 one (a single machine may hold a whole
    /64, and pick a new address from it for each connection)."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except (OSError, ValueError):
        return host
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def canned_answer(status, reason, message):
    """A whole JSON error answer that closes its connection, as bytes."""
    body = json_bytes({"error": message})
    return ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Retry-After: %d\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n\r\n"
            % (status, reason, len(body), RETRY_AFTER_S)).encode("ascii") + body


class HubServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its connections, so close() can end
    them, caps them (in all and per client address) and backs off when
    accept() runs out of resources.

    ``_lock`` guards ``_connections`` (socket -> (handler thread, address
    key)) and ``_per_address`` (address key -> connections).
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, hub):
        self.hub = hub
        self._lock = threading.Lock()
        self._connections = {}
        self._per_address = collections.Counter()
        self._accept_pause = 0.0  # the current backoff after accept() failed, 0 when fine
        self._stopping = threading.Event()
        self._stopped = threading.Event()  # clear while serve_forever() runs
        self._stopped.set()
        self._refusals_logged_at = -WARN_EVERY_S
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._wake_reader, self._wake_writer = socket.socketpair()  # wakes serve_forever()
        super().__init__(address, HubRequestHandler)

    def serve_forever(self, poll_interval=None):
        """Accept connections until shutdown(). Unlike socketserver's loop,
        which wakes every ``poll_interval`` to look for a shutdown request,
        this one sleeps until a client connects or shutdown() wakes it: an
        idle hub costs no CPU, and it stops at once."""
        self._stopped.clear()
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    if selector.select() and not self._stopping.is_set():
                        self._handle_request_noblock()
            finally:
                self._stopped.set()

    def get_request(self):
        """accept(), pausing after a failure for lack of resources: the
        connection still waiting makes the socket readable at once, so
        retrying at once would spin a core (socketserver ignores the error)."""
        try:
            accepted = self.socket.accept()
        except OSError as exc:
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                self._back_off(exc)
            raise
        if self._accept_pause:
            self._accept_pause = 0.0
            log.info("accepting connections again")
        return accepted

    def _back_off(self, exc):
        """Wait 5 ms, doubling to 1 s while accept() keeps failing; one log line per burst."""
        if not self._accept_pause:
            log.warning("cannot accept connections: %s (%d open connections); retrying every "
                        "%g s at most", exc.strerror or exc, len(self._connections),
                        ACCEPT_BACKOFF_MAX_S)
        self._accept_pause = min(max(self._accept_pause * 2, ACCEPT_BACKOFF_FIRST_S),
                                 ACCEPT_BACKOFF_MAX_S)
        self._stopping.wait(self._accept_pause)

    def shutdown(self):
        """Stop serve_forever() and wait for it (it must be running)."""
        self._stopping.set()
        self._wake_writer.send(b"x")
        self._stopped.wait()

    def server_close(self):
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def process_request(self, request, client_address):
        key = address_key(client_address[0])
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), name="http", daemon=True)
        with self._lock:
            refusal = self._refusal(key)
            if refusal is None:
                self._connections[request] = (thread, key)
                self._per_address[key] += 1
        if refusal is not None:
            self._refuse(request, refusal)
            return
        thread.start()

    def _refusal(self, key):
        """Why a new connection from ``key`` is refused, or None (under the lock)."""
        if len(self._connections) >= self.hub.max_connections:
            return ("The hub holds its limit of %d connections; try again in a few seconds"
                    % self.hub.max_connections)
        if self._per_address[key] >= self.hub.max_connections_per_address:
            return ("Your address holds the hub's limit of %d connections per address; close "
                    "some or try again later" % self.hub.max_connections_per_address)
        return None

    def _refuse(self, request, message):
        """503 and close, from the accept thread: a fresh socket's send buffer
        takes the small answer whole, so nothing here can block, and no
        thread is started for it. What the client sent already is read first,
        so that the close is a FIN, not a reset that could lose the answer."""
        now = time.monotonic()
        if now - self._refusals_logged_at >= WARN_EVERY_S:
            self._refusals_logged_at = now
            log.warning("refusing connections with 503: %s", message)
        try:
            request.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(16):
                    if not request.recv(4096):
                        break
            request.send(canned_answer(503, "Service Unavailable", message))
        except OSError:
            pass
        finally:
            request.close()

    def open_connections(self):
        return len(self._connections)

    def crowded(self):
        """True when idle keep-alive connections should make room (BUSY_SHARE of the cap)."""
        return len(self._connections) >= self.hub.max_connections * BUSY_SHARE

    def shutdown_request(self, request):
        with self._lock:
            _, key = self._connections.pop(request, (None, None))
            if key is not None:
                self._per_address[key] -= 1
                if not self._per_address[key]:
                    del self._per_address[key]
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            log.debug("connection from %s ended: %r", client_address[0], exc)
        else:
            log.exception("unexpected error on a connection from %s", client_address[0])

    def close_connections(self, timeout):
        """End every open connection and wait (bounded) for their threads."""
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, (thread, _) in connections:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))


def open_file_limit():
    """The soft limit of open files (RLIMIT_NOFILE), or None if there is none."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(connections):
    """Raise the soft open-file limit toward the hard one, as far as
    ``connections`` need (Go raises it at start too): many systems keep a
    soft 1024 that holds far fewer connections than the machine can.
    Process-wide, so ``serve`` does it, never an imported Hub."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_RESERVE + FDS_PER_CONNECTION * connections
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open files limit to %d: %s", wanted, exc)


class Hub:
    """The Gambiarra hub: rooms, participants, the relay and the events.

    >>> with Hub(port=0) as hub:          # doctest: +SKIP
    ...     urllib.request.urlopen(hub.url + "/health")

    ``start()`` binds and serves in background threads; ``close()`` stops
    them all and releases every socket. Options match ``serve``'s flags;
    ``mdns_options`` go to MdnsResponder (tests give a port, links, timings).
    """

    def __init__(self, host="127.0.0.1", port=0, max_body=DEFAULT_MAX_BODY_BYTES,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT_S,
                 backend_timeout=DEFAULT_BACKEND_TIMEOUT_S,
                 health_interval=DEFAULT_HEALTH_INTERVAL_S, participant_timeout=None,
                 forget_after=DEFAULT_FORGET_AFTER_S, room_ttl=DEFAULT_ROOM_TTL_S,
                 state_path=None, queue_timeout=DEFAULT_QUEUE_TIMEOUT_S,
                 sse_keepalive=SSE_KEEPALIVE_S,
                 client_timeout=CLIENT_IDLE_TIMEOUT_S, mdns=False, mdns_options=None,
                 max_password_checks=DEFAULT_MAX_PASSWORD_CHECKS,
                 password_failures=DEFAULT_PASSWORD_FAILURES,
                 max_connections=DEFAULT_MAX_CONNECTIONS,
                 max_connections_per_address=DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                 header_timeout=DEFAULT_HEADER_TIMEOUT_S, min_body_rate=DEFAULT_MIN_BODY_RATE,
                 max_header_bytes=DEFAULT_MAX_HEADER_BYTES,
                 max_rooms=DEFAULT_MAX_ROOMS, max_participants=DEFAULT_MAX_PARTICIPANTS,
                 max_subscribers=DEFAULT_MAX_SUBSCRIBERS,
                 max_subscribers_per_address=DEFAULT_MAX_SUBSCRIBERS_PER_ADDRESS,
                 max_specs_bytes=DEFAULT_MAX_SPECS_BYTES,
                 max_body_memory=DEFAULT_MAX_BODY_MEMORY):
        self.host = host
        self.port = port
        self.max_body = max_body
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.health_interval = health_interval
        if participant_timeout is None:
            participant_timeout = PARTICIPANT_TIMEOUT_HEARTBEATS * health_interval
        self.participant_timeout = participant_timeout
        self.forget_after = forget_after
        self.sse_keepalive = sse_keepalive
        self.client_timeout = client_timeout
        self.queue_timeout = queue_timeout
        #: The connection cap asked for; start() lowers it to fit the open-file limit.
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.header_timeout = header_timeout
        self.min_body_rate = min_body_rate
        self.max_header_bytes = max_header_bytes
        #: How this hub names itself in Via headers, to notice requests that loop.
        self.via_name = "gambiarra-" + secrets.token_hex(6)
        self.registry = Registry(participant_timeout, forget_after, room_ttl,
                                 passwords=PasswordGuard(max_password_checks, password_failures),
                                 max_rooms=max_rooms, max_participants=max_participants)
        self.state = (StateFile(state_path, self.registry.rooms_state, self.registry.admit_rooms)
                      if state_path else None)
        self.bus = EventBus(max_subscribers, max_subscribers_per_address)
        self.max_specs_bytes = max_specs_bytes
        if max_body_memory < max_body * BODY_MEMORY_FACTOR:
            raise GambiarraError("--max-body-memory (%d) must hold one body of --max-body (%d "
                                 "bytes, counted %d times)" % (max_body_memory, max_body,
                                                               BODY_MEMORY_FACTOR))
        self.body_memory = MemoryBudget(max_body_memory)
        #: Whether a client address (and the address it reached) is this
        #: machine: a join from there may name an endpoint on this machine.
        #: Tests replace it to play a client on another machine.
        self.same_machine = same_machine
        self.relay = None
        self.watcher = None
        self.server = None
        self.mdns = mdns
        self.mdns_options = mdns_options or {}
        self.mdns_responder = None
        self._threads = []
        self._sweeper = None
        self._closed = False

    def start(self):
        """Load the saved rooms, bind and serve. Raises GambiarraError if the
        state file is unusable, OSError (e.g. EADDRINUSE) if the port is taken."""
        if self.state is not None:
            self._restore_rooms()
        self._fit_connection_cap()
        self.server = HubServer((self.host, self.port), self)
        if self.state is not None:
            self.state.start()
            self.registry.on_rooms_changed = self.state.changed
            self.registry.keep_new_room = self.state.keep
        self.port = self.server.server_address[1]
        self.watcher = ClientWatcher()
        self.tunnels = TunnelBroker()
        self.relay = Relay(self.registry, self.bus, self.watcher, self.tunnels,
                           self.connect_timeout, self.backend_timeout, self.queue_timeout)
        serving = threading.Thread(target=self.server.serve_forever,
                                   name="http-accept", daemon=True)
        serving.start()
        self._threads.append(serving)
        period = max(0.01, min(self.health_interval, self.participant_timeout,
                               self.forget_after) / 4)
        self._sweeper = RepeatingTimer(period, self.sweep)
        self._sweeper.name = "health-sweep"
        self._sweeper.daemon = True
        self._sweeper.start()
        log.debug("hub listening on %s", self.url)
        if self.mdns:
            self._start_mdns()
        return self

    def _fit_connection_cap(self):
        """Lower the connection cap so that every connection can also open a
        backend connection without running out of file descriptors."""
        limit = open_file_limit()
        fits = max(1, (limit - FD_RESERVE) // FDS_PER_CONNECTION) if limit else None
        if fits is not None and fits < self.max_connections:
            log.info("connection cap lowered from %d to %d to fit the limit of %d open files "
                     "(ulimit -n)", self.max_connections, fits, limit)
            self.max_connections = fits
        else:
            log.debug("connection cap %d (%d per address; open files limit: %s)",
                      self.max_connections, self.max_connections_per_address, limit)

    def _start_mdns(self):
        """Advertise the hub on the local network; a machine that cannot do
        mDNS gets one warning and the hub goes on serving HTTP."""
        options = dict(self.mdns_options)
        if self.host not in EVERY_INTERFACE:
            options.setdefault("links", links_for_host(self.host))
        responder = MdnsResponder(self.port, **options)
        try:
            self.mdns_responder = responder.start()
        except MdnsUnavailable as exc:
            urls = ["http://%s:%d" % (address, self.port) for address in local_ipv4_addresses()]
            log.warning("mDNS disabled: %s. Clients can still use --hub %s",
                        exc, (urls or [self.url])[0])

    def _restore_rooms(self):
        saved = self.state.load()
        try:
            self.registry.restore_rooms(saved)
        except ValueError as exc:
            raise self.state.unusable(exc)
        if saved:
            log.info("%d room(s) restored from %s", len(saved), self.state.path)

    @property
    def url(self):
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, self.port)

    def sweep(self):
        """One health sweep: end the requests of tunnelled participants that
        went offline, publish what changed (outside the registry lock) and
        close idle backend connections."""
        events, lost = self.registry.sweep()
        for code, tunnel_key, forgotten in lost:
            self.tunnels.abandon(code, tunnel_key, ("gone", "it went offline: no heartbeat "
                                                    "for %g s" % self.participant_timeout))
            if forgotten:
                self.tunnels.retire(code, tunnel_key)
        for code, event, data in events:
            self.bus.publish(code, event, data)
            if event == "room:removed":
                log.info("room %s removed after %g s without participants", code,
                         self.registry.room_ttl_s)
                self.bus.end_room(code)
            else:
                log.info("participant %s in room %s: %s", printable(data["participantId"]), code,
                         event.split(":")[1])
        self.relay.pool.prune()

    def close(self):
        """Stop serving and release every thread, timer and socket (idempotent)."""
        if self._closed or self.server is None:
            self._closed = True
            return
        self._closed = True
        if self.mdns_responder is not None:
            self.mdns_responder.close()  # goodbyes first: browsers forget us at once
        self._sweeper.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.bus.close()
        self.tunnels.close()
        self.relay.close()
        self.server.close_connections(timeout=5)
        self.watcher.close()
        if self.state is not None:
            self.state.close()
        for thread in self._threads + [self._sweeper]:
            thread.join(5)

    def __enter__(self):
        if self.server is None:
            self.start()
        return self

    def __exit__(self, *exc_info):
        self.close()


# === mDNS ===
#
# ``serve --mdns`` advertises one DNS-SD service, _gambiarra._tcp.local, with a
# small responder on UDP 5353; the CLI finds hubs with a one-shot query. Both
# follow RFC 6762 (mDNS) and RFC 6763 (DNS-SD) as far as avahi, Bonjour,
# python-zeroconf and Node's bonjour-service need. Left out on purpose: IPv6,
# simultaneous-probe tiebreaking (section 8.2) and multi-packet known answers
# (section 7.2); a responder for one service does not need them.

DNS_A, DNS_PTR, DNS_TXT, DNS_AAAA, DNS_SRV, DNS_NSEC, DNS_ANY = 1, 12, 16, 28, 33, 47, 255
DNS_CLASS_IN = 1
#: The top bit of a class: "cache flush" in a record, "unicast reply wanted" (QU)
#: in a question.
DNS_CLASS_TOP_BIT = 0x8000
DNS_FLAG_RESPONSE = 0x8000
DNS_FLAG_AUTHORITATIVE = 0x0400
DNS_FLAG_TRUNCATED = 0x0200
DNS_OPCODE_MASK = 0x7800

Question = collections.namedtuple("Question", "name type unicast")
#: One resource record of class IN. ``data`` by type: A an address string, PTR
#: a name, SRV (priority, weight, port, target), TXT a tuple of bytes, NSEC
#: (next name, tuple of types), any other type its raw bytes.
Record = collections.namedtuple("Record", "name type ttl data unique")
Message = collections.namedtuple("Message", "id flags questions answers authorities additionals")


class MdnsDecodeError(ValueError):
    """A datagram that is not a well-formed DNS message."""


def record_key(record):
    """What makes two records the same record: name (any case), type and data."""
    data = record.data
    if record.type == DNS_PTR:
        data = data.lower()
    elif record.type == DNS_SRV:
        data = data[:3] + (data[3].lower(),)
    return record.name.lower(), record.type, data


# --- names: "label.label.local", dots inside a label escaped as "\." ---

def name_labels(name):
    """The labels of a name, unescaping "\\." and "\\\\"; a final dot is optional."""
    if name == ".":
        return []  # the root
    labels, label, chars = [], [], iter(name)
    for char in chars:
        if char == "\\":
            label.append(next(chars, ""))
        elif char == ".":
            labels.append("".join(label))
            label = []
        else:
            label.append(char)
    if label:
        labels.append("".join(label))
    return labels


def escape_label(label):
    return label.replace("\\", "\\\\").replace(".", "\\.")


def instance_label(name):
    """The first label of a service instance name, as people read it."""
    labels = name_labels(name)
    return labels[0] if labels else ""


# --- encoding ---

class PacketWriter:
    """Builds one DNS message, compressing names (RFC 1035 section 4.1.4)."""

    def __init__(self):
        self.buffer = bytearray(12)
        self._offsets = {}  # tuple of labels -> where that suffix was written

    def name(self, name, compress=True):
        labels = [label.encode("utf-8") for label in name_labels(name)]
        if any(not 0 < len(label) <= 63 for label in labels):
            raise ValueError("a DNS label must have 1 to 63 bytes: %r" % name)
        if sum(len(label) + 1 for label in labels) + 1 > 255:
            raise ValueError("a DNS name must have at most 255 bytes: %r" % name)
        for index in range(len(labels)):
            suffix = tuple(labels[index:])
            if compress and suffix in self._offsets:
                self.buffer += struct.pack("!H", 0xC000 | self._offsets[suffix])
                return
            if len(self.buffer) < 0x4000:
                self._offsets.setdefault(suffix, len(self.buffer))
            self.buffer += bytes([len(labels[index])]) + labels[index]
        self.buffer.append(0)

    def question(self, question):
        self.name(question.name)
        top_bit = DNS_CLASS_TOP_BIT if question.unicast else 0
        self.buffer += struct.pack("!HH", question.type, DNS_CLASS_IN | top_bit)

    def record(self, record, legacy=False):
        """Write a record; ``legacy`` replies cap the TTL and never flush caches."""
        self.name(record.name)
        ttl = min(record.ttl, MDNS_LEGACY_TTL_S) if legacy else record.ttl
        top_bit = DNS_CLASS_TOP_BIT if record.unique and not legacy else 0
        self.buffer += struct.pack("!HHIH", record.type, DNS_CLASS_IN | top_bit, ttl, 0)
        start = len(self.buffer)
        RDATA_WRITERS.get(record.type, PacketWriter._raw)(self, record.data)
        struct.pack_into("!H", self.buffer, start - 2, len(self.buffer) - start)

    def _address(self, address):
        self.buffer += socket.inet_aton(address)

    def _srv(self, data):
        priority, weight, port, target = data
        self.buffer += struct.pack("!HHH", priority, weight, port)
        self.name(target, compress=False)  # RFC 2782: targets are never compressed

    def _txt(self, strings):
        if not strings:
            strings = (b"",)  # RFC 6763 section 6.1: never an empty TXT record
        for string in strings:
            if len(string) > 255:
                raise ValueError("a TXT string must have at most 255 bytes")
            self.buffer += bytes([len(string)]) + string

    def _nsec(self, data):
        next_name, types = data
        self.name(next_name, compress=False)
        bitmap = bytearray(max(types) // 8 + 1)
        for rtype in types:
            bitmap[rtype // 8] |= 0x80 >> (rtype % 8)
        self.buffer += bytes([0, len(bitmap)]) + bitmap  # window 0 only: types < 256

    def _raw(self, data):
        self.buffer += data


RDATA_WRITERS = {DNS_A: PacketWriter._address, DNS_PTR: PacketWriter.name,
                 DNS_SRV: PacketWriter._srv, DNS_TXT: PacketWriter._txt,
                 DNS_NSEC: PacketWriter._nsec}


def tiebreak_key(record):
    """How probes compare records (RFC 6762 section 8.2): class, type, then the
    uncompressed record data as bytes."""
    writer = PacketWriter()
    RDATA_WRITERS.get(record.type, PacketWriter._raw)(writer, record.data)
    return DNS_CLASS_IN, record.type, bytes(writer.buffer[12:])


def encode_message(message, legacy=False):
    """The bytes of ``message``; ``legacy`` for a reply to a one-shot query."""
    writer = PacketWriter()
    for question in message.questions:
        writer.question(question)
    for section in (message.answers, message.authorities, message.additionals):
        for record in section:
            writer.record(record, legacy)
    struct.pack_into("!6H", writer.buffer, 0, message.id, message.flags,
                     len(message.questions), len(message.answers),
                     len(message.authorities), len(message.additionals))
    return bytes(writer.buffer)


# --- decoding: everything on a shared LAN is untrusted ---

class PacketReader:
    """Reads one DNS message, checking every offset: garbage raises
    MdnsDecodeError and nothing else."""

    def __init__(self, data):
        self.data = data

    def need(self, offset, count):
        if offset + count > len(self.data):
            raise MdnsDecodeError("truncated at byte %d" % offset)

    def name(self, offset):
        """(name, offset after it). Pointers may point forward (Android does),
        but never twice to the same place, so loops end, and a name follows at
        most MDNS_MAX_POINTERS of them, so a crafted chain costs little."""
        data, labels, end, seen, size = self.data, [], None, set(), 1
        while True:
            self.need(offset, 1)
            length = data[offset]
            if length >= 0xC0:
                self.need(offset, 2)
                pointer = (length & 0x3F) << 8 | data[offset + 1]
                if pointer in seen or pointer >= len(data) or len(seen) >= MDNS_MAX_POINTERS:
                    raise MdnsDecodeError("bad compression pointer at byte %d" % offset)
                seen.add(pointer)
                end = offset + 2 if end is None else end
                offset = pointer
                continue
            if length >= 0x40:
                raise MdnsDecodeError("unknown label type at byte %d" % offset)
            offset += 1
            if length == 0:
                break
            self.need(offset, length)
            size += length + 1
            if size > 255:
                raise MdnsDecodeError("name longer than 255 bytes")
            labels.append(escape_label(data[offset:offset + length].decode("utf-8", "replace")))
            offset += length
        return ".".join(labels), offset if end is None else end

    def question(self, offset):
        name, offset = self.name(offset)
        self.need(offset, 4)
        rtype, rclass = struct.unpack_from("!HH", self.data, offset)
        return Question(name, rtype, bool(rclass & DNS_CLASS_TOP_BIT)), offset + 4

    def record(self, offset):
        name, offset = self.name(offset)
        self.need(offset, 10)
        rtype, rclass, ttl, length = struct.unpack_from("!HHIH", self.data, offset)
        offset += 10
        self.need(offset, length)
        end = offset + length
        reader = RDATA_READERS.get(rtype, PacketReader._raw)
        data = reader(self, offset, end)
        return Record(name, rtype, ttl, data, bool(rclass & DNS_CLASS_TOP_BIT)), end

    def _ends_at(self, result, end):
        value, offset = result
        if offset != end:
            raise MdnsDecodeError("record data of the wrong length")
        return value

    def _address(self, offset, end):
        if end - offset != 4:
            raise MdnsDecodeError("an A record must have 4 bytes")
        return socket.inet_ntoa(self.data[offset:end])

    def _ptr(self, offset, end):
        return self._ends_at(self.name(offset), end)

    def _srv(self, offset, end):
        self.need(offset, 6)
        if offset + 6 > end:
            raise MdnsDecodeError("SRV record too short")
        target = self._ends_at(self.name(offset + 6), end)
        return struct.unpack_from("!HHH", self.data, offset) + (target,)

    def _txt(self, offset, end):
        strings = []
        while offset < end:
            length = self.data[offset]
            if offset + 1 + length > end:
                raise MdnsDecodeError("TXT string runs past its record")
            strings.append(bytes(self.data[offset + 1:offset + 1 + length]))
            offset += 1 + length
        return tuple(strings)

    def _nsec(self, offset, end):
        next_name, offset = self.name(offset)
        types = []
        while offset < end:
            if offset + 2 > end or offset + 2 + self.data[offset + 1] > end:
                raise MdnsDecodeError("NSEC bitmap runs past its record")
            window, length = self.data[offset], self.data[offset + 1]
            for index, byte in enumerate(self.data[offset + 2:offset + 2 + length]):
                types += [window * 256 + index * 8 + bit for bit in range(8) if byte & 0x80 >> bit]
            offset += 2 + length
        if offset != end:
            raise MdnsDecodeError("NSEC record of the wrong length")
        return next_name, tuple(types)

    def _raw(self, offset, end):
        return bytes(self.data[offset:end])


RDATA_READERS = {DNS_A: PacketReader._address, DNS_PTR: PacketReader._ptr,
                 DNS_SRV: PacketReader._srv, DNS_TXT: PacketReader._txt,
                 DNS_NSEC: PacketReader._nsec}


def decode_message(data):
    """Parse a datagram into a Message; raise MdnsDecodeError if it is not one.
    Classes are not kept: mDNS uses IN only."""
    reader = PacketReader(data)
    reader.need(0, 12)
    ident, flags, *counts = struct.unpack_from("!6H", data, 0)
    offset, questions = 12, []
    for _ in range(counts[0]):
        question, offset = reader.question(offset)
        questions.append(question)
    sections = []
    for count in counts[1:]:
        records = []
        for _ in range(count):
            record, offset = reader.record(offset)
            records.append(record)
        sections.append(records)
    return Message(ident, flags, questions, *sections)


def txt_strings(fields):
    """TXT strings from a dict: "key=value", txtvers first (RFC 6763 section 6)."""
    return tuple(("%s=%s" % (key, value)).encode("utf-8") for key, value in fields.items())


def txt_fields(strings):
    """A dict from TXT strings; keys are case-insensitive, a key alone is ''."""
    fields = {}
    for string in strings:
        key, _, value = string.decode("utf-8", "replace").partition("=")
        if key:
            fields.setdefault(key.lower(), value)
    return fields


# --- interfaces: the stdlib has no getifaddrs, so ask libc through ctypes ---

#: One IPv4 address of an interface, and the subnet it is on.
Link = collections.namedtuple("Link", "name address netmask")


def link_network(link):
    mask = struct.unpack("!I", socket.inet_aton(link.netmask))[0]
    return struct.unpack("!I", socket.inet_aton(link.address))[0] & mask, mask


def link_holds(link, address):
    """True when ``address`` is on ``link``'s subnet."""
    try:
        value = struct.unpack("!I", socket.inet_aton(address))[0]
    except OSError:
        return False
    network, mask = link_network(link)
    return value & mask == network


def network_links():
    """The IPv4 addresses of this machine's interfaces that are up, loopback
    included, point-to-point /32 links left out (VPNs: nobody else is there)."""
    links = _getifaddrs_links() or _fallback_links()
    return [link for link in links
            if link.netmask != "255.255.255.255" or link.address.startswith("127.")]


def _getifaddrs_links():
    try:
        import ctypes
        libc = ctypes.CDLL(None)  # the C library is already loaded
        getifaddrs, freeifaddrs = libc.getifaddrs, libc.freeifaddrs
    except (ImportError, OSError, AttributeError, TypeError):  # no ctypes, or Windows
        return []

    class IfAddrs(ctypes.Structure):
        pass
    IfAddrs._fields_ = [("next", ctypes.POINTER(IfAddrs)), ("name", ctypes.c_char_p),
                        ("flags", ctypes.c_uint), ("addr", ctypes.c_void_p),
                        ("netmask", ctypes.c_void_p), ("broadaddr", ctypes.c_void_p),
                        ("data", ctypes.c_void_p)]
    head = ctypes.POINTER(IfAddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        return []
    links, entry = [], head
    try:
        while entry:
            item = entry.contents
            address, netmask = _ipv4_of(item.addr), _ipv4_of(item.netmask)
            if address and netmask and _can_multicast(item.flags):
                links.append(Link(item.name.decode("utf-8", "replace"), address, netmask))
            entry = item.next
    finally:
        freeifaddrs(head)
    return links


def _can_multicast(flags):
    """Up, not a point-to-point tunnel (VPNs: nobody to find there), and
    loopback (Linux's lo lacks the multicast flag, yet works) or multicast."""
    up, loopback, point_to_point = 0x1, 0x8, 0x10
    multicast = 0x8000 if sys.platform == "darwin" or "bsd" in sys.platform else 0x1000
    return bool(flags & up) and not flags & point_to_point and bool(
        flags & (loopback | multicast))


def _ipv4_of(pointer):
    """The address in a struct sockaddr if it is AF_INET. BSD and macOS start
    the struct with a length byte, Linux with a two-byte family."""
    if not pointer:
        return None
    import ctypes
    raw = ctypes.string_at(pointer, 8)
    family = raw[1] if sys.platform == "darwin" or "bsd" in sys.platform else \
        struct.unpack("=H", raw[:2])[0]
    return socket.inet_ntoa(raw[4:8]) if family == socket.AF_INET else None


def _fallback_links():
    """Without getifaddrs: loopback and the address of the default route,
    guessing a /24 around it."""
    links = [Link("lo", "127.0.0.1", "255.0.0.0")]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((MDNS_GROUP, MDNS_PORT))  # UDP connect sends nothing
        links.append(Link("default", probe.getsockname()[0], "255.255.255.0"))
    except OSError:
        pass
    finally:
        probe.close()
    return links


def local_ipv4_addresses():
    """This machine's IPv4 addresses that others could reach, the one of the
    default route first."""
    addresses = [link.address for link in network_links()
                 if not link.address.startswith("127.")]
    default = _fallback_links()[-1].address
    return sorted(set(addresses), key=lambda address: (address != default,
                                                        addresses.index(address)))


def one_link_per_interface(links):
    """The first link of each interface: one packet per interface is enough,
    and carries all of its addresses."""
    seen = {}
    for link in links:
        seen.setdefault(link.name, link)
    return list(seen.values())


def links_for_host(host):
    """The links an HTTP server bound to ``host`` is reachable on."""
    links = network_links()
    if host in EVERY_INTERFACE:
        return links
    if host.startswith("127.") or host in ("localhost", "::1"):
        return [link for link in links if link.address.startswith("127.")]
    return [link for link in links if link.address == host]


def open_mdns_socket(port, links, group=MDNS_GROUP):
    """A UDP socket bound to ``port`` that shares it with avahi or Bonjour and
    has joined ``group`` on each link. Returns (socket, links joined, {link:
    why it could not join}); raises OSError when the port cannot be bound."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):  # needed beside macOS's mDNSResponder
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 255))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, struct.pack("B", 1))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)  # RFC 6762 section 11
        sock.bind(("", port))
    except OSError:
        sock.close()
        raise
    joined, failed, names = [], {}, set()
    for link in links:
        if link.name in names:
            joined.append(link)  # one membership per interface
            continue
        try:
            join_group(sock, group, link)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # EADDRINUSE: already a member
                failed[link] = exc.strerror or str(exc)
                continue
        names.add(link.name)
        joined.append(link)
    return sock, joined, failed


def join_group(sock, group, link):
    """Join ``group`` on ``link``'s interface: memberships are per interface."""
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton(group) + socket.inet_aton(link.address))


def send_multicast(sock, packet, destination, link):
    """Send ``packet`` to the group out of ``link``'s interface (raises OSError)."""
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(link.address))
    sock.sendto(packet, destination)


# --- the responder ---

MdnsReply = collections.namedtuple("MdnsReply", "packet destination link delay_s")


class MdnsTimings:
    """The protocol's waits, RFC values by default; tests pass shorter ones."""

    def __init__(self, probe_wait_s=MDNS_PROBE_WAIT_S, probe_interval_s=MDNS_PROBE_INTERVAL_S,
                 announce_gaps_s=MDNS_ANNOUNCE_GAPS_S, goodbye_gap_s=MDNS_GOODBYE_GAP_S,
                 shared_delay_s=MDNS_SHARED_DELAY_S, repeat_s=MDNS_REPEAT_S,
                 refresh_s=MDNS_INTERFACE_REFRESH_S, tiebreak_wait_s=MDNS_TIEBREAK_WAIT_S):
        self.probe_wait_s = probe_wait_s
        self.probe_interval_s = probe_interval_s
        self.announce_gaps_s = tuple(announce_gaps_s)
        self.goodbye_gap_s = goodbye_gap_s
        self.shared_delay_s = shared_delay_s
        self.repeat_s = repeat_s
        self.refresh_s = refresh_s
        self.tiebreak_wait_s = tiebreak_wait_s


def default_host_label():
    """gambiarra-<host name>: a host name of our own, so we never touch the
    records avahi or Bonjour keep for the machine's name (MDNS.md section 4.4)."""
    base = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return ("gambiarra-" + base)[:63].rstrip("-") if base else "gambiarra-hub"


def hub_txt_fields(path="/"):
    return {"txtvers": "1", "version": __version__, "protocol": "http", "path": path}


class HubService:
    """What the responder advertises: the hub's names, its records on each
    link, and which records answer which question. Renamed on conflicts."""

    def __init__(self, service_port, txt=None, instance=None, host_label=None, links=()):
        self.service_port = service_port
        self.txt = txt_strings(txt if txt is not None else hub_txt_fields())
        self.base_instance = instance or "gambiarra-hub-%d" % service_port
        self.base_host = host_label or default_host_label()
        self.instance, self.host = self.base_instance, self.base_host
        self.renames = 0
        self.links = list(links)

    @property
    def instance_name(self):
        return escape_label(self.instance) + "." + MDNS_SERVICE_TYPE

    @property
    def host_name(self):
        return self.host + ".local"

    def records(self, link, ttl=None):
        """Everything we advertise on ``link``, by kind of record."""
        def ttl_or(default):
            return default if ttl is None else ttl
        addresses = [l.address for l in self.links if l.name == link.name] or [link.address]
        return {
            "types": Record(MDNS_SERVICE_TYPES, DNS_PTR, ttl_or(MDNS_OTHER_TTL_S),
                            MDNS_SERVICE_TYPE, False),
            "ptr": Record(MDNS_SERVICE_TYPE, DNS_PTR, ttl_or(MDNS_OTHER_TTL_S),
                          self.instance_name, False),
            "srv": Record(self.instance_name, DNS_SRV, ttl_or(MDNS_HOST_TTL_S),
                          (0, 0, self.service_port, self.host_name), True),
            "txt": Record(self.instance_name, DNS_TXT, ttl_or(MDNS_OTHER_TTL_S), self.txt, True),
            "a": [Record(self.host_name, DNS_A, ttl_or(MDNS_HOST_TTL_S), address, True)
                  for address in addresses],
            # "This host has no AAAA": resolvers stop waiting for one (section 6.1).
            "nsec": Record(self.host_name, DNS_NSEC, ttl_or(MDNS_HOST_TTL_S),
                           (self.host_name, (DNS_A,)), True),
        }

    def name_kinds(self):
        return {MDNS_SERVICE_TYPES.lower(): "types", MDNS_SERVICE_TYPE.lower(): "service",
                self.instance_name.lower(): "instance", self.host_name.lower(): "host"}

    #: (kind of name, question type) -> (answer records, additional records),
    #: as RFC 6763 section 12 lists the additionals.
    ANSWERS = {
        ("types", DNS_PTR): (("types",), ()),
        ("service", DNS_PTR): (("ptr",), ("srv", "txt", "a", "nsec")),
        ("instance", DNS_SRV): (("srv",), ("a", "nsec")),
        ("instance", DNS_TXT): (("txt",), ()),
        ("instance", DNS_ANY): (("srv", "txt"), ("a", "nsec")),
        ("host", DNS_A): (("a",), ("nsec",)),
        ("host", DNS_AAAA): (("nsec",), ("a",)),
        ("host", DNS_ANY): (("a",), ("nsec",)),
    }

    def answer_question(self, question, link, kinds):
        """(answers, additionals) for one question asked on ``link``."""
        kind = kinds.get(question.name.lower())
        qtype = DNS_PTR if question.type == DNS_ANY and kind in ("types", "service") \
            else question.type
        answer_kinds, additional_kinds = self.ANSWERS.get((kind, qtype), ((), ()))
        records = self.records(link)
        return (_flatten(records[k] for k in answer_kinds),
                _flatten(records[k] for k in additional_kinds))

    def owns(self, record):
        """True for a record we send ourselves (on any link)."""
        key = record_key(record)
        return any(key == record_key(ours) for link in self.links
                   for ours in _flatten(self.records(link).values()))

    def rename(self, kinds):
        """Take the next name for each kind in conflict: "gambiarra-hub-3000 (2)"
        as Bonjour does, "gambiarra-pi-2.local" for the host. Returns the old
        names and the new ones, as text."""
        old = [self.instance] * ("instance" in kinds) + [self.host_name] * ("host" in kinds)
        self.renames += 1
        if "instance" in kinds:
            self.instance = "%s (%d)" % (self.base_instance, self.renames + 1)
        if "host" in kinds:
            self.host = "%s-%d" % (self.base_host, self.renames + 1)
        new = [self.instance] * ("instance" in kinds) + [self.host_name] * ("host" in kinds)
        return " and ".join(old), " and ".join(new)

    def link_for(self, address):
        """The link a packet from ``address`` came over: ours if it is one of our
        addresses, else the one whose subnet holds it, else the first that is
        not loopback (RFC 6762 section 6.2: answer with that link's addresses)."""
        for link in self.links:
            if link.address == address:
                return link
        for link in self.links:
            if link_holds(link, address):
                return link
        outside = [link for link in self.links if not link.address.startswith("127.")]
        return (outside or self.links)[0]

    def interfaces(self):
        return one_link_per_interface(self.links)


class QueryAnswerer:
    """Which packets answer a query, and where they go: multicast, unicast
    for QU questions, a plain DNS reply for one-shot (legacy) queries."""

    def __init__(self, service, group, port, timings):
        self.service, self.group, self.port, self.timings = service, group, port, timings
        self._last_multicast = {}   # (interface, record key) -> time

    def replies(self, message, source, now):
        legacy = source[1] != self.port
        if legacy and (message.answers or message.authorities):
            return []  # avahi drops these too: no one-shot query carries records
        link = self.service.link_for(source[0])
        answers, additionals = self._collect(message, link)
        if not answers:
            return []
        if legacy:  # multicast too: a firewall may drop the unicast reply (zeroconf does so)
            return [self._legacy_reply(message, answers, additionals, source, link)] + \
                self._multicast_reply(answers, additionals, link, now, self._delay(answers))
        return self._mdns_replies(message, answers, additionals, source, link, now)

    def _collect(self, message, link):
        kinds = self.service.name_kinds()
        answers, additionals = [], []
        for question in message.questions:
            found, extra = self.service.answer_question(question, link, kinds)
            answers += found
            additionals += extra
        known = {record_key(r): r.ttl for r in message.answers}
        def unknown(record):  # known-answer suppression, RFC 6762 section 7.1
            return known.get(record_key(record), -1) < record.ttl / 2
        answers = _unique(r for r in answers if unknown(r))
        keys = {record_key(r) for r in answers}
        additionals = _unique(r for r in additionals if unknown(r) and record_key(r) not in keys)
        return answers, additionals

    def _legacy_reply(self, message, answers, additionals, source, link):
        reply = Message(message.id, DNS_FLAG_RESPONSE | DNS_FLAG_AUTHORITATIVE,
                        message.questions, answers, [], additionals)
        packet = encode_message(reply, legacy=True)
        if len(packet) > MDNS_LEGACY_MAX_BYTES:
            reply = reply._replace(additionals=[],
                                   flags=reply.flags | DNS_FLAG_TRUNCATED)
            packet = encode_message(reply, legacy=True)
        return MdnsReply(packet, source, link, 0.0)

    def _mdns_replies(self, message, answers, additionals, source, link, now):
        probe = bool(message.authorities)  # a probe is answered at once, and always
        delay = 0.0 if probe else self._delay(answers)
        replies = []
        if any(q.unicast for q in message.questions):  # QU: unicast, ID 0, no questions
            packet = response_packet(answers, additionals)
            replies.append(MdnsReply(packet, (source[0], self.port), link, delay))
        return replies + self._multicast_reply(answers, additionals, link, now, delay, probe)

    def _delay(self, answers):
        """Shared answers (PTR) wait 20-120 ms, so the responders of a network
        do not all answer at once; unique ones go at once (section 6)."""
        if all(record.unique for record in answers):
            return 0.0
        return random.uniform(*self.timings.shared_delay_s)

    def _multicast_reply(self, answers, additionals, link, now, delay, again=False):
        """The multicast reply, without the records multicast on ``link`` in the
        last second (unless ``again``); none if nothing is left."""
        fresh = answers if again else [
            r for r in answers if not self._multicast_lately(r, link, now)]
        if not fresh:
            return []
        self.multicast(fresh + additionals, link, now)
        return [MdnsReply(response_packet(fresh, additionals), (self.group, self.port),
                          link, delay)]

    def _multicast_lately(self, record, link, now):
        last = self._last_multicast.get((link.name, record_key(record)))
        return last is not None and now - last < self.timings.repeat_s

    def multicast(self, records, link, now):
        """Note that ``records`` went out by multicast on ``link``."""
        for record in records:
            self._last_multicast[(link.name, record_key(record))] = now


class MdnsResponder:
    """Advertises one hub as ``<instance>._gambiarra._tcp.local``.

    One daemon thread owns the socket: it probes the names, announces, answers
    queries and, on close(), says goodbye. ``answer(datagram, source)`` is the
    whole query logic without sockets, for tests.
    """

    def __init__(self, service_port, txt=None, instance=None, host_label=None, links=None,
                 group=MDNS_GROUP, port=MDNS_PORT, timings=None):
        self.service = HubService(service_port, txt, instance, host_label, links or ())
        self._fixed_links = links
        self.timings = timings or MdnsTimings()
        self.answers = QueryAnswerer(self.service, group, port, self.timings)
        self.state = "idle"  # -> waiting -> probing -> announced -> closed
        #: True while probing again for names already announced (section 9):
        #: they stay ours, and answered, until a conflict is confirmed.
        self.defending = False
        self._conflicts = collections.deque(maxlen=MDNS_CONFLICT_LIMIT)
        self._probes_sent = 0
        self._conflict_probes = {}  # kind of name -> the probes a conflict followed
        self._timers, self._generation = [], 0
        self._sock = self._thread = self._wake_r = self._wake_w = None
        self._closing = threading.Event()
        self._announced_event = threading.Event()
        self._quiet = QuietLog()

    @property
    def group(self):
        return self.answers.group

    @property
    def port(self):
        return self.answers.port

    def answer(self, datagram, source, now=None):
        """The replies owed to one datagram from ``source`` (address, port).
        Responses are only checked for conflicts with our names. Nothing from
        outside our links counts: multicast never leaves a link, so such a
        packet is unicast from afar or forged (RFC 6762 section 11)."""
        now = time.monotonic() if now is None else now
        message = decode_message(datagram)
        if message.flags & DNS_OPCODE_MASK or message.flags & 0x000F:
            return []  # RFC 6762 section 18: other opcodes and rcodes are ignored
        if not self.on_link(source[0]):
            return []
        if message.flags & DNS_FLAG_RESPONSE:
            self._check_conflicts(message, source, now)
            return []
        if self.state == "probing" and not self.defending and message.authorities \
                and source[1] == self.port:
            self._tiebreak(message, source)
        if not (self.state == "announced" or self.defending) or not self.service.links:
            return []
        return self.answers.replies(message, source, now)

    def on_link(self, address):
        """True when ``address`` is on the subnet of one of our links."""
        return any(link_holds(link, address) for link in self.service.links)

    # conflicts (RFC 6762 sections 8.1, 8.2 and 9)
    #
    # mDNS has no authentication: anyone on the link can claim any name. What
    # counts as a genuine claim here: a response (QR), flagged authoritative,
    # sent from the mDNS port by a source on one of our links, with a unique
    # (cache-flush) record in its answer section that names our instance (SRV,
    # TXT) or our host (A, AAAA), with a TTL, and -- unless we are probing for
    # the first time, when any such record is a claim (section 8.1) -- data
    # other than ours. That leaves out our own packets looped back (identical
    # data), known answers in queries, goodbyes, additionals and stray types.
    # And one claim is not enough: a claim after announcing makes us probe
    # again, still answering (our announcement defends the name, section 9);
    # the name changes only when claims follow MDNS_CONFLICT_CONFIRMATIONS
    # probes of one series, as the answers of a real owner do.

    #: Kind of name -> the record types that claim it.
    CLAIMS = {"instance": (DNS_SRV, DNS_TXT), "host": (DNS_A, DNS_AAAA)}

    def _check_conflicts(self, message, source, now):
        if self.state not in ("probing", "announced") or source[1] != self.port \
                or not message.flags & DNS_FLAG_AUTHORITATIVE:
            return
        names = self.service.name_kinds()
        claimed = {names.get(record.name.lower()) for record in message.answers
                   if self._claims(record, names.get(record.name.lower()))}
        if not claimed:
            return
        if self.state == "announced":
            self._defend(claimed, source, now)
        else:
            self._count_conflict(claimed, source, now)

    def _claims(self, record, kind):
        """True when ``record`` is someone else's claim on a name of ``kind``."""
        if record.ttl == 0 or not record.unique or record.type not in self.CLAIMS.get(kind, ()):
            return False
        if self.state == "probing" and not self.defending:
            return True  # section 8.1: any answer for a name we probe is a conflict
        return not self.service.owns(record)

    def _tiebreak(self, message, source):
        """Another host probes for one of our names while we do (section 8.2):
        the one whose proposed records sort later goes on; the other waits a
        second and probes again, and then sees the winner's answer."""
        proposed = self.service.records(self.service.link_for(source[0]))
        ours = [proposed["srv"], proposed["txt"]] + proposed["a"]
        for name in (self.service.instance_name.lower(), self.service.host_name.lower()):
            theirs = sorted(tiebreak_key(r) for r in message.authorities if r.name.lower() == name)
            if theirs and sorted(tiebreak_key(r) for r in ours if r.name.lower() == name) < theirs:
                log.info("mDNS: %s is probing for %s too; trying again in a second",
                         source[0], name)
                self._start_probing(self.timings.tiebreak_wait_s)
                return

    def _defend(self, kinds, source, now):
        """Someone claims a name we announced: probe again, keeping the name
        and answering for it, so a forged packet costs us nothing."""
        names = {"instance": self.service.instance, "host": self.service.host_name}
        self._quiet.warning(("claim", source[0]),
                            "mDNS: %s claims %s; probing again to defend it (a second hub "
                            "with that name would make one of the two rename)", source[0],
                            " and ".join(names[kind] for kind in sorted(kinds)))
        self.defending = True
        self._start_probing(self._conflict_delay(now))

    def _count_conflict(self, kinds, source, now):
        """A claim while we probe: rename once claims followed enough probes."""
        for kind in kinds:
            self._conflict_probes.setdefault(kind, set()).add(self._probes_sent)
        confirmed = {kind for kind, probes in self._conflict_probes.items()
                     if len(probes) >= MDNS_CONFLICT_CONFIRMATIONS}
        if confirmed:
            self._on_conflict(confirmed, source, now)

    def _on_conflict(self, kinds, source, now):
        if self.defending:  # caches drop our old names, on the thread
            self._schedule(0, self._send_all, self._goodbye_packets(), lasting=True)
        old, new = self.service.rename(kinds)
        log.warning("mDNS: %s on the network already uses %s; advertising as %s",
                    source[0], old, new)
        self.defending = False
        self._start_probing(self._conflict_delay(now))

    def _conflict_delay(self, now):
        """The wait before probing after a conflict: longer when they pile up
        (section 8.1: 15 in 10 s)."""
        self._conflicts.append(now)
        crowded = len(self._conflicts) == MDNS_CONFLICT_LIMIT and \
            now - self._conflicts[0] < MDNS_CONFLICT_WINDOW_S
        return MDNS_CONFLICT_PAUSE_S if crowded else self.timings.probe_interval_s

    # life cycle, all on the responder's thread

    def start(self):
        """Open the socket and start the thread. Raises MdnsUnavailable with the
        cause when this machine cannot do mDNS."""
        if self._fixed_links is None:
            self.service.links = network_links()
        if not self.service.links:
            raise MdnsUnavailable("no network interface with an IPv4 address")
        try:
            self._sock, joined, failed = open_mdns_socket(self.port, self.service.links,
                                                          self.group)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise MdnsUnavailable("UDP port %d is held exclusively by another program"
                                      % self.port)
            raise MdnsUnavailable("cannot open UDP port %d: %s" % (self.port, exc))
        self.service.links = joined
        reasons = ", ".join("%s %s: %s" % (link.name, link.address, why)
                            for link, why in failed.items())
        if not joined:
            self._sock.close()
            raise MdnsUnavailable("no interface could join the multicast group %s (%s)"
                                  % (self.group, reasons))
        if failed:
            log.warning("mDNS: not announcing on %s", reasons)
        self.answers.port = self._sock.getsockname()[1]  # when asked for port 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._start_probing(random.uniform(0, self.timings.probe_wait_s))
        if self._fixed_links is None:
            self._schedule(self.timings.refresh_s, self._refresh_links, lasting=True)
        self._thread = threading.Thread(target=self._run, name="mdns", daemon=True)
        self._thread.start()
        return self

    def wait_announced(self, timeout):
        return self._announced_event.wait(timeout)

    def close(self, timeout=2.0):
        """Say goodbye, close the socket and stop the thread (idempotent)."""
        self._closing.set()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("mDNS: the responder thread did not stop within %g s", timeout)

    def _run(self):
        try:
            while not self._closing.is_set():
                ready, _, _ = select_readable([self._sock, self._wake_r], self._next_timer_in())
                if self._sock in ready:
                    self._receive()
                self._run_due_timers()
            if self.state == "announced" or self.defending:
                self._send_goodbyes(MDNS_GOODBYES)
        except Exception:  # a bug must not take the hub down with it
            log.exception("mDNS: the responder stopped")
        finally:
            self.state = "closed"
            self._close_sockets()

    def _close_sockets(self):
        for sock in (self._sock, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _receive(self):
        try:
            datagram, source = self._sock.recvfrom(MDNS_MAX_PACKET_BYTES + 1)
        except OSError:
            return
        if len(datagram) > MDNS_MAX_PACKET_BYTES:
            return
        try:
            replies = self.answer(datagram, source)
        except MdnsDecodeError as exc:
            self._quiet.debug(source[0], "mDNS: ignored a malformed packet from %s: %s",
                              source[0], exc)
            return
        except Exception as exc:  # a bug met by one packet must not stop the others
            self._quiet.warning(repr(exc), "mDNS: a packet from %s could not be handled: %r",
                                source[0], exc)
            return
        for reply in replies:
            if reply.delay_s > 0:
                self._schedule(reply.delay_s, self._send, reply.packet, reply.destination,
                               reply.link)
            else:
                self._send(reply.packet, reply.destination, reply.link)

    def _send(self, packet, destination, link):
        try:
            if destination[0] == self.group:
                send_multicast(self._sock, packet, destination, link)
            else:
                self._sock.sendto(packet, destination)
        except OSError as exc:
            self._quiet.warning((link.name, exc.errno), "mDNS: cannot send on %s (%s): %s",
                                link.name, link.address, exc)

    # timers: a small heap run by the thread; a rename makes older ones stale

    def _schedule(self, delay_s, function, *args, lasting=False):
        """Run ``function`` on the thread after ``delay_s``; a rename drops the
        pending ones unless ``lasting``."""
        generation = None if lasting else self._generation
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(_timer_sequence),
                                      generation, function, args))

    def _next_timer_in(self):
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due_timers(self):
        while self._timers and self._timers[0][0] <= time.monotonic():
            _, _, generation, function, args = heapq.heappop(self._timers)
            if generation is None or generation == self._generation:
                function(*args)

    def _start_probing(self, delay_s):
        self._generation += 1
        self.state = "waiting"
        self._probes_sent, self._conflict_probes = 0, {}
        if not self.defending:
            self._announced_event.clear()
        self._schedule(delay_s, self._probe, 0)

    def _probe(self, count):
        """Ask whether anyone else uses our names (section 8.1): QU/ANY
        questions, our proposed records in the authority section."""
        self.state = "probing"
        if count == MDNS_PROBES:
            return self._announce(0)
        self._probes_sent = count + 1  # claims from now on follow this probe
        for link in self.service.interfaces():
            records = self.service.records(link)
            query = Message(0, 0, [Question(self.service.instance_name, DNS_ANY, True),
                                   Question(self.service.host_name, DNS_ANY, True)],
                            [], [records["srv"], records["txt"]] + records["a"], [])
            self._send(encode_message(query), (self.group, self.port), link)
        self._schedule(self.timings.probe_interval_s, self._probe, count + 1)

    def _announce(self, count):
        if count == 0:
            self.state, self.defending = "announced", False
            log.info("mDNS: announced as %s on %s", self.service.instance,
                     ", ".join("%s (%s)" % (l.name, l.address) for l in self.service.interfaces()))
            self._announced_event.set()
        now = time.monotonic()
        for link in self.service.interfaces():
            records = self.service.records(link)
            answers = [records[kind] for kind in ("types", "ptr", "srv", "txt")] + records["a"]
            self.answers.multicast(answers, link, now)
            self._send(response_packet(answers, [records["nsec"]]), (self.group, self.port), link)
        if count < len(self.timings.announce_gaps_s):
            self._schedule(self.timings.announce_gaps_s[count], self._announce, count + 1)

    def _goodbye_packets(self):
        """Every record with TTL 0, so browsers drop us at once (section 10.1)."""
        packets = []
        for link in self.service.interfaces():
            records = self.service.records(link, ttl=0)
            answers = [records["ptr"], records["srv"], records["txt"]] + records["a"]
            packets.append((response_packet(answers, []), link))
        return packets

    def _send_goodbyes(self, copies):
        packets = self._goodbye_packets()
        for copy in range(copies):
            if copy:
                time.sleep(self.timings.goodbye_gap_s)  # on our own thread, at most 0.2 s
            self._send_all(packets)

    def _send_all(self, packets):
        for packet, link in packets:
            self._send(packet, (self.group, self.port), link)

    def _refresh_links(self):
        """Follow laptops that change networks: rejoin and re-announce when the
        addresses changed (RFC 6762 section 8.4)."""
        self._schedule(self.timings.refresh_s, self._refresh_links, lasting=True)
        links = network_links()
        if sorted(links) == sorted(self.service.links):
            return
        for link in links:
            if link.name not in {l.name for l in self.service.links}:
                with contextlib.suppress(OSError):
                    join_group(self._sock, self.group, link)
        log.info("mDNS: the network addresses changed; announcing again")
        self.service.links = links
        if self.state == "announced":
            self._generation += 1
            self._announce(0)


class MdnsUnavailable(GambiarraError):
    """mDNS cannot run here; the message says why."""


class QuietLog:
    """Logs a message once per key (a source address, an interface), so a noisy
    network cannot flood the hub's log."""

    def __init__(self, limit=256):
        self._seen, self._limit = set(), limit

    def _first(self, key):
        if key in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add(key)
        return True

    def debug(self, key, message, *args):
        if self._first(("debug", key)):
            log.debug(message, *args)

    def warning(self, key, message, *args):
        if self._first(("warning", key)):
            log.warning(message, *args)


_timer_sequence = itertools.count()


def response_packet(answers, additionals):
    """A multicast-style response: ID 0, QR and AA set, no questions."""
    return encode_message(Message(0, DNS_FLAG_RESPONSE | DNS_FLAG_AUTHORITATIVE, [],
                                  answers, [], additionals))


def select_readable(socks, timeout):
    """select() for reading that also tolerates a socket closed meanwhile."""
    try:
        return select.select(socks, [], [], timeout)
    except (OSError, ValueError):
        return [], [], []


def _flatten(items):
    flat = []
    for item in items:
        flat += item if isinstance(item, list) else [item]
    return flat


def _unique(records):
    seen, unique = set(), []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


# --- the browser: how the CLI finds hubs ---

FoundHub = collections.namedtuple("FoundHub", "name host port addresses txt url")
#: A TXT "path" that cannot turn the URL into another host's ("@evil.example").
SAFE_URL_PATH = re.compile(r"^/[A-Za-z0-9/._~-]*$")


class HubCollector:
    """Pieces together hubs from the records of any number of responses, each
    machine's apart: what one machine sends -- a goodbye included -- only adds
    to or takes from what that same machine claimed. Without this, a rogue's
    goodbye for the real hub left the rogue the only hub to pick (issue 10).
    A machine is a source address; our own addresses are one machine (a hub
    here answers over loopback and over the LAN)."""

    def __init__(self, own_addresses=()):
        self.own_addresses = set(own_addresses)
        self.machines = {}  # source address, or "this machine" -> MachineClaims

    @property
    def instances(self):
        return [key for claims in self.machines.values() for key in claims.instances]

    def add(self, message, source):
        machine = "this machine" if source[0] in self.own_addresses else source[0]
        if machine not in self.machines:
            self.machines[machine] = MachineClaims()
        self.machines[machine].add(message, source)

    def hubs(self):
        """Every hub claimed, sorted by name. The same name claimed by two
        machines gives two entries (unless both lead to the same URL): the
        caller must not choose between them by itself -- see same_name()."""
        found = {(hub.name.lower(), hub.url): hub
                 for claims in self.machines.values() for hub in claims.hubs()}
        return sorted(found.values(), key=lambda hub: (hub.name.lower(), hub.url))


def same_name(hubs):
    """The names that more than one of ``hubs`` claims: one of them may be
    pretending to be the other."""
    counts = collections.Counter(hub.name.lower() for hub in hubs)
    return sorted({hub.name for hub in hubs if counts[hub.name.lower()] > 1})


class MachineClaims:
    """The hubs one machine claims, pieced together from its records."""

    def __init__(self):
        self.instances = {}   # instance name (lower) -> name as sent
        self.sources = collections.defaultdict(list)
        self.srv, self.txt = {}, {}
        self.addresses = collections.defaultdict(list)

    def add(self, message, source):
        for record in message.answers + message.additionals:
            name = record.name.lower()
            if record.type == DNS_PTR and name == MDNS_SERVICE_TYPE.lower():
                self._instance(record, source)
            elif record.ttl == 0:
                continue
            elif record.type == DNS_SRV:
                self.srv[name] = record.data
            elif record.type == DNS_TXT:
                self.txt[name] = record.data
            elif record.type == DNS_A and record.data not in self.addresses[name]:
                self.addresses[name].append(record.data)

    def _instance(self, record, source):
        key = record.data.lower()
        if record.ttl == 0:  # a goodbye
            self.instances.pop(key, None)
            return
        self.instances.setdefault(key, record.data)
        if source[0] not in self.sources[key]:
            self.sources[key].append(source[0])

    def hubs(self):
        found = []
        for key, name in self.instances.items():
            if key not in self.srv:
                continue
            _, _, port, target = self.srv[key]
            addresses = self.addresses.get(target.lower(), [])
            txt = txt_fields(self.txt.get(key, ()))
            address = best_address(addresses, self.sources[key])
            path = txt.get("path", "/")
            path = path.rstrip("/") if SAFE_URL_PATH.match(path) else ""
            url = "http://%s:%d%s" % (address, port, path) if address else None
            found.append(FoundHub(instance_label(name), target, port, addresses, txt, url))
        return sorted((hub for hub in found if hub.url), key=lambda hub: hub.name.lower())


def best_address(addresses, sources):
    """The address to call a hub at: one that sent us its answer (so we know it
    is reachable) and that others could use too (not loopback) comes first."""
    candidates = list(addresses) + [s for s in sources if s not in addresses]
    if not candidates:
        return None
    return min(candidates, key=lambda a: (a.startswith("127."), a not in sources,
                                          candidates.index(a)))


def discover_hubs(timeout_s=None, settle_s=None, port=None, group=MDNS_GROUP, links=None,
                  listen=True):
    """Hubs that answer a DNS-SD query within ``timeout_s`` (or ``settle_s``
    after the first answer). The query is one-shot from a port of our own, so
    no 5353 is needed; with ``listen``, 5353 is also watched for multicast
    answers (the original TypeScript hub answers only those)."""
    search = HubSearch(MDNS_PORT if port is None else port, group,
                       network_links() if links is None else links, listen)
    try:
        return search.run(MDNS_BROWSE_S if timeout_s is None else timeout_s, settle_s)
    finally:
        search.close()


class HubSearch:
    """One search: a one-shot query out of every interface, asked again after
    a second if nobody answered, and the answers pieced together."""

    def __init__(self, port, group, links, listen):
        self.port, self.destination, self.links = port, (group, port), links
        self.query_id = random.randint(1, 0xFFFF)
        self.query = encode_message(Message(
            self.query_id, 0, [Question(MDNS_SERVICE_TYPE, DNS_PTR, False)], [], [], []))
        self.collector = HubCollector(link.address for link in links)
        self.asker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener = _passive_listener(port, links, group) if listen else None

    def run(self, timeout_s, settle_s=None):
        self.asker.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 255))
        self._ask()
        start = time.monotonic()
        deadline, ask_again_at = start + timeout_s, start + MDNS_BROWSE_RETRY_S
        while True:
            now = time.monotonic()
            if ask_again_at is not None and now >= ask_again_at:
                if not self.collector.instances:  # a lost datagram, or a hub still probing
                    self._ask()
                ask_again_at = None
            if now >= deadline:
                return self.collector.hubs()
            sockets = [sock for sock in (self.asker, self.listener) if sock is not None]
            for sock in select_readable(sockets, min(deadline, ask_again_at or deadline) - now)[0]:
                self._read(sock)
            if settle_s is not None and self.collector.hubs():
                deadline = min(deadline, time.monotonic() + settle_s)
                settle_s = None

    def _ask(self):
        """Send the query out of every interface, loopback included, so a hub
        on this machine is found even with Wi-Fi off."""
        for link in one_link_per_interface(self.links):
            try:
                send_multicast(self.asker, self.query, self.destination, link)
            except OSError as exc:
                log.debug("mDNS: cannot query on %s: %s", link.name, exc)

    def _read(self, sock):
        """Take one datagram if it answers us: on our own port, a reply to our
        query ID (RFC 6762 section 6); on the mDNS port, a response from it."""
        try:
            datagram, source = sock.recvfrom(MDNS_MAX_PACKET_BYTES + 1)
            message = decode_message(datagram)
        except (OSError, MdnsDecodeError):
            return
        if not message.flags & DNS_FLAG_RESPONSE or message.flags & DNS_OPCODE_MASK:
            return
        ours = message.id == self.query_id if sock is self.asker else source[1] == self.port
        if ours:
            self.collector.add(message, source)

    def close(self):
        self.asker.close()
        if self.listener is not None:
            self.listener.close()


def _passive_listener(port, links, group):
    try:
        return open_mdns_socket(port, links, group)[0]
    except OSError as exc:
        log.debug("mDNS: not listening on port %d: %s", port, exc)
        return None


# === Participant agent ===
#
# What `gambiarra.py join` runs on a participant's machine: find the local LLM
# server, join a room, heartbeat, and (by default) serve the hub's requests
# through the tunnel, so the local server never has to listen on the network.

#: Local servers probed when `join` has no --endpoint, in this order.
LOCAL_SERVERS = ((11434, "Ollama"), (1234, "LM Studio"), (8080, "LocalAI/llama.cpp"),
                 (8000, "vLLM"))
#: Time one probe of a local port may take (connect and answer).
LOCAL_PROBE_TIMEOUT_S = 0.5
#: Time an explicit --endpoint may take to list its models.
LOCAL_MODELS_TIMEOUT_S = 5.0
#: Time one management call to the hub (join, health, leave) may take.
HUB_CALL_TIMEOUT_S = 10.0
#: Retry delays of an agent that cannot reach its hub or room: doubled up to the max.
AGENT_BACKOFF_MIN_S = 1.0
AGENT_BACKOFF_MAX_S = 30.0
#: How long a stopping agent lets requests in flight finish before leaving.
AGENT_DRAIN_S = 5.0
#: Time nvidia-smi may take to describe the GPUs.
NVIDIA_SMI_TIMEOUT_S = 2.0


def open_http(parts, timeout):
    """An http.client connection for a urlsplit() result (http or https)."""
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout)


def _get_json(parts, path, timeout):
    """GET a JSON document; None when the answer is not 200 JSON. Raises OSError
    (or http.client.HTTPException) when nothing answers HTTP."""
    conn = open_http(parts, timeout)
    try:
        conn.request("GET", parts.path + path)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # a server's answer is not trusted
            return None
    finally:
        conn.close()


def list_local_models(url, timeout):
    """The model names a local server lists: Ollama's /api/tags, else the OpenAI
    /v1/models. None when it answers HTTP but lists nothing we understand;
    OSError when it does not answer at all."""
    parts = urllib.parse.urlsplit(url)
    try:
        tags = _get_json(parts, "/api/tags", timeout)
        if isinstance(tags, dict) and isinstance(tags.get("models"), list):
            return [m["name"] for m in tags["models"] if isinstance(m, dict) and "name" in m]
        listing = _get_json(parts, "/v1/models", timeout)
    except http.client.HTTPException as exc:
        raise OSError("not an HTTP server (%s)" % exc.__class__.__name__)
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        return [m["id"] for m in listing["data"] if isinstance(m, dict) and "id" in m]
    return None


def discover_local_server(servers=LOCAL_SERVERS, timeout=LOCAL_PROBE_TIMEOUT_S):
    """(url, models) of the first local server that answers on 127.0.0.1."""
    for port, _name in servers:
        url = "http://127.0.0.1:%d" % port
        try:
            return url, list_local_models(url, timeout)
        except OSError:
            continue
    tried = ", ".join("%d (%s)" % server for server in servers)
    raise GambiarraError("no local LLM server found on 127.0.0.1 ports %s. Start one (for "
                         "Ollama: 'ollama serve') or pass --endpoint URL" % tried)


def local_server(endpoint):
    """(url, models) of --endpoint, or of the server found by probing."""
    if endpoint is None:
        return discover_local_server()
    try:
        url = normalize_endpoint(endpoint)
    except ApiError:
        raise GambiarraError("--endpoint must be an http:// URL like http://127.0.0.1:11434, "
                             "not %r" % endpoint)
    try:
        return url, list_local_models(url, LOCAL_MODELS_TIMEOUT_S)
    except OSError as exc:
        raise GambiarraError("no LLM server answers at %s (%s). Start it, or fix --endpoint"
                             % (url, exc))


def choose_model(requested, models, url):
    """The served model name to register: ``requested`` as the server names it
    ("llama3" finds "llama3:latest"), or the only model served."""
    if requested and models is None:
        return requested  # the server does not list its models: trust the user
    if not models:
        raise GambiarraError("the server at %s lists no models. Load or pull one (for Ollama: "
                             "'ollama pull llama3'), or pass --model NAME" % url)
    if requested is None:
        if len(models) == 1:
            return models[0]
        raise GambiarraError("the server at %s serves several models: %s. Pick one with "
                             "--model NAME" % (url, ", ".join(models)))
    for served in models:
        if model_matches(requested, served):
            return served
    raise GambiarraError("the server at %s does not serve %r; it serves: %s"
                         % (url, requested, ", ".join(models)))


def is_loopback(url):
    """True when ``url`` names this machine only (127.x, localhost, ::1)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.") \
        or host.endswith(".localhost")


def refuse_loopback_for_direct(url):
    """--direct makes the hub call the endpoint itself: a loopback address would
    make it call its own machine, so say what to do instead."""
    if not is_loopback(url):
        return
    parts = urllib.parse.urlsplit(url)
    addresses = local_ipv4_addresses()
    example = "http://%s:%d" % (addresses[0] if addresses else "YOUR-LAN-IP", parts.port or 80)
    raise GambiarraError("--direct registers %s for the hub to call, but on the hub that "
                         "address is the hub's own machine. Drop --direct to use the tunnel "
                         "(the default), or pass --endpoint %s with your server listening on "
                         "the network" % (url, example))


def collect_specs():
    """What the OS tells cheaply about this machine; unknown values are left out."""
    import platform  # here: only the agent needs it
    specs = {"cpu": _cpu_name() or platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "ramGb": _ram_gb(), "os": platform.system()}
    specs.update(_nvidia_gpu())
    return {key: value for key, value in specs.items() if value}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _ram_gb():
    """Total memory in GiB, one decimal: /proc/meminfo, else sysconf (macOS, BSD)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_gpu():
    """{"gpu", "vramGb"} of the first NVIDIA GPU, or {} without nvidia-smi."""
    import shutil
    import subprocess
    command = shutil.which("nvidia-smi")
    if command is None:
        return {}
    try:
        out = subprocess.run([command, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=NVIDIA_SMI_TIMEOUT_S, universal_newlines=True).stdout
        name, memory = out.splitlines()[0].rsplit(",", 1)
        return {"gpu": name.strip(), "vramGb": round(int(memory.split()[0]) / 1024, 1)}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


class Backoff:
    """Capped exponential retry delays: min, 2 x min, ... max, until reset()."""

    def __init__(self, min_s, max_s):
        self.min_s, self.max_s = min_s, max_s
        self.delay_s = min_s

    def next(self):
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_s)
        return delay

    def reset(self):
        self.delay_s = self.min_s


class HubClient:
    """JSON calls to a hub's management routes, answering (status, payload)
    instead of raising on 4xx, because the agent acts on 404 and 401."""

    def __init__(self, url):
        self.url = url.rstrip("/")
        self.parts = urllib.parse.urlsplit(self.url)
        if self.parts.scheme not in ("http", "https") or not self.parts.hostname:
            raise GambiarraError("--hub must be a URL like http://192.168.1.20:3000, not %r"
                                 % url)

    def connection(self, timeout=HUB_CALL_TIMEOUT_S):
        return open_http(self.parts, timeout)

    def path(self, path):
        return self.parts.path.rstrip("/") + path

    def call(self, method, path, body=None, secret=None, timeout=HUB_CALL_TIMEOUT_S,
             password=None):
        """One request; OSError when the hub cannot be reached."""
        headers = dict({"Content-Type": "application/json"}, **bearer_header(password))
        if secret:
            headers["X-Gambiarra-Secret"] = secret
        conn = self.connection(timeout)
        try:
            conn.request(method, self.path(path), headers=headers,
                         body=json_bytes(body) if body is not None else None)
            response = conn.getresponse()
            return response.status, _json_or_empty(response.read())
        except http.client.HTTPException as exc:
            raise OSError("bad answer from the hub (%s)" % exc.__class__.__name__)
        finally:
            conn.close()


def bearer_header(password):
    """The room password as a Bearer header, in UTF-8 bytes: http.client would
    encode a str as latin-1, and the hub compares the password's UTF-8 bytes."""
    return {"Authorization": b"Bearer " + password.encode("utf-8")} if password else {}


def _json_or_empty(data):
    """A hub's JSON object answer, or {}: a hub (maybe a rogue one found by
    mDNS) that answers garbage or absurdly deep JSON gets no traceback."""
    try:
        answer = json.loads(data.decode("utf-8")) if data else {}
    except (ValueError, RecursionError):
        return {}
    return answer if isinstance(answer, dict) else {}


def quote_segment(text):
    return urllib.parse.quote(text, safe="")


class Agent:
    """A participant that stays in a room: it joins, heartbeats, re-joins by
    itself when the hub forgot it (a restarted hub), retries with backoff when
    the hub is unreachable, and with ``transport`` "tunnel" serves the hub's
    requests from ``local_url`` on ``maxConcurrent`` long-polling threads.

    ``fields`` is the join body without the password and secret. Timings are
    parameters so that tests run in milliseconds.
    """

    def __init__(self, hub_url, code, fields, local_url, password=None,
                 poll_wait_s=TUNNEL_POLL_S, backoff_min_s=AGENT_BACKOFF_MIN_S,
                 backoff_max_s=AGENT_BACKOFF_MAX_S, drain_s=AGENT_DRAIN_S,
                 local_timeout_s=DEFAULT_BACKEND_TIMEOUT_S):
        self.hub = HubClient(hub_url)
        self.code = code.upper()
        self.fields = dict(fields)
        self.local = urllib.parse.urlsplit(normalize_endpoint(local_url))
        self.password = password
        self.poll_wait_s, self.drain_s = poll_wait_s, drain_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.local_timeout_s = local_timeout_s
        self.health_interval_s = DEFAULT_HEALTH_INTERVAL_S
        # _lock guards _secret, _generation, _in_flight, _polls, _locals, _troubles,
        # _refused.
        self._lock = threading.Lock()
        self._join_lock = threading.Lock()  # one (re-)join at a time
        self._secret = None
        self._generation = 0  # joins so far; a re-join answers one failure only
        self._in_flight = 0
        self._polls = set()  # hub connections in a long poll
        self._locals = set()  # local server connections serving a request
        self._troubles = set()  # kinds of failure reported and not yet over
        self._refused = set()  # paths the hub asked for that were refused (logged once)
        self._stopping = threading.Event()
        self._threads = []
        self._left = False

    @property
    def id(self):
        return self.fields["id"]

    @property
    def tunnelled(self):
        return self.fields.get("transport") == "tunnel"

    # -- lifecycle --

    def start(self):
        """Join (GambiarraError with a message for people if that fails), then
        heartbeat and serve in daemon threads."""
        self._join()
        log.info("joined room %s as %s serving %s (%s) via %s", self.code,
                 printable(self.fields["nickname"]), printable(self.fields["model"]),
                 urllib.parse.urlunsplit(self.local), self.fields.get("transport", "direct"))
        self._spawn("agent-heartbeat", self._heartbeat_loop)
        if self.tunnelled:
            for number in range(self.fields.get("maxConcurrent", DEFAULT_MAX_CONCURRENT)):
                self._spawn("agent-tunnel-%d" % number, self._worker_loop)
        return self

    def _spawn(self, name, target):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self):
        """Stop polling, let requests in flight finish (at most ``drain_s``),
        then leave the room. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()  # before _abort takes the lock: see _register_poll
        self._abort(self._polls)
        if not self._drained(self.drain_s):
            log.warning("requests still running after %g s; cutting them off", self.drain_s)
            self._abort(self._locals)
        self._leave()

    def close(self):
        """stop(), and wait (bounded) for every thread of the agent."""
        self.stop()
        for thread in self._threads:
            thread.join(self.drain_s + HUB_CALL_TIMEOUT_S)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def _abort(self, connections):
        """Shut down the sockets of these connections, waking their readers."""
        with self._lock:
            sockets = [conn.sock for conn in connections if conn.sock is not None]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drained(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight:
                    return True
            time.sleep(0.02)
        with self._lock:
            return not self._in_flight

    def _leave(self):
        with self._lock:
            secret = self._secret
        try:
            status, answer = self.hub.call(
                "DELETE", "/rooms/%s/leave/%s" % (self.code, quote_segment(self.id)),
                secret=secret)
        except OSError as exc:
            log.warning("could not tell the hub at %s that %s left (%s)", self.hub.url,
                        self.id, exc)
            return
        self._left = status == 200
        if status not in (200, 404):
            log.warning("the hub refused the leave of %s: %s", self.id, answer.get("error"))

    # -- joining --

    def _join(self):
        """POST join; keep the secret and heartbeat interval it answers."""
        body = dict(self.fields)
        with self._lock:
            if self._secret:
                body["secret"] = self._secret
        if self.password:
            body["password"] = self.password
        try:
            status, answer = self.hub.call("POST", "/rooms/%s/join" % quote_segment(self.code),
                                           body)
        except OSError as exc:
            raise GambiarraError("cannot reach the hub at %s (%s). Is it running? Check --hub"
                                 % (self.hub.url, exc))
        if status != 201 or "secret" not in answer:
            raise GambiarraError(self._join_refusal(status, answer.get("error")))
        with self._lock:
            self._secret = answer["secret"]
            self._generation += 1
        interval_ms = answer.get("healthInterval")
        if isinstance(interval_ms, (int, float)) and interval_ms > 0:
            self.health_interval_s = interval_ms / 1000.0

    def _join_refusal(self, status, message):
        if status == 404:
            return ("room %s does not exist on the hub at %s. Check the code, or list the "
                    "rooms: python3 gambiarra.py list --hub %s" % (self.code, self.hub.url,
                                                                  self.hub.url))
        if status == 401 and message == "Invalid password":
            return ("wrong password for room %s. Pass the room's password with --password "
                    "or $GAMBIARRA_PASSWORD" % self.code)
        return "the hub at %s refused to join room %s (%s): %s" % (
            self.hub.url, self.code, status, message or "no reason given")

    def _rejoin(self, generation):
        """Join again with the same id after the hub forgot us; True when in the
        room again. Several threads may notice at once: one re-joins."""
        with self._join_lock:
            with self._lock:
                if self._generation != generation:
                    return True
            try:
                self._join()
            except GambiarraError as exc:
                self._trouble("rejoin", "cannot re-join room %s yet (%s); retrying"
                              % (self.code, exc))
                return False
        self._recovered("rejoin", None)
        log.warning("the hub had forgotten %s (restarted?); re-joined room %s",
                    printable(self.id), self.code)
        return True

    def _credentials(self):
        with self._lock:
            return self._secret, self._generation

    # -- reporting a failure once --

    def _trouble(self, kind, message):
        """Log ``message`` at the start of a failure of this kind only."""
        with self._lock:
            first = kind not in self._troubles
            self._troubles.add(kind)
        if first:
            log.warning("%s", message)

    def _recovered(self, kind, message):
        with self._lock:
            was_failing = kind in self._troubles
            self._troubles.discard(kind)
        if was_failing and message:
            log.info("%s", message)

    def _hub_unreachable(self, exc):
        self._trouble("hub", "cannot reach the hub at %s (%s); retrying every %g s at most"
                      % (self.hub.url, exc, self.backoff_max_s))

    # -- heartbeats --

    def _heartbeat_loop(self):
        backoff = Backoff(self.backoff_min_s, self.backoff_max_s)
        delay = self.health_interval_s
        while not self._stopping.wait(delay):
            if self._heartbeat():
                backoff.reset()
                delay = self.health_interval_s
            else:
                delay = backoff.next()

    def _heartbeat(self):
        """One heartbeat; True when the hub knows us (after a re-join if needed)."""
        secret, generation = self._credentials()
        try:
            status, answer = self.hub.call("POST", "/rooms/%s/health" % self.code,
                                           {"id": self.id}, secret=secret)
        except OSError as exc:
            self._hub_unreachable(exc)
            return False
        self._recovered("hub", "the hub at %s answers again" % self.hub.url)
        if status == 404:
            return self._rejoin(generation)
        if status != 200:
            self._trouble("health", "the hub refused a heartbeat (%d): %s"
                          % (status, answer.get("error")))
            return False
        self._recovered("health", None)
        return True

    # -- the tunnel --

    def _worker_loop(self):
        """Long-poll for a request, serve it, again; back off while the hub fails."""
        backoff = Backoff(self.backoff_min_s, self.backoff_max_s)
        while not self._stopping.is_set():
            job, healthy = self._poll()
            if job is not None:
                self._serve(job)
            if healthy:
                backoff.reset()
            else:
                self._stopping.wait(backoff.next())

    def _poll(self):
        """One long poll: (job or None, whether the hub answered as expected)."""
        secret, generation = self._credentials()
        conn = self.hub.connection(self.poll_wait_s + HUB_CALL_TIMEOUT_S)
        try:
            if not self._register_poll(conn):
                return None, True
            conn.request("GET", self.hub.path("/rooms/%s/tunnel/%s?wait=%g&accept=1" % (
                self.code, quote_segment(self.id), self.poll_wait_s)),
                headers={"X-Gambiarra-Secret": secret or ""})
            response = conn.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            if not self._stopping.is_set():
                self._hub_unreachable(exc)
            return None, self._stopping.is_set()
        finally:
            with self._lock:
                self._polls.discard(conn)
            conn.close()
        return self._poll_answer(status, data, generation)

    def _register_poll(self, conn):
        """Connect, and list the connection for stop() to abort; False when
        stopping. Under the lock, so that stop() either sees this connection
        with its socket or this check sees stop()."""
        conn.connect()
        with self._lock:
            if self._stopping.is_set():
                return False
            self._polls.add(conn)
        return True

    def _poll_answer(self, status, data, generation):
        self._recovered("hub", "the hub at %s answers again" % self.hub.url)
        if status == 200:
            job = TunnelJob.parse(data)
            if job is not None:
                return job, True
            self._trouble("job", "the hub sent a request this agent cannot read; skipped")
            return None, True
        if status == 204:
            return None, True
        if status == 404:
            return None, self._rejoin(generation)
        self._trouble("poll", "the hub refused a tunnel poll (%d): %s"
                      % (status, _json_or_empty(data).get("error")))
        return None, False

    def _serve(self, job):
        """Answer one request (a thread boundary: a bug must not end the worker)."""
        with self._lock:
            self._in_flight += 1
        try:
            self._answer(job)
        except Exception:
            log.exception("serving request %s failed", printable(job.id))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, job):
        """Confirm the job to the hub, then ask the local server and stream its
        answer up. A job the hub no longer wants (its client left, or this
        agent took too long: it was frozen, or its network was gone) is
        dropped before the local server spends any time on it."""
        if job.path not in RELAYED_PATHS:
            self._refuse(job)
            return
        upload = self._confirm(job) if job.confirm else None
        if job.confirm and upload is None:
            return
        local = open_http(self.local, self.local_timeout_s)
        with self._lock:
            self._locals.add(local)
        try:
            answer = self._ask_local(local, job) or self._local_answer(local)
            if upload is not None and not still_open(upload):
                upload.close()  # an older hub closed it as idle: the answer takes a new one
                upload = None
            if isinstance(answer, Exception):
                self._local_failed(answer)
                self._upload_error(job, "the participant's server at %s failed: %s"
                                   % (urllib.parse.urlunsplit(self.local), answer), upload)
                return
            self._recovered("local", "the local server at %s answers again"
                            % urllib.parse.urlunsplit(self.local))
            self._upload(job, answer, upload)
        finally:
            with self._lock:
                self._locals.discard(local)
            local.close()  # also after a 410: the local server stops generating
            if upload is not None:
                upload.close()

    def _refuse(self, job):
        """Never send the local server a path outside RELAYED_PATHS (exact
        match: no query, no "..", no %-escapes, no absolute URL); tell the hub
        at once, so its client gets a 502 instead of waiting. Each path is
        logged once as a warning (a rogue hub could repeat it endlessly)."""
        path = printable(job.path[:200])
        with self._lock:
            first = path not in self._refused and len(self._refused) < 64
            if first:
                self._refused.add(path)
        (log.warning if first else log.debug)(
            "refused a request of the hub at %s for %s: this agent forwards only %s to its "
            "server", self.hub.url, path, ", ".join(RELAYED_PATHS))
        self._upload_error(job, "the participant's agent refused the path %s: it forwards "
                                "only %s" % (path, ", ".join(RELAYED_PATHS)))

    def _ask_local(self, local, job):
        """Send the job to the local server: None, or the exception it raised."""
        headers = {"Content-Type": "application/json"}
        if job.via:
            headers["Via"] = job.via  # so a local "server" that is a hub sees the loop
        try:
            local.request("POST", self.local.path + job.path, body=job.body, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            return exc
        return None

    @staticmethod
    def _local_answer(local):
        """The local server's answer (its head), or the exception it raised."""
        try:
            return local.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            return exc

    def _confirm(self, job):
        """Tell the hub this agent starts on the job, on a new connection that
        then carries the answer; None when the hub no longer wants the job
        (or cannot be reached)."""
        secret, _ = self._credentials()
        conn = None
        try:
            conn = self._upload_connection()
            conn.request("POST", self._answer_path(job) + "/accept", body=b"",
                         headers={"X-Gambiarra-Secret": secret or "", "Content-Length": "0"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._hub_unreachable(exc)
            response = None
        if response is not None and response.status == 200:
            return conn
        if response is not None:
            log.debug("the hub no longer wants %s (%d)", printable(job.id), response.status)
        if conn is not None:
            conn.close()
        return None

    def _local_failed(self, exc):
        self._trouble("local", "the local server at %s failed (%s); its requests fail until "
                               "it is back" % (urllib.parse.urlunsplit(self.local), exc))

    def _answer_path(self, job):
        return self.hub.path("/rooms/%s/tunnel/%s/%s" % (
            self.code, quote_segment(self.id), quote_segment(job.id)))

    def _upload_connection(self):
        conn = self.hub.connection(HUB_CALL_TIMEOUT_S)
        conn.connect()
        # Each piece is one small write: without this, Nagle delays every token.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _upload(self, job, answer, conn=None):
        """Stream the local answer to the hub piece by piece, as it arrives."""
        secret, _ = self._credentials()
        headers = {"X-Gambiarra-Secret": secret or "", "Transfer-Encoding": "chunked",
                   "X-Gambiarra-Status": str(answer.status),
                   "Content-Type": answer.getheader("Content-Type") or "application/json"}
        self._send_upload(job, headers, _pieces_of(answer), conn, encode_chunked=True)

    def _upload_error(self, job, message, conn=None):
        secret, _ = self._credentials()
        headers = {"X-Gambiarra-Secret": secret or "", "Content-Length": "0",
                   "X-Gambiarra-Error": message.encode("ascii", "replace").decode("ascii")}
        self._send_upload(job, headers, b"", conn)

    def _send_upload(self, job, headers, body, conn=None, encode_chunked=False):
        """POST the answer on ``conn`` (the job's accept connection) or a new one."""
        if conn is None:
            try:
                conn = self._upload_connection()
            except OSError as exc:
                self._hub_unreachable(exc)
                return
        try:
            conn.request("POST", self._answer_path(job), body=body, headers=headers,
                         encode_chunked=encode_chunked)
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            # The hub closes the upload when the client went away (410).
            log.debug("upload of %s ended early: %s", printable(job.id), exc)
            return
        finally:
            conn.close()
        if status == 410:
            log.debug("the client of %s went away", printable(job.id))
        elif status != 200:
            log.debug("the hub answered %d to the upload of %s", status, printable(job.id))


class TunnelJob:
    """A request the hub handed to this agent through a poll."""

    __slots__ = ("id", "path", "via", "confirm", "body")

    def __init__(self, call_id, path, via, confirm, body):
        self.id, self.path, self.via, self.confirm, self.body = call_id, path, via, confirm, body

    @classmethod
    def parse(cls, data):
        """The job in a poll's answer, its body as the hub sent it; None if unreadable."""
        try:
            job = JsonBody(data)
        except ApiError:
            return None
        fields, body = job.fields, job.raw_value("body")
        call_id, path, via = fields.get("requestId"), fields.get("path"), fields.get("via")
        if not isinstance(call_id, str) or not isinstance(path, str) or body is None:
            return None
        if not isinstance(via, str) or not _HEADER_TEXT.match(via):
            via = None
        return cls(call_id, path, via, fields.get("accept") is True, body)


def still_open(conn):
    """Whether a kept-alive connection can carry the next request (the other
    side has not closed it)."""
    return conn.sock is not None and not has_pending_input(conn.sock)


def _pieces_of(response):
    """The body of an http.client response as the pieces that arrive. A body
    cut short raises IncompleteRead: http.client's read1 ends a Content-Length
    body that stops early as if it were whole, and the hub must not relay a
    truncated answer as a complete one."""
    while True:
        data = response.read1(RELAY_READ_BYTES)
        if not data:
            if not response.chunked and response.length:
                raise http.client.IncompleteRead(b"", response.length)
            return
        yield data


# === CLI ===

EPILOG_JOIN = """examples:
  python3 gambiarra.py join XK7P2M --hub http://192.168.1.20:3000   # finds Ollama & co.
  python3 gambiarra.py join XK7P2M --model llama3 --password   # asks for the password
  python3 gambiarra.py join XK7P2M --direct --endpoint http://192.168.1.50:11434

By default the hub reaches your server through a tunnel that this command keeps
open, so your server can stay on 127.0.0.1. Without --hub (or $GAMBIARRA_HUB)
the hub is found on the local network by mDNS. Ctrl-C leaves the room.
"""

EPILOG_SERVE = """examples:
  python3 gambiarra.py serve                    # port 3000 on every interface
  python3 gambiarra.py serve --mdns             # and found on the network: no --hub needed
  python3 gambiarra.py serve --port 8000 --quiet
  python3 gambiarra.py serve --health-interval 2 --backend-timeout 60
"""


EPILOG_CREATE = """examples:
  python3 gambiarra.py create "Hackathon" --hub http://192.168.1.20:3000
  python3 gambiarra.py create "Lab" --password   # a protected room: asks for its password
  python3 gambiarra.py create --json                            # the hub's whole answer
"""

EPILOG_LIST = """examples:
  python3 gambiarra.py list --hub http://192.168.1.20:3000
  python3 gambiarra.py list --password   # asks, then also shows protected rooms
  python3 gambiarra.py list --json | jq '.rooms[].participants'
"""

EPILOG_CHAT = """examples:
  python3 gambiarra.py chat XK7P2M "Say hello in Portuguese"
  python3 gambiarra.py chat XK7P2M "2+2?" --model llama3 --password -   # asks for it
  python3 gambiarra.py chat XK7P2M "hi" --json      # {"model": ..., "content": ...}

Exits 1 with one line on stderr when the room is unknown, the password is wrong,
no participant serves the model, or the answer is cut short (the stream ends
without [DONE]): what was already printed stays, but it is not the whole answer.
"""

EPILOG_MONITOR = """examples:
  python3 gambiarra.py monitor XK7P2M               # one room
  python3 gambiarra.py monitor                      # every room, lines start with the code
  python3 gambiarra.py monitor XK7P2M --json        # one JSON object per line

Reconnects by itself when the hub restarts. Ctrl-C stops.
"""

EPILOG_DISCOVER = """examples:
  python3 gambiarra.py discover                 # one URL per line
  python3 gambiarra.py discover --json          # name, addresses, port and TXT of each
  export GAMBIARRA_HUB=$(python3 gambiarra.py discover | head -n 1)

Finds hubs started with 'serve --mdns'. Exits 1 when none answers.
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line instead of the usage
    block: the mistake, then where the help is. Subcommands inherit the class
    (add_subparsers passes type(self) as parser_class, 3.8 included)."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see: python3 %s --help)\n" % (self.prog, message, self.prog))


def port_number(text):
    """A TCP port for argparse: 0 (any free port) to 65535, so a typo is a
    usage error instead of a traceback from bind()."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0 to 65535, not %r" % text)
    return value


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def add_command(commands, name, **options):
    """A subcommand whose epilog keeps its line breaks (the examples)."""
    return commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter,
                               **options)


#: The serve flags that set the hub's limits against a crowd or an attacker
#: on the network: (flag, type, default, metavar, help). Each one's value goes
#: to the Hub keyword of the same name (--max-rooms: max_rooms).
LIMIT_OPTIONS = (
    ("--max-connections", positive_int, DEFAULT_MAX_CONNECTIONS, "N",
     "client connections held at once, lowered to fit ulimit -n; more get 503"),
    ("--max-connections-per-address", positive_int, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, "N",
     "client connections one address (an IPv6 /64) holds at once; more get 503"),
    ("--client-timeout", positive_float, CLIENT_IDLE_TIMEOUT_S, "S",
     "a client connection idle between requests, silent mid-body or not reading its "
     "answer this long is closed"),
    ("--header-timeout", positive_float, DEFAULT_HEADER_TIMEOUT_S, "S",
     "a request's whole head must arrive within this; then 408"),
    ("--min-body-rate", positive_int, DEFAULT_MIN_BODY_RATE, "BYTES",
     "bytes/s a request body must keep up after %g s; then 408" % BODY_GRACE_S),
    ("--max-header-bytes", positive_int, DEFAULT_MAX_HEADER_BYTES, "BYTES",
     "largest header block of a request; then 431"),
    ("--max-body-memory", positive_int, DEFAULT_MAX_BODY_MEMORY, "BYTES",
     "memory for the request bodies held at once, each over %d KiB counted %d times its "
     "size; more get 503" % (SMALL_BODY_BYTES // 1024, BODY_MEMORY_FACTOR)),
    ("--max-password-checks", positive_int, DEFAULT_MAX_PASSWORD_CHECKS, "N",
     "room passwords hashed at once (scrypt, 4 MiB each); others wait their turn, up to "
     "%g s, then 503" % PASSWORD_CHECK_WAIT_S),
    ("--password-failures", positive_int, DEFAULT_PASSWORD_FAILURES, "N",
     "wrong room passwords from one address within a minute before it gets 429 for %g s, "
     "doubled at each further wrong one up to %g s" % (PASSWORD_PENALTY_S,
                                                       PASSWORD_PENALTY_MAX_S)),
    ("--max-rooms", positive_int, DEFAULT_MAX_ROOMS, "N",
     "rooms the hub holds; more are refused with 503"),
    ("--max-participants", positive_int, DEFAULT_MAX_PARTICIPANTS, "N",
     "participants per room; more joins are refused with 503"),
    ("--max-subscribers", positive_int, DEFAULT_MAX_SUBSCRIBERS, "N",
     "open event streams per room; more get 503"),
    ("--max-subscribers-per-address", positive_int, DEFAULT_MAX_SUBSCRIBERS_PER_ADDRESS, "N",
     "open event streams per client address, all rooms together; more get 429"),
    ("--max-specs-bytes", positive_int, DEFAULT_MAX_SPECS_BYTES, "BYTES",
     "largest 'specs' and 'config' of a join, each, as JSON; larger get 413"),
)


def limit_keyword(flag):
    """The Hub keyword a LIMIT_OPTIONS flag sets: --max-rooms -> max_rooms."""
    return flag[2:].replace("-", "_")


def build_parser():
    parser = OneLineErrorParser(
        prog="gambiarra.py",
        description="Pool the local LLMs of everyone on the network into rooms, "
                    "behind one OpenAI-compatible hub.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="gambiarra " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = add_command(
        commands, "serve", help="run a hub", epilog=EPILOG_SERVE,
        description="Run a hub that rooms, participants and OpenAI clients connect to.")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help="address to listen on (default: %(default)s, every interface)")
    serve.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                       help="TCP port (default: %(default)s; 0 picks a free one)")
    serve.add_argument("--quiet", action="store_true", help="print warnings and errors only")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="log detail (default: %(default)s)")
    serve.add_argument("--max-body", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                       help="largest request body accepted (default: %(default)s)")
    serve.add_argument("--connect-timeout", type=positive_float,
                       default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S",
                       help="seconds to connect to a participant's server "
                            "(default: %(default)s)")
    serve.add_argument("--backend-timeout", type=positive_float,
                       default=DEFAULT_BACKEND_TIMEOUT_S, metavar="S",
                       help="longest silence from a participant's server before its first "
                            "byte or between chunks (default: %(default)s)")
    serve.add_argument("--health-interval", type=positive_float,
                       default=DEFAULT_HEALTH_INTERVAL_S, metavar="S",
                       help="seconds between participant heartbeats (default: %(default)s)")
    serve.add_argument("--participant-timeout", type=positive_float, default=None, metavar="S",
                       help="silence before a participant is offline "
                            "(default: 3 x --health-interval)")
    serve.add_argument("--forget-after", type=positive_float, default=DEFAULT_FORGET_AFTER_S,
                       metavar="S", help="seconds offline before a participant is removed "
                                         "(default: %(default)s)")
    serve.add_argument("--queue-timeout", type=positive_float, default=DEFAULT_QUEUE_TIMEOUT_S,
                       metavar="S", help="how long a request waits when every participant "
                                         "that could serve it is busy (default: %(default)s)")
    serve.add_argument("--room-ttl", type=positive_float, default=DEFAULT_ROOM_TTL_S,
                       metavar="S", help="seconds a room may stay without participants "
                                         "(default: %(default)s, a day)")
    serve.add_argument("--state", default=None, metavar="PATH",
                       help="file that keeps the rooms across restarts (default: "
                            "$XDG_STATE_HOME/gambiarra/hub-PORT.json; '' keeps none)")
    serve.add_argument("--mdns", action="store_true",
                       help="advertise the hub on the local network (mDNS/DNS-SD), so "
                            "clients find it without --hub")
    for flag, kind, default, metavar, text in LIMIT_OPTIONS:
        serve.add_argument(flag, type=kind, default=default, metavar=metavar,
                           help=text + " (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)

    create = add_command(
        commands, "create", help="create a room", epilog=EPILOG_CREATE,
        description="Create a room on a hub and print its code.")
    create.add_argument("name", nargs="?", default=None, help="room name")
    add_password_argument(create, help=(
        "protect the room: joining and using it will need this password. --password alone "
        "(or '-') asks for it twice on a terminal and reads a line of stdin otherwise; "
        "without the option, $%s is used if set. --password VALUE works too, but every "
        "user of this machine can read it in 'ps'." % PASSWORD_VARIABLE))
    add_hub_argument(create)
    create.add_argument("--json", action="store_true", help="print the hub's answer as JSON")
    create.set_defaults(func=cmd_create)

    rooms = add_command(
        commands, "list", help="list rooms, their participants and models", epilog=EPILOG_LIST,
        description="List the rooms of a hub with their participants and models.")
    add_hub_argument(rooms)
    add_password_argument(rooms)
    rooms.add_argument("--json", action="store_true",
                       help="print the rooms as JSON, with their participants when readable")
    rooms.set_defaults(func=cmd_list)
    add_join_parser(commands)
    add_chat_parser(commands)
    add_monitor_parser(commands)
    add_discover_parser(commands)
    return parser


def add_discover_parser(commands):
    discover = add_command(
        commands, "discover", help="find the hubs on the local network", epilog=EPILOG_DISCOVER,
        description="Ask the local network (mDNS) for Gambiarra hubs and print the URL "
                    "of each one that answers.")
    discover.add_argument("--timeout", type=positive_float, default=MDNS_BROWSE_S,
                          metavar="S", help="seconds to wait for answers (default: %(default)s)")
    discover.add_argument("--json", action="store_true",
                          help="print a JSON list: name, host, port, addresses, txt, url")
    discover.set_defaults(func=cmd_discover)


def add_chat_parser(commands):
    chat = add_command(
        commands, "chat", help="ask a room one question", epilog=EPILOG_CHAT,
        description="Send one prompt to a room and print the answer as it streams: "
                    "the quickest check that a room works.")
    chat.add_argument("code", help="room code, like XK7P2M")
    chat.add_argument("prompt", help="what to ask")
    chat.add_argument("--model", default="*",
                      help="participant id, model:NAME, a model name or * (default: %(default)s)")
    add_password_argument(chat)
    add_hub_argument(chat)
    chat.add_argument("--json", action="store_true",
                      help='print only {"model", "content"} as JSON at the end')
    chat.set_defaults(func=cmd_chat)


def add_monitor_parser(commands):
    watch = add_command(
        commands, "monitor", help="follow the events of rooms", epilog=EPILOG_MONITOR,
        description="Follow the events of a room, or of every room of the hub, until "
                    "Ctrl-C: a live view on a terminal, one line per event (joins, leaves, "
                    "requests, errors) when piped or with --json.")
    watch.add_argument("code", nargs="?", default=None,
                       help="room code (default: every room the hub lists now)")
    add_password_argument(watch)
    add_hub_argument(watch)
    watch.add_argument("--json", action="store_true",
                       help='one JSON object per line: {"event", "data"} (and "room" '
                            'when following every room)')
    watch.set_defaults(func=cmd_monitor)


def json_object(text):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("not valid JSON (%s)" % exc)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, like \'{"temperature": 0.7}\'')
    return value


def add_join_parser(commands):
    join = add_command(
        commands, "join", help="share your local LLM server in a room", epilog=EPILOG_JOIN,
        description="Join a room as a participant serving a local LLM server (Ollama, "
                    "LM Studio, llama.cpp, vLLM...) and stay until Ctrl-C.")
    join.add_argument("code", nargs="?", default=None, help="room code, like XK7P2M")
    join.add_argument("--code", dest="code_option", metavar="CODE", default=None,
                      help="the room code, as an option")
    add_hub_argument(join)
    join.add_argument("--model", default=None,
                      help="model to serve (default: the only one the server has)")
    join.add_argument("--endpoint", default=None, metavar="URL",
                      help="your server's base URL (default: the first answering on "
                           "127.0.0.1 ports 11434, 1234, 8080, 8000)")
    join.add_argument("--nickname", default=default_nickname(),
                      help="name shown in the room (default: %(default)s)")
    add_password_argument(join, extra=" join runs for hours, and Python cannot blank its "
                                      "own command line: prefer the variable or the prompt.")
    join.add_argument("--direct", action="store_true",
                      help="let the hub call --endpoint itself instead of the tunnel "
                           "(the endpoint must be reachable from the hub)")
    join.add_argument("--max-concurrent", type=positive_int, default=DEFAULT_MAX_CONCURRENT,
                      metavar="N", help="requests served at once (default: %(default)s)")
    join.add_argument("--no-specs", action="store_true",
                      help="do not tell the room about this machine's CPU, RAM and GPU")
    join.add_argument("--config", type=json_object, default=None, metavar="JSON",
                      help="generation defaults shown to the room, a JSON object")
    join.add_argument("--id", default=None,
                      help="participant id (default: the nickname and a random suffix)")
    join.set_defaults(func=cmd_join, usage_error=join.error)


def add_hub_argument(parser):
    parser.add_argument("--hub", default=None,
                        help="hub URL (default: $GAMBIARRA_HUB, else the hub found on the "
                             "local network by mDNS, else %s)" % DEFAULT_HUB_URL)


def find_hub():
    """The hub to use when none is named: the one hub that answers on the
    local network, else localhost. Several hubs -- or one name claimed by two
    machines, which is what an impostor looks like -- are listed, and the
    user chooses with --hub: mDNS cannot tell which one is genuine. Notes go
    to stderr, stdout stays clean."""
    hubs = search_hubs(settle_s=MDNS_BROWSE_SETTLE_S)
    if not hubs:
        print("no hub answered on the local network (mDNS); trying %s (--hub URL or "
              "GAMBIARRA_HUB=URL skip the search)" % DEFAULT_HUB_URL, file=sys.stderr)
        return DEFAULT_HUB_URL
    if len(hubs) > 1:
        raise GambiarraError("%d hubs answered on the local network; choose one with "
                             "--hub URL (or set GAMBIARRA_HUB):\n%s%s" % (
                                 len(hubs), "\n".join(describe_hub(hub) for hub in hubs),
                                 impostor_warning(hubs)))
    print("using hub %s at %s (found by mDNS)" % (printable(hubs[0].name), hubs[0].url),
          file=sys.stderr)
    return hubs[0].url


def impostor_warning(hubs):
    """A line for names claimed by two machines, or ''."""
    names = same_name(hubs)
    if not names:
        return ""
    return ("\n%s answered from more than one machine: one of them may be pretending to "
            "be the other. Ask the organiser for the hub's address." % ", ".join(
                printable(name) for name in names))


def describe_hub(hub):
    version = hub.txt.get("version")
    return "  %s  %s%s" % (hub.url, printable(hub.name),
                           " (version %s)" % printable(version) if version else "")


def search_hubs(**options):
    try:
        return discover_hubs(**options)
    except OSError as exc:  # no socket to be had: say so, as for no answer
        print("cannot search the local network: %s" % exc, file=sys.stderr)
        return []


def cmd_discover(args):
    hubs = search_hubs(timeout_s=args.timeout)
    if args.json:
        print(json.dumps([hub._asdict() for hub in hubs], indent=2))
    else:
        for hub in hubs:
            print(hub.url)
    if not hubs:
        print("no hub answered within %g s; is one running with 'serve --mdns'?" % args.timeout,
              file=sys.stderr)
        return 1
    if same_name(hubs):
        print(impostor_warning(hubs).strip(), file=sys.stderr)
    return 0


def print_banner(hub):
    port = hub.port
    if hub.host in EVERY_INTERFACE:
        hosts = ["localhost"] + local_ipv4_addresses()
    else:
        hosts = [hub.host]
    urls = ["http://%s:%d" % (host, port) for host in hosts]
    lines = ["Gambiarra hub %s is running. Use one of:" % __version__]
    lines += ["  " + url for url in urls]
    hub_option = "" if hub.mdns_responder is not None else " --hub %s" % urls[-1]
    lines += ["", "Create a room:   python3 gambiarra.py create \"My room\"%s" % hub_option,
              "  or with curl:  curl -X POST %s/rooms -H 'Content-Type: application/json' "
              "-d '{\"name\": \"My room\"}'" % urls[-1],
              "OpenAI clients:  base URL %s/rooms/CODE/v1" % urls[-1],
              how_clients_find(hub),
              "Rooms are kept in %s" % hub.state.path if hub.state else
              "Rooms are not kept across restarts (--state '')",
              "Press Ctrl-C to stop."]
    print("\n".join(lines), flush=True)


def how_clients_find(hub):
    if hub.mdns_responder is not None:
        return "Clients on this network find the hub by themselves (mDNS)"
    if hub.mdns:
        return "mDNS is off (see the warning above): clients need --hub URL"
    return "Clients need --hub URL (start with --mdns to be found without it)"


def release_free_memory():
    """Hand back to the OS the heap that compiling this file used (about 4 MiB
    with glibc): the hub may share a Raspberry Pi with other work."""
    import gc
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, Android)
            pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals():
    """Collect SIGINT and SIGTERM instead of raising, and restore the previous
    handlers afterwards. Yields (event set on a signal, signals seen).

    The Python handler does nothing: it runs in the main thread wherever that
    thread is, maybe inside ``stop.wait()`` holding the event's own lock, and
    setting the event there deadlocks (seen: Ctrl-C hung ``serve``). The
    signal number also goes to a wake-up socket (signal.set_wakeup_fd), and a
    small thread reads it and sets the event.
    """
    stop, seen = threading.Event(), []
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(writer.fileno())
    watcher = threading.Thread(target=watch_stop_signals, args=(reader, stop, seen),
                               name="signals", daemon=True)
    watcher.start()
    try:
        yield stop, seen
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        writer.close()  # the watcher reads the end of the socket and returns
        watcher.join(1.0)
        reader.close()


def watch_stop_signals(reader, stop, seen):
    """Set ``stop`` when SIGINT or SIGTERM comes through the wake-up socket."""
    while True:
        try:
            numbers = reader.recv(64)
        except OSError:
            return
        if not numbers:
            return
        for number in numbers:
            if number in STOP_SIGNALS:
                seen.append(number)
                stop.set()


def cmd_serve(args):
    level = logging.WARNING if args.quiet else getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    hub = Hub(args.host, args.port, mdns=args.mdns, max_body=args.max_body,
              connect_timeout=args.connect_timeout, backend_timeout=args.backend_timeout,
              health_interval=args.health_interval,
              participant_timeout=args.participant_timeout, forget_after=args.forget_after,
              room_ttl=args.room_ttl, queue_timeout=args.queue_timeout,
              state_path=default_state_path(args.port) if args.state is None else args.state,
              **{limit_keyword(flag): getattr(args, limit_keyword(flag))
                 for flag, *_ in LIMIT_OPTIONS})
    # Process-wide settings, so here and not in Hub.start(): every thread of
    # this process is the hub's (see THREAD_STACK_BYTES), and the file limit
    # sets how many connections it can hold.
    threading.stack_size(THREAD_STACK_BYTES)
    raise_open_file_limit(args.max_connections)
    # Handlers first: a SIGTERM that comes while the hub starts still stops it cleanly.
    with stop_signals() as (stop, seen):
        serve_until(hub, stop, args)
    return 130 if seen and seen[0] == signal.SIGINT else 0


def serve_until(hub, stop, args):
    """Start the hub, say how to use it, and serve until ``stop`` is set."""
    try:
        hub.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise GambiarraError(
                "port %d is already in use (another gambiarra hub?). Try: "
                "python3 gambiarra.py serve --port %d" % (args.port, args.port + 1))
        raise GambiarraError("cannot listen on %s:%d: %s" % (args.host, args.port,
                                                              exc.strerror or exc))
    try:
        if not args.quiet:
            print_banner(hub)
        release_free_memory()
        while not stop.wait(1):
            pass
    finally:
        log.info("shutting down")
        hub.close()


def hub_call(hub_url, method, path, body=None, password=None, timeout=HUB_CALL_TIMEOUT_S):
    """Call a route; return (status, decoded JSON), or raise GambiarraError
    when the hub cannot be reached."""
    try:
        return HubClient(hub_url).call(method, path, body, timeout=timeout, password=password)
    except OSError as exc:
        raise GambiarraError(unreachable_hub(hub_url, exc))


def unreachable_hub(hub_url, exc):
    return ("cannot reach the hub at %s (%s). Is it running? Start one with "
            "'python3 gambiarra.py serve' or pass --hub URL" % (hub_url, exc))


def hub_request(hub_url, method, path, body=None, password=None):
    """Call a management route; return the decoded JSON or raise GambiarraError."""
    status, answer = hub_call(hub_url, method, path, body, password)
    if status >= 400:
        raise GambiarraError("the hub at %s answered %d: %s" % (
            hub_url, status, error_message(answer)))
    return answer


def error_message(answer):
    """The message of a management error {"error": "..."} or of an OpenAI-shaped
    one {"error": {"message": ...}}."""
    error = answer.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    return printable(error) if error else "no reason given"


PASSWORD_HELP = (
    "the room's password: --password alone (or '-') asks for it on a terminal and reads "
    "a line of stdin otherwise; without the option, $%s is used. --password VALUE works "
    "too, but every user of this machine can read it in 'ps' while the command runs."
    % PASSWORD_VARIABLE)


def add_password_argument(parser, help=PASSWORD_HELP, extra=""):
    parser.add_argument("--password", nargs="?", const=PASSWORD_FROM_INPUT, default=None,
                        metavar="PASSWORD", help=help + extra)


def resolve_password(args):
    """The password the command was given, and where it came from: the
    option's value, a prompt or stdin (--password alone or '-'), or
    $GAMBIARRA_PASSWORD; (None, None) when there is none."""
    if args.password is None:
        value = os.environ.get(PASSWORD_VARIABLE) or None
        return value, "environment" if value else None
    if args.password != PASSWORD_FROM_INPUT:
        return args.password, "option"
    value = read_password("Password for the new room: " if args.command == "create"
                          else "Room password: ", confirm=args.command == "create")
    return value, "input" if value else None


def can_prompt():
    return sys.stdin is not None and sys.stdin.isatty()


def read_password(prompt, confirm=False):
    """Ask on the terminal without echo (getpass), or read one line of stdin
    when it is not a terminal (a pipe from a password manager)."""
    if not can_prompt():
        return (sys.stdin.readline() if sys.stdin else "").rstrip("\r\n") or None
    try:
        password = getpass.getpass(prompt)
        if confirm and password and getpass.getpass("Again: ") != password:
            raise GambiarraError("the two passwords differ; nothing was changed")
    except EOFError:
        return None
    return password or None


def cmd_create(args):
    name = args.name or "%s's room" % (os.environ.get("USER") or "gambiarra")
    body = {"name": name}
    if args.password:
        body["password"] = args.password
    if getattr(args, "password_source", None) == "environment":
        print("protecting the room with the password in $%s" % PASSWORD_VARIABLE,
              file=sys.stderr)
    answer = hub_request(args.hub, "POST", "/rooms", body)
    room = answer["room"]
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(printable(room["code"]))
        print(printable("Room '%s' created. OpenAI base URL: %s/rooms/%s/v1" % (
            room["name"], args.hub.rstrip("/"), room["code"])), file=sys.stderr)
    return 0


def cmd_list(args):
    answer = hub_request(args.hub, "GET", "/rooms")
    for room in answer["rooms"]:
        participants = room_participants(args.hub, room["code"], args.password)
        if participants is not None:
            room["participants"] = participants
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if not answer["rooms"]:
        print("No rooms yet. Create one: python3 gambiarra.py create NAME", file=sys.stderr)
    for room in answer["rooms"]:
        print("\n".join(room_lines(room)))
    return 0


def room_participants(hub_url, code, password):
    """The participants of a room, or None when the room is protected and the
    password is missing or wrong (a listing shows what it can, it does not fail)."""
    status, answer = hub_call(hub_url, "GET", "/rooms/%s/participants" % quote_segment(code),
                              password=password)
    return answer.get("participants", []) if status == 200 else None


def room_lines(room):
    """A room as text: a header line, then one line per participant and its models."""
    lines = [printable("%s  %-30s %d participant(s)%s" % (
        room["code"], room["name"], room["participantCount"],
        "  [protected]" if room.get("protected") else ""))]
    if "participants" not in room:
        return lines + ["    (protected)"]
    if not room["participants"]:
        return lines + ["    (no participants yet)"]
    for participant in room["participants"]:
        lines.append("    %-24s %-24s %-20s %s" % (
            participant["id"], participant.get("nickname", ""), participant.get("model", ""),
            participant.get("status", "")))
    models = sorted({str(p.get("model")) for p in room["participants"] if p.get("model")})
    if models:
        lines.append("    models: %s" % ", ".join(models))
    return [printable(line) for line in lines]  # names come from anyone who joined


# --- chat: the quickest check that a room answers ---

#: Longest silence of the hub during a chat answer: as long as the hub waits
#: for a participant's server, which may be loading its model from disk.
CHAT_TIMEOUT_S = DEFAULT_BACKEND_TIMEOUT_S
#: What to do about an answer that broke off (the end of its error line).
CHAT_ASK_AGAIN = "Ask again; if it happens again, check that the hub is running and see its log"


def cmd_chat(args):
    body = {"model": args.model, "stream": True,
            "messages": [{"role": "user", "content": args.prompt}]}
    path = "/rooms/%s/v1/chat/completions" % quote_segment(args.code)
    client = HubClient(args.hub)
    conn = client.connection(timeout=CHAT_TIMEOUT_S)
    try:
        response = open_chat(client, conn, path, body, args.password)
        if response.status == 401 and args.password is None and can_prompt():
            response.read()  # a protected room: ask once, on the terminal
            conn.close()
            args.password = read_password("Room %s needs a password: " % printable(args.code))
            response = open_chat(client, conn, path, body, args.password)
        model, content = read_chat_answer(args, response)
    finally:
        conn.close()
    if args.json:
        print(json.dumps({"model": model, "content": content}))
    else:
        print(flush=True)
    return 0


def open_chat(client, conn, path, body, password):
    headers = dict({"Content-Type": "application/json"}, **bearer_header(password))
    try:
        conn.request("POST", client.path(path), body=json_bytes(body), headers=headers)
        return conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        raise GambiarraError(unreachable_hub(client.url, exc))


def read_chat_answer(args, response):
    """(model, content) of the answer, whole or streamed. GambiarraError when the
    room refuses, or the answer is cut short or unreadable: a half answer must
    never pass for a whole one (exit 0 would tell scripts it was fine)."""
    try:
        if response.status >= 400:
            raise GambiarraError(chat_error(args, response.status,
                                            _json_or_empty(response.read())))
        if response.getheader("Content-Type", "").startswith("application/json"):
            return read_chat_json(chat_json(response.read()), echo=not args.json)
    except (OSError, http.client.HTTPException) as exc:
        raise GambiarraError(broken_answer(exc))
    return read_chat_stream(response, echo=not args.json)


def chat_error(args, status, answer):
    """One line saying what went wrong and what to do."""
    message = error_message(answer)
    if status == 401:
        return "room %s: %s. Pass --password or set GAMBIARRA_PASSWORD" % (args.code, message)
    if status == 404 and message == "Room not found":
        return ("room %s not found on %s. See the rooms with: python3 gambiarra.py list"
                % (args.code, args.hub))
    return "room %s answered %d: %s" % (args.code, status, message)


def broken_answer(exc):
    """The error line for an answer whose connection failed while it was read."""
    if isinstance(exc, socket.timeout):
        why = "the hub sent nothing for %g s" % CHAT_TIMEOUT_S
    else:
        why = "the connection to the hub broke (%s)" % _describe(exc)
    return "the answer is incomplete: %s. %s" % (why, CHAT_ASK_AGAIN)


def chat_json(data):
    """The decoded body of a whole answer; GambiarraError unless it is a JSON object."""
    try:
        answer = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        answer = None
    if not isinstance(answer, dict):
        raise GambiarraError("the answer is unreadable: the hub sent %r, which is not a "
                             "whole JSON object. %s"
                             % (data[:60].decode("utf-8", "replace"), CHAT_ASK_AGAIN))
    return answer


def read_chat_json(answer, echo):
    """A whole answer at once: some servers ignore "stream": true."""
    choices = answer.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content") or ""
    if echo:
        sys.stdout.write(printable(content, lines=True))
    return answer.get("model"), content


def read_chat_stream(response, echo):
    """Read an OpenAI SSE stream up to [DONE]; print each token as it comes when
    ``echo``. Returns (model, whole answer). GambiarraError for an error event,
    a broken connection or a stream that ends without [DONE] (a killed hub, a
    cut network): what was printed stays, on a line of its own."""
    pieces = []
    try:
        model = _read_chat_events(response, echo, pieces)
    except GambiarraError:
        if echo and "".join(pieces):
            print(flush=True)  # the error line goes under the half answer, not after it
        raise
    return model, "".join(pieces)


def _read_chat_events(response, echo, pieces):
    """Append each token of the stream to ``pieces``; the model's name at [DONE]."""
    model = None
    try:
        for _, event in sse_stream(response):
            if event == "[DONE]":
                return model
            model = _chat_event(event, echo, pieces) or model
    except (OSError, http.client.HTTPException) as exc:
        raise GambiarraError(broken_answer(exc))
    raise GambiarraError("the answer is incomplete: the stream ended before [DONE] (the hub "
                         "or the participant's server stopped, or the network was cut). %s"
                         % CHAT_ASK_AGAIN)


def _chat_event(event, echo, pieces):
    """Take one streamed chunk's tokens; its model name, if it says."""
    if not isinstance(event, dict):
        raise GambiarraError("the hub sent an event that is not JSON: %r" % str(event)[:80])
    if "error" in event:
        raise GambiarraError("the answer broke off: %s" % error_message(event))
    for choice in event.get("choices") or []:
        token = (choice.get("delta") or {}).get("content") or ""
        pieces.append(token)
        if echo and token:
            sys.stdout.write(printable(token, lines=True))  # a participant wrote it
            sys.stdout.flush()
    return event.get("model")


# --- monitor: follow the events of rooms ---

#: Fields of an event worth a column, in this order.
MONITOR_FIELDS = ("participantId", "id", "nickname", "model", "status", "reason", "ttftMs",
                  "tokensPerSecond", "tokens", "error")
MONITOR_BACKOFF_MIN_S = 0.5
MONITOR_BACKOFF_MAX_S = 15.0
#: Silence after which a stream counts as dead: three missed keep-alives.
MONITOR_SILENCE_S = 3 * SSE_KEEPALIVE_S


def cmd_monitor(args):
    with stop_signals() as (stop, seen):
        if sys.stdout.isatty() and not args.json and curses_available():
            import curses
            curses.wrapper(lambda window: monitor_on_screen(window, args, stop))
        else:
            monitor(args, stop)
    return 130 if seen and seen[0] == signal.SIGINT else 0


def curses_available():
    try:
        import curses  # noqa: F401 (missing on Windows)
    except ImportError:
        return False
    return True


def monitor_on_screen(window, args, stop):
    """The live view of a terminal: participants on top, recent events below,
    redrawn twice a second until Ctrl-C."""
    screen = MonitorScreen(args.hub)
    for code in rooms_to_follow(args):  # who is there already, before any event says so
        for participant in room_participants(args.hub, code, args.password) or ():
            screen.seed(code.upper(), participant)
    window.nodelay(True)
    worker = threading.Thread(target=monitor, args=(args, stop), kwargs={"sink": screen},
                              name="monitor", daemon=True)
    worker.start()
    while not stop.wait(0.5) and worker.is_alive():
        screen.render(window)
    stop.set()
    worker.join(5)


def rooms_to_follow(args):
    """The room asked for, or every room the hub lists now."""
    if args.code:
        return [args.code]
    return [room["code"] for room in hub_request(args.hub, "GET", "/rooms")["rooms"]]


def monitor(args, stop, backoff_min_s=MONITOR_BACKOFF_MIN_S, sink=None):
    """Print the events of one room (args.code) or of every room the hub lists,
    one thread per room, until ``stop`` is set or no room is left to follow."""
    codes = rooms_to_follow(args)
    if not codes:
        raise GambiarraError("the hub at %s has no rooms to monitor. Create one: "
                             "python3 gambiarra.py create NAME" % args.hub)
    sink = sink or PrintedEvents(args.json)
    followers = [RoomFollower(args, code, sink, stop, prefix=not args.code,
                              backoff_min_s=backoff_min_s) for code in codes]
    for follower in followers:
        follower.start()
    try:
        while not stop.wait(0.1) and any(f.thread.is_alive() for f in followers):
            pass
    finally:
        stop.set()
        for follower in followers:
            follower.close()
    if args.code and followers[0].fatal:
        raise GambiarraError(followers[0].fatal)


class RoomFollower:
    """One room's event stream in a thread: reconnects with backoff when the
    stream ends or the hub goes away, and gives up on a room that is gone or
    refuses the password (``fatal`` says why)."""

    def __init__(self, args, code, sink, stop, prefix, backoff_min_s):
        self.hub, self.code, self.password = HubClient(args.hub), code, args.password
        self.prefix = prefix
        self.sink, self.stop = sink, stop
        self.backoff_min_s = backoff_min_s
        self.fatal = None
        self.connected, self.trouble = False, None
        self._lock = threading.Lock()
        self._sock = None
        self.thread = threading.Thread(target=self.run, name="monitor-" + code, daemon=True)

    def start(self):
        self.thread.start()

    def close(self):
        """Wake the thread from its blocking read, then wait for it."""
        self.stop.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(HUB_CALL_TIMEOUT_S)  # woken above; bounded all the same

    def run(self):
        delay = self.backoff_min_s
        while not self.stop.is_set():
            try:
                self.follow()
                reason = "the event stream ended"
            except (OSError, http.client.HTTPException) as exc:
                reason = "cannot reach the hub at %s (%s)" % (self.hub.url, exc)
            except GambiarraError as exc:
                self.fatal = str(exc)
                if self.prefix:  # one room among several; main() reports a lone room's
                    self.say("error: %s" % exc)
                return
            if self.stop.is_set():
                return
            if self.connected:
                delay = self.backoff_min_s
            if self.trouble is None:  # said once per outage, not per attempt
                self.say("room %s: %s; retrying" % (self.code, reason))
            self.trouble = reason
            self.stop.wait(delay)
            delay = min(delay * 2, MONITOR_BACKOFF_MAX_S)

    def follow(self):
        """Read one connection's events until it ends."""
        self.connected = False
        conn = self.hub.connection(timeout=MONITOR_SILENCE_S)
        conn.connect()  # before close() can see it: it shuts the socket down
        with self._lock:  # the socket, as the connection drops it when a response ends it
            self._sock = conn.sock
        try:
            if self.stop.is_set():
                return
            conn.request("GET", self.hub.path("/rooms/%s/events" % quote_segment(self.code)),
                         headers=bearer_header(self.password))
            response = conn.getresponse()
            if response.status in (401, 403, 404):  # waiting will not help
                raise GambiarraError(self.refusal(response.status,
                                                  _json_or_empty(response.read())))
            if response.status != 200:  # a restarting hub or a proxy: try again
                raise OSError("the hub answered %d" % response.status)
            self.connected = True
            if self.trouble is not None:
                self.say("room %s: following again" % self.code)
                self.trouble = None
            for name, data in sse_stream(response):
                self.show(name, data)
        finally:
            with self._lock:
                self._sock = None
            conn.close()

    def refusal(self, status, answer):
        hint = {401: ". Pass --password or set GAMBIARRA_PASSWORD",
                404: ". See the rooms with: python3 gambiarra.py list"}.get(status, "")
        return "room %s: %s%s" % (self.code, error_message(answer), hint)

    def show(self, name, data):
        self.sink.event(self.code if self.prefix else None, self.code, name, data)

    def say(self, text):
        self.sink.note(text)


class PrintedEvents:
    """Events as lines on stdout (JSON with --json), notes on stderr.
    ``_lock`` keeps the lines of several rooms whole."""

    def __init__(self, as_json):
        self.as_json = as_json
        self._lock = threading.Lock()

    def event(self, shown_room, code, name, data):
        if self.as_json:
            record = {"event": name, "data": data}
            if shown_room:
                record["room"] = shown_room
            line = json.dumps(record)
        else:
            line = event_line(name, data, shown_room)
        with self._lock:
            print(line, flush=True)

    def note(self, text):
        with self._lock:
            print(printable(text), file=sys.stderr, flush=True)


class MonitorScreen:
    """What the curses view shows: each participant's last known state, from
    the events, and the latest event lines. ``_lock`` guards both."""

    EVENTS_KEPT = 200

    def __init__(self, hub_url):
        self.hub_url = hub_url
        self._lock = threading.Lock()
        self._participants = collections.OrderedDict()  # (room, id) -> dict
        self._lines = collections.deque(maxlen=self.EVENTS_KEPT)

    def event(self, shown_room, code, name, data):
        line = event_line(name, data, code)
        with self._lock:
            self._lines.append(line)
            if isinstance(data, dict):
                self._track(code, name, data)

    def note(self, text):
        with self._lock:
            self._lines.append(time.strftime("%H:%M:%S ") + text)

    def seed(self, code, participant):
        """A participant listed before the first event about it."""
        metrics = participant.get("metrics") or {}
        with self._lock:
            self._participants[(code, participant["id"])] = {
                "nickname": participant.get("nickname"), "model": participant.get("model"),
                "status": participant.get("status", "online"),
                "requests": metrics.get("requests", 0), "errors": metrics.get("errors", 0),
                "ttftMs": metrics.get("ttftMs"), "tokensPerSecond": metrics.get("tokensPerSecond")}

    def _track(self, code, name, data):
        key = (code, data.get("id") or data.get("participantId"))
        if name == "participant:joined":
            self._participants[key] = {"nickname": data.get("nickname"),
                                       "model": data.get("model"), "status": "online",
                                       "requests": 0, "errors": 0}
        elif name == "participant:left":
            self._participants.pop(key, None)
        elif key in self._participants:
            row = self._participants[key]
            if name in ("participant:offline", "participant:online"):
                row["status"] = name.split(":")[1]
            elif name == "llm:complete":
                row["requests"] += 1
                row["ttftMs"], row["tokensPerSecond"] = data.get("ttftMs"), data.get(
                    "tokensPerSecond")
            elif name == "llm:error":
                row["errors"] += 1

    def lines(self, height):
        """The screen as text lines, at most ``height`` of them."""
        with self._lock:
            rows = list(self._participants.items())
            events = list(self._lines)
        text = ["Gambiarra monitor: %s  (Ctrl-C to quit)" % self.hub_url, "",
                "%-7s %-20s %-22s %-8s %5s %4s %9s %7s" % (
                    "ROOM", "PARTICIPANT", "MODEL", "STATUS", "REQS", "ERRS", "TTFT ms",
                    "TOK/S")]
        for (code, _), row in rows:
            text.append("%-7s %-20.20s %-22.22s %-8s %5d %4d %9s %7s" % (
                code, row["nickname"], row["model"], row["status"], row["requests"],
                row["errors"], row.get("ttftMs") or "-", row.get("tokensPerSecond") or "-"))
        if not rows:
            text.append("(no participant has joined since the monitor started)")
        text += ["", "Latest events:"]
        room_for_events = max(0, height - len(text))
        return text + (events[-room_for_events:] if room_for_events else [])

    def render(self, window):
        height, width = window.getmaxyx()
        window.erase()
        for y, line in enumerate(self.lines(height)):
            window.addnstr(y, 0, printable(line), max(0, width - 1))
        window.refresh()


def sse_stream(response):
    """Yield (event name, decoded data) from a text/event-stream; comments
    (keep-alives) are skipped."""
    name, data = "message", []
    for raw in response:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield name, _json_or_text("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _json_or_text(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def event_line(name, data, room=None):
    """One readable line: time, [room,] event and its interesting fields."""
    parts = [time.strftime("%H:%M:%S")] + ([room] if room else []) + ["%-20s" % name]
    if isinstance(data, dict):
        for key in MONITOR_FIELDS:
            value = data.get(key)
            if value is not None:
                parts.append("%s=%s" % (key, value if isinstance(value, (str, int, float))
                                        else json.dumps(value)))
    else:
        parts.append(str(data))
    return printable(" ".join(parts).rstrip())  # names and errors come from the network


def default_nickname():
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "someone"
    return "%s@%s" % (user, socket.gethostname().split(".")[0] or "localhost")


def default_participant_id(nickname):
    """The nickname made URL-safe, with a random suffix: a restarted agent must
    not collide with the participant its previous run left behind."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", nickname).strip("-")[:40] or "participant"
    return "%s-%s" % (slug, secrets.token_hex(3))


def join_fields(args, local_url, model):
    """The join body (without password and secret) that the command line asks for."""
    fields = {"id": args.id or default_participant_id(args.nickname),
              "nickname": args.nickname, "model": model, "endpoint": local_url,
              "maxConcurrent": args.max_concurrent,
              "transport": "direct" if args.direct else "tunnel"}
    if not args.no_specs:
        fields["specs"] = collect_specs()
    if args.config is not None:
        fields["config"] = args.config
    return fields


@contextlib.contextmanager
def status_lines_on_stderr():
    """Show the agent's INFO status lines on stderr while it runs, then put
    the logger back as it was (tests run several commands in one process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def cmd_join(args):
    code = args.code or args.code_option
    if not code:
        args.usage_error("a room code is needed, like: python3 gambiarra.py join XK7P2M")
    if args.direct and args.endpoint:
        refuse_loopback_for_direct(args.endpoint)  # before probing a server for nothing
    local_url, models = local_server(args.endpoint)
    model = choose_model(args.model, models, local_url)
    if args.direct:
        refuse_loopback_for_direct(local_url)  # a server found by probing is loopback
    agent = Agent(args.hub, code, join_fields(args, local_url, model), local_url,
                  password=args.password)
    with stop_signals() as (stop, seen), status_lines_on_stderr():
        agent.start()
        try:
            while not stop.wait(1):
                pass
        finally:
            log.info("leaving room %s", agent.code)
            agent.close()
    return 130 if seen and seen[0] == signal.SIGINT else 0


def main(argv=None):
    """Run the command line; returns the exit status (0, 1, 2 or 130)."""
    args = build_parser().parse_args(argv)
    try:
        if "password" in vars(args):  # before the search: nobody waits at a prompt for it
            args.password, args.password_source = resolve_password(args)
        if "hub" in vars(args) and args.hub is None:
            args.hub = os.environ.get("GAMBIARRA_HUB") or find_hub()
        return args.func(args)
    except GambiarraError as exc:  # its lines may quote a hub or a server: escaped
        print("error: %s" % "\n".join(printable(line) for line in str(exc).split("\n")),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
