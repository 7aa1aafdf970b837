"""DeepSeekMoE (SPEC §2): gate, balance losses, token dropping, SwiGLU experts, and the MoE layer.

The routed experts sit behind an `ExpertBackend`: the layer hands it the tokens grouped by expert and
gets their outputs back in the same order, and in training it hands back the outputs' gradients. The
in-process backend (`LocalExperts`) and the Ray expert actors run the same code on their own slice.

Remote experts work while the router does its own: in the forward the shared experts run while the
routed ones do; in the backward the outputs' gradients are sent first, and the tokens' gradients are
awaited only after the combine's, the gate's and the shared experts' backward (see `_ExpertGradients`).
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DeepseekV2Config


class MLP(nn.Module):
    """SwiGLU: the dense FFN, one routed expert, or the merged shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_experts(config: DeepseekV2Config, expert_ids: list[int]) -> nn.ModuleDict:
    """Routed experts keyed by their global id, so state_dict names match the checkpoint's."""
    return nn.ModuleDict({str(e): MLP(config.hidden_size, config.moe_intermediate_size) for e in expert_ids})


# ---- routing --------------------------------------------------------------------------------------


@dataclass
class Routing:
    scores: Tensor  # [N, E] fp32 softmax over all routed experts
    expert_ids: Tensor  # [N, K] chosen experts
    weights: Tensor  # [N, K] fp32 combine weights (normalised or scaled as the config says)


class MoEGate(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.group_limited = config.group_limited
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, x: Tensor, replay: Tensor | None = None) -> Routing:
        """x [N, d] -> Routing. replay [N, K]: routing replay, these experts instead of the gate's
        choice (a row of -1 chooses afresh); their combine weights are still the gate's scores of them,
        so the gate keeps its gradient."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # [N, E] fp32
        expert_ids = self.choose(scores)
        if replay is not None:
            replayed = (replay[:, :1] >= 0).expand_as(expert_ids)
            expert_ids = torch.where(replayed, replay.to(expert_ids.dtype), expert_ids)
        weights = scores.gather(1, expert_ids)
        if self.top_k > 1 and self.norm_topk_prob:  # the remote code's semantics (transformers ignores the flag)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return Routing(scores, expert_ids, weights)

    def choose(self, scores: Tensor) -> Tensor:
        """Top-k experts [N, K] (within the best topk_group groups when group-limited)."""
        candidates = scores
        if self.group_limited:
            group_scores = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)  # [N, G]
            groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
            expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=-1)
            candidates = scores.masked_fill(~expert_mask, 0.0)
        return candidates.topk(self.top_k, dim=-1, sorted=False).indices


def routing_mismatch(chosen: Tensor, recorded: Tensor) -> Tensor:
    """[...] bool: tokens whose top-k set differs in at least one MoE layer. chosen, recorded
    [..., layers, K]; the order of a token's experts does not matter (topk is unsorted)."""
    return (chosen.sort(dim=-1).values != recorded.sort(dim=-1).values).any(dim=-1).any(dim=-1)


# ---- balance losses (SPEC §2.3) -------------------------------------------------------------------


@dataclass
class BalanceLosses:
    """Unweighted Σ f·P terms of one MoE layer, averaged over sequences; multiply by α1, α2, α3."""

    expert: Tensor
    device: Tensor
    comm: Tensor


