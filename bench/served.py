"""A real `moeray serve` of the benchmark's own: embedded Ray, free loopback ports, stopped by its
process group (never `ray stop`, which would stop every cluster on the machine). And the resident
memory of every process it started."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600


@dataclass
class Served:
    process: subprocess.Popen
    base_url: str
    model: str
    keys: list[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moeray_serve(keys: int = 1, model: Path = PROJECT / "checkpoints" / "tiny-random",
                 expert_actors: int = 2) -> Iterator[Served]:
    """`moeray serve` with `keys` generated API keys; yields once /health answers 200."""
    api_keys = [f"sk-bench-{secrets.token_urlsafe(12)}" for _ in range(keys)]
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", "--model", str(model), "--port", str(port),
               "--grpc-port", str(free_port()), "--expert-actors", str(expert_actors), "--name", f"bench-{os.getpid()}"]
    for key in api_keys:
        command += ["--api-key", key]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(PROJECT)}
    env.pop("RAY_ADDRESS", None)  # its own embedded cluster
    process = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, process)
        yield Served(process, base_url, model.name, api_keys)
    finally:
        stop_group(process)


def wait_healthy(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moeray serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} never became healthy")
        time.sleep(1)


def stop_group(process: subprocess.Popen) -> None:
    """SIGINT (what Ctrl-C sends: `moeray serve` shuts down cleanly), then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # Ray's own processes in the group
    except ProcessLookupError:
        pass


def descendants(root: int) -> list[int]:
    """`root` and every process below it (from /proc: Ray's workers are children of its raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def memory_by_process(root: int) -> dict[int, dict]:
    """Per process under `root`: its name (Ray's workers are ray::RouterActor, ray::ServeReplica:...;
    the task they run now is left out; other processes by the kernel's name, as their command lines
    may be rewritten), resident bytes, and the private part of them (RssAnon:
    without the shared memory of Ray's object store, whose pages count as resident as it fills)."""
    out = {}
    for pid in descendants(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            name = name.split(".")[0] if name.startswith("ray::") else Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                  if line.startswith(("VmRSS:", "RssAnon:"))}
        out[pid] = {"name": name, "rss": fields.get("VmRSS", 0), "anon": fields.get("RssAnon", 0)}
    return out
