"""robots.txt, fetched once per host before the download and honoured for every request.

The driver fetches ``/robots.txt`` of every origin in the url list (a thread
pool, through the same guarded opener as the images) and saves the answers to a
JSON file beside the images; each download process loads that file once. An
origin first met through a redirect is fetched lazily in the process that meets
it. What an answer means follows RFC 9309: a 2xx body is parsed, a 4xx means no
restrictions, a 5xx means the whole site is off limits; when the server cannot be
reached at all the image request is left to fail with its own, truer, reason.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
ALLOW_ALL, DISALLOW_ALL = "allow-all", "disallow-all"


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) url; None for anything else."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def user_agent(token: str) -> str:
    """The User-Agent img2dataset sends with ``token``: robots.txt is asked for by the same."""
    return f"Mozilla/5.0 (compatible; {token}; +https://github.com/rom1504/img2dataset)"


def fetch_robots(
    origin: str, opener: urllib.request.OpenerDirector, timeout: float, agent: str
) -> str:
    """The robots.txt text of ``origin``, or ALLOW_ALL / DISALLOW_ALL."""
    request = urllib.request.Request(
        origin + "/robots.txt", headers={"User-Agent": user_agent(agent)}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read(MAX_ROBOTS_BYTES).decode("utf-8", "replace")
    except HTTPError as exc:
        return DISALLOW_ALL if exc.code >= 500 else ALLOW_ALL
    except (URLError, OSError, ValueError):
        return ALLOW_ALL  # unreachable: the image request will say why


def prefetch_origins(
    origins: list[str],
    opener: urllib.request.OpenerDirector,
    timeout: float,
    agent: str,
    threads: int = 32,
) -> dict[str, str]:
    """robots.txt of every origin (``origin_of`` a url), each fetched once."""
    with ThreadPoolExecutor(max(1, min(threads, len(origins)))) as pool:
        texts = pool.map(lambda o: fetch_robots(o, opener, timeout, agent), origins)
        return dict(zip(origins, texts))


def _parser(text: str) -> RobotFileParser:
    parser = RobotFileParser()
    if text == ALLOW_ALL:
        parser.allow_all = True
    elif text == DISALLOW_ALL:
        parser.disallow_all = True
    else:
        parser.parse(text.splitlines())
    return parser


class RobotsRules(urllib.request.BaseHandler):
    """An opener handler refusing requests that robots.txt disallows for ``agent``.

    It runs before each request is sent, redirects included, so a disallowed url
    is never requested.
    """

    handler_order = 100

    def __init__(self, agent: str, known: dict[str, str], fetch_opener, timeout: float):
        self.agent = agent
        self._texts = dict(known)
        self._parsers: dict[str, RobotFileParser] = {}
        self._fetch_opener = fetch_opener
        self._timeout = timeout
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, agent: str, fetch_opener, timeout: float) -> RobotsRules:
        return cls(agent, json.loads(Path(path).read_text()), fetch_opener, timeout)

    def allowed(self, url: str) -> bool:
        origin = origin_of(url)
        if origin is None:
            return True  # not http(s): the opener refuses it anyway
        with self._lock:
            parser, text = self._parsers.get(origin), self._texts.get(origin)
        if parser is None:
            if text is None:  # an origin met through a redirect: fetch it here, unlocked
                text = fetch_robots(origin, self._fetch_opener, self._timeout, self.agent)
            parser = _parser(text)
            with self._lock:
                self._texts[origin], self._parsers[origin] = text, parser
        return parser.can_fetch(self.agent, url)

    def http_request(self, req):
        if not self.allowed(req.full_url):
            raise URLError(f"robots.txt disallows {req.full_url} for {self.agent}")
        return req

    https_request = http_request
