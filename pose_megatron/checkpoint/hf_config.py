"""RoPE scaling expressed for stock Hugging Face transformers (no remote code).

Every pose_megatron rope type has an exact stock equivalent (REFERENCE.md section 2): linear, yarn and
llama3 natively; PoSE's static NTK as default RoPE with a larger theta; PoSE's revised YaRN as longrope
with one extension factor per frequency. transformers 5 keeps these under `config.rope_parameters`
(with `rope_theta` inside).

The other direction reads a config.json (LLaMA-1/2/3, Baichuan-7B / Baichuan2-7B, the PoSE authors'
released configs, our own exports) into ModelConfig + RopeScaling, refusing what we cannot reproduce.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from pose_megatron.presets import ModelConfig
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


# ============================================================================ Hugging Face -> ours
#
# Reading a config.json: which family it is, its architecture in megatron-core's names, and its RoPE.
# Every refusal is a ConversionError that says what was found and what would be accepted.

class ConversionError(ValueError):
    """A checkpoint or config cannot be converted; the message says why and what would work."""


# The key under which exports record our own description of the RoPE (stock transformers ignores it;
# re-importing an export reads it back exactly, e.g. NTK instead of "default with a larger theta").
POSE_CONFIG_KEY = "pose_megatron"

# rope_scaling "type" values of the PoSE authors' released checkpoints (legacy key "type", no
# "rope_type"). Their "yarn" is the revised formula (blend of wavelengths); "vanilla_ntk" is static NTK.
POSE_RELEASE_ROPE_TYPES = {"linear": "linear", "vanilla_ntk": "ntk", "yarn": "yarn-revised"}

# Baichuan's published configs (remote code): architecture name -> (auto_map classes, NormHead).
BAICHUAN_VERSIONS = {
    "BaiChuanForCausalLM": {  # Baichuan-7B
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaiChuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM",
        },
        "norm_head": False,
    },
    "BaichuanForCausalLM": {  # Baichuan2-7B (Baichuan-13B / Baichuan2-13B share the name: ALiBi)
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "norm_head": True,
    },
}

_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "vocab_size")


@dataclass
class HFModelInfo:
    """What a Hugging Face config.json says, in pose_megatron's terms."""

    family: str
    """"llama" or "baichuan" (Baichuan-7B and Baichuan2-7B; model.norm_head tells them apart)."""
    model: ModelConfig
    """Architecture; max_position_embeddings is the original (training) window L_c."""
    rope_scaling: RopeScaling
    """The RoPE scaling the checkpoint was trained with."""
    target_length: Optional[int]
    """The extended context (config max_position_embeddings) when the RoPE is scaled, else None."""
    tied_embeddings: bool = False
    """The checkpoint shares embedding and output weights (the import unties them: same function)."""
    source: Dict[str, Any] = field(default_factory=dict)
    """The config.json itself (provenance; the exporter keeps its harmless fields)."""


