"""An S3 fault proxy for the chaos tests: it stands in front of the loopback S3 server and, on a
schedule, answers 503 SlowDown, resets the connection, or stalls every request for a while (as
a paused or overloaded server does). Clients point AWS_ENDPOINT_URL at it like at any endpoint.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """HTTP/1.1 proxy to `upstream` (http://host:port). Faults, each request drawn once:
    `slow_down` and `reset` are the shares of requests answered 503 SlowDown or cut with a TCP
    reset (seeded); `stall(seconds)` holds every request arriving in the next `seconds` until
    they have passed. `only` limits random faults to requests whose method and path match
    (e.g. lambda method, path: method == "GET"). Counts what it did in `faults`."""

    def __init__(self, upstream: str, *, slow_down: float = 0.0, reset: float = 0.0,
                 seed: int = 0, only=None) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.slow_down, self.reset, self.only = slow_down, reset, only
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.stalled_until = 0.0
        self.faults = {"requests": 0, "slow_down": 0, "reset": 0, "stalled": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def relay(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stall(self, seconds: float) -> None:
        """Hold every request that arrives in the next `seconds` until they have passed."""
        with self.lock:
            self.stalled_until = time.monotonic() + seconds

    def set_faults(self, *, slow_down: float | None = None, reset: float | None = None) -> None:
        with self.lock:
            self.slow_down = self.slow_down if slow_down is None else slow_down
            self.reset = self.reset if reset is None else reset

    def _draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.faults["requests"] += 1
            if self.only is not None and not self.only(method, path):
                return None
            x = self.random.random()
            fault = "slow_down" if x < self.slow_down else \
                "reset" if x < self.slow_down + self.reset else None
            if fault:
                self.faults[fault] += 1
            return fault

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = _read_body(request)
        wait = self.stalled_until - time.monotonic()
        if wait > 0:
            with self.lock:
                self.faults["stalled"] += 1
            time.sleep(wait)
        fault = self._draw(request.command, request.path)
        if fault == "reset":
            # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
            request.close_connection = True
            request.connection.close()
            return
        if fault == "slow_down":
            request.send_response(503, "Slow Down")
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(SLOW_DOWN)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection")}
            if body or request.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(request.command, request.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            request.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    request.send_header(key, value)
            length = response.getheader("Content-Length") if request.command == "HEAD" else None
            request.send_header("Content-Length", length or str(len(data)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(data)
        except OSError:
            request.close_connection = True  # the client gave up (its timeout) while we waited
        finally:
            upstream.close()


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""
