"""Download failures by kind: what users ask first when their success rate is low.

img2dataset reports a failure as free text (the exception's message); this
module names its kind, which becomes the row's ``status``. The text itself is
kept in ``error_message``. Kinds: ``blocked`` (address or scheme refused by
``curate.download.netguard``), ``robots`` (robots.txt), ``opt_out`` (X-Robots-Tag
noai/noimageai/noindex/noimageindex), ``invalid_url``, ``dns``, ``timeout``,
``connection`` (refused, reset, closed early), ``http_<code>``, ``too_large``
(body or declared image size), ``decode`` (not a readable image) and ``failed``
for anything else.
"""

from __future__ import annotations

import re

SUCCESS = "success"

_HTTP = re.compile(r"HTTP Error (\d{3})")
# Checked in order: the first pattern found in the message names the kind.
_PATTERNS = (
    ("blocked", ("blocked:",)),
    ("robots", ("robots.txt disallows",)),
    ("opt_out", ("X-Robots-Tag",)),
    ("too_large", ("too large:",)),
    ("timeout", ("timed out", "timeout")),
    (
        "dns",
        (
            "Name or service not known",
            "Temporary failure in name resolution",
            "No address associated with hostname",
            "nodename nor servname",
            "getaddrinfo",
        ),
    ),
    (
        "invalid_url",
        (
            "unknown url type",
            "no host given",
            "URL can't contain control",
            "Invalid URL",
            "nonnumeric port",
            "Invalid IPv6 URL",
            "codec can't encode",  # a non-ASCII url, which urllib cannot send
            "url is null",
        ),
    ),
    (
        "connection",
        (
            "Connection refused",
            "Connection reset",
            "Remote end closed",
            "IncompleteRead",
            "BadStatusLine",
            "RemoteDisconnected",
            "Connection aborted",
            "EOF occurred",
            "Network is unreachable",
            "No route to host",
            "SSL",
            "certificate",
        ),
    ),
    ("decode", ("decode:", "decoding error", "imdecode", "cannot identify image")),
)


def failure_kind(status: str | None, error_message: str | None) -> str:
    """The kind of an img2dataset result: ``success`` or why it failed."""
    if status == SUCCESS:
        return SUCCESS
    message = error_message or ""
    http = _HTTP.search(message)
    if http:
        return f"http_{http.group(1)}"
    for kind, needles in _PATTERNS:
        if any(n in message for n in needles):
            return kind
    # A resize failure that matched nothing above is still a picture we could not read.
    return "decode" if status == "failed_to_resize" else "failed"
