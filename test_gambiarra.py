#!/usr/bin/env python3
"""Tests for gambiarra.py: standard library only, loopback only.

    python3 -m unittest -v test_gambiarra        # or: python3 test_gambiarra.py
    python3 test_gambiarra.py bench              # the relay benchmark (not a test)

Every test starts real servers on 127.0.0.1 port 0 (the hub and a fake
OpenAI-compatible backend defined here), waits with bounded timeouts only and
stops everything it started.
"""

import collections
import contextlib
import errno
import functools
import http.client
import http.server
import io
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import unittest.mock
import urllib.error
import urllib.parse
import urllib.request

import gambiarra

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT_S = 10  # upper bound of any wait; tests pass far sooner
#: What every client sends with a JSON body (the hub refuses bodies a web page
#: could send cross-site: text/plain, forms, or no Content-Type at all).
JSON = {"Content-Type": "application/json"}


def urllib_open(url):
    return urllib.request.urlopen(url, timeout=WAIT_S)


def wait_until(predicate, timeout=WAIT_S, interval=0.005):
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# === Fake OpenAI-compatible backend ===

class FakeBackendHandler(http.server.BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible server. A "fake" object in the request
    body steers it: {"chunks": N, "delay": S, "status": CODE, "die_after": I,
    "stall_before": true, "stall_after": I, "usage": true}."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.backend.lock:
            self.server.backend.connections += 1

    def do_GET(self):
        backend = self.server.backend
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": model, "object": "model"} for model in backend.models]})
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [{"name": model} for model in backend.models]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        backend = self.server.backend
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        body = json.loads(raw or b"{}")
        with backend.lock:
            backend.requests.append((self.path, body))
            backend.raw_requests.append((raw, dict(self.headers)))
        fake = body.get("fake") or {}
        if fake.get("sized"):
            return self.sized_answer(fake)
        if fake.get("status"):
            return self.send_json(fake["status"], {"error": {"message": "fake failure",
                                                             "type": "fake", "code": None}})
        if fake.get("stall_before") and not self.stall():
            return
        if self.path.endswith("/embeddings"):
            return self.send_json(200, {"object": "list", "model": body.get("model"),
                                        "data": [{"object": "embedding", "index": 0,
                                                  "embedding": [0.1, 0.2, 0.3]}]})
        if body.get("stream"):
            return self.stream(body, fake)
        chunks = fake.get("chunks", 3)
        text = "".join("tok%d " % i for i in range(chunks))
        choice = ({"index": 0, "text": text} if self.path.endswith("/v1/completions") else
                  {"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop"})
        self.send_json(200, {"id": "fake-1", "object": "chat.completion",
                             "model": body.get("model"), "choices": [choice],
                             "usage": {"prompt_tokens": 1, "completion_tokens": chunks,
                                       "total_tokens": chunks + 1}})

    def stream(self, body, fake):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunks = fake.get("chunks", 3)
        for i in range(chunks):
            if i == fake.get("die_after"):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if i == fake.get("stall_after") and not self.stall():
                return
            event = {"id": "fake-1", "object": "chat.completion.chunk",
                     "model": body.get("model"), "seq": i,
                     "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}]}
            if not self.write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"):
                return
            if fake.get("delay"):
                time.sleep(fake["delay"])
        if fake.get("usage"):
            usage = {"choices": [], "usage": {"completion_tokens": 42}}
            self.write_chunk(b"data: " + json.dumps(usage).encode() + b"\n\n")
        if fake.get("split_done"):
            self.write_chunk(b"data: [DO")
            time.sleep(fake["split_done"])
            self.write_chunk(b"NE]\n\n")
        else:
            self.write_chunk(b"data: [DONE]\n\n")
        if fake.get("pause_after_done"):
            time.sleep(fake["pause_after_done"])
        self.write_chunk(b"")

    def sized_answer(self, fake):
        """A big answer with Content-Length: {"sized": bytes, "stall_mid": bool,
        "cut": bytes sent before closing early}."""
        size = fake["sized"]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = bytes(range(256)) * 256
        sent, stalled = 0, False
        limit = fake.get("cut", size)
        while sent < limit:
            if fake.get("stall_mid") and not stalled and sent >= size // 2:
                stalled = True
                if not self.stall():
                    return
            piece = block[:min(len(block), limit - sent)]
            try:
                self.wfile.write(piece)
            except OSError:
                return
            sent += len(piece)
        if limit < size:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            return True
        except OSError:
            self.server.backend.disconnected.set()
            self.close_connection = True
            return False

    def stall(self):
        """Wait for ``release`` (True) or for the client to hang up (False)."""
        backend = self.server.backend
        deadline = time.monotonic() + WAIT_S
        while not backend.release.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.01)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                backend.disconnected.set()
                self.close_connection = True
                return False
        return True

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ServerInThread:
    """A test HTTP server on 127.0.0.1 (a port of its own), serving in a
    thread until close(); ``attributes`` are set on the server for its
    handlers to find."""

    def __init__(self, handler, **attributes):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        vars(self.server).update(attributes)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT_S)


class FakeBackend(ServerInThread):
    """A fake OpenAI-compatible server on 127.0.0.1, port 0, in a thread."""

    def __init__(self, models=("fake-model",)):
        self.models = list(models)
        self.requests = []
        self.raw_requests = []  # (body bytes, headers) as received
        self.connections = 0  # TCP connections accepted
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.disconnected = threading.Event()
        ServerInThread.__init__(self, FakeBackendHandler, backend=self)

    def close(self):
        self.release.set()
        ServerInThread.close(self)

    def last_body(self):
        with self.lock:
            return self.requests[-1][1]


# === Test helpers ===

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CapturedLogs(logging.Handler):
    """Collects the gambiarra logger's records during a test."""

    def __init__(self, test, level=logging.DEBUG):
        super().__init__(level)
        self.records = []
        logger = logging.getLogger("gambiarra")
        old_level = logger.level
        logger.setLevel(level)
        logger.addHandler(self)
        test.addCleanup(logger.setLevel, old_level)
        test.addCleanup(logger.removeHandler, self)

    def emit(self, record):
        self.records.append(record)

    def at(self, level):
        return [r.getMessage() for r in self.records if r.levelno >= level]


class HubTestCase(unittest.TestCase):
    """Starts a hub with fast timings, and gives small HTTP helpers."""

    hub_options = {}

    def setUp(self):
        self.threads_before = threading.active_count()
        options = dict(connect_timeout=2, backend_timeout=5)
        options.update(self.hub_options)
        self.hub = gambiarra.Hub("127.0.0.1", 0, **options).start()
        self.secrets = {}  # (room code, participant id) -> secret from join
        self.addCleanup(self.check_no_thread_leak)
        self.addCleanup(self.hub.close)
        self.port = self.hub.port

    def check_no_thread_leak(self):
        leaked = not wait_until(lambda: threading.active_count() <= self.threads_before)
        self.assertFalse(leaked, "threads left: %s" % threading.enumerate())

    def patch(self, target, name, value):
        """Set ``target.name`` to ``value`` for this test."""
        patcher = unittest.mock.patch.object(target, name, value)
        patcher.start()
        self.addCleanup(patcher.stop)

    def backend(self, **kwargs):
        backend = FakeBackend(**kwargs)
        self.addCleanup(backend.close)
        return backend

    def request(self, method, path, body=None, headers=None, raw=None):
        """One request on a fresh connection: (status, headers, decoded JSON or bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        try:
            data = raw if raw is not None else (
                json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=dict(
                {"Content-Type": "application/json"}, **(headers or {})))
            response = conn.getresponse()
            payload = response.read()
            if payload and response.getheader("Content-Type", "").startswith(
                    "application/json"):
                payload = json.loads(payload)
            return response.status, response, payload
        finally:
            conn.close()

    def create_room(self, name="Test room"):
        status, _, answer = self.request("POST", "/rooms", {"name": name})
        self.assertEqual(status, 201)
        return answer["room"]["code"]

    def join(self, code, backend, pid="alice", model=None, **extra):
        body = {"id": pid, "nickname": pid.title(), "model": model or backend.models[0],
                "endpoint": backend.url}
        body.update(extra)
        status, _, answer = self.request("POST", "/rooms/%s/join" % code, body)
        self.assertEqual(status, 201, answer)
        self.secrets[code.upper(), pid] = answer["secret"]
        return answer

    def secret_header(self, code, pid):
        return {"X-Gambiarra-Secret": self.secrets[code.upper(), pid]}

    def chat(self, code, model, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body.update(extra)
        return self.request("POST", "/rooms/%s/v1/chat/completions" % code, body)

    def keep_busy(self, code, fake):
        """Join alice with one slot, and fill it with a request her server
        holds until ``fake.release``; return that request's connection."""
        self.join(code, fake, maxConcurrent=1)
        busy = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(busy.close)
        busy.request("POST", "/rooms/%s/v1/chat/completions" % code, body=json.dumps(
            {"model": "alice", "fake": {"stall_before": True}}).encode(), headers=JSON)
        self.assertTrue(wait_until(lambda: fake.requests))
        return busy

    def open_stream(self, path, body):
        """Send a streaming request; return (connection, response) to read from."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()


def hang_up(conn, response=None):
    """Leave like a client that gives up: FIN at once, whatever is unread."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    if response is not None:
        response.close()
    conn.close()


def sse_events(data):
    """Split an SSE body into (event, data) pairs; comments are dropped."""
    events = []
    for block in data.decode().split("\n\n"):
        name, payload = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                payload.append(line[5:].strip())
        if payload:
            events.append((name, "\n".join(payload)))
    return events


class EventStream:
    """A reader of a room's /events stream on its own connection."""

    def __init__(self, port, code):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        self.conn.request("GET", "/rooms/%s/events" % code)
        self.response = self.conn.getresponse()
        self.buffer = b""

    def next_event(self, skip=()):
        """The next (event, data) whose name is not in ``skip``."""
        while True:
            while b"\n\n" not in self.buffer:
                chunk = self.response.read1(65536)
                if not chunk:
                    raise EOFError("event stream ended")
                self.buffer += chunk
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            found = sse_events(block + b"\n\n")
            if found and found[0][0] not in skip:
                name, data = found[0]
                return name, json.loads(data)

    def close(self):
        self.response.close()  # its file object keeps the socket open otherwise
        self.conn.close()


# === Helpers of gambiarra.py ===

class FakeConnection:
    closed = False
    sock = None

    def close(self):
        self.closed = True


class TestConnectionPool(unittest.TestCase):
    def test_idle_connections_expire(self):
        now = [100.0]
        pool = gambiarra.ConnectionPool(1, 1, idle_s=4, clock=lambda: now[0])
        key = ("http", "127.0.0.1", 1)
        old, fresh = FakeConnection(), FakeConnection()
        pool.put(key, old)
        now[0] += 3
        pool.put(key, fresh)
        self.assertEqual(pool.get(key), (fresh, True))  # most recent first
        pool.put(key, fresh)
        now[0] += 2  # old: 5 s idle, fresh: 2 s
        pool.prune()
        self.assertTrue(old.closed)
        self.assertFalse(fresh.closed)
        now[0] += 5
        conn, reused = pool.get(key)
        self.assertFalse(reused)  # the expired one was closed, not handed out
        self.assertTrue(fresh.closed)
        pool.close()


class TestHelpers(unittest.TestCase):
    def test_endpoint_trailing_v1_and_slash_are_dropped(self):
        for url in ("http://h:11434", "http://h:11434/", "http://h:11434/v1",
                    "http://h:11434/v1/"):
            self.assertEqual(gambiarra.normalize_endpoint(url), "http://h:11434")
        self.assertEqual(gambiarra.normalize_endpoint("https://h/proxy/v1"), "https://h/proxy")

    def test_endpoint_must_be_http_url(self):
        for url in ("ftp://h", "h:11434", "http://", "javascript:alert(1)", "http://h:99999"):
            with self.assertRaises(gambiarra.ApiError) as caught:
                gambiarra.normalize_endpoint(url)
            self.assertEqual(caught.exception.status, 400)

    def test_median(self):
        self.assertEqual(gambiarra.median_of([3, 1, 2]), 2)
        self.assertEqual(gambiarra.median_of([4, 1, 2, 3]), 2.5)

    def test_model_matching_accepts_latest_tag(self):
        self.assertTrue(gambiarra.model_matches("llama3", "llama3:latest"))
        self.assertTrue(gambiarra.model_matches("llama3:8b", "llama3:8b"))
        self.assertFalse(gambiarra.model_matches("llama3", "llama3:8b"))
        self.assertFalse(gambiarra.model_matches("llama3:latest", "llama3"))


# === Management routes ===

class TestHttpApi(HubTestCase):
    def test_health(self):
        status, response, answer = self.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(answer["status"], "ok")
        self.assertAlmostEqual(answer["timestamp"] / 1000, time.time(), delta=60)
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_create_and_list_rooms(self):
        status, _, answer = self.request("POST", "/rooms", {"name": "Hackathon"})
        self.assertEqual(status, 201)
        room = answer["room"]
        self.assertEqual(set(room), {"id", "code", "name", "hostId", "createdAt"})
        self.assertEqual(answer["hostId"], room["hostId"])
        self.assertRegex(room["code"], r"^[A-Z0-9]{6}$")
        status, _, listing = self.request("GET", "/rooms")
        self.assertEqual(status, 200)
        self.assertEqual(listing["rooms"], [dict(room, participantCount=0, protected=False)])

    def test_create_room_needs_a_name(self):
        for body in ({}, {"name": ""}):
            status, _, answer = self.request("POST", "/rooms", body)
            self.assertEqual((status, answer), (400, {"error": "Name is required"}))
        status, _, answer = self.request("POST", "/rooms", {"name": 42})
        self.assertEqual(status, 400)
        self.assertIn("name", answer["error"])

    def test_join_answers_participant_room_and_heartbeat_interval(self):
        code = self.create_room()
        backend = self.backend()
        answer = self.join(code, backend, specs={"gpu": "none"}, config={"temperature": 0.2})
        participant = answer["participant"]
        self.assertEqual(answer["healthInterval"], 10000)
        self.assertTrue(answer["roomId"])
        for field in ("id", "nickname", "model", "endpoint", "config", "specs", "status",
                      "joinedAt", "lastSeen", "transport", "maxConcurrent", "inFlight",
                      "metrics"):
            self.assertIn(field, participant)
        self.assertEqual(participant["status"], "online")
        self.assertEqual(participant["transport"], "direct")
        self.assertEqual(participant["specs"], {"gpu": "none"})
        self.assertEqual(set(participant["metrics"]),
                         {"requests", "errors", "ttftMs", "ttftMedianMs", "tokensPerSecond"})
        status, _, listing = self.request("GET", "/rooms/%s/participants" % code)
        self.assertEqual(status, 200)
        self.assertEqual([p["id"] for p in listing["participants"]], ["alice"])
        _, _, rooms = self.request("GET", "/rooms")
        self.assertEqual(rooms["rooms"][0]["participantCount"], 1)

    def test_room_codes_are_case_insensitive(self):
        code = self.create_room()
        self.join(code.lower(), self.backend())
        status, _, listing = self.request("GET", "/rooms/%s/participants" % code.lower())
        self.assertEqual((status, len(listing["participants"])), (200, 1))

    def test_join_reports_each_missing_or_wrong_field(self):
        code = self.create_room()
        good = {"id": "a", "nickname": "A", "model": "m", "endpoint": "http://127.0.0.1:1"}
        for field in ("id", "nickname", "model", "endpoint"):
            body = dict(good)
            del body[field]
            status, _, answer = self.request("POST", "/rooms/%s/join" % code, body)
            self.assertEqual(status, 400)
            self.assertIn(field, answer["error"])
        for field, value in (("id", 7), ("model", ["m"]), ("specs", "fast"), ("config", 3),
                             ("maxConcurrent", 0), ("maxConcurrent", "4"),
                             ("endpoint", "localhost:11434"), ("endpoint", "file:///etc")):
            status, _, answer = self.request("POST", "/rooms/%s/join" % code,
                                             dict(good, **{field: value}))
            self.assertEqual(status, 400, (field, value))
            self.assertIn(field, answer["error"])

    def test_unknown_room_and_participant(self):
        status, _, answer = self.request("GET", "/rooms/NOPE99/participants")
        self.assertEqual((status, answer), (404, {"error": "Room not found"}))
        code = self.create_room()
        status, _, answer = self.request("DELETE", "/rooms/%s/leave/ghost" % code)
        self.assertEqual((status, answer), (404, {"error": "Participant not found"}))
        status, _, _ = self.request("POST", "/rooms/%s/health" % code, {"id": "ghost"})
        self.assertEqual(status, 404)
        status, _, _ = self.request("POST", "/rooms/NOPE99/join",
                                    {"id": "a", "nickname": "A", "model": "m",
                                     "endpoint": "http://127.0.0.1:1"})
        self.assertEqual(status, 404)

    def test_leave_and_heartbeat(self):
        code = self.create_room()
        self.join(code, self.backend())
        status, _, answer = self.request("POST", "/rooms/%s/health" % code, {"id": "alice"},
                                         headers=self.secret_header(code, "alice"))
        self.assertEqual((status, answer), (200, {"success": True}))
        status, _, answer = self.request("POST", "/rooms/%s/health" % code, {})
        self.assertEqual(status, 400)
        self.assertIn("id", answer["error"])
        status, _, answer = self.request("DELETE", "/rooms/%s/leave/alice" % code,
                                         headers=self.secret_header(code, "alice"))
        self.assertEqual((status, answer), (200, {"success": True}))
        _, _, listing = self.request("GET", "/rooms/%s/participants" % code)
        self.assertEqual(listing["participants"], [])

    def test_models_lists_online_participants(self):
        code = self.create_room()
        backend = self.backend()
        self.join(code, backend)
        status, _, answer = self.request("GET", "/rooms/%s/v1/models" % code)
        self.assertEqual(status, 200)
        self.assertEqual(answer["object"], "list")
        (model,) = answer["data"]
        self.assertEqual(model["id"], "alice")
        self.assertEqual(model["object"], "model")
        self.assertEqual(model["owned_by"], "Alice")
        self.assertIsInstance(model["created"], int)
        self.assertEqual(model["gambiarra"], {"nickname": "Alice", "model": "fake-model",
                                              "endpoint": backend.url})

    def test_one_model_can_be_retrieved(self):
        code = self.create_room()
        self.join(code, self.backend())
        status, _, model = self.request("GET", "/rooms/%s/v1/models/alice" % code)
        self.assertEqual((status, model["id"], model["object"]), (200, "alice", "model"))
        status, _, answer = self.request("GET", "/rooms/%s/v1/models/nobody" % code)
        self.assertEqual((status, answer["error"]["code"]), (404, "model_not_found"))

    def test_cors_preflight(self):
        status, response, _ = self.request("OPTIONS", "/rooms/ANY/v1/chat/completions")
        self.assertEqual(status, 204)
        self.assertIsNone(response.getheader("Content-Length"))  # RFC 9110 section 8.6
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")
        allowed = response.getheader("Access-Control-Allow-Headers")
        for header in ("Content-Type", "Authorization", "X-Gambiarra-Secret"):
            self.assertIn(header, allowed)

    def test_head_answers_like_get_without_body(self):
        self.create_room()
        status, response, body = self.request("HEAD", "/rooms")
        self.assertEqual(status, 200)
        self.assertEqual(body, b"")
        self.assertGreater(int(response.getheader("Content-Length")), 0)

    def test_unknown_route_and_wrong_method(self):
        status, _, answer = self.request("GET", "/nowhere")
        self.assertEqual(status, 404)
        self.assertIsInstance(answer["error"], str)
        status, response, answer = self.request("PUT", "/rooms")
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("Allow"), "GET, HEAD, OPTIONS, POST")
        self.assertIsInstance(answer["error"], str)

    def test_v1_errors_are_openai_shaped(self):
        code = self.create_room()
        for method, path in (("GET", "/rooms/%s/v1/unknown" % code),
                             ("POST", "/rooms/NOPE99/v1/chat/completions")):
            status, _, answer = self.request(method, path, {"model": "x"})
            self.assertEqual(status, 404)
            self.assertEqual(set(answer["error"]), {"message", "type", "code"})
        status, _, answer = self.request("GET", "/rooms/%s/v1/chat/completions" % code)
        self.assertEqual(status, 405)
        self.assertEqual(answer["error"]["type"], "invalid_request_error")

    def test_bad_json_bodies(self):
        code = self.create_room()
        cases = ((b"{nope", "valid JSON"), (b"[1, 2]", "JSON object"),
                 (b"\xff\xfe", "UTF-8"), (b"", "valid JSON"))
        for path in ("/rooms", "/rooms/%s/join" % code, "/rooms/%s/v1/chat/completions" % code):
            for raw, words in cases:
                status, _, answer = self.request("POST", path, raw=raw)
                self.assertEqual(status, 400, (path, raw))
                error = answer["error"]
                message = error["message"] if isinstance(error, dict) else error
                self.assertIn(words, message)
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_nan_and_blank_values_are_refused(self):
        code = self.create_room()
        status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % code,
                                         raw=b'{"model": "*", "temperature": NaN}')
        self.assertEqual(status, 400)
        self.assertIn("NaN", answer["error"]["message"])
        self.assertEqual(self.request("POST", "/rooms", {"name": "   "})[2],
                         {"error": "Name is required"})

    def test_chat_needs_a_string_model(self):
        code = self.create_room()
        for body, words in (({"messages": []}, "model"), ({"model": 3}, "model"),
                            ({"model": ""}, "model")):
            status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % code,
                                             body)
            self.assertEqual(status, 400)
            self.assertIn(words, answer["error"]["message"])

    def test_no_traceback_or_path_reaches_the_client(self):
        code = self.create_room()
        for raw in (b"{", b"null", b'{"name": {"deep": [1]}}'):
            for path in ("/rooms", "/rooms/%s/join" % code, "/rooms/%s/health" % code):
                _, _, answer = self.request("POST", path, raw=raw)
                text = json.dumps(answer)
                self.assertNotIn("Traceback", text)
                self.assertNotIn(HERE, text)

    def test_malformed_request_line_gets_json_error(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            data = sock.makefile("rb").read()
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
        self.assertIn(b'{"error":', data)
        self.assertEqual(self.request("GET", "/health")[0], 200)


class TestClientFaults(HubTestCase):
    """Clients that misbehave are the client's problem: no 500, no traceback."""

    hub_options = {"client_timeout": 0.3}

    def raw(self, data, linger_reset=False):
        """Send raw bytes; return what the hub answers before closing."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        with sock:
            sock.sendall(data)
            if linger_reset:  # close with RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                return b""
            return sock.makefile("rb").read()

    def test_garbage_request_lines_get_json_400_even_with_debug_logs(self):
        logs = CapturedLogs(self)
        for line in (b"xx\r\n\r\n", b"GET / HTTP/x\r\n\r\n", b"GET /health HTTP/2.0\r\n\r\n",
                     b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
            answer = self.raw(line)
            self.assertRegex(answer, rb"^HTTP/1.1 (400|414|505) ", line[:30])
            self.assertIn(b'{"error":', answer)
        self.assertEqual(logs.at(logging.ERROR), [])
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_garbage_after_a_good_request_on_a_kept_alive_connection(self):
        answer = self.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 ", answer)
        self.assertIn(b"HTTP/1.1 400 ", answer)  # answered, not dropped

    def test_client_stalling_or_resetting_mid_body_is_not_a_hub_error(self):
        logs = CapturedLogs(self)
        head = (b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"name\":")
        self.assertNotIn(b"500", self.raw(head))  # waits for the hub's timeout, then closed
        self.raw(head, linger_reset=True)
        self.assertEqual(self.request("GET", "/health")[0], 200)
        self.assertEqual(logs.at(logging.ERROR), [])

    def test_names_cannot_forge_log_lines(self):
        logs = CapturedLogs(self, logging.INFO)
        status, _, answer = self.request("POST", "/rooms", {
            "name": "evil\n17:00:00 ERROR forged\x1b[31m"})
        self.assertEqual(status, 201)
        lines = [line for message in logs.at(logging.INFO) for line in message.splitlines()]
        self.assertFalse([line for line in lines if line.startswith("17:00:00")], lines)
        self.assertFalse([line for line in lines if "\x1b" in line])

    def test_only_chunked_transfer_coding_and_huge_lengths(self):
        answer = self.raw(b"POST /rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                          b"\r\n\r\n0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 501 "), answer[:40])
        answer = self.raw(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: "
                          b"12345678901234567890123\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:40])

    def test_numbers_in_framing_are_strict(self):
        for header in (b"Content-Length: 1_3", b"Content-Length: +13", b"Content-Length: 13\r\n"
                       b"Content-Length: 14", b"Transfer-Encoding: chunked"):
            body = b"-1\r\n" + b"x" * 100 if b"chunked" in header else b'{"name":"abcd"}'
            answer = self.raw(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\n" + header + b"\r\n\r\n"
                              + body)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (header, answer[:60]))
        self.assertEqual(self.request("GET", "/rooms")[2], {"rooms": []})


# === Safe on a shared Wi-Fi: connections ===
#
# One attendee with a laptop must not take the hub down at the connection
# level. Limits are small here so the tests are fast; the big numbers are in
# the benchmark (python3 test_gambiarra.py bench).

def connect(port, source="127.0.0.1"):
    """A raw client connection from ``source`` (Linux routes all of 127/8 to lo)."""
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S,
                                    source_address=(source, 0))


def read_all(sock):
    """Everything the hub sends until it closes (bounded by the socket timeout)."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def dribble(sock, data, gap):
    """Send ``data`` a piece every ``gap`` seconds (a slow client's own pace,
    not synchronisation) until the hub answers or closes; return the answer
    and the seconds it took."""
    started = time.monotonic()
    for piece in data:
        readable, _, _ = select.select([sock], [], [], gap)
        if readable:
            break
        try:
            sock.sendall(piece)
        except OSError:
            break
    return read_all(sock), time.monotonic() - started


class TestConnectionCaps(HubTestCase):
    """Past the cap a new connection gets a canned 503 and is closed; one
    address cannot take every slot."""

    hub_options = {"max_connections": 3, "max_connections_per_address": 2}

    def setUp(self):
        super().setUp()
        self.logs = CapturedLogs(self, logging.INFO)

    def hold(self, source):
        sock = connect(self.port, source)
        self.addCleanup(sock.close)
        return sock

    def held(self, count):
        return wait_until(lambda: self.hub.server.open_connections() == count)

    def test_past_the_cap_a_503_naming_the_limit_then_room_again(self):
        first = [self.hold("127.0.0.1"), self.hold("127.0.0.2"), self.hold("127.0.0.3")]
        self.assertTrue(self.held(3))
        threads = threading.active_count()
        for _ in range(5):
            with connect(self.port, "127.0.0.4") as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = read_all(sock)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 503 "), answer)
            self.assertIn(b"Connection: close", head)
            self.assertIn(b"Retry-After: ", head)
            self.assertIn("limit of 3 connections", json.loads(body)["error"])
        self.assertEqual(threading.active_count(), threads)  # no thread for a refusal
        refusals = [m for m in self.logs.at(logging.WARNING) if "refusing" in m]
        self.assertEqual(len(refusals), 1, refusals)  # one line per minute, not per refusal
        first[0].close()
        self.assertTrue(self.held(2))
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_one_address_cannot_take_every_slot(self):
        self.hold("127.0.0.2")
        self.hold("127.0.0.2")
        self.assertTrue(self.held(2))
        with connect(self.port, "127.0.0.2") as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"limit of 2 connections per address", answer)
        self.assertEqual(self.request("GET", "/health")[0], 200)  # another address

    def test_the_cap_fits_the_open_file_limit(self):
        with unittest.mock.patch.object(gambiarra, "open_file_limit", return_value=200):
            with gambiarra.Hub(max_connections=1000) as hub:
                self.assertEqual(hub.max_connections, (200 - gambiarra.FD_RESERVE) // 2)
        with unittest.mock.patch.object(gambiarra, "open_file_limit", return_value=None):
            with gambiarra.Hub(max_connections=1000) as hub:
                self.assertEqual(hub.max_connections, 1000)

    def test_addresses_counted_per_ipv4_address_and_ipv6_64(self):
        key = gambiarra.address_key
        self.assertEqual(key("192.168.1.5"), "192.168.1.5")
        self.assertEqual(key("::ffff:192.168.1.5"), "192.168.1.5")
        self.assertEqual(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"))
        self.assertNotEqual(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"))


class TestCrowdedKeepAlive(HubTestCase):
    """Idle keep-alive connections make room when the hub is nearly full."""

    hub_options = {"max_connections": 4, "client_timeout": 5}

    def setUp(self):
        super().setUp()
        self.patch(gambiarra, "BUSY_KEEPALIVE_S", 0.05)

    def kept_alive(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().read()[:1], b"{")
        return conn

    def test_idle_keep_alive_lasts_the_client_timeout_when_there_is_room(self):
        conn = self.kept_alive()
        readable, _, _ = select.select([conn.sock], [], [], 0.2)  # no EOF: still open
        self.assertEqual(readable, [])

    def test_idle_keep_alive_closed_when_the_hub_is_crowded(self):
        conn = self.kept_alive()
        for _ in range(2):  # with the kept-alive one: 3 of 4, the crowded share
            self.addCleanup(connect(self.port).close)
        started = time.monotonic()
        readable, _, _ = select.select([conn.sock], [], [], WAIT_S)
        self.assertEqual(readable, [conn.sock])
        self.assertEqual(conn.sock.recv(1), b"")  # closed without an answer
        self.assertLess(time.monotonic() - started, 2)


class FlakyListener:
    """The hub's listening socket, whose accept() fails with EMFILE for a while."""

    def __init__(self, real, failing_s):
        self.real, self.until, self.attempts = real, time.monotonic() + failing_s, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def accept(self):
        self.attempts += 1
        if time.monotonic() < self.until:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()


class TestAcceptBackoff(HubTestCase):
    def test_out_of_file_descriptors_backs_off_instead_of_spinning(self):
        logs = CapturedLogs(self, logging.INFO)
        server = self.hub.server
        flaky = FlakyListener(server.socket, 0.3)
        server.socket = flaky
        self.addCleanup(setattr, server, "socket", flaky.real)
        started = time.monotonic()
        self.assertEqual(self.request("GET", "/health")[0], 200)  # served once it works
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        # 5, 10, 20 ... 160 ms: 7 or 8 attempts in 0.3 s, where a busy loop makes thousands.
        self.assertLessEqual(flaky.attempts, 10)
        warnings = logs.at(logging.WARNING)
        self.assertEqual(len(warnings), 1, warnings)  # one line per burst
        self.assertIn("Too many open files", warnings[0])
        self.assertIn("accepting connections again", logs.at(logging.INFO))


class TestHeadDeadline(HubTestCase):
    """A whole request head must arrive within --header-timeout, however it is
    dribbled; a kept-alive connection still waits --client-timeout between
    requests."""

    hub_options = {"header_timeout": 0.3, "client_timeout": 5}

    def test_a_client_dribbling_its_head_gets_408_at_the_deadline(self):
        with connect(self.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            answer, took = dribble(sock, [b"X-Slow: %d\r\n" % i for i in range(200)], 0.05)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"Connection: close", answer)
        self.assertIn(b"0.3 s", answer)
        self.assertLess(took, 2)

    def test_a_dribbled_request_line_counts_too(self):
        with connect(self.port) as sock:
            answer, took = dribble(sock, [b"G"] + [b"E"] * 200, 0.05)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)

    def test_a_connection_that_sends_nothing_is_closed_without_an_answer(self):
        with connect(self.port) as sock:
            started = time.monotonic()
            self.assertEqual(read_all(sock), b"")
            self.assertLess(time.monotonic() - started, 2)

    def test_the_deadline_starts_again_with_each_request(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().read()[:1], b"{")
        readable, _, _ = select.select([conn.sock], [], [], 0.4)  # past the head deadline
        self.assertEqual(readable, [])  # idle between requests: kept
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)


class TestHeaderBlockLimit(HubTestCase):
    def test_headers_over_64_kib_in_all_get_431_naming_the_limit(self):
        lines = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 30000) for i in range(3))
        with connect(self.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
            answer = read_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:80])
        self.assertIn(b"limit of 65536 bytes", answer)
        status, _, _ = self.request("GET", "/health", headers={"X-Big": "v" * 60000})
        self.assertEqual(status, 200)

    def test_the_limit_is_settable(self):
        self.hub.max_header_bytes = 1000
        status, _, answer = self.request("GET", "/health", headers={"X-Big": "v" * 1000})
        self.assertEqual(status, 431)
        self.assertIn("1000 bytes", answer["error"])
        self.assertEqual(self.request("GET", "/health", headers={"X-Small": "v" * 500})[0], 200)


class TestMinBodyRate(HubTestCase):
    """A body must keep up --min-body-rate after its grace; a tunnelled
    answer's upload, as slow as its model, need not."""

    hub_options = {"min_body_rate": 1000, "client_timeout": 5}

    def setUp(self):
        super().setUp()
        self.patch(gambiarra, "BODY_GRACE_S", 0.1)

    def test_a_body_slower_than_the_minimum_rate_gets_408(self):
        with connect(self.port) as sock:
            sock.sendall(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 100000\r\n\r\n")
            answer, took = dribble(sock, [b"x" * 10] * 1000, 0.02)  # 500 bytes/s
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"1000 bytes/s", answer)
        self.assertLess(took, 2)

    def test_a_body_at_the_rate_is_read(self):
        body = json.dumps({"name": "x" * 150}).encode()
        with connect(self.port) as sock:
            sock.sendall(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            answer, _ = dribble(sock, [body[i:i + 40] for i in range(0, len(body), 40)], 0.02)
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)

    def test_a_tunnelled_answer_uploads_at_its_models_pace(self):
        code = self.create_room()
        self.join(code, self.backend(), transport="tunnel", endpoint="http://127.0.0.1:9")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", "/rooms/%s/v1/chat/completions" % code, body=json.dumps(
            {"model": "alice", "stream": True}), headers={"Content-Type": "application/json"})
        status, _, job = self.request("GET", "/rooms/%s/tunnel/alice?wait=5" % code,
                                      headers=self.secret_header(code, "alice"))
        self.assertEqual(status, 200)

        def slow_model():
            for i in range(6):
                time.sleep(0.04)  # the model's own pace: 200 bytes/s
                yield b"data: %d\n\n" % i
        status, _, _ = self.request(
            "POST", "/rooms/%s/tunnel/alice/%s" % (code, job["requestId"]), raw=slow_model(),
            headers=dict(self.secret_header(code, "alice"), **{
                "X-Gambiarra-Status": "200", "Content-Type": "text/event-stream"}))
        self.assertEqual(status, 200)
        self.assertEqual(conn.getresponse().read().count(b"data: "), 6)


