"""Long prompts and packed rows: YaRN at 8K against transformers, chunked prefill over a long cached
prefix, and the document mask (each packed sample attends only to itself)."""

import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache, RaggedBatch
from model.mla import QUERY_BLOCK

from .reference import CONFIG_B, hf_checkpoint, random_model

# The tiny model with DeepSeek-V2's own YaRN and context: factor 40 over 4096 original positions (163840),
# mscale 0.707.
V2_YARN = DeepseekV2Config.preset("v2-lite").rope_scaling
CONFIG_YARN_V2 = CONFIG_B.model_copy(update={"max_position_embeddings": 163840, "rope_scaling": V2_YARN})


@torch.no_grad()
def test_8k_prompt_last_logits_match_transformers_with_v2_yarn(tmp_path):
    prompt_len, last = 8192, 16
    rope = CONFIG_YARN_V2.rope_scaling
    assert (rope.factor, rope.original_max_position_embeddings, rope.beta_fast, rope.beta_slow) == (40, 4096, 32, 1)
    assert rope.mscale == rope.mscale_all_dim == 0.707
    reference = hf_checkpoint(CONFIG_YARN_V2, tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, CONFIG_YARN_V2.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(8))
    expected = reference(ids, logits_to_keep=last).logits
    got = ours(ids, logits_at=torch.arange(prompt_len - last, prompt_len)).logits
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_chunked_prefill_over_a_long_prefix_equals_full_forward():
    """Chunks longer than a query block, over a cached prefix of several blocks, then decodes."""
    model = random_model(CONFIG_B, seed=5)
    ids = torch.randint(0, CONFIG_B.vocab_size, (1, 3 * QUERY_BLOCK + 40), generator=torch.Generator().manual_seed(5))
    full = model(ids).logits[0]
    cache = LatentCache(CONFIG_B, num_blocks=ids.shape[1] // 16 + 1, block_size=16)
    tables = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(5))[None]  # scattered blocks
    done = 0
    for chunk in (QUERY_BLOCK + 30, QUERY_BLOCK + 60, QUERY_BLOCK - 52, 1, 1):
        batch = RaggedBatch(tables, [done], [chunk])
        out = model(ids[:, done : done + chunk], cache=cache, cache_batch=batch).logits[0]
        torch.testing.assert_close(out, full[done : done + chunk], atol=1e-5, rtol=0)
        done += chunk
    assert done == ids.shape[1]


def packed_rows() -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """Two rows of samples that straddle query blocks; the documents of each row as (start, end)."""
    documents = [[(0, 150), (150, 450), (450, 660)], [(0, 400), (400, 401), (401, 660)]]
    ids = torch.randint(0, CONFIG_B.vocab_size, (2, 660), generator=torch.Generator().manual_seed(6))
    document_ids = torch.zeros_like(ids)
    for row, spans in enumerate(documents):
        for number, (start, end) in enumerate(spans):
            document_ids[row, start:end] = 7 * number + 3  # any ids: a document is a run of equal ids
    return ids, document_ids, documents


def test_document_mask_gives_each_packed_sample_its_logits_and_gradients_alone():
    model = random_model(CONFIG_B, seed=6)
    ids, document_ids, documents = packed_rows()
    weights = torch.randn(*ids.shape, CONFIG_B.vocab_size, generator=torch.Generator().manual_seed(7))

    packed = model(ids, document_ids=document_ids).logits
    (packed * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    for row, spans in enumerate(documents):
        for start, end in spans:
            positions = torch.arange(start, end)[None]  # where the sample sits in the row, not 0..
            alone = model(ids[row : row + 1, start:end], positions=positions).logits
            torch.testing.assert_close(packed[row : row + 1, start:end].detach(), alone.detach(), atol=1e-5, rtol=0)
            (alone * weights[row : row + 1, start:end]).sum().backward()
    assert packed.abs().max() > 1.0
    assert packed_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in packed_grads.items():
        scale = grad.abs().max()  # gradients reach hundreds: compare them relative to their size
        torch.testing.assert_close(grad / scale, model.get_parameter(name).grad / scale, atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_document_mask_later_samples_see_earlier_ones():
    """The mask above is what separates the samples: without it the second sample's logits change."""
    model = random_model(CONFIG_B, seed=6)
    ids, document_ids, documents = packed_rows()
    start, end = documents[0][1]
    alone = model(ids[:1, start:end], positions=torch.arange(start, end)[None]).logits
    unmasked = model(ids[:1]).logits[:, start:end]
    masked = model(ids[:1], document_ids=document_ids[:1]).logits[:, start:end]
    assert (unmasked - alone).abs().max() > 1e-2
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=0)
