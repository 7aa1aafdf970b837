"""One optimizer step and checkpoints, on the actor graph (`GraphTrainer`) or in one process
(`LocalTrainer`, the reference and the fallback when there is no Ray).

A graph step (routers are data-parallel ranks, expert actors own their experts' gradients and AdamW):
1. each router runs forward + backward of its rows (`RouterActor.train_step`); the backward sends the
   expert gradients to the expert actors, which accumulate them (a sum over ranks);
2. with several routers the driver fetches their dense gradients, averages them and sends the mean
   back (fine for small models; a collective all-reduce is the scalable version);
3. global norm = sqrt(dense norm² + Σ actors' expert norm² / ranks²), clip scale = min(1, clip / norm);
4. routers step their dense AdamW with that scale, expert actors with scale / ranks (the mean over ranks).

Checkpoints are Hugging Face folders written in place by the owners: router 0 writes the dense
tensors, each expert actor its own experts, the driver config.json, the index and trainer_state.json,
all into `checkpoint-<step>.tmp/`, which is then renamed (atomically) to `checkpoint-<step>/`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from actors.training import (
    DenseTraining,
    decay_groups,
    fsync,
    is_routed_expert,
    load_named_optimizer_state,
    named_optimizer_state,
    save_safetensors,
    step_seed,
)
from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.checkpoint import INDEX_FILE
from model.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

from .config import TrainConfig

DENSE_FILE = "model-dense.safetensors"
STATE_FILE = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
LATEST_FILE = "latest"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def expert_file(index: int) -> str:
    return f"model-experts-{index:05d}.safetensors"


def clip_scale(grad_norm: float, grad_clip: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient."""
    if grad_clip is None:
        return 1.0
    return min(1.0, grad_clip / (grad_norm + 1e-6))


def combine_parts(parts: list[dict[str, Any]], n_learned: int) -> dict[str, Any]:
    """Loss parts of the ranks -> the global batch's loss (token-mean CE + mean balance losses)."""
    ce = sum(p["ce_sum"] for p in parts) / max(n_learned, 1)
    balance = {name: sum(p["balance"][name] for p in parts) / len(parts) for name in parts[0]["balance"]}
    load: dict[int, list[int]] = {}
    for p in parts:
        for layer, counts in p["tokens_per_expert"].items():
            load[layer] = [a + b for a, b in zip(load.get(layer, [0] * len(counts)), counts)]
    return {
        "loss": ce + sum(balance.values()),
        "ce": ce,
        **{f"balance_{name}": value for name, value in balance.items()},
        "dropped_fraction": sum(p["dropped_fraction"] for p in parts) / len(parts),
        "tokens": sum(p["tokens"] for p in parts),
        "learned_tokens": n_learned,
        "expert_load": {str(layer): counts for layer, counts in sorted(load.items())},
    }


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    fsync(tmp)
    os.replace(tmp, path)


