"""A real webhook receiver for the end-to-end tests: an HTTP server on 127.0.0.1 in the test's
process that records every request and verifies each with the real `openai` SDK.

It can be told how to answer the next requests (slowly, 500, a redirect, a large body), and can be
stopped (its port closed: connections are refused) and started again on the same port.
"""

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai

from bench.stack import free_port

# unwrap() only reads the secret it is given and the SDK's own code: no request is made.
SDK = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")


def unwrap(body: bytes, headers: dict[str, str], secret: str) -> Any:
    """The event as the SDK parses it; openai.InvalidWebhookSignatureError if it does not verify."""
    return SDK.webhooks.unwrap(body, headers, secret=secret)


def verifies(body: bytes, headers: dict[str, str], secret: str) -> bool:
    try:
        unwrap(body, headers, secret)
    except openai.InvalidWebhookSignatureError:
        return False
    return True


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request: after `delay` seconds, `status` with `body`."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


OK = Answer()


@dataclass
class Received:
    """One request as it arrived, with the receiver's verdict on it."""

    path: str
    body: bytes
    headers: dict[str, str]
    at: float  # time.time() when it arrived
    # The name of each secret it was checked with, and whether the SDK accepted it.
    verified: dict[str, bool]
    # The status it is answered with, once that answer is sent (None while it is held, or if
    # the sender hung up first).
    answered: int | None = None

    @property
    def delivered(self) -> bool:
        """Answered 2xx: the sender counts it delivered."""
        return self.answered is not None and 200 <= self.answered < 300

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        return self.payload.get("type", "")

    @property
    def data_id(self) -> str:
        return self.payload.get("data", {}).get("id", "")


class Receiver:
    """A webhook receiver on 127.0.0.1: `url` for endpoints, `received` for what came."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        # Each request is checked against every secret here (name -> secret) as it arrives.
        self.secrets: dict[str, str] = {}
        self.default = OK
        self._queue: list[Answer] = []
        # Requests being answered now (a slow answer counts until it is sent).
        self.answering = 0
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # Behaviour.
    def answer(self, *answers: Answer, default: Answer | None = None) -> None:
        """Answer the next requests with `answers`, in order, then with `default` (if given;
        else with the one before)."""
        with self._lock:
            self._queue = list(answers)
            if default is not None:
                self.default = default

    def _next_answer(self) -> Answer:
        with self._lock:
            return self._queue.pop(0) if self._queue else self.default

    # Life.
    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            do_GET = do_PUT = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False  # a slow answer does not hold up stop()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: connections are refused until `start`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        body = request.rfile.read(length)
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            secrets = dict(self.secrets)
        verified = {name: verifies(body, headers, secret) for name, secret in secrets.items()}
        answer = self._next_answer()
        entry = Received(request.path, body, headers, time.time(), verified)
        with self._lock:
            self.received.append(entry)
            self.answering += 1
            self._lock.notify_all()
        answered = None
        try:
            if answer.delay:
                time.sleep(answer.delay)
            if _hung_up(request.connection):
                return
            request.send_response(answer.status)
            for name, value in answer.headers.items():
                request.send_header(name, value)
            request.send_header("content-type", "application/json")
            request.send_header("content-length", str(len(answer.body)))
            # No connection outlives its request: once stopped, the receiver gets nothing.
            request.send_header("connection", "close")
            request.close_connection = True
            request.end_headers()
            request.wfile.write(answer.body)
            request.wfile.flush()
            answered = answer.status
        except OSError:
            pass  # the sender gave up waiting (its 10 s limit) or died, and hung up
        finally:
            with self._lock:
                entry.answered = answered
                self.answering -= 1
                self._lock.notify_all()

    # Reading what came.
    def requests(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def events(self, path: str | None = None) -> dict[str, list[Received]]:
        """What came, by webhook-id (an event's every attempt, in order)."""
        found: dict[str, list[Received]] = {}
        for request in self.requests(path):
            found.setdefault(request.webhook_id, []).append(request)
        return found

    def wait_for(
        self, condition: Callable[[list[Received]], bool], seconds: float, what: str
    ) -> list[Received]:
        """Block until `condition(requests so far)` holds; AssertionError after `seconds`."""
        deadline = time.monotonic() + seconds
        with self._lock:
            while not condition(list(self.received)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"not within {seconds:g} s: {what}; received {self._summary()}"
                    )
                self._lock.wait(min(left, 0.5))
            return list(self.received)

    def wait_for_events(self, ids: set[str], seconds: float, path: str | None = None) -> None:
        """Block until a request answered 2xx came for each event id in `ids`."""

        def arrived(requests: list[Received]) -> bool:
            ok = {
                r.webhook_id for r in requests if r.delivered and (path is None or r.path == path)
            }
            return ids <= ok

        self.wait_for(arrived, seconds, f"events {sorted(ids)}")

    def _summary(self) -> str:
        return json.dumps(
            [
                {"path": r.path, "id": r.webhook_id, "type": r.type, "answered": r.answered}
                for r in self.received
            ]
        )


def _hung_up(connection: socket.socket) -> bool:
    """Whether the sender closed its end (it timed out, or died) while the answer was held."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@contextlib.contextmanager
def receiving(port: int | None = None) -> Iterator[Receiver]:
    """A started receiver, stopped on exit."""
    receiver = Receiver(port).start()
    try:
        yield receiver
    finally:
        receiver.stop()
