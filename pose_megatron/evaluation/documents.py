"""Evaluation documents: token arrays from a megatron .bin/.idx prefix or a JSONL file.

Documents are read in corpus order until `num_docs` usable ones are found; a document is usable when
it holds at least `min_tokens` tokens (the paper evaluates on documents longer than the longest
window, so every length sees the same documents). Shorter ones are skipped and counted. A document's
tokens exclude a leading BOS and a trailing EOD that preprocessing may have added: the protocol puts
its own BOS in front of every window, and the end-of-document marker is not part of the text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import numpy as np

from pose_megatron.data_checks import check_sizes


class NoUsableDocumentsError(ValueError):
    """No document of the data is long enough for the requested evaluation."""


@dataclass
class DocumentSet:
    """The documents an evaluation runs on, and what was skipped to find them."""

    documents: List[np.ndarray]
    """Token ids of each usable document (int64), BOS / EOD stripped."""
    indices: List[int] = field(default_factory=list)
    """Each usable document's position in the source (0-based, counting skipped ones), so that
    per-document side data (e.g. far-token score spans) can be matched to it."""
    skipped: int = 0
    """Documents read but skipped for being shorter than min_tokens."""
    source: str = ""
    """Where they came from (the data path)."""
    min_tokens: int = 1
    """The length a document needed to be used."""
    longest_skipped: int = 0
    """Tokens in the longest skipped document (for error messages)."""

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.documents))

    @property
    def max_token(self) -> int:
        """The largest token id of the documents (a model needs a larger vocabulary)."""
        return max(int(d.max()) for d in self.documents)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "documents": len(self.documents),
            "documents_skipped": self.skipped,
            "min_doc_tokens": self.min_tokens,
            "tokens": self.num_tokens,
        }


def _strip_markers(tokens: np.ndarray, bos: Optional[int], eod: Optional[int]) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    if bos is not None and len(tokens) and tokens[0] == bos:
        tokens = tokens[1:]
    if eod is not None and len(tokens) and tokens[-1] == eod:
        tokens = tokens[:-1]
    return tokens


def _iter_indexed(prefix: str) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    bounds = dataset.document_indices  # document d = sequences bounds[d] .. bounds[d + 1] - 1
    for d in range(len(bounds) - 1):
        first, last = int(bounds[d]), int(bounds[d + 1])
        if last - first == 1:
            yield np.array(dataset[first], dtype=np.int64)
        elif last > first:
            yield np.concatenate([np.asarray(s, dtype=np.int64) for s in dataset[first:last]])


def _iter_jsonl(path: str, tokenizer, json_key: str) -> Iterator[np.ndarray]:
    with open(path, "r", encoding="utf-8") as stream:
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[json_key]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{line_no}: expected a JSON object with a string under {json_key!r} "
                    f"({error})"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: {json_key!r} holds {type(text).__name__}, not text")
            yield np.asarray(tokenizer.tokenize(text), dtype=np.int64)


def is_jsonl(data_path: str) -> bool:
    return data_path.endswith((".jsonl", ".json"))


def load_documents(
    data_path: str,
    *,
    min_tokens: int,
    num_docs: Optional[int] = None,
    tokenizer=None,
    bos: Optional[int] = None,
    eod: Optional[int] = None,
    json_key: str = "text",
) -> DocumentSet:
    """Read up to `num_docs` documents of at least `min_tokens` tokens from `data_path`.

    `data_path` is a .bin/.idx prefix (token ids as preprocessed) or a .jsonl file (tokenized here
    with `tokenizer`). `bos` / `eod`: ids stripped from a document's ends (default: the tokenizer's).
    Raises NoUsableDocumentsError when not one document qualifies.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if num_docs is not None and num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    if tokenizer is not None:
        bos = tokenizer.bos if bos is None else bos
        eod = tokenizer.eod if eod is None else eod
    if is_jsonl(data_path):
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"data file {data_path!r} does not exist")
        if tokenizer is None:
            raise ValueError(f"{data_path} is text: pass --tokenizer-model to tokenize it")
        stream = _iter_jsonl(data_path, tokenizer, json_key)
    else:
        if not (os.path.isfile(data_path + ".idx") and os.path.isfile(data_path + ".bin")):
            raise FileNotFoundError(
                f"no {data_path}.bin / {data_path}.idx: pass the prefix written by "
                f"tools/preprocess_data.py (e.g. data/corpus_text_document), or a .jsonl file"
            )
        check_sizes(data_path)  # a truncated or empty pair fails here, naming the file
        stream = _iter_indexed(data_path)

    found = DocumentSet(documents=[], source=data_path, min_tokens=min_tokens)
    for index, tokens in enumerate(stream):
        tokens = _strip_markers(tokens, bos, eod)
        if len(tokens) < min_tokens:
            found.skipped += 1
            found.longest_skipped = max(found.longest_skipped, len(tokens))
            continue
        found.documents.append(tokens)
        found.indices.append(index)
        if num_docs is not None and len(found.documents) >= num_docs:
            break
    if not found.documents:
        raise NoUsableDocumentsError(
            f"no usable document in {data_path}: all {found.skipped} documents are shorter than "
            f"{min_tokens} tokens (the longest has {found.longest_skipped}); lower --min-doc-tokens "
            f"or the largest --lengths, or use longer documents"
        )
    return found
