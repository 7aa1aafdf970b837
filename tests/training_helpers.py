"""What the training-job tests share (SFT and GRPO): the smoke config and its init folder, jobs run as
subprocesses, kill -9 at a checkpoint, a real `ray start` cluster for `ray job submit`, and the check
that transformers loads a checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from jobs.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def smoke_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(SMOKE, [f"run_dir={tmp_path}", *overrides])


def init_folder(config: TrainConfig, directory: Path) -> Path:
    from jobs.sft import write_init

    return write_init(config, directory)


def run_job(module: str, config: Path, args: list[str], env: dict) -> subprocess.Popen:
    """`python -m <module> --config <config> <args>` with stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", module, "--config", str(config), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_9_after_checkpoint(job: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 240) -> int:
    """SIGKILL the job once checkpoint-<step> is complete; returns the newest complete checkpoint's step."""
    deadline = time.monotonic() + timeout_s
    while not (run_dir / f"checkpoint-{step}" / "trainer_state.json").exists():  # poll for the file
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    return max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if not p.name.endswith(".tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_job_cluster() -> Iterator[str]:
    """A real `ray start --head` cluster with its dashboard; yields the address `ray job submit` takes.
    The cluster's processes are ours alone and are stopped by process group (never `ray stop`)."""
    port, dashboard = free_port(), free_port()
    # Every port of our own: other clusters on this machine hold the defaults (52365 for the job agent).
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats", *own_ports],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while subprocess.run(["ray", "job", "list", "--address", address], env=ENV, capture_output=True, timeout=60).returncode:
            assert head.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the dashboard never came up"
            time.sleep(1)
        yield address
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(address: str, entrypoint: list[str], timeout_s: float = 420) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- <entrypoint>`, waiting for the job; asserts it succeeded."""
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), "--", *entrypoint]
    deadline = time.monotonic() + 60
    while True:
        job = subprocess.run(submit, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s)
        if job.returncode == 0 or "No available agent" not in job.stderr + job.stdout:
            break
        assert time.monotonic() < deadline, "the dashboard's job agent never came up"
        time.sleep(2)  # the head's dashboard answers before its job agent has registered
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout
    return job


def assert_transformers_loads(checkpoint: Path) -> None:
    """transformers' DeepseekV2ForCausalLM loads the folder and computes our logits."""
    import transformers

    from model import DeepseekV2ForCausalLM

    ours = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
