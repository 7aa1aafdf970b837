"""The pure-PyTorch pieces of next-token training, shared by the routers, the expert actors and the
one-process trainer (so the optimizer step exists once, whatever process holds the parameters).

A step is a backward, then an update by every owner of parameters with the same clip scale:

    parts = next_token_backward(model, input_ids, labels, ce_weight, seed, dtype)  # loss parts
    (owners: average dense grads over ranks, sum grad norms², grad_scale = clip_scale(norm, clip))
    optimizer.step(lr, grad_scale)                                                  # AdamW, zero grads

The loss on a data-parallel rank is ce_weight · Σ token CE + Σ α-weighted balance losses, with
ce_weight = ranks / (learned tokens of the whole global batch): averaging the ranks' gradients then
gives the gradient of the global token-mean CE plus the mean balance losses, whatever the split.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from .checkpoint import CheckpointError, fsync, load_tensors, read_torch_file, write_shard
from .transformer import DeepseekV2ForCausalLM

IGNORE_INDEX = -100  # the label of a position that is not learned (torch's cross_entropy default)

AUTOCAST_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def autocast(dtype: str, device: torch.device | str = "cpu") -> ContextManager:
    """bf16 mixed precision (fp32 master weights and optimizer state) or nothing for fp32."""
    amp = AUTOCAST_DTYPES[dtype]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp)


def learned_tokens(labels: Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


# ---- which parameters, and their gradients ---------------------------------------------------------


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter but the routed experts (those are stepped by whoever holds them)."""
    return {name: p for name, p in model.named_parameters() if not is_routed_expert(name)}


def dense_state_dict(model: DeepseekV2ForCausalLM) -> dict[str, Tensor]:
    """Dense weights in checkpoint names (a tied lm_head is written once, as transformers does)."""
    tensors = {name: t.detach() for name, t in model.state_dict().items() if not is_routed_expert(name)}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def gradients(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Copies of the gradients (zeros where a parameter has none yet)."""
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in params.items()}


def zero_grads(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def clip_scale(grad_norm: float, grad_clip: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient."""
    if grad_clip is None:
        return 1.0
    return min(1.0, grad_clip / (grad_norm + 1e-6))


def grad_sq_norm(params: Iterable[nn.Parameter]) -> float:
    """Σ grad² in float64, so the norms of several owners add up to the global norm."""
    return float(sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None))


