"""One record per model family: everything the converters know about a Hugging Face layout.

A `Family` holds its weight map (megatron dist-checkpoint key -> Hugging Face tensor names), its QKV
layout, the config.json identity it is detected by and exports (architectures, model_type, auto_map),
config keys it spells differently from transformers' LLaMA, and the fields its exports write. The
layout code (weights.py), the config mapping (hf_arch.py) and the converters read only these records,
so a family that differs from LLaMA in names, QKV layout and config keys is one record in `FAMILIES`
and nothing else. See docs/reference.md, "Hugging Face transformers" and "Checkpoint layouts".

The mapping is a pure copy both ways (a round trip is bit-exact): HF q/k/v are already in the
rotate-half layout megatron uses (rotary_interleaved=False), so no permutation is needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.megatron_keys import (
    ALL_KEYS,
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    MLP_NORM,
    OUTPUT,
    PROJ,
    QKV,
    is_layer_key,
)
from pose_megatron.presets import ModelConfig

QKV_SEPARATE = "separate"
"""q_proj, k_proj, v_proj as three tensors (LLaMA)."""
QKV_FUSED = "fused"
"""One tensor [Wq; Wk; Wv] stacked by rows (Baichuan's W_pack)."""

# Buffers some HF checkpoints carry that hold no weights (old LLaMA saves): ignored on import.
ROTARY_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family in the converters' terms."""

    name: str
    """Registry key in FAMILIES; stored as RunConfig.family in pose_config.json."""
    title: str
    """How messages name the family ("Baichuan2-7B")."""
    weights: Mapping[str, Tuple[str, ...]]
    """Megatron dist-checkpoint key -> its HF tensor names, "{}" standing for the layer number.
    QKV lists q, k, v (or the one fused tensor); FC1 lists gate, up."""
    architectures: Tuple[str, ...]
    """config.json `architectures` values that identify the family; an export writes the first."""
    model_type: str
    """config.json `model_type`: identifies the family when no architecture does; exported."""
    qkv_layout: str = QKV_SEPARATE
    """QKV_SEPARATE (q/k/v tensors) or QKV_FUSED (one [Wq; Wk; Wv] tensor)."""
    auto_map: Optional[Mapping[str, str]] = None
    """Remote-code classes an export writes as `auto_map` (None: stock transformers loads it)."""
    norm_head: bool = False
    """The output layer normalises each vocabulary row (Baichuan2's NormHead); sets ModelConfig.norm_head."""
    grouped_query: bool = True
    """num_key_value_heads may be below num_attention_heads (False: multi-head checkpoints only)."""
    config_keys: Mapping[str, str] = field(default_factory=dict)
    """config.json keys the family spells differently: transformers-LLaMA name -> the family's name."""
    export_fields: Mapping[str, Any] = field(default_factory=dict)
    """config.json fields an export always writes."""
    export_defaults: Mapping[str, Any] = field(default_factory=dict)
    """config.json fields an export writes unless the imported config.json had them (token ids)."""
    exports_model_max_length: bool = False
    """The export also writes `model_max_length` = the target length (as Baichuan2's config does)."""
    gguf_arch: Optional[str] = None
    """The llama.cpp architecture a GGUF of this family is (a `gguf.MODEL_ARCH` member name, e.g.
    "LLAMA"); None: no GGUF export (checkpoint/gguf_export.py)."""
    refusal: Optional[Callable[[dict], Optional[str]]] = None
    """For a config.json this family claims: why it cannot be converted after all, or None."""
    ignored_tensors: re.Pattern = ROTARY_BUFFERS
    """HF tensor names that hold no weights (buffers): ignored on import."""

    def __post_init__(self):
        problem = self._layout_problem()
        if problem:
            raise ValueError(f"family record {self.name!r}: {problem}")

    def _layout_problem(self) -> Optional[str]:
        if set(self.weights) != set(ALL_KEYS):
            missing, unknown = set(ALL_KEYS) - set(self.weights), set(self.weights) - set(ALL_KEYS)
            return f"weights must map every megatron key; missing {sorted(missing)}, unknown {sorted(unknown)}"
        if self.qkv_layout not in (QKV_SEPARATE, QKV_FUSED):
            return f"qkv_layout must be {QKV_SEPARATE!r} or {QKV_FUSED!r}, got {self.qkv_layout!r}"
        expected = {QKV: 3 if self.qkv_layout == QKV_SEPARATE else 1, FC1: 2}
        for key, names in self.weights.items():
            if len(names) != expected.get(key, 1):
                return f"{key} needs {expected.get(key, 1)} HF name(s) for its layout, got {list(names)}"
            if any(("{}" in n) != is_layer_key(key) for n in names):
                return f"{key}: per-layer names need one '{{}}' for the layer number, others none: {list(names)}"
        if not self.architectures:
            return "architectures must name at least one config.json architecture"
        if len(set(self.config_keys.values())) != len(self.config_keys):
            return f"config_keys must map to distinct names, got {dict(self.config_keys)}"
        return None

    def hf_names(self, key: str, layer: int = 0) -> Tuple[str, ...]:
        """The HF tensor names of one megatron key (of one layer for per-layer keys)."""
        return tuple(name.format(layer) for name in self.weights[key])

    def match(self, config: dict) -> int:
        """How strongly a config.json names this family: 2 by architecture, 1 by model_type, else 0."""
        if any(a in self.architectures for a in config.get("architectures") or ()):
            return 2
        return int(config.get("model_type") == self.model_type)


# ----------------------------------------------------------------------------- the records

LLAMA_WEIGHTS: Dict[str, Tuple[str, ...]] = {
    EMBEDDING: ("model.embed_tokens.weight",),
    INPUT_NORM: ("model.layers.{}.input_layernorm.weight",),
    QKV: ("model.layers.{}.self_attn.q_proj.weight",
          "model.layers.{}.self_attn.k_proj.weight",
          "model.layers.{}.self_attn.v_proj.weight"),
    PROJ: ("model.layers.{}.self_attn.o_proj.weight",),
    MLP_NORM: ("model.layers.{}.post_attention_layernorm.weight",),
    FC1: ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    FC2: ("model.layers.{}.mlp.down_proj.weight",),
    FINAL_NORM: ("model.norm.weight",),
    OUTPUT: ("lm_head.weight",),
}

BAICHUAN_WEIGHTS: Dict[str, Tuple[str, ...]] = {
    **LLAMA_WEIGHTS,
    QKV: ("model.layers.{}.self_attn.W_pack.weight",),  # [Wq; Wk; Wv], multi-head
}


def _baichuan_alibi_reason(config: dict) -> Optional[str]:
    """Why a Baichuan config is an ALiBi (13B) one, or None for the 7B (RoPE) models."""
    if "alibi" in json.dumps(config).lower():
        return "its config mentions ALiBi"
    if config.get("hidden_size") == 5120 and config.get("num_hidden_layers") == 40:
        return "hidden size 5120 with 40 layers is the Baichuan-13B / Baichuan2-13B architecture"
    if "max_position_embeddings" not in config and "model_max_length" in config:
        return "it has model_max_length but no max_position_embeddings, as the ALiBi 13B configs do"
    return None


def _refuse_alibi_baichuan(config: dict) -> Optional[str]:
    reason = _baichuan_alibi_reason(config)
    if reason is None:
        return None
    return (f"this is a Baichuan 13B-style model ({reason}); it uses ALiBi attention biases, not rotary "
            "position embeddings. PoSE extends the context by manipulating RoPE position ids, so it "
            "does not apply to ALiBi models. Supported: Baichuan-7B and Baichuan2-7B.")


_BAICHUAN_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

FAMILIES: Dict[str, Family] = {
    family.name: family for family in (
        Family(
            name="llama", title="LLaMA-1/2/3", weights=LLAMA_WEIGHTS,
            architectures=("LlamaForCausalLM",), model_type="llama", gguf_arch="LLAMA",
            export_fields={"attention_bias": False, "mlp_bias": False},
        ),
        Family(
            name="baichuan", title="Baichuan-7B", weights=BAICHUAN_WEIGHTS, qkv_layout=QKV_FUSED,
            architectures=("BaiChuanForCausalLM",), model_type="baichuan", grouped_query=False,
            gguf_arch="BAICHUAN",
            auto_map={"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
            export_defaults=_BAICHUAN_TOKEN_IDS, refusal=_refuse_alibi_baichuan,
        ),
        Family(  # Baichuan-13B / Baichuan2-13B share the architecture name: refused (ALiBi)
            name="baichuan2", title="Baichuan2-7B", weights=BAICHUAN_WEIGHTS, qkv_layout=QKV_FUSED,
            architectures=("BaichuanForCausalLM",), model_type="baichuan", grouped_query=False,
            gguf_arch="BAICHUAN",
            auto_map={"AutoConfig": "configuration_baichuan.BaichuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
            norm_head=True, exports_model_max_length=True, refusal=_refuse_alibi_baichuan,
            export_defaults={**_BAICHUAN_TOKEN_IDS, "tokenizer_class": "BaichuanTokenizer",
                             "z_loss_weight": 0},
        ),
    )
}
"""Every family the converters know, by RunConfig.family name. Order matters to family_for_model."""

# pose_config.json files written before Baichuan2 had its own record: ("baichuan", norm_head) -> name.
_LEGACY_NAMES = {("baichuan", True): "baichuan2"}


# ----------------------------------------------------------------------------- lookups


def family_named(name: str, norm_head: bool = False) -> Family:
    """The record of a stored RunConfig.family (with the stored model's norm_head)."""
    name = _LEGACY_NAMES.get((name, norm_head), name)
    if name not in FAMILIES:
        raise ConversionError(f"unknown model family {name!r} in pose_config.json; known: {sorted(FAMILIES)}")
    family = FAMILIES[name]
    if family.norm_head != norm_head:
        raise ConversionError(f"pose_config.json says family {name!r} but model.norm_head={norm_head}, "
                              f"and {family.title} has norm_head={family.norm_head}; fix one of them")
    return family


def family_for_model(model: ModelConfig) -> Family:
    """The family a model built from flags (no imported checkpoint) is saved and exported as: the
    first registered family with the model's head (LLaMA, or Baichuan2-7B for a NormHead model)."""
    for family in FAMILIES.values():
        if family.norm_head == model.norm_head:
            return family
    raise ConversionError(f"no registered family has norm_head={model.norm_head}")


def detect_family(config: dict) -> Family:
    """The family a config.json belongs to: by architecture, else by model_type; refused with the
    family's reason (Baichuan-13B: ALiBi), or when the config names no family or several."""
    strength = max(family.match(config) for family in FAMILIES.values())
    candidates = [f for f in FAMILIES.values() if strength and f.match(config) == strength]
    for family in candidates:
        reason = family.refusal(config) if family.refusal else None
        if reason:
            raise ConversionError(reason)
    architectures, model_type = config.get("architectures") or [], config.get("model_type")
    if len(candidates) > 1:
        expected = "; ".join(f"{f.title}: {f.architectures[0]}" for f in candidates)
        raise ConversionError(f"cannot tell {' from '.join(f.title for f in candidates)}: config.json "
                              f"architectures is {architectures!r}; expected exactly one of ({expected})")
    if not candidates:
        known = ", ".join(f"{f.title} ({f.architectures[0]}, model_type {f.model_type!r})"
                          for f in FAMILIES.values())
        raise ConversionError(f"unsupported model: model_type {model_type!r}, architectures "
                              f"{architectures!r}; supported are {known}")
    return candidates[0]
