"""Real servers for cache tests, started on 127.0.0.1 with a free port and stopped after.

* nginx from Debian with WebDAV PUT and a JSON directory index (a writable HTTP cache);
* s3rver (npm, installed by scripts/setup.sh --test into .venv/s3rver): an S3-compatible
  server that keeps buckets in a directory;
* tiny Python servers that misbehave on purpose: one answers every request with HTTP
  500, one accepts connections and never answers.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
S3RVER = REPO / ".venv" / "s3rver" / "node_modules" / ".bin" / "s3rver"
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location / {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            autoindex on;
            autoindex_format json;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


@contextlib.contextmanager
def running(argv: list[str], port: int, what: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, what)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def nginx(directory: Path) -> Iterator[tuple[str, Path]]:
    """A writable nginx WebDAV server: (URL of its root, the directory it serves)."""
    binary = nginx_binary()
    assert binary is not None
    port = free_port()
    (directory / "www").mkdir(parents=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port))
    with running([binary, "-c", str(conf), "-e", str(directory / "error.log")], port,
                 "nginx", directory / "nginx.out"):
        yield f"http://127.0.0.1:{port}", directory / "www"


@contextlib.contextmanager
def s3rver(directory: Path, bucket: str) -> Iterator[str]:
    """An s3rver with ``bucket``; yields its endpoint URL."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    argv = ["node", str(S3RVER), "-d", str(directory), "-a", "127.0.0.1", "-p", str(port),
            "--silent", "--configure-bucket", bucket]
    with running(argv, port, "s3rver", directory.parent / "s3rver.out"):
        yield f"http://127.0.0.1:{port}"


class _Failing(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = b"internal error"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def failing_server() -> Iterator[tuple[str, http.server.HTTPServer]]:
    """Answers every request with 500; yields (URL, server) (``server.hits`` counts)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """Accepts connections, reads requests, never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
