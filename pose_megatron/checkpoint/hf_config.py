"""RoPE scaling expressed for stock Hugging Face transformers (no remote code).

Every pose_megatron rope type has an exact stock equivalent (REFERENCE.md section 2): linear, yarn and
llama3 natively; PoSE's static NTK as default RoPE with a larger theta; PoSE's revised YaRN as longrope
with one extension factor per frequency. transformers 5 keeps these under `config.rope_parameters`
(with `rope_theta` inside).
"""

from __future__ import annotations

from pose_megatron.rope import (
    RopeScaling,
    ntk_scaled_base,
    yarn_attention_factor,
    yarn_revised_ext_factors,
)


def rope_to_hf_parameters(scaling: RopeScaling, rotary_base: float, head_dim: int) -> dict:
    """The `rope_parameters` dict that makes stock transformers compute our frequencies."""
    kind = scaling.rope_type
    if kind == "default":
        return {"rope_type": "default", "rope_theta": float(rotary_base)}
    if kind == "ntk":
        theta = ntk_scaled_base(rotary_base, scaling.factor, head_dim)
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": float(rotary_base), "factor": scaling.factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": float(rotary_base),
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
            "attention_factor": yarn_attention_factor(scaling),
        }
    if kind == "yarn-revised":
        factors = yarn_revised_ext_factors(scaling, head_dim, rotary_base)
        return {
            "rope_type": "longrope",
            "rope_theta": float(rotary_base),
            "factor": scaling.factor,
            "short_factor": factors,
            "long_factor": factors,
            "attention_factor": yarn_attention_factor(scaling),
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": float(rotary_base),
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    raise ValueError(f"no Hugging Face mapping for rope_type {kind!r}")