def read_hf_config(hf_dir: Union[str, Path]) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: --hf-dir must be a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def detect_family(config: dict) -> Tuple[str, bool]:
    """(family, norm_head). Rejects ALiBi Baichuan models and architectures we do not map."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "baichuan" or any("baichuan" in a.lower() for a in architectures):
        reason = _alibi_reason(config)
        if reason:
            raise ConversionError(
                f"this is a Baichuan 13B-style model ({reason}); it uses ALiBi attention biases, not "
                "rotary position embeddings. PoSE extends the context by manipulating RoPE position "
                "ids, so it does not apply to ALiBi models. Supported: Baichuan-7B and Baichuan2-7B."
            )
        known = [a for a in architectures if a in BAICHUAN_VERSIONS]
        if len(known) != 1:
            raise ConversionError(
                f"cannot tell Baichuan-7B from Baichuan2-7B: config.json architectures is "
                f"{architectures!r}; expected exactly one of {sorted(BAICHUAN_VERSIONS)} "
                "(Baichuan-7B: BaiChuanForCausalLM; Baichuan2-7B: BaichuanForCausalLM)"
            )
        return "baichuan", BAICHUAN_VERSIONS[known[0]]["norm_head"]
    if model_type == "llama" or "LlamaForCausalLM" in architectures:
        return "llama", False
    raise ConversionError(
        f"unsupported model: model_type {model_type!r}, architectures {architectures!r}; "
        "supported are LLaMA-1/2/3 (model_type 'llama') and Baichuan-7B / Baichuan2-7B "
        "(model_type 'baichuan')"
    )


def _alibi_reason(config: dict) -> Optional[str]:
    """Why a Baichuan config is an ALiBi (13B) one, or None for the 7B (RoPE) models."""
    text = json.dumps(config).lower()
    if "alibi" in text:
        return "its config mentions ALiBi"
    if config.get("hidden_size") == 5120 and config.get("num_hidden_layers") == 40:
        return "hidden size 5120 with 40 layers is the Baichuan-13B / Baichuan2-13B architecture"
    if "max_position_embeddings" not in config and "model_max_length" in config:
        return ("it has model_max_length but no max_position_embeddings, as the ALiBi "
                "13B configs do")
    return None


def _field(config: dict, name: str, kind, default=None, required: bool = False):
    if name not in config or config[name] is None:
        if required:
            raise ConversionError(f"config.json is missing the required field {name!r}")
        return default
    value = config[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConversionError(f"config.json field {name!r} must be a positive integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConversionError(f"config.json field {name!r} must be a number, got {value!r}")
    return value


def model_info_from_hf_config(config: dict, *, legacy_yarn: str = "revised") -> HFModelInfo:
    """Map a config.json (LLaMA or Baichuan-7B / Baichuan2-7B) to ModelConfig + RopeScaling.

    `legacy_yarn` says what `rope_scaling: {"type": "yarn", ...}` (the legacy key, no "rope_type")
    means: "revised" (the PoSE authors' released checkpoints, the default) or "standard" (HF yarn).
    """
    family, norm_head = detect_family(config)
    missing = [f for f in _REQUIRED_FIELDS if config.get(f) is None]
    if "max_position_embeddings" not in config:
        missing.append("max_position_embeddings")
    if missing:
        raise ConversionError(f"config.json is missing the required field(s) {missing}")
    hidden = _field(config, "hidden_size", int, required=True)
    heads = _field(config, "num_attention_heads", int, required=True)
    groups = _field(config, "num_key_value_heads", int, default=heads)
    if family == "baichuan" and groups != heads:
        raise ConversionError(f"Baichuan W_pack has no grouped-query attention, but "
                              f"num_key_value_heads={groups} != num_attention_heads={heads}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} is not supported (LLaMA-style SwiGLU needs 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"config.json sets {flag}=true; pose_megatron's LLaMA has no biases")
    if hidden % heads:
        raise ConversionError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{hidden // heads}; pose_megatron derives the head dim from them")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported (RoPE on the full head)")
    _field(config, "max_position_embeddings", int, required=True)
    rope, base, window, target = rope_from_hf_config(config, hidden // heads, legacy_yarn=legacy_yarn)
    try:
        model = ModelConfig(
            num_layers=_field(config, "num_hidden_layers", int, required=True),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=_field(config, "intermediate_size", int, required=True),
            vocab_size=_field(config, "vocab_size", int, required=True),
            max_position_embeddings=window,
            rotary_base=float(base),
            norm_epsilon=float(_field(config, "rms_norm_eps", float, default=1e-6)),
            norm_head=norm_head,
        )
    except ValueError as e:
        raise ConversionError(f"config.json describes an invalid model: {e}") from e
    return HFModelInfo(
        family=family,
        model=model,
        rope_scaling=rope,
        target_length=target if target != window or rope.rope_type != "default" else None,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        source=dict(config),
    )


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
    if _normalise_stock(expected) != _normalise_stock(found):
        raise ConversionError(
            f"config.json's {POSE_CONFIG_KEY!r} block ({rope}, base {base}) disagrees with its stock "
            f"RoPE fields {found}; was one of them edited? Remove the {POSE_CONFIG_KEY!r} block to "
            "import what transformers would compute."
        )
    return rope, base, window, max_pos


def _stock_rope_dict(config: dict) -> dict:
    """The RoPE dict transformers 5 builds from a config: rope_scaling wins over rope_parameters."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"rope_scaling / rope_parameters must be a JSON object, got {params!r}")
    params = dict(params)
    if "rope_type" not in params and "type" not in params and params and all(
        isinstance(v, dict) for v in params.values()
    ):
        raise ConversionError("per-layer-type rope_parameters are not supported (one RoPE per model)")
    theta = config.get("rope_theta", 10000.0)
    params.setdefault("rope_theta", theta)
    return params


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
                 "long_factor": None, "attention_factor": None},
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
        omax = omax or max_pos
        return _scaling("llama3", factor=factor, original_max_position_embeddings=omax,
                        low_freq_factor=params.get("low_freq_factor"),
                        high_freq_factor=params.get("high_freq_factor")), base, omax, max_pos
    if kind == "yarn":
        omax = omax or max_pos
        revised = legacy and legacy_yarn == "revised" and "finetuned" not in params
        rope = _scaling("yarn-revised" if revised else "yarn", factor=factor,
                        original_max_position_embeddings=omax,
                        beta_fast=params.get("beta_fast", 32.0), beta_slow=params.get("beta_slow", 1.0),
                        attention_factor=params.get("attention_factor"))
        if rope.attention_factor is not None and rope.attention_factor == yarn_attention_factor(
                dataclasses.replace(rope, attention_factor=None)):
            rope.attention_factor = None  # the formula's value: keep it implicit
        return rope, base, omax, max_pos
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
    rope = _scaling("yarn-revised", factor=factor, original_max_position_embeddings=omax,
                    attention_factor=params.get("attention_factor"))
    if [float(x) for x in short] != yarn_revised_ext_factors(rope, head_dim, base):
        raise ConversionError(
            "longrope factors are not the revised-YaRN factors for factor "
            f"{factor} and original_max_position_embeddings {omax} (beta_fast 32, beta_slow 1); "
            "arbitrary per-frequency factors (e.g. Phi-3 LongRoPE) are not a pose_megatron rope type"
        )
    if rope.attention_factor == yarn_attention_factor(dataclasses.replace(rope, attention_factor=None)):
        rope.attention_factor = None  # the formula's value: keep it implicit
    return rope, base, omax, max_pos


