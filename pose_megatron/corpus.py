"""The bundled sample corpus: Python's own standard library as long real documents.

Every Python installation ships a few thousand `.py` files, many thousands of tokens long, so
PoSE can be exercised end to end (tokenizer, .bin/.idx, PoseGPTDataset, training) with no download.
ensure_sample_corpus() builds, once, under one cache directory:
- train.jsonl / valid.jsonl   one {"text", "path"} object per source file; a file is held out
                              by a hash of its relative path (stable as files come and go)
- tokenizer.model             a small sentencepiece model trained on the training split only
- train_text_document.{bin,idx}, valid_text_document.{bin,idx}   BOS + tokens + EOD per document
- manifest.json               settings and counts; written last
Everything is built in a temporary sibling directory and renamed into place as a whole, so a
half-built cache is never seen as complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy

from pose_megatron.files import atomic_directory, atomic_write_text
from pose_megatron.preprocess import PreprocessConfig, output_prefix_for_key, preprocess_jsonl

logger = logging.getLogger(__name__)

SAMPLE_CORPUS_VERSION = 1
"""Bump when the corpus layout or recipe changes; older caches are then rebuilt."""

CACHE_DIR_ENV = "POSE_MEGATRON_SAMPLE_CORPUS"
"""Environment variable that overrides the default cache directory."""

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SampleCorpusSettings:
    """The recipe of the sample corpus (part of the cache's identity)."""

    vocab_size: int = 8192
    """Sentencepiece vocabulary size (small enough to train in seconds, large enough for code)."""

    heldout_percent: int = 5
    """Percent of source files (by path hash) held out as the validation split."""

    max_training_sentences: int = 200_000
    """Lines sampled from the training split to train the tokenizer (bounds training time)."""

    seed: int = 1234
    """Seed of the sentence sample and of sentencepiece's trainer."""


@dataclass(frozen=True)
class SampleCorpus:
    """Paths of a complete sample corpus."""

    root: str
    """The cache directory holding everything below."""

    train_jsonl: str
    """Training documents, one JSON object per line."""

    valid_jsonl: str
    """Held-out documents, one JSON object per line."""

    tokenizer_model: str
    """The sentencepiece model (use with tokenizer type "sentencepiece")."""

    train_prefix: str
    """The training .bin/.idx prefix (for --data-path)."""

    valid_prefix: str
    """The held-out .bin/.idx prefix."""

    manifest: str
    """manifest.json: settings, Python version, document and token counts."""

    tokenizer_type: str = "sentencepiece"
    """The --tokenizer-type that loads tokenizer_model."""


def default_cache_dir() -> str:
    """$POSE_MEGATRON_SAMPLE_CORPUS, else <repo>/.cache/sample_corpus for a source checkout, else
    ~/.cache/pose_megatron/sample_corpus (never inside site-packages)."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    repo = Path(__file__).resolve().parents[1]
    if (repo / "setup.py").is_file() and (repo / "pose_megatron").is_dir():
        return str(repo / ".cache" / "sample_corpus")
    return str(Path.home() / ".cache" / "pose_megatron" / "sample_corpus")


def _corpus_paths(root: str) -> SampleCorpus:
    return SampleCorpus(
        root=root,
        train_jsonl=os.path.join(root, "train.jsonl"),
        valid_jsonl=os.path.join(root, "valid.jsonl"),
        tokenizer_model=os.path.join(root, "tokenizer.model"),
        train_prefix=output_prefix_for_key(os.path.join(root, "train"), "text"),
        valid_prefix=output_prefix_for_key(os.path.join(root, "valid"), "text"),
        manifest=os.path.join(root, "manifest.json"),
    )


def find_stdlib_dir() -> str:
    """The directory of the running Python's standard library sources."""
    candidates = [sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "os.py")):
            return candidate
    raise FileNotFoundError(
        f"no standard library sources found (looked in {candidates}); this Python ships without "
        f".py files, so pass your own data to tools/preprocess_data.py instead"
    )


def iter_stdlib_sources(stdlib_dir: str) -> Iterator[Tuple[str, str]]:
    """(relative path, text) of every readable UTF-8 `.py` file, in sorted path order."""
    paths = []
    for directory, subdirs, files in os.walk(stdlib_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        paths.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures use other encodings on purpose
        if text.strip():
            yield os.path.relpath(path, stdlib_dir).replace(os.sep, "/"), text


def is_heldout(relative_path: str, heldout_percent: int) -> bool:
    """Whether a file belongs to the validation split (a hash of its path, not its position)."""
    digest = hashlib.md5(relative_path.encode("utf-8"), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) % 100 < heldout_percent


def write_corpus_jsonl(
    stdlib_dir: str, train_jsonl: str, valid_jsonl: str, heldout_percent: int
) -> Tuple[int, int]:
    """Write both splits; returns (training documents, held-out documents)."""
    counts = [0, 0]
    with (
        open(train_jsonl, "w", encoding="utf-8") as train,
        open(valid_jsonl, "w", encoding="utf-8") as valid,
    ):
        for relative_path, text in iter_stdlib_sources(stdlib_dir):
            heldout = is_heldout(relative_path, heldout_percent)
            stream = valid if heldout else train
            stream.write(json.dumps({"text": text, "path": relative_path}) + "\n")
            counts[heldout] += 1
    if counts[0] == 0 or counts[1] == 0:
        raise RuntimeError(
            f"the standard library at {stdlib_dir} gave {counts[0]} training and {counts[1]} "
            f"held-out files; both splits need documents"
        )
    return counts[0], counts[1]


def _sample_training_lines(train_jsonl: str, max_lines: int, seed: int) -> List[str]:
    """A deterministic sample of the non-blank lines of the training documents."""
    lines = []
    with open(train_jsonl, encoding="utf-8") as stream:
        for raw in stream:
            lines.extend(line for line in json.loads(raw)["text"].split("\n") if line.strip())
    if len(lines) > max_lines:
        keep = numpy.random.default_rng(seed).choice(len(lines), size=max_lines, replace=False)
        lines = [lines[i] for i in numpy.sort(keep)]
    return lines


def train_sentencepiece(
    train_jsonl: str, model_path: str, vocab_size: int, max_lines: int, seed: int
) -> None:
    """Train a lossless sentencepiece model for source code and write it to model_path.

    Identity normalisation, no dummy prefix and byte fallback make decode(encode(text)) == text, and
    newline/tab are single pieces (sentencepiece trains line by line, so it never sees them itself).
    """
    import sentencepiece

    lines = _sample_training_lines(train_jsonl, max_lines, seed)
    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
        num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
    )
    with open(model_path, "wb") as stream:
        stream.write(model.getvalue())


