"""The megatron-core side of every conversion: dist-checkpoint keys, global shapes, extra state.

Keys are named as in megatron-core dist checkpoints (Transformer Engine names, every per-layer tensor
stacked along a leading layer axis, global shapes: what `model.sharded_state_dict()` saves at any
TP / PP). They are the same for every model family; a family record (families.py) maps them to its
Hugging Face tensors.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

from pose_megatron.presets import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"

# The per-layer keys in the order transformers lists a layer's tensors (export file order).
LAYER_ORDER = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
ALL_KEYS = (EMBEDDING, *LAYER_ORDER, FINAL_NORM, OUTPUT)
VOCAB_KEYS = (EMBEDDING, OUTPUT)

# Modules whose `_extra_state` a dist checkpoint holds as one ShardedObject per layer (None when no
# FP8 is used). The local spec has the linear layers'; Transformer Engine's spec also has core
# attention's and its final norm's. An import writes all (unrequested ones are ignored on load).
EXTRA_STATE_LAYER_MODULES = (
    "decoder.layers.self_attention.linear_qkv",
    "decoder.layers.self_attention.linear_proj",
    "decoder.layers.self_attention.core_attention",
    "decoder.layers.mlp.linear_fc1",
    "decoder.layers.mlp.linear_fc2",
)
EXTRA_STATE_MODULES = ("decoder.final_layernorm",)

# The local (non-TE) layer spec names its norms differently in a plain state_dict.
_LOCAL_SPEC_NAMES = {
    INPUT_NORM: "decoder.layers.{}.input_layernorm.weight",
    MLP_NORM: "decoder.layers.{}.pre_mlp_layernorm.weight",
}


def is_layer_key(key: str) -> bool:
    return key.startswith("decoder.layers.")


def file_order(num_layers: int) -> Iterator[Tuple[str, int]]:
    """(key, layer) of every weight in the order checkpoint files list them: the embedding, layer by
    layer, the final norm, the output layer (layer 0 stands in for the keys without layers)."""
    yield EMBEDDING, 0
    for layer in range(num_layers):
        for key in LAYER_ORDER:
            yield key, layer
    yield FINAL_NORM, 0
    yield OUTPUT, 0


def local_spec_name(key: str, layer: int = 0) -> str:
    """The name of a dist-checkpoint tensor in a local-spec model's plain state_dict."""
    if key in _LOCAL_SPEC_NAMES:
        return _LOCAL_SPEC_NAMES[key].format(layer)
    return key.replace("decoder.layers.", f"decoder.layers.{layer}.") if is_layer_key(key) else key


def extra_state_keys(num_layers: int) -> Tuple[str, ...]:
    """Keys of the `_extra_state` ShardedObjects of a dist checkpoint (megatron's unique keys)."""
    keys = [f"{module}._extra_state/shard_{layer}_{num_layers}"
            for layer in range(num_layers) for module in EXTRA_STATE_LAYER_MODULES]
    keys += [f"{module}._extra_state/shard_0_1" for module in EXTRA_STATE_MODULES]
    return tuple(keys)


def qkv_rows(cfg: ModelConfig) -> int:
    return (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim


def megatron_shapes(cfg: ModelConfig, padded_vocab: int) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every dist-checkpoint tensor (per-layer keys carry the leading layer axis)."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    return {
        EMBEDDING: (padded_vocab, h),
        INPUT_NORM: (layers, h),
        QKV: (layers, qkv_rows(cfg), h),
        PROJ: (layers, h, cfg.num_attention_heads * cfg.head_dim),
        MLP_NORM: (layers, h),
        FC1: (layers, 2 * f, h),
        FC2: (layers, h, f),
        FINAL_NORM: (h,),
        OUTPUT: (padded_vocab, h),
    }
