"""Real servers on 127.0.0.1 for the remote-input tests: an HTTP server with range support that counts the
bytes it serves (with injectable faults), moto's S3 server started as its own process, and moto's S3
server run in this process behind a WSGI layer that counts the body bytes and GET requests per key."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    """What the HTTP server sent, per path: body bytes and requests; faults to inject, per path."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deny: set[str] = field(default_factory=set)
    reset_once: set[str] = field(default_factory=set)  # the next ranged read is cut off mid-body
    reset_always: set[str] = field(default_factory=set)
    delay_s: float = 0.0  # a round trip's latency, added before each answer (as a real store's would be)


class RangeServer(ThreadingHTTPServer):
    """A threading HTTP server serving ``root``, recording into ``served``."""

    daemon_threads = True
    # socketserver's default backlog is 5: more concurrent connects (a batched fetch of a hundred ranges)
    # overflow it, and each dropped SYN is retried by TCP after 1 s, 2 s, 4 s ...
    request_queue_size = 128
    served: Served
    root: Path


class RangeHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of files under the server's root, honouring one ``Range: bytes=a-b``."""

    server: RangeServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _target(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = self.server.root / rel
        return path if path.is_file() else None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        served, name = self.server.served, self.path.lstrip("/")
        time.sleep(served.delay_s)
        if name in served.deny:
            self.send_error(403)
            return
        if (self.server.root / name.split("?", 1)[0]).is_dir():
            super().do_GET() if body else super().do_HEAD()  # a folder's listing: what fsspec globs
            return
        path = self._target()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size
        match = _RANGE.match(self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, size) if match.group(2) else size
        self.send_response(206 if match else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self._body(path, name, start, end, cut=bool(match) and self._cut(name))

    def _cut(self, name: str) -> bool:
        served = self.server.served
        cut = name in served.reset_always or name in served.reset_once
        served.reset_once.discard(name)
        return cut

    def _body(self, path: Path, name: str, start: int, end: int, cut: bool) -> None:
        """Send bytes start..end of the file (half of them, then a reset, when ``cut``), counting them."""
        served = self.server.served
        stop = start + (end - start) // 2 if cut else end
        served.requests[name] += 1
        with open(path, "rb") as f:
            f.seek(start)
            while start < stop:
                chunk = f.read(min(1 << 20, stop - start))
                if not chunk:
                    break
                self.wfile.write(chunk)
                served.bytes[name] += len(chunk)
                start += len(chunk)
        if cut:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset mid-body


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, Served]]:
    server = RangeServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    server.root, server.served = root, Served()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.served
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process on a free port; the endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a bnaudit process needs to reach the moto server (s3fs reads these)."""
    return {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}


_UPLOAD = (
    "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir('bucket')\n"
    "for p in sys.argv[1:]: fs.put(p, 'bucket/run/' + p.rsplit('/', 1)[1], recursive=True)\n"
)


@contextlib.contextmanager
def s3_run_bucket(paths: Iterable[str | Path]) -> Iterator[dict[str, str]]:
    """A moto server holding each file or folder of ``paths`` at ``s3://bucket/run/<its name>``; the
    environment to reach it (uploaded by s3fs in a child process, as a user's tool would)."""
    with moto_server() as endpoint:
        env = s3_env(endpoint)
        subprocess.run([sys.executable, "-c", _UPLOAD, *map(str, paths)], check=True, env=env, timeout=120)
        yield env


class CountingApp:
    """A WSGI layer that counts, per ``bucket/key`` path, the GET requests and the body bytes they send."""

    def __init__(self, app: Callable[..., Iterable[bytes]], served: Served) -> None:
        self.app, self.served = app, served

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        body = self.app(environ, start_response)
        name = environ.get("PATH_INFO", "").lstrip("/")
        counted = environ.get("REQUEST_METHOD") == "GET"
        if counted:
            self.served.requests[name] += 1
        try:
            for chunk in body:
                if counted:
                    self.served.bytes[name] += len(chunk)
                yield chunk
        finally:
            getattr(body, "close", lambda: None)()


@contextlib.contextmanager
def counting_s3_server() -> Iterator[tuple[str, Served]]:
    """moto's S3 server in this process, behind :class:`CountingApp`: the endpoint URL and its counts,
    keyed ``bucket/key``. moto's state lives in this process and is reset when the server stops."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):  # type: ignore[misc]
        def log_request(self, *args: object) -> None:
            pass

    served = Served()
    app = CountingApp(DomainDispatcherApplication(create_backend_app), served)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield endpoint, served
    finally:
        import urllib.request

        with contextlib.suppress(OSError):
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        server.shutdown()
        server.server_close()