# ============================================================================ ours -> Hugging Face

# Source config fields that the export recomputes (or that would contradict the export).
_RECOMPUTED_FIELDS = {
    "architectures", "auto_map", "model_type", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "original_max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "torch_dtype", "dtype",
    "transformers_version", "_name_or_path", "_from_model_config", "model_max_length",
    "quantization_config", POSE_CONFIG_KEY,
}

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def hf_config_for_export(
    model: ModelConfig,
    rope_scaling: RopeScaling,
    family: str,
    target_length: int,
    dtype,
    *,
    seq_length: Optional[int] = None,
    source: Optional[dict] = None,
) -> dict:
    """The config.json of an export: stock transformers RoPE, max_position_embeddings = target.

    LLaMA exports load with `AutoModelForCausalLM` (no remote code); Baichuan exports carry
    Baichuan's own architectures / auto_map. `source` (the imported config.json, if known) keeps
    its other fields (token ids, initializer range, ...).
    """
    params = rope_to_hf_parameters(rope_scaling, model.rotary_base, model.head_dim)
    theta = params["rope_theta"]
    legacy = {k: v for k, v in params.items() if k != "rope_theta"}
    config = {k: v for k, v in (source or {}).items() if k not in _RECOMPUTED_FIELDS}
    config.update(
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.head_dim,
        hidden_act="silu",
        rms_norm_eps=model.norm_epsilon,
        vocab_size=model.vocab_size,
        max_position_embeddings=int(target_length),
        tie_word_embeddings=False,
        # transformers 5 reads rope_parameters; 4.x reads rope_scaling and the top-level rope_theta
        # (5 also accepts those two and prefers them: both spellings say the same thing).
        rope_parameters=params,
        rope_scaling=None if legacy["rope_type"] == "default" else legacy,
        rope_theta=theta,
        dtype=_DTYPE_NAMES[str(dtype)],
        torch_dtype=_DTYPE_NAMES[str(dtype)],
    )
    config[POSE_CONFIG_KEY] = {
        "rope_scaling": dataclasses.asdict(rope_scaling),
        "rotary_base": model.rotary_base,
        "max_position_embeddings": model.max_position_embeddings,
        "seq_length": seq_length,
        "target_length": int(target_length),
    }
    if family == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama",
                      attention_bias=False, mlp_bias=False)
    elif family == "baichuan":
        arch = "BaichuanForCausalLM" if model.norm_head else "BaiChuanForCausalLM"
        config.update(architectures=[arch], auto_map=BAICHUAN_VERSIONS[arch]["auto_map"],
                      model_type="baichuan")
        for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
            config.setdefault(key, value)
        if model.norm_head:  # Baichuan2's published config
            config.setdefault("tokenizer_class", "BaichuanTokenizer")
            config.setdefault("z_loss_weight", 0)
            config["model_max_length"] = int(target_length)
    else:
        raise ConversionError(f"no Hugging Face export for family {family!r}")
    return dict(sorted(config.items()))
