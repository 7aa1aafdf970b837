"""GRPO (DeepSeekMath §4.1; SPEC §5) in pure PyTorch: group-normalised advantages, the clipped ratio
objective with the k3 KL to a reference, and one rank's forward + backward of it.

    J = mean over outputs i of  mean over response tokens t of
        min(ρ_it·Â_i, clip(ρ_it, 1 − ε_low, 1 + ε_high)·Â_i) − β·(π_ref/π_θ − log(π_ref/π_θ) − 1)
    ρ_it = π_θ(o_it | q, o_i<t) / π_θold(o_it | q, o_i<t)

Every log-probability here is the temperature-1 log-softmax of the model's raw logits (fp32), the same
quantity the serving engine reports for a sampled token, so the rollout's log-probs are π_θold as they
are: sampling temperature and top-p shape which tokens are drawn, not the policy being trained.
Routers and the one-process trainer run the same `policy_backward`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .moe import routing_mismatch
from .training import IGNORE_INDEX, autocast
from .transformer import DeepseekV2ForCausalLM


class GRPOSettings(BaseModel):
    """The objective's constants (what a rank needs to compute its share of the loss)."""

    model_config = ConfigDict(extra="forbid")

    clip_eps: float = Field(0.2, gt=0, lt=1, description="ε: the ratio is clipped to [1 − ε, 1 + ε_high]")
    clip_eps_high: float | None = Field(None, gt=0, description="upper clip (DAPO's clip-higher); None = ε")
    beta: float = Field(0.04, ge=0, description="β: weight of the k3 KL to the reference; 0 = no reference")
    routing_replay: bool = Field(True, description="route each token to the experts it had at rollout")

    @property
    def clip_range(self) -> tuple[float, float]:
        return 1.0 - self.clip_eps, 1.0 + (self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)


def group_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-4) -> Tensor:
    """rewards [prompts, G] -> Â [prompts, G] = (r − group mean) / (group std + eps), the std unbiased
    (torch's default, as TRL and verl compute it); eps keeps a group of equal rewards at Â = 0.
    normalize_std=False leaves the rewards only centred (Dr. GRPO)."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(target) [N, S] from logits [N, S, V]; 0 where the target is IGNORE_INDEX."""
    logprobs = logits.float().log_softmax(dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets != IGNORE_INDEX, picked, torch.zeros_like(picked))


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy [N, S] of the temperature-1 next-token distribution."""
    logprobs = logits.float().log_softmax(dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


class GRPOTerms(BaseModel):
    """The objective of each output and the token-level quantities behind it ([N, S], 0 off the mask)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    objective: Tensor  # [N]: token mean of the clipped surrogate − β·KL, per output
    ratio: Tensor
    clipped: Tensor  # bool: the clipped term is the smaller one (the token's gradient is cut)
    kl: Tensor


def grpo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: GRPOSettings,
    ref_logprobs: Tensor | None = None,
) -> GRPOTerms:
    """logprobs, old_logprobs, ref_logprobs, mask [N, S]; advantages [N] (one per output)."""
    low, high = settings.clip_range
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantage = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * advantage
    clipped = ratio.clamp(low, high) * advantage
    per_token = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None and settings.beta > 0:
        log_ref_ratio = ref_logprobs.detach() - logprobs
        kl = log_ref_ratio.exp() - log_ref_ratio - 1
        per_token = per_token - settings.beta * kl
    weights = mask.to(per_token.dtype)
    objective = (per_token * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1)
    return GRPOTerms(objective=objective, ratio=ratio * weights, clipped=(clipped < unclipped) & mask, kl=kl * weights)


