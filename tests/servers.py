"""Real servers on the loopback interface for the tests of shard sets at URLs: nginx (byte ranges), Python's
http.server (none), a server that drops connections or answers 503 on the first tries, and moto's S3 server."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen | None = None, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


@contextlib.contextmanager
def nginx(root: str | Path, work: str | Path):
    """nginx (one process, as this user) serving ``root`` at the yielded base URL, with byte ranges; its
    access log is ``work``/access.log."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ application/json json; application/x-tar tar; }}
    server {{
        listen 127.0.0.1:{port};
        root {Path(root).resolve()};
    }}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(work), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FaultyHandler(_Quiet):
    """Serves files whole (no byte ranges) or by Range; ``faults`` says what the first requests of each path
    get: "drop" (the headers and half the body, then the connection closes) or "503"."""

    ranges = False
    faults: tuple[str, ...] = ()
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        with self.lock:
            n = self.seen.get(self.path, 0)
            self.seen[self.path] = n + 1
        fault = self.faults[n] if n < len(self.faults) else None
        if not path.is_file():
            self.send_error(404)
            return
        if fault == "503":
            self.send_error(503, "busy")
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        rng = self.headers.get("Range") if self.ranges else None
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start, end = int(a), min(len(data), int(b) + 1 if b else len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        if self.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        body = data[start:end]
        if fault == "drop":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def do_HEAD(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        if self.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@contextlib.contextmanager
def python_http(root: str | Path, ranges: bool = False, faults: tuple[str, ...] = ()):
    """A threaded Python HTTP server for ``root``: without byte ranges unless ``ranges``; the first requests
    of each path meet ``faults``. Yields (base URL, the handler class, whose ``seen`` counts requests by path)."""
    handler = type("Handler", (FaultyHandler,), {"ranges": ranges, "faults": tuple(faults), "seen": {},
                                                 "lock": threading.Lock()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(root), **k))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server(bucket: str = "shards"):
    """moto's S3 server (an S3-compatible HTTP server) on the loopback interface, with a bucket; the AWS
    variables in this process's environment point at it while it runs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
