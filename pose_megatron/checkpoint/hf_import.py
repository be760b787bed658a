"""Hugging Face -> megatron-core dist checkpoint, streaming tensor by tensor.

`convert_hf_to_megatron` writes a torch_dist checkpoint directly (dcp_stream.StreamingDistWriter):
one chunk per layer and tensor (gate and up separately, the vocabulary tensors in row blocks), each
built only when the writer asks for it, from positioned reads of the HF files. Peak memory is
about one chunk. The result is exactly what megatron-core itself writes for `{"model":
model.sharded_state_dict()}` (same keys, global shapes, `_extra_state` objects, metadata.json),
in Megatron-LM's layout `SAVE/release/` + tracker "release", with the run configuration in
`pose_config.json` (docs/reference.md, "Checkpoint layouts"), and a common.pt as stock Megatron-LM
reads it (`checkpoint_version` 3.0, `iteration` 0, `args`; see megatron_args.py). It loads with `load_model_weights`
at any TP / PP (a different vocabulary padding too: see vocab_padding.check_vocab_padding).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from pose_megatron.checkpoint.dcp_stream import StreamingDistWriter
from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import Family
from pose_megatron.checkpoint.hf_arch import model_info_from_hf_config, read_hf_config
from pose_megatron.checkpoint.hf_io import HFWeights, TensorSource
from pose_megatron.checkpoint.layout import (
    RELEASE,
    RunConfig,
    iteration_dirname,
    read_tracker,
    save_run_config,
    write_tracker,
)
from pose_megatron.checkpoint.megatron_args import log_stock_rope, megatron_args, sharded_sd_metadata
from pose_megatron.checkpoint.megatron_keys import (
    ALL_KEYS,
    EMBEDDING,
    OUTPUT,
    extra_state_keys,
    file_order,
    is_layer_key,
    megatron_shapes,
)
from pose_megatron.checkpoint.saved_state import CHECKPOINT_VERSION
from pose_megatron.checkpoint.weights import (
    MAX_PIECE_BYTES,
    dtype_label,
    hf_shapes,
    import_pieces,
    resolve_storage_dtype,
)
from pose_megatron.files import atomic_directory
from pose_megatron.presets import ModelConfig


class _AliasSource(TensorSource):
    """Reads one HF name in place of another (tied embeddings: lm_head = embed_tokens)."""

    def __init__(self, source: TensorSource, aliases: Dict[str, str]):
        self.source, self.aliases = source, aliases

    def read(self, name):
        return self.source.read(self.aliases.get(name, name))

    def read_rows(self, name, start, stop):
        return self.source.read_rows(self.aliases.get(name, name), start, stop)


def _check_hf_tensors(family: Family, cfg: ModelConfig, weights: HFWeights,
                      tied: bool) -> Tuple[Dict[str, str], Dict[str, torch.dtype]]:
    """Validate names and shapes against the config before anything is written.

    Returns (HF name aliases, the source dtype of each megatron key).
    """
    expected = hf_shapes(family, cfg)
    present = set(weights.names)
    aliases = {}
    (lm_head,), (embed,) = family.hf_names(OUTPUT), family.hf_names(EMBEDDING)
    if lm_head not in present and tied:
        aliases[lm_head] = embed  # the import unties: the output layer starts as a copy
    missing = [n for n in expected if n not in present and n not in aliases]
    if missing:
        raise ConversionError(f"{len(missing)} tensor(s) the config implies are missing from the "
                              f"checkpoint, e.g. {missing[:4]}")
    unexpected = sorted(n for n in present - set(expected) if not family.ignored_tensors.search(n))
    if unexpected:
        raise ConversionError(f"{len(unexpected)} tensor(s) in the checkpoint have no place in a "
                              f"{family.name} model, e.g. {unexpected[:4]}; is config.json the right one?")
    for name, shape in expected.items():
        found = weights.info(aliases.get(name, name))
        if found.shape != shape:
            raise ConversionError(f"{name} has shape {list(found.shape)}, but config.json implies "
                                  f"{list(shape)}")
        if not found.dtype.is_floating_point:
            raise ConversionError(f"{name} is {found.dtype}, not a floating-point weight")
    kinds = {key: set() for key in ALL_KEYS}
    for key, layer in file_order(cfg.num_layers):
        kinds[key].update(weights.info(aliases.get(n, n)).dtype for n in family.hf_names(key, layer))
    for key, found in kinds.items():
        if len(found) > 1:
            raise ConversionError(f"the tensors of {key} mix dtypes {sorted(map(str, found))}; pass "
                                  "--dtype to convert them all to one")
    return aliases, {key: found.pop() for key, found in kinds.items()}


def _plan_writes(family: Family, cfg: ModelConfig, padded_vocab: int, dtypes: Dict[str, torch.dtype],
                 source: TensorSource, max_piece_bytes: int) -> StreamingDistWriter:
    """Every chunk in file order (embedding, layer by layer, final norm, output), then the objects."""
    shapes = megatron_shapes(cfg, padded_vocab)
    writer = StreamingDistWriter()
    for key, layer in file_order(cfg.num_layers):
        shape, dtype = shapes[key], dtypes[key]
        lead = (layer,) if is_layer_key(key) else ()  # per-layer keys: one layer of the stack
        body = shape[len(lead):]
        itemsize = torch.empty((), dtype=dtype).element_size()
        for piece in import_pieces(family, key, cfg, layer, padded_vocab, max_piece_bytes, itemsize):
            offsets = lead + (piece.row_start,) + (0,) * (len(body) - 1)
            sizes = (1,) * len(lead) + (piece.rows,) + tuple(body[1:])
            built = sizes[len(lead):]  # what the piece returns: [rows, ...]

            def produce(piece=piece, sizes=sizes, built=built, dtype=dtype, key=key):
                data = piece.build(source)
                if tuple(data.shape) != built:
                    raise RuntimeError(f"{key}: built {list(data.shape)}, planned {list(built)}")
                return data.to(dtype).reshape(sizes).contiguous()  # [1, rows, ...] for layers

            writer.add_chunk(key, shape, offsets, sizes, dtype, produce)
    for key in extra_state_keys(cfg.num_layers):
        writer.add_empty_extra_state(key)
    return writer


def convert_hf_to_megatron(
    hf_dir: Union[str, Path],
    save_dir: Union[str, Path],
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[Union[str, torch.dtype]] = None,
    *,
    legacy_yarn: str = "revised",
    max_piece_bytes: int = MAX_PIECE_BYTES,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face directory of any registered family to SAVE_DIR/release.

    tp / pp are checked against the architecture and fix the vocabulary padding (the only
    TP-dependent part of the checkpoint). dtype: "fp32" / "bf16" / "fp16" (or a torch dtype);
    None keeps the checkpoint's own dtype (bit-exact round trips). legacy_yarn: how to read
    `rope_scaling {"type": "yarn"}` ("revised": PoSE's released models; "standard": HF yarn).
    An existing SAVE_DIR/release is replaced only with `overwrite` (once the new one is complete).
    Returns the written checkpoint directory.
    """
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    if (save_dir / iteration_dirname(RELEASE)).exists() and not overwrite:
        raise ConversionError(f"{save_dir / iteration_dirname(RELEASE)} already exists (an earlier "
                              "conversion); pass --overwrite to replace it, or choose another --save")
    info = model_info_from_hf_config(read_hf_config(hf_dir), legacy_yarn=legacy_yarn)
    cfg = info.model
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
    try:
        cfg.check_parallel(tp, pp)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    target_dtype = resolve_storage_dtype(dtype)
    padded_vocab = cfg.padded_vocab_size(tp)

    weights = HFWeights(hf_dir)
    try:
        aliases, source_dtypes = _check_hf_tensors(info.family, cfg, weights, info.tied_embeddings)
        dtypes = {key: target_dtype or d for key, d in source_dtypes.items()}
        writer = _plan_writes(info.family, cfg, padded_vocab, dtypes, _AliasSource(weights, aliases),
                              max_piece_bytes)
        run_config = RunConfig(
            model=cfg, rope_scaling=info.rope_scaling, family=info.family.name,
            seq_length=None, target_length=info.target_length,
            extra={
                "converter": f"{__name__}.convert_hf_to_megatron",
                "source": str(hf_dir.resolve()),
                "source_format": weights.format,
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp,
                "padded_vocab_size": padded_vocab,
                "dtypes": {key: dtype_label(d) for key, d in dtypes.items()},
                "tied_embeddings": info.tied_embeddings,
                "hf_config": info.source,
            },
        )
        args = megatron_args(run_config, (tp, pp, 1), params_dtype=dtypes[EMBEDDING])
        common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                  "content_metadata": sharded_sd_metadata(use_distributed_optimizer=False)}
        return _save_release(save_dir, writer, run_config, common)
    finally:
        weights.close()


def _save_release(save_dir: Path, writer: StreamingDistWriter, run_config: RunConfig,
                  common: dict) -> Path:
    created = not save_dir.exists()
    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        latest = read_tracker(save_dir)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if latest not in (None, RELEASE):
        raise ConversionError(f"{save_dir} holds a training run (latest iteration {latest}); "
                              "convert into an empty --save directory")
    try:
        # replace=True (only reached with overwrite): the old release/ goes once the new one is whole.
        with atomic_directory(save_dir / iteration_dirname(RELEASE), replace=True) as tmp:
            writer.write(tmp, common)
            save_run_config(tmp, run_config)
    except BaseException:
        if created:
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    write_tracker(save_dir, RELEASE)
    log_stock_rope(run_config, save_dir / iteration_dirname(RELEASE))
    return save_dir / iteration_dirname(RELEASE)
