"""Checks of .bin/.idx data before training or evaluation spends anything on it.

megatron-core reads a truncated `.bin`, an empty dataset or token ids beyond the vocabulary only
when a sample touches them, and then fails with numpy or torch errors that name no file. Here:
- sizes: the `.bin` must hold what the `.idx` points to (its last document's end), checked at start;
- token range: `tools/preprocess_data.py` writes a sidecar `PREFIX.tokens.json` with the largest
  token id and the sizes and mtimes of the pair it describes; without a matching sidecar a corpus
  up to `SCAN_LIMIT_BYTES` is scanned once and the result cached on those sizes and mtimes; a
  larger one is checked sample by sample (the dataset raises naming the file and the document);
- fingerprints: (size, mtime) of both files, part of every index cache key, so a rebuilt prefix
  never reuses another corpus's windows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy

from pose_megatron.files import atomic_write_text

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".tokens.json"
SCAN_LIMIT_BYTES = 2 << 30
"""Largest .bin scanned for its token range when it has no sidecar (about a second per GiB)."""
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


class DataError(ValueError):
    """The data cannot be used as it is; the message names the file and the fix."""


def fingerprint(prefix: str) -> list:
    """[bin size, bin mtime ns, idx size, idx mtime ns]: changes whenever the pair is rewritten."""
    out = []
    for ext in (".bin", ".idx"):
        stat = os.stat(prefix + ext)
        out += [stat.st_size, stat.st_mtime_ns]
    return out


@dataclass
class DataSummary:
    documents: int
    tokens: int
    max_token: Optional[int]
    """The largest token id, or None when unknown (the dataset then checks every sample)."""


def check_sizes(prefix: str):
    """The pair's index reader, after checking that neither file is empty or truncated."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    if os.path.getsize(idx_path) < _IDX_HEADER_BYTES:
        raise DataError(f"{idx_path} is empty or truncated; re-run tools/preprocess_data.py")
    try:
        index = _IndexReader(idx_path, multimodal=False)
    except (AssertionError, ValueError, OSError) as err:
        raise DataError(f"{idx_path} is not a readable Megatron index ({err}); re-run "
                        "tools/preprocess_data.py") from None
    if len(index) == 0:
        raise DataError(f"{prefix} holds no documents; preprocess a non-empty corpus into it")
    needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    size = os.path.getsize(bin_path)
    if size < needed:
        raise DataError(f"{bin_path} is truncated: {size} bytes, but its index needs {needed}; "
                        "re-copy it or re-run tools/preprocess_data.py")
    return index


def write_sidecar(prefix: str, max_token: int, documents: int,
                  extra: Optional[dict] = None, path: Optional[str] = None) -> None:
    """Record a pair's token range with the fingerprint it was computed on (at PREFIX.tokens.json
    unless `path` says otherwise)."""
    record = {"max_token": int(max_token), "documents": int(documents),
              "fingerprint": fingerprint(prefix), **(extra or {})}
    atomic_write_text(path or prefix + SIDECAR_SUFFIX, json.dumps(record, indent=2) + "\n")


def _read_sidecar(path: str, prefix: str) -> Optional[dict]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == fingerprint(prefix) else None


def _scan_cache_path(prefix: str, cache_dir: Optional[str]) -> str:
    if cache_dir is None:
        return prefix + SIDECAR_SUFFIX
    return os.path.join(cache_dir, os.path.basename(prefix) + SIDECAR_SUFFIX)


def summarize(prefix: str, cache_dir: Optional[str] = None) -> DataSummary:
    """Sizes checked, and the token range from the sidecar, a cached scan or a new scan."""
    index = check_sizes(prefix)
    documents, tokens = len(index), int(index.sequence_lengths.sum(dtype=numpy.int64))
    for path in (prefix + SIDECAR_SUFFIX, _scan_cache_path(prefix, cache_dir)):
        record = _read_sidecar(path, prefix)
        if record is not None:
            return DataSummary(documents, tokens, int(record["max_token"]))
    if os.path.getsize(prefix + ".bin") > SCAN_LIMIT_BYTES:
        logger.warning("%s has no %s sidecar (tools/preprocess_data.py writes one): token ids are "
                       "checked sample by sample", prefix, SIDECAR_SUFFIX)
        return DataSummary(documents, tokens, None)
    data = numpy.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    max_token = int(data.max())
    del data
    path = _scan_cache_path(prefix, cache_dir)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_sidecar(prefix, max_token, documents, {"source": "scan"}, path=path)
    except OSError:
        pass  # a read-only data directory: the scan is simply repeated next time
    return DataSummary(documents, tokens, max_token)


def check_token_range(prefixes, vocab_size: int, cache_dir: Optional[str] = None) -> Dict[str, DataSummary]:
    """Every prefix's summary; DataError when one holds ids the vocabulary does not have."""
    summaries = {}
    for prefix in prefixes:
        summary = summarize(prefix, cache_dir)
        if summary.max_token is not None and summary.max_token >= vocab_size:
            raise DataError(
                f"{prefix} holds token id {summary.max_token}, but the tokenizer has {vocab_size} "
                "tokens: the data was made with another tokenizer; pass that --tokenizer-model or "
                "re-run tools/preprocess_data.py with this one")
        summaries[prefix] = summary
    return summaries


def check_sample_tokens(tokens: numpy.ndarray, vocab_size: int, path: str, document: int) -> None:
    """The per-sample check for data whose range is unknown."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: document {document} holds token id {int(tokens.max())}, but the "
                        f"tokenizer has {vocab_size} tokens; the data was made with another tokenizer")
