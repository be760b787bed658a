"""Hugging Face <-> Megatron checkpoint conversion, streaming tensor by tensor.

Import (`convert_hf_to_megatron`) writes a megatron-core dist checkpoint (torch_dist) directly with
torch.distributed.checkpoint: a dist checkpoint stores GLOBAL tensors (per-layer ones stacked on a
leading layer axis) as chunks, so the importer declares one chunk per layer and tensor (gate and up
separately, the vocabulary tensors in row blocks) and a save planner builds each chunk's data only
when the writer asks for it, from positioned reads of the HF files. Nothing else is held: peak memory
is about one chunk. The result is exactly what megatron-core itself writes for `{"model":
model.sharded_state_dict()}` (same keys, global shapes, `_extra_state` objects, metadata.json,
common.pt), in Megatron-LM's layout `SAVE/release/` + tracker "release", with the run configuration
in `pose_config.json`. It loads with `load_model_weights` at any TP / PP (a different vocabulary
padding too: see `check_vocab_padding`).

Export (`convert_megatron_to_hf`) reads any dist checkpoint the trainer saved (any TP / PP; only the
model's tensors) one tensor of one layer at a time through a load planner restricted to that chunk,
and streams safetensors shards, config.json (stock transformers RoPE, max_position_embeddings = the
target length) and the tokenizer files.

Both write into a hidden temporary directory that is renamed only when complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pose_megatron.checkpoint import families as fam
from pose_megatron.checkpoint.hf_config import (
    ConversionError,
    hf_config_for_export,
    model_info_from_hf_config,
    read_hf_config,
)
from pose_megatron.checkpoint.hf_io import (
    HFWeights,
    TensorEntry,
    copy_tokenizer_files,
    write_safetensors_shards,
)
from pose_megatron.checkpoint.layout import (
    RELEASE,
    RunConfig,
    iteration_dirname,
    load_run_config,
    read_tracker,
    resolve_checkpoint_dir,
    save_run_config,
    write_tracker,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_FLAGS = {dtype: flag for flag, dtype in DTYPES.items()}
MAX_PIECE_BYTES = 32 << 20  # largest vocabulary row block the importer builds (and leaves to read)
MAX_SHARD_BYTES = 5 << 30  # safetensors shard size of exports (transformers' default)


# ============================================================================= vocabulary padding


def check_vocab_padding(run_config: RunConfig, tensor_model_parallel_size: int,
                        checkpoint: Union[str, Path, None] = None) -> int:
    """The padded vocabulary of the model at this TP size, checked against the checkpoint's.

    The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP (as Megatron does),
    so a checkpoint imported or trained at one TP may hold another number of rows than the model
    at this TP. megatron-core 0.16 still loads it: the embedding and output layer are
    `allow_shape_mismatch` tensors, zero-initialised, and the rows both sides have are read. That is
    exact for the real vocabulary (only padding rows are dropped or start at zero), but it would
    silently zero real rows if the checkpoint had fewer rows than the model's vocabulary: that case
    raises ValueError here; a padding-only difference warns. The stored size is read from
    `checkpoint` (a save root or iteration directory; authoritative) or else from
    `run_config.extra["padded_vocab_size"]` (imports record it). Returns the model's padded size.
    """
    model = run_config.model
    needed = model.padded_vocab_size(tensor_model_parallel_size)
    stored = (stored_padded_vocab(checkpoint) if checkpoint is not None
              else run_config.extra.get("padded_vocab_size"))
    if stored is None or stored == needed:
        return needed
    if stored < model.vocab_size:
        raise ValueError(
            f"the checkpoint holds {stored} vocabulary rows but the model has {model.vocab_size} "
            f"tokens: megatron-core would load the {stored} rows and leave the others zero. Use the "
            "checkpoint's tokenizer (its vocab_size is in pose_config.json)."
        )
    fate = (f"rows {needed}..{stored - 1} are dropped" if stored > needed
            else f"rows {stored}..{needed - 1} start at zero")
    warnings.warn(
        f"the checkpoint's vocabulary ({model.vocab_size} tokens) is padded to {stored} rows; at "
        f"--tensor-model-parallel-size {tensor_model_parallel_size} the model pads it to {needed}. "
        f"The {model.vocab_size} real rows load exactly; padding {fate}.",
        stacklevel=2,
    )
    return needed


def stored_padded_vocab(checkpoint: Union[str, Path]) -> int:
    """Rows of the embedding stored in a dist checkpoint (from its metadata; reads no tensor)."""
    metadata = FileSystemReader(str(resolve_checkpoint_dir(checkpoint))).read_metadata()
    return int(metadata.state_dict_metadata[fam.EMBEDDING].size[0])


# ============================================================================= import


class _StreamingSavePlanner(DefaultSavePlanner):
    """Saves a fixed list of write items whose data are built only when the writer resolves them."""

    def __init__(self, items: List[WriteItem], producers: Dict[tuple, Callable[[], object]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._producers = producers

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._producers[_item_key(write_item.index)]()


def _item_key(index: MetadataIndex) -> tuple:
    return index.fqn, None if index.offset is None else tuple(index.offset)


class _AliasSource(fam.TensorSource):
    """Reads one HF name in place of another (tied embeddings: lm_head = embed_tokens)."""

    def __init__(self, source: fam.TensorSource, aliases: Dict[str, str]):
        self.source, self.aliases = source, aliases

    def read(self, name):
        return self.source.read(self.aliases.get(name, name))

    def read_rows(self, name, start, stop):
        return self.source.read_rows(self.aliases.get(name, name), start, stop)


def _check_hf_tensors(family: str, cfg, weights: HFWeights, tied: bool):
    """Validate names and shapes against the config before anything is written.

    Returns (HF name aliases, the source dtype of each megatron key).
    """
    expected = fam.hf_shapes(family, cfg)
    present = set(weights.names)
    aliases = {}
    lm_head, embed = fam.hf_names(family, fam.OUTPUT)[0], fam.hf_names(family, fam.EMBEDDING)[0]
    if lm_head not in present and tied:
        aliases[lm_head] = embed  # the import unties: the output layer starts as a copy
    missing = [n for n in expected if n not in present and n not in aliases]
    if missing:
        raise ConversionError(f"{len(missing)} tensor(s) the config implies are missing from the "
                              f"checkpoint, e.g. {missing[:4]}")
    unexpected = sorted(n for n in present - set(expected) if not fam.IGNORED_HF_TENSORS.search(n))
    if unexpected:
        raise ConversionError(f"{len(unexpected)} tensor(s) in the checkpoint have no place in a "
                              f"{family} model, e.g. {unexpected[:4]}; is config.json the right one?")
    for name, shape in expected.items():
        found = weights.info(aliases.get(name, name))
        if found.shape != shape:
            raise ConversionError(f"{name} has shape {list(found.shape)}, but config.json implies "
                                  f"{list(shape)}")
        if not found.dtype.is_floating_point:
            raise ConversionError(f"{name} is {found.dtype}, not a floating-point weight")
    dtypes = {}
    for key in fam.weight_map(family):
        layers = range(cfg.num_layers) if fam.is_layer_key(key) else (0,)
        kinds = {weights.info(aliases.get(n, n)).dtype for layer in layers
                 for n in fam.hf_names(family, key, layer)}
        if len(kinds) > 1:
            raise ConversionError(f"the tensors of {key} mix dtypes {sorted(map(str, kinds))}; pass "
                                  "--dtype to convert them all to one")
        dtypes[key] = kinds.pop()
    return aliases, dtypes


def _import_plan(family, cfg, padded_vocab, dtypes, source, max_piece_bytes):
    """Write items in file order (embedding, layer by layer, final norm, output) and their producers."""
    shapes = fam.megatron_shapes(cfg, padded_vocab)
    items: List[WriteItem] = []
    producers: Dict[tuple, Callable[[], object]] = {}

    def add(key, layer):
        shape, dtype = shapes[key], dtypes[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        for piece in fam.import_pieces(family, key, cfg, layer or 0, padded_vocab, max_piece_bytes, itemsize):
            lead = () if layer is None else (layer,)
            body = shape[len(lead):]
            offsets = lead + (piece.row_start,) + (0,) * (len(body) - 1)
            sizes = (1,) * len(lead) + (piece.rows,) + tuple(body[1:])
            index = MetadataIndex(key, torch.Size(offsets))
            items.append(WriteItem(
                index=index, type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtype), size=torch.Size(shape))))

            built = sizes[len(lead):]  # what the piece returns: [rows, ...]

            def produce(piece=piece, sizes=sizes, built=built, dtype=dtype, key=key):
                data = piece.build(source)
                if tuple(data.shape) != built:
                    raise RuntimeError(f"{key}: built {list(data.shape)}, planned {list(built)}")
                return data.to(dtype).reshape(sizes).contiguous()  # [1, rows, ...] for layers

            producers[_item_key(index)] = produce

    add(fam.EMBEDDING, None)
    for layer in range(cfg.num_layers):
        for key in fam.LAYER_ORDER:
            add(key, layer)
    add(fam.FINAL_NORM, None)
    add(fam.OUTPUT, None)
    for key in fam.extra_state_keys(cfg.num_layers):
        index = MetadataIndex(key)
        items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        producers[_item_key(index)] = _empty_extra_state
    return items, producers


@contextlib.contextmanager
def _single_process_dcp():
    """Run a one-process dcp save / load: without torch's note that it runs in one process, and
    with the original error instead of the CheckpointException (a BaseException) that wraps it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            failures = list(e.failures.values())  # rank -> (exception, traceback)
            if len(failures) == 1 and isinstance(failures[0][0], Exception):
                raise failures[0][0] from None
            raise RuntimeError(str(e)) from None


