"""Weight names and layouts: Hugging Face LLaMA / Baichuan <-> megatron-core GPT.

The megatron side is named as in megatron-core dist checkpoints (Transformer Engine names, every
per-layer tensor stacked along a leading layer axis, global shapes: what `model.sharded_state_dict()`
saves at any TP / PP). Each family is one literal map from those keys to its Hugging Face tensors;
the few layout changes are pure copies, so a round trip is bit-exact:

- QKV: HF q/k/v (or Baichuan's W_pack = [Wq; Wk; Wv]) -> one fused matrix ordered per query group g:
  [q heads of g; k_g; v_g]. Tensor parallelism then splits it by rows into whole groups. HF q/k are
  already in the rotate-half layout megatron uses (rotary_interleaved=False): no permutation.
- SwiGLU fc1 = [gate; up] (rows). megatron shards gate and up separately for TP; globally it is this.
- Vocabulary: embedding and output rows padded with zeros to the TP-padded size; dropped on export.
- Baichuan2's NormHead: lm_head is stored raw both ways; the model normalises rows in its forward.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch

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

# megatron dist-checkpoint key -> Hugging Face name(s); "{}" is the layer number.
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

WEIGHT_MAPS: Dict[str, Dict[str, Tuple[str, ...]]] = {"llama": LLAMA_WEIGHTS, "baichuan": BAICHUAN_WEIGHTS}

# The per-layer keys in the order transformers lists a layer's tensors (export file order).
LAYER_ORDER = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)

# Buffers some HF checkpoints carry that hold no weights (old LLaMA saves): ignored on import.
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

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


def weight_map(family: str) -> Dict[str, Tuple[str, ...]]:
    if family not in WEIGHT_MAPS:
        raise ValueError(f"unknown checkpoint family {family!r}; known: {sorted(WEIGHT_MAPS)}")
    return WEIGHT_MAPS[family]


def is_layer_key(key: str) -> bool:
    return key.startswith("decoder.layers.")


def hf_names(family: str, key: str, layer: int = 0) -> Tuple[str, ...]:
    return tuple(name.format(layer) for name in weight_map(family)[key])


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


def hf_shapes(family: str, cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every Hugging Face tensor of the family, in export order."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_key = {
        INPUT_NORM: [(h,)],
        QKV: [(q, h), (kv, h), (kv, h)] if family == "llama" else [(q + 2 * kv, h)],
        PROJ: [(h, q)],
        MLP_NORM: [(h,)],
        FC1: [(f, h), (f, h)],
        FC2: [(h, f)],
    }
    shapes = {hf_names(family, EMBEDDING)[0]: (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        for key in LAYER_ORDER:
            shapes.update(zip(hf_names(family, key, layer), per_key[key], strict=True))
    shapes[hf_names(family, FINAL_NORM)[0]] = (h,)
    shapes[hf_names(family, OUTPUT)[0]] = (cfg.vocab_size, h)
    return shapes


# ----------------------------------------------------------------------------- layout (pure copies)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q [heads*d, h], k/v [groups*d, h] -> megatron's fused [(heads + 2*groups)*d, h]:
    per query group, its q heads, then its k head, then its v head."""
    hidden = q.size(-1)
    q = q.reshape(num_query_groups, -1, hidden)  # [g, r*d, h]
    k = k.reshape(num_query_groups, -1, hidden)  # [g, d, h]
    v = v.reshape(num_query_groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int):
    """Inverse of fuse_qkv: megatron's fused QKV -> contiguous HF (q, k, v)."""
    hidden = qkv.size(-1)
    per_group = num_attention_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, per_group + 2, -1, hidden)  # [g, r+2, d, h]
    q = grouped[:, :per_group].reshape(-1, hidden).contiguous()
    k = grouped[:, per_group].reshape(-1, hidden).contiguous()
    v = grouped[:, per_group + 1].reshape(-1, hidden).contiguous()
    return q, k, v


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Zero rows up to the TP-padded vocabulary (never looked up; zero logits in the output)."""
    extra = padded_vocab - weight.size(0)
    if extra < 0:
        raise ValueError(f"vocabulary {weight.size(0)} is larger than the padded size {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, weight.size(1))]) if extra else weight


def to_megatron(family: str, key: str, tensors: Sequence[torch.Tensor], cfg: ModelConfig,
                padded_vocab: int) -> torch.Tensor:
    """One megatron tensor (one layer's slice for per-layer keys) from its HF tensors (map order)."""
    if key == QKV:
        if family == "baichuan":
            tensors = tensors[0].chunk(3, dim=0)  # W_pack = [Wq; Wk; Wv]
        return fuse_qkv(*tensors, cfg.num_query_groups)
    if key == FC1:
        return torch.cat(list(tensors), dim=0)
    if key in (EMBEDDING, OUTPUT):
        return pad_vocab(tensors[0], padded_vocab)
    (tensor,) = tensors
    return tensor


def from_megatron(family: str, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """The HF tensors (map order) of one megatron tensor (one layer's slice for per-layer keys)."""
    if key == QKV:
        q, k, v = split_qkv(tensor, cfg.num_attention_heads, cfg.num_query_groups)
        return (torch.cat([q, k, v]),) if family == "baichuan" else (q, k, v)
    if key == FC1:
        gate, up = tensor.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()
    if key in (EMBEDDING, OUTPUT):
        return (tensor[: cfg.vocab_size].contiguous(),)
    return (tensor.contiguous(),)


# ----------------------------------------------------------------------------- streaming pieces


@dataclass(frozen=True)
class Piece:
    """A block of rows of one megatron tensor (of one layer), built on demand from HF tensors."""

    row_start: int
    rows: int
    build: Callable[["TensorSource"], torch.Tensor]  # -> [rows, ...] in the source dtype


class TensorSource(abc.ABC):
    """What `Piece.build` reads from: HF tensors by name, whole or a block of rows."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        ...

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.read(name)[start:stop]


class DictSource(TensorSource):
    """A TensorSource over an in-memory state dict (tests, small models)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def read(self, name):
        return self.state[name]


def import_pieces(family: str, key: str, cfg: ModelConfig, layer: int, padded_vocab: int,
                  max_piece_bytes: int = 32 << 20, itemsize: int = 4) -> Tuple[Piece, ...]:
    """How to build one megatron tensor (one layer's slice) in pieces that each read little.

    gate and up are separate pieces (their own rows of fc1); the vocabulary tensors are read in
    blocks of rows of at most `max_piece_bytes`, then the zero padding; QKV is fused whole.
    """
    names = hf_names(family, key, layer)
    if key == FC1:
        f = cfg.ffn_hidden_size
        return tuple(Piece(i * f, f, lambda src, n=name: src.read(n)) for i, name in enumerate(names))
    if key in (EMBEDDING, OUTPUT):
        (name,) = names
        row_bytes = cfg.hidden_size * itemsize
        block = max(1, max_piece_bytes // row_bytes)
        pieces = []
        for start in range(0, cfg.vocab_size, block):
            stop = min(start + block, cfg.vocab_size)
            pieces.append(Piece(start, stop - start, lambda src, a=start, b=stop: src.read_rows(name, a, b)))
        if padded_vocab > cfg.vocab_size:
            pad = padded_vocab - cfg.vocab_size
            pieces.append(Piece(cfg.vocab_size, pad,
                                lambda src: torch.zeros(pad, cfg.hidden_size)))
        return tuple(pieces)
    rows = megatron_shapes(cfg, padded_vocab)[key][1 if is_layer_key(key) else 0]
    return (Piece(0, rows, lambda src: to_megatron(
        family, key, [src.read(n) for n in names], cfg, padded_vocab)),)


def hf_to_megatron_state_dict(family: str, cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor],
                              padded_vocab: int) -> Dict[str, torch.Tensor]:
    """A whole HF state dict -> a TP=1, PP=1 local-spec PoseGPTModel state dict (in memory).

    For small models (tests); the converters stream the same mapping tensor by tensor.
    """
    out = {}
    for key in weight_map(family):
        for layer in range(cfg.num_layers) if is_layer_key(key) else (0,):
            tensors = [hf_state[n] for n in hf_names(family, key, layer)]
            out[local_spec_name(key, layer)] = to_megatron(family, key, tensors, cfg, padded_vocab)
    return out
