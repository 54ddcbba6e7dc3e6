"""Fault injection for the reliability tests: a flaky object store, and killing processes for real.

:class:`FaultProxy` is a small threaded HTTP proxy on 127.0.0.1 in front of
the loopback S3 server. Each distinct request (method, path, query, range)
fails a planned number of times before it is let through, as a 500
InternalError, a 503 SlowDown or a dropped connection. The plan is a pure
function of the seed and the request, so a run sees the same faults whatever
order its threads send requests in, and a client that retries often enough
always gets through.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
KINDS = ("500", "503", "drop")
WRITES = ("PUT", "POST", "DELETE")
ERROR_BODY = {
    "500": b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
           b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    "503": b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
           b"<Message>Please reduce your request rate.</Message></Error>",
}


def _unit(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) from the seed and the request: the same every run."""
    digest = hashlib.sha256("\x00".join((str(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def flaky(share: float, seed: int = 0, most: int = 4):
    """A plan failing ``share`` of distinct requests 1..``most`` times each."""
    def plan(method: str, key: str) -> int:
        u = _unit(seed, method, key)
        return 1 + int(u / share * most) % most if u < share else 0
    return plan


def always(methods=WRITES, key_contains: str = ""):
    """A plan failing every request of ``methods`` whose key contains ``key_contains``, forever."""
    def plan(method: str, key: str) -> int:
        return 10**9 if method in methods and key_contains in key else 0
    return plan


class FaultProxy:
    """A loopback HTTP proxy to ``upstream`` that fails requests as ``plan(method, key)`` says.

    Args:
        upstream: the real endpoint, ``http://host:port``.
        plan: how many times each distinct request fails before it passes.
        seed: picks the fault kind (500, 503, dropped connection) of each failure.
        delay: seconds each write request is held before it is forwarded.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT`` to point clients at.
        stats: counts of ``requests``, ``forwarded`` and each fault kind.
    """

    def __init__(self, upstream: str, plan=lambda method, key: 0, seed: int = 0, delay: float = 0.0):
        self.upstream = urlparse(upstream)
        self.plan, self.seed, self.delay = plan, seed, delay
        self.stats: Counter = Counter()
        self.attempts: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, key, outcome) in arrival order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:
        """Wait until some logged (method, key, outcome) satisfies ``predicate``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if any(predicate(*entry) for entry in self.log):
                    return True
            time.sleep(0.02)
        return False

    def _decide(self, method: str, key: str) -> str:
        with self.lock:
            self.stats["requests"] += 1
            attempt = self.attempts[(method, key)]
            self.attempts[(method, key)] += 1
            if attempt < self.plan(method, key):
                kind = KINDS[int(_unit(self.seed, method, key, str(attempt)) * len(KINDS))]
            else:
                kind = "forwarded"
            self.stats[kind] += 1
            self.log.append((method, key, kind))
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the stats say what happened
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                key = f"{self.path}|{self.headers.get('Range', '')}"
                if self.command in WRITES and proxy.delay:
                    time.sleep(proxy.delay)
                kind = proxy._decide(self.command, key)
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind in ERROR_BODY:
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_BODY[kind])))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(ERROR_BODY[kind])
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not its own (empty) body's.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


def session_pids(sid: int) -> set[int]:
    """Every process in session ``sid`` (a job started with ``start_new_session=True`` and all it forked)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids
