"""A process pool whose workers die with their parent: the local engine's downloads.

img2dataset's ``multiprocessing_distributor`` starts a spawn ``Pool`` whose
workers are never told when the process that started them dies: after a
SIGKILL (or SIGTERM, which Python does not catch by default) of a local run,
each went on downloading until its shard was done, tens of seconds later. The
local engine runs work that asks for processes (``map_items(processes=n)``) on
``dying_pool`` instead.

On Linux each worker asks the kernel, as it starts, for SIGKILL when its
parent goes (``prctl(PR_SET_PDEATHSIG)``), then checks that the parent has not
already gone. The signal follows the *thread* that started the worker: the
first workers are started by the thread that makes the pool, the ones replacing
workers retired by ``maxtasksperchild`` by the pool's worker-handler thread;
both live until the pool is terminated, so a worker outlives neither.

Workers ignore SIGINT: a Ctrl-C reaches the whole process group, and the parent
alone decides (its KeyboardInterrupt terminates the pool) instead of each
worker dying with a traceback while the pool starts replacements.

Elsewhere (macOS has no prctl) the pool works the same without the guarantee:
workers end when they next talk to the dead parent, after their shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from multiprocessing import get_context
from multiprocessing.pool import Pool

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MAX_TASKS_PER_CHILD = 5  # as img2dataset's multiprocessing_distributor


def _die_with_parent(parent: int) -> None:
    """Pool initializer: SIGKILL when ``parent`` dies (Linux); exit at once if it already has."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # No exception on failure: a pool whose initializer raises starts workers forever.
        # prctl only fails for a bad signal number; without it we are as on macOS.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: nobody would signal us
        os._exit(1)


def dying_pool(processes: int, maxtasksperchild: int | None = MAX_TASKS_PER_CHILD) -> Pool:
    """A spawn ``Pool`` whose workers die with this process (on Linux, even on SIGKILL)."""
    return get_context("spawn").Pool(
        processes,
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
        maxtasksperchild=maxtasksperchild,
    )
