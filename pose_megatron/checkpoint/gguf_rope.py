"""The RoPE metadata a GGUF needs for llama.cpp to compute a model's trained RoPE, and what it cannot.

llama.cpp's converter (`convert_hf_to_gguf.py`) writes RoPE keys from config.json but drops part of
what an export says (docs/reference.md, "Serving engines"): for longrope (PoSE's revised YaRN) it
writes only the scaling type, so the LLaMA runtime silently runs plain RoPE; and that runtime ignores
YaRN betas and attention factors other than the defaults. `plan_gguf_rope` says what the runtime must
find instead; gguf_export.py writes exactly that into the converter's GGUF.

How llama.cpp's runtime turns the metadata into rotations (src/llama-model.cpp hparams,
src/llama-context.cpp, ggml's rope):
- frequency_i = freq_base^(-2i/d) * freq_scale / f_i, with freq_scale = 1 / `rope.scaling.factor`
  (1 without the key) and f_i from a per-frequency factor tensor (1 without one): `rope_freqs`, or
  `rope_factors_long` / `rope_factors_short` when the scaling type is longrope (long above the
  original context length; here both are equal);
- scaling type yarn adds the YaRN ramp with the betas 32 / 1 (LLaMA reads no others) and multiplies
  cos and sin by 0.1 ln(s) + 1;
- every type multiplies cos and sin by `rope.scaling.attn_factor` (1 without the key).
So every pose_megatron type has an exact form for LLaMA: default / ntk / linear / default-YaRN as the
converter writes them, and the rest as per-frequency factors f_i = plain inv_freq_i / trained
inv_freq_i plus the attention factor (llama3 in `rope_freqs`, as the converter does; revised or
non-default YaRN as longrope). llama.cpp's Baichuan runtime passes no factor tensor to its RoPE and
applies RoPE only to 32-layer models (src/models/baichuan.cpp); what that excludes is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import gguf

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.hf_arch import HFModelInfo
from pose_megatron.rope import RopeScaling, compute_inv_freq, ntk_scaled_base, yarn_attention_factor

# The YaRN betas llama.cpp's LLaMA runtime uses (llama_hparams defaults; it reads no GGUF key for them).
RUNTIME_YARN_BETAS = (32.0, 1.0)

# llama.cpp architectures whose runtime passes no per-frequency factors to its RoPE, and the only
# layer count at which it applies RoPE at all (other counts run without position information).
_NO_FACTOR_TENSORS = {gguf.MODEL_ARCH.BAICHUAN: "src/models/baichuan.cpp"}
_ROPE_ONLY_AT_LAYERS = {gguf.MODEL_ARCH.BAICHUAN: 32}


@dataclass(frozen=True)
class GGUFRope:
    """The RoPE metadata of a GGUF, in the terms llama.cpp's runtime reads (keys are
    `gguf.Keys.Rope.*`, formatted with the architecture)."""

    freq_base: float
    """`rope.freq_base`: rope_theta (PoSE's NTK: the enlarged base)."""
    scaling_type: Optional[str] = None
    """`rope.scaling.type`, a `gguf.RopeScalingType` value; None writes no scaling type."""
    factor: Optional[float] = None
    """`rope.scaling.factor` (linear, yarn): every frequency is divided by it."""
    original_context_length: Optional[int] = None
    """`rope.scaling.original_context_length`: yarn's L_o; for longrope where the runtime would switch
    from the short to the long factors (equal here, so either is right)."""
    attn_factor: Optional[float] = None
    """`rope.scaling.attn_factor`: multiplies cos and sin (on top of yarn's own 0.1 ln s + 1)."""
    freq_factors: Optional[Tuple[float, ...]] = None
    """Per-frequency divisors f_i [d/2]: the `rope_freqs` tensor, or `rope_factors_long` and
    `rope_factors_short` (both) when scaling_type is longrope."""


def gguf_architecture(info: HFModelInfo) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of the model's GGUF (from its family record)."""
    if info.family.gguf_arch is None:
        raise ConversionError(f"{info.family.title} has no llama.cpp architecture in its family "
                              "record, so there is no GGUF export for it")
    return gguf.MODEL_ARCH[info.family.gguf_arch]


def per_frequency_factors(rope: RopeScaling, base: float, head_dim: int) -> Tuple[float, ...]:
    """f_i = plain inv_freq_i / trained inv_freq_i: what llama.cpp divides each plain frequency by."""
    plain, _ = compute_inv_freq(RopeScaling("default"), head_dim, base)  # [d/2]
    trained, _ = compute_inv_freq(rope, head_dim, base)  # [d/2]
    return tuple(float(p) / float(t) for p, t in zip(plain.double(), trained.double()))


def _runtime_computes_yarn(rope: RopeScaling) -> bool:
    """llama.cpp's own yarn is ours only with its betas and the formula's attention factor."""
    formula = yarn_attention_factor(RopeScaling("yarn", rope.factor, rope.original_max_position_embeddings))
    return ((rope.beta_fast, rope.beta_slow) == RUNTIME_YARN_BETAS
            and yarn_attention_factor(rope) == formula)


def gguf_rope_for(rope: RopeScaling, base: float, head_dim: int) -> GGUFRope:
    """The GGUF RoPE metadata under which llama.cpp's LLaMA runtime computes `rope`'s inv_freq and
    attention factor."""
    kind, types = rope.rope_type, gguf.RopeScalingType
    if kind == "default":
        return GGUFRope(freq_base=float(base))
    if kind == "ntk":  # plain RoPE with the enlarged base, as the export's rope_theta says
        return GGUFRope(freq_base=ntk_scaled_base(base, rope.factor, head_dim))
    if kind == "linear":
        return GGUFRope(freq_base=float(base), scaling_type=types.LINEAR.value, factor=rope.factor)
    if kind == "yarn" and _runtime_computes_yarn(rope):
        return GGUFRope(freq_base=float(base), scaling_type=types.YARN.value, factor=rope.factor,
                        original_context_length=rope.original_max_position_embeddings)
    factors = per_frequency_factors(rope, base, head_dim)
    if kind == "llama3":  # attention factor 1
        return GGUFRope(freq_base=float(base), freq_factors=factors)
    # yarn-revised, or yarn with other betas / attention factor: the factors carry the ramp, and no
    # rope.scaling.factor (it would divide every frequency by s once more).
    _, attention_factor = compute_inv_freq(rope, head_dim, base)
    return GGUFRope(freq_base=float(base), scaling_type=types.LONGROPE.value,
                    original_context_length=rope.original_max_position_embeddings,
                    attn_factor=attention_factor, freq_factors=factors)


def plan_gguf_rope(info: HFModelInfo) -> GGUFRope:
    """`gguf_rope_for` the model of a config.json, refused (ConversionError, with the reason) where
    llama.cpp's runtime for its architecture cannot compute it."""
    arch = gguf_architecture(info)
    model, rope = info.model, info.rope_scaling
    plan = gguf_rope_for(rope, model.rotary_base, model.head_dim)
    runtime = _NO_FACTOR_TENSORS.get(arch)
    if runtime is not None and plan.freq_factors is not None:
        raise ConversionError(
            f"llama.cpp's {info.family.title} runtime ({runtime}) passes no per-frequency factors to "
            f"its RoPE, so rope type {rope.rope_type!r} (which needs them) would run as another RoPE; "
            "only default, ntk, linear and YaRN with its default betas and attention factor run "
            "there. Serve this model with transformers, or train it with one of those types")
    layers = _ROPE_ONLY_AT_LAYERS.get(arch)
    if layers is not None and model.num_layers != layers:
        raise ConversionError(
            f"llama.cpp applies {info.family.title}'s RoPE only to {layers}-layer models (the 7B "
            f"size); this one has {model.num_layers} layers, so llama.cpp would run it without any "
            "position information")
    return plan