class TestSendDeadline(HubTestCase):
    """Answers are never buffered by the hub: one waits in the kernel until
    the client reads it or --client-timeout passes (sendall's timeout bounds
    the whole call since Python 3.5), then the connection is dropped."""

    hub_options = {"client_timeout": 0.3}

    def test_a_client_that_pipelines_and_never_reads_is_dropped(self):
        self.create_room("x" * 200)  # answers of about 300 bytes
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):  # until the hub stops reading
            while sent < 50 * 1024 * 1024:
                sent += sock.send(b"GET /rooms HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        self.assertLess(sent, 50 * 1024 * 1024)  # the hub stopped reading: no answers piling up
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: self.hub.server.open_connections() == 0))
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(self.request("GET", "/health")[0], 200)


class TestJsonDepthGuard(unittest.TestCase):
    """json_too_deep: exact about strings, and cheap on any body."""

    def test_brackets_in_strings_never_count_whatever_the_escapes(self):
        for text in ("[" * 1000, '\\"' + "{" * 1000, '\\"[[[[' * 300, "x\\", '\\\\"[' * 600):
            raw = json.dumps({"a": text, "b": [[1]] * 2000}).encode()
            self.assertFalse(gambiarra.json_too_deep(raw), text[:12])
        deep = {"a": '\\"\\\\'}
        for _ in range(600):
            deep = [deep]
        self.assertTrue(gambiarra.json_too_deep(json.dumps(deep).encode()))

    def test_a_long_string_of_brackets_costs_no_memory_to_skip(self):
        raw = json.dumps({"messages": "[]," * (1 << 20)}).encode()  # 3 MiB
        tracemalloc.start()
        try:
            self.assertFalse(gambiarra.json_too_deep(raw))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * len(raw))  # the regex that skipped strings took 445 MiB


class TestDeepJsonInServe(unittest.TestCase):
    """``serve`` runs its threads on a small stack (THREAD_STACK_BYTES): a
    body nested deep enough to overflow it is refused before decoding, on
    every interpreter, and the hub stays up."""

    def test_deeply_nested_json_is_a_400_and_the_hub_stays_up(self):
        process, url, _ = TestServeProcess.start_serve(self, args=["--state", ""])
        for deep in (b"[" * 100000 + b"]" * 100000,
                     b'{"name": ' + b'{"a":' * 100000 + b"1" + b"}" * 100001,
                     b'{"name": "ok", "text": "' + b"[" * 100000 + b'"}'):
            request = urllib.request.Request(url + "/rooms", data=deep, method="POST",
                                              headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=WAIT_S) as response:
                    status, answer = response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                status, answer = exc.code, json.loads(exc.read())
                exc.close()
            if deep.startswith(b'{"name": "ok"'):  # brackets in a string are text
                self.assertEqual(status, 201, answer)
            else:
                self.assertEqual(status, 400, answer)
                self.assertIn("nested too deeply", answer["error"])
        with urllib_open(url + "/health") as response:
            self.assertEqual(response.status, 200)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)

    @unittest.skipUnless(os.path.exists("/proc/self/limits"), "reads /proc")
    def test_serve_raises_the_open_file_limit_as_far_as_its_cap_needs(self):
        try:
            import resource
        except ImportError:
            self.skipTest("no resource module")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 400:
            self.skipTest("hard open files limit too low")

        def low_soft_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        with unittest.mock.patch("subprocess.Popen", functools.partial(
                subprocess.Popen, preexec_fn=low_soft_limit)):
            process, url, _ = TestServeProcess.start_serve(
                self, args=["--state", "", "--max-connections", "150"])
        with open("/proc/%d/limits" % process.pid) as f:
            limit = re.search(r"Max open files\s+(\d+)", f.read()).group(1)
        self.assertEqual(int(limit), gambiarra.FD_RESERVE + 2 * 150)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)


class TestBodyMemory(HubTestCase):
    """One laptop cannot fill the hub's memory with big request bodies: the
    bodies held at once share --max-body-memory; small ones are not counted."""

    hub_options = {"max_body": 1 << 20, "max_body_memory": gambiarra.BODY_MEMORY_FACTOR << 20}

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.join(self.code, self.fake)
        self.path = "/rooms/%s/v1/chat/completions" % self.code

    @staticmethod
    def body(size, **fake):
        return json.dumps({"model": "fake-model", "fake": fake,
                           "messages": [{"role": "user", "content": "x" * size}]}).encode()

    def hold_one(self, size):
        """A body of about ``size`` bytes that the participant's server holds."""
        held = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(held.close)
        body = self.body(size, stall_before=True)
        held.request("POST", self.path, body=body, headers=JSON)
        self.assertTrue(wait_until(lambda: len(self.fake.requests) == 1))
        self.assertEqual(self.hub.body_memory.used, gambiarra.BODY_MEMORY_FACTOR * len(body))
        return held

    def test_big_bodies_share_the_memory_small_ones_pass(self):
        held = self.hold_one(700000)
        status, headers, answer = post_raw(self.port, self.path, self.body(700000))
        self.assertEqual(status, 503)
        self.assertEqual(headers["Retry-After"], str(gambiarra.RETRY_AFTER_S))
        self.assertEqual(json.loads(answer)["error"]["code"], "hub_busy")
        self.assertIn("--max-body-memory", json.loads(answer)["error"]["message"])
        self.assertEqual(self.request("POST", self.path, raw=self.body(30000))[0], 200)
        self.fake.release.set()
        self.assertEqual(held.getresponse().status, 200)
        self.assertTrue(wait_until(lambda: self.hub.body_memory.used == 0))
        self.assertEqual(post_raw(self.port, self.path, self.body(700000))[0], 200)

    def test_a_chunked_body_is_counted_as_it_grows(self):
        self.hold_one(700000)
        status, _, answer = post_raw(self.port, self.path, self.body(400000), chunked=True)
        self.assertEqual(status, 503)
        held = gambiarra.BODY_MEMORY_FACTOR * len(self.body(700000, stall_before=True))
        self.assertTrue(wait_until(lambda: self.hub.body_memory.used == held))  # given back
        self.fake.release.set()

    def test_the_memory_must_hold_one_body_of_the_largest_size(self):
        with self.assertRaises(gambiarra.GambiarraError):
            gambiarra.Hub(max_body=1 << 20,
                          max_body_memory=(gambiarra.BODY_MEMORY_FACTOR << 20) - 1)


