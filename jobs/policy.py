"""The GRPO update over a trainer's parameters: on the actor graph (`GraphPolicy`) or in one process
(`LocalPolicy`, the reference the graph is tested against).

The policy is the trainer's model, updated in place: each router runs `model.grpo.policy_backward` on
its share of the outputs (the expert backward accumulates into the expert actors) and then the update
every SFT step takes (gradients averaged over the routers, clip to the global norm, AdamW on every
owner; `RouterActor._update`, or `LocalTrainer.apply_gradients` in one process). The reference π_ref
(β > 0) is a frozen copy held by the same owners (`model.training.ReferenceWeights`) and swapped in
place for a reference forward, so reference log-probs take the policy's own path through the graph.
A checkpoint keeps the reference in `reference/` (it differs from the policy after the first update).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import SINGLE_FILE
from model.grpo import GRPOSettings, PolicyBatch, PolicyParts, policy_backward, policy_logprobs
from model.training import OptimizerUpdate, ReferenceWeights

from .trainer import DENSE_FILE, GraphTrainer, LocalTrainer, expert_file, step_seed

REFERENCE_DIR = "reference"


class Policy:
    """What jobs/grpo.py needs from a policy."""

    trainer: GraphTrainer | LocalTrainer
    settings: GRPOSettings

    def update(self, step: int, batch: PolicyBatch, lr: float) -> tuple[list[PolicyParts], float]:
        """One optimizer step on these outputs: each rank's parts, and the global gradient norm."""
        raise NotImplementedError

    def reference_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_reference(self) -> None:
        raise NotImplementedError

    def save_reference(self, checkpoint: Path) -> None:
        raise NotImplementedError

    def load_reference(self, checkpoint: Path) -> None:
        raise NotImplementedError

    @property
    def has_reference(self) -> bool:
        return self.settings.beta > 0


class GraphPolicy(Policy):
    """Routers are data-parallel ranks over the outputs; expert actors own their experts' gradients."""

    def __init__(self, trainer: GraphTrainer, settings: GRPOSettings):
        self.trainer, self.settings = trainer, settings
        self.ray = trainer.ray
        self.owners = [*trainer.routers, *trainer.experts]
        if self.has_reference:
            self.ray.get([owner.configure_reference.remote() for owner in self.owners])

    def update(self, step: int, batch: PolicyBatch, lr: float) -> tuple[list[PolicyParts], float]:
        routers, config = self.trainer.routers, self.trainer.config
        shards = torch.arange(len(batch.input_ids)).tensor_split(len(routers))
        output_weight = len(routers) / len(batch.input_ids)  # the ranks' mean gradient is the outputs' mean
        update = OptimizerUpdate(lr=lr, grad_clip=config.grad_clip)
        parts: list[PolicyParts] = self.ray.get([
            router.policy_step.remote(batch.rows(rows), self.settings, output_weight, step_seed(config.seed, step, rank), update)
            for rank, (router, rows) in enumerate(zip(routers, shards))
        ])
        return parts, parts[0].grad_norm

    def reference_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Every owner swaps the reference in, the routers compute, every owner swaps the policy back."""
        ray, routers = self.ray, self.trainer.routers
        ray.get([owner.use_reference.remote(True) for owner in self.owners])
        try:
            shards = zip(input_ids.tensor_split(len(routers)), targets.tensor_split(len(routers)))
            return torch.cat(ray.get([r.logprobs.remote(ids, tgt) for r, (ids, tgt) in zip(routers, shards)]))
        finally:
            ray.get([owner.use_reference.remote(False) for owner in self.owners])

    def reset_reference(self) -> None:
        self.ray.get([owner.reset_reference.remote() for owner in self.owners])

    def save_reference(self, checkpoint: Path) -> None:
        """Router 0 writes the reference's dense tensors, each expert actor its experts, as in SFT."""
        directory = (checkpoint / REFERENCE_DIR).resolve()
        directory.mkdir()
        refs = [self.trainer.routers[0].save_reference.remote(str(directory / DENSE_FILE))] + [
            expert.save_reference.remote(str(directory / expert_file(i))) for i, expert in enumerate(self.trainer.experts)
        ]
        self.ray.get(refs)

    def load_reference(self, checkpoint: Path) -> None:
        directory = str((checkpoint / REFERENCE_DIR).resolve())
        self.ray.get([owner.load_reference.remote(directory) for owner in self.owners])


class LocalPolicy(Policy):
    """The whole model in this process: one rank, the experts stepped by their own AdamW."""

    def __init__(self, trainer: LocalTrainer, settings: GRPOSettings):
        self.trainer, self.settings = trainer, settings
        params = dict(trainer.model.named_parameters())
        self.reference = ReferenceWeights(params) if self.has_reference else None

    def update(self, step: int, batch: PolicyBatch, lr: float) -> tuple[list[PolicyParts], float]:
        config = self.trainer.config
        seed = step_seed(config.seed, step, 0)
        parts = policy_backward(self.trainer.model, batch, self.settings, 1.0 / len(batch.input_ids), seed, config.dtype)
        return [parts], self.trainer.apply_gradients(lr)

    def reference_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.reference.use(True)
        try:
            return policy_logprobs(self.trainer.model, input_ids, targets, self.trainer.config.dtype)
        finally:
            self.reference.use(False)

    def reset_reference(self) -> None:
        self.reference.reset()

    def save_reference(self, checkpoint: Path) -> None:
        (checkpoint / REFERENCE_DIR).mkdir()
        self.reference.save(checkpoint / REFERENCE_DIR / SINGLE_FILE)

    def load_reference(self, checkpoint: Path) -> None:
        self.reference.load(checkpoint / REFERENCE_DIR)


def policy_metrics(parts: list[PolicyParts]) -> dict[str, float]:
    """The ranks' parts of one update -> its loss (−mean objective + mean balance losses) and token
    means: KL, share of clipped tokens, ratio, entropy; the routing mismatch rate (replay off)."""
    outputs = sum(p.outputs for p in parts)
    tokens = max(sum(p.response_tokens for p in parts), 1)
    routed = sum(p.routed_tokens for p in parts)
    balance = {name: sum(p.balance[name] for p in parts) / len(parts) for name in parts[0].balance}
    objective = sum(p.objective_sum for p in parts) / outputs
    return {
        "loss": -objective + sum(balance.values()),
        "objective": objective,
        **{f"balance_{name}": value for name, value in balance.items()},
        "kl": sum(p.kl_sum for p in parts) / tokens,
        "clip_fraction": sum(p.clipped_tokens for p in parts) / tokens,
        "ratio_mean": sum(p.ratio_sum for p in parts) / tokens,
        "entropy": sum(p.entropy_sum for p in parts) / tokens,
        "mismatch_rate": sum(p.mismatched_tokens for p in parts) / routed if routed else 0.0,
    }
