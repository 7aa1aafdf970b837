"""One-process generation: batched prefill, then decode steps on the weight-absorbed path.

This is the reference every other placement (expert actors, the serving engine) is compared with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .cache import CacheBatch, LatentCache

if TYPE_CHECKING:
    from .transformer import DeepseekV2ForCausalLM

def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DeepseekV2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """The new tokens of each prompt (stopping after eos_token_id when given)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(p) for p in prompts]
    cache, block_tables = LatentCache.for_batch(
        model.config, len(prompts), max(lengths) + max_new_tokens, block_size, dtype=dtype, device=device
    )
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # Prefill: one batched forward when the prompts are equally long, else one per prompt.
    if len(set(lengths)) == 1:
        groups = [list(range(len(prompts)))]
    else:
        groups = [[b] for b in range(len(prompts))]
    last_logits = torch.empty(len(prompts), model.config.vocab_size, device=device)
    for rows in groups:
        ids = torch.tensor([prompts[b] for b in rows], device=device)
        positions = torch.arange(ids.shape[1], device=device).expand(len(rows), -1)
        out = model(ids, cache=cache, cache_batch=CacheBatch(block_tables[rows], positions))
        last_logits[rows] = out.logits[:, -1].float()

    outputs: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    positions = torch.tensor(lengths, device=device)[:, None]
    for step in range(max_new_tokens):
        tokens = sample(last_logits, temperature, top_k, top_p, generator)
        for b in (~finished).nonzero().flatten().tolist():
            outputs[b].append(int(tokens[b]))
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        out = model(tokens[:, None], cache=cache, cache_batch=CacheBatch(block_tables, positions))
        last_logits = out.logits[:, -1].float()
        positions = positions + 1
    return outputs