def tensor_to_b64(t: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def b64_to_tensor(text: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


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


def write_index(directory: Path, sizes: dict[str, dict[str, int]]) -> None:
    """model.safetensors.index.json over the files the owners wrote (file -> {name: bytes})."""
    weight_map = {name: file for file, names in sizes.items() for name in names}
    total = sum(n for names in sizes.values() for n in names.values())
    write_json_atomic(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


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


def driver_rng_state() -> dict[str, Any]:
    return {"torch": tensor_to_b64(torch.get_rng_state()), "python": repr(random.getstate())}


def restore_driver_rng(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(b64_to_tensor(state["torch"]))
    random.setstate(ast.literal_eval(state["python"]))


# ---- trainers -------------------------------------------------------------------------------------


class Trainer:
    """What jobs/sft.py needs from a trainer."""

    config: TrainConfig
    model_config: DeepseekV2Config

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Weights (HF layout), optimizer states; the caller adds trainer_state.json and renames."""
        raise NotImplementedError

    def load_optimizer(self, checkpoint: Path) -> None:
        raise NotImplementedError

    def rng_states(self) -> list[str]:
        return []

    def set_rng_states(self, states: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class LocalTrainer(Trainer):
    """The whole model in this process: the same dense step as a router, the experts stepped by an
    AdamW of their own exactly as an expert actor does."""

    def __init__(self, config: TrainConfig, model_dir: Path):
        self.config = config
        self.model = DeepseekV2ForCausalLM.from_pretrained(model_dir)
        self.model_config = self.model.config
        self.dense = DenseTraining(self.model, config.schedule.lr, config.betas, config.weight_decay, config.eps, config.dtype)
        self.expert_params = {n: p for n, p in self.model.named_parameters() if is_routed_expert(n)}
        for p in self.expert_params.values():
            p.requires_grad_(True)
        self.expert_optimizer = torch.optim.AdamW(
            list(self.expert_params.values()),
            lr=config.schedule.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
            eps=config.eps,
        ) if self.expert_params else None

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        n_learned = int((labels != -100).sum())
        parts = self.dense.forward_backward(input_ids, labels, 1.0 / max(n_learned, 1), step_seed(self.config.seed, step, 0))
        expert_sq = float(sum(p.grad.double().pow(2).sum() for p in self.expert_params.values() if p.grad is not None))
        grad_norm = math.sqrt(parts["dense_grad_sq"] + expert_sq)
        scale = clip_scale(grad_norm, self.config.grad_clip)
        if self.expert_optimizer is not None:
            for group in self.expert_optimizer.param_groups:
                group["lr"] = lr
            for p in self.expert_params.values():
                if p.grad is not None and scale != 1.0:
                    p.grad.mul_(scale)
            self.expert_optimizer.step()
        self.dense.step(lr, scale)  # also zeroes every gradient of the model
        return {**combine_parts([parts], n_learned), "grad_norm": grad_norm}

    def save(self, directory: Path) -> None:
        sizes = {DENSE_FILE: save_safetensors(self.dense.state_dict(), directory / DENSE_FILE)}
        if self.expert_params:
            sizes[expert_file(0)] = save_safetensors(self.expert_params, directory / expert_file(0))
        write_index(directory, sizes)
        (directory / OPTIMIZER_DIR).mkdir(exist_ok=True)
        self.dense.save_optimizer(directory / OPTIMIZER_DIR / "dense.pt")
        if self.expert_optimizer is not None:
            path = directory / OPTIMIZER_DIR / "experts-00000.pt"
            torch.save(named_optimizer_state(self.expert_optimizer, self.expert_params), path)
            fsync(path)

    def load_optimizer(self, checkpoint: Path) -> None:
        self.dense.load_optimizer([checkpoint / OPTIMIZER_DIR / "dense.pt"])
        if self.expert_optimizer is not None:
            paths = sorted((checkpoint / OPTIMIZER_DIR).glob("experts-*.pt"))
            load_named_optimizer_state(self.expert_optimizer, self.expert_params, paths)

    def rng_states(self) -> list[str]:
        return [tensor_to_b64(torch.get_rng_state())]


class GraphTrainer(Trainer):
    """Routers as data-parallel ranks, expert actors owning their experts' gradients and AdamW."""

    def __init__(self, config: TrainConfig, model_dir: Path, name: str | None = None):
        import ray

        from cluster.graph import ActorGraph
        from cluster.spec import ClusterSpec

        self.ray = ray
        self.config = config
        self.model_config = DeepseekV2Config.from_pretrained(model_dir)
        spec = ClusterSpec(
            model=str(model_dir),
            name=name or f"train-{uuid.uuid4().hex[:8]}",
            routers=config.routers,
            expert_actors=config.expert_actors,
            cpus_per_actor=config.cpus_per_actor,
            cpu_threads_per_actor=config.cpu_threads_per_actor,
            max_restarts=0,  # a restarted actor would have lost its optimizer state: fail the job instead
            max_task_retries=0,
        )
        self.graph = ActorGraph.create(spec)
        self.routers, self.experts = self.graph.routers, self.graph.experts
        ray.get(
            [r.configure_training.remote(config.schedule.lr, config.betas, config.weight_decay, config.eps, config.dtype) for r in self.routers]
            + [e.configure_optimizer.remote(config.schedule.lr, config.betas, config.weight_decay, config.eps) for e in self.experts]
            + [e.set_train_dtype.remote(config.dtype) for e in self.experts]
        )

    def step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, Any]:
        ray, ranks = self.ray, len(self.routers)
        n_learned = int((labels != -100).sum())
        ce_weight = ranks / max(n_learned, 1)
        parts = ray.get([
            router.train_step.remote(ids, lab, ce_weight, step_seed(self.config.seed, step, rank))
            for rank, (router, ids, lab) in enumerate(zip(self.routers, input_ids.chunk(ranks), labels.chunk(ranks)))
        ])
        expert_sq_ref = [e.grad_sq_norm.remote() for e in self.experts]
        if ranks > 1:
            grads = ray.get([r.dense_grads.remote() for r in self.routers])
            mean = {name: sum(g[name] for g in grads) / ranks for name in grads[0]}
            dense_sq = float(sum(g.double().pow(2).sum() for g in mean.values()))
            ray.get([r.set_dense_grads.remote(mean) for r in self.routers])
        else:
            dense_sq = parts[0]["dense_grad_sq"]
        expert_sq = sum(ray.get(expert_sq_ref)) / ranks**2
        grad_norm = math.sqrt(dense_sq + expert_sq)
        scale = clip_scale(grad_norm, self.config.grad_clip)
        ray.get(
            [r.apply_train_step.remote(lr, scale) for r in self.routers]
            + [e.step.remote(lr, scale / ranks) for e in self.experts]
        )
        return {**combine_parts(parts, n_learned), "grad_norm": grad_norm}

    def save(self, directory: Path) -> None:
        ray = self.ray
        (directory / OPTIMIZER_DIR).mkdir(exist_ok=True)
        directory = directory.resolve()
        dense = self.routers[0].save_dense.remote(str(directory / DENSE_FILE))
        experts = [e.save_shard.remote(str(directory / expert_file(i))) for i, e in enumerate(self.experts)]
        optimizers = [self.routers[0].save_dense_optimizer.remote(str(directory / OPTIMIZER_DIR / "dense.pt"))] + [
            e.save_optimizer.remote(str(directory / OPTIMIZER_DIR / f"experts-{i:05d}.pt")) for i, e in enumerate(self.experts)
        ]
        sizes = {DENSE_FILE: ray.get(dense)}
        for i, ref in enumerate(experts):
            sizes[expert_file(i)] = ray.get(ref)
        ray.get(optimizers)
        write_index(directory, sizes)

    def load_optimizer(self, checkpoint: Path) -> None:
        ray = self.ray
        checkpoint = checkpoint.resolve()
        dense = [str(checkpoint / OPTIMIZER_DIR / "dense.pt")]
        experts = [str(p) for p in sorted((checkpoint / OPTIMIZER_DIR).glob("experts-*.pt"))]
        ray.get([r.load_dense_optimizer.remote(dense) for r in self.routers] + [e.load_optimizer.remote(experts) for e in self.experts])

    def rng_states(self) -> list[str]:
        return [tensor_to_b64(t) for t in self.ray.get([r.rng_state.remote() for r in self.routers])]

    def set_rng_states(self, states: list[str]) -> None:
        if len(states) == len(self.routers):
            self.ray.get([r.set_rng_state.remote(b64_to_tensor(s)) for r, s in zip(self.routers, states)])

    def close(self) -> None:
        self.graph.teardown()


def make_trainer(config: TrainConfig, model_dir: Path) -> Trainer:
    return GraphTrainer(config, model_dir) if config.expert_actors > 0 else LocalTrainer(config, model_dir)


def save_checkpoint(trainer: Trainer, run_dir: Path, step: int, data_position: int, model_dir: Path, extra: dict | None = None) -> Path:
    """Everything into checkpoint-<step>.tmp/, trainer_state.json last, then the atomic rename."""
    tmp = run_dir / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    trainer.model_config.model_copy(update={"torch_dtype": "float32"}).save_pretrained(tmp)
    copy_tokenizer(model_dir, tmp)
    trainer.save(tmp)
    state = {
        "step": step,
        "data_position": data_position,
        "seed": trainer.config.seed,
        "rng": {"driver": driver_rng_state(), "routers": trainer.rng_states()},
        "time": time.time(),
        **(extra or {}),
    }
    write_json_atomic(tmp / STATE_FILE, state)
    return finish_checkpoint(run_dir, tmp, step, trainer.config.keep_checkpoints)


def export_model(checkpoint: Path, target: Path) -> None:
    """The model of a checkpoint as a plain HF folder (weights, config, tokenizer; no optimizer)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name != STATE_FILE:
            shutil.copy2(path, target / path.name)
