"""DeepSeek-V2 (MLA + DeepSeekMoE) in plain PyTorch, weight-compatible with Hugging Face checkpoints."""

from .cache import CacheBatch, LatentCache, RaggedBatch
from .config import DeepseekV2Config
from .moe import ExpertBackend, LocalExperts, PendingExperts
from .transformer import CausalLMOutput, DeepseekV2ForCausalLM

__all__ = [
    "CacheBatch",
    "CausalLMOutput",
    "DeepseekV2Config",
    "DeepseekV2ForCausalLM",
    "ExpertBackend",
    "LatentCache",
    "LocalExperts",
    "PendingExperts",
    "RaggedBatch",
]
