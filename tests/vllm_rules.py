"""How vLLM 0.33.0 reads a LLaMA config.json's RoPE, encoded from its source (vLLM is not imported).

The source is the vllm-0.33.0 wheel (`pip download vllm==0.33.0 --no-deps`); paths below are inside its
`vllm/` package. vLLM cannot serve on the project's machines, so tests/unit/test_vllm_rules.py applies
these rules to every exported config, and scripts/check_vllm_rules.py checks this encoding against
vLLM's own `get_rope` and `ModelConfig` where that wheel imports (docs/vllm.md). Formulas are written
here in float64 from the source's description, not copied; vLLM computes them in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

VLLM_VERSION = "0.33.0"

# model_executor/models/registry.py `_PREVIOUSLY_SUPPORTED_MODELS` (checked by
# `_raise_for_unsupported`): architectures that vLLM removed, with the last version that had them.
PREVIOUSLY_SUPPORTED = {"BaiChuanForCausalLM": "0.23.0", "BaichuanForCausalLM": "0.23.0"}
# model_executor/models/registry.py `_TEXT_GENERATION_MODELS`: the LLaMA entry (llama.py).
SERVED = ("LlamaForCausalLM",)

# transformers_utils/model_arch_config_convertor.py `derive_max_model_len_and_key`: the top-level
# keys whose smallest value is the derived length (then `model_max_length`, if set, replaces it).
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# config/model.py `_get_and_verify_max_len`: rope types whose `factor` does NOT multiply the derived length.
UNSCALED_LENGTH_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
# transformers `standardize_rope_params` (the transformers vLLM 0.33 runs, >= 5.16.1): rope types into
# which a top-level original_max_position_embeddings is moved, taking priority over the dict's own.
ORIGINAL_LENGTH_TYPES = ("llama3", "yarn", "longrope")


class VllmRefuses(ValueError):
    """vLLM would refuse this config (or this --max-model-len) at load time."""


@dataclass
class VllmRope:
    """What vLLM's engine computes for one config.json (and --max-model-len, if given)."""

    rope_type: str
    """The rope type get_rope dispatches on."""
    inv_freq: np.ndarray
    """Effective inverse frequencies (radians per position) of the cache rows forward() indexes [d/2]."""
    attention_scale: float
    """What cos and sin are multiplied by (so the logits scale by its square)."""
    max_model_len: int
    """The engine's max_model_len: the user's, else the default derived from config.json."""
    cache_rows: int
    """Positions the cos/sin cache holds (positions beyond it cannot be served)."""


def served(config: dict) -> bool:
    """Whether vLLM 0.33 has an in-tree model for the config's architecture (registry.py)."""
    architectures = config.get("architectures") or []
    if any(a in PREVIOUSLY_SUPPORTED for a in architectures):
        return False  # `_raise_for_unsupported`: "supported in vLLM until v0.23.0"
    return any(a in SERVED for a in architectures)


def rope_parameters(config: dict) -> dict:
    """The dict get_rope receives: transformers' `config.rope_parameters` after vLLM's patching.

    transformers (5.20.2 measured) builds it from `rope_scaling` when config.json has one (else from
    `rope_parameters`) with the top-level `rope_theta`; transformers_utils/config.py
    `patch_rope_parameters` -> `patch_legacy_rope_type` copies a legacy `type` to `rope_type` and
    refuses a `type` that contradicts it; then transformers' `standardize_rope_params` moves a
    top-level original_max_position_embeddings in (or defaults it to max_position_embeddings) for
    llama3 / yarn / longrope, and `validate_rope` requires llama3's four keys.
    """
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if "type" in params and "rope_type" in params and params["type"] != params["rope_type"]:
        raise VllmRefuses(f"rope_type={params['rope_type']} conflicts with legacy type={params['type']}")
    params.setdefault("rope_type", params.get("type", "default"))
    if config.get("rope_theta") is not None:  # standardize_rope_params: only where the dict has none
        params.setdefault("rope_theta", config["rope_theta"])
    if params["rope_type"] in ORIGINAL_LENGTH_TYPES:
        if "original_max_position_embeddings" in config:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    if params["rope_type"] == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor"} - set(params)
        if missing:
            raise VllmRefuses(f"Missing required keys in rope_parameters for llama3: {sorted(missing)}")
    return params


def default_max_model_len(config: dict, params: dict) -> tuple[float, int]:
    """(derived length, default max_model_len) without --max-model-len.

    model_arch_config_convertor.py `derive_max_model_len_and_key`, then config/model.py
    `_get_and_verify_max_len`: the factor multiplies the derived length except for the types in
    UNSCALED_LENGTH_TYPES; longrope's default is a TOP-LEVEL original_max_position_embeddings if the
    config has one (the one inside the RoPE dict does not count).
    """
    present = [config[k] for k in LENGTH_KEYS if config.get(k) is not None]
    derived = float(min(present)) if present else 2048.0  # vLLM warns and assumes 2048
    if config.get("model_max_length"):
        derived = float(config["model_max_length"])
    if params["rope_type"] not in UNSCALED_LENGTH_TYPES:
        derived *= params.get("factor") or 1.0  # a null factor falls back to 1
    if params["rope_type"] == "longrope":
        return derived, int(config.get("original_max_position_embeddings", derived))
    return derived, int(derived)


def engine_max_model_len(config: dict, params: dict, user: Optional[int]) -> int:
    """config/model.py `_get_and_verify_max_len`: a user value above the derived length is refused
    (unless the config's model_max_length allows it; VLLM_ALLOW_LONG_MAX_MODEL_LEN not set)."""
    derived, default = default_max_model_len(config, params)
    if user is None:
        return default
    if user > derived and (config.get("model_max_length") is None or user > config["model_max_length"]):
        raise VllmRefuses(f"User-specified max_model_len ({user}) is greater than the derived "
                          f"max_model_len ({derived:g})")
    return user


