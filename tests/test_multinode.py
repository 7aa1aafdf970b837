"""A graph over three simulated nodes: same tokens on both transports, load reported per node, a lost
node costs no request and changes no token, and training survives a lost node by resuming from its
newest checkpoint (tests/multinode_scenario.py, in a process of its own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from .reference import CONFIG_B, random_model

    folder = tmp_path_factory.mktemp("multinode-model")
    random_model(CONFIG_B, seed=5).save_pretrained(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    runs = tmp_path_factory.mktemp("multinode-runs")
    done = subprocess.run([sys.executable, "-m", "tests.multinode_scenario", str(folder), str(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["objectstore", "socket", "compiled"])
def test_tokens_equal_one_process_across_three_nodes(report, transport):
    spread = report["spread"]
    assert spread["actor_nodes_distinct"] == 3  # STRICT_SPREAD: router and 2 expert actors on 3 nodes
    assert spread[transport]["tokens_equal"]
    assert spread[transport]["nodes_with_tokens"] == 2  # the load statistics see both experts' nodes


@pytest.mark.timeout(600)
def test_losing_a_node_mid_generation_changes_no_token(report):
    loss = report["node_loss"]
    assert "skipped" not in loss, loss
    assert loss["tokens_equal"]
    assert loss["experts_left_the_lost_node"]
    print(f"generation with a node lost: {loss['with_node_loss_s']} s (undisturbed {loss['undisturbed_s']} s)")


@pytest.mark.timeout(600)
def test_training_resumes_from_its_newest_checkpoint_after_losing_a_node(report):
    loss = report["training_node_loss"]
    assert "skipped" not in loss and "hung" not in loss, loss
    assert loss["failures"] == 1  # the run saw the loss and resumed once, on the surviving nodes
    assert loss["steps"] == 60 and loss["losses_equal"]
    print(f"training with a node lost finished {loss['finished_s_after_the_loss']} s after the loss "
          f"(an undisturbed run trains for {loss['undisturbed_run_s']} s)")


@pytest.mark.timeout(600)
def test_the_default_gpu_share_fits_gpus_spread_over_nodes(report):
    gpus = report["gpus"]
    assert gpus["created"], gpus
    assert gpus["gpus_per_actor"] == 0.5  # 3 actors on 2 one-GPU nodes: 2 per GPU, not 2/3 of one each
    assert gpus["actors_with_a_gpu"] == 3
