"""A static file server on loopback, with per-path misbehaviour for the hard cases.

The demo pool and the download tests need a real web server whose pages fail the
way the web does: 404s, 500s, stalls, redirects, opt-out headers, HTML at image
urls. This is the standard library's threaded HTTP server bound to 127.0.0.1
only; ``rules`` (or ``_rules.json`` in the served folder) say, per url path,
what to do instead of serving the file. Content types are sniffed from the bytes,
so an HTML page saved as ``x.jpg`` is served as ``text/html``, as the web would.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RULES_FILE = "_rules.json"

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


def sniff_type(body: bytes) -> str:
    """The content type a server would send for these bytes."""
    for magic, kind in _MAGIC:
        if body.startswith(magic):
            return kind
    if body.lstrip()[:1] == b"<":
        return "text/html; charset=utf-8"
    return "application/octet-stream"


@dataclass
class Rule:
    """What to answer at one path instead of (or on top of) the file there."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds of silence before the status line: a stalled server
    redirect: str | None = None  # answer 302 with this Location
    body: bytes | None = None  # instead of the file

    @classmethod
    def from_json(cls, data: dict) -> Rule:
        body = data.get("body")
        return cls(
            status=data.get("status", 200),
            headers=data.get("headers", {}),
            delay=data.get("delay", 0.0),
            redirect=data.get("redirect"),
            body=body.encode() if isinstance(body, str) else body,
        )


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when a crawler opens dozens at once.
    request_queue_size = 256


class LoopbackServer:
    """Serve ``root`` on 127.0.0.1 (a free port unless ``port``), in a background thread.

    ``requests`` lists every (method, path, user-agent) received, so tests can
    check that a url was never requested.
    """

    def __init__(self, root: Path, rules: dict[str, Rule] | None = None, port: int = 0):
        self.root = Path(root).resolve()
        self.rules: dict[str, Rule] = {}
        rules_file = self.root / RULES_FILE
        if rules_file.exists():
            saved = json.loads(rules_file.read_text())
            self.rules.update({path: Rule.from_json(r) for path, r in saved.items()})
        self.rules.update(rules or {})
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths_requested(self) -> list[str]:
        with self._lock:
            return [path for _, path, _ in self.requests]

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: forever if never started
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: tests read server.requests
                pass

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path)
                with server._lock:
                    server.requests.append(("GET", path, self.headers.get("User-Agent", "")))
                rule = server.rules.get(path, Rule())
                if rule.delay:
                    time.sleep(rule.delay)
                if rule.redirect:
                    self._answer(302, b"", {"Location": rule.redirect, **rule.headers})
                    return
                body = rule.body if rule.body is not None else server._read(path)
                if body is None and rule.status != 200:  # a rule's status stands without a file
                    body = b""
                if body is None:
                    self._answer(404, b"not found", {"Content-Type": "text/plain"})
                    return
                self._answer(rule.status, body, {"Content-Type": sniff_type(body), **rule.headers})

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to tell it

        return Handler

    def _read(self, path: str) -> bytes | None:
        """The file at ``path`` under root; None outside root, for folders and missing files."""
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        if target.name == RULES_FILE:
            return None
        return target.read_bytes()
