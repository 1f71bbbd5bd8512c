"""img2dataset's downloader and resizer with curate's crawl policy built in.

Imported only when a download runs: img2dataset takes seconds to import (it
pulls in webdataset, torch and albumentations), which no other command should pay.

* ``PoliteDownloader`` installs, in every download process, the opener of
  ``curate.download.netguard`` (public addresses only unless allowed, http(s) only,
  bounded size and time) with ``curate.download.robots`` rules. img2dataset calls
  ``urllib.request.urlopen``, which uses the installed opener.
* ``CheckedResizer`` asks ``curate.io.image_guard`` before OpenCV decodes anything.
"""

from __future__ import annotations

import functools
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer

from curate.download import robots
from curate.download.netguard import guarded_opener
from curate.io.image_guard import DEFAULT_MAX_PIXELS, image_problem


@dataclass(frozen=True)
class CrawlPolicy:
    """What every download process enforces; small and picklable, opener built per process."""

    allow_private_networks: bool
    max_bytes: int
    timeout: float
    agent: str
    robots_file: str | None  # None: robots.txt not consulted

    def opener(self) -> urllib.request.OpenerDirector:
        return _opener(self)


@functools.cache
def _opener(policy: CrawlPolicy) -> urllib.request.OpenerDirector:
    plain = guarded_opener(policy.allow_private_networks, policy.max_bytes, policy.timeout)
    if policy.robots_file is None:
        return plain
    rules = robots.RobotsRules.from_file(
        Path(policy.robots_file), policy.agent, plain, policy.timeout
    )
    return guarded_opener(policy.allow_private_networks, policy.max_bytes, policy.timeout, rules)


class PoliteDownloader(Downloader):
    """img2dataset's Downloader, fetching through the crawl policy's opener."""

    def __init__(self, policy: CrawlPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def __call__(self, row):
        # img2dataset calls urllib.request.urlopen, which uses the installed opener.
        urllib.request.install_opener(self.policy.opener())
        return super().__call__(row)


class CheckedResizer(Resizer):
    """img2dataset's Resizer, refusing what ``image_problem`` refuses."""

    def __init__(self, *args, max_pixels: int = DEFAULT_MAX_PIXELS, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        problem = image_problem(img_stream.getvalue(), self.max_pixels)
        if problem:
            return None, None, None, None, None, problem
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)
