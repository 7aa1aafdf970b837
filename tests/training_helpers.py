"""What the training-job tests share (SFT and GRPO): the smoke config and its init folder, jobs run as
subprocesses, kill -9 at a checkpoint, `ray job submit` on a test's own head (tests/local_ray.py), and
the check that transformers loads a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from jobs.config import TrainConfig, load_config

from .local_ray import RayHead

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


def straight_and_killed(module: str, config: Path, args: list[str], run_root: Path, env: dict, kill_after: int,
                        steps: int, timeout_s: float) -> int:
    """The same job twice, side by side: straight through in run_root/straight, and in run_root/killed
    killed with -9 once checkpoint-<kill_after> is written, then resumed; both must finish. Returns the
    step the resumed run started from."""
    straight = run_job(module, config, [*args, "--run-dir", str(run_root / "straight")], env)
    killed_dir = run_root / "killed"
    last = kill_9_after_checkpoint(run_job(module, config, [*args, "--run-dir", str(killed_dir)], env), killed_dir,
                                   kill_after)
    assert last < steps, "the run finished before it was killed"
    resumed = run_job(module, config, [*args, "--run-dir", str(killed_dir), "--resume"], env)
    out, _ = resumed.communicate(timeout=timeout_s)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming from {killed_dir / f'checkpoint-{last}'}" in out
    out, _ = straight.communicate(timeout=timeout_s)
    assert straight.returncode == 0, out[-3000:]
    return last


def submit_job(head: RayHead, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- <entrypoint>` on a test's own head; asserts the job succeeded."""
    job = head.submit(entrypoint, runtime_env_json=json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), working_dir=".")
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
