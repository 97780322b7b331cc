#!/usr/bin/env python3
"""Tests for gambiarra.py: standard library only, loopback only.

    python3 -m unittest -v test_gambiarra        # or: python3 test_gambiarra.py
    python3 test_gambiarra.py bench              # the relay benchmark (not a test)

Every test starts real servers on 127.0.0.1 port 0 (the hub and a fake
OpenAI-compatible backend defined here), waits with bounded timeouts only and
stops everything it started.
"""

import contextlib
import http.client
import http.server
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import unittest

import gambiarra

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT_S = 10  # upper bound of any wait; tests pass far sooner


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
        body = json.loads(self.rfile.read(length) or b"{}")
        with backend.lock:
            backend.requests.append((self.path, body))
        fake = body.get("fake") or {}
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
        self.write_chunk(b"data: [DONE]\n\n")
        self.write_chunk(b"")

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


class FakeBackend:
    """A fake OpenAI-compatible server on 127.0.0.1, port 0, in a thread."""

    def __init__(self, models=("fake-model",)):
        self.models = list(models)
        self.requests = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.disconnected = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeBackendHandler)
        self.server.daemon_threads = True
        self.server.backend = self
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT_S)

    def last_body(self):
        with self.lock:
            return self.requests[-1][1]


# === Test helpers ===

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HubTestCase(unittest.TestCase):
    """Starts a hub with fast timings, and gives small HTTP helpers."""

    hub_options = {}

    def setUp(self):
        self.threads_before = threading.active_count()
        options = dict(health_interval=0.2, participant_timeout=0.3, forget_after=0.6,
                       connect_timeout=2, backend_timeout=5)
        options.update(self.hub_options)
        self.hub = gambiarra.Hub("127.0.0.1", 0, **options).start()
        self.addCleanup(self.check_no_thread_leak)
        self.addCleanup(self.hub.close)
        self.port = self.hub.port

    def check_no_thread_leak(self):
        leaked = not wait_until(lambda: threading.active_count() <= self.threads_before)
        self.assertFalse(leaked, "threads left: %s" % threading.enumerate())

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
        return answer

    def chat(self, code, model, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body.update(extra)
        return self.request("POST", "/rooms/%s/v1/chat/completions" % code, body)

    def open_stream(self, path, body):
        """Send a streaming request; return (connection, response) to read from."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        self.addCleanup(conn.close)
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()


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
        self.conn.close()


# === Helpers of gambiarra.py ===

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
        self.assertEqual(listing["rooms"], [dict(room, participantCount=0)])

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
        self.assertEqual(answer["healthInterval"], 200)
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
        status, _, answer = self.request("POST", "/rooms/%s/health" % code, {"id": "alice"})
        self.assertEqual((status, answer), (200, {"success": True}))
        status, _, answer = self.request("POST", "/rooms/%s/health" % code, {})
        self.assertEqual(status, 400)
        self.assertIn("id", answer["error"])
        status, _, answer = self.request("DELETE", "/rooms/%s/leave/alice" % code)
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

    def test_cors_preflight(self):
        status, response, _ = self.request("OPTIONS", "/rooms/ANY/v1/chat/completions")
        self.assertEqual(status, 204)
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

    def test_chat_needs_a_string_model(self):
        code = self.create_room()
        for body, words in (({"messages": []}, "model"), ({"model": 3}, "model")):
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
