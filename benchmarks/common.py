"""What the benchmarks share (the CPU scripts here and the GPU check in benchmarks/gpu/).

Device-synchronised timing, peak memory that means the same thing on a GPU (allocated bytes) and
on CPU (the process's resident set), PoSE position batches drawn by the project's own sampler, and
the PoseGPTModel / stock megatron-core GPTModel pair holding one set of weights. The scripts import
this module as `common` (each puts benchmarks/ on sys.path, as running a script from here does).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from pose_megatron import runtime
from pose_megatron.model import build_model, build_transformer_config, get_layer_spec
from pose_megatron.positions import PoseSampling, sample_pose
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling
from pose_megatron.train.progress import peak_memory_bytes


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock time covers it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> Tuple[object, float]:
    """(fn(), seconds), with the device synchronised before and after."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status (peak memory needs Linux)")


def reset_peak_memory() -> int:
    """Restart the peak-memory mark; returns the memory in use now (bytes).

    GPU: torch's allocated-bytes peak (live tensors only, so the caching allocator and earlier
    work in the process do not count). CPU: the kernel's peak-RSS mark of this process (Linux).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status_bytes("VmRSS")


def peak_memory() -> int:
    """The peak since the last reset_peak_memory() (bytes), as the trainer reports it."""
    synchronize()
    return peak_memory_bytes()


def pose_position_batch(batch: int, seq: int, target: int, seed: int = 0) -> torch.Tensor:
    """Position ids [batch, seq] of `batch` PoSE samples (two chunks, L_c = seq, L_t = target),
    each drawn by the project's sampler, so every sample has its own skip."""
    rng = np.random.default_rng(seed)
    sampling = PoseSampling(seq_length=seq, target_length=target)
    rows = [sample_pose(rng, sampling.window, sampling).position_ids for _ in range(batch)]
    return torch.from_numpy(np.stack(rows)).to(runtime.get_device())  # [b, s]


def build_model_pair(model_cfg: ModelConfig, scaling: RopeScaling, seq: int,
                     dtype: torch.dtype = torch.float32):
    """(PoseGPTModel, stock GPTModel) with the same weights and the same local layer spec (SDPA
    attention), at params dtype `dtype` on this rank's device; megatron-core must be initialised.

    The stock model builds RoPE from arange(seq) itself; linear scaling maps onto its
    seq_len_interpolation_factor, so with contiguous positions both compute the same function.
    Other scaling types have no stock equivalent: there the stock model runs plain RoPE, which
    costs the same (the scaling lives in precomputed frequencies).
    """
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(model_cfg, params_dtype=dtype)
    pose = build_model(model_cfg, config, scaling, use_transformer_engine=False,
                       max_sequence_length=seq)
    stock = GPTModel(
        config, get_layer_spec(False), vocab_size=model_cfg.padded_vocab_size(),
        max_sequence_length=seq, position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
        seq_len_interpolation_factor=scaling.factor if scaling.rope_type == "linear" else None,
        share_embeddings_and_output_weights=False,
    ).to(runtime.get_device())
    share_weights(pose, stock)
    return pose, stock


def share_weights(source, target) -> None:
    """Copy every weight of `source` into `target` (same architecture; the rotary modules, which
    hold no weights, may differ)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"the two models differ in weights: missing {missing}, unexpected {unexpected}")


def step_seconds(model, tokens: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> float:
    """Wall time of one forward + backward (token losses summed), gradients dropped after."""

    def step():
        model(tokens, positions, None, labels=labels).sum().backward()

    _, seconds = timed(step)
    model.zero_grad(set_to_none=True)
    return seconds


def interleaved_step_times(runs: Dict[str, Tuple[object, torch.Tensor]], tokens: torch.Tensor,
                           labels: torch.Tensor, repeats: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Step times of each named (model, positions [b, s]), alternating between the runs every step
    so machine noise hits all alike; the first `warmup` rounds (kernel choice, compilation) are
    dropped."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, (model, positions) in runs.items():
            seconds = step_seconds(model, tokens, positions, labels)
            if i >= warmup:
                times[name].append(seconds)
    return times


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, seq] drawn uniformly from the vocabulary, on this rank's device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(runtime.get_device())


def describe_device() -> str:
    """The device in words: the GPU's name, or the CPU and its thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def finite_or_none(value: Optional[float]) -> Optional[float]:
    """A float for JSON: None where there is no number (NaN or infinity would not be valid JSON)."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)
