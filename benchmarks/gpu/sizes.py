"""The sizes of the GPU check: the real ones for one H200, and tiny ones for the CPU dry-run.

The dry-run runs every line of every section at sizes a CPU finishes in seconds; only the numbers
differ. The H200 sizes fit its 139 GiB and its caps with room to spare (estimates in docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple

from pose_megatron.presets import ModelConfig

SECTIONS = ("correctness", "step_time", "long_context", "evaluation")
"""The sections, in the order they run."""

H200_DENSE_BF16_TFLOPS = 989.0
"""The H200's spec dense bf16 peak (TFLOP/s), the usual denominator of model FLOPs utilisation."""

H200_MEASURED_MATMUL_TFLOPS = 788.0
"""What one large bf16 matmul reached on these H200 machines (TFLOP/s): the practical ceiling."""


@dataclass(frozen=True)
class CheckSizes:
    """Everything that differs between the H200 run and the dry-run."""

    dtype: str
    """Compute dtype of the step-time and evaluation sections (correctness is always bf16)."""
    trainer_precision: str
    """The trainer's precision in the long-context section."""
    caps: Dict[str, float]
    """Seconds each section may run (its own time cap)."""
    correctness_model: ModelConfig
    """Model compared against transformers (max_position_embeddings is its window L_c)."""
    correctness_target: int
    """L_t of the PoSE positions there (linear RoPE by L_t / L_c)."""
    correctness_batch: int
    """Samples, each with its own PoSE positions."""
    step_model: ModelConfig
    """The LLaMA-shaped model of the step-time and long-context sections."""
    step_seq: int
    """Training window L_c of the step-time section."""
    step_target: int
    """L_t of its PoSE positions."""
    step_batches: Tuple[int, ...]
    """Micro-batch sizes timed."""
    step_warmup: int
    """Untimed rounds first (kernel choice, torch.compile of the fused SwiGLU)."""
    step_repeats: int
    """Timed rounds (each times every model once, alternating)."""
    long_seq: int
    """PoSE's window in the long-context section."""
    long_target: int
    """The target context: PoSE's L_t, and the full-length run's window."""
    long_steps: int
    """Timed training steps per run (after one untimed step)."""
    eval_model: ModelConfig
    """Model of the evaluation section."""
    eval_length: int
    """Evaluation window (one document of length - 1 tokens)."""
    eval_rounds: int
    """Timed rounds per side (the best is reported)."""


def _llama_1b(window: int) -> ModelConfig:
    # TinyLlama-1.1B's shape: 22 layers, width 2048, 32 heads in 4 key/value groups.
    return ModelConfig(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                       ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=window)


H200 = CheckSizes(
    dtype="bf16", trainer_precision="bf16",
    # The first section also pays torch.compile's start (megatron's fused SwiGLU, on GPU only).
    caps={"correctness": 40.0, "step_time": 60.0, "long_context": 50.0, "evaluation": 60.0},
    correctness_model=ModelConfig(num_layers=4, hidden_size=1024, num_attention_heads=16,
                                  num_query_groups=4, ffn_hidden_size=2816, vocab_size=32000,
                                  max_position_embeddings=2048),
    correctness_target=16384, correctness_batch=4,
    step_model=_llama_1b(4096), step_seq=4096, step_target=32768, step_batches=(1, 4),
    step_warmup=3, step_repeats=8,
    long_seq=4096, long_target=32768, long_steps=3,
    eval_model=ModelConfig(num_layers=8, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                           ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=4096),
    eval_length=32768, eval_rounds=3,
)

_TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, vocab_size=256, max_position_embeddings=32)

# Every section on CPU at the tiny model's size; the numbers only prove the code path. The caps are
# generous (the dry-run shares a loaded CPU; its test shrinks one to see a time-out), and the trainer
# runs in fp32 (megatron-core's bf16 optimizer takes CUDA tensors only).
DRY_RUN = dataclasses.replace(
    H200, trainer_precision="fp32", caps={name: 120.0 for name in SECTIONS},
    correctness_model=_TINY, correctness_target=256, correctness_batch=2,
    step_model=_TINY, step_seq=32, step_target=256, step_batches=(1, 2), step_warmup=1, step_repeats=2,
    long_seq=32, long_target=128, long_steps=1,
    eval_model=_TINY, eval_length=128, eval_rounds=1,
)

MODES = {"h200": H200, "dry-run": DRY_RUN}