class PolicyBatch(BaseModel):
    """Rollouts as one rank trains on them: prompt + response rows, right-padded."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    input_ids: Tensor  # [N, S]: prompt + response without its last token
    targets: Tensor  # [N, S]: the next token where it is a response token, IGNORE_INDEX elsewhere
    old_logprobs: Tensor  # [N, S]: log π_θold of each target, as the rollout sampled it
    advantages: Tensor  # [N]
    ref_logprobs: Tensor | None = None  # [N, S]: log π_ref of each target (β > 0)
    routing: Tensor | None = None  # [N, S, MoE layers, K]: the experts of each input token at rollout (-1: none)

    def rows(self, index: Tensor | slice) -> "PolicyBatch":
        """The batch of these rows (a minibatch, or a rank's shard)."""
        return self._map(lambda tensor: tensor[index])

    def to(self, device: torch.device | str) -> "PolicyBatch":
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn) -> "PolicyBatch":
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return PolicyBatch(**{name: None if value is None else fn(value) for name, value in fields.items()})


class PolicyParts(BaseModel):
    """One rank's share of an update, as sums, for the driver to combine over ranks."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    objective_sum: float  # Σ over outputs of their objective
    outputs: int
    response_tokens: int
    kl_sum: float
    clipped_tokens: int
    ratio_sum: float
    entropy_sum: float
    routed_tokens: int  # input tokens with a rollout routing record
    mismatched_tokens: int  # of those, tokens whose top-k set now differs in ≥ 1 MoE layer (replay off)
    balance: dict[str, float]
    logprobs: Tensor  # [N, S] log π_θ of the targets in this forward
    grad_norm: float = 0.0  # the global gradient norm before clipping, filled in by the update


def policy_backward(
    model: DeepseekV2ForCausalLM, batch: PolicyBatch, settings: GRPOSettings, output_weight: float, seed: int, dtype: str
) -> PolicyParts:
    """Forward + backward of −output_weight · Σ_i objective_i + Σ balance losses. With several ranks
    output_weight = ranks / outputs of the whole (mini)batch, so averaging the ranks' gradients gives
    the gradient of the mean over outputs. `seed` seeds torch's RNG (token dropping, when on)."""
    torch.manual_seed(seed)
    replay = batch.routing if settings.routing_replay else None
    model.train()
    try:
        with torch.enable_grad():
            with autocast(dtype, batch.input_ids.device):
                out = model(batch.input_ids, routing=replay)
            logits = out.logits.float()
            logprobs = token_logprobs(logits, batch.targets)
            mask = batch.targets != IGNORE_INDEX
            terms = grpo_objective(logprobs, batch.old_logprobs, batch.advantages, mask, settings, batch.ref_logprobs)
            balance = out.balance_losses
            loss = -output_weight * terms.objective.sum() + sum(balance.values(), torch.zeros(()))
            loss.backward()
    finally:
        model.eval()
    recorded = torch.zeros_like(mask)
    mismatched = recorded
    if batch.routing is not None:
        recorded = batch.routing[..., 0, 0] >= 0
        mismatched = routing_mismatch(out.routing, batch.routing) & recorded
    with torch.no_grad():
        entropy = token_entropy(logits.detach())[mask]
    return PolicyParts(
        objective_sum=float(terms.objective.detach().sum()),
        outputs=len(batch.input_ids),
        response_tokens=int(mask.sum()),
        kl_sum=float(terms.kl.detach().sum()),
        clipped_tokens=int(terms.clipped.sum()),
        ratio_sum=float(terms.ratio.detach().sum()),
        entropy_sum=float(entropy.sum()),
        routed_tokens=int(recorded.sum()),
        mismatched_tokens=int(mismatched.sum()),
        balance={name: float(value.detach()) for name, value in balance.items()},
        logprobs=logprobs.detach().cpu(),
    )


@torch.no_grad()
def policy_logprobs(model: DeepseekV2ForCausalLM, input_ids: Tensor, targets: Tensor, dtype: str = "float32") -> Tensor:
    """log π of each target [N, S] (0 where IGNORE_INDEX), each token routed by the gate: the
    reference's log-probs when the reference weights are in place."""
    model.eval()
    with autocast(dtype, input_ids.device):
        logits = model(input_ids).logits
    return token_logprobs(logits, targets)
