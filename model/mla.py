"""Multi-head Latent Attention (SPEC §1).

Two ways to attend, same result:
- expanded: K and V are re-expanded from the latent with kv_b_proj (training, prefill);
- absorbed: W_UK is folded into the query and W_UV applied after attention, so attention runs as MQA
  with one 576-wide KV head straight over the latent cache (decode).

Memory stays linear in the prompt: causal attention over a fresh prompt is one fused SDPA call with
no mask (the CPU flash kernel tiles it); anything else (a chunk over its cached prefix, a document
mask) runs QUERY_BLOCK queries at a time over just the keys they see, so a dense mask is at most
QUERY_BLOCK × keys, and in training it is rebuilt for backward rather than kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import CacheBatch, KeySpans, LatentCache, RaggedBatch
from .config import DeepseekV2Config
from .norm import RMSNorm
from .rope import apply_rope

# Queries per masked SDPA call. SDPA turns a bool mask into a float one before its kernel runs, so a
# block costs 5 bytes per (query, key) it spans: 256 queries over 32K keys is 40 MB.
QUERY_BLOCK = 256


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward; built once by the model."""

    cos: Tensor  # [B, S, d_R/2]
    sin: Tensor  # [B, S, d_R/2]
    cache: LatentCache | None = None
    cache_batch: CacheBatch | RaggedBatch | None = None
    spans: KeySpans | None = None  # the keys each new token sees; None = causal over the new tokens
    absorb: bool = False


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        d, qk_dim = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, d, bias=False)

    def _queries(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.n_heads, self.nope_dim + self.rope_dim))  # [B, S, H, d_h + d_R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, inputs.cos, inputs.sin)

    def _latent(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, inputs.cos, inputs.sin)  # [B,S,d_c], [B,S,d_R]

    def forward(self, x: Tensor, inputs: AttentionInputs) -> Tensor:
        q_nope, q_rope = self._queries(x, inputs)
        c_kv, k_rope = self._latent(x, inputs)
        if isinstance(inputs.cache_batch, RaggedBatch):
            inputs.cache.write(self.layer_idx, inputs.cache_batch, c_kv, k_rope)
            return self.o_proj(self._ragged(q_nope[0], q_rope[0], inputs).flatten(-2))[None]
        if inputs.cache is None:
            latent = torch.cat((c_kv, k_rope), dim=-1)  # [B, S, d_c + d_R]
        else:
            inputs.cache.write(self.layer_idx, inputs.cache_batch, c_kv, k_rope)
            latent = inputs.cache.read(self.layer_idx, inputs.cache_batch)  # [B, T, d_c + d_R]
        attend = self._absorbed if inputs.absorb else self._expanded
        out = attend(q_nope, q_rope, latent, inputs.spans)
        return self.o_proj(out.flatten(-2))  # [B, S, H·d_v] -> [B, S, d]

    def _ragged(self, q_nope: Tensor, q_rope: Tensor, inputs: AttentionInputs) -> Tensor:
        """Flattened tokens [N, H, ·] of several sequences: decoding ones attend together on the absorbed
        path, each prefill chunk on the expanded path over its cached prefix."""
        batch: RaggedBatch = inputs.cache_batch
        out = q_nope.new_empty(q_nope.shape[0], self.n_heads, self.v_dim)  # [N, H, d_v]
        decoding = batch.decoding()
        if decoding:
            tokens = torch.tensor([batch.offsets[i] for i in decoding])
            sub = batch.sub_batch(decoding)
            latent = inputs.cache.read(self.layer_idx, sub)
            out[tokens] = self._absorbed(
                q_nope[tokens, None], q_rope[tokens, None], latent, sub.key_spans()
            )[:, 0]
        for i in batch.prefilling():
            tokens = slice(batch.offsets[i], batch.offsets[i + 1])
            sub = batch.sub_batch([i])
            latent = inputs.cache.read(self.layer_idx, sub)
            out[tokens] = self._expanded(q_nope[None, tokens], q_rope[None, tokens], latent, sub.key_spans())[0]
        return out

    def _expanded(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, spans: KeySpans | None) -> Tensor:
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))  # [B, T, H, d_h + d_v]
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        key = torch.cat((k_nope, k_rope[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        # The fused CPU kernel needs equal q/k/v widths: pad V to d_h + d_R and drop the padding after.
        value = F.pad(value, (0, query.shape[-1] - self.v_dim))
        out = _attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), spans, self.softmax_scale)
        return out.transpose(1, 2)[..., : self.v_dim]  # [B, S, H, d_v]

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, spans: KeySpans | None) -> Tensor:
        w_kv = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)  # [H, d_h, d_c], [H, d_v, d_c]
        q_absorbed = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # [B, S, H, d_c]
        batch, seq = q_absorbed.shape[:2]
        query = torch.cat((q_absorbed, q_rope), dim=-1).flatten(1, 2)  # [B, S·H, d_c + d_R]: MQA, one KV head
        if spans is None:
            positions = torch.arange(seq, device=latent.device).expand(batch, seq)
            spans = KeySpans(torch.zeros_like(positions), positions + 1)
        # The latent is both key and value (its k_R columns ride along and are dropped): equal widths
        # keep the fused kernel, and no copy of the cache is made.
        latent_out = _attention(
            query[:, None], latent[:, None], latent[:, None], spans.repeat_queries(self.n_heads), self.softmax_scale
        )
        latent_out = latent_out[:, 0, :, : self.kv_lora_rank].view(batch, seq, self.n_heads, self.kv_lora_rank)
        return torch.einsum("bshc,hvc->bshv", latent_out, w_uv)  # [B, S, H, d_v]


def _attention(query: Tensor, key: Tensor, value: Tensor, spans: KeySpans | None, scale: float) -> Tensor:
    """SDPA of query [B, H, S, D] over key, value [B, H or 1, T, D]. spans None: causal over equal-length
    q and k, one fused call. Otherwise QUERY_BLOCK queries at a time over the key window they see,
    unmasked when each of them sees all of it."""
    if spans is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[-2] > 1, scale=scale)
    blocks = []
    for first in range(0, query.shape[-2], QUERY_BLOCK):
        block = spans.rows(slice(first, first + QUERY_BLOCK))
        window, sees_all = block.window()
        inputs = (query[..., first : first + QUERY_BLOCK, :], key[..., window, :], value[..., window, :])
        if sees_all:
            blocks.append(F.scaled_dot_product_attention(*inputs, scale=scale))
        elif torch.is_grad_enabled():
            # Rebuilt in backward rather than saved for it: a long document's block masks add up to S × S.
            blocks.append(checkpoint(_masked_attention, *inputs, block, window, scale, use_reentrant=False))
        else:
            blocks.append(_masked_attention(*inputs, block, window, scale))
    return torch.cat(blocks, dim=-2)


def _masked_attention(
    query: Tensor, key: Tensor, value: Tensor, spans: KeySpans, window: slice, scale: float
) -> Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=spans.mask(window)[:, None], scale=scale)
