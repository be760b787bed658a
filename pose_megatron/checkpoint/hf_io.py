"""Hugging Face checkpoint files: reading weights tensor by tensor, writing safetensors shards.

Reading never maps a whole file: safetensors tensors are read with positioned reads straight into
their own buffers (an mmap would leave every touched page of the checkpoint resident in this
process), and every header is validated up front (a truncated shard fails before anything is
written). `pytorch_model*.bin` files are loaded weights-only and memory-mapped (torch's zip format).

Writing streams: the shard plan (names, dtypes, shapes, offsets) is fixed first, so each file's
header is written before its data and tensors are appended as they are produced; an index
(`model.safetensors.index.json`) is written when there is more than one shard, as transformers does.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from pose_megatron.checkpoint.errors import ConversionError

SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_MAX_HEADER = 100 << 20

# Files of a model directory that are weights or configs, not tokenizer / remote-code files.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                  ".distcp", ".index.json")


class TensorSource(abc.ABC):
    """HF tensors by name, whole or a block of rows: what the importer's pieces read from."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        ...

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.read(name)[start:stop]


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size; tensors read on demand."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ConversionError(f"cannot open {self.path}: {e}") from e
        size = os.fstat(self._fd).st_size
        self.tensors: Dict[str, TensorInfo] = {}
        try:
            self._parse(size)
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self, size: int) -> None:
        bad = f"{self.path} is not a valid safetensors file"
        raw = os.pread(self._fd, 8, 0)
        if len(raw) < 8:
            raise ConversionError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise ConversionError(f"{bad}: header length {header_len} does not fit in its {size} bytes "
                                  "(truncated or corrupt)")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{bad}: unreadable header ({e})") from e
        if not isinstance(header, dict):
            raise ConversionError(f"{bad}: header is not a JSON object")
        base = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{bad}: bad header entry for {name!r}: {entry!r}") from e
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise ConversionError(f"{bad}: {name!r} has offsets {begin}..{end} for {nbytes} bytes "
                                      f"of {entry['dtype']}{list(shape)}")
            if base + end > size:
                raise ConversionError(
                    f"{self.path} is truncated: {name!r} ends at byte {base + end} but the file has "
                    f"{size} bytes; re-download or re-copy this shard"
                )
            self.tensors[name] = TensorInfo(dtype, shape, base + begin, nbytes)

    def _read_bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise ConversionError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += got
        return buf

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self._read_bytes(info.start, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.tensors[name]
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        data = self._read_bytes(info.start + start * row, (stop - start) * row)
        return data.view(info.dtype).reshape((stop - start,) + info.shape[1:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class TorchBinFile:
    """One pytorch_model*.bin: loaded weights-only, memory-mapped when it is a zip checkpoint."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:
            raise ConversionError(
                f"{self.path} could not be read as a PyTorch checkpoint with weights_only=True ({e}); "
                "it may be truncated or corrupt, or hold more than tensors"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{self.path} is not a state dict of tensors")
        self.state = state
        self.tensors = {name: TensorInfo(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                        for name, t in state.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.state[name].clone()

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name][start:stop].clone()

    def close(self) -> None:
        self.state = {}


class HFWeights(TensorSource):
    """The weights of a Hugging Face model directory, whatever their file layout.

    Accepts `model.safetensors[.index.json]` or `pytorch_model.bin[.index.json]`. Every file is
    opened (and, for safetensors, its header checked) here, so bad input fails before any output.
    """

    def __init__(self, hf_dir: Union[str, Path]):
        self.dir = Path(hf_dir)
        files, self.format = self._weight_map()
        self._files = {}
        self._where: Dict[str, str] = {}
        try:
            for fname in sorted(set(files.values())):
                path = self.dir / fname
                if not path.is_file():
                    raise ConversionError(f"{path} is listed in the index but does not exist")
                opener = SafetensorsFile if self.format == "safetensors" else TorchBinFile
                self._files[fname] = opener(path)
            for name, fname in files.items():
                if name not in self._files[fname].tensors:
                    raise ConversionError(f"the index places {name!r} in {fname}, which does not hold it")
                self._where[name] = fname
        except BaseException:
            self.close()
            raise

    def _weight_map(self) -> Tuple[Dict[str, str], str]:
        for index, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            path = self.dir / index
            if path.is_file():
                try:
                    weight_map = json.loads(path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{path} is not a valid weight index ({e})") from e
                return dict(weight_map), fmt
        for single, fmt in ((SAFE_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
            path = self.dir / single
            if path.is_file():
                opener = SafetensorsFile if fmt == "safetensors" else TorchBinFile
                f = opener(path)
                names = list(f.tensors)
                f.close()
                return {n: single for n in names}, fmt
        raise ConversionError(
            f"no weights in {self.dir}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    @property
    def names(self) -> List[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._files[self._where[name]].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._files[self._where[name]].read_rows(name, start, stop)

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._where)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> List[List[TensorEntry]]:
    """Consecutive entries grouped into files of at most max_shard_bytes (a bigger tensor alone)."""
    shards: List[List[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> List[str]:
    if count == 1:
        return [SAFE_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(entries: Sequence[TensorEntry], metadata: Dict[str, str]) -> bytes:
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _DTYPE_CODES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_shards(
    out_dir: Union[str, Path],
    entries: Sequence[TensorEntry],
    pieces: Iterable[Tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    metadata: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Write `entries` as safetensors shards from a stream of (name, block of leading rows).

    `pieces` must come in entry order; a tensor may arrive as several consecutive row blocks. Only
    the current block is held. Returns the file names; writes the index when there are several.
    """
    out_dir = Path(out_dir)
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(shards))
    stream: Iterator[Tuple[str, torch.Tensor]] = iter(pieces)
    pending: Optional[Tuple[str, torch.Tensor]] = None
    for fname, shard in zip(names, shards, strict=True):
        with open(out_dir / fname, "wb") as f:
            f.write(_header(shard, metadata or {"format": "pt"}))
            for entry in shard:
                written = 0
                while written < entry.nbytes:
                    name, block = pending if pending is not None else next(stream)
                    pending = None
                    if name != entry.name:
                        raise RuntimeError(f"expected tensor {entry.name!r}, got {name!r}")
                    if block.dtype != entry.dtype or tuple(block.shape[1:]) != entry.shape[1:]:
                        raise RuntimeError(f"{name}: got {block.dtype}{list(block.shape)}, planned "
                                           f"{entry.dtype}{list(entry.shape)}")
                    data = block.contiguous().view(-1).view(torch.uint8).numpy()
                    f.write(memoryview(data))
                    written += data.nbytes
                if written != entry.nbytes:
                    raise RuntimeError(f"{entry.name}: wrote {written} bytes, planned {entry.nbytes}")
            f.flush()
            os.fsync(f.fileno())
    if next(stream, None) is not None:
        raise RuntimeError("more tensors were produced than planned")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: fname for fname, shard in zip(names, shards, strict=True) for e in shard},
        }
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def copy_tokenizer_files(src_dir: Union[str, Path], dst_dir: Union[str, Path],
                         model_max_length: int) -> List[str]:
    """Copy a model directory's tokenizer (and remote-code) files, with model_max_length updated.

    Everything at the top level except weights, indexes and config.json is copied: tokenizer
    files, generation_config.json, and the `*.py` files that Baichuan's auto_map points to.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise ConversionError(f"--tokenizer-dir {src_dir} is not a directory")
    copied = []
    for path in sorted(src_dir.iterdir()):
        if not path.is_file() or path.name == "config.json" or path.name.endswith(_NOT_TOKENIZER):
            continue
        if path.name == "tokenizer_config.json":
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path} is not valid JSON ({e})") from e
            config["model_max_length"] = int(model_max_length)
            (dst_dir / path.name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        else:
            shutil.copyfile(path, dst_dir / path.name)
        copied.append(path.name)
    if not any(name.startswith("tokenizer") for name in copied):
        raise ConversionError(f"--tokenizer-dir {src_dir} holds no tokenizer files")
    return copied
