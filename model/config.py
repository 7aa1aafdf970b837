"""DeepseekV2Config: Hugging Face `config.json` in and out, plus named presets.

Reads both the legacy remote-code format (`rope_scaling` with `type`) and the transformers-5 format
(`rope_parameters` with `rope_type` and `rope_theta`). Keys this project does not model are kept and
written back unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RopeScaling(BaseModel):
    """YaRN parameters (SPEC §3). `type="default"` means plain RoPE."""

    model_config = ConfigDict(extra="allow")

    type: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV2Config(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    model_type: str = "deepseek_v2"
    architectures: list[str] = Field(default_factory=lambda: ["DeepseekV2ForCausalLM"])
    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 160
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: Literal["greedy", "gready", "group_limited_greedy"] = "group_limited_greedy"
    n_group: int = 8
    topk_group: int = 3
    routed_scaling_factor: float = 16.0
    norm_topk_prob: bool = False
    scoring_func: Literal["softmax"] = "softmax"
    hidden_act: Literal["silu"] = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Balance losses of SPEC §2.3: α1 keeps the remote-code key; α2, α3 are this project's keys.
    aux_loss_alpha: float = 0.0
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    # Token dropping (SPEC §2.4), training only. None disables it.
    capacity_factor: float | None = None
    drop_exempt_fraction: float = 0.1

    @model_validator(mode="before")
    @classmethod
    def _normalise_hf_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None and data.get("rope_scaling") is None:
            rope = dict(rope_parameters)
            if "rope_theta" in rope:
                data["rope_theta"] = rope.pop("rope_theta")
            rope_type = rope.pop("rope_type", None) or rope.pop("type", "default")
            rope.pop("type", None)
            data["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        elif isinstance(data.get("rope_scaling"), dict):
            rope = dict(data["rope_scaling"])
            rope_type = rope.pop("type", None) or rope.pop("rope_type", "default")
            rope.pop("rope_type", None)
            data["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        # transformers-5 derived keys: recomputed on save, never trusted on load.
        data.pop("head_dim", None)
        data.pop("qk_head_dim", None)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "DeepseekV2Config":
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.n_routed_experts is not None:
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (RoPE rotates channel pairs)")
        return self

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def group_limited(self) -> bool:
        return self.topk_method == "group_limited_greedy"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 (SPEC §1.3)."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope_scaling
        if rope is not None and rope.type == "yarn" and rope.mscale_all_dim:
            scale *= yarn_get_mscale(rope.factor, rope.mscale_all_dim) ** 2
        return scale

    @property
    def latent_dim(self) -> int:
        """Elements cached per token per layer: normalised c_KV plus the roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """The remote code's rule (SPEC §2.5), which honours moe_layer_freq."""
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    # ---- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | Path) -> "DeepseekV2Config":
        from .checkpoint import CheckpointError, read_json

        try:
            return cls.model_validate(read_json(Path(path)))
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"])) or "config"
            raise CheckpointError(f"{path}: {where}: {first['msg']}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DeepseekV2Config":
        path = Path(directory) / "config.json"
        if not path.is_file():  # the one line a command shows when a user names the wrong folder
            raise FileNotFoundError(f"{directory} is not a model folder (no config.json)")
        return cls.from_json_file(path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5 layout: `rope_parameters` holds rope_theta and rope_type."""
        data = self.model_dump(exclude={"rope_scaling", "rope_theta", "torch_dtype"})
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            scaling = self.rope_scaling.model_dump()
            rope["rope_type"] = scaling.pop("type")
            rope.update(scaling)
        data["rope_parameters"] = rope
        data["head_dim"] = self.qk_rope_head_dim  # what transformers-5 writes (it is the RoPE dim)
        data["qk_head_dim"] = self.qk_head_dim
        if self.torch_dtype is not None:
            data["dtype"] = self.torch_dtype
        return data

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "config.json", "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DeepseekV2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.model_validate({**PRESETS[name], **overrides})


_YARN_40 = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: SPEC §4.4 config B (q compression, group-limited routing, YaRN, scale 16).
    "tiny": {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "q_lora_rank": 24,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 16.0,
        "max_position_embeddings": 2560,
        "rope_scaling": {**_YARN_40, "original_max_position_embeddings": 64},
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "v2-lite": {
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "q_lora_rank": None,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "aux_loss_alpha": 0.001,
        "rope_scaling": _YARN_40,
    },
    "v2": {
        "aux_loss_alpha": 0.003,
        "device_aux_loss_alpha": 0.05,
        "comm_aux_loss_alpha": 0.02,
        "rope_scaling": _YARN_40,
    },
}
