"""Training when a process of its graph dies, and checkpoints that cannot be read: a killed expert
actor costs the steps since the newest checkpoint, never the run; a crash while a checkpoint is written
leaves the previous one whole; a truncated or corrupt file is an error naming it, and nothing is
half-loaded; a bad job config is one line naming the key."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from cluster.graph import NAMESPACE
from jobs.config import ConfigError, load_config
from jobs.sft import prepare_run_dir, train, write_init
from jobs.trainer import (
    GraphTrainer,
    LocalTrainer,
    latest_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from model import DeepseekV2ForCausalLM
from model.checkpoint import CheckpointError
from model.training import NamedAdamW

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"


def smoke(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"run_dir={tmp_path / 'run'}", "plot=false", *overrides])


def kill_an_expert_actor_once(run_dir: Path, after_checkpoint: int, deadline_s: float = 300) -> threading.Thread:
    """In the background: once checkpoint-`after_checkpoint` exists, kill expert actor 1 of the run's
    graph (the steps run back to back, so the kill lands in a step)."""

    def kill() -> None:
        deadline = time.monotonic() + deadline_s
        while not (run_dir / f"checkpoint-{after_checkpoint}" / "trainer_state.json").exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith("train-") and a["name"].endswith("-expert-1")]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0], namespace=NAMESPACE), no_restart=True)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


@pytest.mark.timeout(400)
def test_an_expert_actor_killed_mid_run_resumes_from_the_newest_checkpoint(ray_cluster, tmp_path):
    config = smoke(tmp_path, "steps=8", "checkpoint_every=2")
    killer = kill_an_expert_actor_once(Path(config.run_dir), after_checkpoint=4)
    result = train(config)
    killer.join(timeout=10)
    assert result["failures"] == 1 and result["steps"] == 8
    assert result["wall_seconds"] > result["train_seconds"]  # the job's wall: graphs, both attempts, evaluation
    records = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # steps past the checkpoint were run again, once
    final = Path(result["checkpoint"])
    assert final.name == "checkpoint-8" and DeepseekV2ForCausalLM.from_pretrained(final) is not None


@pytest.mark.timeout(300)
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(ray_cluster, tmp_path):
    config = smoke(tmp_path, "expert_actors=2")
    run_dir = prepare_run_dir(config, resume=False, overwrite=False)
    folder = write_init(config, tmp_path / "init")
    trainer = GraphTrainer(config, folder, name="train-crash")
    batch = torch.randint(3, 100, (config.batch_size, config.seq_len), generator=torch.Generator().manual_seed(0))
    try:
        trainer.step(0, batch, batch, 1e-3)
        previous = save_checkpoint(trainer, run_dir, 1, 8, folder)
        trainer.step(1, batch, batch, 1e-3)
        ray.kill(trainer.experts[1], no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):
            save_checkpoint(trainer, run_dir, 2, 16, folder)
    finally:
        trainer.close()
    partial = run_dir / "checkpoint-2.tmp"
    assert (partial / "model-dense.safetensors").exists() and not (partial / "trainer_state.json").exists()
    assert not (run_dir / "checkpoint-2").exists() and (run_dir / "latest").read_text().strip() == previous.name
    assert latest_checkpoint(run_dir) == previous
    local = LocalTrainer(config, previous)  # the previous checkpoint loads whole: weights, optimizer, RNG
    restore_training_state(local, previous)
    prepare_run_dir(config, resume=True, overwrite=False)
    assert not partial.exists()  # a resumed run clears what the crash left


def test_truncated_or_corrupt_checkpoint_files_are_named_and_nothing_is_half_loaded(tmp_path):
    source = REPO / "checkpoints" / "arith-tiny"
    cases = {
        "model-experts-00001.safetensors": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "model-dense.safetensors": lambda p: p.write_bytes(b"\x00" * 64),
        "config.json": lambda p: p.write_text('{"vocab_size": 128, '),
        "model.safetensors.index.json": lambda p: p.write_text("[]"),
    }
    for name, damage in cases.items():
        folder = tmp_path / name
        shutil.copytree(source, folder)
        damage(folder / name)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as caught:
            DeepseekV2ForCausalLM.from_pretrained(folder)
        assert "\n" not in str(caught.value)
    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    (missing / "model-experts-00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-experts-00000.safetensors"):
        DeepseekV2ForCausalLM.from_pretrained(missing)

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = NamedAdamW({"w": param}, load_config(SMOKE).adamw())
    param.grad = torch.ones(3)
    optimizer.step(1e-3, 1.0)
    good, corrupt = tmp_path / "good.pt", tmp_path / "corrupt.pt"
    optimizer.save(good)
    corrupt.write_bytes(good.read_bytes()[:40])
    fresh = NamedAdamW({"w": torch.nn.Parameter(torch.ones(3))}, load_config(SMOKE).adamw())
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        fresh.load([good, corrupt])
    assert not fresh.optimizer.state  # the readable file was not applied either


def test_job_config_errors_are_one_line_naming_the_key(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1\n")
    cases = [
        ((SMOKE, ["no_such_key=1"]), "no_such_key: unknown key"),
        ((SMOKE, ["moe.alpha9=1"]), "moe.alpha9: unknown key"),
        ((SMOKE, ["steps=0"]), "steps: "),
        ((SMOKE, ["schedule.kind=weird"]), "schedule.kind: "),
        ((SMOKE, ["model.init=/no/such/folder"]), "model.init: /no/such/folder"),
        ((SMOKE, ["data.source=file", f"data.path={tmp_path / 'none.jsonl'}"]), "data.path: "),
        ((tmp_path / "absent.yaml", []), "absent.yaml: no such config file"),
        ((broken, []), "broken.yaml: not valid YAML"),
    ]
    for args, expected in cases:
        with pytest.raises(ConfigError) as caught:
            load_config(*args)
        message = str(caught.value)
        assert message.startswith(expected) or expected in message, (args, message)
        assert "\n" not in message, message
