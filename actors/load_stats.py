"""Expert load statistics of bounded size, aggregated lazily off the dispatch path.

`record` only appends what a layer's dispatch already computed; every FOLD_EVERY records (and before
a snapshot) the pending ones are folded into fixed arrays per MoE layer with a few vectorised ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .placement import DispatchPlan

FOLD_EVERY = 64


class LoadStats:
    def __init__(self, layers: list[int], n_experts: int, n_actors: int):
        self.layers, self.n_experts, self.n_actors = layers, n_experts, n_actors
        self.reset()

    def reset(self) -> None:
        self.pending: dict[int, list[tuple[list[int], DispatchPlan, Tensor]]] = {layer: [] for layer in self.layers}
        self.tokens_per_expert = {layer: torch.zeros(self.n_experts, dtype=torch.long) for layer in self.layers}
        self.tokens_per_actor = {layer: torch.zeros(self.n_actors, dtype=torch.long) for layer in self.layers}
        self.tokens = {layer: 0 for layer in self.layers}
        self.actor_visits = {layer: 0 for layer in self.layers}  # Σ over tokens of actors reached
        self.max_actors_per_token = {layer: 0 for layer in self.layers}
        self.messages = {layer: 0 for layer in self.layers}

    def record(self, layer: int, counts: list[int], plan: DispatchPlan, token_index: Tensor) -> None:
        pending = self.pending[layer]
        pending.append((counts, plan, token_index))
        if len(pending) >= FOLD_EVERY:
            self._fold(layer)

    def _fold(self, layer: int) -> None:
        pending, self.pending[layer] = self.pending[layer], []
        if not pending:
            return
        self.tokens_per_expert[layer] += torch.tensor([counts for counts, _, _ in pending], dtype=torch.long).sum(0)
        actor_of_row, token_of_row = [], []
        n_tokens = 0
        for _, plan, token_index in pending:
            if not len(token_index):
                continue
            for actor, ranges in enumerate(plan.ranges):
                for start, end in ranges:
                    actor_of_row.append(torch.full((end - start,), actor, dtype=torch.long))
                    token_of_row.append(token_index[start:end] + n_tokens)
            n_tokens += int(token_index.max()) + 1
            self.messages[layer] += len(plan.active_actors)
        if not n_tokens:
            return
        actors = torch.cat(actor_of_row)
        self.tokens_per_actor[layer] += torch.bincount(actors, minlength=self.n_actors)
        reached = torch.unique(torch.cat(token_of_row) * self.n_actors + actors)  # distinct (token, actor) pairs
        per_token = torch.bincount(reached // self.n_actors)
        self.tokens[layer] += n_tokens
        self.actor_visits[layer] += len(reached)
        self.max_actors_per_token[layer] = max(self.max_actors_per_token[layer], int(per_token.max()))

    def expert_load(self) -> dict[int, Tensor]:
        for layer in self.layers:
            self._fold(layer)
        return {layer: counts.clone() for layer, counts in self.tokens_per_expert.items()}

    def snapshot(self, actor_nodes: list[str] | None = None) -> dict:
        """Per MoE layer; with `actor_nodes` (the node of each expert actor) also tokens per node."""
        layers = {}
        for layer in self.layers:
            self._fold(layer)
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
            if actor_nodes is not None:
                per_node: dict[str, int] = {}
                for node, tokens in zip(actor_nodes, self.tokens_per_actor[layer].tolist()):
                    per_node[node] = per_node.get(node, 0) + tokens
                layers[str(layer)]["tokens_per_node"] = per_node
        return {"layers": layers}
