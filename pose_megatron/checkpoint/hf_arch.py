"""config.json <-> ModelConfig: the architecture mapping, for every family record.

Reading a config.json finds its family (families.detect_family), translates the family's own key
spellings to transformers' LLaMA names, and maps the architecture and RoPE (hf_rope.py) to
ModelConfig + RopeScaling, refusing what pose_megatron's LLaMA-style model cannot reproduce. Writing
one (an export) is the reverse, plus the family's identity and export fields. See
docs/reference.md, "Hugging Face transformers".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import Family, detect_family
from pose_megatron.checkpoint.hf_rope import POSE_CONFIG_KEY, rope_config_fields, rope_from_hf_config
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

# config.json key -> ModelConfig field: the one-to-one part of the architecture mapping.
ARCHITECTURE_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "norm_epsilon",
}
_OPTIONAL_KEYS = ("num_key_value_heads", "rms_norm_eps")  # default: multi-head; LLaMA's 1e-6
_REQUIRED_KEYS = tuple(k for k in ARCHITECTURE_KEYS if k not in _OPTIONAL_KEYS) + ("max_position_embeddings",)

# Source config fields that the export recomputes (or that would contradict the export).
_RECOMPUTED_FIELDS = {
    *ARCHITECTURE_KEYS, "architectures", "auto_map", "model_type", "head_dim",
    "max_position_embeddings", "original_max_position_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "tie_word_embeddings", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "_from_model_config", "model_max_length", "quantization_config", POSE_CONFIG_KEY,
}


@dataclass
class HFModelInfo:
    """What a Hugging Face config.json says, in pose_megatron's terms."""

    family: Family
    """The family record the config belongs to."""
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


def canonical_config(config: Mapping[str, Any], family: Family) -> dict:
    """`config` with the family's own key spellings replaced by transformers' LLaMA names."""
    llama_name = {theirs: ours for ours, theirs in family.config_keys.items()}
    clashes = sorted(ours for theirs, ours in llama_name.items() if theirs in config and ours in config)
    if clashes:
        raise ConversionError(f"config.json holds both {clashes} and the {family.title} spellings of them "
                              f"({[family.config_keys[k] for k in clashes]}); keep one")
    return {llama_name.get(key, key): value for key, value in config.items()}


def _field(config: dict, name: str, kind, default=None):
    if config.get(name) is None:
        return default
    value = config[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConversionError(f"config.json field {name!r} must be a positive integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConversionError(f"config.json field {name!r} must be a number, got {value!r}")
    return value


def _check_llama_style(config: dict, family: Family, hidden: int, heads: int, groups: int) -> None:
    """Refuse what pose_megatron's model (RMSNorm, SwiGLU, full RoPE, no biases) does not compute."""
    if not family.grouped_query and groups != heads:
        raise ConversionError(f"{family.title} checkpoints have no grouped-query attention, but "
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


def model_info_from_hf_config(config: dict, *, legacy_yarn: str = "revised") -> HFModelInfo:
    """Map a config.json of any registered family to ModelConfig + RopeScaling.

    `legacy_yarn` says what `rope_scaling: {"type": "yarn", ...}` (the legacy key, no "rope_type")
    means: "revised" (the PoSE authors' released checkpoints, the default) or "standard" (HF yarn).
    """
    family = detect_family(config)
    source, config = config, canonical_config(config, family)
    missing = [k for k in _REQUIRED_KEYS if config.get(k) is None]
    if missing:
        raise ConversionError(f"config.json is missing the required field(s) {missing}")
    fields = {ours: _field(config, key, float if key == "rms_norm_eps" else int)
              for key, ours in ARCHITECTURE_KEYS.items()}
    if fields["num_query_groups"] is None:
        fields["num_query_groups"] = fields["num_attention_heads"]
    fields["norm_epsilon"] = float(1e-6 if fields["norm_epsilon"] is None else fields["norm_epsilon"])
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    _check_llama_style(config, family, hidden, heads, fields["num_query_groups"])
    _field(config, "max_position_embeddings", int)  # a positive integer
    rope, base, window, target = rope_from_hf_config(config, hidden // heads, legacy_yarn=legacy_yarn)
    try:
        model = ModelConfig(**fields, max_position_embeddings=window, rotary_base=float(base),
                            norm_head=family.norm_head)
    except ValueError as e:
        raise ConversionError(f"config.json describes an invalid model: {e}") from e
    return HFModelInfo(
        family=family,
        model=model,
        rope_scaling=rope,
        target_length=target if target != window or rope.rope_type != "default" else None,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        source=dict(source),
    )


def hf_config_for_export(
    model: ModelConfig,
    rope_scaling: RopeScaling,
    family: Family,
    target_length: int,
    dtype: torch.dtype,
    *,
    seq_length: Optional[int] = None,
    source: Optional[dict] = None,
) -> dict:
    """The config.json of an export: stock transformers RoPE (with the keys serving engines need),
    max_position_embeddings = target_length (the run's RunConfig.max_positions).

    LLaMA exports load with `AutoModelForCausalLM` (no remote code); other families carry their own
    architectures / auto_map. `source` (the imported config.json, if known) keeps its other fields
    (token ids, initializer range, ...).
    """
    hf_dtype = str(dtype).removeprefix("torch.")  # transformers' spelling: "bfloat16"
    kept = canonical_config(source or {}, family)
    config = {k: v for k, v in kept.items() if k not in _RECOMPUTED_FIELDS}
    config.update({key: getattr(model, ours) for key, ours in ARCHITECTURE_KEYS.items()})
    config.update(
        head_dim=model.head_dim,
        hidden_act="silu",
        max_position_embeddings=int(target_length),
        tie_word_embeddings=False,
        # Both spellings (transformers 5 and 4.x) plus the keys vLLM and llama.cpp need.
        **rope_config_fields(rope_scaling, model.rotary_base, model.head_dim),
        dtype=hf_dtype,
        torch_dtype=hf_dtype,
        architectures=[family.architectures[0]],
        model_type=family.model_type,
        **family.export_fields,
    )
    config[POSE_CONFIG_KEY] = {
        "rope_scaling": dataclasses.asdict(rope_scaling),
        "rotary_base": model.rotary_base,
        "max_position_embeddings": model.max_position_embeddings,
        "seq_length": seq_length,
        "target_length": int(target_length),
    }
    if family.auto_map is not None:
        config["auto_map"] = dict(family.auto_map)
    for key, value in family.export_defaults.items():
        config.setdefault(key, value)
    if family.exports_model_max_length:
        config["model_max_length"] = int(target_length)
    renamed = {family.config_keys.get(k, k): v for k, v in config.items()}
    return dict(sorted(renamed.items()))
