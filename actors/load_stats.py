"""Expert load statistics of bounded size: fixed arrays per MoE layer, whatever the traffic."""

from __future__ import annotations

import torch
from torch import Tensor

from .placement import DispatchPlan


class LoadStats:
    def __init__(self, layers: list[int], n_experts: int, n_actors: int):
        self.layers, self.n_experts, self.n_actors = layers, n_experts, n_actors
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert = {layer: torch.zeros(self.n_experts, dtype=torch.long) for layer in self.layers}
        self.tokens_per_actor = {layer: torch.zeros(self.n_actors, dtype=torch.long) for layer in self.layers}
        self.tokens = {layer: 0 for layer in self.layers}
        self.actor_visits = {layer: 0 for layer in self.layers}  # Σ over tokens of actors reached
        self.max_actors_per_token = {layer: 0 for layer in self.layers}
        self.messages = {layer: 0 for layer in self.layers}

    def record(self, layer: int, counts: list[int], plan: DispatchPlan, token_index: Tensor) -> None:
        self.tokens_per_expert[layer] += torch.tensor(counts, dtype=torch.long)
        if not len(token_index):
            return
        n_tokens = int(token_index.max()) + 1
        reached = torch.zeros(self.n_actors, n_tokens, dtype=torch.bool)
        for actor, rows in enumerate(plan.rows):
            self.tokens_per_actor[layer][actor] += len(rows)
            reached[actor, token_index[rows]] = True
        per_token = reached.sum(0)
        self.tokens[layer] += n_tokens
        self.actor_visits[layer] += int(per_token.sum())
        self.max_actors_per_token[layer] = max(self.max_actors_per_token[layer], int(per_token.max()))
        self.messages[layer] += len(plan.active_actors)

    def expert_load(self) -> dict[int, Tensor]:
        return {layer: counts.clone() for layer, counts in self.tokens_per_expert.items()}

    def snapshot(self) -> dict:
        layers = {}
        for layer in self.layers:
            actor = self.tokens_per_actor[layer].double()
            mean = float(actor.mean())
            layers[str(layer)] = {
                "tokens_per_expert": self.tokens_per_expert[layer].tolist(),
                "tokens_per_actor": self.tokens_per_actor[layer].tolist(),
                "imbalance": float(actor.max()) / mean if mean else 0.0,  # max / mean tokens per actor
                "actors_per_token_mean": self.actor_visits[layer] / self.tokens[layer] if self.tokens[layer] else 0.0,
                "actors_per_token_max": self.max_actors_per_token[layer],
                "messages": self.messages[layer],
            }
        return {"layers": layers}