def _plain_inv_freq(base: float, dim: int) -> np.ndarray:
    # rotary_embedding/base.py `RotaryEmbedding._compute_inv_freq`: 1 / base^(2i/d)
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    # rotary_embedding/common.py `yarn_get_mscale`
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict, base: float, dim: int) -> tuple[np.ndarray, float, int]:
    """rotary_embedding/__init__.py `get_rope` yarn branch -> yarn_scaling_rope.py
    `YaRNScalingRotaryEmbedding`: built with L_o (not max_position); `factor` and
    `original_max_position_embeddings` required; only beta_fast, beta_slow, mscale, mscale_all_dim,
    attention_factor and truncate are passed on (an `attn_factor` key is not)."""
    s, l_o = params["factor"], params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast", 32), params.get("beta_slow", 1)
    if params.get("attention_factor") is not None:  # __init__: attention_factor first
        scale = float(params["attention_factor"])
    elif params.get("mscale") and params.get("mscale_all_dim"):
        scale = _yarn_get_mscale(s, params["mscale"]) / _yarn_get_mscale(s, params["mscale_all_dim"])
    else:
        scale = _yarn_get_mscale(s)

    def correction_dim(rotations):  # common.py `yarn_find_correction_dim`
        return dim * math.log(l_o / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):  # common.py `yarn_find_correction_range`
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:  # common.py `yarn_linear_ramp_mask`
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # `_compute_inv_freq`: the extrapolated share
    plain = _plain_inv_freq(base, dim)
    return plain / s * (1 - keep) + plain * keep, scale, int(l_o * s)  # cache: arange(L_o * factor)


def _longrope(params: dict, base: float, dim: int, max_position: int, max_model_len: int):
    """get_rope longrope branch -> phi3_long_rope_scaled_rope.py `Phi3LongRoPEScaledRotaryEmbedding`:
    short_factor, long_factor, original_max_position_embeddings required; only short_mscale and
    long_mscale passed on (`attention_factor` and `factor` are never read). `__init__` decides once
    from the engine's max_model_len whether forward() indexes the long rows (max_model_len > L_o);
    a missing mscale is sqrt(1 + ln(max_position / L_o) / ln L_o) (1 if that ratio <= 1)."""
    l_o = params["original_max_position_embeddings"]
    use_long = max_model_len > l_o
    ratio = max_position / l_o
    formula = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(l_o))
    mscale = params.get("long_mscale" if use_long else "short_mscale")
    factors = np.asarray(params["long_factor" if use_long else "short_factor"], dtype=np.float64)
    inv_freq = _plain_inv_freq(base, dim) / factors  # `_compute_inv_freq`: 1 / (f_i * base^(2i/d))
    rows = max_position if use_long else l_o  # short cache: L_o rows, long cache: max_position rows
    return inv_freq, formula if mscale is None else float(mscale), rows


def _llama3(params: dict, base: float, dim: int) -> np.ndarray:
    """get_rope llama3 branch (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    all indexed) -> llama3_rope.py `Llama3RotaryEmbedding._compute_inv_freq`."""
    s, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    l_o = params["original_max_position_embeddings"]
    plain = _plain_inv_freq(base, dim)
    wavelength = 2 * math.pi / plain
    smooth = (l_o / wavelength - low) / (high - low) if low != high else 0.0
    between = (1 - smooth) * plain / s + smooth * plain
    return np.where(wavelength < l_o / high, plain, np.where(wavelength > l_o / low, plain / s, between))


def vllm_rope(config: dict, max_model_len: Optional[int] = None) -> VllmRope:
    """What vLLM 0.33's LLaMA computes for config.json (model_executor/models/llama.py:
    `LlamaAttention` calls get_rope(head_dim, max_position=config.max_position_embeddings,
    rope_parameters=config.rope_parameters), head_dim = config.head_dim or hidden / heads)."""
    if not served(config):
        raise VllmRefuses(f"vLLM {VLLM_VERSION} has no model for {config.get('architectures')}")
    params = rope_parameters(config)
    engine_len = engine_max_model_len(config, params, max_model_len)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dim = int(dim * params.get("partial_rotary_factor", 1.0))
    base = float(params.get("rope_theta", 10000))  # get_rope: rope_parameters.get("rope_theta", 10000)
    max_position = config.get("max_position_embeddings", 8192)
    kind = params["rope_type"]
    if kind == "default":  # base.py `RotaryEmbedding`: arange(max_position) rows, no scale
        inv_freq, scale, rows = _plain_inv_freq(base, dim), 1.0, max_position
    elif kind == "linear":  # linear_scaling_rope.py `_compute_cos_sin_cache`: t = arange(max_pos * s) / s
        s = params["factor"]
        inv_freq, scale, rows = _plain_inv_freq(base, dim) / s, 1.0, int(max_position * s)
    elif kind == "yarn":
        inv_freq, scale, rows = _yarn(params, base, dim)
    elif kind == "longrope":
        inv_freq, scale, rows = _longrope(params, base, dim, max_position, engine_len)
    elif kind == "llama3":
        inv_freq, scale, rows = _llama3(params, base, dim), 1.0, max_position
    else:  # dynamic, ntk (vLLM's own) etc.: not what pose_megatron exports
        raise NotImplementedError(f"rope type {kind!r} is not encoded here (no export writes it)")
    return VllmRope(kind, inv_freq, scale, engine_len, rows)