class TestBodyLimit(HubTestCase):
    hub_options = {"max_body": 1000}

    def test_oversized_body_is_refused_without_reading_it(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            # Announce 10 MB but send nothing: the answer must come anyway.
            sock.sendall(b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 10000000\r\n\r\n")
            data = sock.makefile("rb").read()
        self.assertTrue(data.startswith(b"HTTP/1.1 413"), data)
        self.assertIn(b"1000 bytes", data)
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_oversized_chunked_body_is_refused(self):
        status, _, answer = self.request("POST", "/rooms", raw=iter([b"x" * 800] * 3))
        self.assertEqual(status, 413)

    def test_chunked_body_within_limit_is_read(self):
        status, _, answer = self.request("POST", "/rooms", raw=iter([b'{"name":', b'"c"}']))
        self.assertEqual((status, answer["room"]["name"]), (201, "c"))

    def test_expect_continue_with_oversized_body(self):
        status, _, answer = self.request("POST", "/rooms", raw=b"x" * 2000,
                                         headers={"Expect": "100-continue"})
        self.assertEqual(status, 413)
        self.assertIn("limit", answer["error"])


# === Relay ===

class OneParticipantTestCase(HubTestCase):
    """A room with one direct participant, alice, on a fake backend."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.join(self.code, self.fake)
        self.chat_path = "/rooms/%s/v1/chat/completions" % self.code


class TestRelay(OneParticipantTestCase):
    def test_non_streaming_answer_is_relayed_with_model_replaced(self):
        status, response, answer = self.chat(self.code, "alice", temperature=0.5,
                                             extra={"kept": [1, "ü"]})
        self.assertEqual(status, 200)
        self.assertEqual(answer["choices"][0]["message"]["content"], "tok0 tok1 tok2 ")
        sent = self.fake.last_body()
        self.assertEqual(sent["model"], "fake-model")
        self.assertEqual(sent["temperature"], 0.5)
        self.assertEqual(sent["extra"], {"kept": [1, "ü"]})
        self.assertEqual(sent["messages"], [{"role": "user", "content": "hi"}])

    def test_backend_errors_are_passed_through(self):
        status, response, answer = self.chat(self.code, "alice", fake={"status": 422})
        self.assertEqual(status, 422)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertEqual(answer["error"]["message"], "fake failure")

    def test_stream_is_relayed_event_by_event(self):
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        # The backend holds the second event until released: the first must
        # already be here, so the hub does not buffer.
        first = response.read1(65536)
        self.assertIn(b'"seq": 0', first)
        self.fake.release.set()
        rest = response.read()
        events = sse_events(first + rest)
        self.assertEqual([json.loads(d)["seq"] for _, d in events[:-1]], [0, 1, 2])
        self.assertEqual(events[-1][1], "[DONE]")

    def test_keep_alive_connection_serves_several_requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        for stream in (False, True, False):
            conn.request("POST", self.chat_path, body=json.dumps(
                {"model": "*", "stream": stream}).encode(), headers=JSON)
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            self.assertIn(b"tok2", response.read())
        self.assertIsNotNone(conn.sock)  # never reconnected

    def test_clients_hanging_up_after_an_answer_do_not_spoil_pooled_connections(self):
        # Regression: the watcher used to abort a connection already back in the pool.
        for _ in range(150):
            status, _, _ = self.chat(self.code, "alice")  # a fresh connection, then closed
            self.assertEqual(status, 200)
        self.assertEqual(self.fake.connections, 1)  # one pooled connection served all

    def test_completions_and_embeddings_are_routed(self):
        path = "/rooms/%s/v1/completions" % self.code
        status, _, answer = self.request("POST", path, {"model": "fake-model", "prompt": "x"})
        self.assertEqual((status, answer["choices"][0]["text"]), (200, "tok0 tok1 tok2 "))
        self.assertEqual(self.fake.requests[-1][0], "/v1/completions")
        path = "/rooms/%s/v1/embeddings" % self.code
        status, _, answer = self.request("POST", path, {"model": "fake-model", "input": "x"})
        self.assertEqual((status, answer["data"][0]["embedding"]), (200, [0.1, 0.2, 0.3]))
        self.assertEqual(self.fake.requests[-1], ("/v1/embeddings",
                                                  {"model": "fake-model", "input": "x"}))

    def test_endpoint_with_v1_suffix_is_not_doubled(self):
        other = self.backend(models=["other"])
        self.join(self.code, other, pid="bob", endpoint=other.url + "/v1/")
        status, _, _ = self.chat(self.code, "bob")
        self.assertEqual(status, 200)
        self.assertEqual(other.requests[-1][0], "/v1/chat/completions")

    def test_backend_dies_mid_stream_ends_with_error_event(self):
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "stream": True, "fake": {"chunks": 5, "die_after": 2}})
        self.assertEqual(response.status, 200)
        events = sse_events(response.read())  # the stream must end, not hang
        self.assertEqual(len(events), 3)
        error = json.loads(events[-1][1])["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertEqual(error["code"], "backend_disconnected")

    def test_client_leaving_closes_the_backend_connection(self):
        for fake in ({"stall_before": True}, {"chunks": 3, "stall_after": 1}):
            self.fake.disconnected.clear()
            count = len(self.fake.requests)
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
            conn.request("POST", self.chat_path, body=json.dumps(
                {"model": "alice", "stream": True, "fake": fake}).encode(), headers=JSON)
            self.assertTrue(wait_until(lambda: len(self.fake.requests) > count))
            hang_up(conn)
            self.assertTrue(self.fake.disconnected.wait(WAIT_S), fake)
        self.assertEqual(self.request("GET", "/health")[0], 200)
        self.assertTrue(wait_until(lambda: self.request(
            "GET", "/rooms/%s/participants" % self.code)[2]["participants"][0]["inFlight"] == 0))

    def test_a_client_hanging_up_is_no_error_of_the_participant(self):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        response.read1(65536)
        hang_up(conn, response)
        name, data = events.next_event(skip=("connected", "llm:request"))
        self.assertEqual(name, "llm:cancelled")
        self.assertIn("client went away", data["reason"])
        self.assertEqual(data["participantId"], "alice")
        participant = self.hub.registry.participants_json(self.code)[0]
        self.assertEqual((participant["metrics"]["requests"], participant["metrics"]["errors"]),
                         (1, 0))

    def test_client_leaving_a_non_streaming_request_closes_the_backend(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        conn.request("POST", self.chat_path, body=json.dumps(
            {"model": "alice", "fake": {"stall_before": True}}).encode(), headers=JSON)
        self.assertTrue(wait_until(lambda: self.fake.requests))
        hang_up(conn)
        self.assertTrue(self.fake.disconnected.wait(WAIT_S))

    def test_metrics_and_events_after_a_request(self):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        self.assertEqual(events.next_event()[0], "connected")
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "stream": True, "fake": {"chunks": 4, "usage": True, "delay": 0.005}})
        response.read()
        name, request = events.next_event()
        self.assertEqual((name, request["participantId"], request["model"]),
                         ("llm:request", "alice", "alice"))
        name, complete = events.next_event()
        self.assertEqual(name, "llm:complete")
        self.assertEqual(complete["status"], 200)
        self.assertEqual(complete["tokens"], 42)  # from the backend's usage
        for field in ("ttftMs", "durationMs", "tokensPerSecond"):
            self.assertIsInstance(complete[field], (int, float), field)
        _, _, listing = self.request("GET", "/rooms/%s/participants" % self.code)
        metrics = listing["participants"][0]["metrics"]
        self.assertEqual((metrics["requests"], metrics["errors"]), (1, 0))
        self.assertIsNotNone(metrics["ttftMs"])
        self.assertIsNotNone(metrics["ttftMedianMs"])

    def test_client_closing_right_after_done_is_a_complete_answer(self):
        for fake in ({"pause_after_done": 0.5}, {"split_done": 0.05, "pause_after_done": 0.5}):
            self.closing_after_done_is_complete(fake)

    def closing_after_done_is_complete(self, fake):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            body = json.dumps({"model": "alice", "stream": True, "fake": fake}).encode()
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (self.chat_path.encode(), len(body),
                                                             body))
            data = b""
            while b"NE]\n\n" not in data:  # the end of "data: [DONE]", maybe in two chunks
                data += sock.recv(65536)
        _, complete = events.next_event(skip=("connected", "llm:request"))
        self.assertEqual(complete["status"], 200)  # llm:complete, not llm:error

    def test_backend_failures_are_logged_once_a_minute(self):
        logs = CapturedLogs(self, logging.INFO)
        self.join(self.code, self.fake, pid="ghost", endpoint="http://127.0.0.1:%d" % free_port())
        for _ in range(3):
            self.assertEqual(self.chat(self.code, "ghost")[0], 502)
        warnings = logs.at(logging.WARNING)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("ghost", warnings[0])

    def test_closing_the_hub_mid_stream_ends_it_with_an_error_event(self):
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        first = response.read1(65536)
        self.assertIn(b'"seq": 0', first)
        waiting = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(waiting.close)
        waiting.request("POST", self.chat_path, body=json.dumps(
            {"model": "alice", "fake": {"stall_before": True}}).encode(), headers=JSON)
        self.assertTrue(wait_until(lambda: len(self.fake.requests) == 2))
        logs = CapturedLogs(self, logging.WARNING)
        self.hub.close()
        self.assertEqual(logs.at(logging.WARNING), [])  # nobody's fault
        events = sse_events(first + response.read())
        self.assertEqual(json.loads(events[-1][1])["error"]["code"], "hub_closing")
        answer = waiting.getresponse()
        self.assertEqual(answer.status, 503)
        self.assertEqual(json.loads(answer.read())["error"]["code"], "hub_closing")

    def test_tokens_are_counted_from_chunks_without_usage(self):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        self.open_stream(self.chat_path, {"model": "alice", "stream": True,
                                          "fake": {"chunks": 5}})[1].read()
        _, complete = events.next_event(skip=("connected", "llm:request"))
        self.assertEqual(complete["tokens"], 5)


class TestBusyParticipants(HubTestCase):
    """maxConcurrent is a promise: extra requests queue, first come first served."""

    hub_options = {"queue_timeout": 5}

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.path = "/rooms/%s/v1/chat/completions" % self.code

    def send(self, model, tag, stall=True):
        """Start a request without reading its answer; return its connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        body = {"model": model, "tag": tag}
        if stall:
            body["fake"] = {"stall_before": True}
        conn.request("POST", self.path, body=json.dumps(body).encode(), headers=JSON)
        return conn

    def tags_seen(self):
        with self.fake.lock:
            return [body.get("tag") for _, body in self.fake.requests]

    def test_a_full_participant_gets_no_more_and_queued_requests_go_in_order(self):
        self.join(self.code, self.fake, maxConcurrent=1)
        first = self.send("alice", 1)
        self.assertTrue(wait_until(lambda: self.tags_seen() == [1]))
        waiting = self.hub.registry._rooms[self.code].waiting
        later = []
        for tag, model in ((2, "fake-model"), (3, "*")):  # one after the other reaches the hub
            later.append(self.send(model, tag, stall=False))
            self.assertTrue(wait_until(lambda: len(waiting) == tag - 1))
        # Both wait in the hub: the backend still sees one request only.
        _, _, listing = self.request("GET", "/rooms/%s/participants" % self.code)
        self.assertEqual((listing["participants"][0]["status"],
                          listing["participants"][0]["inFlight"]), ("busy", 1))
        self.assertEqual(self.tags_seen(), [1])
        self.fake.release.set()
        for conn in [first] + later:
            self.assertEqual(conn.getresponse().status, 200)
        self.assertEqual(self.tags_seen(), [1, 2, 3])

    def test_a_new_participant_takes_queued_requests(self):
        self.join(self.code, self.fake, maxConcurrent=1)
        self.send("fake-model", 1)
        self.assertTrue(wait_until(lambda: self.tags_seen() == [1]))
        queued = self.send("fake-model", 2, stall=False)
        self.assertTrue(wait_until(lambda: self.hub.registry._rooms[self.code].waiting))
        other = self.backend()
        self.join(self.code, other, pid="bob", maxConcurrent=1)
        self.assertEqual(queued.getresponse().status, 200)
        self.assertEqual(other.last_body()["tag"], 2)
        self.fake.release.set()


class TestQueueTimeout(HubTestCase):
    hub_options = {"queue_timeout": 0.2}

    def test_waiting_too_long_gives_503_with_retry_after(self):
        code = self.create_room()
        fake = self.backend()
        busy = self.keep_busy(code, fake)
        status, response, answer = self.chat(code, "alice")
        self.assertEqual(status, 503)
        self.assertEqual(answer["error"]["code"], "participants_busy")
        self.assertEqual(response.getheader("Retry-After"), "5")
        self.assertEqual(self.hub.registry._rooms[code].waiting, collections.deque())
        fake.release.set()
        self.assertEqual(busy.getresponse().status, 200)


class TestRelayTimeouts(HubTestCase):
    hub_options = {"backend_timeout": 0.3, "connect_timeout": 0.5}

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.join(self.code, self.fake)

    def test_silent_backend_before_the_answer_gives_504(self):
        status, _, answer = self.chat(self.code, "alice", fake={"stall_before": True})
        self.assertEqual(status, 504)
        self.assertEqual(answer["error"]["code"], "backend_timeout")

    def test_silent_backend_mid_stream_ends_with_error_event(self):
        conn, response = self.open_stream("/rooms/%s/v1/chat/completions" % self.code, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        events = sse_events(response.read())
        self.assertEqual(json.loads(events[0][1])["seq"], 0)
        self.assertEqual(json.loads(events[-1][1])["error"]["code"], "backend_timeout")

    def test_unreachable_backend_gives_502_and_an_llm_error_event(self):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        self.join(self.code, self.fake, pid="ghost", endpoint="http://127.0.0.1:%d" % free_port())
        status, _, answer = self.chat(self.code, "ghost")
        self.assertEqual(status, 502)
        self.assertEqual(answer["error"]["code"], "backend_unreachable")
        self.assertEqual(answer["error"]["type"], "server_error")
        _, error = events.next_event(skip=("connected", "participant:joined", "llm:request"))
        self.assertEqual(error["participantId"], "ghost")
        self.assertIsInstance(error["error"], str)


# === Real sizes, lying backends, loops ===

MIB = 1024 * 1024


def big_chat_body(size, model="fake-model"):
    """A chat body of exactly ``size`` bytes that re-encoding would change:
    non-ASCII text, an emoji, spaces and a number spelt "1.0e2"."""
    head = ('{ "model" : "%s",  "temperature": 1.0e2, "messages": [{"role": "user", '
            '"content": "' % model).encode()
    tail = '"}] }'.encode()
    unit = "ção 😀 ".encode()
    filler = size - len(head) - len(tail)
    text = unit * (filler // len(unit)) + b"x" * (filler % len(unit))
    return head + text + tail


def send_in_segments(sock, data, segment=1448):
    """Send like a real network does: many small segments."""
    view = memoryview(data)
    for start in range(0, len(data), segment):
        sock.sendall(view[start:start + segment])


def post_raw(port, path, body, chunked=False, segment=1448):
    """POST ``body`` on a raw socket in small segments (Content-Length or
    chunked framing); return (status, headers bytes, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n%s\r\n\r\n" % (path.encode(), framing))
        if chunked:
            pieces = [b"%x\r\n%s\r\n" % (len(body[i:i + segment]), body[i:i + segment])
                      for i in range(0, len(body), segment)]
            send_in_segments(sock, b"".join(pieces) + b"0\r\n\r\n", segment + 8)
        else:
            send_in_segments(sock, body, segment)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.msg, response.read()


class TestRealSizes(HubTestCase):
    """Regression: the body reader added the remaining Content-Length on every
    read, so a 1.1 MB prompt got 413 and a 50 KB room name too."""

    def test_long_prompts_reach_the_backend_byte_identical(self):
        code = self.create_room()
        fake = self.backend()
        self.join(code, fake)
        path = "/rooms/%s/v1/chat/completions" % code
        for size in (1 * MIB, 2 * MIB, 8 * MIB, 30 * MIB):
            body = big_chat_body(size)
            for chunked in (False, True):
                status, _, answer = post_raw(self.port, path, body, chunked=chunked)
                self.assertEqual(status, 200, (size, chunked, answer[:200]))
                with fake.lock:
                    received = fake.raw_requests[-1][0]
                self.assertEqual(len(received), len(body), (size, chunked))
                self.assertTrue(received == body, (size, chunked))  # not assertEqual: 30 MiB

    def test_only_the_model_is_rewritten(self):
        code = self.create_room()
        fake = self.backend()
        self.join(code, fake, pid="alice")
        body = big_chat_body(100000, model="alice")
        status, _, _ = post_raw(self.port, "/rooms/%s/v1/chat/completions" % code, body)
        self.assertEqual(status, 200)
        expected = body.replace(b'"model" : "alice"', b'"model" : "fake-model"', 1)
        self.assertTrue(fake.raw_requests[-1][0] == expected)


class TestBodyLimitExactly(HubTestCase):
    hub_options = {"max_body": 100000}

    def body_of(self, size):
        return b'{"name": "x"' + b" " * (size - 13) + b"}"

    def test_the_limit_is_accepted_and_one_byte_more_refused(self):
        for chunked in (False, True):
            status, _, answer = post_raw(self.port, "/rooms", self.body_of(100000), chunked)
            self.assertEqual(status, 201, (chunked, answer))
            status, _, answer = post_raw(self.port, "/rooms", self.body_of(100001), chunked)
            self.assertEqual(status, 413, chunked)
            self.assertIn(b"100000 bytes", answer)

    def test_a_50_kb_room_creation_is_read_whole(self):
        name = "n" * 190
        body = json.dumps({"name": name, "padding": "p" * 50000}).encode()
        status, _, answer = post_raw(self.port, "/rooms", body)
        self.assertEqual(status, 201, answer)
        self.assertEqual(json.loads(answer)["room"]["name"], name)


class TestBadJson(HubTestCase):
    def test_deep_nesting_is_a_400_naming_the_problem(self):
        code = self.create_room()
        logs = CapturedLogs(self, logging.ERROR)
        for path in ("/rooms", "/rooms/%s/v1/chat/completions" % code, "/rooms/%s/join" % code):
            for deep in (b"[" * 100000 + b"]" * 100000,
                         b'{"model": "x", "m": ' + b"[" * 100000 + b"]" * 100000 + b"}"):
                status, _, answer = self.request("POST", path, raw=deep)
                self.assertEqual(status, 400, (path, answer))
                message = answer["error"] if path == "/rooms" or "/join" in path else \
                    answer["error"]["message"]
                self.assertIn("nested too deeply", message)
        self.assertEqual(logs.at(logging.ERROR), [])


class TestClientsFaceDeepJson(unittest.TestCase):
    def test_absurdly_deep_json_from_a_hub_or_server_is_no_traceback(self):
        deep = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        self.assertEqual(gambiarra._json_or_empty(deep), {})
        self.assertEqual(gambiarra._json_or_text(deep.decode()), deep.decode())
        with self.assertRaises(gambiarra.GambiarraError):
            gambiarra.chat_json(deep)
        self.assertIsNone(gambiarra.TunnelJob.parse(b'{"requestId": "x", "path": "/v1/x", '
                                                    b'"body": ' + deep + b"}"))


class RawBackend:
    """A backend that answers with bytes a test writes itself:
    ``answer(request_body)`` returns the bytes to send for each request, or
    a list of byte strings sent 50 ms apart (``answered`` counts requests
    whose bytes were all sent)."""

    def __init__(self, answer):
        self.answer = answer
        self.answered = threading.Semaphore(0)
        self.listener = socket.create_server(("127.0.0.1", 0)) if hasattr(
            socket, "create_server") else self._listen()
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.connections = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _listen():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        return sock

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    def talk(self, conn):
        reader = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                parts = self.answer(reader.read(length))
                for number, part in enumerate([parts] if isinstance(parts, bytes) else parts):
                    if number:
                        time.sleep(0.05)  # the backend's own pace, not the test's
                    conn.sendall(part)
                self.answered.release()
        except OSError:
            return
        finally:
            reader.close()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone would not
        self.listener.close()
        for conn in self.connections:
            conn.close()
        self.thread.join(WAIT_S)


def http_answer(body, status=b"200 OK", extra=b""):
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body))


class TestLyingBackends(HubTestCase):
    def setUp(self):
        super().setUp()
        self.code = self.create_room()

    def raw_backend(self, answer):
        backend = RawBackend(answer)
        self.addCleanup(backend.close)
        self.join(self.code, backend, pid="liar", model="m", endpoint=backend.url)
        return backend

    @staticmethod
    def private_answer(body):
        user = json.loads(body)["user"]
        return json.dumps({"choices": [{"message": {"content": "for %s only" % user}}]}).encode()

    def test_interim_answers_are_skipped_and_never_reach_the_next_user(self):
        for interim in (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
                        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"):
            self.raw_backend(lambda body: interim + http_answer(self.private_answer(body)))
            for user in ("user-1", "user-2", "user-3"):
                status, _, answer = self.chat(self.code, "liar", user=user)
                self.assertEqual(status, 200, answer)
                self.assertEqual(answer["choices"][0]["message"]["content"], "for %s only" % user)
            self.request("DELETE", "/rooms/%s/leave/liar" % self.code,
                         headers=self.secret_header(self.code, "liar"))

    def test_unsolicited_bytes_on_a_pooled_connection_are_never_an_answer(self):
        leak = http_answer(b'{"leaked": "someone else\'s answer"}')
        backend = self.raw_backend(lambda body: [http_answer(self.private_answer(body)), leak])
        for user in ("user-1", "user-2", "user-3"):
            status, _, answer = self.chat(self.code, "liar", user=user)
            self.assertEqual((status, answer.get("choices", [{}])[0].get("message")),
                             (200, {"content": "for %s only" % user}))
            self.assertTrue(backend.answered.acquire(timeout=WAIT_S))  # the leak is out too

    def test_broken_answer_heads_are_a_502_before_any_byte(self):
        cases = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                 b"HTTP/1.1 103 Early Hints\r\n\r\n" * 20,
                 http_answer(b"{}", status=b"700 Odd"),
                 b"HTTP/1.1 200 OK\r\nContent-Type: text/html\x1b]0;pwned\x07\r\n"
                 b"Set-Cookie: a=b\r\nContent-Length: 2\r\n\r\n{}")
        cases += (b"the end of someone else's private answer\r\n\r\n",)
        for raw in cases:
            self.raw_backend(lambda body: raw)
            status, response, answer = self.chat(self.code, "liar", user="u")
            self.assertNotIn("private", answer["error"]["message"])  # never echoed
            self.assertEqual((status, answer["error"]["code"]), (502, "backend_invalid_answer"),
                             raw[:40])
            self.assertIsNone(response.getheader("Set-Cookie"))
            self.request("DELETE", "/rooms/%s/leave/liar" % self.code,
                         headers=self.secret_header(self.code, "liar"))


class TestBigAnswers(OneParticipantTestCase):
    def test_a_sized_answer_is_relayed_as_it_arrives(self):
        size = 8 * MIB
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
        self.addCleanup(conn.close)
        conn.request("POST", self.chat_path, body=json.dumps(
            {"model": "alice", "fake": {"sized": size, "stall_mid": True}}).encode(), headers=JSON)
        response = conn.getresponse()  # the backend holds back its second half (for 10 s)
        self.assertEqual((response.status, response.getheader("Content-Length")),
                         (200, str(size)))
        first = response.read(size // 4)  # so this comes from a hub that does not buffer
        self.fake.release.set()
        data = first + response.read()
        self.assertEqual(data, (bytes(range(256)) * 256) * (size // 65536))
        self.assertEqual(self.chat(self.code, "alice")[0], 200)
        self.assertEqual(self.fake.connections, 1)  # read to its end, so pooled and reused

    def test_a_sized_answer_cut_short_is_short_for_the_client_and_an_error(self):
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        conn, response = self.open_stream(self.chat_path, {
            "model": "alice", "fake": {"sized": 4 * MIB, "cut": MIB}})
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            response.read()
        _, error = events.next_event(skip=("connected", "llm:request"))
        self.assertIn("broke off", error["error"])
        self.assertEqual(self.chat(self.code, "alice")[0], 200)  # not on the broken connection


class TestLoops(HubTestCase):
    def test_an_endpoint_leading_back_to_the_hub_is_a_508(self):
        code = self.create_room()
        self.join(code, self.backend(), pid="loop", model="m",
                  endpoint="http://127.0.0.1:%d/rooms/%s" % (self.port, code))
        events = EventStream(self.port, code)
        self.addCleanup(events.close)
        threads = threading.active_count()
        status, _, answer = self.chat(code, "loop")
        self.assertEqual(status, 508)
        self.assertEqual(set(answer["error"]), {"message", "type", "code"})
        self.assertEqual(answer["error"]["code"], "loop_detected")
        requests = [events.next_event(skip=("connected",))[0]]
        requests.append(events.next_event(skip=("connected",))[0])
        self.assertEqual(requests, ["llm:request", "llm:complete"])  # once, not recursively
        self.assertTrue(wait_until(lambda: threading.active_count() <= threads + 1))

    def test_a_request_that_passed_too_many_hubs_is_a_508(self):
        code = self.create_room()
        via = ", ".join("1.1 hub-%d" % i for i in range(gambiarra.MAX_VIA_HOPS))
        status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % code,
                                         {"model": "*"}, headers={"Via": via})
        self.assertEqual((status, answer["error"]["code"]), (508, "loop_detected"))

    def test_a_via_header_that_cannot_be_relayed_is_a_400(self):
        code = self.create_room()
        logs = CapturedLogs(self, logging.ERROR)
        for via in ("1.1 a\x01b", "1.1 " + "x" * 2000):
            status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % code,
                                             {"model": "*"}, headers={"Via": via})
            self.assertEqual((status, answer["error"]["code"]), (400, "invalid_request"))
        self.assertEqual(logs.at(logging.ERROR), [])

    def test_the_backend_is_told_the_way_the_request_came(self):
        code = self.create_room()
        fake = self.backend()
        self.join(code, fake)
        self.assertEqual(self.request("POST", "/rooms/%s/v1/chat/completions" % code,
                                      {"model": "alice"}, headers={"Via": "1.1 proxy"})[0], 200)
        self.assertEqual(fake.raw_requests[-1][1]["Via"], "1.1 proxy, 1.1 " + self.hub.via_name)


class TestRouting(HubTestCase):
    def setUp(self):
        super().setUp()
        self.code = self.create_room()

    def served_by(self, model):
        status, _, answer = self.chat(self.code, model)
        self.assertEqual(status, 200, answer)
        return answer["model"]

    def test_model_forms(self):
        llama = self.backend(models=["llama3:latest"])
        qwen = self.backend(models=["qwen2"])
        self.join(self.code, llama, pid="alice")
        self.join(self.code, qwen, pid="bob")
        self.assertEqual(self.served_by("alice"), "llama3:latest")
        self.assertEqual(self.served_by("bob"), "qwen2")
        self.assertEqual(self.served_by("model:qwen2"), "qwen2")
        self.assertEqual(self.served_by("qwen2"), "qwen2")
        self.assertEqual(self.served_by("llama3"), "llama3:latest")
        self.assertEqual(self.served_by("model:llama3:latest"), "llama3:latest")
        self.assertIn(self.served_by("*"), ("llama3:latest", "qwen2"))
        self.assertIn(self.served_by("any"), ("llama3:latest", "qwen2"))

    def test_unknown_model_lists_online_models(self):
        self.join(self.code, self.backend(models=["qwen2"]))
        status, _, answer = self.chat(self.code, "mistral")
        self.assertEqual(status, 404)
        self.assertIn("qwen2", answer["error"]["message"])
        self.assertEqual(answer["error"]["code"], "model_not_found")

    def test_least_busy_participant_is_picked(self):
        first, second = self.backend(), self.backend()
        self.join(self.code, first, pid="alice")
        conn, _ = None, None
        # Keep alice busy with a stalled request, then bob joins with the same model.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", "/rooms/%s/v1/chat/completions" % self.code, body=json.dumps(
            {"model": "fake-model", "fake": {"stall_before": True}}).encode(), headers=JSON)
        self.assertTrue(wait_until(lambda: first.requests))
        self.join(self.code, second, pid="bob")
        for _ in range(5):
            self.assertEqual(self.chat(self.code, "fake-model")[0], 200)
        self.assertEqual(len(second.requests), 5)
        first.release.set()
        self.assertEqual(conn.getresponse().status, 200)

    def test_failover_to_another_participant_when_one_is_unreachable(self):
        good = self.backend()
        self.join(self.code, good, pid="dead", endpoint="http://127.0.0.1:%d" % free_port())
        self.join(self.code, good, pid="alive")
        for _ in range(4):
            status, _, _ = self.chat(self.code, "fake-model")
            self.assertEqual(status, 200)
        _, _, listing = self.request("GET", "/rooms/%s/participants" % self.code)
        dead = [p for p in listing["participants"] if p["id"] == "dead"][0]
        self.assertLessEqual(dead["metrics"]["errors"], 1)  # then avoided


# === Safe on a shared Wi-Fi: routing, endpoints, caps ===

def join_body(pid, model, endpoint, **extra):
    body = {"id": pid, "nickname": pid, "model": model, "endpoint": endpoint}
    body.update(extra)
    return body


class TestRoutingCannotBeHijacked(HubTestCase):
    """Ids and served models stay apart, so a participant receives only the
    requests for its id or its model."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.llama = self.backend(models=["llama3:latest"])
        self.mallory = self.backend(models=["llama3"])  # the attacker's own server

    def raw_join(self, pid, model, backend=None, **extra):
        backend = backend or self.mallory
        return self.request("POST", "/rooms/%s/join" % self.code,
                            join_body(pid, model, backend.url, **extra))

    def test_wildcard_and_model_ids_are_refused(self):
        for pid in ("*", "any", "model:llama3", "model:", "model:*"):
            status, _, answer = self.raw_join(pid, "mistral")
            self.assertEqual(status, 400, pid)
            self.assertIn("'*' or 'any' or start with 'model:'", answer["error"])
        with self.assertRaises(gambiarra.ApiError):  # the registry refuses them too
            self.hub.registry.join(self.code, dict(
                join_body("*", "m", self.mallory.url), specs={}, config={}, maxConcurrent=1))
        self.assertEqual(self.hub.registry.participants_json(self.code), [])

    def test_an_id_naming_a_served_model_is_refused(self):
        self.join(self.code, self.llama, pid="alice")
        for pid in ("llama3", "llama3:latest"):
            status, _, answer = self.raw_join(pid, "mistral")
            self.assertEqual(status, 409, pid)
            self.assertIn("names a model served in this room ('llama3:latest')", answer["error"])

    def test_a_model_named_like_another_participants_id_is_refused(self):
        self.join(self.code, self.llama, pid="bob")
        for model in ("bob", "bob:latest"):
            status, _, answer = self.raw_join("mallory", model)
            self.assertEqual(status, 409, model)
            self.assertIn("has the name of participant 'bob'", answer["error"])

    def test_an_id_naming_its_own_model_is_refused(self):
        # Else the next participant serving that model would be refused for it.
        for pid, model in (("phi3", "phi3"), ("phi3", "phi3:latest"), ("phi3:latest", "phi3")):
            status, _, answer = self.raw_join(pid, model)
            self.assertEqual(status, 409, (pid, model))
            self.assertIn("names the model it serves", answer["error"])

    def test_a_legit_participant_keeps_every_request(self):
        self.join(self.code, self.llama, pid="alice")
        for pid in ("*", "any", "llama3", "model:llama3", "llama3:latest"):
            self.assertIn(self.raw_join(pid, "llama3")[0], (400, 409), pid)
        for requested in ("*", "llama3", "model:llama3"):
            for _ in range(10):
                status, _, answer = self.chat(self.code, requested)
                self.assertEqual(status, 200, answer)
        self.assertEqual(len(self.llama.requests), 30)
        self.assertEqual(self.mallory.requests, [])

    def test_a_rejoin_with_its_own_id_and_secret_still_works(self):
        self.join(self.code, self.llama, pid="alice")
        secret = self.secrets[self.code, "alice"]
        for model in ("llama3:latest", "qwen2"):  # the same model, or another one
            status, _, answer = self.raw_join("alice", model, self.llama, secret=secret)
            self.assertEqual(status, 201, answer)
            secret = answer["secret"]
        self.assertEqual(len(self.hub.registry.participants_json(self.code)), 1)

    def test_a_name_that_is_an_id_and_a_model_goes_to_the_models_servers(self):
        # Defence in depth: joins never let this happen; a participant put in
        # behind the registry's back plays a room where it did anyway.
        self.join(self.code, self.llama, pid="alice")
        intruder = gambiarra.Participant(dict(join_body("llama3", "mistral", self.mallory.url),
                                              specs={}, config={}, maxConcurrent=4),
                                         self.hub.registry.clock)
        with self.hub.registry._lock:
            self.hub.registry._rooms[self.code].participants["llama3"] = intruder
        for _ in range(10):
            self.assertEqual(self.chat(self.code, "llama3")[0], 200)
        self.assertEqual((len(self.llama.requests), self.mallory.requests), (10, []))


class TestIdRules(unittest.TestCase):
    """The registry's own checks, without a hub."""

    def test_racing_joins_cannot_both_pass(self):
        registry = gambiarra.Registry(30, 600)
        for _ in range(30):
            code = registry.create_room("race")["code"]
            bodies = (join_body("llama3", "mistral", "http://192.0.2.1:11434"),
                      join_body("alice", "llama3", "http://192.0.2.2:11434"))
            start, outcomes = threading.Barrier(2), []

            def join(body):
                start.wait(WAIT_S)
                try:
                    registry.join(code, dict(body, specs={}, config={}, maxConcurrent=1))
                    outcomes.append(201)
                except gambiarra.ApiError as exc:
                    outcomes.append(exc.status)

            threads = [threading.Thread(target=join, args=(body,)) for body in bodies]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            self.assertEqual(sorted(outcomes), [201, 409])

    def test_default_ids_are_never_refused(self):
        for nickname in ("*", "any", "model:llama3", "llama3", "", "a" * 300):
            pid = gambiarra.default_participant_id(nickname)
            gambiarra.check_participant_id(pid)  # raises if refused
            self.assertFalse(gambiarra.names_one_model(pid, nickname), pid)


class TestEndpointsOnTheHubMachine(HubTestCase):
    """A direct participant on another machine cannot make the hub call the
    services of the hub's own machine. The tests' clients all run on this
    machine: "from another machine" is simulated by replacing the hub's
    same_machine() decision, which is tested on its own first."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()  # listens on the hub machine's loopback only
        self.port_of_fake = urllib.parse.urlsplit(self.fake.url).port

    def as_remote_client(self):
        self.hub.same_machine = lambda client, arrived_on: False

    def raw_join(self, endpoint, pid="mallory", **extra):
        return self.request("POST", "/rooms/%s/join" % self.code,
                            join_body(pid, "fake-model", endpoint, **extra))

    def test_which_clients_are_this_machine(self):
        same = gambiarra.same_machine
        for client in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(same(client, "127.0.0.1"), client)
        for address in gambiarra.local_ipv4_addresses():
            self.assertTrue(same(address, "127.0.0.1"), address)  # our own LAN address
        self.assertTrue(same("198.51.100.7", "198.51.100.7"))  # the address it reached
        for client in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::7", "not an address"):
            self.assertFalse(same(client, "127.0.0.1"), client)

    def test_which_addresses_lead_into_the_hub_machine(self):
        reason = gambiarra.hub_machine_reason
        for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
            self.assertEqual(reason(address), "a loopback address", address)
        for address in ("169.254.169.254", "fe80::1", "fe80::1%lo"):
            self.assertEqual(reason(address), "a link-local address", address)
        for address in ("0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"):
            self.assertEqual(reason(address), "an unspecified address", address)
        for address in gambiarra.local_ipv4_addresses():
            self.assertEqual(reason(address), "an address of the hub's own machine")
        for address in ("192.0.2.7", "8.8.8.8", "2001:db8::7"):
            self.assertIsNone(reason(address), address)

    def test_a_remote_join_naming_the_hub_machine_is_refused(self):
        self.as_remote_client()
        port = self.port_of_fake
        endpoints = ["http://%s:%d" % (host, port) for host in (
            "127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "127.1",
            "2130706433", "0x7f.1")]
        endpoints += ["http://169.254.169.254/latest", "http://[fe80::1]:%d" % port,
                      "https://127.0.0.1:%d/v1" % self.hub.port]
        endpoints += ["http://%s:%d" % (a, port) for a in gambiarra.local_ipv4_addresses()]
        for endpoint in endpoints:
            status, _, answer = self.raw_join(endpoint)
            self.assertEqual(status, 400, (endpoint, answer))
            self.assertIn("is off limits to a participant on another machine", answer["error"])
            self.assertIn("by joining from that machine itself", answer["error"])
        self.assertEqual(self.hub.registry.participants_json(self.code), [])
        self.assertEqual(self.fake.connections, 0)

    def test_a_remote_tunnelled_participant_is_unaffected(self):
        self.as_remote_client()  # its endpoint only informs: its agent calls it
        status, _, answer = self.raw_join(self.fake.url, transport="tunnel")
        self.assertEqual(status, 201, answer)

    def test_the_hub_machine_may_register_its_own_server(self):
        status, _, answer = self.raw_join(self.fake.url, pid="organiser")
        self.assertEqual(status, 201, answer)
        # From another loopback address of this machine (Linux routes all of
        # 127/8 to lo): a real client address, not a simulated one.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S,
                                          source_address=("127.0.0.2", 0))
        self.addCleanup(conn.close)
        try:
            conn.connect()
        except OSError as exc:
            self.skipTest("cannot send from 127.0.0.2 here (%s)" % exc)
        conn.request("POST", "/rooms/%s/join" % self.code, body=json.dumps(join_body(
            "second", "fake-model", self.fake.url)), headers={"Content-Type": "application/json"})
        self.assertEqual(conn.getresponse().status, 201)
        for _ in range(2):
            self.assertEqual(self.chat(self.code, "fake-model")[0], 200)

    def test_a_name_that_turns_to_loopback_later_reaches_nothing(self):
        # DNS rebinding: the name resolves elsewhere at join, to loopback at
        # the request. Both resolutions are played by a stand-in resolver.
        self.as_remote_client()
        answers = {"rebind.example": ["192.0.2.10"]}
        real = gambiarra.resolve_host

        def resolve(host, timeout_s):
            return answers[host] if host in answers else real(host, timeout_s)

        self.patch(gambiarra, "resolve_host", resolve)
        status, _, answer = self.raw_join("http://rebind.example:%d" % self.port_of_fake)
        self.assertEqual(status, 201, answer)
        answers["rebind.example"] = ["127.0.0.1"]
        status, _, answer = self.chat(self.code, "mallory")
        self.assertEqual((status, answer["error"]["code"]), (502, "backend_unreachable"))
        self.assertIn("refused by the hub: 127.0.0.1 is a loopback address",
                      answer["error"]["message"])
        self.assertEqual(self.fake.connections, 0)

    def test_a_guarded_connection_to_another_machine_goes_through(self):
        # Here the fake backend on 127.0.0.1 plays a server on another
        # machine: hub_machine_reason() is told nothing is the hub's.
        self.as_remote_client()
        self.patch(gambiarra, "hub_machine_reason", lambda address: None)
        self.assertEqual(self.raw_join(self.fake.url)[0], 201)
        for _ in range(3):
            self.assertEqual(self.chat(self.code, "mallory")[0], 200)
        self.assertEqual((len(self.fake.requests), self.fake.connections), (3, 1))  # pooled


class TestCaps(HubTestCase):
    hub_options = {"max_rooms": 3, "max_participants": 2, "max_subscribers": 2,
                   "max_subscribers_per_address": 3, "max_specs_bytes": 1024}

    def test_rooms_beyond_the_cap(self):
        codes = [self.create_room() for _ in range(3)]
        status, _, answer = self.request("POST", "/rooms", {"name": "one too many"})
        self.assertEqual(status, 503)
        self.assertIn("maximum of 3 rooms", answer["error"])
        self.assertIn("serve --max-rooms", answer["error"])
        self.assertEqual(len(self.request("GET", "/rooms")[2]["rooms"]), len(codes))

    def test_participants_beyond_the_cap(self):
        code, fake = self.create_room(), self.backend()
        self.join(code, fake, pid="alice")
        self.join(code, fake, pid="bob")
        status, _, answer = self.request("POST", "/rooms/%s/join" % code,
                                         join_body("carol", "fake-model", fake.url))
        self.assertEqual(status, 503)
        self.assertIn("maximum of 2 participants", answer["error"])
        self.assertIn("serve --max-participants", answer["error"])
        self.join(code, fake, pid="bob", secret=self.secrets[code, "bob"])  # a re-join: 201
        self.assertEqual(self.request("DELETE", "/rooms/%s/leave/alice" % code,
                                      headers=self.secret_header(code, "alice"))[0], 200)
        self.join(code, fake, pid="carol")

    def stream(self, code):
        """Open an event stream; (status, connection) or the error answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("GET", "/rooms/%s/events" % code)
        response = conn.getresponse()
        if response.status != 200:
            return response.status, json.loads(response.read())
        self.addCleanup(response.close)
        return 200, (conn, response)

    def test_event_streams_per_room_and_per_address(self):
        first, second = self.create_room(), self.create_room()
        opened = [self.stream(first)[1], self.stream(first)[1]]
        status, answer = self.stream(first)
        self.assertEqual(status, 503)
        self.assertIn("maximum of 2 event streams", answer["error"])
        self.assertIn("serve --max-subscribers'", answer["error"])
        self.assertEqual(self.stream(second)[0], 200)  # this address's third
        status, answer = self.stream(second)
        self.assertEqual(status, 429)
        self.assertIn("serve --max-subscribers-per-address", answer["error"])
        conn, response = opened[0]
        response.close()  # a closed stream frees its place
        conn.close()
        self.assertTrue(wait_until(lambda: len(self.hub.bus._rooms[first]) == 1))
        self.assertEqual(self.stream(second)[0], 200)

    def test_specs_and_config_are_small(self):
        code, fake = self.create_room(), self.backend()
        for field in ("specs", "config"):
            status, _, answer = self.request("POST", "/rooms/%s/join" % code, join_body(
                "alice", "fake-model", fake.url, **{field: {"x": "y" * 1100}}))
            self.assertEqual(status, 413)
            self.assertIn("Field '%s' is larger than this hub's limit of 1024 bytes" % field,
                          answer["error"])
            self.assertIn("serve --max-specs-bytes", answer["error"])
        self.join(code, fake, specs={"gpu": "y" * 900}, config={"temperature": 0.2})

    def test_defaults_and_flags(self):
        args = gambiarra.build_parser().parse_args(["serve"])
        self.assertEqual((args.max_rooms, args.max_participants, args.max_subscribers,
                          args.max_subscribers_per_address, args.max_specs_bytes),
                         (1000, 256, 64, 16, 16384))
        args = gambiarra.build_parser().parse_args([
            "serve", "--max-rooms", "5", "--max-participants", "6", "--max-subscribers", "7",
            "--max-subscribers-per-address", "8", "--max-specs-bytes", "9"])
        hub = serve_with(args)
        self.assertEqual((hub.registry.max_rooms, hub.registry.max_participants,
                          hub.bus.max_per_room, hub.bus.max_per_address, hub.max_specs_bytes),
                         (5, 6, 7, 8, 9))


    def test_every_limit_flag_reaches_the_hub(self):
        argv, expected = ["serve"], {}
        for number, (flag, kind, default, _, _) in enumerate(gambiarra.LIMIT_OPTIONS, 2):
            value = kind(str(number * 1000))
            argv += [flag, str(value)]
            expected[gambiarra.limit_keyword(flag)] = value
        with unittest.mock.patch.object(gambiarra, "Hub") as hub:
            serve_with(gambiarra.build_parser().parse_args(argv))
        given = hub.call_args[1]
        self.assertEqual({keyword: given[keyword] for keyword in expected}, expected)


def serve_with(args):
    """The hub ``serve`` makes of ``args``, without serving (nor changing this
    process's thread stack size or file limit)."""
    with unittest.mock.patch.object(gambiarra, "serve_until") as serve_until, \
            unittest.mock.patch.object(gambiarra.logging, "basicConfig"), \
            unittest.mock.patch.object(gambiarra.threading, "stack_size"), \
            unittest.mock.patch.object(gambiarra, "raise_open_file_limit"):
        gambiarra.cmd_serve(args)
    return serve_until.call_args[0][0]


class TestHiddenParticipantIds(HubTestCase):
    """A protected room answers an unknown participant id as it answers a
    wrong secret; an open room keeps telling them apart."""

    def setUp(self):
        super().setUp()
        status, _, answer = self.request("POST", "/rooms", {"name": "Lab", "password": PASSWORD})
        self.code = answer["room"]["code"]
        self.open_code = self.create_room()
        self.fake = self.backend()

    def answers(self, code, pid, headers):
        base = "/rooms/%s" % code
        calls = (("POST", base + "/health", {"id": pid}),
                 ("DELETE", base + "/leave/%s" % pid, None),
                 ("GET", base + "/tunnel/%s?wait=0" % pid, None),
                 ("HEAD", base + "/tunnel/%s" % pid, None),
                 ("POST", base + "/tunnel/%s/1-1/accept" % pid, None),
                 ("POST", base + "/tunnel/%s/1-1" % pid, {}))
        results = []
        for method, path, body in calls:
            status, _, payload = self.request(method, path, body, headers=headers)
            results.append((status, payload))
        return results

    def test_unknown_ids_and_wrong_secrets_look_alike_in_a_protected_room(self):
        self.join(self.code, self.fake, pid="alice", password=PASSWORD, transport="tunnel")
        wrong = {"X-Gambiarra-Secret": "guess"}
        known = self.answers(self.code, "alice", wrong)
        self.assertEqual(known, self.answers(self.code, "nobody", wrong))
        self.assertEqual(known, self.answers(self.code, "nobody", {}))
        self.assertEqual({status for status, _ in known}, {404})
        self.assertEqual(len(self.hub.registry.participants_json(self.code)), 1)

    def test_an_open_room_still_tells_them_apart(self):
        self.join(self.open_code, self.fake, pid="alice")
        wrong = {"X-Gambiarra-Secret": "guess"}
        self.assertEqual({s for s, _ in self.answers(self.open_code, "alice", wrong)}, {401})
        self.assertEqual({s for s, _ in self.answers(self.open_code, "nobody", wrong)}, {404})

    def test_a_forgotten_agent_joins_a_protected_room_again(self):
        fields = {"id": "alice", "nickname": "Alice", "model": "fake-model",
                  "endpoint": self.fake.url, "transport": "tunnel"}
        agent = gambiarra.Agent(self.hub.url, self.code, fields, self.fake.url,
                                password=PASSWORD, **AGENT_TIMINGS)
        self.addCleanup(agent.close)
        agent.start()
        registry = self.hub.registry
        secret = registry._rooms[self.code].participants["alice"].secret
        with registry._lock:  # the hub forgets it (as after a long silence)
            del registry._rooms[self.code].participants["alice"]
        self.assertTrue(wait_until(lambda: registry.participants_json(self.code)))
        self.assertNotEqual(registry._rooms[self.code].participants["alice"].secret, secret)
        status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % self.code,
                                         {"model": "alice"}, headers=bearer(PASSWORD))
        self.assertEqual(status, 200, answer)


# === The tunnel ===

class FakeAgent:
    """A minimal tunnel agent: long-polls the hub for requests, calls the local
    backend and uploads each answer as it comes, chunk by chunk."""

    def __init__(self, port, code, pid, secret, backend_url, workers=2):
        self.port, self.code, self.pid, self.secret = port, code, pid, secret
        self.backend = urllib.parse.urlsplit(backend_url)
        self.stop = threading.Event()
        self.answers = []  # status of each upload
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(workers)]
        for thread in self.threads:
            thread.start()

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)

    def hub(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)

    def run(self):
        while not self.stop.is_set():
            conn = self.hub()
            try:
                conn.request("GET", "/rooms/%s/tunnel/%s?wait=0.2" % (self.code, self.pid),
                             headers={"X-Gambiarra-Secret": self.secret})
                response = conn.getresponse()
                job = json.loads(response.read()) if response.status == 200 else None
            except OSError:
                job = None
            finally:
                conn.close()
            if job:
                self.serve(job)

    def serve(self, job):
        local = http.client.HTTPConnection(self.backend.hostname, self.backend.port,
                                           timeout=WAIT_S)
        upload = self.hub()
        try:
            try:
                local.request("POST", job["path"], body=json.dumps(job["body"]).encode(),
                              headers={"Content-Type": "application/json"})
                answer = local.getresponse()
            except OSError as exc:  # tell the hub at once: it may fail over
                upload.request("POST", "/rooms/%s/tunnel/%s/%s" % (
                    self.code, self.pid, job["requestId"]), body=b"", headers={
                    "X-Gambiarra-Secret": self.secret, "X-Gambiarra-Error": str(exc)})
                self.answers.append(upload.getresponse().status)
                return

            def pieces():
                while True:
                    data = answer.read1(65536)
                    if not data:
                        return
                    yield data
            upload.request("POST", "/rooms/%s/tunnel/%s/%s" % (self.code, self.pid,
                                                               job["requestId"]),
                           body=pieces(), encode_chunked=True, headers={
                               "X-Gambiarra-Secret": self.secret,
                               "X-Gambiarra-Status": str(answer.status),
                               "Content-Type": answer.getheader("Content-Type"),
                               "Transfer-Encoding": "chunked"})
            self.answers.append(upload.getresponse().status)
        except OSError:
            self.answers.append("broken")
        finally:
            local.close()  # on a 410 too: the local server stops generating
            upload.close()


class TestTunnel(HubTestCase):
    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        # The endpoint registered is one the hub could never reach itself.
        answer = self.join(self.code, self.fake, transport="tunnel",
                           endpoint="http://127.0.0.1:%d" % free_port())
        self.assertEqual(answer["participant"]["transport"], "tunnel")
        self.path = "/rooms/%s/v1/chat/completions" % self.code

    def agent(self):
        agent = FakeAgent(self.port, self.code, "alice", self.secrets[self.code, "alice"],
                          self.fake.url)
        self.addCleanup(agent.close)
        return agent

    def test_answers_come_through_the_tunnel(self):
        self.agent()
        status, _, answer = self.chat(self.code, "alice", temperature=0.3)
        self.assertEqual(status, 200)
        self.assertEqual(answer["choices"][0]["message"]["content"], "tok0 tok1 tok2 ")
        self.assertEqual(self.fake.last_body()["model"], "fake-model")
        self.assertEqual(self.fake.last_body()["temperature"], 0.3)
        status, _, answer = self.request("POST", "/rooms/%s/v1/embeddings" % self.code,
                                         {"model": "alice", "input": "x"})
        self.assertEqual((status, answer["data"][0]["embedding"]), (200, [0.1, 0.2, 0.3]))

    def test_a_stream_comes_through_event_by_event(self):
        self.agent()
        conn, response = self.open_stream(self.path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        self.assertEqual(response.status, 200)
        first = response.read1(65536)
        self.assertIn(b'"seq": 0', first)  # before the backend sends the rest
        self.fake.release.set()
        events = sse_events(first + response.read())
        self.assertEqual([json.loads(d)["seq"] for _, d in events[:-1]], [0, 1, 2])
        self.assertEqual(events[-1][1], "[DONE]")

    def test_a_client_leaving_stops_the_upload_and_the_local_server(self):
        agent = self.agent()
        conn, response = self.open_stream(self.path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        response.read1(65536)
        hang_up(conn, response)
        self.assertTrue(wait_until(lambda: self.hub.registry.participants_json(self.code)[0]
                                   ["inFlight"] == 0))
        self.fake.release.set()
        self.assertTrue(wait_until(lambda: agent.answers))
        self.assertIn(agent.answers[0], (410, "broken"))

    def test_an_unreachable_local_server_is_a_502(self):
        self.agent()
        self.fake.close()  # the agent's local server is gone
        status, _, answer = self.chat(self.code, "alice")
        self.assertEqual((status, answer["error"]["code"]), (502, "backend_unreachable"))

    def test_no_agent_means_unreachable_within_the_connect_timeout(self):
        self.hub.relay.connect_timeout = 0.3  # the backend timeout (5 s) is not what counts
        started = time.monotonic()
        status, _, answer = self.chat(self.code, "alice")
        self.assertEqual((status, answer["error"]["code"]), (502, "backend_unreachable"))
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(self.hub.tunnels._calls, {})  # withdrawn, not left queued

    def test_an_agent_that_took_the_request_has_the_backend_timeout(self):
        self.hub.relay.backend_timeout = 0.3
        self.agent()
        status, _, answer = self.chat(self.code, "alice", fake={"stall_before": True})
        self.assertEqual((status, answer["error"]["code"]), (504, "backend_timeout"))
        self.fake.release.set()  # the agent's late answer then finds nobody (410)

    def test_polls_need_the_secret_and_a_tunnelled_participant(self):
        path = "/rooms/%s/tunnel/alice?wait=0" % self.code
        self.assertEqual(self.request("GET", path)[0], 401)
        self.assertEqual(self.request("GET", path, headers=self.secret_header(
            self.code, "alice"))[0], 204)
        self.join(self.code, self.fake, pid="bob")
        status, _, _ = self.request("GET", "/rooms/%s/tunnel/bob?wait=0" % self.code,
                                    headers=self.secret_header(self.code, "bob"))
        self.assertEqual(status, 409)
        self.assertEqual(self.request("POST", "/rooms/%s/tunnel/alice/nope" % self.code,
                                      {}, headers=self.secret_header(self.code, "alice"))[0],
                         404)


class TestTunnelUploads(HubTestCase):
    """What an agent uploads is checked: only the participant the request was
    given to may answer, only a final status, a clean Content-Type and the
    body reach the client, and a broken upload ends the answer at once."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        for pid in ("alice", "bob"):
            self.join(self.code, self.fake, pid=pid, transport="tunnel",
                      endpoint="http://127.0.0.1:%d" % free_port())
        self.path = "/rooms/%s/v1/chat/completions" % self.code

    def ask(self, model="alice"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", self.path, body=json.dumps({"model": model, "stream": True}),
                     headers={"Content-Type": "application/json"})
        return conn

    def take_job(self, pid="alice"):
        status, _, job = self.request("GET", "/rooms/%s/tunnel/%s?wait=5" % (self.code, pid),
                                      headers=self.secret_header(self.code, pid))
        self.assertEqual(status, 200)
        return job

    def upload(self, job, pid="alice", headers=(), body=b"data: {}\n\ndata: [DONE]\n\n",
               as_pid=None):
        """Upload an answer as ``as_pid`` (default: ``pid``) to ``pid``'s URL."""
        secret = self.secrets[self.code, as_pid or pid]
        sent = dict({"X-Gambiarra-Secret": secret, "X-Gambiarra-Status": "200",
                     "Content-Type": "text/event-stream"}, **dict(headers))
        return self.request("POST", "/rooms/%s/tunnel/%s/%s" % (self.code, pid, job["requestId"]),
                            raw=body, headers=sent)

    def test_only_a_final_status_and_a_clean_content_type_pass(self):
        for headers in ({"X-Gambiarra-Status": "103"}, {"X-Gambiarra-Status": "999"},
                        {"X-Gambiarra-Status": "abc"}, {"X-Gambiarra-Status": "-200"},
                        {"Content-Type": "text/html\x1b]0;pwned\x07"}):
            conn = self.ask()
            job = self.take_job()
            self.assertEqual(self.upload(job, headers=headers)[0], 400, headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            self.assertEqual((response.status, answer["error"]["code"]),
                             (502, "backend_invalid_answer"), headers)

    def test_nothing_else_from_the_uploader_reaches_the_client(self):
        conn = self.ask()
        job = self.take_job()
        status, _, _ = self.upload(job, headers={"Set-Cookie": "session=evil",
                                                 "Location": "http://evil.example/",
                                                 "X-Evil": "1", "Content-Type": "text/plain"})
        self.assertEqual(status, 200)
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/plain")
        for name in ("Set-Cookie", "Location", "X-Evil"):
            self.assertIsNone(response.getheader(name), name)
        self.assertIn(b"[DONE]", response.read())

    def test_a_malformed_chunked_upload_ends_the_answer_at_once(self):
        conn = self.ask()
        job = self.take_job()
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /rooms/%s/tunnel/alice/%s HTTP/1.1\r\nHost: x\r\n"
                         b"X-Gambiarra-Secret: %s\r\nX-Gambiarra-Status: 200\r\n"
                         b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"a\r\ndata: {}\n\n\r\nzz-not-hex\r\n" % (
                             self.code.encode(), job["requestId"].encode(),
                             self.secrets[self.code, "alice"].encode()))
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 400"))
        response = conn.getresponse()
        events = sse_events(response.read())
        self.assertEqual(json.loads(events[-1][1])["error"]["code"], "backend_disconnected")
        self.assertLess(time.monotonic() - started, 2)  # not the backend timeout (5 s)

    def test_only_the_participant_given_the_request_may_answer_it(self):
        conn = self.ask()
        job = self.take_job()
        self.assertEqual(self.upload(job, pid="bob")[0], 404)  # bob's own id and secret
        self.assertEqual(self.upload(job, as_pid="bob")[0], 401)  # alice's id, bob's secret
        self.assertEqual(self.request("POST", "/rooms/%s/tunnel/bob/%s/accept" % (
            self.code, job["requestId"]), raw=b"", headers=self.secret_header(
                self.code, "bob"))[0], 404)
        self.assertEqual(self.upload(job)[0], 200)
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertIn(b"[DONE]", response.read())

    def test_an_accepted_request_is_withdrawn_only_if_not_accepted_in_time(self):
        self.hub.relay.connect_timeout = 0.3
        conn = self.ask()
        status, _, job = self.request("GET", "/rooms/%s/tunnel/alice?wait=5&accept=1"
                                      % self.code, headers=self.secret_header(self.code, "alice"))
        self.assertIs(job["accept"], True)
        response = conn.getresponse()  # nobody confirmed: unreachable, quickly
        self.assertEqual((response.status, json.loads(response.read())["error"]["code"]),
                         (502, "backend_unreachable"))
        accept = "/rooms/%s/tunnel/alice/%s/accept" % (self.code, job["requestId"])
        self.assertIn(self.request("POST", accept, raw=b"", headers=self.secret_header(
            self.code, "alice"))[0], (404, 410))  # the agent drops it
        conn = self.ask()
        job = self.request("GET", "/rooms/%s/tunnel/alice?wait=5&accept=1" % self.code,
                           headers=self.secret_header(self.code, "alice"))[2]
        agent = self.confirm(job)
        time.sleep(0.5)  # past the connect timeout: an accepted request is not withdrawn
        agent.request("POST", "/rooms/%s/tunnel/alice/%s" % (self.code, job["requestId"]),
                      body=b"data: [DONE]\n\n", headers=dict(self.secret_header(
                          self.code, "alice"), **{"Content-Type": "text/event-stream"}))
        self.assertEqual(agent.getresponse().status, 200)
        self.assertEqual(conn.getresponse().status, 200)

    def confirm(self, job, pid="alice"):
        """Accept a job like an agent: on a connection kept for its answer."""
        agent = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(agent.close)
        agent.request("POST", "/rooms/%s/tunnel/%s/%s/accept" % (self.code, pid, job["requestId"]),
                      body=b"", headers=self.secret_header(self.code, pid))
        response = agent.getresponse()
        self.assertEqual(response.status, 200)
        response.read()
        return agent

    def test_an_agent_that_dies_after_accepting_is_noticed_at_once(self):
        conn = self.ask()
        job = self.request("GET", "/rooms/%s/tunnel/alice?wait=5&accept=1" % self.code,
                           headers=self.secret_header(self.code, "alice"))[2]
        agent = self.confirm(job)
        started = time.monotonic()
        hang_up(agent)  # killed: the kernel closes its connections
        response = conn.getresponse()
        self.assertEqual((response.status, json.loads(response.read())["error"]["code"]),
                         (502, "participant_gone"))  # by id: no one else may answer
        self.assertLess(time.monotonic() - started, 2)  # not when alice goes offline (30 s)

    def test_a_slow_client_holds_back_the_upload_not_the_hubs_memory(self):
        agent = FakeAgent(self.port, self.code, "alice", self.secrets[self.code, "alice"],
                          self.fake.url, workers=1)
        self.addCleanup(agent.close)
        size = 16 * MIB
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        conn.request("POST", self.path, body=json.dumps(
            {"model": "alice", "fake": {"sized": size}}).encode(), headers=JSON)
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        calls = self.hub.tunnels._calls
        self.assertTrue(wait_until(lambda: calls and len(
            list(calls.values())[0].answer._pieces) == gambiarra.TUNNEL_PIECES))
        self.assertEqual(len(list(calls.values())[0].answer._pieces), gambiarra.TUNNEL_PIECES)
        data = response.read()
        self.assertEqual(len(data), size)
        self.assertTrue(data == (bytes(range(256)) * 256) * (size // 65536))


class TestTunnelFailover(HubTestCase):
    hub_options = {"connect_timeout": 0.3}

    def test_a_request_no_agent_takes_moves_on_to_another_participant(self):
        code = self.create_room()
        fake = self.backend()
        self.join(code, fake, pid="ghost", transport="tunnel",
                  endpoint="http://127.0.0.1:%d" % free_port())  # no agent ever polls
        self.join(code, fake, pid="alice")
        for _ in range(6):
            started = time.monotonic()
            status, _, answer = self.chat(code, "fake-model")
            self.assertEqual(status, 200, answer)
            self.assertLess(time.monotonic() - started, 2)
        ghost = [p for p in self.hub.registry.participants_json(code) if p["id"] == "ghost"][0]
        self.assertLessEqual(ghost["metrics"]["errors"], 1)  # then picked last

    def test_a_tunnelled_participant_whose_agent_hung_up_is_not_routed_to(self):
        code = self.create_room()
        fake = self.backend()
        self.join(code, fake, pid="ghost", transport="tunnel",
                  endpoint="http://127.0.0.1:%d" % free_port())
        poll = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        poll.request("GET", "/rooms/%s/tunnel/ghost?wait=30" % code,
                     headers=self.secret_header(code, "ghost"))
        self.assertTrue(wait_until(lambda: self.hub.registry._rooms[code].participants[
            "ghost"].polls == 1))
        hang_up(poll)  # like a killed agent: the kernel closes its connections
        self.assertTrue(wait_until(lambda: self.hub.registry._rooms[code].participants[
            "ghost"].polls == 0))
        status, _, answer = self.chat(code, "ghost")
        self.assertEqual((status, answer["error"]["code"]), (503, "participant_offline"))
        self.assertIn("stopped polling", answer["error"]["message"])


class TestStrandedRequests(HubTestCase):
    hub_options = {"health_interval": 0.05, "participant_timeout": 0.3, "queue_timeout": 30}

    def test_requests_queued_for_a_participant_that_goes_offline_are_answered_at_once(self):
        code = self.create_room()
        fake = self.backend()
        busy = self.keep_busy(code, fake)
        started = time.monotonic()
        status, _, answer = self.chat(code, "alice")  # queued, then alice misses heartbeats
        self.assertEqual((status, answer["error"]["code"]), (503, "participant_offline"))
        self.assertLess(time.monotonic() - started, 5)  # not the queue timeout (30 s)
        fake.release.set()
        self.assertEqual(busy.getresponse().status, 200)  # a direct server may still answer


# === Protected rooms and participant secrets ===

PASSWORD = "sésame, ouvre-toi"  # non-ASCII on purpose: compared as UTF-8 bytes


def bearer(password):
    return {"Authorization": b"Bearer " + password.encode("utf-8")}


class TestProtectedRooms(HubTestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.hub_options = {"state_path": os.path.join(self.folder, "hub.json")}
        self.logs = CapturedLogs(self)  # before the hub starts: every line is kept
        super().setUp()
        status, _, answer = self.request("POST", "/rooms", {"name": "Lab", "password": PASSWORD})
        self.assertEqual(status, 201)
        self.code = answer["room"]["code"]
        self.fake = self.backend()

    def join_protected(self, pid="alice", **extra):
        return self.join(self.code, self.fake, pid=pid, password=PASSWORD, **extra)

    def test_listing_says_protected_and_nothing_more(self):
        open_code = self.create_room("Open")
        rooms = {r["code"]: r for r in self.request("GET", "/rooms")[2]["rooms"]}
        self.assertIs(rooms[self.code]["protected"], True)
        self.assertIs(rooms[open_code]["protected"], False)
        self.assertEqual(set(rooms[self.code]), set(rooms[open_code]))

    def test_join_needs_the_password(self):
        body = {"id": "a", "nickname": "A", "model": "m", "endpoint": self.fake.url}
        for password in (None, "wrong", PASSWORD.upper()):
            status, _, answer = self.request("POST", "/rooms/%s/join" % self.code,
                                             dict(body, password=password))
            self.assertEqual((status, answer), (401, {"error": "Invalid password"}))
        answer = self.join_protected()
        self.assertGreaterEqual(len(answer["secret"]), 22)  # 128 bits or more, URL-safe

    def test_room_routes_need_the_password_as_bearer(self):
        self.join_protected()
        paths = ("/rooms/%s/participants", "/rooms/%s/v1/models")
        for path in paths:
            for headers in ({}, bearer("wrong"), {"Authorization": "Basic eDp5"}):
                status, response, answer = self.request("GET", path % self.code,
                                                        headers=headers)
                self.assertEqual(status, 401, (path, headers))
                self.assertEqual(response.getheader("WWW-Authenticate"), "Bearer")
            self.assertEqual(self.request("GET", path % self.code,
                                          headers=bearer(PASSWORD))[0], 200)
        status, _, answer = self.chat(self.code, "alice")
        self.assertEqual(status, 401)
        self.assertEqual(answer["error"]["type"], "authentication_error")
        status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % self.code,
                                         {"model": "alice"}, headers=bearer(PASSWORD))
        self.assertEqual(status, 200)
        status, _, _ = self.request("GET", "/rooms/%s/events" % self.code)
        self.assertEqual(status, 401)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("GET", "/rooms/%s/events" % self.code, headers=bearer(PASSWORD))
        response = conn.getresponse()
        self.addCleanup(response.close)
        self.assertEqual(response.status, 200)

    def test_a_non_ascii_password_is_accepted_in_utf8_and_in_latin1(self):
        # curl sends the header's UTF-8 bytes; http.client, requests and fetch send
        # a str as Latin-1. The wrong password stays wrong either way.
        self.join_protected()
        wrong = PASSWORD.replace("toi", "moi")
        encodings = {"utf-8": lambda p: bearer(p),
                     "latin-1": lambda p: {"Authorization": "Bearer " + p}}
        checks = unittest.mock.patch.object(gambiarra, "password_matches",
                                            wraps=gambiarra.password_matches)
        hashes = []
        with checks as password_matches:
            for _ in range(2):
                for name, header in encodings.items():
                    for password, expected in ((PASSWORD, 200), (wrong, 401)):
                        for method, path, body in self.protected_routes():
                            status, _, answer = self.request(method, path, body,
                                                             headers=header(password))
                            self.assertEqual(status, expected, (name, password, path, answer))
                hashes.append(password_matches.call_count - sum(hashes))
        # The right password was hashed at join. The wrong one has three forms (its
        # UTF-8 and Latin-1 bytes, and its UTF-8 bytes read as Latin-1), each hashed
        # once; the second round comes from the cache.
        self.assertEqual(hashes, [3, 0])

    def protected_routes(self):
        return (("GET", "/rooms/%s/participants" % self.code, None),
                ("GET", "/rooms/%s/v1/models" % self.code, None),
                ("POST", "/rooms/%s/v1/chat/completions" % self.code, {"model": "alice"}))

    def test_health_and_leave_need_the_participants_own_secret(self):
        # A protected room answers a wrong secret as it answers an unknown id
        # (404, see TestHiddenParticipantIds), where an open room says 401.
        self.join_protected("alice")
        self.join_protected("bob")
        health = "/rooms/%s/health" % self.code
        for headers in ({}, {"X-Gambiarra-Secret": "guess"}, self.secret_header(self.code, "bob")):
            self.assertEqual(self.request("POST", health, {"id": "alice"}, headers=headers)[0],
                             404)
            self.assertEqual(self.request("DELETE", "/rooms/%s/leave/alice" % self.code,
                                          headers=headers)[0], 404)
        secret = self.secrets[self.code, "alice"]
        self.assertEqual(self.request("POST", health, {"id": "alice", "secret": secret})[0], 200)
        self.assertEqual(self.request("POST", health, {"id": "alice"},
                                      headers=self.secret_header(self.code, "alice"))[0], 200)
        self.assertEqual(self.request("DELETE", "/rooms/%s/leave/alice" % self.code,
                                      {"secret": secret})[0], 200)

    def test_nobody_takes_over_a_participant_id(self):
        self.join_protected("alice")
        body = {"id": "alice", "nickname": "Mallory", "model": "m", "endpoint": self.fake.url,
                "password": PASSWORD}
        status, _, answer = self.request("POST", "/rooms/%s/join" % self.code, body)
        self.assertEqual(status, 401)
        self.assertIn("secret", answer["error"])
        status, _, answer = self.request("POST", "/rooms/%s/join" % self.code,
                                         dict(body, secret=self.secrets[self.code, "alice"]))
        self.assertEqual(status, 201)  # the owner may re-join (a restart, a new model)

    def test_password_never_leaves_the_hub(self):
        seen = []
        events = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(events.close)
        events.request("GET", "/rooms/%s/events" % self.code, headers=bearer(PASSWORD))
        stream = events.getresponse()
        self.addCleanup(stream.close)
        seen.append(stream.read1(65536))
        seen.append(json.dumps(self.join_protected()))
        for method, path in (("GET", "/rooms"), ("GET", "/rooms/%s/participants"),
                             ("GET", "/rooms/%s/v1/models")):
            seen.append(json.dumps(self.request(method, path.replace("%s", self.code),
                                                headers=bearer(PASSWORD))[2]))
        seen.append(json.dumps(self.chat(self.code, "alice")[2]))
        self.hub.close()  # flushes the state file and ends the event stream
        seen.append(stream.read())
        with open(self.hub_options["state_path"], "rb") as f:
            state = f.read()
        self.assertIn(b"scrypt$", state)
        seen.append(state)
        seen.extend(self.logs.at(logging.DEBUG))
        for text in seen:
            text = text if isinstance(text, bytes) else text.encode("utf-8")
            for form in (PASSWORD.encode("utf-8"), json.dumps(PASSWORD).encode("ascii"),
                         b"ouvre-toi"):
                self.assertNotIn(form, text)


# === Safe on a shared Wi-Fi: web pages, agents, passwords ===

#: Bodies a web page of any site can send without a CORS preflight (None: no
#: Content-Type at all, as fetch() sends a Blob or an ArrayBuffer).
SIMPLE_TYPES = ("text/plain", "text/plain;charset=UTF-8", "TEXT/Plain ; charset=utf-8",
                "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None)


class TestWebPages(HubTestCase):
    """A page of any web site, opened by someone on the network, cannot drive
    the hub through her browser: no form or text body is taken."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.join(self.code, self.fake)

    def send_as_page(self, method, path, body, content_type, headers=()):
        """What a page's form or simple fetch() sends: (status, response, payload)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        sent = dict(headers, **({"Content-Type": content_type} if content_type else {}))
        conn.request(method, path, body=json.dumps(body).encode(), headers=sent)
        response = conn.getresponse()
        payload = response.read()
        return response.status, response, json.loads(payload)

    def test_text_form_and_untyped_bodies_are_refused_on_every_post_and_delete(self):
        join = {"id": "mallory", "nickname": "M", "model": "m", "endpoint": self.fake.url}
        secret = self.secret_header(self.code, "alice")
        for content_type in SIMPLE_TYPES:
            for method, path, body, headers in (
                    ("POST", "/rooms", {"name": "made by a web page"}, {}),
                    ("POST", "/rooms/%s/join" % self.code, join, {}),
                    ("POST", "/rooms/%s/health" % self.code, {"id": "alice"}, secret),
                    ("DELETE", "/rooms/%s/leave/alice" % self.code, {}, secret),
                    ("POST", "/rooms/%s/v1/chat/completions" % self.code, {"model": "*"}, {}),
                    ("POST", "/rooms/%s/v1/embeddings" % self.code, {"model": "*"}, {})):
                status, response, answer = self.send_as_page(method, path, body, content_type,
                                                             headers)
                self.assertEqual(status, 415, (content_type, path, answer))
                error = answer["error"]
                if "/v1/" in path:
                    self.assertEqual((error["type"], error["code"]),
                                     ("invalid_request_error", "unsupported_media_type"))
                    error = error["message"]
                self.assertIn("Content-Type: application/json", error)
                self.assertEqual(response.getheader("Accept"), "application/json")
        self.assertEqual(len(self.request("GET", "/rooms")[2]["rooms"]), 1)
        participants = self.hub.registry.participants_json(self.code)
        self.assertEqual([p["id"] for p in participants], ["alice"])
        self.assertEqual(self.fake.requests, [])

    def test_json_with_any_case_or_parameters_passes_and_a_bodiless_delete_too(self):
        for content_type in ("application/json", "Application/JSON; charset=utf-8"):
            status, _, answer = self.send_as_page("POST", "/rooms", {"name": "ok"}, content_type)
            self.assertEqual(status, 201, answer)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("DELETE", "/rooms/%s/leave/alice" % self.code,
                     headers=self.secret_header(self.code, "alice"))  # no body, no type
        self.assertEqual(conn.getresponse().status, 200)

    def test_the_upload_of_a_tunnelled_answer_takes_any_type_only_with_the_secret(self):
        self.join(self.code, self.fake, pid="bob", transport="tunnel",
                  endpoint="http://127.0.0.1:%d" % free_port())
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(client.close)
        client.request("POST", "/rooms/%s/v1/chat/completions" % self.code, headers=JSON,
                       body=json.dumps({"model": "bob"}).encode())
        status, _, job = self.request("GET", "/rooms/%s/tunnel/bob?wait=5" % self.code,
                                      headers=self.secret_header(self.code, "bob"))
        self.assertEqual(status, 200)
        upload = "/rooms/%s/tunnel/bob/%s" % (self.code, job["requestId"])
        status, _, answer = self.request("POST", upload, raw=b"not json", headers={
            "Content-Type": "text/plain", "X-Gambiarra-Status": "500"})
        self.assertEqual(status, 415, answer)  # not even a 401: no secret, no text/plain
        status, _, _ = self.request("POST", upload, raw=b"local server error", headers=dict(
            self.secret_header(self.code, "bob"), **{"Content-Type": "text/plain",
                                                     "X-Gambiarra-Status": "500"}))
        self.assertEqual(status, 200)
        response = client.getresponse()
        self.assertEqual((response.status, response.getheader("Content-Type"), response.read()),
                         (500, "text/plain", b"local server error"))

    def preflight(self, path, **headers):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("OPTIONS", path, headers=dict({
            "Origin": "https://chat.example", "Access-Control-Request-Method": "POST"},
            **{name.replace("_", "-"): value for name, value in headers.items()}))
        response = conn.getresponse()
        response.read()
        return response

    def test_preflights_of_openai_clients_pass_and_private_network_ones_do_not(self):
        path = "/rooms/%s/v1/chat/completions" % self.code
        asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
        response = self.preflight(path, Access_Control_Request_Headers=asked)
        self.assertEqual(response.status, 204)
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")
        self.assertIn("POST", response.getheader("Access-Control-Allow-Methods"))
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"), asked)
        self.assertIsNone(response.getheader("Access-Control-Allow-Private-Network"))
        response = self.preflight(path, Access_Control_Request_Headers="a b; c")
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"),
                         "Content-Type, Authorization, X-Gambiarra-Secret")
        response = self.preflight("/rooms/%s/participants" % self.code,
                                  Access_Control_Request_Method="GET",
                                  Access_Control_Request_Headers="authorization")
        self.assertEqual(response.status, 204)  # reading, with the room's password
        for path in ("/rooms", "/health", path):  # a public site's page: never
            response = self.preflight(path, Access_Control_Request_Private_Network="true")
            self.assertEqual(response.status, 403, path)
            self.assertIsNone(response.getheader("Access-Control-Allow-Private-Network"))
            self.assertIsNone(response.getheader("Access-Control-Allow-Methods"))


    def test_pages_of_other_sites_may_not_change_rooms_or_participants(self):
        refused = (("POST", "/rooms"), ("POST", "/rooms/%s/join" % self.code),
                   ("POST", "/rooms/%s/health" % self.code),
                   ("DELETE", "/rooms/%s/leave/alice" % self.code),
                   ("POST", "/rooms/%s/tunnel/alice/r1" % self.code))
        for method, path in refused:
            response = self.preflight(path, Access_Control_Request_Method=method,
                                      Access_Control_Request_Headers="content-type")
            self.assertEqual(response.status, 403, path)  # a failed preflight: not sent
            self.assertIsNone(response.getheader("Access-Control-Allow-Methods"))
        for api in ("chat/completions", "completions", "embeddings"):
            response = self.preflight("/rooms/%s/v1/%s" % (self.code, api),
                                      Access_Control_Request_Headers="content-type")
            self.assertEqual(response.status, 204, api)


class RogueHubHandler(http.server.BaseHTTPRequestHandler):
    """A hub that hands an agent's polls the jobs it likes and records the
    answers uploaded: what a rogue hub found by mDNS could do."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj=None):
        data = json.dumps(obj).encode() if obj is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        rogue = self.server.rogue
        if "/tunnel/" not in self.path:
            return self.send_json(404, {"error": "not found"})
        with rogue.lock:
            path = rogue.paths.pop(0) if rogue.paths else None
        if path is None:
            rogue.idle.set()
            return self.send_json(204)
        self.send_json(200, {"requestId": "job%d" % len(rogue.uploads), "path": path,
                             "via": "1.1 rogue", "accept": False,
                             "body": {"model": "fake-model", "name": "attacker/huge:400b"}})

    def do_POST(self):
        rogue = self.server.rogue
        if self.path.endswith("/join"):
            return self.send_json(201, {"participant": {}, "roomId": "r", "secret": "s",
                                        "healthInterval": 60000})
        body = self.read_body()
        if "/tunnel/" in self.path:
            with rogue.lock:
                rogue.uploads.append((self.path.rsplit("/", 1)[1], dict(self.headers), body))
        self.send_json(200, {"success": True})

    do_DELETE = do_POST

    def read_body(self):
        if self.headers.get("Transfer-Encoding") != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            data += self.rfile.read(size)
            self.rfile.readline()
            if not size:
                return data


class RogueHub(ServerInThread):
    def __init__(self, paths):
        self.paths = list(paths)
        self.uploads = []  # (request id, headers, body)
        self.lock = threading.Lock()
        self.idle = threading.Event()  # every job handed out
        ServerInThread.__init__(self, RogueHubHandler, rogue=self,
                                handle_error=lambda request, address: None)  # agents that stop


class TestAgentForwardsOnlyInference(unittest.TestCase):
    """`join` is no open door into the participant's server: a hub gets the
    inference routes it relays, nothing else."""

    REFUSED = ("/api/pull", "/api/delete", "/v1/models", "/V1/chat/completions",
               "/v1/chat/completions?x=1", "/v1/chat/completions/../../api/pull",
               "/v1/../api/pull", "/v1/chat%2Fcompletions", "/v1/chat/completions#x",
               "//evil.example/v1/chat/completions", "http://127.0.0.1:1/v1/completions",
               " /v1/completions", "/v1/embeddings\r\nX-Evil: 1", "/\x1b]0;pwned\x07\x1b[2J")

    def test_a_rogue_hub_gets_errors_and_the_local_server_never_sees_its_paths(self):
        fake = FakeBackend()
        self.addCleanup(fake.close)
        rogue = RogueHub(self.REFUSED + ("/v1/chat/completions", "/api/pull"))
        self.addCleanup(rogue.close)
        logs = CapturedLogs(self)
        agent = gambiarra.Agent(rogue.url, "XK7P2M", {
            "id": "alice", "nickname": "Alice", "model": "fake-model", "endpoint": fake.url,
            "transport": "tunnel", "maxConcurrent": 1}, fake.url, **AGENT_TIMINGS)
        self.addCleanup(agent.close)
        agent.start()
        self.assertTrue(rogue.idle.wait(WAIT_S))
        self.assertTrue(wait_until(lambda: len(rogue.uploads) == len(self.REFUSED) + 2))
        self.assertEqual([path for path, _ in fake.requests], ["/v1/chat/completions"])
        errors = [headers.get("X-Gambiarra-Error") for _, headers, _ in rogue.uploads]
        self.assertIsNone(errors[-2])  # the chat was answered, the rest refused
        self.assertIn(b"tok0", rogue.uploads[-2][2])
        for error in errors[:-2] + errors[-1:]:
            self.assertIn("forwards only /v1/chat/completions", error)
        self.assertIn("/api/pull", errors[0])
        warnings = logs.at(logging.WARNING)
        self.assertEqual(len(warnings), len(self.REFUSED), warnings)  # once per path
        self.assertIn("/api/pull", warnings[0])
        self.assertIn("\\x1b]0;pwned\\x07\\x1b[2J", warnings[-1])
        self.assertFalse([w for w in warnings if "\x1b" in w or "\n" in w or "\r" in w])

    def test_the_hub_hands_out_jobs_for_the_relayed_paths_only(self):
        broker = gambiarra.TunnelBroker()
        self.addCleanup(broker.close)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            self.assertEqual(broker.submit("XK7P2M", ("alice", "k"), path, b"{}", "").path, path)
        for path in ("/api/pull", "/v1/models", "/v1/chat/completions?x"):
            with self.assertRaises(ValueError):
                broker.submit("XK7P2M", ("alice", "k"), path, b"{}", "")


class TestPasswordGuessing(HubTestCase):
    """Guessing a room's password is slow for the guesser, cheap for the hub."""

    hub_options = {"max_password_checks": 2, "password_failures": 5}

    def setUp(self):
        super().setUp()
        status, _, answer = self.request("POST", "/rooms", {"name": "Lab", "password": PASSWORD})
        self.code = answer["room"]["code"]
        self.lock, self.running, self.peak = threading.Lock(), 0, 0
        self.gate = threading.Event()

    def held_check(self, password_bytes, stored):
        """password_matches, counting the checks running at once; each waits
        for ``gate`` (bounded) so that a burst piles up."""
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.gate.wait(WAIT_S)
            return self.real_check(password_bytes, stored)
        finally:
            with self.lock:
                self.running -= 1

    def test_a_burst_of_wrong_passwords_gets_429_and_never_more_than_n_hashes_at_once(self):
        CapturedLogs(self)  # the hub warns about the guesser
        self.real_check = gambiarra.password_matches
        statuses, retry_after = [], []
        path = "/rooms/%s/participants" % self.code

        def guess(number):
            status, response, _ = self.request("GET", path, headers=bearer("guess%d" % number))
            statuses.append(status)
            retry_after.append(response.getheader("Retry-After"))
        with unittest.mock.patch.object(gambiarra, "password_matches",
                                        side_effect=self.held_check) as checks:
            guessers = [threading.Thread(target=guess, args=(n,)) for n in range(20)]
            for thread in guessers:
                thread.start()
            self.assertTrue(wait_until(lambda: self.running == 2))
            self.assertFalse(wait_until(lambda: self.running > 2, timeout=0.1))
            self.gate.set()
            for thread in guessers:
                thread.join(WAIT_S)
            # Two hashes ran side by side when the fifth wrong one was found: a sixth at most.
            self.assertIn(statuses.count(401), (5, 6), statuses)
            self.assertEqual(statuses.count(429), 20 - statuses.count(401))
            self.assertLessEqual(checks.call_count, 6)
            self.assertEqual(self.peak, 2)
            self.assertTrue(all(int(seconds) >= 1 for status, seconds in
                                zip(statuses, retry_after) if status == 429))
            # The right password now waits out the penalty from this address...
            status, response, answer = self.request("GET", path, headers=bearer(PASSWORD))
            self.assertEqual(status, 429)
            self.assertIn("Too many wrong passwords", answer["error"])
            status, _, answer = self.request("POST", "/rooms/%s/v1/chat/completions" % self.code,
                                             {"model": "*"}, headers=bearer(PASSWORD))
            self.assertEqual((status, answer["error"]["type"]), (429, "rate_limit_error"))
            # ... and works at once from any other one.
            self.hub.registry.authorize(self.code, PASSWORD.encode("utf-8"),
                                        address="192.0.2.9")

    def guard(self, **options):
        CapturedLogs(self)  # the warnings about guessers
        self.now = [1000.0]
        guard = gambiarra.PasswordGuard(clock=lambda: self.now[0], **options)
        registry = gambiarra.Registry(30, 600, passwords=guard)
        code = registry.create_room("Lab", gambiarra.hash_password(PASSWORD))["code"]
        return guard, lambda password, address: registry.authorize(
            code, password.encode("utf-8"), address=address)

    def assert_status(self, status, authorize, password, address):
        with self.assertRaises(gambiarra.ApiError) as caught:
            authorize(password, address)
        self.assertEqual(caught.exception.status, status)
        return dict(caught.exception.headers).get("Retry-After")

    def test_the_penalty_doubles_ends_and_a_right_password_then_starts_afresh(self):
        guard, authorize = self.guard(failures=3)
        authorize(PASSWORD, "192.0.2.2")  # remembered: later checks of it cost a HMAC
        for number in range(3):
            self.assert_status(401, authorize, "wrong%d" % number, "192.0.2.1")
        self.assertEqual(self.assert_status(429, authorize, "wrong9", "192.0.2.1"), "5")
        # No testing guesses against the remembered right password meanwhile.
        self.assert_status(429, authorize, PASSWORD, "192.0.2.1")
        authorize(PASSWORD, "192.0.2.2")  # others are not slowed down
        self.now[0] += 5.5
        self.assert_status(401, authorize, "wrong3", "192.0.2.1")
        self.assertEqual(self.assert_status(429, authorize, "wrong9", "192.0.2.1"), "10")
        self.now[0] += 10.5
        self.assert_status(401, authorize, "wrong4", "192.0.2.1")
        self.assertEqual(self.assert_status(429, authorize, "wrong9", "192.0.2.1"), "20")
        self.now[0] += 20.5
        authorize(PASSWORD, "192.0.2.1")
        self.assert_status(401, authorize, "wrong5", "192.0.2.1")  # forgiven: no 429
        self.assert_status(401, authorize, "wrong5", "192.0.2.1")  # known wrong: not counted
        self.assert_status(401, authorize, "wrong6", "192.0.2.1")
        self.assert_status(401, authorize, "wrong7", "192.0.2.1")
        self.assertEqual(self.assert_status(429, authorize, "wrong9", "192.0.2.1"), "5")

    def test_checks_wait_for_a_slot_but_a_remembered_password_never_does(self):
        guard, authorize = self.guard(max_checks=1, wait_s=0.05)
        authorize(PASSWORD, "192.0.2.2")
        with guard.checking("192.0.2.3"):  # the hub's only slot is taken
            self.assertEqual(self.assert_status(503, authorize, "new guess", "192.0.2.1"), "1")
            with unittest.mock.patch.object(gambiarra, "password_matches") as checks:
                authorize(PASSWORD, "192.0.2.1")  # from the cache: no wait, no hash
            self.assertEqual(checks.call_count, 0)

    def test_memory_for_addresses_is_bounded(self):
        guard, authorize = self.guard(addresses=3)
        for number in range(10):
            self.assert_status(401, authorize, "wrong%d" % number, "192.0.2.%d" % number)
        self.assertEqual(len(guard._strikes), 3)

    def test_serve_flags_reach_the_guard(self):
        args = gambiarra.build_parser().parse_args(
            ["serve", "--max-password-checks", "3", "--password-failures", "7"])
        self.assertEqual((args.max_password_checks, args.password_failures), (3, 7))
        self.assertEqual(self.hub.registry.passwords.failures, 5)
        with gambiarra.Hub(password_failures=7) as hub:
            self.assertEqual(hub.registry.passwords.failures, 7)


NASTY_NICKNAME = "\x1b]0;pwned\x07\x1b[2J\u202eevil"


class TestTerminalEscapes(HubTestCase):
    """Names from the network reach terminals and logs escaped, never as
    control sequences (set the title, clear the screen, reorder text)."""

    def setUp(self):
        self.logs = CapturedLogs(self, logging.INFO)
        super().setUp()
        self.code = self.create_room("Room\x1b[31m")
        self.fake = self.backend()

    def run_main(self, *argv):
        return TestCli.run_main(self, *argv)

    def assert_escaped(self, text):
        for control in ("\x1b", "\x07", "\u202e"):
            self.assertNotIn(control, text)

    def test_list_monitor_and_the_hub_log_show_a_nasty_nickname_escaped(self):
        stop, out, err, thread = TestClientCommands.start_monitor(self, self.code)
        self.assertTrue(wait_until(lambda: "connected" in out.getvalue()))
        self.join(self.code, self.fake, pid="mallory", nickname=NASTY_NICKNAME,
                  model="m\x9b2J")
        self.assertTrue(wait_until(lambda: "participant:joined" in out.getvalue()))
        stop.set()
        thread.join(WAIT_S)
        status, listed, _ = self.run_main("list", "--hub", self.hub.url)
        self.assertEqual(status, 0)
        hub_log = "\n".join(self.logs.at(logging.INFO))
        for text in (listed, out.getvalue(), hub_log):
            self.assert_escaped(text)
            self.assertIn("\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil", text)
        self.assertIn("\\x9b2J", listed)
        self.assertIn("Room\\x1b[31m", listed)

    def test_chat_answers_and_errors_are_escaped_but_keep_their_lines(self):
        pieces = []
        with contextlib.redirect_stdout(io.StringIO()) as out:
            gambiarra._chat_event({"choices": [{"delta": {"content": "a\x1b]52;c;eA==\x07\n\tb"}}]},
                                  True, pieces)
        self.assertEqual(out.getvalue(), "a\\x1b]52;c;eA==\\x07\n\tb")
        self.assertEqual(pieces, ["a\x1b]52;c;eA==\x07\n\tb"])  # --json has it as sent
        self.assertEqual(gambiarra.error_message({"error": {"message": "x\x1b[2J\ny"}}),
                         "x\\x1b[2J\\x0ay")
        body = b'{"error": "\\u001b[2Jno"}'
        hub = CannedHub(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.addCleanup(hub.close)
        status, _, err = self.run_main("chat", "XK7P2M", "hi", "--hub", hub.url)
        self.assertEqual(status, 1)
        self.assert_escaped(err)
        self.assertIn("\\x1b[2Jno", err)


# === Rooms that survive a restart ===

class TestStateFile(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "state", "hub-3000.json")

    def hub(self, **options):
        hub = gambiarra.Hub(state_path=self.path, **options)
        self.addCleanup(hub.close)
        return hub.start()

    def call(self, hub, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=WAIT_S)
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body else None,
                         headers=dict(JSON, **(headers or {})))
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def test_a_restart_keeps_rooms_codes_and_passwords(self):
        first = self.hub()
        _, open_room = self.call(first, "POST", "/rooms", {"name": "Open"})
        _, locked = self.call(first, "POST", "/rooms", {"name": "Locked", "password": PASSWORD})
        before = self.call(first, "GET", "/rooms")[1]["rooms"]
        first.close()
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["hub-3000.json"])
        second = self.hub()
        self.assertEqual(self.call(second, "GET", "/rooms")[1]["rooms"], before)
        code = locked["room"]["code"]
        join = {"id": "a", "nickname": "A", "model": "m", "endpoint": "http://127.0.0.1:9"}
        self.assertEqual(self.call(second, "POST", "/rooms/%s/join" % code,
                                   dict(join, password="nope"))[0], 401)
        self.assertEqual(self.call(second, "POST", "/rooms/%s/join" % code,
                                   dict(join, password=PASSWORD))[0], 201)
        self.assertEqual(self.call(second, "GET", "/rooms/%s/participants" % code,
                                   headers=bearer(PASSWORD))[0], 200)
        self.assertEqual(self.call(second, "GET", "/rooms/%s/participants"
                                   % open_room["room"]["code"])[0], 200)

    def test_a_change_is_saved_without_waiting_for_close(self):
        hub = self.hub()
        _, answer = self.call(hub, "POST", "/rooms", {"name": "Soon"})
        self.assertTrue(wait_until(lambda: answer["room"]["code"] in self.file_text()))

    def test_an_unusable_state_file_stops_the_hub_and_is_left_alone(self):
        os.makedirs(os.path.dirname(self.path))
        for content in (b"{not json", b"[]", b'{"rooms": [{"code": "ABC"}]}', b"\xff\xfe"):
            with open(self.path, "wb") as f:
                f.write(content)
            hub = gambiarra.Hub(state_path=self.path)
            with self.assertRaises(gambiarra.GambiarraError) as caught:
                hub.start()
            message = str(caught.exception)
            self.assertIn(self.path, message)
            self.assertIn("--state ''", message)
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), content)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = gambiarra.main(["serve", "--host", "127.0.0.1", "--port", "0",
                                     "--state", self.path])
        self.assertEqual(status, 1)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())

    def test_empty_rooms_expire_after_the_room_ttl(self):
        hub = self.hub(room_ttl=0.3, health_interval=0.05)
        _, answer = self.call(hub, "POST", "/rooms", {"name": "Short-lived"})
        code = answer["room"]["code"]
        _, busy = self.call(hub, "POST", "/rooms", {"name": "Has someone"})
        self.assertEqual(self.call(hub, "POST", "/rooms/%s/join" % busy["room"]["code"], {
            "id": "a", "nickname": "A", "model": "m", "endpoint": "http://127.0.0.1:9"})[0], 201)
        events = EventStream(hub.port, code)
        self.addCleanup(events.close)
        events.next_event()  # connected
        self.assertEqual(events.next_event(), ("room:removed", {"roomId": answer["room"]["id"],
                                                                "code": code}))
        with self.assertRaises(EOFError):
            events.next_event()  # and the stream ends
        rooms = self.call(hub, "GET", "/rooms")[1]["rooms"]
        self.assertEqual([r["name"] for r in rooms], ["Has someone"])  # not empty: kept
        self.assertTrue(wait_until(lambda: code not in self.file_text()))

    def test_no_state_file_when_disabled(self):
        with gambiarra.Hub(state_path=None) as hub:
            self.call(hub, "POST", "/rooms", {"name": "Ephemeral"})
        self.assertFalse(os.path.exists(self.path))

    def file_text(self):
        """The state file as it is on disk now ("" before the first save)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def room_names(self, hub):
        return sorted(room["name"] for room in self.call(hub, "GET", "/rooms")[1]["rooms"])

    def test_a_room_is_on_disk_when_its_201_arrives_and_a_burst_is_saved_in_few_writes(self):
        hub = self.hub()
        creators, rooms_each = 40, 5
        problems, writes, original_replace = [], [], os.replace

        def create_rooms():
            conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=WAIT_S)
            try:
                for _ in range(rooms_each):
                    conn.request("POST", "/rooms", body=b'{"name": "Burst"}',
                                 headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = json.loads(response.read())
                    if response.status != 201 or answer["room"]["code"] not in self.file_text():
                        problems.append((response.status, answer))
            except Exception as exc:  # reported by the test, not by the thread
                problems.append(exc)
            finally:
                conn.close()

        def counting_replace(*args, **kwargs):
            writes.append(args)
            return original_replace(*args, **kwargs)

        threads = [threading.Thread(target=create_rooms) for _ in range(creators)]
        with unittest.mock.patch.object(gambiarra.os, "replace", side_effect=counting_replace):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
        self.assertEqual(problems, [])  # each room was in the file when its 201 came
        self.assertEqual(len(json.loads(self.file_text())["rooms"]), creators * rooms_each)
        self.assertLess(len(writes), creators * rooms_each / 4)

    def test_a_room_that_cannot_be_saved_is_refused_and_never_exists(self):
        logs = CapturedLogs(self)
        hub = self.hub()
        self.assertEqual(self.call(hub, "POST", "/rooms", {"name": "Kept"})[0], 201)
        disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with unittest.mock.patch.object(gambiarra.os, "fsync", side_effect=disk_full):
            for _ in range(3):
                status, answer = self.call(hub, "POST", "/rooms", {"name": "Refused"})
                self.assertEqual(status, 507, answer)
                self.assertIn(os.strerror(errno.ENOSPC), answer["error"])  # the cause
                self.assertNotIn(self.folder, answer["error"])  # not the organiser's folders
        self.assertEqual(len(logs.at(logging.ERROR)), 1, logs.at(logging.ERROR))  # not 3
        self.assertEqual(self.room_names(hub), ["Kept"])
        self.assertEqual(self.call(hub, "POST", "/rooms", {"name": "Later"})[0], 201)
        self.assertNotIn("Refused", self.file_text())
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["hub-3000.json"])
        hub.close()
        self.assertEqual(self.room_names(self.hub()), ["Kept", "Later"])

    def test_leftover_temporary_files_are_removed_at_start(self):
        folder = os.path.dirname(self.path)
        os.makedirs(folder)
        removed = [".hub-3000.json.k3j_x9q2.tmp", ".hub-a1b2c3d4.tmp"]  # ours; legacy, old
        kept = [".hub-e5f6g7h8.tmp",            # legacy but recent: maybe another hub's
                ".hub-3001.json.k3j_x9q2.tmp",  # another hub's, by its state file's name
                "notes.tmp"]
        for name in removed + kept:
            open(os.path.join(folder, name), "w").close()
        two_minutes_ago = time.time() - 120
        os.utime(os.path.join(folder, ".hub-a1b2c3d4.tmp"), (two_minutes_ago, two_minutes_ago))
        self.hub()
        self.assertEqual(sorted(os.listdir(folder)), sorted(kept))

    def saved_room(self, **fields):
        """A room as the state file keeps it, with ``fields`` changed."""
        room = {"id": "r1", "code": "ABCDEF", "name": "Saved", "hostId": "h1",
                "createdAt": 1700000000000, "passwordHash": None, "emptySince": 1700000000000}
        room.update(fields)
        return room

    def assert_refused_at_start(self, content):
        """The hub does not start, says why in one line naming the file and the
        way out, and leaves the file alone; serve prints that line and exits 1."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(content)
        with self.assertRaises(gambiarra.GambiarraError) as caught:
            gambiarra.Hub(state_path=self.path).start()
        message = str(caught.exception)
        self.assertIn(self.path, message)
        self.assertIn("--state ''", message)
        self.assertNotIn("\n", message)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = gambiarra.main(["serve", "--host", "127.0.0.1", "--port", "0",
                                     "--state", self.path])
        self.assertEqual((status, err.getvalue()), (1, "error: %s\n" % message))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), content)

    def state_with(self, *rooms):
        return json.dumps({"version": 1, "rooms": list(rooms)}).encode()

    def test_a_huge_number_in_the_state_file_is_refused_in_one_line(self):
        for field in ("createdAt", "emptySince"):
            for number in (b"1e400", b"-1e400", b"NaN", b"1.5"):
                with self.subTest(field=field, number=number):
                    content = self.state_with(self.saved_room(**{field: "NUMBER"}))
                    self.assert_refused_at_start(content.replace(b'"NUMBER"', number))

    def test_a_deeply_nested_state_file_is_refused_in_one_line(self):
        for depth in (100000, 1000):
            with self.subTest(depth=depth):
                self.assert_refused_at_start(b'{"rooms": [' + b"[" * depth + b"]" * depth
                                             + b"]}")

    def test_two_rooms_with_one_code_are_refused(self):
        self.assert_refused_at_start(self.state_with(
            self.saved_room(), self.saved_room(code="abcdef", id="r2")))

    def test_fields_of_the_wrong_type_are_refused(self):
        for change in ({"name": 5}, {"name": None}, {"id": 1}, {"hostId": []},
                       {"createdAt": True}, {"createdAt": "1700000000000"}, {"createdAt": None},
                       {"emptySince": "soon"}, {"passwordHash": 7}, {"code": 123456},
                       {"code": "ABCDE"}, {"code": "ABCDE0"}, {"code": "ABCDEFG"}):
            with self.subTest(change=change):
                self.assert_refused_at_start(self.state_with(self.saved_room(**change)))
        for room in ("ABCDEF", ["ABCDEF"], None):
            with self.subTest(room=room):
                self.assert_refused_at_start(self.state_with(room))

    def test_lower_case_codes_are_restored_in_upper_case_and_expire_cleanly(self):
        logs = CapturedLogs(self)
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(self.state_with(self.saved_room(code="abcdef", emptySince=None)))
        hub = self.hub(room_ttl=0.25, health_interval=0.05)
        rooms = self.call(hub, "GET", "/rooms")[1]["rooms"]
        self.assertEqual([room["code"] for room in rooms], ["ABCDEF"])
        self.assertEqual(self.call(hub, "GET", "/rooms/abcdef/participants")[0], 200)
        self.assertTrue(wait_until(lambda: json.loads(self.file_text())["rooms"] == []))
        self.assertEqual(self.room_names(hub), [])
        self.assertEqual(logs.at(logging.ERROR), [])


