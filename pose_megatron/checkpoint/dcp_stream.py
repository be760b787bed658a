"""torch.distributed.checkpoint in one process, a chunk at a time (see docs/reference.md,
"megatron-core" and "Checkpoint layouts").

A megatron-core dist checkpoint (torch_dist) stores GLOBAL tensors as chunks. `StreamingDistWriter`
writes one from a list of declared chunks whose data are built only when torch's writer asks for
them (peak memory: about one chunk); `DistCheckpointReader` reads any chunk of a stored tensor
through a load planner restricted to it. Neither needs a process group.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pose_megatron.checkpoint.errors import ConversionError

Producer = Callable[[], object]  # -> a tensor chunk, or a BytesIO for an object


@contextlib.contextmanager
def single_process_dcp():
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


def _item_key(index: MetadataIndex) -> tuple:
    return index.fqn, None if index.offset is None else tuple(index.offset)


class _StreamingSavePlanner(DefaultSavePlanner):
    """Saves a fixed list of write items whose data are built only when the writer resolves them."""

    def __init__(self, items: List[WriteItem], producers: Dict[tuple, Producer]):
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


def _empty_extra_state() -> io.BytesIO:
    # megatron serialises each ShardedObject as torch.save([obj]); no FP8 state is None.
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


class StreamingDistWriter:
    """Declares chunks of global tensors (and empty `_extra_state` objects), then writes them as a
    megatron-core torch_dist checkpoint, in declaration order."""

    def __init__(self):
        self._items: List[WriteItem] = []
        self._producers: Dict[tuple, Producer] = {}

    def add_chunk(self, key: str, global_shape: Sequence[int], offsets: Sequence[int],
                  sizes: Sequence[int], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> None:
        """One chunk of tensor `key`; `produce` returns it with shape `sizes` and this dtype."""
        index = MetadataIndex(key, torch.Size(offsets))
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        self._items.append(WriteItem(
            index=index, type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=dtype),
                                        size=torch.Size(global_shape))))
        self._producers[_item_key(index)] = produce

    def add_empty_extra_state(self, key: str) -> None:
        """A `_extra_state` ShardedObject holding None (what a model without FP8 saves)."""
        index = MetadataIndex(key)
        self._items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        self._producers[_item_key(index)] = _empty_extra_state

    def write(self, ckpt_dir: Union[str, Path], common: Optional[dict] = None) -> None:
        """The checkpoint of exactly the declared items, in ckpt_dir (existing, empty); `common`
        is the non-sharded part of the state dict (common.pt)."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        ckpt_dir = Path(ckpt_dir)
        # One writer thread: chunks are built and written one at a time, in plan order. (torch's
        # writer keeps the last chunk of each key alive until the file is closed: about one layer.)
        writer = FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1,
                                  sync_files=True, overwrite=True)
        planner = _StreamingSavePlanner(self._items, self._producers)
        with single_process_dcp():
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        torch.save(dict(common or {}), ckpt_dir / "common.pt")
        # The common-state backend fields ("torch", 1) are the defaults before 0.19, gone in 0.19.
        save_config(CheckpointingConfig("torch_dist", 1), str(ckpt_dir))


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
            with single_process_dcp():
                dcp.load({key: target}, storage_reader=self._reader,
                         planner=_ChunkLoadPlanner({key: chunk}), no_dist=True)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"reading {key} from {self.dir} failed ({type(e).__name__}: {e}); "
                                  "the checkpoint may be incomplete or corrupt") from e
        return target