def decay_groups(params: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norm scales (1-D)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---- the optimizer step ----------------------------------------------------------------------------


class AdamWSettings(BaseModel):
    """What an owner of parameters needs to build its AdamW (the lr is given again at every step)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8


class OptimizerUpdate(BaseModel):
    """What every owner of parameters is told at each optimizer step."""

    lr: float
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this; None = no clip")


class NamedAdamW:
    """AdamW over named parameters: the one optimizer step of moeray (routers over their dense
    parameters, expert actors over their experts, the one-process trainer over both).

    `step(lr, grad_scale)` sets the step's learning rate, multiplies the gradients by the caller's
    global clip scale, steps and zeroes the gradients. The state is saved keyed by parameter name, so
    any placement (another number of expert actors or routers) loads back the slice it holds."""

    def __init__(self, params: dict[str, nn.Parameter], settings: AdamWSettings):
        self.params = params
        for p in params.values():
            p.requires_grad_(True)
        # fused: one kernel over all tensors (torch's CPU default loops over them one by one, ~5x slower
        # for a model of many small tensors).
        self.optimizer = torch.optim.AdamW(
            decay_groups(params, settings.weight_decay), lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=True
        )
        self.zero_grad()

    def zero_grad(self) -> None:
        zero_grads(self.params.values())

    def grad_sq_norm(self) -> float:
        return grad_sq_norm(self.params.values())

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if grad_scale != 1.0:
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        self.optimizer.step()
        self.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """AdamW state keyed by parameter name (tensors and plain numbers only)."""
        state = {
            name: {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.optimizer.state[p].items()}
            for name, p in self.params.items()
            if p in self.optimizer.state
        }
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)
        fsync(path)

    def load(self, paths: list[str | Path]) -> int:
        """Take the state of the parameters held here from named state files; returns how many found.
        Every file is read before any state is taken: a file that cannot be read changes nothing."""
        found = 0
        for saved in [load_state_file(path) for path in paths]:
            for name, state in saved["state"].items():
                if name in self.params:
                    param = self.params[name]
                    self.optimizer.state[param] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
                    found += 1
        return found


def load_state_file(path: str | Path) -> dict:
    """An optimizer state file (a {"state": {name: ...}} dict), or a CheckpointError."""
    saved = read_torch_file(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{path}: not an optimizer state (no 'state')")
    return saved


class ReferenceWeights:
    """A frozen copy of named parameters kept by their owner (GRPO's π_ref: a router its dense
    weights, an expert actor its experts). `use(True)` swaps it into the parameters in place, so a
    reference forward runs through the same modules, actors and messages as the policy's, with no
    second model; `use(False)` swaps the policy back. `reset` makes the current policy the reference
    (iterative GRPO)."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.frozen = {name: p.detach().clone() for name, p in params.items()}
        self.in_use = False

    def use(self, reference: bool) -> None:
        if reference == self.in_use:
            return
        for name, param in self.params.items():
            param.data, self.frozen[name] = self.frozen[name], param.data
        self.in_use = reference

    def reset(self) -> None:
        self._check_policy_in_place()
        with torch.no_grad():
            for name, param in self.params.items():
                self.frozen[name].copy_(param)

    def save(self, path: str | Path) -> dict[str, int]:
        """The reference's tensors (checkpoint names) as one safetensors file; returns name -> bytes."""
        return write_shard(self.frozen, path)

    def load(self, directory: str | Path) -> None:
        """Take the reference's tensors from a folder of safetensors (a checkpoint's reference/)."""
        self._check_policy_in_place()
        tensors = load_tensors(directory, self.frozen)
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.frozen[name].copy_(tensor)

    def _check_policy_in_place(self) -> None:
        if self.in_use:
            raise RuntimeError("the reference's weights are in place: use(False) first")


# ---- the dense forward / backward of a next-token step ---------------------------------------------


class StepParts(BaseModel):
    """One rank's share of a step, for the driver to combine into the global batch's loss."""

    ce_sum: float
    learned_tokens: int
    tokens: int
    balance: dict[str, float]
    tokens_per_expert: dict[int, list[int]]
    dropped_fraction: float
    grad_norm: float = 0.0  # the global gradient norm before clipping, filled in by the update
    seconds: dict[str, float] = Field(default_factory=dict)  # wall time by phase: forward, backward, (router) update…


def next_token_backward(
    model: DeepseekV2ForCausalLM, input_ids: Tensor, labels: Tensor, ce_weight: float, seed: int, dtype: str
) -> StepParts:
    """Forward + backward of ce_weight · Σ token CE + Σ balance losses. `seed` seeds torch's global RNG
    first (token dropping draws its exempt sequences from it), so a resumed run draws the same."""
    torch.manual_seed(seed)
    model.train()
    started = time.perf_counter()
    try:
        with torch.enable_grad():
            with autocast(dtype, input_ids.device):
                out = model(input_ids)
            logits = out.logits.float()
            ce_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            balance = out.balance_losses
            loss = ce_sum * ce_weight + sum(balance.values(), torch.zeros((), dtype=logits.dtype))
            forward_done = time.perf_counter()
            loss.backward()
    finally:
        model.eval()
    seconds = {"forward": forward_done - started, "backward": time.perf_counter() - forward_done}
    tokens = input_ids.numel()
    load = {layer: counts.tolist() for layer, counts in out.tokens_per_expert.items()}
    dispatched = sum(sum(c) for c in load.values())
    assignments = tokens * model.config.num_experts_per_tok * len(load)
    return StepParts(
        ce_sum=float(ce_sum.detach()),
        learned_tokens=learned_tokens(labels),
        tokens=tokens,
        balance={name: float(value.detach()) for name, value in balance.items()},
        tokens_per_expert=load,
        dropped_fraction=1.0 - dispatched / assignments if assignments else 0.0,
        seconds=seconds,
    )