# === Events and health sweeps ===

class TestEvents(HubTestCase):

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.events = EventStream(self.port, self.code)
        self.addCleanup(self.events.close)

    def test_stream_starts_with_connected_and_reports_joins_and_leaves(self):
        self.assertEqual(self.events.response.getheader("Content-Type"), "text/event-stream")
        name, data = self.events.next_event()
        self.assertEqual(name, "connected")
        self.assertIn("clientId", data)
        self.join(self.code, self.backend())
        name, data = self.events.next_event()
        self.assertEqual((name, data["id"], data["status"]), ("participant:joined", "alice",
                                                             "online"))
        self.request("DELETE", "/rooms/%s/leave/alice" % self.code,
                     headers=self.secret_header(self.code, "alice"))
        self.assertEqual(self.events.next_event(),
                         ("participant:left", {"participantId": "alice", "reason": "left"}))

    def test_idle_stream_gets_keep_alive_comments(self):
        self.hub.sse_keepalive = 0.05
        events = EventStream(self.port, self.code)
        self.addCleanup(events.close)
        events.next_event()
        data = b""
        while b": keep-alive" not in data:
            data += events.response.read1(1024)

    def test_a_subscriber_that_leaves_is_dropped_at_once(self):
        self.events.next_event()
        self.assertTrue(wait_until(lambda: self.hub.bus._rooms.get(self.code)))
        self.events.close()  # the keep-alive interval is 15 s: no write would notice
        self.assertTrue(wait_until(lambda: not self.hub.bus._rooms.get(self.code), timeout=5))

    def test_events_of_an_unknown_room_are_404(self):
        status, _, answer = self.request("GET", "/rooms/NOPE99/events")
        self.assertEqual((status, answer), (404, {"error": "Room not found"}))

    def test_stalled_subscriber_is_dropped_without_blocking_publishers(self):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        sock.sendall(b"GET /rooms/%s/events HTTP/1.1\r\nHost: x\r\n\r\n" % self.code.encode())
        self.assertTrue(wait_until(lambda: len(self.hub.bus._rooms.get(self.code, ())) == 2))
        self.events.close()  # keep only the stalled one
        self.assertTrue(wait_until(lambda: len(self.hub.bus._rooms.get(self.code, ())) == 1))
        big = {"padding": "x" * 65536}
        started = time.monotonic()
        for _ in range(gambiarra.SUBSCRIBER_QUEUE_EVENTS + 200):
            self.hub.bus.publish(self.code, "test:big", big)
        self.assertLess(time.monotonic() - started, WAIT_S)
        self.assertTrue(wait_until(lambda: not self.hub.bus._rooms.get(self.code)))
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_hub_close_ends_event_streams(self):
        self.events.next_event()
        self.hub.close()
        with self.assertRaises((EOFError, OSError, http.client.HTTPException)):
            while True:
                self.events.next_event()


class TestHealthSweeps(HubTestCase):
    hub_options = {"health_interval": 0.05, "participant_timeout": 0.2, "forget_after": 0.4}

    def test_offline_once_then_online_then_forgotten(self):
        code = self.create_room()
        events = EventStream(self.port, code)
        self.addCleanup(events.close)
        events.next_event()
        answer = self.join(code, self.backend())
        self.assertEqual(answer["healthInterval"], 50)
        events.next_event()  # joined
        self.assertEqual(events.next_event(), ("participant:offline", {"participantId": "alice"}))
        status, _, answer = self.chat(code, "alice")
        self.assertEqual(status, 503)
        self.assertEqual(answer["error"]["code"], "participant_offline")
        self.assertEqual(self.chat(code, "*")[0], 404)
        self.request("POST", "/rooms/%s/health" % code, {"id": "alice"},
                     headers=self.secret_header(code, "alice"))
        self.assertEqual(events.next_event(), ("participant:online", {"participantId": "alice"}))
        # Silent again: offline once (not at every sweep), then removed.
        self.assertEqual(events.next_event(), ("participant:offline", {"participantId": "alice"}))
        self.assertEqual(events.next_event(), ("participant:left",
                                               {"participantId": "alice", "reason": "timeout"}))
        _, _, listing = self.request("GET", "/rooms/%s/participants" % code)
        self.assertEqual(listing["participants"], [])


# === Hub lifecycle ===

class TestHubLifecycle(unittest.TestCase):
    def test_close_releases_threads_and_sockets_even_when_busy(self):
        before = threading.active_count()
        backend = FakeBackend()
        self.addCleanup(backend.close)
        hub = gambiarra.Hub(port=0).start()
        with hub:
            listener = hub.server.socket
            conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=WAIT_S)
            conn.request("POST", "/rooms", body=b'{"name": "r"}', headers=JSON)
            code = json.loads(conn.getresponse().read())["room"]["code"]  # kept alive
            events = EventStream(hub.port, code)
            conn.request("POST", "/rooms/%s/join" % code, headers=JSON, body=json.dumps(
                {"id": "a", "nickname": "A", "model": "m", "endpoint": backend.url}).encode())
            conn.getresponse().read()
            stalled = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=WAIT_S)
            stalled.request("POST", "/rooms/%s/v1/chat/completions" % code, body=json.dumps(
                {"model": "a", "fake": {"stall_before": True}}).encode(), headers=JSON)
            self.assertTrue(wait_until(lambda: backend.requests))
        self.assertEqual(listener.fileno(), -1)
        self.assertTrue(backend.disconnected.wait(WAIT_S))  # the relay let go
        self.assertTrue(wait_until(lambda: threading.active_count() <= before + 2),
                        threading.enumerate())  # + the fake backend's two
        for c in (conn, stalled, events):
            c.close()

    def test_context_manager_starts_and_closes(self):
        with gambiarra.Hub() as hub:
            with urllib_open(hub.url + "/health") as response:
                self.assertEqual(response.status, 200)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", hub.port), timeout=1).close()


# === mDNS ===

LOOPBACK = gambiarra.Link("lo", "127.0.0.1", "255.0.0.0")
LAN = gambiarra.Link("eth0", "192.0.2.2", "255.255.255.0")
WIFI = gambiarra.Link("wlan0", "10.9.0.1", "255.255.0.0")
#: Fast protocol timings: a responder announces within about 50 ms.
FAST_MDNS = dict(probe_wait_s=0, probe_interval_s=0.01, announce_gaps_s=(0.05, 0.1),
                 goodbye_gap_s=0.01, shared_delay_s=(0, 0.001), tiebreak_wait_s=0.05)
SERVICE = gambiarra.MDNS_SERVICE_TYPE


def dns_query(*questions, ident=0, known=(), authorities=()):
    """The bytes of a query: questions are (name, type) or (name, type, unicast)."""
    return gambiarra.encode_message(gambiarra.Message(
        ident, 0, [gambiarra.Question(*(q + (False,))[:3]) for q in questions],
        list(known), list(authorities), []))


def multicast_socket(port, link=LOOPBACK):
    """A socket on the test's mDNS port, in the group on loopback: it sees what
    responders multicast, and sends from that port like a peer responder."""
    sock, joined, _ = gambiarra.open_mdns_socket(port, [link])
    if not joined:
        sock.close()
        raise unittest.SkipTest("this host cannot join a multicast group on 127.0.0.1")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(link.address))
    return sock


def one_shot_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    return sock


def receive_messages(sock, until, timeout=WAIT_S):
    """Decode datagrams from ``sock`` until ``until(messages)`` is true or the
    timeout; return (messages, sources)."""
    messages, sources = [], []
    deadline = time.monotonic() + timeout
    while not until(messages) and time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if ready:
            data, source = sock.recvfrom(65536)
            with contextlib.suppress(gambiarra.MdnsDecodeError):
                messages.append(gambiarra.decode_message(data))
                sources.append(source)
    return messages, sources


def names_in(message, rtype=None):
    return [r.name for r in message.answers + message.additionals
            if rtype is None or r.type == rtype]


class TestMdnsCodec(unittest.TestCase):
    """The DNS codec alone: names, records, headers and hostile bytes; no sockets."""

    A, PTR, TXT, SRV, NSEC = (gambiarra.DNS_A, gambiarra.DNS_PTR, gambiarra.DNS_TXT,
                              gambiarra.DNS_SRV, gambiarra.DNS_NSEC)
    SERVICE = "_gambiarra._tcp.local"
    INSTANCE = "gambiarra-hub-3000._gambiarra._tcp.local"
    HOST = "gambiarra-pc.local"

    def _records(self):
        R = gambiarra.Record
        return [R("_services._dns-sd._udp.local", self.PTR, 4500, self.SERVICE, False),
                R(self.SERVICE, self.PTR, 4500, self.INSTANCE, False),
                R(self.INSTANCE, self.SRV, 120, (0, 0, 3000, self.HOST), True),
                R(self.INSTANCE, self.TXT, 4500, (b"txtvers=1", b"path=/"), True),
                R(self.HOST, self.A, 120, "192.0.2.7", True),
                R(self.HOST, self.NSEC, 120, (self.HOST, (self.A,)), True)]

    def _header(self, qd=0, an=0, ns=0, ar=0, flags=0x8400):
        return struct.pack("!6H", 0, flags, qd, an, ns, ar)

    def _encode(self, records, questions=(), legacy=False):
        message = gambiarra.Message(0, 0x8400, list(questions), list(records), [], [])
        return gambiarra.encode_message(message, legacy=legacy)

    def _round_trip(self, *records):
        return gambiarra.decode_message(self._encode(records)).answers

    def _wire_classes_and_ttls(self, packet):
        """(class, TTL) of each record, read from the bytes rather than the decoder."""
        reader, offset, found = gambiarra.PacketReader(packet), 12, []
        for _ in range(struct.unpack_from("!H", packet, 4)[0]):
            offset = reader.question(offset)[1]
        while offset < len(packet):
            offset = reader.name(offset)[1]
            rclass, ttl, length = struct.unpack_from("!HIH", packet, offset + 2)
            found.append((rclass, ttl))
            offset += 10 + length
        return found

    def assertRejected(self, packet):
        with self.assertRaises(gambiarra.MdnsDecodeError):
            gambiarra.decode_message(packet)

    def test_names_round_trip_with_case_utf8_and_optional_final_dot(self):
        for name in ("MyHub.Local", "Sala de aula 3 (2)._gambiarra._tcp.local",
                     "Laboratório de Física — 2º ano 🎉._gambiarra._tcp.local"):
            record = gambiarra.Record(name, self.TXT, 4500, (b"a=1",), True)
            dotted = record._replace(name=name + ".")
            self.assertEqual(self._round_trip(record, dotted), [record, record])
        self.assertEqual(gambiarra.name_labels("foo.local."), ["foo", "local"])
        self.assertEqual(gambiarra.instance_label("Sala de aula 3 (2)." + self.SERVICE),
                         "Sala de aula 3 (2)")

    def test_dot_inside_a_label_is_escaped_in_strings_and_raw_on_the_wire(self):
        name = "v1\\.2 hub._gambiarra._tcp.local"
        self.assertEqual(gambiarra.name_labels(name), ["v1.2 hub", "_gambiarra", "_tcp", "local"])
        self.assertEqual(gambiarra.escape_label("v1.2 hub"), "v1\\.2 hub")
        self.assertEqual(gambiarra.instance_label(name), "v1.2 hub")
        record = gambiarra.Record(name, self.TXT, 4500, (b"a=1",), True)
        packet = self._encode([record])
        self.assertIn(b"\x08v1.2 hub\x0a_gambiarra", packet)
        self.assertEqual(gambiarra.decode_message(packet).answers, [record])

    def test_label_over_63_bytes_and_name_over_255_bytes_rejected_on_encode(self):
        gambiarra.PacketWriter().name("é" * 31 + "a.local")  # 63 bytes of UTF-8
        longest = ".".join(["a" * 63] * 3 + ["b" * 61])  # 255 bytes on the wire
        record = gambiarra.Record(longest, self.A, 1, "10.0.0.1", True)
        self.assertEqual(self._round_trip(record), [record])
        for name in ("a" * 64 + ".local", "é" * 32 + ".local", longest + "b", "a..local"):
            with self.subTest(name=name), self.assertRaises(ValueError):
                gambiarra.PacketWriter().name(name)

    def test_record_key_ignores_name_case_but_not_txt_case(self):
        srv, txt = self._records()[2:4]
        upper = srv._replace(name=srv.name.upper(), data=srv.data[:3] + (self.HOST.upper(),))
        self.assertEqual(gambiarra.record_key(srv), gambiarra.record_key(upper))
        other = txt._replace(data=(b"TXTVERS=1", b"path=/"))
        self.assertNotEqual(gambiarra.record_key(txt), gambiarra.record_key(other))

    def test_shared_suffixes_are_compressed_and_decode_to_the_right_names(self):
        records = self._records()
        packet = self._encode(records)
        # "local" in full once, then only in the SRV target and NSEC next name (never compressed)
        self.assertEqual(packet.count(b"\x05local"), 3)
        self.assertEqual(packet.count(b"\x0a_gambiarra"), 1)
        one_by_one = 12 + sum(len(self._encode([record])) - 12 for record in records)
        self.assertLess(len(packet), one_by_one)
        self.assertEqual(gambiarra.decode_message(packet).answers, records)

    def test_pointers_into_ptr_and_srv_rdata_and_forward_pointers(self):
        packet = bytearray(self._header(qd=1, an=2))
        packet += struct.pack("!HHH", 0xC012, self.SRV, 1)  # forward: to the name at 18
        service = len(packet)
        packet += b"\x0a_gambiarra\x04_tcp\x05local\x00"
        packet += struct.pack("!HHIH", self.PTR, 1, 4500, 6)
        hub = len(packet)
        packet += b"\x03hub" + struct.pack("!H", 0xC000 | service)
        packet += struct.pack("!HHHIH", 0xC000 | hub, self.SRV, 0x8001, 120, 6 + 5)
        local = service + 16  # the "\x05local" inside the service name
        packet += struct.pack("!HHH", 0, 0, 3000) + b"\x02pc" + struct.pack("!H", 0xC000 | local)
        message = gambiarra.decode_message(bytes(packet))
        self.assertEqual(message.questions, [gambiarra.Question(self.SERVICE, self.SRV, False)])
        self.assertEqual(message.answers[0].data, "hub._gambiarra._tcp.local")
        self.assertEqual(message.answers[1], gambiarra.Record(
            "hub._gambiarra._tcp.local", self.SRV, 120, (0, 0, 3000, "pc.local"), True))

    def test_malformed_names_raise_decode_error_only(self):
        q = struct.pack("!HH", self.A, 1)  # the question's type and class
        cases = {"self-pointer": b"\xc0\x0c" + q,
                 "loop A->B->A": b"\xc0\x0e\xc0\x0c" + q,
                 "pointer beyond the end": b"\xc0\xff" + q,
                 "extended label 0x40": b"\x40" + b"a" * 64 + b"\x00" + q,
                 "label type 0x80": b"\x80abc\x00" + q,
                 "256-byte name": (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"b" * 62 + b"\x00" + q,
                 "half a pointer": b"\xc0",
                 "truncated label": b"\x05ab",
                 "no final zero": b"\x02ab"}
        for what, question in cases.items():
            with self.subTest(what):
                self.assertRejected(self._header(qd=1) + question)

    def test_a_long_chain_of_pointers_is_refused_cheaply(self):
        def chain(length):  # a question whose name is `length` pointers, each to the next
            pointers = b"".join(struct.pack("!H", 0xC000 | (12 + 2 * (i + 1)))
                                for i in range(length))
            return self._header(qd=1, flags=0) + pointers + b"\x00" + b"\x00\x0c\x00\x01"
        self.assertEqual(gambiarra.decode_message(chain(8)).questions[0].name, "")
        with self.assertRaises(gambiarra.MdnsDecodeError):
            gambiarra.decode_message(chain(gambiarra.MDNS_MAX_POINTERS + 1))

    def test_the_root_name_encodes_either_way(self):
        for root in ("", "."):
            writer = gambiarra.PacketWriter()
            writer.name(root)
            self.assertEqual(bytes(writer.buffer[12:]), b"\x00")

    def test_malformed_record_data_raises_decode_error_only(self):
        cases = {"A of 3 bytes": (self.A, b"\x01\x02\x03"),
                 "SRV of 4 bytes": (self.SRV, b"\x00" * 4),
                 "PTR name past its record": (self.PTR, b"\x02hs"),
                 "PTR with a spare byte": (self.PTR, b"\xc0\x0c\x00"),
                 "TXT string past its record": (self.TXT, b"\x09ab"),
                 "NSEC bitmap past its record": (self.NSEC, b"\xc0\x0c\x00\x04\x40")}
        for what, (rtype, rdata) in cases.items():
            with self.subTest(what):  # zeros after the record: only its rdlength ends it
                self.assertRejected(self._header(an=1) + b"\x02hs\x00" + struct.pack(
                    "!HHIH", rtype, 1, 120, len(rdata)) + rdata + bytes(16))
        self.assertRejected(self._header(an=1) + b"\x02hs\x00"  # rdlength past the end
                            + struct.pack("!HHIH", self.TXT, 1, 120, 9) + b"\x03abc")

    def test_each_record_type_round_trips(self):
        records = self._records()
        nsec = records[-1]._replace(data=(self.HOST, (self.A, gambiarra.DNS_AAAA)))
        hinfo = gambiarra.Record(self.HOST, 13, 120, b"\x03CPU\x02OS", True)
        self.assertEqual(self._round_trip(*records), records)
        self.assertEqual(self._round_trip(nsec, hinfo), [nsec, hinfo])
        # window 0, 4 bytes of bitmap: A is bit 1, AAAA bit 28
        self.assertTrue(self._encode([nsec]).endswith(b"\x00\x04\x40\x00\x00\x08"))

    def test_srv_target_is_written_uncompressed(self):
        a, srv = self._records()[4], self._records()[2]
        packet = self._encode([a, srv])  # the target's name is already in the packet
        rdata = struct.pack("!HHH", 0, 0, 3000) + b"\x0cgambiarra-pc\x05local\x00"
        self.assertTrue(packet.endswith(struct.pack("!H", len(rdata)) + rdata))

    def test_txt_strings_empty_record_and_too_long_string(self):
        self.assertEqual(gambiarra.txt_strings({"txtvers": "1", "path": "/"}),
                         (b"txtvers=1", b"path=/"))
        empty = gambiarra.Record(self.INSTANCE, self.TXT, 4500, (), True)
        self.assertTrue(self._encode([empty]).endswith(b"\x00\x01\x00"))  # rdlength 1, one b""
        self.assertEqual(self._round_trip(empty)[0].data, (b"",))
        with self.assertRaises(ValueError):
            self._encode([empty._replace(data=(b"k=" + b"v" * 254,))])

    def test_txt_fields_keys_case_insensitive_bare_key_empty_and_equals_first_ignored(self):
        fields = gambiarra.txt_fields((b"TxtVers=1", b"txtvers=2", b"flag", b"=orphan", b"p=a=b"))
        self.assertEqual(fields, {"txtvers": "1", "flag": "", "p": "a=b"})

    def test_class_bits_unique_records_flush_and_shared_ptrs_do_not(self):
        found = self._wire_classes_and_ttls(self._encode(self._records()))
        self.assertEqual([rclass for rclass, _ in found],
                         [0x0001, 0x0001, 0x8001, 0x8001, 0x8001, 0x8001])

    def test_legacy_encoding_clears_flush_bit_and_caps_ttl_to_10(self):
        question = gambiarra.Question(self.SERVICE, self.PTR, False)
        packet = self._encode(self._records(), [question], legacy=True)
        self.assertEqual(self._wire_classes_and_ttls(packet), [(0x0001, 10)] * 6)
        self.assertEqual(gambiarra.decode_message(packet).questions, [question])

    def test_response_packet_header(self):
        records = self._records()
        packet = gambiarra.response_packet(records[1:2], records[2:])
        self.assertEqual(struct.unpack_from("!6H", packet), (0, 0x8400, 0, 1, 0, 4))

    def test_random_and_mutated_bytes_decode_or_raise_decode_error_only(self):
        rng, valid = random.Random(6762), self._encode(self._records())
        for i in range(2000):
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(100)))
            if i % 3 == 1:  # small counts, so parsing goes past the header
                data = self._header(*(rng.randrange(3) for _ in range(4))) + data
            elif i % 3 == 2:  # a valid packet with a few bytes changed
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            try:
                gambiarra.decode_message(bytes(data))
            except gambiarra.MdnsDecodeError:
                pass
            except Exception as exc:  # any other exception is the bug
                self.fail("%r decoding %r" % (exc, bytes(data)))

    def test_every_truncation_of_a_valid_packet_is_rejected(self):
        question = gambiarra.Question(self.SERVICE, self.PTR, True)
        packet = self._encode(self._records(), [question])
        for end in range(len(packet)):
            with self.subTest(end=end):
                self.assertRejected(packet[:end])

    def test_apple_qu_query_with_edns0_opt_and_unknown_types_skipped_by_rdlength(self):
        option = struct.pack("!HH", 4, 14) + bytes(range(14))  # EDNS0 Owner option
        packet = (self._header(qd=1, an=1, ar=1, flags=0)
                  + b"\x0a_gambiarra\x04_tcp\x05local\x00" + struct.pack("!HH", self.PTR, 0x8001)
                  + b"\xc0\x0c" + struct.pack("!HHIH", 13, 1, 120, 7) + b"\x03CPU\x02OS"
                  + b"\x00" + struct.pack("!HHIH", 41, 1440, 0x1194, len(option)) + option)
        message = gambiarra.decode_message(packet)
        self.assertEqual(message.questions, [gambiarra.Question(self.SERVICE, self.PTR, True)])
        self.assertEqual(message.answers,
                         [gambiarra.Record(self.SERVICE, 13, 120, b"\x03CPU\x02OS", False)])
        self.assertEqual(message.additionals, [gambiarra.Record("", 41, 0x1194, option, False)])



