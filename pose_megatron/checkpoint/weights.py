"""Weight layouts between a family's Hugging Face tensors and megatron-core's, as pure copies.

- QKV: HF q/k/v (or a fused [Wq; Wk; Wv]) -> one fused matrix ordered per query group g:
  [q heads of g; k_g; v_g]. Tensor parallelism then splits it by rows into whole groups.
- SwiGLU fc1 = [gate; up] (rows). megatron shards gate and up separately for TP; globally it is this.
- Vocabulary: embedding and output rows padded with zeros to the TP-padded size; dropped on export.
- Baichuan2's NormHead: lm_head is stored raw both ways; the model normalises rows in its forward.

Every function takes the family record (families.py) and reads only its names and QKV layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import QKV_FUSED, Family
from pose_megatron.checkpoint.hf_io import TensorSource
from pose_megatron.checkpoint.megatron_keys import (
    EMBEDDING,
    FC1,
    FC2,
    OUTPUT,
    PROJ,
    QKV,
    VOCAB_KEYS,
    file_order,
    is_layer_key,
    local_spec_name,
    megatron_shapes,
)
from pose_megatron.presets import ModelConfig
from pose_megatron.runtime import DTYPES, dtype_from_name, dtype_name

MAX_PIECE_BYTES = 32 << 20  # largest vocabulary row block the importer builds (and leaves to read)


def resolve_storage_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """A converter's `dtype` argument: fp32 / bf16 / fp16 or their torch dtypes; None keeps the source's."""
    if dtype is None:
        return None
    try:
        if isinstance(dtype, torch.dtype):
            dtype_name(dtype)  # one of the supported dtypes
            return dtype
        if dtype in DTYPES:  # not "auto": a conversion never guesses the device's dtype
            return dtype_from_name(dtype)
    except ValueError:
        pass
    raise ConversionError(f"dtype must be one of {sorted(DTYPES)} (or None to keep the source's), "
                          f"got {dtype!r}")


def dtype_label(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16 for the supported dtypes, torch's name for others (e.g. a float64 source)."""
    try:
        return dtype_name(dtype)
    except ValueError:
        return str(dtype)


def hf_shapes(family: Family, cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every Hugging Face tensor of the family, in export order."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_key = {  # the norms: [(h,)]
        EMBEDDING: [(cfg.vocab_size, h)],
        QKV: [(q + 2 * kv, h)] if family.qkv_layout == QKV_FUSED else [(q, h), (kv, h), (kv, h)],
        PROJ: [(h, q)],
        FC1: [(f, h), (f, h)],
        FC2: [(h, f)],
        OUTPUT: [(cfg.vocab_size, h)],
    }
    shapes = {}
    for key, layer in file_order(cfg.num_layers):
        shapes.update(zip(family.hf_names(key, layer), per_key.get(key, [(h,)]), strict=True))
    return shapes


def hf_name_owners(family: Family, num_layers: int) -> Dict[str, str]:
    """HF tensor name -> the megatron key it belongs to."""
    return {name: key for key, layer in file_order(num_layers) for name in family.hf_names(key, layer)}


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


def to_megatron(family: Family, key: str, tensors: Sequence[torch.Tensor], cfg: ModelConfig,
                padded_vocab: int) -> torch.Tensor:
    """One megatron tensor (one layer's slice for per-layer keys) from its HF tensors (map order)."""
    if key == QKV:
        if family.qkv_layout == QKV_FUSED:  # [Wq; Wk; Wv] by rows
            q_rows, kv_rows = (n * cfg.head_dim for n in (cfg.num_attention_heads, cfg.num_query_groups))
            tensors = tensors[0].split([q_rows, kv_rows, kv_rows], dim=0)
        return fuse_qkv(*tensors, cfg.num_query_groups)
    if key == FC1:
        return torch.cat(list(tensors), dim=0)
    if key in VOCAB_KEYS:
        return pad_vocab(tensors[0], padded_vocab)
    (tensor,) = tensors
    return tensor


def from_megatron(family: Family, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """The HF tensors (map order) of one megatron tensor (one layer's slice for per-layer keys)."""
    if key == QKV:
        q, k, v = split_qkv(tensor, cfg.num_attention_heads, cfg.num_query_groups)
        return (torch.cat([q, k, v]),) if family.qkv_layout == QKV_FUSED else (q, k, v)
    if key == FC1:
        gate, up = tensor.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()
    if key in VOCAB_KEYS:
        return (tensor[: cfg.vocab_size].contiguous(),)
    return (tensor.contiguous(),)


# ----------------------------------------------------------------------------- streaming pieces


@dataclass(frozen=True)
class Piece:
    """A block of rows of one megatron tensor (of one layer), built on demand from HF tensors."""

    row_start: int
    """First row of the block in the megatron tensor (of its layer)."""
    rows: int
    """Rows in the block."""
    build: Callable[[TensorSource], torch.Tensor]
    """Reads the HF tensors and returns the block [rows, ...] in the source dtype."""


def import_pieces(family: Family, key: str, cfg: ModelConfig, layer: int, padded_vocab: int,
                  max_piece_bytes: int = MAX_PIECE_BYTES, itemsize: int = 4) -> Tuple[Piece, ...]:
    """How to build one megatron tensor (one layer's slice) in pieces that each read little.

    gate and up are separate pieces (their own rows of fc1); the vocabulary tensors are read in
    blocks of rows of at most `max_piece_bytes`, then the zero padding; QKV is fused whole.
    """
    names = family.hf_names(key, layer)
    if key == FC1:
        f = cfg.ffn_hidden_size
        return tuple(Piece(i * f, f, lambda src, n=name: src.read(n)) for i, name in enumerate(names))
    if key in VOCAB_KEYS:
        (name,) = names
        block = max(1, max_piece_bytes // (cfg.hidden_size * itemsize))
        pieces = []
        for start in range(0, cfg.vocab_size, block):
            stop = min(start + block, cfg.vocab_size)
            pieces.append(Piece(start, stop - start, lambda src, a=start, b=stop: src.read_rows(name, a, b)))
        if padded_vocab > cfg.vocab_size:
            pad = padded_vocab - cfg.vocab_size
            pieces.append(Piece(cfg.vocab_size, pad, lambda src: torch.zeros(pad, cfg.hidden_size)))
        return tuple(pieces)
    rows = megatron_shapes(cfg, padded_vocab)[key][1 if is_layer_key(key) else 0]
    return (Piece(0, rows, lambda src: to_megatron(
        family, key, [src.read(n) for n in names], cfg, padded_vocab)),)


def hf_to_megatron_state_dict(family: Family, cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor],
                              padded_vocab: int) -> Dict[str, torch.Tensor]:
    """A whole HF state dict -> a TP=1, PP=1 local-spec PoseGPTModel state dict (in memory).

    For small models (tests); the converters stream the same mapping tensor by tensor.
    """
    out = {}
    for key, layer in file_order(cfg.num_layers):
        tensors = [hf_state[n] for n in family.hf_names(key, layer)]
        out[local_spec_name(key, layer)] = to_megatron(family, key, tensors, cfg, padded_vocab)
    return out
