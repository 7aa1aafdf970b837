"""A real `ray start --head` cluster of the test's own, with its dashboard (the job API, `serve deploy`).

Other Ray clusters may run on the same machine: every port is chosen free, the temp dir is private, and
the cluster is stopped by its process group, never with `ray stop` (which would stop theirs too).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
    "ray-client-server-port", "node-manager-port", "object-manager-port",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the GCS, for ray.init / RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:PORT, for `ray job` and `serve deploy --address`
    env: dict
    cwd: Path

    def submit(self, entrypoint: Sequence[str], runtime_env_json: str | None = None, working_dir: str | None = None,
               timeout: float = 420) -> subprocess.CompletedProcess:
        """`ray job submit` from `cwd` (waiting for the job's end), retried while the head's job agent registers."""
        command = ["ray", "job", "submit", "--address", self.dashboard]
        if working_dir is not None:
            command += ["--working-dir", working_dir]
        if runtime_env_json is not None:
            command += ["--runtime-env-json", runtime_env_json]
        command += ["--", *entrypoint]
        deadline = time.monotonic() + 120
        while True:
            job = subprocess.run(command, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if job.returncode == 0 or "No available agent" not in job.stderr + job.stdout:
                return job
            assert time.monotonic() < deadline, "the dashboard's job agent never came up"
            time.sleep(2)  # the dashboard answers before its job agent has registered


@contextmanager
def ray_head(env: dict, cwd: Path, num_cpus: int = 4) -> Iterator[RayHead]:
    """Start a head (logical CPUs `num_cpus`) in `cwd` with `env`; yield once its job API answers."""
    port, dashboard = free_port(), free_port()
    own_ports = [f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS]
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *own_ports],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while subprocess.run(["ray", "job", "list", "--address", url], env=env, capture_output=True,
                             timeout=60).returncode:
            assert head.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the dashboard never came up"
            time.sleep(1)
        yield RayHead(f"127.0.0.1:{port}", url, env, cwd)
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
