"""GRPO as a job: `ray job submit`, kill -9 and --resume, `moeray train grpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .local_ray import ray_head
from .training_helpers import ENV, REPO, assert_transformers_loads, straight_and_killed, submit_job

GRPO_SMOKE = REPO / "jobs" / "configs" / "grpo-smoke.yaml"
STEP_METRICS = {
    "reward_mean", "reward_std", "reward_exact_match", "reward_digit_match", "reward_bare_number", "kl",
    "clip_fraction", "entropy", "response_length", "ratio_mean", "mismatch_rate", "logprob_diff_max",
    "rollout_tokens_per_s", "update_tokens_per_s", "grad_norm", "lr", "loss",
}  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_grpo_and_transformers_loads_the_checkpoint(tmp_path):
    run_dir = tmp_path / "grpo-job"
    with ray_head(ENV, REPO) as head:
        submit_job(head, ["python", "-m", "jobs.grpo", "--config", "jobs/configs/grpo-smoke.yaml", "--run-dir", str(run_dir)])
    assert (run_dir / "latest").read_text().strip() == "checkpoint-4"
    assert not list(run_dir.glob("*.tmp"))
    checkpoint = run_dir / "checkpoint-4"
    assert (checkpoint / "reference" / "model-dense.safetensors").exists()  # β > 0: the reference is kept
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    assert STEP_METRICS <= set(records(run_dir)[0])
    assert (run_dir / "training.png").stat().st_size > 0
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["multi_turn"]["n"] == 8 and evaluation["single_turn"]["n"] == 8
    assert_transformers_loads(checkpoint)


@pytest.mark.timeout(600)
def test_kill_9_then_resume_gets_the_rewards_of_an_uninterrupted_run(ray_cluster, tmp_path):
    env = {**ENV, "RAY_ADDRESS": ray_cluster}
    common = ["--steps", "6", "--set", "plot=false", "--set", "checkpoint_every=2"]
    last = straight_and_killed("jobs.grpo", GRPO_SMOKE, common, tmp_path, env, kill_after=2, steps=6, timeout_s=400)
    killed_dir = tmp_path / "killed"
    expected, got = records(tmp_path / "straight"), records(killed_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(expected[last:], got[last:]):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length"] == b["response_length"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)


@pytest.mark.timeout(300)
def test_moeray_train_grpo_runs_the_job(ray_cluster, tmp_path):
    """(Its user mistakes are one line: tests/test_entry_points.py.)"""
    from cli.main import main

    run_dir = tmp_path / "cli-run"
    assert main(["train", "grpo", "--config", str(GRPO_SMOKE), "--steps", "1", "--run-dir", str(run_dir),
                 "--set", "plot=false", "--set", "eval.conversations=0", "--set", "eval.single_turn=0"]) == 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-1"
    assert json.loads((run_dir / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1
    task = json.loads((run_dir / "checkpoint-1" / "arith_task.json").read_text())
    assert task["multi_turn"] is True  # what GRPO on conversations teaches (moeray quickstart reads it)
