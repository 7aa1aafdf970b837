"""The latent cache: incremental absorbed decode equals the full forward; byte-exact size; paging."""

import pytest
import torch

from model import CacheBatch, LatentCache, RaggedBatch

from .reference import CONFIG_A, CONFIG_B, random_model

STEPS = 64


@pytest.mark.parametrize("config", [CONFIG_A, CONFIG_B], ids=["A", "B"])
@torch.no_grad()
def test_absorbed_decode_equals_full_forward(config):
    model = random_model(config, seed=0)
    prompt_len, batch = 8, 3
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len + STEPS), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits  # [B, S, V]
    assert full.abs().max() > 1.0

    cache, tables = LatentCache.for_batch(config, batch, prompt_len + STEPS, block_size=16)
    positions = torch.arange(prompt_len).expand(batch, -1)
    prefill = model(ids[:, :prompt_len], cache=cache, cache_batch=CacheBatch(tables, positions))
    torch.testing.assert_close(prefill.logits, full[:, :prompt_len], atol=1e-5, rtol=0)
    for step in range(STEPS):
        pos = prompt_len + step
        out = model(ids[:, pos : pos + 1], cache=cache, cache_batch=CacheBatch(tables, torch.full((batch, 1), pos)))
        torch.testing.assert_close(out.logits[:, 0], full[:, pos], atol=1e-5, rtol=0)


@torch.no_grad()
def test_absorbed_and_expanded_attention_agree_on_scattered_blocks():
    config = CONFIG_B
    model = random_model(config, seed=1)
    block_size, blocks_per_seq, batch = 4, 6, 2
    cache = LatentCache(config, num_blocks=batch * blocks_per_seq + 5, block_size=block_size)
    # Blocks handed out out of order, as a cache manager would after evictions.
    tables = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(0))[: batch * blocks_per_seq]
    tables = tables.view(batch, blocks_per_seq)
    ids = torch.randint(0, config.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    model(ids[:, :19], cache=cache, cache_batch=CacheBatch(tables, torch.arange(19).expand(batch, -1)))
    last = CacheBatch(tables, torch.full((batch, 1), 19))
    for absorb in (True, False):
        out = model(ids[:, 19:], cache=cache, cache_batch=last, absorb=absorb)
        torch.testing.assert_close(out.logits[:, 0], full[:, 19], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_formula(dtype):
    config = CONFIG_B
    cache = LatentCache(config, num_blocks=10, block_size=16, dtype=dtype)
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * (4 if dtype == torch.float32 else 2)
    assert LatentCache.bytes_per_token(config, dtype) == per_token
    assert cache.nbytes == 10 * 16 * per_token


@torch.no_grad()
def test_generate_matches_greedy_recompute_for_ragged_prompts():
    config = CONFIG_B
    model = random_model(config, seed=2)
    prompts = [[5, 9, 3], [7, 1, 4, 4, 8, 2, 6], [11]]
    generated = model.generate(prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, generated):
        sequence = list(prompt)
        for _ in range(12):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
        assert tokens == sequence[len(prompt) :]


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_stops_at_eos():
    model = random_model(CONFIG_B, seed=2)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    first = model.generate([[1, 2, 3]], seed=7, **kwargs)
    assert first == model.generate([[1, 2, 3]], seed=7, **kwargs)
    eos = first[0][2]
    stopped = model.generate([[1, 2, 3]], seed=7, eos_token_id=eos, **kwargs)[0]
    assert stopped == first[0][: first[0].index(eos) + 1]


@torch.no_grad()
def test_ragged_batches_mixing_prefill_chunks_and_decodes_equal_full_forward():
    """Continuous batching: one forward holds decode tokens of some sequences and prefill chunks of others."""
    config = CONFIG_B
    model = random_model(config, seed=4)
    lengths = [13, 9, 21]
    sequences = [torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    full = [model(seq[None]).logits[0] for seq in sequences]
    cache = LatentCache(config, num_blocks=12, block_size=4)
    tables = torch.tensor([[9, 2, 0, 5, 0, 0], [1, 11, 4, 0, 0, 0], [3, 7, 6, 10, 8, 0]])  # scattered blocks
    done = [0, 0, 0]
    schedule = [[5, 0, 7], [1, 4, 7], [1, 5, 7], [6, 0, 0], [0, 0, 0]]  # tokens each sequence brings per step
    for step in schedule:
        rows = [i for i, n in enumerate(step) if n]
        if not rows:
            break
        batch = RaggedBatch(tables[rows], [done[i] for i in rows], [step[i] for i in rows])
        ids = torch.cat([sequences[i][done[i] : done[i] + step[i]] for i in rows])[None]
        out = model(ids, cache=cache, cache_batch=batch, logits_at=batch.last_tokens)
        for k, i in enumerate(rows):
            done[i] += step[i]
            torch.testing.assert_close(out.logits[0, k], full[i][done[i] - 1], atol=1e-5, rtol=0)
    assert done == lengths
