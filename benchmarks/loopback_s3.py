"""A loopback S3 server for the benchmarks: moto's server in a thread, recording every request it answers.

Each request is kept as (time, kind, path, bytes sent): the kind is the HTTP
method, or ``LIST`` for a bucket listing; the bytes are the response body's.
Jobs started from this process (or its children) reach it through the
``AWS_*`` variables :meth:`LoopbackS3.start` sets.
"""

from __future__ import annotations

import collections
import os
import threading
import time


class LoopbackS3:
    """``with LoopbackS3() as s3: url = s3.bucket("b")``; then :meth:`counts` and :meth:`gets`."""

    def __init__(self):
        self.seen: list[list] = []  # [time received, kind, path, body bytes sent so far]
        self._lock = threading.Lock()
        self._server = self._thread = None

    def __enter__(self) -> "LoopbackS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LoopbackS3":
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._recorded(app), threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        os.environ.update(AWS_ACCESS_KEY_ID="mmdp-bench", AWS_SECRET_ACCESS_KEY="mmdp-bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()
            self._server = None

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def _recorded(self, app):
        def recorded(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            query = environ.get("QUERY_STRING", "")
            kind = "LIST" if method == "GET" and ("list-type=" in query or "prefix=" in query) else method
            entry = [time.time(), kind, path, 0]
            with self._lock:
                self.seen.append(entry)
            body = app(environ, start_response)
            try:
                for chunk in body:
                    entry[3] += len(chunk)  # counted before the client can have it
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()

        return recorded

    def _between(self, start: float, end: float):
        with self._lock:
            return [r for r in self.seen if start <= r[0] < end]

    def counts(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        """Requests by kind received between ``start`` and ``end`` (``time.time()``)."""
        return dict(sorted(collections.Counter(kind for _, kind, _, _ in self._between(start, end)).items()))

    def gets(self, start: float = 0.0, end: float = float("inf"), under: str = "") -> tuple[int, int]:
        """(GETs, their body bytes) received between ``start`` and ``end`` for objects under ``under``
        (``s3://bucket/prefix``; default: all)."""
        prefix = "/" + under.removeprefix("s3://") if under else ""
        sizes = [sent for _, kind, path, sent in self._between(start, end) if kind == "GET" and path.startswith(prefix)]
        return len(sizes), sum(sizes)
