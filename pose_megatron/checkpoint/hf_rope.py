"""RoPE scaling <-> Hugging Face config.json, both directions, for stock transformers (no remote code).

Every pose_megatron rope type has an exact stock equivalent (docs/reference.md, "RoPE scaling" and
"Hugging Face transformers"): linear, yarn and llama3 natively; PoSE's static NTK as default RoPE with
a larger theta; PoSE's revised YaRN as longrope with one extension factor per frequency.
transformers 5 keeps these under `config.rope_parameters` (with `rope_theta` inside).

Serving engines read the same config.json differently (docs/reference.md, "Serving engines"), so an
export also carries the few keys they need to see the trained RoPE: `short_mscale` / `long_mscale` for
vLLM's longrope, a legacy `type` for the early-2025 llama.cpp converter's linear, and a top-level
`original_max_position_embeddings` for that converter's llama3 (`rope_config_fields`).

Reading accepts transformers 4.x / 5 spellings, the PoSE authors' released configs and our own
exports (whose POSE_CONFIG_KEY block re-imports exactly), refusing what we cannot reproduce.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.rope import (
    RopeScaling,
    ntk_scaled_base,
    yarn_attention_factor,
    yarn_revised_ext_factors,
)

# The key under which exports record our own description of the RoPE (stock transformers ignores it;
# re-importing an export reads it back exactly, e.g. NTK instead of "default with a larger theta").
POSE_CONFIG_KEY = "pose_megatron"

# rope_scaling "type" values of the PoSE authors' released checkpoints (legacy key "type", no
# "rope_type"). Their "yarn" is the revised formula (blend of wavelengths); "vanilla_ntk" is static NTK.
POSE_RELEASE_ROPE_TYPES = {"linear": "linear", "vanilla_ntk": "ntk", "yarn": "yarn-revised"}

# Our scaled rope types -> the stock rope_type that computes the same frequencies.
_HF_ROPE_TYPES = {"linear": "linear", "yarn": "yarn", "yarn-revised": "longrope", "llama3": "llama3"}

# Stock rope types whose legacy `rope_scaling` dict also gets the old key `type`: the early-2025
# llama.cpp converter reads linear scaling only from `type` (its llama3 reads `rope_type`). Never
# "yarn": `type: yarn` is the PoSE releases' spelling of REVISED YaRN, and this importer reads it so.
_LEGACY_TYPE_KEY = ("linear",)

# Stock rope types whose original length also goes to the top level of config.json: the early-2025
# llama.cpp converter's llama3 reads it only there (default 8192). Not longrope: vLLM would take a
# top-level value as its default max_model_len (docs/reference.md, "Serving engines").
_TOP_LEVEL_ORIGINAL_LENGTH = ("llama3",)

# Stock rope types for which transformers 5 moves a top-level original_max_position_embeddings into
# the RoPE dict, preferring it over the dict's own (`standardize_rope_params`).
_ORIGINAL_LENGTH_TYPES = ("llama3", "yarn", "longrope")


def rope_to_hf_parameters(scaling: RopeScaling, rotary_base: float, head_dim: int) -> dict:
    """The `rope_parameters` dict that makes stock transformers compute our frequencies."""
    kind = scaling.rope_type
    if kind in ("default", "ntk"):  # static NTK is plain RoPE with a larger base
        theta = ntk_scaled_base(rotary_base, scaling.factor, head_dim) if kind == "ntk" else rotary_base
        return {"rope_type": "default", "rope_theta": float(theta)}
    if kind not in _HF_ROPE_TYPES:
        raise ValueError(f"no Hugging Face mapping for rope_type {kind!r}")
    params = {"rope_type": _HF_ROPE_TYPES[kind], "rope_theta": float(rotary_base), "factor": scaling.factor}
    if kind != "linear":
        params["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if kind == "yarn":
        params.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
    if kind == "yarn-revised":
        factors = yarn_revised_ext_factors(scaling, head_dim, rotary_base)
        params.update(short_factor=factors, long_factor=factors)
    if kind in ("yarn", "yarn-revised"):
        params["attention_factor"] = yarn_attention_factor(scaling)
    if kind == "yarn-revised":
        # vLLM's longrope never reads attention_factor, only these two (else sqrt(1 + ln s / ln L_o));
        # transformers logs them as unrecognised and keeps attention_factor.
        params.update(short_mscale=params["attention_factor"], long_mscale=params["attention_factor"])
    if kind == "llama3":
        params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    return params


def rope_config_fields(scaling: RopeScaling, rotary_base: float, head_dim: int) -> dict:
    """The top-level config.json fields of an export's RoPE, for every reader at once.

    transformers 5 reads `rope_parameters`; transformers 4.x, vLLM (through transformers) and
    llama.cpp's converters read `rope_scaling` and the top-level `rope_theta` (transformers 5 too, and
    prefers them when both are present), so both spellings say the same thing.
    """
    params = rope_to_hf_parameters(scaling, rotary_base, head_dim)
    stock_type = params["rope_type"]
    legacy = {k: v for k, v in params.items() if k != "rope_theta"}
    if stock_type in _LEGACY_TYPE_KEY:
        legacy["type"] = stock_type
    fields = {
        "rope_parameters": params,
        "rope_scaling": None if stock_type == "default" else legacy,
        "rope_theta": params["rope_theta"],
    }
    if stock_type in _TOP_LEVEL_ORIGINAL_LENGTH:
        fields["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    return fields


def _implicit_attention_factor(rope: RopeScaling) -> RopeScaling:
    """`rope` with attention_factor None when it is the formula's value (keep it implicit)."""
    if rope.attention_factor is not None and rope.attention_factor == yarn_attention_factor(
            dataclasses.replace(rope, attention_factor=None)):
        rope.attention_factor = None
    return rope


