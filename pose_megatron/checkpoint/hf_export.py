"""megatron-core dist checkpoint -> Hugging Face directory, one tensor of one layer at a time.

`convert_megatron_to_hf` reads any dist checkpoint the trainer or the importer saved (any TP / PP;
only the model's tensors) through dcp_stream.DistCheckpointReader, and streams safetensors shards,
config.json (stock transformers RoPE, max_position_embeddings = the run's max positions) and the
tokenizer files into a hidden directory that is renamed into place only when complete. For llama.cpp,
checkpoint/gguf_export.py turns the result into a GGUF (tools/export_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from pose_megatron.checkpoint.dcp_stream import DistCheckpointReader
from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import Family, family_named
from pose_megatron.checkpoint.hf_arch import hf_config_for_export
from pose_megatron.checkpoint.hf_io import TensorEntry, copy_tokenizer_files, write_safetensors_shards
from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_keys import (
    ALL_KEYS,
    EMBEDDING,
    VOCAB_KEYS,
    file_order,
    is_layer_key,
    megatron_shapes,
)
from pose_megatron.checkpoint.weights import from_megatron, hf_name_owners, hf_shapes, resolve_storage_dtype
from pose_megatron.files import atomic_directory
from pose_megatron.presets import ModelConfig

MAX_SHARD_BYTES = 5 << 30  # safetensors shard size of exports (transformers' default)


def _export_pieces(reader: DistCheckpointReader, family: Family, cfg: ModelConfig,
                   dtypes: Dict[str, torch.dtype]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor or leading row block) in export order, one stored chunk at a time."""
    h = cfg.hidden_size
    shapes = megatron_shapes(cfg, reader.tensor_metadata(EMBEDDING).size[0])
    for key, layer in file_order(cfg.num_layers):
        if key in VOCAB_KEYS:  # row blocks that follow the stored chunks, padding rows dropped
            (name,) = family.hf_names(key)
            for a, b in reader.row_blocks(key, cfg.vocab_size):
                yield name, reader.read(key, (a, 0), (b - a, h)).to(dtypes[key])
            continue
        lead = (layer,) if is_layer_key(key) else ()
        body = shapes[key][len(lead):]
        chunk = reader.read(key, lead + (0,) * len(body), (1,) * len(lead) + body)
        chunk = chunk[0] if lead else chunk  # this layer's slice
        tensors = from_megatron(family, key, chunk, cfg)
        for name, tensor in zip(family.hf_names(key, layer), tensors, strict=True):
            yield name, tensor.to(dtypes[key])
        del chunk


def _check_stored_shapes(reader: DistCheckpointReader, cfg: ModelConfig, ckpt: Path) -> int:
    padded = reader.tensor_metadata(EMBEDDING).size[0]
    if padded < cfg.vocab_size:
        raise ConversionError(f"{ckpt}: embedding has {padded} rows, fewer than the vocabulary "
                              f"{cfg.vocab_size} in pose_config.json")
    for key, shape in megatron_shapes(cfg, padded).items():
        stored = tuple(reader.tensor_metadata(key).size)
        if stored != shape:
            raise ConversionError(f"{ckpt}: {key} is stored as {list(stored)}, but pose_config.json "
                                  f"implies {list(shape)}")
    return padded


def convert_megatron_to_hf(
    load_dir: Union[str, Path],
    save_dir: Union[str, Path],
    tokenizer_dir: Union[str, Path, None] = None,
    *,
    dtype: Optional[Union[str, torch.dtype]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Export a pose_megatron checkpoint (a save root or an iter_* / release directory, any TP / PP)
    to a Hugging Face directory SAVE_DIR, in the layout of the run's family.

    max_position_embeddings becomes the run's max positions (RunConfig.max_positions: the largest
    of the target length, the window times the RoPE factor and the imported base model's value);
    the RoPE is written for stock transformers (rope_parameters, plus rope_scaling / rope_theta for
    transformers 4.x) with the keys vLLM and llama.cpp's converters need (hf_rope.rope_config_fields).
    dtype: as stored when None. tokenizer_dir: its tokenizer files are copied with model_max_length
    updated.
    """
    save_dir = Path(save_dir)
    try:
        ckpt = resolve_checkpoint_dir(load_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from e
    run_config = load_run_config(ckpt)
    if run_config is None:
        raise ConversionError(f"{ckpt} has no pose_config.json, so its architecture is unknown; "
                              "export checkpoints written by pose_megatron's trainer or importer")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise ConversionError(f"{save_dir} exists and is not empty; export into a new directory")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ConversionError(f"tokenizer directory {tokenizer_dir} does not exist")
    cfg = run_config.model
    family = family_named(run_config.family, cfg.norm_head)
    reader = DistCheckpointReader(ckpt)
    _check_stored_shapes(reader, cfg, ckpt)
    out_dtype = resolve_storage_dtype(dtype)
    dtypes = {key: out_dtype or reader.tensor_metadata(key).properties.dtype for key in ALL_KEYS}
    target = run_config.max_positions
    owners = hf_name_owners(family, cfg.num_layers)
    entries = [TensorEntry(name, dtypes[owners[name]], shape) for name, shape in hf_shapes(family, cfg).items()]

    # replace=True only swaps in for an empty directory (anything else was refused above).
    with atomic_directory(save_dir, replace=True) as tmp:
        write_safetensors_shards(tmp, entries, _export_pieces(reader, family, cfg, dtypes), max_shard_bytes)
        config = hf_config_for_export(cfg, run_config.rope_scaling, family, target, dtypes[EMBEDDING],
                                      seq_length=run_config.seq_length,
                                      source=run_config.extra.get("hf_config"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp, target)
    return save_dir
