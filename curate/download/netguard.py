"""The crawler's network policy: which addresses it may reach, how long and how much.

img2dataset fetches with ``urllib.request.urlopen``, so the policy is an
``OpenerDirector`` installed in each download process. It is enforced where it
cannot be dodged:

* **At connect time.** Every connection — the first request and every redirect
  — resolves the host itself, refuses if any address is private, loopback,
  link-local (169.254/16: the cloud metadata endpoint), multicast or otherwise
  not public, then connects to the vetted address. A public name that redirects,
  or re-resolves, to a private address is refused before a byte is sent.
* **By scheme.** Only http and https handlers exist: ``file:``, ``ftp:`` and
  ``data:`` urls, and redirects to them, are refused.
* **By size and time.** Bodies larger than ``max_bytes`` are refused (from
  Content-Length when sent, else while reading), and a body must arrive within
  ``timeout`` seconds of the headers — so a server that trickles bytes costs its
  timeout, not the run. Connect and every read also time out (``timeout``).

Refusals raise errors whose text starts with ``blocked:``, ``too large:`` or
``timed out:``; ``curate.download.errors`` turns them into drop reasons.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.request
from urllib.error import URLError


class Refused(OSError):
    """A request the policy refused before connecting."""


def address_block_reason(ip: str) -> str | None:
    """Why a crawler must not connect to ``ip`` (None: a public address).

    A pure function, so every range can be tested without sending a packet.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_private:
        return "private"
    if not addr.is_global:  # shared (100.64/10), reserved and documentation ranges
        return "non-public"
    return None


def connect_checked(
    address: tuple[str, int],
    timeout: float | object = socket._GLOBAL_DEFAULT_TIMEOUT,
    source_address: tuple[str, int] | None = None,
    *,
    allow_private: bool = False,
) -> socket.socket:
    """``socket.create_connection`` that connects only to addresses the policy allows."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not allow_private:
        for *_, sockaddr in infos:
            reason = address_block_reason(sockaddr[0])
            if reason:
                raise Refused(f"blocked: {host} resolves to a {reason} address ({sockaddr[0]})")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)  # the vetted address, not the name: no second lookup
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"getaddrinfo returned nothing for {host}")


def _checked_connection(cls: type[http.client.HTTPConnection], allow_private: bool):
    def make(host: str, **kwargs) -> http.client.HTTPConnection:
        conn = cls(host, **kwargs)
        # http.client opens its socket through this attribute (HTTPS wraps it after).
        conn._create_connection = lambda *a, **k: connect_checked(
            *a, **k, allow_private=allow_private
        )
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req):
        return self.do_open(
            _checked_connection(http.client.HTTPConnection, self.allow_private), req
        )


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool):
        super().__init__(context=ssl.create_default_context())
        self.allow_private = allow_private

    def https_open(self, req):
        conn = _checked_connection(http.client.HTTPSConnection, self.allow_private)
        return self.do_open(conn, req, context=self._context)


class _SchemeRefusal(urllib.request.BaseHandler):
    """Any scheme without a handler here (file, ftp, data, …) is refused."""

    handler_order = 10_000

    def unknown_open(self, req):
        raise URLError(f"blocked: scheme {req.type!r} is not allowed (http and https only)")


class _BoundedBody:
    """A response whose body may not exceed ``max_bytes`` nor take more than ``timeout``."""

    def __init__(self, response, max_bytes: int, timeout: float):
        self._response = response
        self._max_bytes = max_bytes
        self._timeout = timeout
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            response.close()
            raise URLError(f"too large: Content-Length {declared} > max_bytes {max_bytes}")

    def read(self, amt: int | None = None) -> bytes:
        deadline = time.monotonic() + self._timeout
        chunks, size = [], 0
        while amt is None or size < amt:
            chunk = self._response.read(65536 if amt is None else min(65536, amt - size))
            if not chunk:
                break
            size += len(chunk)
            if size > self._max_bytes:
                raise URLError(f"too large: body exceeds max_bytes {self._max_bytes}")
            if time.monotonic() > deadline:
                raise URLError(f"timed out: body not received within {self._timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def __getattr__(self, name):
        return getattr(self._response, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._response.close()


class _BodyLimits(urllib.request.BaseHandler):
    handler_order = 2000  # after HTTPErrorProcessor (1000): only successful responses

    def __init__(self, max_bytes: int, timeout: float):
        self.max_bytes = max_bytes
        self.timeout = timeout

    def http_response(self, req, response):
        if isinstance(response, _BoundedBody):  # a redirect's target, already wrapped
            return response
        return _BoundedBody(response, self.max_bytes, self.timeout)

    https_response = http_response


def guarded_opener(
    allow_private: bool, max_bytes: int, timeout: float, *extra: urllib.request.BaseHandler
) -> urllib.request.OpenerDirector:
    """An opener that only speaks http(s) to allowed addresses, within size and time limits.

    No proxy handler on purpose: through a proxy, the address checked would be the
    proxy's, not the server's.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        _HTTPHandler(allow_private),
        _HTTPSHandler(allow_private),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _SchemeRefusal(),
        _BodyLimits(max_bytes, timeout),
        *extra,
    ):
        opener.add_handler(handler)
    return opener
