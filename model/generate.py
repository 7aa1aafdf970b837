"""One-process generation: batched prefill, then decode steps on the weight-absorbed path.

This is the reference every other placement (expert actors, the serving engine) is compared with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cache import CacheBatch, LatentCache
from .sampling import SamplingParams, sample_one

if TYPE_CHECKING:
    from .transformer import DeepseekV2ForCausalLM

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
    """The new tokens of each prompt (stopping after eos_token_id when given). With a seed, prompt b
    samples as choice b of that seed."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(p) for p in prompts]
    cache, block_tables = LatentCache.for_batch(
        model.config, len(prompts), max(lengths) + max_new_tokens, block_size, dtype=dtype, device=device
    )

    # Prefill: one batched forward when the prompts are equally long, else one per prompt.
    if len(set(lengths)) == 1:
        groups = [list(range(len(prompts)))]
    else:
        groups = [[b] for b in range(len(prompts))]
    last_logits = torch.empty(len(prompts), model.config.vocab_size, device=device)
    for rows in groups:
        ids = torch.tensor([prompts[b] for b in rows], device=device)
        positions = torch.arange(ids.shape[1], device=device).expand(len(rows), -1)
        last = torch.tensor([ids.shape[1] - 1], device=device)  # a long prompt's logits would be S × vocab
        out = model(ids, cache=cache, cache_batch=CacheBatch(block_tables[rows], positions), logits_at=last)
        last_logits[rows] = out.logits[:, -1].float()

    outputs: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    positions = torch.tensor(lengths, device=device)[:, None]
    for step in range(max_new_tokens):
        tokens = torch.tensor(
            [sample_one(last_logits[b], params, None, len(outputs[b]), choice=b).token for b in range(len(prompts))],
            device=device,
        )
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