def _read_manifest(corpus: SampleCorpus) -> Optional[dict]:
    try:
        with open(corpus.manifest, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def _manifest_matches(
    corpus: SampleCorpus, settings: SampleCorpusSettings, stdlib_dir: str
) -> bool:
    """Whether corpus.root holds a complete corpus built with `settings` from stdlib_dir."""
    manifest = _read_manifest(corpus)
    if manifest is None:
        return False
    required = [corpus.train_jsonl, corpus.valid_jsonl, corpus.tokenizer_model]
    for prefix in (corpus.train_prefix, corpus.valid_prefix):
        required += [prefix + ".bin", prefix + ".idx"]
    return (
        manifest.get("version") == SAMPLE_CORPUS_VERSION
        and manifest.get("settings") == dataclasses.asdict(settings)
        and manifest.get("stdlib_dir") == stdlib_dir
        and all(os.path.isfile(path) for path in required)
    )


def build_sample_corpus(
    root: str, settings: SampleCorpusSettings, workers: int, stdlib_dir: Optional[str] = None
) -> dict:
    """Build every corpus file into `root` (an empty directory) from the `.py` files under
    stdlib_dir (default: this Python's standard library); returns the manifest."""
    start = time.perf_counter()
    corpus = _corpus_paths(root)
    stdlib_dir = stdlib_dir or find_stdlib_dir()
    num_train, num_valid = write_corpus_jsonl(
        stdlib_dir, corpus.train_jsonl, corpus.valid_jsonl, settings.heldout_percent
    )
    logger.info(
        "sample corpus: %d training and %d held-out files from %s", num_train, num_valid, stdlib_dir
    )
    train_sentencepiece(
        corpus.train_jsonl,
        corpus.tokenizer_model,
        settings.vocab_size,
        settings.max_training_sentences,
        settings.seed,
    )
    manifest = {
        "version": SAMPLE_CORPUS_VERSION,
        "settings": dataclasses.asdict(settings),
        "python": sys.version.split()[0],
        "stdlib_dir": stdlib_dir,
    }
    for split, jsonl in (("train", corpus.train_jsonl), ("valid", corpus.valid_jsonl)):
        stats = preprocess_jsonl(
            PreprocessConfig(
                input=jsonl,
                output_prefix=os.path.join(root, split),
                tokenizer_type=corpus.tokenizer_type,
                tokenizer_model=corpus.tokenizer_model,
                workers=workers,
                prepend_bos=True,
                append_eod=True,
                progress=False,
            )
        )
        manifest[split] = {"documents": stats.documents, "tokens": stats.tokens}
    manifest["build_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(corpus.manifest, json.dumps(manifest, indent=2))
    return manifest


def ensure_sample_corpus(
    cache_dir: Optional[str] = None,
    settings: Optional[SampleCorpusSettings] = None,
    workers: Optional[int] = None,
    force: bool = False,
    stdlib_dir: Optional[str] = None,
) -> SampleCorpus:
    """The sample corpus under cache_dir (default: default_cache_dir()), built only when missing,
    incomplete, built with other settings, or when force is set.

    stdlib_dir replaces the standard library as the source of `.py` documents (tests pass a tiny
    one).
    """
    settings = settings or SampleCorpusSettings()
    stdlib_dir = os.path.abspath(stdlib_dir or find_stdlib_dir())
    root = os.path.abspath(cache_dir or default_cache_dir())
    corpus = _corpus_paths(root)
    if not force and _manifest_matches(corpus, settings, stdlib_dir):
        logger.info("sample corpus: reusing %s", root)
        return corpus

    try:
        with atomic_directory(root, replace=True, concurrent=True) as staging:
            logger.info("sample corpus: building in %s (a minute or so)", staging)
            manifest = build_sample_corpus(
                str(staging), settings, workers or max(1, min(2, os.cpu_count() or 1)), stdlib_dir
            )
    except FileExistsError:
        # Another process put a corpus in place at the same moment; keep it if it is whole.
        if not _manifest_matches(corpus, settings, stdlib_dir):
            raise
        manifest = _read_manifest(corpus)
    logger.info(
        "sample corpus ready in %s: %d training documents (%d tokens), %d held out (%d tokens)",
        root,
        manifest["train"]["documents"],
        manifest["train"]["tokens"],
        manifest["valid"]["documents"],
        manifest["valid"]["tokens"],
    )
    return corpus
