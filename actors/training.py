"""The dense side of one next-token training step, shared by the router actor and the one-process trainer.

`DenseTraining` owns the AdamW state of the parameters held in this process (on a router: everything
but the routed experts, which live on the expert actors and step there). A step is split so a driver
can stand between the backward and the update:

    parts = forward_backward(input_ids, labels, ce_weight, seed)   # loss parts, dense grad norm²
    (driver: average dense grads over routers, sum grad norms², compute the global clip scale)
    step(lr, grad_scale)                                             # AdamW, then zero the grads

The loss on a data-parallel rank is ce_weight · Σ token CE + Σ α-weighted balance losses, with
ce_weight = ranks / (learned tokens of the whole global batch): averaging the ranks' gradients then
gives the gradient of the global token-mean CE plus the mean balance losses, whatever the split.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import DeepseekV2ForCausalLM

IGNORE = -100

AUTOCAST_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def autocast(dtype: str | None):
    """bf16 mixed precision (fp32 master weights and optimizer state) or nothing for fp32."""
    amp = AUTOCAST_DTYPES[dtype or "float32"]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=amp)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank's forward at one step (token dropping draws its exempt sequences
    from torch's global RNG): a pure function of the step, so a resumed run draws the same."""
    return (seed * 1_000_003 + step) * 1024 + rank


def decay_groups(params: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norm scales (1-D)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def save_safetensors(tensors: dict[str, Tensor], path: str | Path) -> dict[str, int]:
    """One safetensors file, flushed to disk; returns name -> bytes (for the checkpoint's index)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync(path)
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


def fsync(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def named_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """AdamW state keyed by parameter name (portable across placements and rank counts)."""
    state = {
        name: {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
        for name, p in params.items()
        if p in optimizer.state
    }
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], paths: list[str | Path]
) -> int:
    """Restore the state of the parameters held here from named state files; returns how many."""
    found = 0
    for path in paths:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for name, state in saved["state"].items():
            if name in params:
                optimizer.state[params[name]] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
                found += 1
    return found


class DenseTraining:
    def __init__(
        self,
        model: DeepseekV2ForCausalLM,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        eps: float = 1e-8,
        dtype: str = "float32",
    ):
        self.model = model
        self.dtype = dtype
        # The parameters held here, minus routed experts (those are the expert backend's to step).
        self.params = {n: p for n, p in model.named_parameters() if not is_routed_expert(n)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(decay_groups(self.params, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def forward_backward(self, input_ids: Tensor, labels: Tensor, ce_weight: float, seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        self.model.train()
        try:
            with torch.enable_grad():
                with autocast(self.dtype):
                    out = self.model(input_ids)
                logits = out.logits.float()
                ce_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
                balance = out.balance_losses
                loss = ce_sum * ce_weight + sum(balance.values(), torch.zeros((), dtype=logits.dtype))
                loss.backward()
        finally:
            self.model.eval()
        config = self.model.config
        tokens = input_ids.numel()
        load = {layer: counts.tolist() for layer, counts in out.tokens_per_expert.items()}
        dispatched = sum(sum(c) for c in load.values())
        assignments = tokens * config.num_experts_per_tok * len(load)
        return {
            "ce_sum": float(ce_sum.detach()),
            "learned_tokens": int((labels != IGNORE).sum()),
            "tokens": tokens,
            "balance": {name: float(value.detach()) for name, value in balance.items()},
            "tokens_per_expert": load,
            "dropped_fraction": 1.0 - dispatched / assignments if assignments else 0.0,
            "dense_grad_sq": self.grad_sq_norm(),
        }

    def grad_sq_norm(self) -> float:
        return float(sum(p.grad.double().pow(2).sum() for p in self.params.values() if p.grad is not None))

    def grads(self) -> dict[str, Tensor]:
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}

    def set_grads(self, grads: dict[str, Tensor]) -> None:
        for name, grad in grads.items():
            self.params[name].grad = grad.to(self.params[name].dtype).clone()

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if grad_scale != 1.0:
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        self.optimizer.step()
        self.zero_grad()

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Dense weights in checkpoint names (a tied lm_head is written once, as transformers does)."""
        tensors = {n: t.detach() for n, t in self.model.state_dict().items() if not is_routed_expert(n)}
        if self.model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return tensors

    def save_optimizer(self, path: str | Path) -> None:
        torch.save(named_optimizer_state(self.optimizer, self.params), path)
        fsync(path)

    def load_optimizer(self, paths: list[str | Path]) -> int:
        return load_named_optimizer_state(self.optimizer, self.params, paths)

    def rng_state(self) -> Tensor:
        return torch.get_rng_state()
