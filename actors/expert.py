"""ExpertActor: one device and a slice of the routed experts of every MoE layer.

It wraps `model.moe.LocalExperts`, the same code the one-process model runs, and adds what only an
owner of parameters needs: their gradients, their AdamW state, and shipping experts to other actors
when the placement changes.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from model import DeepseekV2Config, LocalExperts
from model.moe import make_experts

from .wire import WireTensor, from_wire, to_wire


IDLE_REPLY = torch.zeros(1)


class ExpertActor:
    def __init__(self, model_dir: str, index: int, experts: dict[int, list[int]], torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.index = index
        self.model_dir = model_dir
        self.config = DeepseekV2Config.from_pretrained(model_dir)
        self.local = LocalExperts.from_pretrained(model_dir, self.config, experts)
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_settings: dict = {}

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "experts": self.held()}

    def held(self) -> dict[int, list[int]]:
        return {layer: sorted(int(e) for e in experts) for layer, experts in self.local.experts.items()}

    # ---- the data path (object store: numpy on the wire; compiled graph: tensors in shared memory) ---
    def forward(self, layer: int, tokens: WireTensor, counts: list[int]) -> tuple[WireTensor, None]:
        return to_wire(self._forward(layer, from_wire(tokens), counts)), None

    def _forward(self, layer: int, tokens: Tensor, counts: list[int]) -> Tensor:
        return self.local.forward(layer, tokens, counts, keep_for_backward=False)[0]

    def forward_compiled(self, message: tuple[int, Tensor | None, list[int]]) -> Tensor:
        """The compiled graph's entry: one (layer, tokens, counts) message per execution; an idle
        actor gets tokens=None and answers a placeholder (zero-size tensors cannot cross the channel)."""
        layer, tokens, counts = message
        if tokens is None:
            return IDLE_REPLY
        return self._forward(layer, tokens, counts)

    def forward_train(self, layer: int, tokens: WireTensor, counts: list[int]) -> tuple[WireTensor, int]:
        tokens = from_wire(tokens)
        with self._train_autocast():
            outputs, handle = self.local.forward(layer, tokens, counts, keep_for_backward=True)
        return to_wire(outputs.to(tokens.dtype)), handle  # bf16 autocast: answer in the tokens' dtype

    def backward(self, handle: int, grad_outputs: WireTensor) -> WireTensor:
        return to_wire(self.local.backward(handle, from_wire(grad_outputs)))

    # ---- parameters, gradients, optimizer ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {name: param.detach().clone() for name, param in self.local.named_parameters().items()}

    def grads(self) -> dict[str, Tensor]:
        return {
            name: param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            for name, param in self.local.named_parameters().items()
        }

    def zero_grad(self) -> None:
        for param in self.local.named_parameters().values():
            param.grad = None

    def configure_optimizer(self, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8) -> None:
        self.optimizer_settings = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
        self.optimizer = torch.optim.AdamW(list(self.local.named_parameters().values()), **self.optimizer_settings)

    def grad_sq_norm(self) -> float:
        return float(sum(p.grad.pow(2).sum() for p in self.local.named_parameters().values() if p.grad is not None))

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One AdamW step (after the caller's global gradient clipping, as a scale), then zero grads."""
        if self.optimizer is None:
            raise RuntimeError("configure_optimizer first")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if grad_scale != 1.0:
            for param in self.local.named_parameters().values():
                if param.grad is not None:
                    param.grad.mul_(grad_scale)
        self.optimizer.step()
        self.zero_grad()

    # ---- placement changes ------------------------------------------------------------------------
    def expert_weights(self, layer: int, expert_ids: list[int]) -> dict[int, dict[str, Tensor]]:
        experts = self.local.experts[layer]
        return {e: {k: v.detach().clone() for k, v in experts[str(e)].state_dict().items()} for e in expert_ids}

    def set_experts(self, layer: int, keep: list[int], *incoming_parts: dict[int, dict[str, Tensor]]) -> None:
        """Hold exactly `keep` plus the incoming experts for this layer (inference only: optimizer state
        does not move)."""
        incoming = {e: weights for part in incoming_parts for e, weights in part.items()}
        if self.optimizer is not None:
            raise RuntimeError("experts cannot move while this actor holds optimizer state")
        current = self.local.experts[layer]
        updated = make_experts(self.config, sorted({*keep, *incoming}))
        with torch.no_grad():
            for e in keep:
                updated[str(e)].load_state_dict(current[str(e)].state_dict())
            for e, weights in incoming.items():
                updated[str(e)].load_state_dict(weights)
        self.local.experts[layer] = updated

    # ---- training: mixed precision, checkpoint shards and named optimizer state --------------------
    # (jobs/trainer.py drives these; the experts' gradients and AdamW state never leave this actor)
    def set_train_dtype(self, dtype: str) -> None:
        """bf16 autocast for training forwards (fp32 master weights and AdamW state stay fp32)."""
        self.train_dtype = dtype

    def _train_autocast(self):
        from actors.training import autocast

        return autocast(getattr(self, "train_dtype", None))

    def save_shard(self, path: str) -> dict[str, int]:
        """Write this actor's experts as one safetensors file (HF names); returns name -> bytes."""
        from actors.training import save_safetensors

        return save_safetensors(self.local.named_parameters(), path)

    def save_optimizer(self, path: str) -> None:
        """AdamW state keyed by parameter name, so any placement can load its slice back."""
        from actors.training import fsync, named_optimizer_state

        torch.save(named_optimizer_state(self.optimizer, self.local.named_parameters()), path)
        fsync(path)

    def load_optimizer(self, paths: list[str]) -> int:
        """Take this actor's parameters' AdamW state from named state files; returns how many found."""
        from actors.training import load_named_optimizer_state

        if self.optimizer is None:
            raise RuntimeError("configure_optimizer first")
        return load_named_optimizer_state(self.optimizer, self.local.named_parameters(), paths)
