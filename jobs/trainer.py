"""One optimizer step and checkpoints, on the actor graph (`GraphTrainer`) or in one process
(`LocalTrainer`, the reference and the fallback when there is no Ray).

A graph step is one call per router (`RouterActor.train_step`: routers are data-parallel ranks, expert
actors own their experts' gradients and AdamW), and the driver sends nothing else:
1. each router runs forward + backward of its rows; the backward sends the expert gradients to the
   expert actors, which accumulate them (a sum over ranks);
2. the routers average their dense gradients with an all-reduce (torch.distributed, set up by
   `ActorGraph.init_data_parallel`);
3. global norm = sqrt(dense norm² + Σ actors' expert norm² / ranks²), clip scale = min(1, clip / norm);
4. routers step their dense AdamW with that scale, and each router steps its share of the expert actors
   with scale / ranks (the mean over ranks).
Every owner steps with the same `model.training.NamedAdamW`; the one-process trainer holds two of them
(dense, experts), so its step and its checkpoints are the graph's with one rank and one expert actor.

Checkpoints are Hugging Face folders written in place by the owners: router 0 writes the dense
tensors, each expert actor its own experts, the driver config.json, the index, the RNG states
(`rng_state.pt`, tensors) and, last, trainer_state.json, all into `checkpoint-<step>.tmp/`, which is
then renamed (atomically) to `checkpoint-<step>/`.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.checkpoint import fsync, read_torch_file, write_index, write_json_atomic, write_shard
from model.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from model.training import (
    NamedAdamW,
    OptimizerUpdate,
    StepParts,
    clip_scale,
    dense_parameters,
    dense_state_dict,
    is_routed_expert,
    learned_tokens,
    next_token_backward,
)

from .config import RunConfig

DENSE_FILE = "model-dense.safetensors"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.pt"
OPTIMIZER_DIR = "optimizer"
DENSE_OPTIMIZER_FILE = "dense.pt"
LATEST_FILE = "latest"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def expert_file(index: int) -> str:
    return f"model-experts-{index:05d}.safetensors"


def expert_optimizer_file(index: int) -> str:
    return f"experts-{index:05d}.pt"


def expert_optimizer_files(checkpoint: Path) -> list[Path]:
    """Every expert actor's AdamW state in a checkpoint: each owner picks its parameters' out of all."""
    return sorted((checkpoint / OPTIMIZER_DIR).glob("experts-*.pt"))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank's forward at one step (token dropping draws its exempt sequences
    from torch's global RNG): a pure function of the step, so a resumed run draws the same."""
    return (seed * 1_000_003 + step) * 1024 + rank


def combine_parts(parts: list[StepParts], n_learned: int) -> dict[str, Any]:
    """Loss parts of the ranks -> the global batch's loss (token-mean CE + mean balance losses)."""
    ce = sum(p.ce_sum for p in parts) / max(n_learned, 1)
    balance = {name: sum(p.balance[name] for p in parts) / len(parts) for name in parts[0].balance}
    load: dict[int, list[int]] = {}
    for p in parts:
        for layer, counts in p.tokens_per_expert.items():
            load[layer] = [a + b for a, b in zip(load.get(layer, [0] * len(counts)), counts)]
    return {
        "loss": ce + sum(balance.values()),
        "ce": ce,
        **{f"balance_{name}": value for name, value in balance.items()},
        "dropped_fraction": sum(p.dropped_fraction for p in parts) / len(parts),
        "tokens": sum(p.tokens for p in parts),
        "learned_tokens": n_learned,
        "expert_load": {str(layer): counts for layer, counts in sorted(load.items())},
        "grad_norm": parts[0].grad_norm,  # every rank computed the same global norm
        "seconds": {phase: sum(p.seconds.get(phase, 0.0) for p in parts) / len(parts) for phase in parts[0].seconds},
    }