class TestMdnsAnswers(unittest.TestCase):
    """The query logic, without sockets: MdnsResponder.answer(datagram, source)."""

    def setUp(self):
        self.responder = gambiarra.MdnsResponder(
            3000, instance="gambiarra-hub-3000", host_label="gambiarra-pi",
            links=[LOOPBACK, LAN, WIFI], timings=gambiarra.MdnsTimings(shared_delay_s=(0.02, 0.12)))
        self.responder.state = "announced"

    def answer(self, datagram, source=("192.0.2.7", 5353), now=100.0):
        return self.responder.answer(datagram, source, now)

    def only_reply(self, *args, **kwargs):
        replies = self.answer(*args, **kwargs)
        self.assertEqual(len(replies), 1, replies)
        return replies[0], gambiarra.decode_message(replies[0].packet)

    def test_service_ptr_carries_srv_txt_and_addresses(self):
        reply, message = self.only_reply(dns_query((SERVICE, gambiarra.DNS_PTR)))
        self.assertEqual(reply.destination, (gambiarra.MDNS_GROUP, 5353))
        self.assertTrue(0.02 <= reply.delay_s <= 0.12)  # a shared answer waits 20-120 ms
        self.assertEqual((message.id, message.flags, message.questions), (0, 0x8400, []))
        self.assertEqual([(r.type, r.data) for r in message.answers],
                         [(gambiarra.DNS_PTR, "gambiarra-hub-3000." + SERVICE)])
        self.assertFalse(message.answers[0].unique)  # never cache-flush a shared PTR
        extra = {r.type: r for r in message.additionals}
        self.assertEqual(extra[gambiarra.DNS_SRV].data, (0, 0, 3000, "gambiarra-pi.local"))
        self.assertEqual(gambiarra.txt_fields(extra[gambiarra.DNS_TXT].data),
                         {"txtvers": "1", "version": gambiarra.__version__,
                          "protocol": "http", "path": "/"})
        self.assertEqual(extra[gambiarra.DNS_A].data, "192.0.2.2")
        self.assertEqual((extra[gambiarra.DNS_SRV].ttl, extra[gambiarra.DNS_TXT].ttl,
                          extra[gambiarra.DNS_A].ttl, message.answers[0].ttl),
                         (120, 4500, 120, 4500))
        self.assertTrue(all(r.unique for r in message.additionals))
        self.assertIn(gambiarra.DNS_NSEC, extra)  # "no AAAA here"

    def test_service_type_enumeration(self):
        _, message = self.only_reply(dns_query(("_services._dns-sd._udp.local", gambiarra.DNS_PTR)))
        self.assertEqual([r.data for r in message.answers], [SERVICE])
        self.assertEqual(message.additionals, [])

    def test_instance_and_host_questions_any_case(self):
        instance = "GAMBIARRA-hub-3000._Gambiarra._tcp.local"
        cases = [((instance, gambiarra.DNS_SRV), [gambiarra.DNS_SRV]),
                 ((instance, gambiarra.DNS_TXT), [gambiarra.DNS_TXT]),
                 ((instance, gambiarra.DNS_ANY), [gambiarra.DNS_SRV, gambiarra.DNS_TXT]),
                 (("Gambiarra-PI.local", gambiarra.DNS_A), [gambiarra.DNS_A]),
                 (("gambiarra-pi.local", gambiarra.DNS_ANY), [gambiarra.DNS_A]),
                 (("gambiarra-pi.local", gambiarra.DNS_AAAA), [gambiarra.DNS_NSEC])]
        for index, (question, types) in enumerate(cases):
            with self.subTest(question=question):  # seconds apart: no repeat suppression
                reply, message = self.only_reply(dns_query(question), now=100.0 + 2 * index)
                self.assertEqual([r.type for r in message.answers], types)
                self.assertEqual(reply.delay_s, 0)  # unique answers go at once

    def test_silent_on_what_is_not_ours(self):
        for question in (("_http._tcp.local", gambiarra.DNS_PTR),
                         ("other-hub._gambiarra._tcp.local", gambiarra.DNS_SRV),
                         ("raspberrypi.local", gambiarra.DNS_A),
                         (SERVICE, gambiarra.DNS_TXT)):
            self.assertEqual(self.answer(dns_query(question)), [], question)

    def test_silent_until_announced(self):
        self.responder.state = "probing"
        self.assertEqual(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR))), [])

    def test_known_answer_suppression(self):
        ours = gambiarra.Record(SERVICE, gambiarra.DNS_PTR, 4500,
                                "gambiarra-hub-3000." + SERVICE, False)
        self.assertEqual(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR), known=[ours])), [])
        stale = ours._replace(ttl=100)  # below half our TTL: the querier needs a refresh
        self.assertEqual(len(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR),
                                                   known=[stale]))), 1)

    def test_qu_gets_unicast_and_multicast_at_most_once_a_second(self):
        query = dns_query((SERVICE, gambiarra.DNS_PTR, True))
        first = self.answer(query, now=100.0)
        self.assertEqual([r.destination for r in first],
                         [("192.0.2.7", 5353), (gambiarra.MDNS_GROUP, 5353)])
        unicast = gambiarra.decode_message(first[0].packet)
        self.assertEqual((unicast.id, unicast.questions), (0, []))
        again = self.answer(query, now=100.5)
        self.assertEqual([r.destination for r in again], [("192.0.2.7", 5353)])
        self.assertEqual(len(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR)), now=100.6)), 0)
        self.assertEqual(len(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR)), now=101.1)), 1)

    def test_legacy_query_gets_a_plain_dns_reply(self):
        query = dns_query((SERVICE, gambiarra.DNS_PTR), ident=0x1234)
        reply, copy = self.answer(query, source=("10.9.3.4", 40000), now=100.0)
        message = gambiarra.decode_message(reply.packet)
        self.assertEqual(reply.destination, ("10.9.3.4", 40000))
        # A multicast copy too, for queriers whose firewall drops the unicast one...
        self.assertEqual(copy.destination, (gambiarra.MDNS_GROUP, 5353))
        self.assertEqual(gambiarra.decode_message(copy.packet).id, 0)
        # ...at most once a second.
        self.assertEqual(len(self.answer(query, source=("10.9.3.4", 40001), now=100.5)), 1)
        self.assertEqual(message.id, 0x1234)
        self.assertEqual(message.questions, [gambiarra.Question(SERVICE, gambiarra.DNS_PTR, False)])
        records = message.answers + message.additionals
        self.assertTrue(all(r.ttl <= 10 and not r.unique for r in records), records)
        self.assertLessEqual(len(reply.packet), 512)
        self.assertEqual([r.data for r in records if r.type == gambiarra.DNS_A], ["10.9.0.1"])

    def test_sockaddr_layouts_of_linux_and_bsd(self):
        import ctypes
        address = socket.inet_aton("192.0.2.9")
        layouts = {"linux": struct.pack("=H", socket.AF_INET) + b"\x00\x00" + address,
                   "darwin": bytes([16, socket.AF_INET]) + b"\x00\x00" + address}
        for platform, raw in layouts.items():
            buffer = ctypes.create_string_buffer(raw + bytes(8))
            with unittest.mock.patch.object(sys, "platform", platform):
                self.assertEqual(gambiarra._ipv4_of(ctypes.addressof(buffer)), "192.0.2.9")
                self.assertTrue(gambiarra._can_multicast(0x8863 if platform == "darwin"
                                                         else 0x1043), platform)  # en0, eth0
        self.assertIsNone(gambiarra._ipv4_of(None))

    def test_without_getifaddrs_loopback_and_the_default_route_are_used(self):
        with unittest.mock.patch.object(gambiarra, "_getifaddrs_links", lambda: []):
            links = gambiarra.network_links()
        self.assertEqual(links[0], LOOPBACK)
        self.assertTrue(all(link.netmask in ("255.0.0.0", "255.255.255.0") for link in links))

    def test_a_hub_bound_to_one_address_is_announced_on_its_interface_only(self):
        with unittest.mock.patch.object(gambiarra, "network_links", lambda: [LOOPBACK, LAN, WIFI]):
            for host, links in (("0.0.0.0", [LOOPBACK, LAN, WIFI]), ("", [LOOPBACK, LAN, WIFI]),
                                ("127.0.0.1", [LOOPBACK]), ("localhost", [LOOPBACK]),
                                ("192.0.2.2", [LAN])):
                self.assertEqual(gambiarra.links_for_host(host), links, host)

    @unittest.skipUnless(sys.platform.startswith("linux"), "Linux interface flags")
    def test_interfaces_that_can_carry_multicast(self):
        cases = {0x49: True,     # lo: up, loopback, running (no multicast flag, works)
                 0x1043: True,   # eth0: up, broadcast, running, multicast
                 0x1002: False,  # eth0, down
                 0x10d1: False,  # tun0: a point-to-point tunnel (OpenVPN)
                 0x91: False}    # wg0: point-to-point, no multicast (WireGuard)
        for flags, expected in cases.items():
            self.assertEqual(gambiarra._can_multicast(flags), expected, hex(flags))
        self.assertIn("127.0.0.1", [link.address for link in gambiarra.network_links()])

    def test_each_interface_gets_its_own_addresses(self):
        for index, (source, address) in enumerate((
                                (("192.0.2.7", 5353), "192.0.2.2"),
                                (("10.9.200.5", 5353), "10.9.0.1"),
                                (("127.0.0.1", 5353), "127.0.0.1"),
                                (("10.9.0.1", 5353), "10.9.0.1"))):       # ourselves
            _, message = self.only_reply(dns_query(("gambiarra-pi.local", gambiarra.DNS_A)),
                                         source=source, now=100.0 + 2 * index)
            self.assertEqual([r.data for r in message.answers], [address], source)
        # Off-link: once answered with the first link's addresses, now ignored
        # (RFC 6762 section 11; see TestMdnsSpoofing).
        self.assertEqual(self.answer(dns_query(("gambiarra-pi.local", gambiarra.DNS_A)),
                                     source=("198.51.100.1", 5353), now=120.0), [])

    def test_a_probe_for_our_name_is_answered_at_once(self):
        self.answer(dns_query(("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_ANY)), now=100.0)
        claim = gambiarra.Record("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_SRV, 120,
                                 (0, 0, 4000, "other.local"), True)
        probe = dns_query(("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_ANY, True),
                          authorities=[claim])
        replies = self.answer(probe, now=100.1)  # within a second, yet multicast too
        self.assertEqual([(r.destination[0], r.delay_s) for r in replies],
                         [("192.0.2.7", 0), (gambiarra.MDNS_GROUP, 0)])

    def test_conflicting_response_renames_and_probes_again(self):
        """Once one conflicting response renamed us; now it makes us probe again
        (defending the name), and the name changes only when the claim answers
        our probes (issue 10: a one-packet spoof renamed the real hub)."""
        theirs = gambiarra.Record("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_SRV, 120,
                                  (0, 0, 3000, "someone-else.local"), True)
        logs = CapturedLogs(self)
        self.responder._send = lambda packet, destination, link: None  # no socket here
        self.answer(gambiarra.response_packet([theirs], []))
        self.assertEqual(self.responder.service.instance, "gambiarra-hub-3000")
        self.assertEqual((self.responder.state, self.responder.defending), ("waiting", True))
        self.assertEqual(len(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR)))), 1)
        for count in range(gambiarra.MDNS_CONFLICT_CONFIRMATIONS):  # the owner answers our probes
            self.responder._probe(count)
            self.answer(gambiarra.response_packet([theirs], []), now=101.0 + count)
        self.assertEqual(self.responder.service.instance, "gambiarra-hub-3000 (2)")
        self.assertEqual(self.responder.service.host, "gambiarra-pi")  # only the name in conflict
        self.assertEqual((self.responder.state, self.responder.defending), ("waiting", False))
        self.assertIn("advertising as gambiarra-hub-3000 (2)", logs.at(logging.WARNING)[-1])

    def test_simultaneous_probes_the_later_data_wins(self):
        instance = "gambiarra-hub-3000." + SERVICE
        self.responder.state = "probing"
        for port, we_defer in ((1000, False), (3000, False), (9999, True)):  # 3000: our own echo
            with self.subTest(their_port=port):
                claim = gambiarra.Record(instance, gambiarra.DNS_SRV, 120,
                                         (0, 0, port, "gambiarra-pi.local"), True)
                self.answer(dns_query((instance, gambiarra.DNS_ANY, True), authorities=[
                    claim, self.responder.service.records(LAN)["txt"]]))
                self.assertEqual(self.responder.state, "waiting" if we_defer else "probing")
        self.assertEqual(self.responder.service.instance, "gambiarra-hub-3000")  # not renamed

    def test_our_own_records_and_goodbyes_are_no_conflict(self):
        for record in gambiarra._flatten(self.responder.service.records(LAN).values()):
            self.answer(gambiarra.response_packet([record], []))
            self.answer(gambiarra.response_packet([record._replace(ttl=0)], []))
        self.assertEqual((self.responder.service.instance, self.responder.service.renames),
                         ("gambiarra-hub-3000", 0))

    def test_ignores_other_opcodes_and_legacy_queries_with_records(self):
        query = bytearray(dns_query((SERVICE, gambiarra.DNS_PTR)))
        query[2] |= 0x28  # opcode 5 (update)
        self.assertEqual(self.answer(bytes(query)), [])
        known = gambiarra.Record(SERVICE, gambiarra.DNS_PTR, 1, "x." + SERVICE, False)
        self.assertEqual(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR), known=[known]),
                                     source=("192.0.2.7", 40000)), [])

    def test_malformed_datagram_raises_decode_error_only(self):
        with self.assertRaises(gambiarra.MdnsDecodeError):
            self.answer(b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c")


class MdnsTestCase(unittest.TestCase):
    """Responders on loopback, on a port of the test's own (never 5353)."""

    def setUp(self):
        self.threads_before = threading.active_count()
        self.addCleanup(self.check_no_thread_leak)
        self.peer = multicast_socket(0)  # picks the port; sees every multicast
        self.addCleanup(self.peer.close)
        self.mdns_port = self.peer.getsockname()[1]

    def check_no_thread_leak(self):
        self.assertTrue(wait_until(lambda: threading.active_count() <= self.threads_before),
                        threading.enumerate())

    def responder(self, service_port=3000, **options):
        options.setdefault("links", [LOOPBACK])
        timings = dict(FAST_MDNS, **options.pop("timings", {}))
        responder = gambiarra.MdnsResponder(
            service_port, port=self.mdns_port, timings=gambiarra.MdnsTimings(**timings),
            host_label=options.pop("host_label", "gambiarra-test"), **options)
        self.addCleanup(responder.close)
        return responder

    def started(self, service_port=3000, **options):
        responder = self.responder(service_port, **options).start()
        self.assertTrue(responder.wait_announced(WAIT_S))
        return responder

    def legacy_query(self, *questions, ident=0x4242, timeout=WAIT_S):
        asker = one_shot_socket()
        self.addCleanup(asker.close)
        asker.sendto(dns_query(*questions, ident=ident), (gambiarra.MDNS_GROUP, self.mdns_port))
        messages, _ = receive_messages(asker, lambda found: found, timeout)
        return messages[0] if messages else None


class TestMdnsResponder(MdnsTestCase):
    def test_answers_a_legacy_query_on_loopback(self):
        self.started()
        reply = self.legacy_query((SERVICE, gambiarra.DNS_PTR))
        self.assertIsNotNone(reply, "no reply within %d s" % WAIT_S)
        self.assertEqual(reply.id, 0x4242)
        self.assertEqual(reply.questions[0].name, SERVICE)
        self.assertEqual(reply.answers[0].data, "gambiarra-hub-3000." + SERVICE)
        self.assertEqual([r.data for r in reply.additionals if r.type == gambiarra.DNS_A],
                         ["127.0.0.1"])

    def test_answers_a_multicast_query_from_the_mdns_port(self):
        self.started(timings={"repeat_s": 0})  # the announcements just multicast every record
        self.peer.sendto(dns_query(("gambiarra-test.local", gambiarra.DNS_A)),
                         (gambiarra.MDNS_GROUP, self.mdns_port))

        def is_answer(message):  # not an announcement, which has PTRs too
            types = {r.type for r in message.answers}
            return message.flags & 0x8000 and types == {gambiarra.DNS_A}
        messages, sources = receive_messages(self.peer, lambda found: any(map(is_answer, found)))
        answers = [(m, s) for m, s in zip(messages, sources) if is_answer(m)]
        self.assertTrue(answers, "no multicast answer")
        message, source = answers[0]
        self.assertEqual([r.data for r in message.answers], ["127.0.0.1"])
        self.assertEqual(source[1], self.mdns_port)  # responses leave from the mDNS port

    def test_announces_three_times_with_every_record(self):
        responder = self.started()
        messages, sources = receive_messages(
            self.peer, lambda found: len([m for m in found if m.flags & 0x8000]) >= 3)
        announcements = [m for m in messages if m.flags & 0x8000]
        self.assertEqual(len(announcements), 3)
        for message, source in zip(announcements, sources):
            self.assertEqual((message.id, message.questions, message.authorities), (0, [], []))
            self.assertEqual(sorted(r.type for r in message.answers),
                             [gambiarra.DNS_A, gambiarra.DNS_PTR, gambiarra.DNS_PTR,
                              gambiarra.DNS_TXT, gambiarra.DNS_SRV])
            self.assertEqual(source[1], self.mdns_port)  # responses leave from the mDNS port
        self.assertEqual(responder.service.renames, 0)  # our own probes echoed back are no conflict

    def test_default_schedule_follows_the_rfc(self):
        timings = gambiarra.MdnsTimings()
        self.assertEqual((timings.probe_wait_s, timings.probe_interval_s), (0.25, 0.25))
        self.assertEqual(timings.announce_gaps_s, (1.0, 2.0))  # at 0, 1 and 3 s
        self.assertEqual(timings.shared_delay_s, (0.02, 0.12))

    def test_probes_before_announcing(self):
        self.responder().start()
        messages, _ = receive_messages(self.peer, lambda found: any(m.flags for m in found))
        probes = [m for m in messages if not m.flags]
        self.assertEqual(len(probes), 3)
        for probe in probes:
            self.assertEqual({(q.name, q.type, q.unicast) for q in probe.questions},
                             {("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_ANY, True),
                              ("gambiarra-test.local", gambiarra.DNS_ANY, True)})
            self.assertEqual(sorted(r.type for r in probe.authorities),
                             [gambiarra.DNS_A, gambiarra.DNS_TXT, gambiarra.DNS_SRV])

    def test_goodbye_on_close(self):
        responder = self.started()
        sock = responder._sock
        responder.close()
        self.assertEqual(sock.fileno(), -1)
        self.assertFalse(responder._thread.is_alive())
        messages, _ = receive_messages(
            self.peer, lambda found: any(r.ttl == 0 for m in found for r in m.answers))
        goodbye = [m for m in messages if m.answers and all(r.ttl == 0 for r in m.answers)]
        self.assertTrue(goodbye, "no goodbye")
        self.assertEqual(sorted(r.type for r in goodbye[0].answers),
                         [gambiarra.DNS_A, gambiarra.DNS_PTR, gambiarra.DNS_TXT, gambiarra.DNS_SRV])

    def test_renames_when_another_hub_has_the_name(self):
        logs = CapturedLogs(self)
        responder = self.responder(timings={"probe_interval_s": 0.05})
        theirs = gambiarra.Record("gambiarra-hub-3000." + SERVICE, gambiarra.DNS_SRV, 120,
                                  (0, 0, 3000, "elsewhere.local"), True)

        def defend(query, source):  # like a real owner: every probe is answered
            if query.authorities and query.questions[0].name.startswith("gambiarra-hub-3000."):
                yield gambiarra.response_packet([theirs], [])
        owner = FakeMdnsPeer(self.peer, defend, destination=(gambiarra.MDNS_GROUP,
                                                             self.mdns_port))
        self.addCleanup(owner.close)
        responder.start()
        self.assertTrue(responder.wait_announced(WAIT_S))
        self.assertEqual(responder.service.instance, "gambiarra-hub-3000 (2)")
        self.assertIn("advertising as gambiarra-hub-3000 (2)", logs.at(logging.WARNING)[0])
        reply = self.legacy_query((SERVICE, gambiarra.DNS_PTR))
        self.assertEqual(reply.answers[0].data, "gambiarra-hub-3000 (2)." + SERVICE)

    def test_two_hubs_on_one_port_both_show(self):
        logs = CapturedLogs(self)
        first = self.started(3000, instance="gambiarra-hub-3000")
        second = self.started(3000, instance="gambiarra-hub-3000", host_label="gambiarra-test")
        self.assertEqual(first.service.instance, "gambiarra-hub-3000")
        self.assertEqual(second.service.instance, "gambiarra-hub-3000 (2)")
        self.assertEqual(second.service.host, "gambiarra-test-2")  # the host name too was taken
        hubs = gambiarra.discover_hubs(timeout_s=1, port=self.mdns_port, links=[LOOPBACK])
        self.assertEqual([hub.name for hub in hubs],
                         ["gambiarra-hub-3000", "gambiarra-hub-3000 (2)"])
        warnings = logs.at(logging.WARNING)
        self.assertEqual(len(warnings), 1)  # the rename, said once, with both new names
        self.assertIn("advertising as gambiarra-hub-3000 (2) and gambiarra-test-2.local",
                      warnings[0])

    def test_announces_again_when_the_addresses_change(self):
        second = gambiarra.Link("lo", "127.0.0.2", "255.0.0.0")
        interfaces = [[LOOPBACK]]
        with unittest.mock.patch.object(gambiarra, "network_links", lambda: interfaces[-1]):
            responder = gambiarra.MdnsResponder(
                3000, port=self.mdns_port, host_label="gambiarra-test",
                timings=gambiarra.MdnsTimings(refresh_s=0.05, **FAST_MDNS))
            self.addCleanup(responder.close)
            responder.start()
            self.assertTrue(responder.wait_announced(WAIT_S))
            interfaces.append([LOOPBACK, second])  # a new address, as after a DHCP renewal
            messages, _ = receive_messages(self.peer, lambda found: any(
                r.data == "127.0.0.2" for m in found for r in m.answers))
        addresses = [sorted(r.data for r in m.answers if r.type == gambiarra.DNS_A)
                     for m in messages if m.flags & 0x8000]
        self.assertEqual(addresses[-1], ["127.0.0.1", "127.0.0.2"])

    def test_two_hubs_probing_at_once_end_with_two_names(self):
        logs = CapturedLogs(self)
        slow_probes = {"probe_interval_s": 0.2}  # they overlap even on a loaded machine
        first = self.responder(3000, instance="gambiarra-hub", timings=slow_probes)
        second = self.responder(3001, instance="gambiarra-hub", timings=slow_probes)
        first.start(), second.start()
        self.assertTrue(first.wait_announced(WAIT_S) and second.wait_announced(WAIT_S))
        self.assertTrue(wait_until(lambda: first.state == second.state == "announced"))
        # 3001 sorts after 3000: the second wins the tiebreak, the first renames.
        self.assertEqual((first.service.instance, second.service.instance),
                         ("gambiarra-hub (2)", "gambiarra-hub"))
        self.assertIn("trying again", " ".join(logs.at(logging.INFO)))

    def test_garbage_never_kills_the_responder(self):
        self.started()
        garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(garbage.close)
        rng = random.Random(7)
        for size in (0, 1, 11, 12, 13, 40, 300, 9500):
            garbage.sendto(bytes(rng.getrandbits(8) for _ in range(size)),
                           ("127.0.0.1", self.mdns_port))
        garbage.sendto(b"\x00" * 4 + b"\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x0c\x00\x01",
                       ("127.0.0.1", self.mdns_port))  # a self-pointing name
        reply = self.legacy_query((SERVICE, gambiarra.DNS_PTR))
        self.assertIsNotNone(reply)

    def test_a_packet_that_breaks_the_logic_is_logged_once_and_skipped(self):
        responder = self.started()
        logs = CapturedLogs(self)
        answer, calls = responder.answer, []

        def broken_once(datagram, source):  # breaks on the first one-shot query
            if source[1] != responder.port and not calls:
                calls.append(source)
                raise KeyError("a bug")
            return answer(datagram, source)
        responder.answer = broken_once
        self.assertIsNone(self.legacy_query((SERVICE, gambiarra.DNS_PTR), timeout=0.3))
        self.assertIsNotNone(self.legacy_query((SERVICE, gambiarra.DNS_PTR)))
        self.assertIn("could not be handled", " ".join(logs.at(logging.WARNING)))

    def test_an_interface_that_cannot_join_is_skipped_with_a_warning(self):
        logs = CapturedLogs(self)
        fake = gambiarra.Link("fake0", "203.0.113.9", "255.255.255.0")
        responder = self.started(links=[LOOPBACK, fake])
        self.assertEqual(responder.service.links, [LOOPBACK])
        self.assertTrue(any("fake0" in line for line in logs.at(logging.WARNING)))
        self.assertIsNotNone(self.legacy_query((SERVICE, gambiarra.DNS_PTR)))

    def test_no_usable_interface_is_an_error_with_the_cause(self):
        CapturedLogs(self)
        fake = gambiarra.Link("fake0", "203.0.113.9", "255.255.255.0")
        with self.assertRaises(gambiarra.MdnsUnavailable) as caught:
            self.responder(links=[fake]).start()
        self.assertIn("multicast group 224.0.0.251", str(caught.exception))
        self.assertIn("fake0 203.0.113.9", str(caught.exception))  # and why


class TestHubMdns(MdnsTestCase):
    def hub(self, **mdns_options):
        options = dict(port=self.mdns_port, links=[LOOPBACK],
                       timings=gambiarra.MdnsTimings(**FAST_MDNS))
        options.update(mdns_options)
        hub = gambiarra.Hub("127.0.0.1", 0, mdns=True, mdns_options=options).start()
        self.addCleanup(hub.close)
        return hub

    def test_hub_is_advertised_and_says_goodbye(self):
        hub = self.hub()
        self.assertTrue(hub.mdns_responder.wait_announced(WAIT_S))
        self.assertEqual(hub.mdns_responder.service.instance, "gambiarra-hub-%d" % hub.port)
        hubs = gambiarra.discover_hubs(timeout_s=1, port=self.mdns_port, links=[LOOPBACK])
        self.assertEqual([h.url for h in hubs], ["http://127.0.0.1:%d" % hub.port])
        hub.close()
        messages, _ = receive_messages(self.peer, lambda found: any(
            r.ttl == 0 for m in found for r in m.answers))
        self.assertTrue(any(r.ttl == 0 and r.type == gambiarra.DNS_PTR
                            for m in messages for r in m.answers))

    def banner(self, hub):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            gambiarra.print_banner(hub)
        return out.getvalue()

    def test_banner_says_how_clients_find_the_hub(self):
        banner = self.banner(self.hub())
        self.assertIn('create "My room"\n', banner)  # no --hub needed
        self.assertIn("find the hub by themselves (mDNS)", banner)
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(busy.close)
        busy.bind(("", 0))
        CapturedLogs(self)
        banner = self.banner(self.hub(port=busy.getsockname()[1]))
        self.assertIn("mDNS is off", banner)
        self.assertIn('create "My room" --hub http://', banner)
        without = gambiarra.Hub("127.0.0.1", 0).start()
        self.addCleanup(without.close)
        self.assertIn("start with --mdns", self.banner(without))

    def test_port_held_exclusively_is_one_warning_and_http_goes_on(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no SO_REUSEADDR
        self.addCleanup(busy.close)
        busy.bind(("", 0))
        logs = CapturedLogs(self)
        hub = self.hub(port=busy.getsockname()[1])
        self.assertIsNone(hub.mdns_responder)
        warnings = logs.at(logging.WARNING)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("held exclusively", warnings[0])
        self.assertIn("--hub http://", warnings[0])
        with urllib_open(hub.url + "/health") as response:
            self.assertEqual(response.status, 200)


class FakeMdnsPeer:
    """Answers every PTR query for our service with ``reply(query, source)``,
    from the test's mDNS port: stands in for odd or hostile responders. The
    answers go back to the source, or to ``destination``, from ``sender``
    (default: the socket that read the query)."""

    def __init__(self, sock, reply, sender=None, destination=None):
        self.sock, self.reply = sock, reply
        self.sender, self.destination = sender or sock, destination
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                data, source = self.sock.recvfrom(65536)
                message = gambiarra.decode_message(data)
                if not message.flags & 0x8000:
                    for packet in self.reply(message, source):
                        self.sender.sendto(packet, self.destination or source)

    def close(self):
        self.stop.set()
        self.thread.join(WAIT_S)


class TestDiscovery(MdnsTestCase):
    """The CLI's browser: ``discover`` and the commands run without --hub."""

    def run_main(self, *argv, browse_s=1.0):
        patches = [unittest.mock.patch.object(gambiarra, "MDNS_PORT", self.mdns_port),
                   unittest.mock.patch.object(gambiarra, "MDNS_BROWSE_S", browse_s),
                   unittest.mock.patch.object(gambiarra, "network_links", lambda: [LOOPBACK]),
                   unittest.mock.patch.dict(os.environ)]
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            os.environ.pop("GAMBIARRA_HUB", None)
            return TestCli.run_main(self, *argv)

    def hub(self, **options):
        hub = gambiarra.Hub("127.0.0.1", 0, mdns=True, mdns_options=dict(
            port=self.mdns_port, links=[LOOPBACK], timings=gambiarra.MdnsTimings(**FAST_MDNS),
            **options)).start()
        self.addCleanup(hub.close)
        self.assertTrue(hub.mdns_responder.wait_announced(WAIT_S))
        return hub

    def test_one_hub_is_used_and_named_on_stderr(self):
        hub = self.hub()
        status, out, err = self.run_main("create", "Found")
        self.assertEqual(status, 0, err)
        self.assertRegex(out.strip(), r"^[A-Z0-9]{6}$")  # stdout stays the code alone
        self.assertIn("using hub gambiarra-hub-%d at %s" % (hub.port, hub.url), err)
        status, out, _ = self.run_main("list")
        self.assertIn("Found", out)

    def test_several_hubs_are_listed_and_the_command_stops(self):
        CapturedLogs(self)  # the second hub renames its host name: a warning
        first, second = self.hub(), self.hub()
        status, out, err = self.run_main("list")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("2 hubs answered", err)
        self.assertIn(first.url, err)
        self.assertIn(second.url, err)
        self.assertIn("--hub", err)

    def test_no_hub_falls_back_to_localhost_and_says_so(self):
        started = time.monotonic()
        hub_url = []
        with unittest.mock.patch.object(gambiarra, "hub_request",
                                        lambda url, *args, **kw: hub_url.append(url) or
                                        {"rooms": []}):
            status, _, err = self.run_main("list", browse_s=0.3)
        self.assertEqual((status, hub_url), (0, ["http://localhost:3000"]))
        self.assertIn("no hub answered", err)
        self.assertLess(time.monotonic() - started, WAIT_S)

    def test_hub_option_and_environment_skip_the_search(self):
        hub = self.hub()
        with unittest.mock.patch.object(gambiarra, "discover_hubs", None):  # would fail
            self.assertEqual(self.run_main("list", "--hub", hub.url)[0], 0)
            os.environ["GAMBIARRA_HUB"] = hub.url
            try:
                self.assertEqual(TestCli.run_main(self, "list")[0], 0)
            finally:
                del os.environ["GAMBIARRA_HUB"]

    def test_discover_prints_urls_and_json(self):
        hub = self.hub()
        status, out, _ = self.run_main("discover", "--timeout", "0.5")
        self.assertEqual((status, out), (0, hub.url + "\n"))
        status, out, _ = self.run_main("discover", "--json", "--timeout", "0.5")
        found = json.loads(out)
        self.assertEqual(len(found), 1)
        self.assertEqual((found[0]["name"], found[0]["port"], found[0]["addresses"]),
                         ("gambiarra-hub-%d" % hub.port, hub.port, ["127.0.0.1"]))
        self.assertEqual(found[0]["txt"]["version"], gambiarra.__version__)

    def test_discover_finds_nothing_exits_1(self):
        status, out, err = self.run_main("discover", "--timeout", "0.2")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no hub answered", err)

    def test_a_txt_path_cannot_point_the_url_elsewhere(self):
        def reply(query, source):
            for name, path in (("with-path", "/gambiarra/"), ("hostile", "@evil.example/")):
                instance = name + "." + SERVICE
                yield gambiarra.encode_message(gambiarra.Message(query.id, 0x8400, [], [
                    gambiarra.Record(SERVICE, gambiarra.DNS_PTR, 120, instance, False),
                    gambiarra.Record(instance, gambiarra.DNS_SRV, 120, (0, 0, 1, "x.local"), True),
                    gambiarra.Record(instance, gambiarra.DNS_TXT, 120,
                                     (b"path=" + path.encode(),), True)], [], []))
        peer = FakeMdnsPeer(self.peer, reply)
        self.addCleanup(peer.close)
        status, out, _ = self.run_main("discover", "--timeout", "0.5")
        self.assertEqual(out, "http://127.0.0.1:1\nhttp://127.0.0.1:1/gambiarra\n")

    def test_wrong_id_goodbyes_and_garbage_are_ignored(self):
        def records(name, ttl):
            instance = name + "." + SERVICE
            return [gambiarra.Record(SERVICE, gambiarra.DNS_PTR, ttl, instance, False),
                    gambiarra.Record(instance, gambiarra.DNS_SRV, ttl, (0, 0, 1, "x.local"), True),
                    gambiarra.Record("x.local", gambiarra.DNS_A, ttl, "127.0.0.1", True)]

        def reply(query, source):
            yield b"\xff" * 30
            yield gambiarra.encode_message(gambiarra.Message(
                query.id ^ 1, 0x8400, query.questions, records("wrong-id", 120), [], []))
            yield gambiarra.encode_message(gambiarra.Message(
                query.id, 0x8400, query.questions, records("leaving", 0), [], []))
            yield gambiarra.encode_message(gambiarra.Message(
                query.id, 0x8400, query.questions, records("good", 120), [], []))
        peer = FakeMdnsPeer(self.peer, reply)
        self.addCleanup(peer.close)
        status, out, _ = self.run_main("discover", "--timeout", "0.5")
        self.assertEqual((status, out), (0, "http://127.0.0.1:1\n"))


class TestMdnsSpoofing(unittest.TestCase):
    """What an attendee's laptop can make the responder do (issue 10, item 5):
    forged claims on our names, packets from off the link. No sockets."""

    INSTANCE = "gambiarra-hub-3000." + SERVICE

    def setUp(self):
        self.responder = gambiarra.MdnsResponder(
            3000, instance="gambiarra-hub-3000", host_label="gambiarra-pi",
            links=[LOOPBACK, LAN], timings=gambiarra.MdnsTimings(shared_delay_s=(0, 0)))
        self.responder.state = "announced"
        self.responder._send = lambda packet, destination, link: None  # no socket here
        self.logs = CapturedLogs(self)

    def answer(self, datagram, source=("192.0.2.66", 5353), now=100.0):
        return self.responder.answer(datagram, source, now)

    def claim(self, **changes):
        record = gambiarra.Record(self.INSTANCE, gambiarra.DNS_SRV, 120,
                                  (0, 0, 3000, "rogue.local"), True)
        return record._replace(**changes)

    def assert_untouched(self, what):
        self.assertEqual((self.responder.state, self.responder.defending,
                          self.responder.service.instance, self.responder.service.host),
                         ("announced", False, "gambiarra-hub-3000", "gambiarra-pi"), what)

    def test_what_is_no_claim_leaves_the_name_alone(self):
        claim = self.claim()
        cases = {
            "a query's known answer": dns_query((SERVICE, gambiarra.DNS_PTR), known=[claim]),
            "not flagged authoritative": gambiarra.encode_message(gambiarra.Message(
                0, gambiarra.DNS_FLAG_RESPONSE, [], [claim], [], [])),
            "only in the additional section": gambiarra.response_packet(
                [self.responder.service.records(LAN)["ptr"]], [claim]),
            "no cache-flush bit": gambiarra.response_packet([claim._replace(unique=False)], []),
            "a goodbye": gambiarra.response_packet([claim._replace(ttl=0)], []),
            "a type that does not claim": gambiarra.response_packet([claim._replace(
                type=gambiarra.DNS_PTR, data="x.local")], []),
            "our own record looped back": gambiarra.response_packet(
                [self.responder.service.records(LAN)["srv"]], []),
        }
        for what, datagram in cases.items():
            self.answer(datagram)
            self.assert_untouched(what)
        spoof = gambiarra.response_packet([claim], [])
        self.answer(spoof, source=("192.0.2.66", 40000))
        self.assert_untouched("a response from a port other than 5353")
        self.answer(spoof, source=("198.51.100.7", 5353))
        self.assert_untouched("a response from off the link")

    def test_one_forged_announcement_is_defended_not_obeyed(self):
        self.answer(gambiarra.response_packet([self.claim()], []))
        self.assertEqual(self.responder.service.instance, "gambiarra-hub-3000")
        self.assertEqual(self.responder.service.renames, 0)
        self.assertTrue(self.responder.defending)
        # Still ours while we probe again: queries are answered.
        self.assertEqual(len(self.answer(dns_query((SERVICE, gambiarra.DNS_PTR)),
                                         source=("192.0.2.7", 5353), now=101.0)), 1)
        for count in range(gambiarra.MDNS_PROBES + 1):  # nobody answers our probes
            self.responder._probe(count)
        self.assertEqual((self.responder.state, self.responder.defending,
                          self.responder.service.instance),
                         ("announced", False, "gambiarra-hub-3000"))
        self.assertIn("192.0.2.66 claims gambiarra-hub-3000;", " ".join(self.logs.at(logging.WARNING)))

    def test_a_burst_within_one_probe_keeps_the_name(self):
        spoof = gambiarra.response_packet([self.claim(), gambiarra.Record(
            "gambiarra-pi.local", gambiarra.DNS_A, 120, "192.0.2.66", True)], [])
        for index in range(20):  # before our first probe: ignored (section 8.1)
            self.answer(spoof, now=100.0 + index / 1000)
        self.responder._probe(0)
        for index in range(20):  # all after the same probe: one confirmation only
            self.answer(spoof, now=100.3 + index / 1000)
        for count in range(1, gambiarra.MDNS_PROBES + 1):
            self.responder._probe(count)
        self.assertEqual((self.responder.state, self.responder.service.instance,
                          self.responder.service.host),
                         ("announced", "gambiarra-hub-3000", "gambiarra-pi"))

    def test_one_spoofed_answer_to_our_first_probe_renames_nothing(self):
        self.responder.state = "idle"
        self.responder._start_probing(0)
        self.responder._probe(0)
        self.answer(gambiarra.response_packet([self.claim()], []))
        for count in range(1, gambiarra.MDNS_PROBES + 1):
            self.responder._probe(count)
        self.assertEqual((self.responder.state, self.responder.service.instance),
                         ("announced", "gambiarra-hub-3000"))

    def test_queries_from_off_the_link_are_ignored(self):
        ptr = (SERVICE, gambiarra.DNS_PTR)
        for source in (("198.51.100.7", 5353), ("198.51.100.7", 40000), ("203.0.113.9", 53)):
            for query in (dns_query(ptr), dns_query(ptr + (True,)), dns_query(ptr, ident=7)):
                self.assertEqual(self.answer(query, source=source), [], source)
        self.assertTrue(self.answer(dns_query(ptr, ident=7), source=("192.0.2.66", 40000)))

    def test_a_probe_from_off_the_link_or_another_port_never_makes_us_wait(self):
        self.responder.state = "probing"
        later = self.claim(data=(0, 0, 9999, "gambiarra-pi.local"))  # would win the tiebreak
        probe = dns_query((self.INSTANCE, gambiarra.DNS_ANY, True), authorities=[later])
        for source in (("198.51.100.7", 5353), ("192.0.2.66", 40000)):
            self.answer(probe, source=source)
            self.assertEqual(self.responder.state, "probing", source)
        self.answer(probe)
        self.assertEqual(self.responder.state, "waiting")  # on the link, from 5353: it counts


def hub_records(name, target, address, port=3000, ttl=120):
    """What a hub announces: PTR, SRV, TXT and its address."""
    instance = name + "." + SERVICE
    return [gambiarra.Record(SERVICE, gambiarra.DNS_PTR, ttl, instance, False),
            gambiarra.Record(instance, gambiarra.DNS_SRV, ttl, (0, 0, port, target), True),
            gambiarra.Record(instance, gambiarra.DNS_TXT, ttl, (b"path=/",), True),
            gambiarra.Record(target, gambiarra.DNS_A, ttl, address, True)]


class RecordingHub(http.server.ThreadingHTTPServer):
    """A rogue's hub: lists one room and notes every request's Authorization."""

    daemon_threads = True

    def __init__(self, host):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):
                self.seen.append((handler.path, handler.headers.get("Authorization")))
                body = json.dumps({"rooms": [{"code": "ROGUE1", "name": "Free GPUs",
                                              "participantCount": 1}],
                                   "participants": []}).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass
        self.seen = []
        super().__init__((host, 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.shutdown()
        self.server_close()
        self.thread.join(WAIT_S)


class RogueMdnsPeer:
    """An attendee's laptop at 127.0.0.2: to the asker of a one-shot query,
    and to the group from the mDNS port, it sends ``packets(query)`` every
    20 ms for most of a search, so that some come after the real hub's answers."""

    def __init__(self, listen, packets, copies=40, gap_s=0.02):
        self.listen, self.packets, self.copies, self.gap_s = listen, packets, copies, gap_s
        self.group = (gambiarra.MDNS_GROUP, listen.getsockname()[1])
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            with contextlib.suppress(OSError):
                self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                               socket.inet_aton("127.0.0.1"))
        try:
            self.sender.bind(("127.0.0.2", self.group[1]))
        except OSError as exc:
            self.sender.close()
            raise unittest.SkipTest("no 127.0.0.2 on this host: %s" % exc)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        asker, left, next_at = None, 0, 0
        while not self.stop.is_set():
            if select.select([self.listen], [], [], self.gap_s)[0]:
                data, source = self.listen.recvfrom(65536)
                with contextlib.suppress(gambiarra.MdnsDecodeError):
                    message = gambiarra.decode_message(data)
                    if not message.flags & 0x8000 and message.id:  # a one-shot query
                        asker, left = (source, message), self.copies
            if asker and left and time.monotonic() >= next_at:
                left, next_at = left - 1, time.monotonic() + self.gap_s
                for packet in self.packets(asker[1]):
                    self.sender.sendto(packet, asker[0])
                    self.sender.sendto(packet, self.group)

    def close(self):
        self.stop.set()
        self.thread.join(WAIT_S)
        self.sender.close()


class TestDiscoveryTrust(MdnsTestCase):
    """A rogue on the link cannot make the CLI pick it over the real hub
    (issue 10: a rogue's goodbye made 5 of 5 `list` runs call the rogue)."""

    run_main, hub = TestDiscovery.run_main, TestDiscovery.hub

    def test_a_goodbye_counts_only_from_the_machine_that_sent_the_hub(self):
        collector = gambiarra.HubCollector()
        real = hub_records("gambiarra-hub-3000", "pi.local", "192.0.2.2")
        collector.add(gambiarra.Message(0, 0x8400, [], real, [], []), ("192.0.2.2", 5353))
        forged = [r._replace(ttl=0) for r in real] + hub_records(
            "free-gpus", "rogue.local", "192.0.2.66")
        collector.add(gambiarra.Message(0, 0x8400, [], forged, [], []), ("192.0.2.66", 5353))
        self.assertEqual([hub.url for hub in collector.hubs()],
                         ["http://192.0.2.66:3000", "http://192.0.2.2:3000"])
        goodbye = [r._replace(ttl=0) for r in real]  # from the hub itself: it leaves
        collector.add(gambiarra.Message(0, 0x8400, [], goodbye, [], []), ("192.0.2.2", 5353))
        self.assertEqual([hub.name for hub in collector.hubs()], ["free-gpus"])

    def test_records_of_one_machine_never_change_another_machines_hub(self):
        collector = gambiarra.HubCollector()
        real = hub_records("gambiarra-hub-3000", "pi.local", "192.0.2.2")
        collector.add(gambiarra.Message(0, 0x8400, [], real, [], []), ("192.0.2.2", 5353))
        # The same name, the same host name, another address and port.
        copy = hub_records("gambiarra-hub-3000", "pi.local", "192.0.2.66", port=4000)
        collector.add(gambiarra.Message(0, 0x8400, [], copy, [], []), ("192.0.2.66", 5353))
        hubs = collector.hubs()
        self.assertEqual([hub.url for hub in hubs],
                         ["http://192.0.2.2:3000", "http://192.0.2.66:4000"])
        self.assertEqual(gambiarra.same_name(hubs), ["gambiarra-hub-3000"])
        # An exact copy from elsewhere names the machine that sent it, too.
        collector = gambiarra.HubCollector()
        for source in ("192.0.2.2", "192.0.2.66"):
            collector.add(gambiarra.Message(0, 0x8400, [], real, [], []), (source, 5353))
        self.assertEqual([hub.url for hub in collector.hubs()],
                         ["http://192.0.2.2:3000", "http://192.0.2.66:3000"])

    def rogue(self, hub, rogue_name):
        """A rogue peer and its hub; what the rogue sends: a goodbye for the
        real hub, then a hub of its own named ``rogue_name``."""
        rogue_hub = RecordingHub("127.0.0.2")
        self.addCleanup(rogue_hub.close)
        real = "gambiarra-hub-%d" % hub.port

        def packets(query):
            goodbye = [r._replace(ttl=0) for r in hub_records(real, "gambiarra-test.local",
                                                              "127.0.0.1", hub.port)]
            own = hub_records(rogue_name or real, "rogue.local", "127.0.0.2",
                              rogue_hub.server_address[1])
            yield gambiarra.encode_message(gambiarra.Message(query.id, 0x8400, query.questions,
                                                             goodbye + own, [], []))
        peer = RogueMdnsPeer(self.peer, packets)
        self.addCleanup(peer.close)
        return rogue_hub

    def test_a_rogues_goodbye_for_the_real_hub_is_ignored(self):
        hub = self.hub()
        rogue_hub = self.rogue(hub, "free-gpus")
        status, out, err = self.run_main("list", "--password", "secret")
        self.assertEqual((status, out), (1, ""), err)
        self.assertIn("2 hubs answered", err)
        self.assertIn(hub.url, err)
        self.assertEqual(rogue_hub.seen, [])  # never called, never told the password

    def test_the_real_hubs_name_from_a_second_machine_is_refused(self):
        hub = self.hub()
        rogue_hub = self.rogue(hub, None)
        status, out, err = self.run_main("list", "--password", "secret")
        self.assertEqual((status, out), (1, ""), err)
        self.assertIn("gambiarra-hub-%d answered from more than one machine" % hub.port, err)
        self.assertIn(hub.url, err)
        self.assertEqual(rogue_hub.seen, [])
        status, out, err = self.run_main("discover", "--timeout", "0.5")
        self.assertEqual(status, 0)
        self.assertIn(hub.url, out.splitlines())
        self.assertIn("more than one machine", err)


# === Command line ===

class TestCli(unittest.TestCase):
    def run_main(self, *argv, stdin=""):
        """main(argv) in-process: (exit status, stdout, stderr). ``stdin`` is
        text, or a TerminalInput; never the real one, so nothing waits at a prompt."""
        out, err = io.StringIO(), io.StringIO()
        stdin = io.StringIO(stdin) if isinstance(stdin, str) else stdin
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                unittest.mock.patch.object(sys, "stdin", stdin):
            try:
                status = gambiarra.main(list(argv))
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                status = exc.code
        return status, out.getvalue(), err.getvalue()

    def test_version_and_usage_errors(self):
        status, out, _ = self.run_main("--version")
        self.assertEqual((status, out.strip()), (0, "gambiarra " + gambiarra.__version__))
        self.assertEqual(self.run_main()[0], 2)
        self.assertEqual(self.run_main("serve", "--port", "nope")[0], 2)
        self.assertEqual(self.run_main("serve", "--health-interval", "0")[0], 2)

    def test_a_port_out_of_range_is_a_one_line_usage_error(self):
        for port in ("99999", "-1", "65536", "nope"):
            status, out, err = self.run_main("serve", "--port", port, "--state", "")
            self.assertEqual((status, out), (2, ""), err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("--port: must be 0 to 65535", err)
            self.assertIn("gambiarra.py serve --help", err)
        self.assertEqual([gambiarra.port_number(p) for p in ("0", "65535")], [0, 65535])

    def test_usage_errors_are_one_line(self):
        for argv in ((), ("nope",), ("chat", "XK7P2M"), ("join", "--hub", "http://h:1")):
            status, out, err = self.run_main(*argv)
            self.assertEqual((status, out), (2, ""), err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("--help", err)

    def test_a_stop_signal_never_deadlocks_the_wait_for_it(self):
        # The handler must not set the event itself: the main thread may be inside
        # stop.wait(), holding the event's lock (a hang of serve seen on CPython 3.12).
        code = ("import os, signal, threading, gambiarra\n"
                "with gambiarra.stop_signals() as (stop, seen):\n"
                "    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
                "    while not stop.wait(0):\n"
                "        pass\n"
                "print(seen == [signal.SIGTERM])\n")
        for _ in range(5):
            finished = subprocess.run([sys.executable, "-c", code], cwd=HERE, timeout=WAIT_S,
                                      stdout=subprocess.PIPE)
            self.assertEqual(finished.stdout.strip(), b"True")

    def test_serve_on_a_busy_port_says_what_to_do(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            status, _, err = self.run_main("serve", "--host", "127.0.0.1", "--port", str(port),
                                           "--state", "")
        self.assertEqual(status, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("already in use", err)
        self.assertIn("--port %d" % (port + 1), err)

    def test_create_and_list(self):
        with gambiarra.Hub() as hub:
            status, out, _ = self.run_main("create", "Hackathon", "--hub", hub.url)
            self.assertEqual(status, 0)
            code = out.strip()
            self.assertRegex(code, r"^[A-Z0-9]{6}$")
            status, out, _ = self.run_main("list", "--hub", hub.url)
            self.assertEqual(status, 0)
            self.assertIn(code, out)
            self.assertIn("Hackathon", out)
            status, out, _ = self.run_main("list", "--json", "--hub", hub.url)
            self.assertEqual(json.loads(out)["rooms"][0]["code"], code)

    def test_unreachable_hub_is_one_line_and_exit_1(self):
        url = "http://127.0.0.1:%d" % free_port()
        status, _, err = self.run_main("list", "--hub", url)
        self.assertEqual(status, 1)
        self.assertIn(url, err)
        self.assertEqual(len(err.strip().splitlines()), 1)


class FakeWindow:
    """Enough of a curses window to see what the monitor draws."""

    def __init__(self, height=20, width=100):
        self.size = (height, width)
        self.rows = {}

    def getmaxyx(self):
        return self.size

    def erase(self):
        self.rows = {}

    def addnstr(self, y, x, text, n):
        self.rows[y] = text[:n]

    def refresh(self):
        pass

    def text(self):
        return "\n".join(self.rows[y] for y in sorted(self.rows))


class TestMonitorScreen(unittest.TestCase):
    def test_participants_and_latest_events_are_drawn(self):
        screen = gambiarra.MonitorScreen("http://hub:3000")
        screen.event(None, "ROOM01", "participant:joined",
                     {"id": "alice", "nickname": "Alice", "model": "llama3", "status": "online"})
        screen.event(None, "ROOM01", "llm:complete", {"participantId": "alice", "status": 200,
                                                      "ttftMs": 42.5, "tokensPerSecond": 31.0})
        screen.event(None, "ROOM01", "participant:offline", {"participantId": "alice"})
        screen.note("room ROOM01: the event stream ended; retrying")
        window = FakeWindow()
        screen.render(window)
        text = window.text()
        self.assertIn("http://hub:3000", text)
        row = [line for line in text.splitlines() if "Alice" in line][0]
        for value in ("ROOM01", "llama3", "offline", "42.5", "31.0"):
            self.assertIn(value, row)
        self.assertIn("llm:complete", text)
        self.assertIn("retrying", text)
        screen.event(None, "ROOM01", "participant:left", {"participantId": "alice"})
        screen.render(window)
        self.assertNotIn("Alice", window.text().split("Latest events:")[0])

    def test_participants_listed_before_the_monitor_started_are_shown(self):
        screen = gambiarra.MonitorScreen("http://hub:3000")
        screen.seed("ROOM01", {"id": "bob", "nickname": "Bob", "model": "qwen2",
                               "status": "busy", "metrics": {"requests": 7, "errors": 1}})
        window = FakeWindow()
        screen.render(window)
        row = [line for line in window.text().splitlines() if "Bob" in line][0]
        for value in ("qwen2", "busy", " 7 ", " 1 "):
            self.assertIn(value, row)

    def test_a_small_terminal_gets_what_fits(self):
        screen = gambiarra.MonitorScreen("http://hub:3000")
        for number in range(50):
            screen.note("event %d" % number)
        window = FakeWindow(height=10, width=30)
        screen.render(window)
        self.assertLessEqual(max(window.rows), 9)
        self.assertTrue(all(len(line) <= 29 for line in window.rows.values()))
        self.assertIn("event 49", window.text())  # the latest ones


class TwoRooms:
    """For a HubTestCase: an open room (``code``), a protected one
    (``locked``), a fake backend, and no GAMBIARRA_PASSWORD from the
    developer's environment."""

    run_main = TestCli.run_main

    def setUp(self):
        super().setUp()
        saved = os.environ.pop("GAMBIARRA_PASSWORD", None)  # a developer's own must not leak in
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "GAMBIARRA_PASSWORD", saved)
        self.code = self.create_room("Open")
        status, _, answer = self.request("POST", "/rooms", {"name": "Lab", "password": PASSWORD})
        self.locked = answer["room"]["code"]
        self.fake = self.backend()

    def join_both(self):
        self.join(self.code, self.fake)
        self.join(self.locked, self.fake, pid="bob", password=PASSWORD)


class TestClientCommands(TwoRooms, HubTestCase):
    """list, chat and monitor in-process against a real hub and a fake backend."""

    def test_list_shows_participants_and_models(self):
        self.join_both()
        status, out, _ = self.run_main("list", "--hub", self.hub.url)
        self.assertEqual(status, 0)
        self.assertRegex(out, r"alice +Alice +fake-model +online")
        self.assertIn("models: fake-model", out)
        self.assertIn("(protected)", out)
        self.assertNotIn("bob", out)
        self.assertNotIn("(no participants yet)", out)
        status, out, _ = self.run_main("list", "--hub", self.hub.url, "--password", PASSWORD)
        self.assertEqual(status, 0)
        self.assertRegex(out, r"bob +Bob +fake-model +online")
        self.assertNotIn("(protected)", out)

    def test_list_says_when_a_room_is_empty(self):
        status, out, _ = self.run_main("list", "--hub", self.hub.url, "--password", PASSWORD)
        self.assertEqual((status, out.count("(no participants yet)")), (0, 2))

    def test_list_json_adds_readable_participants(self):
        self.join_both()
        status, out, _ = self.run_main("list", "--json", "--hub", self.hub.url)
        rooms = {room["code"]: room for room in json.loads(out)["rooms"]}
        self.assertEqual(status, 0)
        self.assertEqual([p["id"] for p in rooms[self.code]["participants"]], ["alice"])
        self.assertNotIn("participants", rooms[self.locked])
        out = self.run_main("list", "--json", "--hub", self.hub.url, "--password", PASSWORD)[1]
        rooms = {room["code"]: room for room in json.loads(out)["rooms"]}
        self.assertEqual([p["id"] for p in rooms[self.locked]["participants"]], ["bob"])

    def test_chat_prints_the_streamed_answer(self):
        self.join_both()
        status, out, err = self.run_main("chat", self.code.lower(), "hi", "--hub", self.hub.url)
        self.assertEqual((status, out, err), (0, "tok0 tok1 tok2 \n", ""))
        self.assertTrue(self.fake.last_body()["stream"])
        status, out, _ = self.run_main("chat", self.locked, "hi", "--json", "--model", "bob",
                                       "--hub", self.hub.url, "--password", PASSWORD)
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out), {"model": "fake-model", "content": "tok0 tok1 tok2 "})

    def test_chat_failures_are_one_line_and_exit_1(self):
        self.join(self.locked, self.fake, pid="bob", password=PASSWORD)
        cases = [(("NOPE99",), "not found"),
                 ((self.locked,), "--password"),
                 ((self.locked, "--password", "wrong"), "Invalid password"),
                 ((self.code,), "No participant is online"),
                 ((self.locked, "--password", PASSWORD, "--model", "nope"), "fake-model")]
        for extra, expected in cases:
            status, out, err = self.run_main("chat", extra[0], "hi", "--hub", self.hub.url,
                                             *extra[1:])
            self.assertEqual((status, out), (1, ""), err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(expected, err)

    def test_an_error_event_mid_stream_is_an_error(self):
        CapturedLogs(self)  # the hub reports the broken answer in its log
        self.join(self.code, self.fake)
        conn, response = self.open_stream("/rooms/%s/v1/chat/completions" % self.code, {
            "model": "*", "stream": True, "fake": {"chunks": 5, "die_after": 2}})
        with contextlib.redirect_stdout(io.StringIO()) as out:
            with self.assertRaisesRegex(gambiarra.GambiarraError, "broke off"):
                gambiarra.read_chat_stream(response, echo=True)
        self.assertEqual(out.getvalue(), "tok0 tok1 \n")  # the error line goes below

    def start_monitor(self, *argv):
        """monitor() in a thread, printing into a StringIO: (stop, out, err, thread)."""
        args = gambiarra.build_parser().parse_args(["monitor", "--hub", self.hub.url] +
                                                   list(argv))
        stop, out, err = threading.Event(), io.StringIO(), io.StringIO()
        redirect = contextlib.ExitStack()
        redirect.enter_context(contextlib.redirect_stdout(out))
        redirect.enter_context(contextlib.redirect_stderr(err))
        thread = threading.Thread(target=gambiarra.monitor, args=(args, stop),
                                  kwargs={"backoff_min_s": 0.05})
        thread.start()

        def finish():
            stop.set()
            thread.join(WAIT_S)
            redirect.close()
        self.addCleanup(finish)
        return stop, out, err, thread

    def test_monitor_prints_joins_and_requests(self):
        stop, out, _, thread = self.start_monitor(self.code)
        self.assertTrue(wait_until(lambda: "connected" in out.getvalue()))
        self.join(self.code, self.fake)
        conn, response = self.open_stream("/rooms/%s/v1/chat/completions" % self.code, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "delay": 0.01}})
        self.assertIn(b"[DONE]", response.read())
        self.assertTrue(wait_until(lambda: "llm:complete" in out.getvalue()))
        stop.set()
        thread.join(WAIT_S)
        self.assertFalse(thread.is_alive())
        lines = out.getvalue().splitlines()
        joined = [line for line in lines if "participant:joined" in line][0]
        for field in ("id=alice", "nickname=Alice", "model=fake-model", "status=online"):
            self.assertIn(field, joined)
        self.assertTrue([line for line in lines if "llm:request" in line])
        complete = [line for line in lines if "llm:complete" in line][0]
        self.assertIn("ttftMs=", complete)
        self.assertIn("tokensPerSecond=", complete)

    def test_monitor_json_lines_and_every_room(self):
        stop, out, _, thread = self.start_monitor("--json", "--password", PASSWORD)
        self.assertTrue(wait_until(lambda: out.getvalue().count("connected") == 2))
        self.join_both()
        self.assertTrue(wait_until(lambda: out.getvalue().count("participant:joined") == 2))
        stop.set()
        thread.join(WAIT_S)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        joins = {(r["room"], r["data"]["id"]) for r in records
                 if r["event"] == "participant:joined"}
        self.assertEqual(joins, {(self.code, "alice"), (self.locked, "bob")})

    def test_monitor_retries_when_the_hub_goes_and_says_so_once(self):
        stop, out, err, thread = self.start_monitor(self.code)
        self.assertTrue(wait_until(lambda: "connected" in out.getvalue()))
        self.hub.close()
        self.assertTrue(wait_until(lambda: "retrying" in err.getvalue()))
        time.sleep(0.3)  # several attempts with a 0.05 s backoff
        self.assertEqual(err.getvalue().count("retrying"), 1, err.getvalue())
        self.assertTrue(thread.is_alive())

    def test_chat_accepts_an_answer_that_is_not_streamed(self):
        answer = {"model": "m", "choices": [{"message": {"content": "whole"}}]}
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(gambiarra.read_chat_json(answer, echo=True), ("m", "whole"))
        self.assertEqual(out.getvalue(), "whole")

    def test_monitor_process_stops_on_signals(self):
        for sig, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
            process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "gambiarra.py"), "monitor", self.code,
                 "--hub", self.hub.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True)
            self.addCleanup(process.kill)
            self.addCleanup(process.stdout.close)
            self.addCleanup(process.stderr.close)
            self.assertIn("connected", process.stdout.readline())
            process.send_signal(sig)
            self.assertEqual(process.wait(WAIT_S), expected)

    def test_monitor_of_an_unknown_or_locked_room_is_exit_1(self):
        for argv, expected in ((["NOPE99"], "Room not found"), ([self.locked], "--password")):
            status, out, err = self.run_main("monitor", "--hub", self.hub.url, *argv)
            self.assertEqual((status, out), (1, ""), err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(expected, err)


class TerminalInput(io.StringIO):
    """A stdin that says it is a terminal; getpass is patched beside it."""

    def isatty(self):
        return True


class TestPasswordInput(TwoRooms, HubTestCase):
    """Passwords without `ps` seeing them (issue 10, item 5): the variable,
    --password alone (a prompt on a terminal, a line of stdin otherwise), and a
    401 in chat that asks once."""

    def test_environment_variable_for_every_command(self):
        self.join_both()
        with unittest.mock.patch.dict(os.environ, {"GAMBIARRA_PASSWORD": PASSWORD}):
            status, out, _ = self.run_main("list", "--hub", self.hub.url)
            self.assertRegex(out, r"bob +Bob +fake-model +online")
            status, out, _ = self.run_main("chat", self.locked, "hi", "--model", "bob",
                                           "--hub", self.hub.url)
            self.assertEqual((status, out), (0, "tok0 tok1 tok2 \n"))
            status, out, err = self.run_main("create", "Env", "--hub", self.hub.url)
        self.assertEqual(status, 0, err)
        self.assertIn("password in $GAMBIARRA_PASSWORD", err)
        status, _, _ = self.request("GET", "/rooms/%s/participants" % out.strip())
        self.assertEqual(status, 401)  # the room is protected by it

    def prompted(self, *argv, answers=(PASSWORD,)):
        asked = []

        def fake_getpass(prompt):
            asked.append(prompt)
            return answers[len(asked) - 1]
        with unittest.mock.patch.object(gambiarra.getpass, "getpass", fake_getpass):
            result = self.run_main(*argv, stdin=TerminalInput())
        return result, asked

    def test_password_alone_asks_on_a_terminal(self):
        self.join_both()
        (status, out, _), asked = self.prompted("list", "--hub", self.hub.url, "--password")
        self.assertEqual((status, asked), (0, ["Room password: "]))
        self.assertRegex(out, r"bob +Bob +fake-model +online")
        (status, out, _), asked = self.prompted("chat", self.locked, "hi", "--model", "bob",
                                                "--hub", self.hub.url, "--password", "-")
        self.assertEqual((status, out, len(asked)), (0, "tok0 tok1 tok2 \n", 1))

    def test_password_alone_reads_a_line_of_stdin_otherwise(self):
        self.join_both()
        status, out, _ = self.run_main("list", "--hub", self.hub.url, "--password", "-",
                                       stdin=PASSWORD + "\n")
        self.assertRegex(out, r"bob +Bob +fake-model +online")

    def test_create_asks_twice(self):
        (status, out, err), asked = self.prompted("create", "Asked", "--hub", self.hub.url,
                                                  "--password", answers=(PASSWORD, PASSWORD))
        self.assertEqual((status, len(asked)), (0, 2), err)
        code = out.strip()
        self.assertEqual(self.request("GET", "/rooms/%s/participants" % code)[0], 401)
        self.assertEqual(self.request("GET", "/rooms/%s/participants" % code,
                                      headers=bearer(PASSWORD))[0], 200)
        rooms = len(self.request("GET", "/rooms")[2]["rooms"])
        (status, _, err), _ = self.prompted("create", "Typo", "--hub", self.hub.url,
                                            "--password", answers=(PASSWORD, "typo"))
        self.assertEqual(status, 1)
        self.assertIn("the two passwords differ", err)
        self.assertEqual(len(self.request("GET", "/rooms")[2]["rooms"]), rooms)

    def test_chat_asks_once_when_a_room_wants_a_password(self):
        self.join_both()
        (status, out, err), asked = self.prompted("chat", self.locked, "hi", "--model", "bob",
                                                  "--hub", self.hub.url)
        self.assertEqual((status, out, asked), (0, "tok0 tok1 tok2 \n",
                                                ["Room %s needs a password: " % self.locked]))
        (status, _, err), asked = self.prompted("chat", self.locked, "hi", "--hub",
                                                self.hub.url, answers=("wrong",))
        self.assertEqual((status, len(asked)), (1, 1))  # asked once, then the usual error
        self.assertIn("Invalid password", err)
        status, _, err = self.run_main("chat", self.locked, "hi", "--hub", self.hub.url)
        self.assertEqual(status, 1)  # not a terminal: no prompt, the usual hint
        self.assertIn("--password", err)

    @unittest.skipUnless(hasattr(os, "openpty") and sys.platform.startswith("linux"),
                         "needs a pseudo-terminal")
    def test_a_real_terminal_prompt_does_not_echo(self):
        self.join_both()
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        code = ("import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "sys.path.insert(0, %r); import gambiarra; "
                "sys.exit(gambiarra.main(sys.argv[1:]))" % HERE)
        env = dict(os.environ)
        env.pop("GAMBIARRA_PASSWORD", None)
        process = subprocess.Popen(
            [sys.executable, "-c", code, "list", "--hub", self.hub.url, "--password"],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env)
        os.close(slave)
        self.addCleanup(process.wait, WAIT_S)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        seen, sent = b"", False
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if not select.select([master], [], [], deadline - time.monotonic())[0]:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            seen += data
            if not sent and b"Room password: " in seen:
                os.write(master, PASSWORD.encode() + b"\n")
                sent = True
        self.assertEqual(process.wait(WAIT_S), 0, seen)
        self.assertTrue(sent, seen)
        self.assertIn(b"bob", seen)
        self.assertNotIn(PASSWORD.encode(), seen)  # typed, never echoed


class CannedHub:
    """A stand-in for a hub on 127.0.0.1 that reads each request, sends the same
    bytes, then closes the connection, resets it, or holds it until closed:
    the answers of a killed hub or a cut network, on cue."""

    def __init__(self, answer, end="close"):
        self.answer, self.end = answer, end
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self.run, daemon=True)]
        self.threads[0].start()

    def run(self):
        while not self.stop.is_set():
            if select.select([self.listener], [], [], 0.02)[0]:
                conn, _ = self.listener.accept()
                thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
                self.threads.append(thread)
                thread.start()

    def serve(self, conn):
        with conn:
            conn.settimeout(WAIT_S)
            self.read_request(conn)  # unread bytes would turn a close into a reset
            conn.sendall(self.answer)
            if self.end == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.end == "hold":
                self.stop.wait(WAIT_S)

    @staticmethod
    def read_request(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            received = conn.recv(65536)
            if not received:
                return
            data += received
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += conn.recv(65536)

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)
        self.listener.close()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_event(text):
    event = {"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}
    return chunk(b"data: " + json.dumps(event).encode() + b"\n\n")


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
TWO_TOKENS = token_event("Olá ") + token_event("mun")
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class TestChatBrokenAnswers(unittest.TestCase):
    """chat never passes a cut or unreadable answer for a whole one: exit 1, one
    line on stderr; what was streamed stays on stdout, --json prints nothing."""

    run_main = TestCli.run_main

    def chat(self, answer, end="close", *argv):
        hub = CannedHub(answer, end)
        self.addCleanup(hub.close)
        return self.run_main("chat", "XK7P2M", "hi", "--hub", hub.url, *argv)

    def assert_broken(self, answer, expected, end="close", streamed="Olá mun\n"):
        for argv, out_expected in (((), streamed), (("--json",), "")):
            status, out, err = self.chat(answer, end, *argv)
            self.assertEqual(status, 1, (argv, out, err))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(expected, err)
            if out_expected is not None:
                self.assertEqual(out, out_expected, argv)

    def test_a_stream_that_ends_without_done(self):
        self.assert_broken(SSE_HEAD + TWO_TOKENS + chunk(b""), "ended before [DONE]")

    def test_a_stream_cut_mid_chunk(self):
        self.assert_broken(SSE_HEAD + TWO_TOKENS + b"40\r\ndata: {", "closed mid-answer")

    def test_a_stream_reset(self):
        # The kernel may drop unread tokens on a reset: stdout is not checked.
        self.assert_broken(SSE_HEAD + TWO_TOKENS, "incomplete", end="reset", streamed=None)

    def test_a_stream_that_goes_silent(self):
        with unittest.mock.patch.object(gambiarra, "CHAT_TIMEOUT_S", 0.1):
            self.assert_broken(SSE_HEAD + TWO_TOKENS, "sent nothing for 0.1 s", end="hold")

    def test_a_whole_answer_cut_short_or_not_json(self):
        whole = json.dumps({"model": "m", "choices": [{"message": {"content": "x"}}]}).encode()
        self.assert_broken(JSON_HEAD % len(whole) + whole[:20], "closed mid-answer", streamed="")
        page = b"<html>Bad gateway</html>"
        self.assert_broken(JSON_HEAD % len(page) + page, "not a whole JSON", streamed="")
        self.assertEqual(self.chat(JSON_HEAD % len(whole) + whole)[:2], (0, "x\n"))

    def test_a_whole_stream_still_exits_0(self):
        done = chunk(b"data: [DONE]\n\n") + chunk(b"")
        self.assertEqual(self.chat(SSE_HEAD + TWO_TOKENS + done)[:2], (0, "Olá mun\n"))


class TestServeProcess(unittest.TestCase):
    """``serve`` as users run it: a process, stopped by a signal."""

    def start_serve(self, python_flags=(), args=(), **env):
        self.state_home = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.state_home)
        process = subprocess.Popen(
            [sys.executable] + list(python_flags) + [
                os.path.join(HERE, "gambiarra.py"), "serve", "--host", "127.0.0.1", "--port",
                "0"] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            env=dict(os.environ, XDG_STATE_HOME=self.state_home, **env))
        self.addCleanup(process.kill)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.stderr.close)
        banner = []
        for line in process.stdout:  # bounded: the banner ends with this line
            banner.append(line)
            if "Ctrl-C" in line:
                break
        url = [word for line in banner for word in line.split()
               if word.startswith("http://127.0.0.1:")][0]
        return process, url, "".join(banner)

    @unittest.skipUnless(os.path.exists("/proc/self/cmdline"), "reads /proc")
    def test_serve_runs_as_an_import_of_the_file(self):
        """So the script's syntax tree is not kept (11 MiB), with the same flags."""
        for env, flags, reexec in (({}, ["-S"], True), ({"GAMBIARRA_REEXEC": "0"}, [], False)):
            process, url, _ = self.start_serve(flags, **env)
            with open("/proc/%d/cmdline" % process.pid, "rb") as f:
                argv = f.read().decode().split("\0")
            self.assertEqual(argv[1:3] == flags + ["-c"], reexec, argv)
            self.assertIn("serve", argv)
            with urllib_open(url + "/health") as response:
                self.assertEqual(response.status, 200)
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(WAIT_S), 0)

    def test_banner_health_and_clean_stop(self):
        for sig, expected in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
            process, url, banner = self.start_serve()
            self.assertIn("/rooms/CODE/v1", banner)
            self.assertIn("create", banner)
            with urllib_open(url + "/health") as response:
                self.assertEqual(response.status, 200)
            urllib.request.urlopen(urllib.request.Request(
                url + "/rooms", data=b'{"name": "kept"}', method="POST", headers=JSON), timeout=WAIT_S).read()
            process.send_signal(sig)
            self.assertEqual(process.wait(WAIT_S), expected)
            with open(os.path.join(self.state_home, "gambiarra", "hub-0.json")) as f:
                self.assertIn("kept", f.read())  # the default state file

    def test_every_room_answered_201_survives_kill_9(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "hub.json")
        process, url, _ = self.start_serve(args=["--log-level", "warning", "--state", path])
        port = urllib.parse.urlsplit(url).port
        lock = threading.Lock()  # guards acknowledged and refused
        acknowledged, refused, enough = [], [], threading.Event()

        def create_rooms():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
            try:
                while True:
                    conn.request("POST", "/rooms", body=b'{"name": "Burst"}',
                                 headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = json.loads(response.read())
                    with lock:
                        if response.status != 201:
                            refused.append((response.status, answer))
                            return
                        acknowledged.append(answer["room"]["code"])
                        if len(acknowledged) >= 100:
                            enough.set()
            except (OSError, http.client.HTTPException, ValueError):
                pass  # the hub was killed mid-request
            finally:
                conn.close()

        threads = [threading.Thread(target=create_rooms) for _ in range(20)]
        for thread in threads:
            thread.start()
        self.assertTrue(enough.wait(WAIT_S))
        process.kill()
        process.wait(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        with open(path, encoding="utf-8") as f:
            saved = {room["code"] for room in json.load(f)["rooms"]}
        with lock:
            self.assertEqual(refused, [])
            lost = set(acknowledged) - saved
            self.assertEqual(lost, set(), "%d of %d acknowledged rooms lost"
                             % (len(lost), len(acknowledged)))


# === Participant agent ===

AGENT_TIMINGS = dict(poll_wait_s=0.5, backoff_min_s=0.02, backoff_max_s=0.2, drain_s=2,
                     local_timeout_s=WAIT_S)


class TestAgent(HubTestCase):
    """The agent in-process, against a real hub and a loopback-only backend."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()
        self.path = "/rooms/%s/v1/chat/completions" % self.code

    def agent(self, hub_url=None, **fields):
        body = {"id": "alice", "nickname": "Alice", "model": "fake-model",
                "endpoint": self.fake.url, "transport": "tunnel", "maxConcurrent": 2}
        body.update(fields)
        agent = gambiarra.Agent(hub_url or self.hub.url, self.code.lower(), body, self.fake.url,
                                **AGENT_TIMINGS)
        self.addCleanup(agent.close)
        return agent.start()

    def participants(self, hub=None):
        return (hub or self.hub).registry.participants_json(self.code)

    def test_answers_and_streams_come_through_the_tunnel(self):
        self.agent()
        self.assertEqual(self.participants()[0]["transport"], "tunnel")
        status, _, answer = self.chat(self.code, "alice")
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["choices"][0]["message"]["content"], "tok0 tok1 tok2 ")
        conn, response = self.open_stream(self.path, {
            "model": "alice", "stream": True, "fake": {"chunks": 3, "stall_after": 1}})
        self.assertEqual(response.status, 200)
        first = response.read1(65536)
        self.assertIn(b'"seq": 0', first)  # streamed before the backend sent the rest
        self.fake.release.set()
        events = sse_events(first + response.read())
        self.assertEqual([json.loads(d)["seq"] for _, d in events[:-1]], [0, 1, 2])

    def test_a_local_answer_cut_short_is_no_whole_answer(self):
        self.agent()
        conn, response = self.open_stream(self.path, {
            "model": "alice", "fake": {"sized": 4 * MIB, "cut": MIB}})
        data = response.read()  # chunked through the tunnel: it must end with an error
        self.assertLess(len(data), 4 * MIB)
        self.assertIn(b'"code":"backend_disconnected"', data[-300:])

    def test_a_client_leaving_closes_the_local_connection(self):
        self.agent()
        conn, response = self.open_stream(self.path, {
            "model": "alice", "stream": True, "fake": {"chunks": 500, "delay": 0.01}})
        response.read1(65536)
        hang_up(conn, response)
        self.assertTrue(self.fake.disconnected.wait(WAIT_S))  # long before the 500th chunk
        self.assertTrue(wait_until(lambda: self.participants()[0]["inFlight"] == 0))

    def test_an_unreachable_local_server_is_a_502_and_the_agent_stays(self):
        logs = CapturedLogs(self)
        agent = self.agent()
        self.fake.close()
        for _ in range(2):
            status, _, answer = self.chat(self.code, "alice")
            self.assertEqual((status, answer["error"]["code"]), (502, "backend_unreachable"))
        self.assertEqual(len(self.participants()), 1)
        reports = [m for m in logs.at(logging.WARNING) if m.startswith("the local server")]
        self.assertEqual(len(reports), 1, reports)  # reported once, not per request
        agent.close()
        self.assertEqual(self.participants(), [])  # it left

    def test_direct_agent_heartbeats_and_leaves(self):
        self.hub.health_interval = 0.05
        agent = self.agent(transport="direct")
        self.assertAlmostEqual(agent.health_interval_s, 0.05)
        seen = self.participants()[0]["lastSeen"]
        self.assertTrue(wait_until(lambda: self.participants()[0]["lastSeen"] > seen))
        self.assertEqual(self.chat(self.code, "alice")[0], 200)
        agent.close()
        self.assertEqual(self.participants(), [])

    def test_a_restarted_hub_gets_the_participant_back(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        state = os.path.join(folder, "hub.json")
        first = gambiarra.Hub("127.0.0.1", 0, state_path=state, health_interval=0.05).start()
        self.addCleanup(first.close)
        port = first.port
        status, answer = gambiarra.HubClient(first.url).call("POST", "/rooms", {"name": "R"})
        self.code = answer["room"]["code"]
        logs = CapturedLogs(self)
        self.agent(hub_url=first.url)
        first.close()
        second = gambiarra.Hub("127.0.0.1", port, state_path=state, health_interval=0.05,
                               backend_timeout=5).start()
        self.addCleanup(second.close)
        self.assertTrue(wait_until(lambda: self.participants(second)))
        self.assertEqual(self.participants(second)[0]["id"], "alice")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", "/rooms/%s/v1/chat/completions" % self.code, body=json.dumps(
            {"model": "alice", "messages": []}), headers={"Content-Type": "application/json"})
        self.assertEqual(conn.getresponse().status, 200)
        rejoins = [m for m in logs.at(logging.WARNING) if "re-joined" in m]
        self.assertEqual(len(rejoins), 1, logs.at(logging.WARNING))


class TestAgentHelpers(unittest.TestCase):
    def test_model_choice(self):
        choose = gambiarra.choose_model
        self.assertEqual(choose(None, ["a"], "u"), "a")
        self.assertEqual(choose("llama3", ["x", "llama3:latest"], "u"), "llama3:latest")
        self.assertEqual(choose("anything", None, "u"), "anything")
        for requested, models, words in ((None, ["a", "b"], "a, b"), ("c", ["a", "b"], "a, b"),
                                         (None, [], "--model")):
            with self.assertRaises(gambiarra.GambiarraError) as caught:
                choose(requested, models, "u")
            self.assertIn(words, str(caught.exception))

    def test_loopback_addresses(self):
        for url in ("http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1",
                    "http://127.1.2.3"):
            self.assertTrue(gambiarra.is_loopback(url), url)
        self.assertFalse(gambiarra.is_loopback("http://192.168.1.50:11434"))

    def test_discovery_takes_the_first_server_that_answers(self):
        backend = FakeBackend(models=("m1", "m2"))
        self.addCleanup(backend.close)
        closed = free_port()
        found = gambiarra.discover_local_server(
            ((closed, "none"), (int(backend.url.rsplit(":", 1)[1]), "fake")))
        self.assertEqual(found, (backend.url, ["m1", "m2"]))  # from /api/tags
        with self.assertRaises(gambiarra.GambiarraError) as caught:
            gambiarra.discover_local_server(((closed, "Ollama"),))
        self.assertIn("%d (Ollama)" % closed, str(caught.exception))
        self.assertIn("ollama serve", str(caught.exception))

    def test_specs_are_cheap_and_leave_out_the_unknown(self):
        specs = gambiarra.collect_specs()
        self.assertEqual(specs["cores"], os.cpu_count())
        self.assertTrue(all(value for value in specs.values()))

    def test_backoff_doubles_up_to_its_cap(self):
        backoff = gambiarra.Backoff(1, 5)
        self.assertEqual([backoff.next() for _ in range(5)], [1, 2, 4, 5, 5])
        backoff.reset()
        self.assertEqual(backoff.next(), 1)


class TestJoinCommand(HubTestCase):
    """``join`` errors: exit 1 and one line on stderr, fast."""

    def setUp(self):
        super().setUp()
        self.code = self.create_room()
        self.fake = self.backend()

    def run_main(self, *argv):
        return TestCli.run_main(self, *argv)

    def assert_one_line_error(self, argv, *words):
        started = time.monotonic()
        status, out, err = self.run_main(*argv)
        self.assertEqual((status, out), (1, ""), err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        for word in words:
            self.assertIn(word, err)
        self.assertLess(time.monotonic() - started, 5)
        return err

    def join_argv(self, *extra, endpoint=None):
        return ["join", self.code, "--hub", self.hub.url, "--no-specs",
                "--endpoint", endpoint or self.fake.url] + list(extra)

    def test_direct_with_a_loopback_endpoint_is_refused(self):
        err = self.assert_one_line_error(self.join_argv("--direct"), "--direct", "tunnel")
        self.assertIn(self.fake.url, err)
        self.assertEqual(self.hub.registry.participants_json(self.code), [])

    def test_no_local_server(self):
        url = "http://127.0.0.1:%d" % free_port()
        self.assert_one_line_error(self.join_argv(endpoint=url), url, "--endpoint")

    def test_model_not_served_and_several_models(self):
        self.assert_one_line_error(self.join_argv("--model", "nope"), "nope", "fake-model")
        several = self.backend(models=("llama3:latest", "qwen2:7b"))
        self.assert_one_line_error(self.join_argv(endpoint=several.url),
                                   "llama3:latest, qwen2:7b", "--model")

    def test_hub_unreachable(self):
        url = "http://127.0.0.1:%d" % free_port()
        argv = self.join_argv()
        argv[argv.index("--hub") + 1] = url
        self.assert_one_line_error(argv, url)

    def test_room_not_found_and_wrong_password(self):
        argv = self.join_argv()
        argv[1] = "ZZZZZZ"
        self.assert_one_line_error(argv, "ZZZZZZ", "list")
        status, _, answer = self.request("POST", "/rooms", {"name": "L", "password": "pw"})
        argv[1] = answer["room"]["code"]
        self.assert_one_line_error(argv + ["--password", "wrong"], "wrong password")

    def test_usage_errors(self):
        self.assertEqual(self.run_main("join", "--hub", self.hub.url)[0], 2)
        self.assertEqual(self.run_main(*self.join_argv("--config", "[1]"))[0], 2)


class TestJoinProcess(HubTestCase):
    """``join`` as users run it: a process, stopped by a signal."""

    def test_signals_leave_the_room(self):
        code = self.create_room()
        fake = self.backend()
        for sig, expected in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
            process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "gambiarra.py"), "join", "--code", code,
                 "--hub", self.hub.url, "--endpoint", fake.url, "--id", "proc",
                 "--config", '{"temperature": 0.5}'],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                stdin=subprocess.DEVNULL)
            self.addCleanup(process.kill)
            try:
                self.assertTrue(wait_until(
                    lambda: self.hub.registry.participants_json(code)), process.poll())
                participant = self.hub.registry.participants_json(code)[0]
                self.assertEqual(participant["config"], {"temperature": 0.5})
                self.assertEqual(self.chat(code, "proc")[0], 200)
                process.send_signal(sig)
                self.assertEqual(process.wait(WAIT_S), expected)
                out, err = process.communicate()
            finally:
                process.stdout.close()
                process.stderr.close()
            self.assertEqual(out, "")
            self.assertIn("joined room %s as " % code, err)
            self.assertEqual(self.hub.registry.participants_json(code), [])


class TestVanishingAgents(HubTestCase):
    """A ``join`` process that dies or freezes mid-request, as laptops do."""

    hub_options = {"health_interval": 0.2, "participant_timeout": 0.6, "forget_after": 0.5,
                   "connect_timeout": 1, "backend_timeout": 30}

    def start_join(self, code, pid, backend):
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "gambiarra.py"), "join", code, "--hub",
             self.hub.url, "--endpoint", backend.url, "--id", pid, "--no-specs",
             "--max-concurrent", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, universal_newlines=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.wait, WAIT_S)
        self.addCleanup(process.kill)
        self.addCleanup(os.kill, process.pid, signal.SIGCONT)  # if a test stopped it
        self.assertTrue(wait_until(lambda: self.polling(code, pid)), process.poll())
        return process

    def polling(self, code, pid):
        participant = self.hub.registry._rooms[code].participants.get(pid)
        return participant is not None and participant.polls > 0

    def ask(self, code, model, tag, **fake):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", "/rooms/%s/v1/chat/completions" % code, body=json.dumps(
            {"model": model, "tag": tag, "fake": fake}).encode(),
            headers={"Content-Type": "application/json"})
        return conn

    def test_kill_9_mid_request_fails_over_at_once_and_routes_around_it(self):
        self.hub.registry.participant_timeout_s = 30  # what notices the kill is the lifeline
        self.hub.relay.connect_timeout = 5  # a request sent to the dead laptop would show
        code = self.create_room()
        slow, other = self.backend(), self.backend()
        other.release.set()  # the desktop's server answers at once, even when asked to stall
        process = self.start_join(code, "laptop", slow)
        waiting = [self.ask(code, "fake-model", "in-flight-%d" % i, stall_before=True)
                   for i in range(2)]  # both of its workers busy: no poll of its left open
        self.assertTrue(wait_until(lambda: len(slow.requests) == 2))
        desktop = gambiarra.Agent(self.hub.url, code, {
            "id": "desktop", "nickname": "Desktop", "model": "fake-model", "endpoint": other.url,
            "transport": "direct"}, other.url, **AGENT_TIMINGS)
        self.addCleanup(desktop.close)
        desktop.start()  # it heartbeats: online all along
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for conn in waiting:  # answered by the desktop at once
            response = conn.getresponse()
            self.assertEqual(response.status, 200, response.read())
        self.assertLess(time.monotonic() - killed, 3)  # not when it goes offline (30 s)
        for _ in range(4):  # ties are broken at random: four chances to pick the laptop
            status, _, answer = self.chat(code, "fake-model", tag="after")
            self.assertEqual(status, 200, answer)  # and the dead laptop is not routed to
        self.assertLess(time.monotonic() - killed, 4)
        self.assertEqual(sorted(body["tag"] for _, body in other.requests),
                         ["after"] * 4 + ["in-flight-0", "in-flight-1"])

    def test_a_frozen_agent_is_forgotten_then_serves_again_when_it_wakes(self):
        code = self.create_room()
        fake = self.backend()
        process = self.start_join(code, "laptop", fake)
        self.assertEqual(self.chat(code, "laptop")[0], 200)
        process.send_signal(signal.SIGSTOP)  # lid closed
        frozen = time.monotonic()
        status, _, answer = self.chat(code, "laptop", tag="while-frozen")
        self.assertIn(status, (502, 503), answer)
        self.assertLess(time.monotonic() - frozen, 5)
        self.assertTrue(wait_until(lambda: not self.hub.registry.participants_json(code)))
        process.send_signal(signal.SIGCONT)  # lid opened: it re-joins with a new secret
        woke = time.monotonic()
        self.assertTrue(wait_until(lambda: self.chat(code, "laptop", tag="after")[0] == 200,
                                   timeout=8, interval=0.1))
        self.assertLess(time.monotonic() - woke, 8)
        tags = [body.get("tag") for _, body in fake.requests]
        self.assertNotIn("while-frozen", tags)  # a stale job is dropped, not run for nobody


# === Benchmark (python3 test_gambiarra.py bench) ===
#
# Not a test: it measures, it asserts nothing about speed. The hub and a fast
# asyncio backend run as separate processes; the load comes from this one.
# Every figure is compared with calling the backend directly in the same run.

import asyncio  # noqa: E402 (only the benchmark needs these)
import statistics  # noqa: E402

BENCH_RESPONSE = json.dumps({
    "id": "bench", "object": "chat.completion", "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()
STAMP = re.compile(rb'"seq": (\d+), "t": ([0-9.]+)')


async def bench_backend_connection(reader, writer):
    """One keep-alive connection of the benchmark backend."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET "):  # a joining agent asks for the models
                tags = b'{"models": [{"name": "bench-model"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(tags), tags))
                continue
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = json.loads(await reader.readexactly(length))
            if body.get("fake", {}).get("bytes"):
                await bench_big_answer_to(writer, body["fake"]["bytes"])
                continue
            if not body.get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(BENCH_RESPONSE),
                                                                 BENCH_RESPONSE))
                continue
            fake = body.get("fake", {})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(fake.get("chunks", 16)):
                event = b'data: {"seq": %d, "t": %.6f, "choices": [{"delta": {"content": ' \
                        b'"tok"}}]}\n\n' % (i, time.monotonic())
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(fake.get("delay", 0.02))
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass  # the client left, or the benchmark is over
    finally:
        writer.close()


