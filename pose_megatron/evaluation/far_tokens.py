"""Far-token perplexity: does a model use context beyond its short window at all?

The tokens of document positions [start, end) (e.g. 1024..2047) are scored twice:
- full context: one window BOS + document[0 : end - 1], so token t sees all t earlier tokens;
- short context: windows of `short_window` tokens (BOS + short_window - 1 document tokens), each
  scoring its last `stride` tokens, so token t sees between short_window - stride and
  short_window - 1 earlier tokens.
Both score exactly the same tokens. A model that uses the long context has a lower full-context
perplexity than short-context perplexity; a model that is confused by long inputs has a higher one.

Built on the same pieces as the perplexity protocol (windows.py, scoring.py), so under torchrun the
windows are split over data-parallel replicas. tools/eval_far_tokens.py is its command line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Sequence

import numpy as np

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.scoring import PlannedWindow, replica_share, score_windows
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
    """Tokens each of the two perplexities averages over: (end - start) per document."""
    documents: int
    """Documents with at least `end` tokens (the only ones scored)."""
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


def _mean_nll(backend: EvalBackend, plan: Sequence[PlannedWindow], bos: int, expected: int) -> float:
    """Mean NLL of `plan` over all replicas (collective); `expected` tokens must have been scored."""
    local_sum, local_count = score_windows(backend, replica_share(plan, backend), bos)
    total_sum, total_count = backend.all_reduce_sum([local_sum, local_count])
    if round(total_count) != expected:
        raise RuntimeError(f"scored {round(total_count)} tokens over all ranks, expected {expected}")
    return total_sum / expected


def evaluate_far_tokens(backend: EvalBackend, documents: Sequence[np.ndarray], *, bos: int,
                        start: int, end: int, short_window: int, stride: int) -> FarTokenResult:
    """Full- and short-context NLL of document[start:end] over the `documents` that reach `end`
    (collective: every rank of every replica calls it)."""
    docs = [d for d in documents if len(d) >= end]
    if not docs:
        raise ValueError(f"no document has {end} tokens; lower the far-token end or use longer documents")
    expected = len(docs) * (end - start)
    short = short_windows(start, end, short_window, stride)
    full_plan = [(d, full_window(start, end)) for d in docs]
    short_plan = [(d, w) for d in docs for w in short]
    return FarTokenResult(start=start, end=end, short_window=short_window, stride=stride,
                          tokens_scored=expected, documents=len(docs),
                          full_nll=_mean_nll(backend, full_plan, bos, expected),
                          short_nll=_mean_nll(backend, short_plan, bos, expected))