# ---- checkpoint folders ---------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from .tmp, with trainer_state.json), oldest first."""
    found = []
    if run_dir.exists():
        for path in run_dir.iterdir():
            match = CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and (path / STATE_FILE).exists():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def finish_checkpoint(run_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the finished .tmp folder into place, point `latest` at it, drop old checkpoints."""
    final = run_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    dir_fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    os.rename(tmp, final)
    (run_dir / (LATEST_FILE + ".tmp")).write_text(final.name + "\n")
    os.replace(run_dir / (LATEST_FILE + ".tmp"), run_dir / LATEST_FILE)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files, and the task description of a synthetic-task model (arith_task.json)."""
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "arith_task.json"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def save_rng_states(path: Path, router_states: list[torch.Tensor]) -> None:
    """The driver's torch and Python RNG states and each router's torch state, as tensors."""
    _, python_state, gauss_next = random.getstate()
    states = {
        "driver.torch": torch.get_rng_state(),
        "driver.python": torch.tensor(python_state, dtype=torch.int64),
        "driver.python_gauss": torch.tensor([] if gauss_next is None else [gauss_next], dtype=torch.float64),
        **{f"router.{rank}.torch": state for rank, state in enumerate(router_states)},
    }
    torch.save(states, path)
    fsync(path)


def load_rng_states(path: Path) -> list[torch.Tensor]:
    """Restore the driver's RNG states; returns the routers' (by rank)."""
    states = read_torch_file(path)
    torch.set_rng_state(states["driver.torch"])
    gauss = states["driver.python_gauss"].tolist()
    random.setstate((random.Random.VERSION, tuple(states["driver.python"].tolist()), gauss[0] if gauss else None))
    ranks = sum(name.startswith("router.") for name in states)
    return [states[f"router.{rank}.torch"] for rank in range(ranks)]


# ---- trainers -------------------------------------------------------------------------------------


class Trainer:
    """What jobs/sft.py needs from a trainer."""

    config: RunConfig
    model_config: DeepseekV2Config

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Weights (HF layout), optimizer states; the caller adds trainer_state.json and renames."""
        raise NotImplementedError

    def load_optimizer(self, checkpoint: Path) -> None:
        raise NotImplementedError

    def rng_states(self) -> list[torch.Tensor]:
        """The torch RNG state of each rank that is not this process (the driver's is saved anyway)."""
        return []

    def set_rng_states(self, states: list[torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass


class LocalTrainer(Trainer):
    """The whole model in this process: the dense parameters stepped as a router steps them, the
    experts by an optimizer of their own exactly as an expert actor steps them."""

    def __init__(self, config: RunConfig, model_dir: Path):
        self.config = config
        self.model = DeepseekV2ForCausalLM.from_pretrained(model_dir)
        self.model_config = self.model.config
        settings = config.adamw()
        self.dense = NamedAdamW(dense_parameters(self.model), settings)
        expert_params = {n: p for n, p in self.model.named_parameters() if is_routed_expert(n)}
        self.experts = NamedAdamW(expert_params, settings) if expert_params else None
        self.owners = [owner for owner in (self.dense, self.experts) if owner is not None]

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        n_learned = learned_tokens(labels)
        seed = step_seed(self.config.seed, step, 0)
        parts = next_token_backward(self.model, input_ids, labels, 1.0 / max(n_learned, 1), seed, self.config.dtype)
        update_started = time.perf_counter()
        grad_norm = self.apply_gradients(lr)
        seconds = {**parts.seconds, "update": time.perf_counter() - update_started}
        return combine_parts([parts.model_copy(update={"grad_norm": grad_norm, "seconds": seconds})], n_learned)

    def apply_gradients(self, lr: float) -> float:
        """The optimizer step after a backward, whatever the loss (SFT's, GRPO's): clip to the global
        norm, step both optimizers as a router and an expert actor step theirs; returns the norm."""
        grad_norm = math.sqrt(sum(owner.grad_sq_norm() for owner in self.owners))
        scale = clip_scale(grad_norm, self.config.grad_clip)
        for owner in self.owners:
            owner.step(lr, scale)
        return grad_norm

    def save(self, directory: Path) -> None:
        (directory / OPTIMIZER_DIR).mkdir(exist_ok=True)
        sizes = {DENSE_FILE: write_shard(dense_state_dict(self.model), directory / DENSE_FILE)}
        self.dense.save(directory / OPTIMIZER_DIR / DENSE_OPTIMIZER_FILE)
        if self.experts is not None:
            sizes[expert_file(0)] = write_shard(self.experts.params, directory / expert_file(0))
            self.experts.save(directory / OPTIMIZER_DIR / expert_optimizer_file(0))
        write_index(directory, sizes)

    def load_optimizer(self, checkpoint: Path) -> None:
        self.dense.load([checkpoint / OPTIMIZER_DIR / DENSE_OPTIMIZER_FILE])
        if self.experts is not None:
            self.experts.load(expert_optimizer_files(checkpoint))


class GraphTrainer(Trainer):
    """Routers as data-parallel ranks, expert actors owning their experts' gradients and AdamW."""

    def __init__(self, config: RunConfig, model_dir: Path, name: str | None = None):
        import ray

        from cluster.graph import ActorGraph
        from cluster.spec import ClusterSpec, graph_fields

        self.ray = ray
        self.config = config
        self.model_config = DeepseekV2Config.from_pretrained(model_dir)
        spec = ClusterSpec(
            model=str(model_dir),
            name=name or f"train-{uuid.uuid4().hex[:8]}",
            dtype="float32",  # the weights an optimizer steps; config.dtype is the autocast dtype of the steps
            max_restarts=0,  # a restarted actor would have lost its optimizer state: fail the job instead
            max_task_retries=0,
            **graph_fields(config),
        )
        self.graph = ActorGraph.create(spec)
        self.graph.init_data_parallel()
        self.routers, self.experts = self.graph.routers, self.graph.experts
        settings = config.adamw()
        ray.get([owner.configure_training.remote(settings, config.dtype) for owner in [*self.routers, *self.experts]])

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        ranks = len(self.routers)
        n_learned = learned_tokens(labels)
        ce_weight = ranks / max(n_learned, 1)
        update = OptimizerUpdate(lr=lr, grad_clip=self.config.grad_clip)
        parts: list[StepParts] = self.ray.get([
            router.train_step.remote(ids, lab, ce_weight, step_seed(self.config.seed, step, rank), update)
            for rank, (router, ids, lab) in enumerate(zip(self.routers, input_ids.chunk(ranks), labels.chunk(ranks)))
        ])
        return combine_parts(parts, n_learned)

    def save(self, directory: Path) -> None:
        ray = self.ray
        (directory / OPTIMIZER_DIR).mkdir(exist_ok=True)
        directory = directory.resolve()
        dense = self.routers[0].save_dense.remote(str(directory / DENSE_FILE))
        experts = [e.save_shard.remote(str(directory / expert_file(i))) for i, e in enumerate(self.experts)]
        optimizers = [self.routers[0].save_dense_optimizer.remote(str(directory / OPTIMIZER_DIR / DENSE_OPTIMIZER_FILE))] + [
            e.save_optimizer.remote(str(directory / OPTIMIZER_DIR / expert_optimizer_file(i))) for i, e in enumerate(self.experts)
        ]
        sizes = {DENSE_FILE: ray.get(dense)}
        for i, ref in enumerate(experts):
            sizes[expert_file(i)] = ray.get(ref)
        ray.get(optimizers)
        write_index(directory, sizes)

    def load_optimizer(self, checkpoint: Path) -> None:
        ray = self.ray
        checkpoint = checkpoint.resolve()
        dense = [str(checkpoint / OPTIMIZER_DIR / DENSE_OPTIMIZER_FILE)]
        experts = [str(p) for p in expert_optimizer_files(checkpoint)]
        ray.get([r.load_dense_optimizer.remote(dense) for r in self.routers] + [e.load_optimizer.remote(experts) for e in self.experts])

    def rng_states(self) -> list[torch.Tensor]:
        return self.ray.get([r.rng_state.remote() for r in self.routers])

    def set_rng_states(self, states: list[torch.Tensor]) -> None:
        if len(states) == len(self.routers):  # another number of ranks draws from fresh streams
            self.ray.get([r.set_rng_state.remote(state) for r, state in zip(self.routers, states)])

    def close(self) -> None:
        self.graph.teardown()


def lost_an_actor(error: BaseException) -> bool:
    """Whether a step or a checkpoint write failed because a process of the graph died (also when
    another actor saw it die: Ray then wraps the death in that actor's task error)."""
    import ray

    while error is not None:
        if isinstance(error, ray.exceptions.RayActorError):
            return True
        error = getattr(error, "cause", None)
    return False


def make_trainer(config: RunConfig, model_dir: Path) -> Trainer:
    return GraphTrainer(config, model_dir) if config.expert_actors > 0 else LocalTrainer(config, model_dir)


def save_checkpoint(
    trainer: Trainer,
    run_dir: Path,
    step: int,
    data_position: int,
    tokenizer_dir: Path,
    extra: dict | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Everything into checkpoint-<step>.tmp/ (and what write_more adds there, e.g. GRPO's reference),
    trainer_state.json last, then the atomic rename."""
    tmp = run_dir / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    trainer.model_config.model_copy(update={"torch_dtype": "float32"}).save_pretrained(tmp)
    copy_tokenizer(tokenizer_dir, tmp)
    trainer.save(tmp)
    if write_more is not None:
        write_more(tmp)
    save_rng_states(tmp / RNG_FILE, trainer.rng_states())
    state = {
        "step": step,
        "data_position": data_position,
        "seed": trainer.config.seed,
        "time": time.time(),
        **(extra or {}),
    }
    write_json_atomic(tmp / STATE_FILE, state)
    return finish_checkpoint(run_dir, tmp, step, trainer.config.keep_checkpoints)


def restore_training_state(trainer: Trainer, checkpoint: Path) -> None:
    """Optimizer states and RNG states of a checkpoint (the weights are loaded from it at start-up)."""
    trainer.load_optimizer(checkpoint)
    trainer.set_rng_states(load_rng_states(checkpoint / RNG_FILE))


def export_model(checkpoint: Path, target: Path) -> None:
    """The model of a checkpoint as a plain HF folder (weights, config, tokenizer; no optimizer)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in (STATE_FILE, RNG_FILE):
            shutil.copy2(path, target / path.name)
