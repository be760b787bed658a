"""JSONL -> megatron-core indexed dataset (.bin/.idx), the library behind tools/preprocess_data.py.

Each JSONL line is one document; for every `--json-keys` key the text is tokenized and written as
one document (one sequence) with megatron-core's IndexedDatasetBuilder, to
`{output_prefix}_{key}_document` (Megatron-LM's naming, so the prefix passes straight to
`--data-path`).

Reading and writing stay in the main process so the output keeps input order; tokenizing fans out
to worker processes in batches of lines (one worker runs inline: no pickling, no IPC). Outputs are
written under temporary names and renamed only when complete, the `.idx` last: a pair that loads is
always a whole pair. Temporaries are removed on every failure (a full disk included), and those a
killed run left behind are removed by the next run for the same prefix. An existing output is
replaced only when asked (`overwrite`), and an output without a single document is an error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from pose_megatron.data_checks import write_sidecar
from pose_megatron.files import remove_stale_temporaries, temporary_sibling
from pose_megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer, token_dtype

logger = logging.getLogger(__name__)

_MAX_LOGGED_BAD_LINES = 10


class MalformedLineError(ValueError):
    """A JSONL line that is not an object with a string under every json key."""


@dataclass
class PreprocessConfig:
    """What to preprocess and how (the fields of tools/preprocess_data.py)."""

    input: str
    """The JSONL file: one JSON object per line, one document per object."""

    output_prefix: str
    """Output path prefix; each key writes `{output_prefix}_{key}_document.{bin,idx}`."""

    tokenizer_type: str
    """One of pose_megatron.tokenizer.TOKENIZER_TYPES ("sentencepiece", "huggingface")."""

    tokenizer_model: str
    """The sentencepiece .model file or the Hugging Face tokenizer directory."""

    json_keys: Sequence[str] = ("text",)
    """The keys whose string values are tokenized; each key gets its own .bin/.idx pair."""

    workers: int = 1
    """Tokenizer processes; 1 tokenizes in the main process."""

    prepend_bos: bool = False
    """Put the tokenizer's BOS id in front of every document."""

    append_eod: bool = False
    """Put the tokenizer's EOD (EOS) id after every document."""

    skip_bad_lines: bool = False
    """Skip (and count) malformed lines instead of failing at the first one."""

    lines_per_task: int = 32
    """Lines handed to a worker at a time: large enough to amortise IPC, small enough to balance."""

    progress: bool = True
    """Show a tqdm progress bar (docs/s and tokens/s) on stderr."""

    overwrite: bool = False
    """Replace existing output files of the same prefix (otherwise their presence is an error)."""


@dataclass
class PreprocessStats:
    """What a preprocessing run did."""

    documents: int = 0
    """Documents written (per key)."""

    tokens: int = 0
    """Tokens written, summed over keys."""

    bad_lines: int = 0
    """Malformed lines skipped (only with skip_bad_lines)."""

    empty_documents: int = 0
    """Documents skipped because a key's text tokenized to nothing."""

    seconds: float = 0.0
    """Wall time of the run."""

    output_prefixes: Dict[str, str] = field(default_factory=dict)
    """The data prefix written for each json key."""

    max_tokens: Dict[str, int] = field(default_factory=dict)
    """The largest token id written for each json key (recorded in the sidecar)."""


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """The data prefix (for --data-path) that preprocessing writes for `key`."""
    return f"{output_prefix}_{key}_document"


