"""A fault-injecting HTTP proxy in front of the moto S3 server, for the object-store drills.

Every request goes through to the real S3 API unless a rule matches it first: answer with an
S3 error (``503 SlowDown``, ``500 InternalError``), or drop the connection without an answer
(what a lost node or a load balancer reset looks like). Rules match on method and a regex of the
path and can fire a limited number of times. ``stop()`` takes the proxy away (connection refused).
Nothing is mocked: the client (s3fs / botocore) and the server (moto) are the real ones. It fronts
an MLflow server just as well (tests/test_registration_faults.py).
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {503: ("SlowDown", "Please reduce your request rate."), 500: ("InternalError", "We encountered an "
                                                                        "internal error. Please try again.")}


@dataclass
class Rule:
    """``action`` (an HTTP status, or ``"drop"``) for requests of ``method`` whose path matches ``path``,
    at most ``times`` times (None: always)."""

    action: int | str
    method: str = ""
    path: str = ""
    times: int | None = None
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        return (not self.method or method == self.method) and re.search(self.path, path) is not None


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._take(self.command, self.path)
                if rule == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)  # noqa: PLR2004 (socket.SHUT_RDWR)
                    return
                if isinstance(rule, int):
                    code, message = ERRORS[rule]
                    data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                            f"</Message></Error>").encode()
                    self.send_response(rule)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                target = urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                # a HEAD has no body: its Content-Length is the object's, passed on as it is
                dropped = ("transfer-encoding", "connection", "date", "server") + (
                    () if self.command == "HEAD" else ("content-length",))
                for key, value in answer.getheaders():
                    if key.lower() not in dropped:
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = _any  # noqa: N815 (PATCH: MLflow's API)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self, method: str, path: str) -> int | str | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    self.seen.append((method, path, str(rule.action)))
                    return rule.action
            self.seen.append((method, path, "passed"))
            return None

    def fired(self) -> int:
        """How many requests a rule answered (or dropped)."""
        return sum(rule.fired for rule in self.rules)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
