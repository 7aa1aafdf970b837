"""Tiny configs and transformers-made checkpoints shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import torch

from model import DeepseekV2Config

# SPEC §4.4 config A: no q compression, greedy routing, plain RoPE.
CONFIG_A = DeepseekV2Config.preset(
    "tiny", q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, rope_scaling=None
)
# Config B: q compression, group-limited routing, YaRN, routed scaling 16.
CONFIG_B = DeepseekV2Config.preset("tiny")
CONFIGS = {"A": CONFIG_A, "B": CONFIG_B}


def hf_model(config: DeepseekV2Config, seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with weights large enough that logits differ visibly."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**config.to_hf_dict()))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reference.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if param.dim() == 1 else 0.1 * noise)
    return reference.eval()


def hf_checkpoint(config: DeepseekV2Config, directory: Path, seed: int = 0):
    reference = hf_model(config, seed)
    reference.save_pretrained(directory)
    return reference


def random_model(config: DeepseekV2Config, seed: int = 0, std: float = 0.1):
    """Our model with weights large enough that logits are of order 1 (comparisons then mean something)."""
    from model import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(config.model_copy(update={"initializer_range": std})).init_weights(seed).eval()
