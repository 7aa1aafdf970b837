"""The latent KV cache: only the normalised c_KV and the roped shared key k_R, in fixed-size blocks.

Blocks are the unit other code owns: a sequence is a list of block ids (its block table), so a cache
manager can share, copy, ship or offload blocks without knowing anything about attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import DeepseekV2Config


@dataclass
class KeySpans:
    """Which keys each query sees: the contiguous range [start, end) of its row's keys. Causal
    attention, a chunk over its cached prefix and a document mask are all such ranges, so a mask is
    two integers per query and a dense one is only ever built for a block of queries at a time."""

    start: Tensor  # [B, S] int64
    end: Tensor  # [B, S] int64

    @classmethod
    def documents(cls, document_ids: Tensor) -> KeySpans:
        """Causal within each document of a packed row: document_ids [B, S], a document being a run of
        equal ids (its tokens consecutive)."""
        index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
        first = torch.ones_like(document_ids, dtype=torch.bool)
        first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        start = torch.where(first, index, 0).cummax(dim=1).values  # [B, S]: where each token's document starts
        return cls(start, index + 1)

    def repeat_queries(self, repeats: int) -> KeySpans:
        """Each query `repeats` times in a row (queries flattened with their heads: [B, S·repeats])."""
        return KeySpans(self.start.repeat_interleave(repeats, dim=1), self.end.repeat_interleave(repeats, dim=1))

    def rows(self, queries: slice) -> KeySpans:
        return KeySpans(self.start[:, queries], self.end[:, queries])

    def window(self) -> tuple[slice, bool]:
        """The keys these queries see between them, and whether each of them sees all of those."""
        window = slice(int(self.start.min()), int(self.end.max()))
        return window, int(self.start.max()) == window.start and int(self.end.min()) == window.stop

    def mask(self, window: slice) -> Tensor:
        """[B, S, window] bool over the keys of the window."""
        keys = torch.arange(window.start, window.stop, device=self.start.device)
        return (keys >= self.start[..., None]) & (keys < self.end[..., None])


@dataclass
class CacheBatch:
    """Where one forward's new tokens go, and which cached tokens they attend to.

    Cached token j of sequence b lives at offset j of the concatenation of its blocks; a new token at
    position p is written at offset p and sees offsets 0..p.
    """

    block_tables: Tensor  # [B, max_blocks] int64
    positions: Tensor  # [B, S] int64
    _contiguous: bool | None = field(default=None, repr=False)

    def slots(self, block_size: int) -> Tensor:
        """Flat slot index of every new token in a layer's pool: [B, S]."""
        blocks = self.block_tables.gather(1, self.positions // block_size)
        return blocks * block_size + self.positions % block_size

    @property
    def context_len(self) -> int:
        """Keys to read per sequence (the longest sequence's length after this forward)."""
        return int(self.positions.max()) + 1

    def key_spans(self) -> KeySpans | None:
        """New token at position p sees cached offsets 0..p. None when that is plain causal attention
        over the new tokens (a fresh prefill), which attention kernels do unmasked."""
        keys = torch.arange(self.context_len, device=self.positions.device)
        if self.positions.shape[1] == len(keys) and bool((self.positions == keys).all()):
            return None
        return KeySpans(torch.zeros_like(self.positions), self.positions + 1)

    def is_contiguous(self, num_blocks: int) -> bool:
        """True when sequence b owns blocks [b·n, (b+1)·n): its context is then a view, not a gather."""
        if self._contiguous is None:
            batch, width = self.block_tables.shape
            expected = torch.arange(batch * width, device=self.block_tables.device).view(batch, width)
            self._contiguous = batch * width == num_blocks and torch.equal(self.block_tables, expected)
        return self._contiguous


@dataclass
class RaggedBatch:
    """Several sequences' new tokens flattened into one row (continuous batching): sequence i brings
    seq_lens[i] tokens (a prefill chunk, or 1 when decoding) at consecutive positions from starts[i]."""

    block_tables: Tensor  # [B, max_blocks] int64
    starts: list[int]
    seq_lens: list[int]

    def __post_init__(self):
        self.offsets = [0]
        for n in self.seq_lens:
            self.offsets.append(self.offsets[-1] + n)
        self.positions = torch.cat(
            [torch.arange(start, start + n) for start, n in zip(self.starts, self.seq_lens)]
        ).to(self.block_tables.device)  # [N]
        self.row_of = torch.repeat_interleave(
            torch.arange(len(self.seq_lens), device=self.block_tables.device),
            torch.tensor(self.seq_lens, device=self.block_tables.device),
        )  # [N]: the sequence each token belongs to

    def slots(self, block_size: int) -> Tensor:
        """[N] flat slot of every new token."""
        blocks = self.block_tables[self.row_of, self.positions // block_size]
        return blocks * block_size + self.positions % block_size

    @property
    def last_tokens(self) -> Tensor:
        """[B] flat index of each sequence's last new token."""
        return torch.tensor(self.offsets[1:], device=self.block_tables.device) - 1

    def decoding(self) -> list[int]:
        return [i for i, n in enumerate(self.seq_lens) if n == 1]

    def prefilling(self) -> list[int]:
        return [i for i, n in enumerate(self.seq_lens) if n > 1]

    def sub_batch(self, rows: list[int]) -> CacheBatch:
        """These sequences as a rectangular batch (they must bring equally many tokens)."""
        positions = torch.stack([self.positions[self.offsets[i] : self.offsets[i + 1]] for i in rows])
        return CacheBatch(self.block_tables[rows], positions)


class LatentCache:
    """Per layer a pool of blocks [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim].

    With record_routing, every slot also keeps the experts its token was routed to in each MoE layer
    (GRPO's routing replay reads them back for a finished sequence); -1 marks a slot with no record."""

    def __init__(
        self,
        config: DeepseekV2Config,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        record_routing: bool = False,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_lora_rank = config.kv_lora_rank
        # [layers, num_blocks, block_size, d_c + d_R]: one tensor, so a block's every layer moves at once.
        self.pools = torch.zeros(
            config.num_hidden_layers, num_blocks, block_size, config.latent_dim, dtype=dtype, device=device
        )
        routing_shape = (num_blocks, block_size, len(config.moe_layers), config.num_experts_per_tok)
        self.routing = torch.full(routing_shape, -1, dtype=torch.int16, device=device) if record_routing else None

    @staticmethod
    def bytes_per_token(config: DeepseekV2Config, dtype: torch.dtype = torch.float32) -> int:
        return config.latent_dim * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        routing = 0 if self.routing is None else self.routing.numel() * self.routing.element_size()
        return self.pools.numel() * self.pools.element_size() + routing

    @classmethod
    def for_batch(
        cls, config: DeepseekV2Config, batch: int, max_tokens: int, block_size: int = 16, **kwargs
    ) -> tuple["LatentCache", Tensor]:
        """A cache where sequence b owns the contiguous blocks [b·n, (b+1)·n), and its block tables."""
        width = -(-max_tokens // block_size)
        cache = cls(config, batch * width, block_size, **kwargs)
        return cache, torch.arange(batch * width, device=cache.pools.device).view(batch, width)

    def write(self, layer: int, batch: CacheBatch | RaggedBatch, c_kv: Tensor, k_rope: Tensor) -> None:
        """c_kv [..., d_c] (normalised), k_rope [..., d_R] (roped) into the new tokens' slots."""
        pool = self.pools[layer].view(-1, self.pools.shape[-1])
        latent = torch.cat((c_kv, k_rope), dim=-1).to(pool.dtype)
        pool.index_copy_(0, batch.slots(self.block_size).flatten(), latent.reshape(-1, latent.shape[-1]))

    def read(self, layer: int, batch: CacheBatch) -> Tensor:
        """The context of every sequence: [B, T, d_c + d_R], T = batch.context_len."""
        length = batch.context_len
        width = -(-length // self.block_size)
        pool = self.pools[layer]
        if batch.is_contiguous(self.num_blocks):
            return pool.view(batch.block_tables.shape[0], -1, pool.shape[-1])[:, :length]
        blocks = pool[batch.block_tables[:, :width]]  # [B, width, block_size, D]
        return blocks.flatten(1, 2)[:, :length]

    def write_routing(self, batch: CacheBatch | RaggedBatch, expert_ids: Tensor) -> None:
        """expert_ids [..., MoE layers, K] of the new tokens, into their slots (when recording)."""
        if self.routing is not None:
            slots = self.routing.view(-1, *self.routing.shape[2:])
            slots.index_copy_(0, batch.slots(self.block_size).flatten(), expert_ids.reshape(-1, *slots.shape[1:]).to(slots.dtype))

    def read_routing(self, block_table: list[int], length: int) -> Tensor:
        """[length, MoE layers, K] int64: the recorded experts of a sequence's first `length` tokens."""
        if self.routing is None:
            raise RuntimeError("this cache does not record routing")
        blocks = torch.tensor(block_table[: -(-length // self.block_size)], dtype=torch.long)
        return self.routing[blocks].flatten(0, 1)[:length].long()

    def export_blocks(self, block_ids: Tensor) -> Tensor:
        """[layers, n, block_size, D]: the blocks' contents, for copy-on-write, offload or shipping."""
        return self.pools[:, block_ids].clone()

    def import_blocks(self, block_ids: Tensor, data: Tensor) -> None:
        """Restore exported blocks (routing records do not travel with them: those slots have none)."""
        self.pools[:, block_ids] = data.to(self.pools.dtype)
        if self.routing is not None:
            self.routing[block_ids] = -1

    def copy_blocks(self, sources: Tensor, targets: Tensor) -> None:
        """Copy-on-write of shared partial blocks."""
        self.pools[:, targets] = self.pools[:, sources]
        if self.routing is not None:
            self.routing[targets] = self.routing[sources]
