"""Far-token perplexity: does a model use context beyond its short window at all?

The tokens of document positions [start, end) (e.g. 1024..2047) are scored twice:
- full context: one window BOS + document[0 : end - 1], so token t sees all t earlier tokens;
- short context: windows of `short_window` tokens (BOS + short_window - 1 document tokens), each
  scoring its last `stride` tokens, so token t sees between short_window - stride and
  short_window - 1 earlier tokens.
Both score exactly the same tokens. A model that uses the long context has a lower full-context
perplexity than short-context perplexity; a model that is confused by long inputs has a higher one.

Optionally only some tokens count: per-document score spans (token ranges, e.g. a retrieval task's
answer digits) mark them, and both perplexities average over the marked tokens in [start, end)
only. Most tokens of a long document are predictable from the last few; the marked ones can be
the tokens whose answer lies further back than the short window, where the two contexts differ.
Span files are JSON lines, one per source document in order: {"spans": [[first, end], ...]} in
the document's token positions (BOS and EOD stripped, as evaluation documents are).

Built on the same pieces as the perplexity protocol (windows.py, scoring.py), so under torchrun the
windows are split over data-parallel replicas. tools/eval_far_tokens.py is its command line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.documents import DocumentSet
from pose_megatron.evaluation.scoring import MarkedWindow, replica_share, score_windows
from pose_megatron.evaluation.windows import Window


@dataclass
class FarTokenResult:
    """Far-token perplexities of one checkpoint on one data set."""

    start: int
    """First scored document position."""
    end: int
    """One past the last scored document position."""
    short_window: int
    """Tokens of a short-context window, BOS included."""
    stride: int
    """Tokens each short window scores (its last ones)."""
    tokens_scored: int
    """Tokens each of the two perplexities averages over: (end - start) per document, or the
    marked ones among them when score spans are given."""
    documents: int
    """Documents with at least `end` tokens (the only ones scored)."""
    marked_only: bool
    """Whether only tokens marked by score spans were scored."""
    full_nll: float
    """Mean NLL (nats) with all earlier document tokens as context."""
    short_nll: float
    """Mean NLL (nats) of the same tokens with a short window as context."""

    @property
    def full_perplexity(self) -> float:
        return math.exp(self.full_nll)

    @property
    def short_perplexity(self) -> float:
        return math.exp(self.short_nll)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(full_perplexity=self.full_perplexity, short_perplexity=self.short_perplexity,
                    ratio=self.full_perplexity / self.short_perplexity)
        return data


def full_window(start: int, end: int) -> Window:
    """The one window that scores document[start:end] with all of document[0:start] as context."""
    return Window(start=0, end=end, score_from=start)


def short_windows(start: int, end: int, short_window: int, stride: int) -> List[Window]:
    """Windows of `short_window` tokens (BOS included) that together score document[start:end]
    once, each scoring at most its last `stride` tokens."""
    span = short_window - 1  # document tokens per window
    if not 1 <= stride <= span:
        raise ValueError(f"stride must be in 1..{span}, got {stride}")
    if start < span - stride:
        raise ValueError(f"start {start} leaves the first short window without full context; "
                         f"use a start of at least {span - stride}")
    windows = []
    for score_from in range(start, end, stride):
        stop = min(score_from + stride, end)
        windows.append(Window(start=stop - span, end=stop, score_from=score_from))
    return windows


def _mean_nll(backend: EvalBackend, plan: Sequence, bos: int, expected: int) -> float:
    """Mean NLL of `plan` over all replicas (collective); `expected` tokens must have been scored."""
    local_sum, local_count = score_windows(backend, replica_share(plan, backend), bos)
    total_sum, total_count = backend.all_reduce_sum([local_sum, local_count])
    if round(total_count) != expected:
        raise RuntimeError(f"scored {round(total_count)} tokens over all ranks, expected {expected}")
    return total_sum / expected


def _marked_plan(plan: Sequence[Tuple[np.ndarray, Window, np.ndarray]]) -> List[MarkedWindow]:
    """(document, window, document mask) -> (document, window, marks of its scored tokens); windows
    that score no marked token are left out (they add nothing, and cost a forward pass)."""
    out = []
    for doc, window, mask in plan:
        marks = mask[window.score_from : window.end]  # [num_scored]
        if marks.any():
            out.append((doc, window, marks))
    return out


def evaluate_far_tokens(backend: EvalBackend, documents: Sequence[np.ndarray], *, bos: int,
                        start: int, end: int, short_window: int, stride: int,
                        masks: Optional[Sequence[np.ndarray]] = None) -> FarTokenResult:
    """Full- and short-context NLL of document[start:end] over the `documents` that reach `end`
    (collective: every rank of every replica calls it). `masks`: one boolean array per document
    (as long as it) marking the tokens to score; None scores all of them."""
    if masks is not None and len(masks) != len(documents):
        raise ValueError(f"got {len(masks)} score masks for {len(documents)} documents")
    kept = [i for i, d in enumerate(documents) if len(d) >= end]
    if not kept:
        raise ValueError(f"no document has {end} tokens; lower the far-token end or use longer documents")
    docs = [documents[i] for i in kept]
    short = short_windows(start, end, short_window, stride)
    if masks is None:
        full_plan: Sequence = [(d, full_window(start, end)) for d in docs]
        short_plan: Sequence = [(d, w) for d in docs for w in short]
        expected = len(docs) * (end - start)
    else:
        marks = [np.asarray(masks[i], dtype=bool) for i in kept]
        for i, m in zip(kept, marks):
            if m.shape != (len(documents[i]),):
                raise ValueError(f"score mask {i} has shape {m.shape} for a document of {len(documents[i])} tokens")
        expected = int(sum(m[start:end].sum() for m in marks))
        if expected == 0:
            raise ValueError(f"the score spans mark no token in positions {start}..{end - 1}; "
                             "check the span file against the data and the far-token range")
        full_plan = _marked_plan([(d, full_window(start, end), m) for d, m in zip(docs, marks)])
        short_plan = _marked_plan([(d, w, m) for d, m in zip(docs, marks) for w in short])
    return FarTokenResult(start=start, end=end, short_window=short_window, stride=stride,
                          tokens_scored=expected, documents=len(docs), marked_only=masks is not None,
                          full_nll=_mean_nll(backend, full_plan, bos, expected),
                          short_nll=_mean_nll(backend, short_plan, bos, expected))


def read_score_spans(path: str) -> List[List[Tuple[int, int]]]:
    """A span file: line i holds source document i's {"spans": [[first, end], ...]}."""
    spans = []
    with open(path, "r", encoding="utf-8") as stream:
        for line_no, line in enumerate(stream, 1):
            try:
                pairs = [(int(a), int(b)) for a, b in json.loads(line)["spans"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{line_no}: expected {{\"spans\": [[first, end], ...]}} ({error})") from None
            if any(not 0 <= a < b for a, b in pairs):
                raise ValueError(f"{path}:{line_no}: spans need 0 <= first < end, got {pairs}")
            spans.append(pairs)
    return spans


def masks_from_spans(spans: Sequence[Sequence[Tuple[int, int]]], documents: DocumentSet, path: str = "spans"
                     ) -> List[np.ndarray]:
    """Boolean masks [len(doc)] for `documents`, from the spans of their source positions."""
    masks = []
    for doc, index in zip(documents.documents, documents.indices):
        if index >= len(spans):
            raise ValueError(f"{path} has {len(spans)} lines, but document {index} of {documents.source} "
                             "is evaluated: write one line per source document")
        mask = np.zeros(len(doc), dtype=bool)
        for first, end in spans[index]:
            if end > len(doc):
                raise ValueError(f"{path}:{index + 1}: span [{first}, {end}) runs past the document's "
                                 f"{len(doc)} tokens (positions count from the first token after BOS)")
            mask[first:end] = True
        masks.append(mask)
    return masks
