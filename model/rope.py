"""Interleaved-pair RoPE with optional YaRN (SPEC §1.3, §3).

Channels (2j, 2j+1) rotate together with frequency inv_freq[j]: the GPT-J layout of the checkpoints,
not Llama's rotate_half. cos/sin are computed for the positions asked for, never tabulated for the
whole context (V2's 163840 positions would cost far more than the model's cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import DeepseekV2Config, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(config: DeepseekV2Config) -> tuple[Tensor, float]:
    """Per-pair inverse frequencies [d_R/2] and the cos/sin amplitude (YaRN's attention factor)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope = config.rope_scaling
    if rope is None or rope.type != "yarn":
        return inv_freq, 1.0
    original = rope.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(rope.beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_yarn_correction_dim(rope.beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
    inv_freq = inv_freq / rope.factor * (1 - extrapolation) + inv_freq * extrapolation
    amplitude = yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim)
    return inv_freq, amplitude


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        inv_freq, self.amplitude = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, S] -> cos, sin [B, S, d_R/2] in fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.cos(angles) * self.amplitude, torch.sin(angles) * self.amplitude


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, S, ..., d_R] with interleaved pairs; cos/sin [B, S, d_R/2] broadcast over the middle dims."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., d_R/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
