"""What the engine and a router say on each serving step, and the per-sequence state the router keeps.

A sequence is opened once on its router (block table, prompt length, sampling parameters, and the
token counts its penalties need, kept by the sampler as it samples) and closed when it ends, so a step
carries per sequence only its new tokens and where they start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from model import RaggedBatch
from model.sampling import Sampled, SamplingParams, SequenceSampler


class CacheNotAllocated(RuntimeError):
    """The router has no block pool: it was restarted (a fresh process) since the engine allocated one.
    Whatever the engine's books say this router holds is gone; the engine allocates a new pool."""

    def __init__(self, router: int):
        super().__init__(f"router {router} has no latent-cache pool (restarted since it was allocated)")
        self.router = router

    def __reduce__(self):  # crosses Ray: rebuilt from the router index
        return CacheNotAllocated, (self.router,)


@dataclass(frozen=True, slots=True)
class CacheShape:
    """A router's block pool, as `RouterActor.init_cache` allocated it."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class OpenSequence:
    seq_id: str
    block_table: list[int]
    prompt_len: int
    sampling: SamplingParams
    choice: int = 0  # which of a request's n choices (seeded sampling differs per choice)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A sequence's new tokens in one step: a prefill chunk, or the token sampled last step."""

    seq_id: str
    tokens: list[int]
    start: int  # position of tokens[0]


@dataclass(slots=True)
class StepRequest:
    """One step on one router: sequences to open first, the chunks to run, sequences that ended."""

    chunks: list[Chunk]
    opened: list[OpenSequence] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Running:
    block_table: list[int]
    prompt_len: int
    sampler: SequenceSampler


class SequenceTable:
    """The router's running sequences."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.running: dict[str, _Running] = {}

    def update(self, opened: list[OpenSequence], closed: list[str]) -> None:
        for seq in opened:
            sampler = SequenceSampler(seq.sampling, self.vocab_size, seq.choice)
            self.running[seq.seq_id] = _Running(seq.block_table, seq.prompt_len, sampler)
        for seq_id in closed:
            self.running.pop(seq_id, None)

    def batch(self, chunks: list[Chunk]) -> tuple[Tensor, RaggedBatch]:
        """The chunks as one flattened row of input ids [1, N] and where they go in the cache."""
        tables = [self.running[c.seq_id].block_table for c in chunks]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device)
        batch = RaggedBatch(padded, [c.start for c in chunks], [len(c.tokens) for c in chunks])
        return torch.tensor([t for c in chunks for t in c.tokens], device=self.device)[None], batch

    def sample(self, chunks: list[Chunk], last_logits: Tensor) -> list[Sampled | None]:
        """The next token of every chunk that reaches the end of its prompt (None for the others)."""
        results: list[Sampled | None] = []
        for row, chunk in enumerate(chunks):
            sequence = self.running[chunk.seq_id]
            if chunk.start + len(chunk.tokens) < sequence.prompt_len:
                results.append(None)
            else:
                results.append(sequence.sampler.sample(last_logits[row]))
        return results