def balance_losses(scores: Tensor, expert_ids: Tensor, n_devices: int, devices_per_token: int) -> BalanceLosses:
    """scores [B, S, E], expert_ids [B, S, K]; a device is a contiguous group of E / n_devices experts."""
    n_experts, top_k, seq = scores.shape[-1], expert_ids.shape[-1], scores.shape[1]
    selected = torch.zeros_like(scores).scatter_(-1, expert_ids, 1.0)  # [B, S, E]
    f = selected.sum(dim=1) * (n_experts / (top_k * seq))  # [B, E]
    p = scores.mean(dim=1)  # [B, E]
    f_device = f.unflatten(-1, (n_devices, -1)).mean(dim=-1)  # [B, D]
    p_device = p.unflatten(-1, (n_devices, -1)).sum(dim=-1)  # [B, D]
    sent = selected.unflatten(-1, (n_devices, -1)).amax(dim=-1)  # [B, S, D]: token t reaches device d
    f_comm = sent.sum(dim=1) * (n_devices / (devices_per_token * seq))  # [B, D]
    return BalanceLosses(
        expert=(f * p).sum(-1).mean(),
        device=(f_device * p_device).sum(-1).mean(),
        comm=(f_comm * p_device).sum(-1).mean(),
    )


def capacity_mask(
    affinity: Tensor, expert_ids: Tensor, n_experts: int, n_devices: int, capacity_factor: float, exempt: Tensor
) -> Tensor:
    """Device-level token dropping (SPEC §2.4): [N, K] bool of the assignments kept.

    Each device takes at most ceil(capacity_factor · N·K / n_devices) assignments: those of exempt
    tokens first, then the highest-affinity ones. affinity [N, K]; exempt [N] bool.
    """
    n_assignments = expert_ids.numel()
    capacity = math.ceil(capacity_factor * n_assignments / n_devices)
    device = (expert_ids // (n_experts // n_devices)).flatten()
    priority = affinity.flatten().float() + exempt[:, None].expand_as(expert_ids).flatten() * 2.0  # scores ≤ 1
    kept = torch.zeros(n_assignments, dtype=torch.bool, device=expert_ids.device)
    for d in range(n_devices):
        on_device = (device == d).nonzero().squeeze(-1)
        best = priority[on_device].topk(min(capacity, on_device.numel())).indices
        kept[on_device[best]] = True
    kept |= exempt[:, None].expand_as(expert_ids).flatten()
    return kept.view_as(expert_ids)


# ---- the expert backend ---------------------------------------------------------------------------


class PendingExperts(ABC):
    """Expert outputs on their way; the caller computes the shared experts meanwhile. A backward goes
    the same way: `start_backward` sends the outputs' gradients, `grad_tokens` waits for the tokens'."""

    @abstractmethod
    def result(self) -> Tensor:
        """The outputs [N, d], in the order of the tokens submitted."""

    @abstractmethod
    def start_backward(self, grad_outputs: Tensor) -> None:
        """Send the gradient of the outputs; the experts accumulate their own parameters' gradients."""

    @abstractmethod
    def grad_tokens(self) -> Tensor:
        """The gradient of the tokens, in the order submitted (waits for the backward started)."""


class ExpertBackend(ABC):
    """Runs the routed experts of every MoE layer for tokens grouped by expert.

    `tokens` [N, d]: the first counts[0] rows go to expert 0, the next counts[1] to expert 1, and so on
    over all routed experts; token_index [N] says which token of the batch each row copies (for load
    statistics). With keep_for_backward the backend keeps what `PendingExperts.start_backward` needs.
    """

    @abstractmethod
    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts: ...


class _Computed(PendingExperts):
    def __init__(self, outputs: Tensor, experts: "LocalExperts", handle: int | None):
        self.outputs, self.experts, self.handle = outputs, experts, handle
        self.grads: Tensor | None = None

    def result(self) -> Tensor:
        return self.outputs

    def start_backward(self, grad_outputs: Tensor) -> None:
        self.grads = self.experts.backward(self.handle, grad_outputs)

    def grad_tokens(self) -> Tensor:
        return self.grads


class LocalExperts(ExpertBackend):
    """Experts in this process: the model's own, or one expert actor's slice (expert ids are global)."""

    def __init__(self, experts: dict[int, nn.ModuleDict]):
        self.experts = experts  # layer -> {str(expert id): MLP}
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles = itertools.count()

    def run(self, layer: int, tokens: Tensor, counts: list[int]) -> Tensor:
        experts = self.experts[layer]
        outputs = [experts[str(e)](chunk) for e, chunk in enumerate(tokens.split(counts)) if len(chunk)]
        return torch.cat(outputs) if outputs else tokens

    def forward(self, layer: int, tokens: Tensor, counts: list[int], keep_for_backward: bool) -> tuple[Tensor, int | None]:
        """Outputs, and the handle that `backward` takes when keep_for_backward."""
        if not keep_for_backward:
            with torch.no_grad():
                return self.run(layer, tokens, counts), None
        with torch.enable_grad():
            inputs = tokens.detach().requires_grad_()
            outputs = self.run(layer, inputs, counts)
        handle = next(self._handles)
        self._saved[handle] = (inputs, outputs)
        return outputs.detach(), handle

    def backward(self, handle: int, grad_outputs: Tensor) -> Tensor:
        inputs, outputs = self._saved.pop(handle)
        if outputs.requires_grad and outputs is not inputs:
            outputs.backward(grad_outputs)
        return inputs.grad if inputs.grad is not None else torch.zeros_like(inputs)

    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts:
        outputs, handle = self.forward(layer, tokens, counts, keep_for_backward)
        return _Computed(outputs, self, handle)

    @property
    def pending_backwards(self) -> int:
        return len(self._saved)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Checkpoint names -> parameters of every expert held."""
        return {
            f"model.layers.{layer}.mlp.experts.{name}": param
            for layer, experts in self.experts.items()
            for name, param in experts.named_parameters()
        }

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        config: DeepseekV2Config,
        experts: dict[int, list[int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "LocalExperts":
        """Read only these experts' tensors (MoE layer -> expert ids) from a checkpoint folder, straight
        onto `device` (the modules are built without storage, so no host copy is made first)."""
        from .checkpoint import load_tensors

        with torch.device("meta"):
            modules = {layer: make_experts(config, ids) for layer, ids in experts.items()}
        names = cls(modules).named_parameters()
        tensors = load_tensors(directory, names, dtype=dtype, device=device)
        for layer, module in modules.items():
            prefix = f"model.layers.{layer}.mlp.experts."
            module.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}, assign=True)
        return cls(modules)


@dataclass
class _ExpertTrip:
    """One MoE layer's tokens on their way to the routed experts and back (filled in by `dispatch`)."""

    token_of: Tensor | None = None  # [M]: the token of the batch each expert-sorted row copies
    pending: PendingExperts | None = None


class _ExpertGradients(torch.autograd.Function):
    """Identity on the layer's input x [N, d] whose backward adds the routed experts' token gradients.

    It is the first node of the layer's forward, so autograd, which runs the most recently created of
    its ready nodes first, runs it last in the layer's backward: the combine's, the gate's and the
    shared experts' backward all run while the (remote) experts compute theirs."""

    @staticmethod
    def forward(ctx, x: Tensor, trip: _ExpertTrip) -> Tensor:
        ctx.trip = trip
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        trip = ctx.trip
        return grad_x.index_add(0, trip.token_of, trip.pending.grad_tokens().to(grad_x.dtype)), None


class _ExpertOutputs(torch.autograd.Function):
    """The routed experts' outputs as one node of the graph: its backward sends the outputs' gradients
    to the experts and returns at once (the tokens' gradients join at `_ExpertGradients`)."""

    @staticmethod
    def forward(ctx, x: Tensor, trip: _ExpertTrip) -> Tensor:
        ctx.trip = trip
        return trip.pending.result()

    @staticmethod
    def backward(ctx, grad_outputs: Tensor):
        ctx.trip.pending.start_backward(grad_outputs.contiguous())
        return None, None


# ---- the MoE layer --------------------------------------------------------------------------------


@dataclass
class MoEOutput:
    hidden: Tensor  # [B, S, d]: routed + shared experts (the residual is the decoder's)
    tokens_per_expert: Tensor  # [E] assignments actually dispatched
    expert_ids: Tensor  # [B, S, K] the experts each token was routed to (chosen or replayed)
    balance: BalanceLosses | None = None  # training only


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int, expert_ids: list[int] | None = None):
        """expert_ids: which routed experts this process holds (default all; [] when they are remote)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts = config.n_routed_experts
        self.n_devices, self.devices_per_token = config.n_group, config.topk_group
        self.capacity_factor, self.drop_exempt_fraction = config.capacity_factor, config.drop_exempt_fraction
        self.gate = MoEGate(config)
        self.experts = make_experts(config, list(range(self.n_experts)) if expert_ids is None else expert_ids)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.backend: ExpertBackend | None = None  # set by the model: LocalExperts or a remote dispatcher

    def forward(self, x: Tensor, replay: Tensor | None = None) -> MoEOutput:
        """x [B, S, d]; replay [B, S, K]: the experts to route to (routing replay, see MoEGate)."""
        batch, seq, d = x.shape
        flat = x.reshape(-1, d)
        trip = _ExpertTrip()
        if torch.is_grad_enabled() and flat.requires_grad:
            flat = _ExpertGradients.apply(flat, trip)  # first: its backward runs last (see the class)
        routing = self.gate(flat, None if replay is None else replay.reshape(batch * seq, -1))
        balance = None
        kept = None
        if self.training:
            balance = balance_losses(
                routing.scores.view(batch, seq, -1),
                routing.expert_ids.view(batch, seq, -1),
                self.n_devices,
                self.devices_per_token,
            )
            if self.capacity_factor is not None:
                exempt = (torch.rand(batch) < self.drop_exempt_fraction).to(x.device).repeat_interleave(seq)
                affinity = routing.scores.gather(1, routing.expert_ids)
                kept = capacity_mask(
                    affinity, routing.expert_ids, self.n_experts, self.n_devices, self.capacity_factor, exempt
                )
        combine = self.dispatch(flat, routing, trip, kept)
        # Overlaps the routed experts (remote ones work meanwhile; so do their backward, see above).
        shared = self.shared_experts(flat.view(batch, seq, d)) if self.shared_experts is not None else None
        hidden = combine.wait().view(batch, seq, d)
        if shared is not None:
            hidden = hidden + shared
        return MoEOutput(hidden, combine.tokens_per_expert, routing.expert_ids.view(batch, seq, -1), balance)

    def dispatch(self, x: Tensor, routing: Routing, trip: _ExpertTrip, kept: Tensor | None = None) -> "_Combine":
        """Group token copies by expert and submit them to the backend."""
        top_k = routing.expert_ids.shape[1]
        expert_of = routing.expert_ids.flatten()  # [N·K]
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)
        weight_of = routing.weights.flatten()
        if kept is not None:
            keep = kept.flatten()
            expert_of, token_of, weight_of = expert_of[keep], token_of[keep], weight_of[keep]
        order = expert_of.argsort(stable=True)
        token_of, weight_of = token_of[order], weight_of[order]
        tokens_per_expert = torch.bincount(expert_of, minlength=self.n_experts)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        trip.token_of = token_of
        trip.pending = self.backend.submit(
            self.layer_idx, x.detach()[token_of], tokens_per_expert.tolist(), token_of, keep_for_backward=needs_grad
        )
        return _Combine(x, trip, needs_grad, weight_of, tokens_per_expert)


@dataclass
class _Combine:
    """Routed outputs still to be weighted and summed back per token."""

    x: Tensor
    trip: _ExpertTrip
    needs_grad: bool  # gradients flow through the experts
    weight_of: Tensor
    tokens_per_expert: Tensor

    def wait(self) -> Tensor:
        if self.needs_grad:
            outputs = _ExpertOutputs.apply(self.x, self.trip)
        else:
            outputs = self.trip.pending.result()
        combined = torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)
        combined = combined.index_add(0, self.trip.token_of, outputs.float() * self.weight_of[:, None])
        return combined.to(self.x.dtype)
