"""Small web servers on 127.0.0.1 for source-URL tests: a folder, a handler of one's own, a port that never answers."""
from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from pathlib import Path

SECRET = "PROBE-ANSWER-7f3a"  # what a probed service says: it must never reach an error message


class _Quiet:
    def log_message(self, *args):
        pass


class _FolderHandler(_Quiet, http.server.SimpleHTTPRequestHandler):
    pass


@contextlib.contextmanager
def _running(handler_class):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def folder_server(folder: Path):
    """folder's files with Python's HTML directory listings; yields its URL."""
    with _running(functools.partial(_FolderHandler, directory=str(folder))) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}"


@contextlib.contextmanager
def handler_server(respond):
    """respond(handler) answers every GET; yields (URL, the paths asked for, in order)."""
    hits: list[str] = []

    class Handler(_Quiet, http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            hits.append(self.path)
            respond(self)

    with _running(Handler) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}", hits


def answer(status: int, body: bytes, reason: str | None = None, headers: dict | None = None):
    def respond(h):
        h.send_response(status, reason)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return respond


def huge_page(total: int, sent: list[int], content_length: bool, chunk: int = 1024**2):
    """A listing page of `total` bytes of links, written a chunk at a time; sent[0]: the bytes the client took."""
    line = b'<a href="adapter_config.json">adapter_config.json</a>\n'
    block = line * (chunk // len(line))

    def respond(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        if content_length:
            h.send_header("Content-Length", str(total))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        try:
            while sent[0] < total:
                piece = block[: total - sent[0]]
                h.wfile.write(piece)
                sent[0] += len(piece)
        except OSError:
            pass  # the client stopped reading and closed
    return respond


@contextlib.contextmanager
def silent_url():
    """A URL whose server accepts connections (the kernel does) and never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/adapters/slow/"
    finally:
        sock.close()
