"""Model presets: LLaMA-style architectures in megatron-core's names.

A `ModelConfig` holds one architecture; `MODEL_PRESETS` has the families PoSE was run on plus two
small sizes for tests and the CPU demo. `pose_megatron.model.build_transformer_config` turns a
ModelConfig into the `TransformerConfig` PoseGPTModel is built from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """A LLaMA-style decoder: RMSNorm, SwiGLU, rotary positions, no biases, untied embeddings."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to num_attention_heads for multi-head."""
    ffn_hidden_size: int
    """Width of the SwiGLU MLP (each of gate and up)."""
    vocab_size: int
    """Tokenizer vocabulary (before padding for tensor parallelism)."""
    max_position_embeddings: int
    """The model's original context window L_c (what its RoPE was trained at)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    norm_head: bool = False
    """Baichuan2's NormHead: the output layer normalises each vocab row of its weight in the forward."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times the TP size, as Megatron does."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int):
        """Raise ValueError if this architecture cannot be split at the given TP / PP."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ValueError(
                f"--tensor-model-parallel-size {tp} must divide the attention heads "
                f"({self.num_attention_heads}) and query groups ({self.num_query_groups})"
            )
        if self.num_layers % pp:
            raise ValueError(
                f"--pipeline-model-parallel-size {pp} must divide the number of layers "
                f"({self.num_layers})"
            )


MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-7b": ModelConfig(32, 4096, 32, 32, 11008, 32000, 2048, 10000.0, 1e-6),
    "llama2-7b": ModelConfig(32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, 1e-5),
    "llama2-70b": ModelConfig(80, 8192, 64, 8, 28672, 32000, 4096, 10000.0, 1e-5),
    "llama3-8b": ModelConfig(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5),
    "baichuan2-7b": ModelConfig(32, 4096, 32, 32, 11008, 125696, 4096, 10000.0, 1e-6, norm_head=True),
    # Test and CPU-demo sizes; vocab_size is replaced by the tokenizer's.
    "tiny": ModelConfig(2, 64, 4, 2, 128, 256, 256, 10000.0, 1e-5),
    "small": ModelConfig(4, 256, 8, 4, 688, 8192, 256, 10000.0, 1e-5),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of a preset, with fields replaced (e.g. vocab_size from the tokenizer)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)