async def bench_big_answer_to(writer, size):
    """A non-streamed answer of ``size`` bytes with Content-Length, written as
    fast as the reader takes it (a huge embeddings batch, a lying server)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    block = b"\0" * (1024 * 1024)
    for start in range(0, size, len(block)):
        writer.write(block[:size - start])
        await writer.drain()


def bench_post(url, data):
    """POST JSON ``data`` (bytes) to the hub under test; the answer's bytes."""
    return urllib.request.urlopen(urllib.request.Request(
        url, data=data, method="POST", headers=JSON), timeout=WAIT_S).read()


def run_bench_fake_backend():
    """python3 test_gambiarra.py bench-fake-backend: the tests' FakeBackend
    (http.server, like most small OpenAI-compatible servers) until stdin closes."""
    backend = FakeBackend()
    print(backend.server.server_address[1], flush=True)
    sys.stdin.read()
    backend.close()


def run_bench_backend():
    """python3 test_gambiarra.py bench-backend: serve until stdin closes."""
    async def serve():
        server = await asyncio.start_server(bench_backend_connection, "127.0.0.1", 0,
                                            backlog=2048)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_event_loop().run_in_executor(None, sys.stdin.read)
        server.close()
    asyncio.run(serve())


class BenchClient:
    """A minimal asyncio HTTP/1.1 keep-alive client, cheap enough not to be
    what the benchmark measures."""

    def __init__(self, port):
        self.port = port

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                        socket.TCP_NODELAY, 1)
        return self

    def close(self):
        self.writer.close()

    async def post(self, path, body):
        """Send one request; return (status, [(arrival time, chunk bytes)])."""
        data = json.dumps(body).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        found = re.search(rb"(?i)content-length: *(\d+)", head)
        if found:
            return status, [(time.monotonic(), await self.reader.readexactly(int(found.group(1))))]
        chunks = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return status, chunks
            chunk = await self.reader.readexactly(size + 2)
            chunks.append((time.monotonic(), chunk[:-2]))