def rope_from_hf_config(
    config: dict, head_dim: int, *, legacy_yarn: str = "revised"
) -> Tuple[RopeScaling, float, int, int]:
    """(RopeScaling, rotary base, training window L_c, target length) from a config.json.

    Reads, in this order: our own export block (exact), `rope_scaling` + top-level `rope_theta`
    (transformers 4.x and the PoSE releases; transformers 5 also prefers it when both are present),
    then transformers 5 `rope_parameters`.
    """
    if legacy_yarn not in ("revised", "standard"):
        raise ValueError(f"legacy_yarn must be 'revised' or 'standard', got {legacy_yarn!r}")
    max_pos = config["max_position_embeddings"]
    ours = config.get(POSE_CONFIG_KEY)
    if ours is None:
        return _rope_from_stock_fields(config, head_dim, max_pos, legacy_yarn)
    try:
        rope = RopeScaling(**ours["rope_scaling"])
        base = float(ours["rotary_base"])
        window = int(ours["max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json {POSE_CONFIG_KEY!r} block is malformed ({e})") from e
    # The stock fields are what transformers runs: they must say the same thing.
    expected = rope_to_hf_parameters(rope, base, head_dim)
    found = _stock_rope_dict(config)
    for key in _ENGINE_ONLY_KEYS:  # exports written before these keys existed re-import as they are
        if key not in found:
            expected.pop(key, None)
    if _normalise_stock(expected) != _normalise_stock(found):
        raise ConversionError(
            f"config.json's {POSE_CONFIG_KEY!r} block ({rope}, base {base}) disagrees with its stock "
            f"RoPE fields {found}; was one of them edited? Remove the {POSE_CONFIG_KEY!r} block to "
            "import what transformers would compute."
        )
    return rope, base, window, max_pos


def _stock_rope_dict(config: dict) -> dict:
    """The RoPE dict transformers 5 builds from a config: rope_scaling wins over rope_parameters,
    and a top-level original_max_position_embeddings is moved in (refused if it contradicts one
    already there: engines read one or the other)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"rope_scaling / rope_parameters must be a JSON object, got {params!r}")
    params = dict(params)
    if "rope_type" not in params and "type" not in params and params and all(
        isinstance(v, dict) for v in params.values()
    ):
        raise ConversionError("per-layer-type rope_parameters are not supported (one RoPE per model)")
    if "rope_type" in params and "type" in params and params["rope_type"] != params["type"]:
        raise ConversionError(f"the RoPE parameters say rope_type {params['rope_type']!r} but type "
                              f"{params['type']!r}; readers disagree on which wins, keep one")
    theta = config.get("rope_theta", 10000.0)
    params.setdefault("rope_theta", theta)
    top_level = config.get("original_max_position_embeddings")
    if top_level is not None and params.get("rope_type", params.get("type")) in _ORIGINAL_LENGTH_TYPES:
        inside = params.setdefault("original_max_position_embeddings", top_level)
        if inside != top_level:
            raise ConversionError(
                f"config.json has original_max_position_embeddings {top_level} at the top level but "
                f"{inside} in its RoPE parameters; transformers 5 uses the top-level one, vLLM and "
                "llama.cpp the other. Keep one value")
    return params


# RoPE keys that only serving engines read (transformers ignores them): vLLM's longrope scales.
_ENGINE_ONLY_KEYS = ("short_mscale", "long_mscale")


def _normalise_stock(params: dict) -> dict:
    out = {k: v for k, v in params.items() if k != "type"}
    out["rope_type"] = params.get("rope_type", params.get("type", "default"))
    out["rope_theta"] = float(out["rope_theta"])
    return out


# Keys each stock rope_type may carry (beyond rope_type / type / rope_theta), with their no-op values
# for keys we accept only at that value.
_ROPE_KEYS = {
    "default": {},
    "linear": {"factor": None},
    "vanilla_ntk": {"factor": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": None,
             "beta_slow": None, "attention_factor": None, "truncate": True, "mscale": 1,
             "mscale_all_dim": 0, "finetuned": None, "extrapolation_factor": 1, "attn_factor": 1},
    "longrope": {"factor": None, "original_max_position_embeddings": None, "short_factor": None,
                 "long_factor": None, "attention_factor": None, "short_mscale": None, "long_mscale": None},
    "llama3": {"factor": None, "original_max_position_embeddings": None, "low_freq_factor": None,
               "high_freq_factor": None},
}


def _rope_from_stock_fields(config, head_dim, max_pos, legacy_yarn):
    params = _stock_rope_dict(config)
    legacy = "rope_type" not in params and "type" in params
    kind = params.get("rope_type", params.get("type", "default"))
    base = params["rope_theta"]
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ConversionError(f"rope_theta must be a number > 1, got {base!r}")
    base = float(base)
    if kind == "dynamic":
        raise ConversionError(
            "rope_scaling type 'dynamic' (dynamic NTK) recomputes frequencies from the current "
            "length at inference time; no fixed frequencies exist to train with. Use 'linear', "
            "static NTK ('vanilla_ntk'), 'yarn' or 'llama3'."
        )
    if kind == "vanilla_ntk" and not legacy:
        raise ConversionError("'vanilla_ntk' is only known as the legacy rope_scaling 'type' key")
    if kind not in _ROPE_KEYS:
        raise ConversionError(
            f"unknown RoPE scaling type {kind!r}; supported: default, linear, vanilla_ntk (static "
            "NTK), yarn, longrope (as exported for revised YaRN), llama3"
        )
    allowed = _ROPE_KEYS[kind]
    unknown = sorted(set(params) - set(allowed) - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise ConversionError(f"unknown field(s) {unknown} in the {kind!r} RoPE parameters {params}")
    for key, neutral in allowed.items():
        if neutral is not None and key in params and params[key] != neutral:
            raise ConversionError(f"RoPE field {key}={params[key]!r} is not supported (only "
                                  f"{neutral!r}); the frequencies would differ from pose_megatron's")
    if kind == "default":
        return RopeScaling("default"), base, max_pos, max_pos
    factor = params.get("factor")
    if factor is None and kind != "longrope":
        raise ConversionError(f"RoPE scaling {kind!r} needs a 'factor' ({params})")
    omax = params.get("original_max_position_embeddings")
    if kind in ("linear", "vanilla_ntk"):
        # PoSE releases (and most linear configs) set max_position_embeddings to the target length.
        window = omax or max(1, round(max_pos / factor))
        rope_type = POSE_RELEASE_ROPE_TYPES[kind] if kind == "vanilla_ntk" else "linear"
        return _scaling(rope_type, factor=factor), base, window, max_pos
    if kind == "llama3":
        if omax is None:  # transformers' llama3 needs it too
            raise ConversionError("this llama3 config has no original_max_position_embeddings; add "
                                  "it to rope_scaling (8192 for LLaMA-3.1)")
        return _scaling("llama3", factor=factor, original_max_position_embeddings=omax,
                        low_freq_factor=params.get("low_freq_factor"),
                        high_freq_factor=params.get("high_freq_factor")), base, omax, max_pos
    if kind == "yarn":
        if omax is None:
            raise ConversionError(
                f"this yarn config has no original_max_position_embeddings, so its pre-training "
                f"length L_o is ambiguous: stock transformers would use max_position_embeddings "
                f"({max_pos}), while the PoSE convention (max_position_embeddings = the target) means "
                f"max_position_embeddings / factor ({max_pos / factor:g}); the YaRN frequencies "
                "differ between the two. Add \"original_max_position_embeddings\" to rope_scaling "
                "in config.json with the length the model was pre-trained at")
        revised = legacy and legacy_yarn == "revised" and "finetuned" not in params
        rope = _scaling("yarn-revised" if revised else "yarn", factor=factor,
                        original_max_position_embeddings=omax,
                        beta_fast=params.get("beta_fast", 32.0), beta_slow=params.get("beta_slow", 1.0),
                        attention_factor=params.get("attention_factor"))
        return _implicit_attention_factor(rope), base, omax, max_pos
    return _rope_from_longrope(params, head_dim, base, max_pos)


def _scaling(rope_type, **fields) -> RopeScaling:
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return RopeScaling(rope_type, **fields)
    except ValueError as e:
        raise ConversionError(f"invalid {rope_type!r} RoPE parameters: {e}") from e


def _rope_from_longrope(params, head_dim, base, max_pos):
    """longrope is accepted when it is revised YaRN (how we export it): one factor list for both."""
    short, long_ = params.get("short_factor"), params.get("long_factor")
    omax = params.get("original_max_position_embeddings")
    factor = params.get("factor") or (max_pos / omax if omax else None)
    if short != long_ or not isinstance(short, list) or omax is None or factor is None:
        raise ConversionError(
            "longrope is only importable as PoSE's revised YaRN: short_factor == long_factor, with "
            "'factor' and 'original_max_position_embeddings' set"
        )
    attention_factor = params.get("attention_factor")
    for key in ("short_mscale", "long_mscale"):  # what vLLM uses instead of attention_factor
        if key in params and (attention_factor is None or params[key] != attention_factor):
            raise ConversionError(
                f"longrope {key}={params[key]!r} differs from attention_factor={attention_factor!r}: "
                "vLLM would scale attention by the first, transformers by the second; set both to "
                "the same value")
    rope = _scaling("yarn-revised", factor=factor, original_max_position_embeddings=omax,
                    attention_factor=attention_factor)
    if [float(x) for x in short] != yarn_revised_ext_factors(rope, head_dim, base):
        raise ConversionError(
            "longrope factors are not the revised-YaRN factors for factor "
            f"{factor} and original_max_position_embeddings {omax} (beta_fast 32, beta_slow 1); "
            "arbitrary per-frequency factors (e.g. Phi-3 LongRoPE) are not a pose_megatron rope type"
        )
    return _implicit_attention_factor(rope), base, omax, max_pos
