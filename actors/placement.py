"""Expert -> actor placement: device-limited groups, redundant copies of hot experts (EPLB-style).

Per MoE layer every routed expert has one or more copies, each on an actor. The router splits a
replicated expert's tokens evenly over its copies. A new placement is computed from measured load and
swapped in between two steps.
"""

from __future__ import annotations

import heapq

import torch
from pydantic import BaseModel, model_validator
from torch import Tensor


class DispatchPlan(BaseModel):
    """For one layer and one batch: which rows of the expert-sorted tokens go to which actor."""

    model_config = {"arbitrary_types_allowed": True}

    rows: list[Tensor]  # per actor: indices into the expert-sorted tokens, grouped by expert id
    counts: list[list[int]]  # per actor: tokens per routed expert (global ids) in its message

    @property
    def active_actors(self) -> list[int]:
        return [a for a, rows in enumerate(self.rows) if len(rows)]


class Placement(BaseModel):
    n_actors: int
    n_experts: int
    copies: dict[int, list[list[int]]]  # MoE layer -> expert -> actors holding a copy (no duplicates)

    @model_validator(mode="after")
    def _check(self) -> "Placement":
        for layer, experts in self.copies.items():
            if len(experts) != self.n_experts:
                raise ValueError(f"layer {layer}: {len(experts)} experts placed, expected {self.n_experts}")
            for e, actors in enumerate(experts):
                if not actors or len(set(actors)) != len(actors) or not all(0 <= a < self.n_actors for a in actors):
                    raise ValueError(f"layer {layer} expert {e}: bad copies {actors}")
        return self

    @classmethod
    def contiguous(cls, n_experts: int, n_actors: int, layers: list[int], n_group: int = 1) -> "Placement":
        """Equal contiguous blocks of experts. When actors divide the expert groups, every actor holds
        whole groups, so group-limited routing reaches at most topk_group actors per token."""
        if n_actors < 1:
            raise ValueError("need at least one expert actor")
        if n_experts % n_actors:
            raise ValueError(f"{n_experts} experts do not split evenly over {n_actors} actors")
        per_actor = n_experts // n_actors
        if n_group > 1 and n_actors <= n_group and n_group % n_actors:
            raise ValueError(f"{n_actors} actors cannot each hold whole groups of {n_group} expert groups")
        experts = [[e // per_actor] for e in range(n_experts)]
        return cls(n_actors=n_actors, n_experts=n_experts, copies={layer: [list(a) for a in experts] for layer in layers})

    def experts_of(self, actor: int) -> dict[int, list[int]]:
        """MoE layer -> the expert ids this actor holds a copy of."""
        return {
            layer: [e for e, actors in enumerate(experts) if actor in actors] for layer, experts in self.copies.items()
        }

    def plan(self, layer: int, tokens_per_expert: list[int]) -> DispatchPlan:
        """Split expert-sorted rows over actors; a replicated expert's rows go in near-equal chunks."""
        rows: list[list[Tensor]] = [[] for _ in range(self.n_actors)]
        counts = [[0] * self.n_experts for _ in range(self.n_actors)]
        start = 0
        for e, count in enumerate(tokens_per_expert):
            actors = self.copies[layer][e]
            for i, actor in enumerate(actors):
                chunk = count // len(actors) + (1 if i < count % len(actors) else 0)
                if chunk:
                    rows[actor].append(torch.arange(start, start + chunk))
                    counts[actor][e] = chunk
                    start += chunk
        empty = torch.empty(0, dtype=torch.long)
        return DispatchPlan(rows=[torch.cat(r) if r else empty for r in rows], counts=counts)

    def actor_load(self, layer: int, tokens_per_expert: Tensor) -> Tensor:
        """Tokens each actor receives under this placement: [n_actors]."""
        load = torch.zeros(self.n_actors, dtype=torch.float64)
        for e, actors in enumerate(self.copies[layer]):
            for actor in actors:
                load[actor] += float(tokens_per_expert[e]) / len(actors)
        return load

    def rebalance(self, load: dict[int, Tensor], extra_copies: int) -> "Placement":
        """EPLB: give `extra_copies` more copies per layer to the most loaded experts, then pack all
        copies onto actors, heaviest first onto the least loaded actor with a free slot."""
        slots = -(-(self.n_experts + extra_copies) // self.n_actors)
        copies = {}
        for layer in self.copies:
            expert_load = [float(x) for x in load.get(layer, torch.ones(self.n_experts))]
            n_copies = [1] * self.n_experts
            for _ in range(min(extra_copies, self.n_experts * (self.n_actors - 1))):
                candidates = [e for e in range(self.n_experts) if n_copies[e] < self.n_actors]
                hottest = max(candidates, key=lambda e: expert_load[e] / n_copies[e])
                n_copies[hottest] += 1
            replicas = sorted(
                ((expert_load[e] / n_copies[e], e) for e in range(self.n_experts) for _ in range(n_copies[e])),
                reverse=True,
            )
            actor_heap = [(0.0, a) for a in range(self.n_actors)]  # (load, actor)
            used = [0] * self.n_actors
            placed: list[list[int]] = [[] for _ in range(self.n_experts)]
            for share, e in replicas:
                skipped = []
                while True:
                    actor_load, actor = heapq.heappop(actor_heap)
                    if used[actor] < slots and actor not in placed[e]:
                        break
                    skipped.append((actor_load, actor))
                placed[e].append(actor)
                used[actor] += 1
                heapq.heappush(actor_heap, (actor_load + share, actor))
                for item in skipped:
                    heapq.heappush(actor_heap, item)
            copies[layer] = placed
        return Placement(n_actors=self.n_actors, n_experts=self.n_experts, copies=copies)