def validate_preprocess_config(cfg: PreprocessConfig):
    """Check every input before any work starts; returns the loaded tokenizer."""
    if cfg.tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"unknown tokenizer type {cfg.tokenizer_type!r}; "
            f"choose one of {sorted(TOKENIZER_TYPES)}"
        )
    if not os.path.isfile(cfg.input):
        raise FileNotFoundError(f"input file {cfg.input!r} does not exist; pass a .jsonl file")
    if not cfg.json_keys or any(not isinstance(k, str) or not k for k in cfg.json_keys):
        raise ValueError(f"json_keys must be non-empty strings, got {list(cfg.json_keys)!r}")
    if len(set(cfg.json_keys)) != len(cfg.json_keys):
        raise ValueError(f"json_keys has duplicates: {list(cfg.json_keys)!r}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.lines_per_task < 1:
        raise ValueError(f"lines_per_task must be >= 1, got {cfg.lines_per_task}")
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(
            f"output prefix directory {out_dir!r} is a file; pick another prefix"
        )
    if not cfg.overwrite:
        for key in cfg.json_keys:
            final = output_prefix_for_key(cfg.output_prefix, key)
            existing = [final + ext for ext in (".bin", ".idx") if os.path.exists(final + ext)]
            if existing:
                raise FileExistsError(
                    f"{existing[0]} already exists; pass --overwrite to replace it, or choose "
                    "another --output-prefix (datasets and index caches built from it would "
                    "otherwise mix two corpora)")
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    if cfg.prepend_bos and tokenizer.bos is None:
        raise ValueError(
            f"--prepend-bos asked for, but tokenizer {cfg.tokenizer_model!r} has no BOS token; "
            f"drop --prepend-bos or use a tokenizer with one"
        )
    return tokenizer


# ---- tokenizing (runs in workers, or inline) -----------------------------------------------------

_WORKER: Dict[str, object] = {}
"""Per-process tokenizing state: built once per worker by _init_worker."""


def _init_worker(cfg: PreprocessConfig, tokenizer=None) -> None:
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["keys"] = tuple(cfg.json_keys)
    _WORKER["prefix"] = [tokenizer.bos] if cfg.prepend_bos else []
    _WORKER["suffix"] = [tokenizer.eod] if cfg.append_eod else []
    _WORKER["dtype"] = token_dtype(tokenizer.vocab_size)


def _parse_line(raw: bytes, keys: Sequence[str]) -> List[str]:
    """The texts under `keys`, or MalformedLineError saying what is wrong."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedLineError(f"not valid JSON ({error})") from None
    if not isinstance(obj, dict):
        raise MalformedLineError(f"expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            raise MalformedLineError(f"missing key {key!r} (keys present: {sorted(obj)[:5]})")
        if not isinstance(obj[key], str):
            raise MalformedLineError(f"key {key!r} holds {type(obj[key]).__name__}, not a string")
        texts.append(obj[key])
    return texts


_Encoded = Tuple[int, Optional[str], Optional[List[numpy.ndarray]]]
"""(line number, error message or None, token arrays per key or None)."""


def _encode_lines(batch: List[Tuple[int, bytes]]) -> List[_Encoded]:
    tokenizer = _WORKER["tokenizer"]
    prefix, suffix, dtype = _WORKER["prefix"], _WORKER["suffix"], _WORKER["dtype"]
    out = []
    for line_no, raw in batch:
        try:
            texts = _parse_line(raw, _WORKER["keys"])
        except MalformedLineError as error:
            out.append((line_no, str(error), None))
            continue
        arrays = []
        for text in texts:
            ids = tokenizer.tokenize_array(text)  # [tokens]
            if ids.size and (prefix or suffix):
                ids = numpy.concatenate((prefix, ids, suffix))
            # The .bin dtype already here: half the bytes to pickle back from a worker.
            arrays.append(ids.astype(dtype, copy=False))
        out.append((line_no, None, arrays))
    return out


def _read_batches(path: str, lines_per_task: int) -> Iterator[List[Tuple[int, bytes]]]:
    """Batches of (1-based line number, raw line); blank lines are not documents and are dropped."""
    batch: List[Tuple[int, bytes]] = []
    with open(path, "rb") as stream:  # bytes: a bad UTF-8 line is reported with its number
        for line_no, raw in enumerate(stream, start=1):
            if raw.strip():
                batch.append((line_no, raw))
                if len(batch) == lines_per_task:
                    yield batch
                    batch = []
    if batch:
        yield batch


# ---- writing -------------------------------------------------------------------------------------


def _temporary_prefix(prefix: str) -> str:
    return str(temporary_sibling(prefix))  # .NAME.tmp-PID, then .bin / .idx


def _commit(temporary: str, final: str) -> None:
    """Move a finished temporary pair into place, the .idx last (it is what makes a pair load)."""
    if os.path.exists(final + ".idx"):
        os.remove(final + ".idx")  # never leave an old .idx next to a new .bin
    os.replace(temporary + ".bin", final + ".bin")
    os.replace(temporary + ".idx", final + ".idx")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _discard(builders: dict, temporaries: Dict[str, str]) -> None:
    """Close and delete every temporary output; nothing here may raise (on a full disk, closing
    a builder flushes its buffer and fails again: the file goes anyway)."""
    for builder in builders.values():
        with contextlib.suppress(OSError):
            builder.data_file.close()
    for temporary in temporaries.values():
        for ext in (".bin", ".idx"):
            with contextlib.suppress(OSError):
                _remove_quietly(temporary + ext)


class OutputError(OSError):
    """Writing the output failed (full disk, read-only directory); says where and what to do."""


def _output_error(err: OSError, where: str) -> OutputError:
    if err.errno == errno.ENOSPC:
        advice = "free disk space or choose another --output-prefix"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "choose a writable --output-prefix"
    else:
        advice = "check the output location"
    return OutputError(err.errno, f"cannot write {where}: {err.strerror or err}; {advice}")


def preprocess_jsonl(cfg: PreprocessConfig) -> PreprocessStats:
    """Tokenize cfg.input into one .bin/.idx pair per json key; returns what was written."""
    tokenizer = validate_preprocess_config(cfg)
    # Imported here, after validation, so a bad flag fails fast and workers stay light.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    finals = {key: output_prefix_for_key(cfg.output_prefix, key) for key in cfg.json_keys}
    temporaries = {key: _temporary_prefix(prefix) for key, prefix in finals.items()}
    stats = PreprocessStats(output_prefixes=dict(finals))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise _output_error(err, out_dir) from None
    for final in finals.values():
        for path in remove_stale_temporaries(final):
            logger.info("removed %s, left by an interrupted run", path)

    builders = {}
    pool = None
    start = time.perf_counter()
    committed = False
    try:
        for key in cfg.json_keys:
            builders[key] = IndexedDatasetBuilder(temporaries[key] + ".bin", dtype=dtype)
        if cfg.workers > 1:
            pool = multiprocessing.get_context().Pool(cfg.workers, initializer=_init_worker,
                                                      initargs=(cfg,))
        _tokenize(cfg, tokenizer, pool, builders, stats, start)
        if stats.documents == 0:
            raise ValueError(
                f"{cfg.input} gave no documents ({stats.bad_lines} malformed lines skipped, "
                f"{stats.empty_documents} empty documents skipped); nothing was written")
        for key in cfg.json_keys:
            builders[key].finalize(temporaries[key] + ".idx")
        for key in cfg.json_keys:
            _commit(temporaries[key], finals[key])
            write_sidecar(finals[key], stats.max_tokens[key], stats.documents,
                          {"tokenizer_model": os.path.abspath(cfg.tokenizer_model),
                           "vocab_size": tokenizer.vocab_size, "source": "preprocess"})
        committed = True
    except OSError as err:
        if isinstance(err, OutputError) or err.filename == cfg.input:
            raise
        raise _output_error(err, cfg.output_prefix + "_*") from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if not committed:
            _discard(builders, temporaries)

    stats.seconds = time.perf_counter() - start
    _log_stats(cfg, stats)
    return stats


def _tokenize(cfg: PreprocessConfig, tokenizer, pool, builders: dict, stats: PreprocessStats,
              start: float) -> None:
    """Tokenize every line into `builders`, in input order (in `pool`, or inline without one)."""
    from tqdm import tqdm

    batches = _read_batches(cfg.input, cfg.lines_per_task)
    if pool is None:
        _init_worker(cfg, tokenizer)
        results = map(_encode_lines, batches)
    else:
        results = pool.imap(_encode_lines, batches)
    with tqdm(desc=f"preprocess {os.path.basename(cfg.input)}", unit=" docs",
              disable=not cfg.progress, mininterval=1.0) as bar:
        for encoded in results:
            for line_no, error, arrays in encoded:
                if error is not None:
                    _handle_bad_line(cfg, line_no, error, stats)
                    continue
                if any(a.size == 0 for a in arrays):
                    stats.empty_documents += 1
                    continue
                for key, array in zip(cfg.json_keys, arrays, strict=True):
                    builders[key].add_document(array, [array.size])
                    stats.tokens += array.size
                    stats.max_tokens[key] = max(stats.max_tokens.get(key, 0), int(array.max()))
                stats.documents += 1
            bar.update(len(encoded))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tokens/s", refresh=False)


def _handle_bad_line(
    cfg: PreprocessConfig, line_no: int, error: str, stats: PreprocessStats
) -> None:
    where = f"{cfg.input}:{line_no}"
    if not cfg.skip_bad_lines:
        raise MalformedLineError(
            f"{where}: {error}; fix or remove the line, or pass --skip-bad-lines to skip and count "
            f"malformed lines"
        )
    stats.bad_lines += 1
    if stats.bad_lines <= _MAX_LOGGED_BAD_LINES:
        logger.warning("skipping malformed line %s: %s", where, error)
    elif stats.bad_lines == _MAX_LOGGED_BAD_LINES + 1:
        logger.warning("more malformed lines; only their count is reported from here on")


def _log_stats(cfg: PreprocessConfig, stats: PreprocessStats) -> None:
    seconds = max(stats.seconds, 1e-9)
    logger.info(
        "preprocessed %s: %d documents, %d tokens in %.1f s (%.0f docs/s, %.0f tokens/s); "
        "%d malformed lines skipped, %d empty documents skipped; wrote %s",
        cfg.input, stats.documents, stats.tokens, stats.seconds, stats.documents / seconds,
        stats.tokens / seconds, stats.bad_lines, stats.empty_documents,
        ", ".join(stats.output_prefixes.values()),
    )