def proc_stat(pid):
    """(CPU seconds, threads, open fds, RSS KiB) of a process, from /proc (Linux)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open("/proc/%d/status" % pid) as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return cpu, len(os.listdir("/proc/%d/task" % pid)), len(os.listdir("/proc/%d/fd" % pid)), rss


#: The bench's load comes from one address: 500 streams at once and more.
BENCH_CAPS = ("--max-connections", "4000", "--max-connections-per-address", "3000")


def start_bench_hub(port, python_flags=(), caps=BENCH_CAPS):
    """Start ``serve`` as a user would; return (process, seconds to first 200)."""
    started = time.monotonic()
    hub = subprocess.Popen([sys.executable] + list(python_flags) + [
                            os.path.join(HERE, "gambiarra.py"), "serve", "--state", "",
                            "--host", "127.0.0.1", "--port", str(port), "--quiet",
                            "--health-interval", "3600"] + list(caps),
                           stdin=subprocess.DEVNULL)
    while True:
        try:
            with urllib_open("http://127.0.0.1:%d/health" % port) as response:
                if response.status == 200:
                    return hub, time.monotonic() - started
        except OSError:
            time.sleep(0.002)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure_latency(port, path, count, model="*"):
    client = await BenchClient(port).connect()
    times = []
    for _ in range(count):
        started = time.monotonic()
        status, _ = await client.post(path, {"model": model, "messages": []})
        assert status == 200, status
        times.append(time.monotonic() - started)
    client.close()
    return times


async def measure_throughput(port, path, clients, seconds):
    done = [0]
    deadline = time.monotonic() + seconds

    async def worker():
        client = await BenchClient(port).connect()
        while time.monotonic() < deadline:
            status, _ = await client.post(path, {"model": "bench", "messages": []})
            assert status == 200, status
            done[0] += 1
        client.close()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done[0]


async def paced_streams(port, path, streams, chunks, delay, model="bench"):
    """Run ``streams`` concurrent paced streams; return per-stream results:
    (time to first chunk, [latency of each chunk after the backend sent it],
    sequence numbers seen, ended with [DONE], error)."""
    async def one():
        try:
            client = await BenchClient(port).connect()
            started = time.monotonic()
            status, received = await client.post(path, {
                "model": model, "stream": True, "fake": {"chunks": chunks, "delay": delay}})
            client.close()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            return None, [], [], False, repr(exc)
        latencies, seqs = [], []
        for arrived, data in received:
            for seq, stamp in STAMP.findall(data):
                seqs.append(int(seq))
                latencies.append(arrived - float(stamp))
        done = bool(received) and received[-1][1].startswith(b"data: [DONE]")
        first = received[0][0] - started if received else None
        return first, latencies, seqs, done, None if status == 200 else status
    return await asyncio.gather(*(one() for _ in range(streams)))


def stream_summary(results, chunks):
    lost = sum(1 for r in results if r[2] != list(range(chunks)))
    errors = sum(1 for r in results if r[4] or not r[3])
    latencies = [lat for r in results for lat in r[1]]
    return lost, errors, latencies


def read_big_answer(port, path, body):
    """POST ``body`` and read a Content-Length answer, dropping the bytes;
    return (bytes read, seconds)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        total = 0
        while True:
            data = response.read1(1024 * 1024)
            if not data:
                return total, time.monotonic() - started
            total += len(data)
    finally:
        conn.close()


def bench_big_answer(hub_pid, via_hub, direct, model="bench", others=()):
    """A 1 GiB answer through the hub: the hub's RSS growth (sampled every
    10 ms) and its speed against the backend direct."""
    size = 1024 ** 3
    body = {"model": model, "fake": {"bytes": size}}
    read, direct_s = read_big_answer(direct[0], direct[1], body)
    assert read == size, read
    before = {pid: proc_stat(pid)[3] for pid in (hub_pid,) + tuple(others)}
    peak = dict(before)
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            for pid in peak:
                peak[pid] = max(peak[pid], proc_stat(pid)[3])
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        read, hub_s = read_big_answer(via_hub[0], via_hub[1], body)
    finally:
        done.set()
        sampler.join()
    assert read == size, read
    growth = ", ".join("%s +%.1f MiB" % (name, (peak[pid] - before[pid]) / 1024)
                       for name, pid in zip(("hub",) + ("agent",) * len(others),
                                            (hub_pid,) + tuple(others)))
    print("1 GiB answer (Content-Length) via %s: %.2f s (direct %.2f s, %.0f MiB/s); peak RSS "
          "growth: %s" % (model, hub_s, direct_s, 1024 / hub_s, growth))


def raise_own_file_limit():
    """Room for the crowd of bench_crowd's connections (where the hard limit allows)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def health_latency(port, count):
    """Seconds of each of ``count`` GET /health on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(count):
        started = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
        times.append(time.monotonic() - started)
        await asyncio.sleep(0.01)
    writer.close()
    return times


async def first_chunks(via_hub, count):
    times = []
    for _ in range(count):
        (first, _, _, _, _), = await paced_streams(*via_hub, 1, 4, 0.02)
        times.append(first)
    return times


async def bench_crowd(hub_pid, via_hub, label, crowd=2000):
    """One attendee (127.0.0.2) holds ``crowd`` connections, half idle, half
    dribbling a request head (a line every 2 s), while a client on 127.0.0.1
    streams a chat and asks /health: first chunk and /health against the
    same without the crowd, and the hub's threads and fds after."""
    before_first, before_health = await first_chunks(via_hub, 20), await health_latency(
        via_hub[0], 50)
    await asyncio.sleep(0.2)  # the last connections' threads end
    idle = proc_stat(hub_pid)  # with the backend connection the streams keep pooled
    writers, stop = [], asyncio.Event()
    for number in range(crowd):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", via_hub[0],
                                                      local_addr=("127.0.0.2", 0))
        except OSError:
            break
        writers.append(writer)
        if number % 2:
            writer.write(b"GET /health HTTP/1.1\r\n")

    async def dribble():
        while not stop.is_set():
            for writer in writers[1::2]:
                writer.write(b"X-Slow: 1\r\n")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 2)
    dribbling = asyncio.ensure_future(dribble())
    wait_until(lambda: proc_stat(hub_pid)[1] >= idle[1] + len(writers), timeout=5)
    crowded = proc_stat(hub_pid)
    under_first, under_health = await first_chunks(via_hub, 20), await health_latency(
        via_hub[0], 50)
    stop.set()
    await dribbling
    for writer in writers:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)
    settled = wait_until(lambda: proc_stat(hub_pid)[1:3] <= idle[1:3], timeout=30)
    after = proc_stat(hub_pid)
    print("%d idle/slow connections from one address (%s): first chunk median %.3f ms "
          "(%+.3f ms against %.3f ms without), /health p50 %.2f ms, p99 %.2f ms, max %.2f ms "
          "(without: %.2f, %.2f, %.2f); hub threads/fds idle %d/%d, crowded %d/%d, RSS %.0f MiB, "
          "after %d/%d (%s)" % (
              len(writers), label, statistics.median(under_first) * 1000,
              (statistics.median(under_first) - statistics.median(before_first)) * 1000,
              statistics.median(before_first) * 1000, statistics.median(under_health) * 1000,
              percentile(under_health, 0.99) * 1000, max(under_health) * 1000,
              statistics.median(before_health) * 1000, percentile(before_health, 0.99) * 1000,
              max(before_health) * 1000, idle[1], idle[2], crowded[1], crowded[2],
              crowded[3] / 1024, after[1], after[2], "back to idle" if settled else "NOT back"))


def bench_crowd_default_caps(backend_port):
    """bench_crowd against a hub with the default caps: most of the crowd gets 503."""
    port = free_port()
    hub, _ = start_bench_hub(port, caps=())
    try:
        code = json.loads(bench_post("http://127.0.0.1:%d/rooms" % port,
                                     b'{"name": "crowd"}'))["room"]["code"]
        join = json.dumps({"id": "bench", "nickname": "bench", "model": "bench-model",
                           "endpoint": "http://127.0.0.1:%d" % backend_port}).encode()
        bench_post("http://127.0.0.1:%d/rooms/%s/join" % (port, code), join)
        asyncio.run(bench_crowd(hub.pid, (port, "/rooms/%s/v1/chat/completions" % code),
                                "default caps: 128 held, the rest refused"))
    finally:
        hub.terminate()
        hub.wait(WAIT_S)


def run_bench():
    raise_own_file_limit()
    print("gambiarra %s relay benchmark, Python %s, %d CPUs" % (
        gambiarra.__version__, sys.version.split()[0], os.cpu_count()))
    backend = subprocess.Popen([sys.executable, __file__, "bench-backend"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    backend_port = int(backend.stdout.readline())
    for flags, note in (((), ""), (("-S",), " (python3 -S: without this machine's site "
                                              "packages)")):
        hub, start_s = start_bench_hub(free_port(), flags)
        time.sleep(0.5)
        print("start to first 200 on /health: %.0f ms; idle RSS %.1f MiB%s" % (
            start_s * 1000, proc_stat(hub.pid)[3] / 1024, note))
        hub.terminate()
        hub.wait(WAIT_S)
    hub_port = free_port()
    hub, _ = start_bench_hub(hub_port)
    try:
        code = json.loads(bench_post("http://127.0.0.1:%d/rooms" % hub_port,
                                     b'{"name": "bench"}'))["room"]["code"]
        join = json.dumps({"id": "bench", "nickname": "bench", "model": "bench-model",
                           "endpoint": "http://127.0.0.1:%d" % backend_port,
                           "maxConcurrent": 1000}).encode()
        bench_post("http://127.0.0.1:%d/rooms/%s/join" % (hub_port, code), join)
        via_hub = (hub_port, "/rooms/%s/v1/chat/completions" % code)
        direct = (backend_port, "/v1/chat/completions")
        bench_big_answer(hub.pid, via_hub, direct)
        asyncio.run(bench_all(hub.pid, via_hub, direct))
        bench_tunnel(hub_port, code, backend_port, hub.pid)
        bench_http_server_backend(hub_port, code)
        asyncio.run(bench_crowd(hub.pid, via_hub, "caps raised: all held"))
        bench_crowd_default_caps(backend_port)
    finally:
        hub.terminate()
        hub.wait(WAIT_S)
        backend.stdin.close()
        backend.wait(WAIT_S)


def bench_tunnel(hub_port, code, backend_port, hub_pid):
    """A participant joined with ``gambiarra.py join`` (the tunnel) against the
    same backend as the direct one: added first-chunk time and per-chunk delay."""
    agent = subprocess.Popen([sys.executable, os.path.join(HERE, "gambiarra.py"), "join", code,
                              "--hub", "http://127.0.0.1:%d" % hub_port, "--id", "tunnel",
                              "--endpoint", "http://127.0.0.1:%d" % backend_port,
                              "--model", "bench-model", "--max-concurrent", "64",
                              "--no-specs"], stderr=subprocess.DEVNULL)
    try:
        path = "/rooms/%s/v1/chat/completions" % code
        wait_until(lambda: b'"tunnel"' in urllib_open(
            "http://127.0.0.1:%d/rooms/%s/participants" % (hub_port, code)).read())

        async def measure():
            firsts = {"bench": [], "tunnel": []}
            lats = {"bench": [], "tunnel": []}
            for _ in range(20):
                for model in ("bench", "tunnel"):
                    (first, latencies, _, _, _), = await paced_streams(
                        hub_port, path, 1, 20, 0.02, model)
                    firsts[model].append(first)
                    lats[model].extend(latencies)
            many = await paced_streams(hub_port, path, 64, 64, 0.02, "tunnel")
            return firsts, lats, many
        firsts, lats, many = asyncio.run(measure())
        bench_big_answer(hub_pid, (hub_port, path), (backend_port, "/v1/chat/completions"),
                         model="tunnel", others=(agent.pid,))
        lost, errors, _ = stream_summary(many, 64)
        print("tunnel vs direct participant: added time to first chunk %.3f ms (median), "
              "added per chunk %.3f ms (mean); 64 concurrent tunnelled 64-chunk streams: %d "
              "with lost or reordered chunks, %d did not end with [DONE]" % (
                  (statistics.median(firsts["tunnel"]) - statistics.median(firsts["bench"]))
                  * 1000, (statistics.mean(lats["tunnel"]) - statistics.mean(lats["bench"]))
                  * 1000, lost, errors))
    finally:
        agent.terminate()
        agent.wait(WAIT_S)


def bench_http_server_backend(hub_port, code):
    """The 1-client ratio again, with the tests' http.server fake as the backend."""
    fake = subprocess.Popen([sys.executable, __file__, "bench-fake-backend"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(fake.stdout.readline())
        join = json.dumps({"id": "fake", "nickname": "fake", "model": "fake-model",
                           "endpoint": "http://127.0.0.1:%d" % port}).encode()
        bench_post("http://127.0.0.1:%d/rooms/%s/join" % (hub_port, code), join)
        path = "/rooms/%s/v1/chat/completions" % code

        async def measure():
            await measure_latency(hub_port, path, 200, "fake")
            direct = await measure_latency(port, "/v1/chat/completions", 2000)
            hub = await measure_latency(hub_port, path, 2000, "fake")
            return statistics.median(direct), statistics.median(hub)
        direct, hub = asyncio.run(measure())
        print("non-streaming, 1 client, http.server fake backend: direct p50 %.3f ms, hub p50 "
              "%.3f ms -> %.2fx" % (direct * 1000, hub * 1000, hub / direct))
    finally:
        fake.stdin.close()
        fake.wait(WAIT_S)


async def bench_all(hub_pid, via_hub, direct):
    # Non-streaming, one client.
    await measure_latency(*via_hub, 200)  # warm up
    d = await measure_latency(*direct, 2000)
    h = await measure_latency(*via_hub, 2000, "bench")
    print("non-streaming, 1 client: direct p50 %.3f ms, hub p50 %.3f ms -> %.2fx" % (
        statistics.median(d) * 1000, statistics.median(h) * 1000,
        statistics.median(h) / statistics.median(d)))
    # Non-streaming, 16 clients.
    for clients in (16,):
        cpu_before = proc_stat(hub_pid)[0]
        n_hub = await measure_throughput(*via_hub, clients, 3)
        cpu = proc_stat(hub_pid)[0] - cpu_before
        n_direct = await measure_throughput(*direct, clients, 3)
        print("non-streaming, %d clients: direct %.0f req/s, hub %.0f req/s, hub CPU "
              "%.3f ms/request" % (clients, n_direct / 3, n_hub / 3, cpu / n_hub * 1000))
    # Paced streams, one at a time: first chunk and per-chunk delay.
    firsts = {"direct": [], "hub": []}
    lats = {"direct": [], "hub": []}
    for _ in range(20):
        for name, target in (("direct", direct), ("hub", via_hub)):
            (first, latencies, _, _, _), = await paced_streams(*target, 1, 20, 0.02)
            firsts[name].append(first)
            lats[name].extend(latencies)
    added_first = statistics.median(firsts["hub"]) - statistics.median(firsts["direct"])
    added = [h - statistics.mean(lats["direct"]) for h in lats["hub"]]
    print("paced stream (20 ms/token): added time to first chunk %.3f ms (median); added "
          "per chunk %.3f ms mean, %.3f ms p99" % (
              added_first * 1000, statistics.mean(added) * 1000, percentile(added, 0.99) * 1000))
    # 64 concurrent 64-chunk streams: integrity.
    results = await paced_streams(*via_hub, 64, 64, 0.02)
    lost, errors, _ = stream_summary(results, 64)
    print("64 concurrent 64-chunk streams: %d streams lost, duplicated or reordered chunks, "
          "%d did not end with [DONE]" % (lost, errors))
    # 500 concurrent paced streams.
    idle = proc_stat(hub_pid)
    results = await paced_streams(*direct, 500, 32, 0.02)
    _, _, direct_lat = stream_summary(results, 32)
    results = await paced_streams(*via_hub, 500, 32, 0.02)
    lost, errors, hub_lat = stream_summary(results, 32)
    print("500 concurrent paced streams: %d errors, %d with lost chunks; added delay mean "
          "%.1f ms (direct mean %.1f ms, hub mean %.1f ms)" % (
              errors, lost, (statistics.mean(hub_lat) - statistics.mean(direct_lat)) * 1000,
              statistics.mean(direct_lat) * 1000, statistics.mean(hub_lat) * 1000))
    settled = wait_until(lambda: proc_stat(hub_pid)[1:3] <= idle[1:3], timeout=30)
    after = proc_stat(hub_pid)
    print("threads/fds of the hub: idle %d/%d, after %d/%d (%s)" % (
        idle[1], idle[2], after[1], after[2], "back to idle" if settled else "NOT back"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        run_bench()
    elif sys.argv[1:2] == ["bench-backend"]:
        run_bench_backend()
    elif sys.argv[1:2] == ["bench-fake-backend"]:
        run_bench_fake_backend()
    else:
        unittest.main()