def _empty_extra_state() -> io.BytesIO:
    # megatron serialises each ShardedObject as torch.save([obj]); no FP8 state is None.
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


def _write_dist_checkpoint(ckpt_dir: Path, items, producers) -> None:
    """A megatron-core torch_dist checkpoint of exactly these items, in ckpt_dir (existing, empty)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    # One writer thread: chunks are built and written one at a time, in plan order. (torch's writer
    # keeps the last chunk of each key alive until the file is closed: about one layer at the peak.)
    writer = FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1,
                              sync_files=True, overwrite=True)
    with _single_process_dcp():
        dcp.save({}, storage_writer=writer, planner=_StreamingSavePlanner(items, producers), no_dist=True)
    torch.save({}, ckpt_dir / "common.pt")  # the non-sharded part of {"model": ...} is empty
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(ckpt_dir))


def convert_hf_to_megatron(
    hf_dir: Union[str, Path],
    save_dir: Union[str, Path],
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[Union[str, torch.dtype]] = None,
    *,
    legacy_yarn: str = "revised",
    max_piece_bytes: int = MAX_PIECE_BYTES,
) -> Path:
    """Convert a Hugging Face LLaMA / Baichuan-7B / Baichuan2-7B directory to SAVE_DIR/release.

    tp / pp are checked against the architecture and fix the vocabulary padding (the only
    TP-dependent part of the checkpoint). dtype: "fp32" / "bf16" / "fp16" (or a torch dtype);
    None keeps the checkpoint's own dtype (bit-exact round trips). legacy_yarn: how to read
    `rope_scaling {"type": "yarn"}` ("revised": PoSE's released models; "standard": HF yarn).
    Returns the written checkpoint directory.
    """
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    info = model_info_from_hf_config(read_hf_config(hf_dir), legacy_yarn=legacy_yarn)
    cfg = info.model
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
    try:
        cfg.check_parallel(tp, pp)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    target_dtype = _resolve_dtype(dtype)
    padded_vocab = cfg.padded_vocab_size(tp)

    weights = HFWeights(hf_dir)
    try:
        aliases, source_dtypes = _check_hf_tensors(info.family, cfg, weights, info.tied_embeddings)
        dtypes = {key: target_dtype or d for key, d in source_dtypes.items()}
        items, producers = _import_plan(info.family, cfg, padded_vocab, dtypes,
                                        _AliasSource(weights, aliases), max_piece_bytes)
        run_config = RunConfig(
            model=cfg, rope_scaling=info.rope_scaling, family=info.family,
            seq_length=None, target_length=info.target_length,
            extra={
                "converter": "pose_megatron.checkpoint.convert.convert_hf_to_megatron",
                "source": str(hf_dir.resolve()),
                "source_format": weights.format,
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp,
                "padded_vocab_size": padded_vocab,
                "dtypes": {key: DTYPE_FLAGS.get(d, str(d)) for key, d in dtypes.items()},
                "tied_embeddings": info.tied_embeddings,
                "hf_config": info.source,
            },
        )
        return _save_release(save_dir, items, producers, run_config)
    finally:
        weights.close()


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPE_FLAGS:
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"dtype must be one of {sorted(DTYPES)} (or None to keep the source's), "
                          f"got {dtype!r}")


def _save_release(save_dir: Path, items, producers, run_config: RunConfig) -> Path:
    created = not save_dir.exists()
    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        latest = read_tracker(save_dir)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if latest not in (None, RELEASE):
        raise ConversionError(f"{save_dir} holds a training run (latest iteration {latest}); "
                              "convert into an empty --save directory")
    final = save_dir / iteration_dirname(RELEASE)
    tmp = save_dir / f".{final.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_dist_checkpoint(tmp, items, producers)
        save_run_config(tmp, run_config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_tracker(save_dir, RELEASE)
    return final


# ============================================================================= export


class _CachedMetadataReader(FileSystemReader):
    """A FileSystemReader that unpickles the checkpoint metadata once for many partial loads."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Loads one chunk (offsets, sizes) of each requested tensor into a buffer of that chunk's size."""

    def __init__(self, chunks: Dict[str, ChunkStorageMetadata]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = chunks

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, chunk in self._chunks.items():
            reads = create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            covered = sum(math.prod(r.lengths) for r in reads)
            if covered != math.prod(chunk.sizes):
                raise ConversionError(f"the checkpoint does not cover {key} at {list(chunk.offsets)} "
                                      f"+ {list(chunk.sizes)} (incomplete or corrupt metadata)")
            items += reads
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the buffer is the chunk itself (offsets are relative)


class DistCheckpointReader:
    """Reads chunks of tensors (e.g. one layer of a stacked key) from a torch_dist checkpoint."""

    def __init__(self, ckpt_dir: Union[str, Path]):
        self.dir = Path(ckpt_dir)
        self._reader = _CachedMetadataReader(str(self.dir))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:
            raise ConversionError(f"{self.dir} holds no readable dist-checkpoint metadata ({e})") from e

    def tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"{self.dir} has no tensor {key!r} (is it a pose_megatron GPT "
                                  "checkpoint?)")
        return md

    def row_blocks(self, key: str, stop: int) -> List[Tuple[int, int]]:
        """[start, end) row ranges below `stop` that follow the stored chunks (each read once)."""
        starts = {c.offsets[0] for c in self.tensor_metadata(key).chunks if c.offsets[0] < stop}
        cuts = sorted(starts | {0, stop})
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def read(self, key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
        md = self.tensor_metadata(key)
        target = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        try:
            with _single_process_dcp():
                dcp.load({key: target}, storage_reader=self._reader,
                         planner=_ChunkLoadPlanner({key: chunk}), no_dist=True)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"reading {key} from {self.dir} failed ({type(e).__name__}: {e}); "
                                  "the checkpoint may be incomplete or corrupt") from e
        return target


def _export_pieces(reader: DistCheckpointReader, family: str, cfg,
                   dtypes) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor or leading row block) in export order, one stored chunk at a time."""
    h = cfg.hidden_size
    shapes = fam.megatron_shapes(cfg, reader.tensor_metadata(fam.EMBEDDING).size[0])

    def vocab(key):
        (name,) = fam.hf_names(family, key)
        for a, b in reader.row_blocks(key, cfg.vocab_size):
            yield name, reader.read(key, (a, 0), (b - a, h)).to(dtypes[key])

    yield from vocab(fam.EMBEDDING)
    for layer in range(cfg.num_layers):
        for key in fam.LAYER_ORDER:
            body = shapes[key][1:]
            chunk = reader.read(key, (layer,) + (0,) * len(body), (1,) + body)[0]
            tensors = fam.from_megatron(family, key, chunk, cfg)
            for name, tensor in zip(fam.hf_names(family, key, layer), tensors, strict=True):
                yield name, tensor.to(dtypes[key])
            del chunk
    yield fam.hf_names(family, fam.FINAL_NORM)[0], reader.read(fam.FINAL_NORM, (0,), (h,)).to(
        dtypes[fam.FINAL_NORM])
    yield from vocab(fam.OUTPUT)


def _check_stored_shapes(reader: DistCheckpointReader, cfg, ckpt: Path) -> int:
    padded = reader.tensor_metadata(fam.EMBEDDING).size[0]
    if padded < cfg.vocab_size:
        raise ConversionError(f"{ckpt}: embedding has {padded} rows, fewer than the vocabulary "
                              f"{cfg.vocab_size} in pose_config.json")
    for key, shape in fam.megatron_shapes(cfg, padded).items():
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
    to a Hugging Face directory SAVE_DIR.

    max_position_embeddings becomes the run's target length; the RoPE is written for stock
    transformers (rope_parameters, plus rope_scaling / rope_theta for transformers 4.x). dtype: as
    stored when None. tokenizer_dir: its tokenizer files are copied with model_max_length updated.
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
    cfg, family = run_config.model, run_config.family
    reader = DistCheckpointReader(ckpt)
    _check_stored_shapes(reader, cfg, ckpt)
    out_dtype = _resolve_dtype(dtype)
    dtypes = {key: out_dtype or reader.tensor_metadata(key).properties.dtype
              for key in fam.weight_map(family)}
    target = run_config.target_length or round(
        cfg.max_position_embeddings * run_config.rope_scaling.factor)

    entries, names_to_key = [], {}
    for key in fam.weight_map(family):
        for layer in range(cfg.num_layers) if fam.is_layer_key(key) else (0,):
            names_to_key.update(dict.fromkeys(fam.hf_names(family, key, layer), key))
    for name, shape in fam.hf_shapes(family, cfg).items():
        entries.append(TensorEntry(name, dtypes[names_to_key[name]], shape))

    tmp = save_dir.parent / f".{save_dir.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_safetensors_shards(tmp, entries, _export_pieces(reader, family, cfg, dtypes), max_shard_bytes)
        config = hf_config_for_export(cfg, run_config.rope_scaling, family, target, dtypes[fam.EMBEDDING],
                                      seq_length=run_config.seq_length,
                                      source=run_config.extra.get("hf_config"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_dir.exists():
        save_dir.rmdir()  # empty (checked above)
    os.replace(tmp, save_dir)
    return save_dir
