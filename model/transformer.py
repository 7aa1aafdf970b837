"""Decoder layer, DeepseekV2Model and DeepseekV2ForCausalLM, with Hugging Face module names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint
from .cache import CacheBatch, KeySpans, LatentCache, RaggedBatch
from .config import DeepseekV2Config
from .generate import generate
from .mla import AttentionInputs, MultiHeadLatentAttention
from .moe import MLP, DeepseekMoE, ExpertBackend, LocalExperts, MoEOutput
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int, expert_ids: list[int] | None):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp: nn.Module = (
            DeepseekMoE(config, layer_idx, expert_ids)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, inputs: AttentionInputs, replay: Tensor | None = None) -> tuple[Tensor, MoEOutput | None]:
        """replay [B, S, K]: routing replay for an MoE layer (see DeepseekMoE)."""
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        hidden = self.post_attention_layernorm(x)
        if isinstance(self.mlp, DeepseekMoE):
            moe = self.mlp(hidden, replay)
            return x + moe.hidden, moe
        return x + self.mlp(hidden), None


class DeepseekV2Model(nn.Module):
    def __init__(self, config: DeepseekV2Config, expert_ids: list[int] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer_idx, expert_ids) for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, S, vocab]
    balance_losses: dict[str, Tensor] = field(default_factory=dict)  # α-weighted, summed over MoE layers
    tokens_per_expert: dict[int, Tensor] = field(default_factory=dict)  # MoE layer -> [E]
    routing: Tensor | None = None  # [B, S, MoE layers, K]: the experts of every token in every MoE layer


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV2Config, expert_ids: list[int] | None = None):
        """expert_ids: the routed experts held in this process (default all; [] when they are remote)."""
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, expert_ids)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_expert_backend(LocalExperts({layer: moe.experts for layer, moe in self.moe_layers().items()}))

    def moe_layers(self) -> dict[int, DeepseekMoE]:
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, DeepseekMoE)}

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        for moe in self.moe_layers().values():
            moe.backend = backend

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "DeepseekV2ForCausalLM":
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if param.dim() == 1:  # RMSNorm scales
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
        return self

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: LatentCache | None = None,
        cache_batch: CacheBatch | RaggedBatch | None = None,
        absorb: bool | None = None,
        logits_at: Tensor | None = None,
        document_ids: Tensor | None = None,
        routing: Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, S]. Without a cache, positions [B, S] default to 0..S-1, and document_ids
        [B, S] (runs of equal ids: the samples packed in a row) make attention causal within each
        document only, while positions go on counting along the row. With a cache, cache_batch says
        where the tokens go and what they see; absorb defaults to the weight-absorbed path for
        single-token decode steps. A RaggedBatch takes input_ids [1, N] (several sequences
        flattened). logits_at [n]: compute logits only at these token indices of the last dimension
        (logits [B, n, V]). routing [B, S, MoE layers, K]: routing replay, the experts each token goes
        to in each MoE layer (a token whose entries are -1 is routed by the gate); the output's
        `routing` says where every token went (and a cache that records routing keeps it)."""
        inputs = self._attention_inputs(input_ids, positions, cache, cache_batch, absorb, document_ids)
        x = self.model.embed_tokens(input_ids)
        moe_outputs: dict[int, MoEOutput] = {}
        replay = dict(zip(self.config.moe_layers, routing.unbind(dim=2))) if routing is not None else {}
        for layer_idx, layer in enumerate(self.model.layers):
            x, moe = layer(x, inputs, replay.get(layer_idx))
            if moe is not None:
                moe_outputs[layer_idx] = moe
        chosen = torch.stack([moe.expert_ids for moe in moe_outputs.values()], dim=2) if moe_outputs else None
        if cache is not None and chosen is not None:
            cache.write_routing(cache_batch, chosen)
        if logits_at is not None:
            x = x[:, logits_at]
        logits = self.lm_head(self.model.norm(x))
        return CausalLMOutput(
            logits=logits,
            balance_losses=self._weighted_balance_losses(moe_outputs),
            tokens_per_expert={i: moe.tokens_per_expert for i, moe in moe_outputs.items()},
            routing=chosen,
        )

    def _attention_inputs(
        self,
        input_ids: Tensor,
        positions: Tensor | None,
        cache: LatentCache | None,
        cache_batch: CacheBatch | RaggedBatch | None,
        absorb: bool | None,
        document_ids: Tensor | None,
    ) -> AttentionInputs:
        batch, seq = input_ids.shape
        if cache is not None and (positions is not None or document_ids is not None):
            raise ValueError("with a cache, cache_batch gives the positions; document_ids need the cache-less forward")
        if isinstance(cache_batch, RaggedBatch):
            positions = cache_batch.positions[None]
            spans = None  # each sequence of the batch gets its own, in attention
        elif cache is not None:
            positions = cache_batch.positions
            spans = cache_batch.key_spans()
        else:
            if positions is None:
                positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            spans = None if document_ids is None else KeySpans.documents(document_ids)
        cos, sin = self.model.rotary_emb(positions)
        return AttentionInputs(
            cos=cos,
            sin=sin,
            cache=cache,
            cache_batch=cache_batch,
            spans=spans,
            absorb=(cache is not None and seq == 1) if absorb is None else absorb,
        )

    def _weighted_balance_losses(self, moe_outputs: dict[int, MoEOutput]) -> dict[str, Tensor]:
        balances = [moe.balance for moe in moe_outputs.values() if moe.balance is not None]
        if not balances:
            return {}
        alphas = {
            "expert": self.config.aux_loss_alpha,
            "device": self.config.device_aux_loss_alpha,
            "comm": self.config.comm_aux_loss_alpha,
        }
        return {name: alpha * sum(getattr(b, name) for b in balances) for name, alpha in alphas.items()}

    # ---- checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        expert_ids: list[int] | None = None,
    ) -> "DeepseekV2ForCausalLM":
        """Load a Hugging Face DeepSeek-V2 folder, reading only the tensors this process holds."""
        config = DeepseekV2Config.from_pretrained(directory)
        if dtype == "auto":
            dtype = getattr(torch, config.torch_dtype or "float32")
        with torch.device("meta"):
            model = cls(config, expert_ids)
        wanted = set(model.state_dict())
        tensors = checkpoint.load_tensors(directory, wanted, dtype=dtype, device=device)
        model.load_state_dict(tensors, strict=True, assign=True)
        model.model.rotary_emb = RotaryEmbedding(config).to(device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
        dtype = next(self.parameters()).dtype
        config = self.config.model_copy(update={"torch_dtype": str(dtype).removeprefix("torch.")})
        config.save_pretrained(directory)
        tensors = {name: t for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        checkpoint.save_tensors(directory, tensors, max_shard_bytes=max_shard_bytes)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        return generate(self, prompts, max_new_tokens, **sampling)
