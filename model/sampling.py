"""Per-request sampling: temperature, top-k, top-p, penalties, seeds, logprobs.

A seeded request draws from a generator derived from (seed, choice, position) alone, so its tokens do
not depend on whatever else shares the batch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import Tensor


class SamplingParams(BaseModel):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="None = no logprobs")


class Sampled(BaseModel):
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []


def _generator(seed: int, choice: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + choice * 10_007 + position) % (2**63))


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits [V] with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def sample_one(
    logits: Tensor, params: SamplingParams, token_counts: Tensor | None, generated: int, choice: int = 0
) -> Sampled:
    """logits [V] of one sequence -> its next token. token_counts [V]: how often each token was generated
    so far (what the penalties need; None without penalties); generated: how many tokens that is."""
    logits = logits.float()
    if (params.presence_penalty or params.frequency_penalty) and token_counts is not None:
        logits = logits - params.frequency_penalty * token_counts - params.presence_penalty * (token_counts > 0).float()
    if params.temperature == 0:
        token = int(logits.argmax())
    else:
        filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        generator = None if params.seed is None else _generator(params.seed, choice, generated)
        token = int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))
    if params.top_logprobs is None:
        return Sampled(token=token)
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(params.top_logprobs) if params.top_logprobs else None
    return Sampled(
        token=token,
        logprob=float(logprobs[token]),
        top_logprobs=[] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
    )


class SequenceSampler:
    """One sequence's sampling state, kept where its logits are: its parameters, how many tokens it has
    generated and (with penalties) how often each one, updated as it samples."""

    def __init__(self, params: SamplingParams, vocab_size: int, choice: int = 0):
        self.params, self.choice, self.generated = params, choice, 0
        penalized = params.presence_penalty or params.frequency_penalty
        self.token_counts = torch.zeros(vocab_size) if penalized else None

    def sample(self, logits: Tensor) -> Sampled:
        sampled = sample_one(logits, self.params, self.token_counts, self.generated, self.choice)
        self.generated += 1
        if self.token_counts is not None:
            self.token_counts[sampled.token] += 1
        return sampled
