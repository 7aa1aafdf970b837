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
from contextlib import contextmanager, suppress
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


START_ATTEMPTS = 3


@contextmanager
def ray_head(env: dict, cwd: Path, num_cpus: int = 4) -> Iterator[RayHead]:
    """Start a head (logical CPUs `num_cpus`) in `cwd` with `env`; yield once its job API answers.

    A port chosen free can be taken by another process before Ray binds it (the machine runs other
    clusters): a head that exits while starting is started again on fresh ports, and what the last
    one printed is in the failure."""
    for attempt in range(1, START_ATTEMPTS + 1):
        temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
        head, port, url = start_head(env, cwd, num_cpus, temp_dir)
        try:
            if answers_jobs(head, url, env):
                yield RayHead(f"127.0.0.1:{port}", url, env, cwd)
                return
            assert attempt < START_ATTEMPTS, (
                f"ray start exited {START_ATTEMPTS} times; the last printed:\n{tail(Path(temp_dir) / 'ray-start.log')}")
        finally:
            stop_process_group(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def start_head(env: dict, cwd: Path, num_cpus: int, temp_dir: str) -> tuple[subprocess.Popen, int, str]:
    port, dashboard = free_port(), free_port()
    own_ports = [f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS]
    with open(Path(temp_dir) / "ray-start.log", "wb") as log:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *own_ports],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return head, port, f"http://127.0.0.1:{dashboard}"


def answers_jobs(head: subprocess.Popen, url: str, env: dict, timeout_s: float = 120) -> bool:
    """True once the head's job API answers, False if `ray start` exits first."""
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["ray", "job", "list", "--address", url], env=env, capture_output=True,
                         timeout=60).returncode:
        if head.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the dashboard never came up"
        time.sleep(1)  # polling the job API: nothing announces that the dashboard is up
    return True


def tail(path: Path, lines: int = 40) -> str:
    with suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(nothing)"


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


def private_ray_env(prefix: str) -> tuple[dict, Path]:
    """The environment of a command that starts its own (embedded) Ray cluster as a new user's would:
    no RAY_ADDRESS, no RAY_AUTH_MODE (moeray chooses), and a private RAY_TMPDIR that every process of
    that cluster inherits, so `processes_of` finds them, and nobody else's."""
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, "RAY_TMPDIR": str(temp_dir)}, temp_dir


def processes_of(ray_temp_dir: Path, session: int) -> dict[int, str]:
    """pid -> command line of the processes still running whose environment names `ray_temp_dir` as
    RAY_TMPDIR or that belong to the process group `session` (Ray renames its agents' command lines,
    ray::DashboardAgent and the like, but keeps both)."""
    marker = f"RAY_TMPDIR={ray_temp_dir}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ours = marker in (entry / "environ").read_bytes().split(b"\0") or os.getpgid(int(entry.name)) == session
            if ours and (entry / "stat").read_text().split(") ")[-1][0] != "Z":  # a zombie is gone, not reaped
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):  # it ended while we looked
            continue
    return found


def left_behind(ray_temp_dir: Path, session: int, timeout_s: float = 60) -> dict[int, str]:
    """`processes_of` once none is left or, after `timeout_s`, what is still there (then killed, so a
    failing test leaves nothing either)."""
    deadline = time.monotonic() + timeout_s
    while (found := processes_of(ray_temp_dir, session)) and time.monotonic() < deadline:
        time.sleep(0.5)  # polling /proc: no event says that an unrelated process has exited
    for pid in found:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_temp_dir, ignore_errors=True)
    return found
