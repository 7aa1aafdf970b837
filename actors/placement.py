"""Expert -> actor placement: device-limited groups, redundant copies of hot experts (EPLB-style).

Per MoE layer every routed expert has one or more copies, each on an actor. The router splits a
replicated expert's tokens evenly over its copies. A new placement is computed from measured load and
swapped in between two steps.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from pydantic import BaseModel, model_validator
from torch import Tensor


@dataclass(slots=True)
class DispatchPlan:
    """For one layer and one batch: which rows of the expert-sorted tokens go to which actor.

    Rows are kept as [start, end) ranges: an actor holding a contiguous block of experts, each in one
    copy, gets a single slice (a view, no gather)."""

    ranges: list[list[tuple[int, int]]]  # per actor: row ranges in expert order, adjacent ones merged
    counts: list[list[int]]  # per actor: tokens per routed expert (global ids) in its message

    @property
    def active_actors(self) -> list[int]:
        return [a for a, ranges in enumerate(self.ranges) if ranges]

    def rows(self, actor: int) -> Tensor:
        """The actor's rows as indices."""
        return torch.cat([torch.arange(start, end) for start, end in self.ranges[actor]] or [torch.empty(0, dtype=torch.long)])

    def take(self, tokens: Tensor, actor: int) -> Tensor:
        """The actor's rows of `tokens`, contiguous."""
        ranges = self.ranges[actor]
        if len(ranges) == 1:
            return tokens[ranges[0][0] : ranges[0][1]].contiguous()
        return torch.cat([tokens[start:end] for start, end in ranges])

    def put(self, target: Tensor, actor: int, values: Tensor) -> None:
        """Write the actor's answer rows back into `target` (the inverse of `take`)."""
        offset = 0
        for start, end in self.ranges[actor]:
            target[start:end] = values[offset : offset + end - start]
            offset += end - start


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
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(self.n_actors)]
        counts = [[0] * self.n_experts for _ in range(self.n_actors)]
        start = 0
        for e, count in enumerate(tokens_per_expert):
            actors = self.copies[layer][e]
            for i, actor in enumerate(actors):
                chunk = count // len(actors) + (1 if i < count % len(actors) else 0)
                if not chunk:
                    continue
                mine = ranges[actor]
                if mine and mine[-1][1] == start:
                    mine[-1] = (mine[-1][0], start + chunk)
                else:
                    mine.append((start, start + chunk))
                counts[actor][e] = chunk
                start += chunk
        return DispatchPlan(ranges, counts)

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
