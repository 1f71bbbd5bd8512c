"""A real Ray cluster of several nodes on this machine, all on 127.0.0.1, for tests and benchmarks.

Each node is a ``ray start`` process of its own, started apart from any driver
(a driver joins with ``--address``), as on a real cluster. All Ray traffic stays
on 127.0.0.1: the head is started with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's
own switch for "use loopback"), and the other nodes, which Ray would otherwise
re-address to the machine's external interface, keep their loopback address as
given. Ray enables token authentication for a loopback cluster; every member uses it.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
}

# `ray start` for a node other than the head, keeping --node-ip-address=127.0.0.1 as given.
OTHER_NODE = (
    "import sys, ray._private.services as s, ray.scripts.scripts as cli; "
    "s.resolve_ip_for_localhost = lambda host: host; sys.exit(cli.main())"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 (the node writes to it until stopped)
    return subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_for_log(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text(errors="replace"):
        if time.time() > deadline:
            raise TimeoutError(f"{log.name} never said {text!r}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _alive_nodes(address: str, wanted: int) -> list[str]:
    probe = (
        f"import ray, time; ray.init(address='{address}', log_to_driver=False)\n"
        "for _ in range(60):\n"
        "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
        f"    if len(nodes) == {wanted}: break\n"
        "    time.sleep(1)\n"
        "print(sorted(n['NodeManagerAddress'] for n in nodes))"
    )
    seen = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, **LOOPBACK_ENV},
        timeout=120,
    )
    return ast.literal_eval(seen.stdout.strip() or "[]")  # a printed list of strings


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int, logs: Path, gpus: int = 0) -> Iterator[str]:
    """``nodes`` Ray nodes of ``cpus`` CPUs each on 127.0.0.1; yields the head's address.

    ``gpus``: how many GPUs each node other than the head declares to Ray. Declared,
    not present: tasks that ask for one are placed there, and find no CUDA device.
    """
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = [
        f"--num-cpus={cpus}",
        "--disable-usage-stats",
        "--block",
        "--object-store-memory=200000000",
        "--node-ip-address=127.0.0.1",
    ]
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    head = [*ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    started = [_start(head, LOOPBACK_ENV, logs / "node-0.log")]
    try:
        _wait_for_log(logs / "node-0.log", "Ray runtime started")
        other = {**LOOPBACK_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        for i in range(1, nodes):
            cmd = [sys.executable, "-c", OTHER_NODE, "start", f"--address={address}", *common,
                   f"--num-gpus={gpus}"]  # fmt: skip
            started.append(_start(cmd, other, logs / f"node-{i}.log"))
        found = _alive_nodes(address, nodes)
        if found != ["127.0.0.1"] * nodes:
            raise RuntimeError(f"expected {nodes} nodes on 127.0.0.1, the cluster has {found}")
        yield address
    finally:
        for proc in reversed(started):
            _stop(proc)
