"""Sliding-window bookkeeping for the paper's perplexity protocol (docs/reference.md, "Evaluation
protocols").

A window of length W is BOS followed by up to W - 1 document tokens. The first window of a document
scores every token it holds; each later window starts `stride` tokens further on and scores only the
tokens that no earlier window scored (the ones at its end). So every document token is scored exactly
once, the first one predicted from BOS alone, and every scored token sees as much left context as
the window allows. The last window may be shorter than W (it ends at the document's end).

`--truncate` is the cheap variant: one window per document (its first W - 1 tokens), all scored.

Pure Python and numpy: no torch, no model, so the property tests run in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Window:
    """One model input: BOS + document[start:end]; targets document[score_from:end] are scored."""

    start: int
    """First document token in the window (the window's input is BOS, then this token)."""
    end: int
    """One past the last document token in the window."""
    score_from: int
    """First scored document token; start <= score_from < end (earlier ones are context only)."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the window, BOS included (at most the window length W)."""
        return self.end - self.start + 1

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from

    @property
    def first_target(self) -> int:
        """Index of the first scored target among the window's targets document[start:end]."""
        return self.score_from - self.start


def effective_stride(length: int, stride: Optional[int]) -> int:
    """The stride used for windows of `length`: `stride` capped at W - 1 (None means W - 1).

    A stride beyond W - 1 would step over tokens that no window holds; W - 1 is the largest stride
    that still scores every token (non-overlapping windows).
    """
    if length < 2:
        raise ValueError(f"a window needs BOS and at least one token: length must be >= 2, got {length}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return length - 1 if stride is None else min(stride, length - 1)


def plan_windows(
    doc_length: int, length: int, stride: Optional[int] = None, truncate: bool = False
) -> List[Window]:
    """The windows that score a document of `doc_length` tokens at window length `length`.

    `stride` (None: W - 1, non-overlapping) is how far each window starts after the previous one;
    `truncate` keeps only the first window.
    """
    if doc_length < 1:
        raise ValueError(f"a document needs at least one token, got {doc_length}")
    span = length - 1  # document tokens per window (BOS takes the first slot)
    step = effective_stride(length, stride)
    windows: List[Window] = []
    start, scored_until = 0, 0
    while True:
        end = min(start + span, doc_length)
        windows.append(Window(start=start, end=end, score_from=scored_until))
        scored_until = end
        if truncate or end == doc_length:
            return windows
        start += step


def window_input(document: np.ndarray, window: Window, bos: int) -> np.ndarray:
    """The model input of a window, without its last token: BOS + document[start:end - 1].

    The last document token of a window is only a target: a causal model's predictions for the
    earlier positions do not depend on it, so it is not fed (same numbers, one position less).
    Position i of the returned array predicts document[start + i].
    """
    return np.concatenate(
        [np.asarray([bos], dtype=np.int64), np.asarray(document[window.start : window.end - 1], dtype=np.int64)]
    )


def window_targets(document: np.ndarray, window: Window) -> np.ndarray:
    """The tokens predicted at each input position: document[start:end]."""
    return np.asarray(document[window.start : window.end], dtype=np.int64)


def count_scored(doc_lengths: Sequence[int], length: int, stride: Optional[int], truncate: bool) -> int:
    """Tokens scored over documents (what the protocol's corpus perplexity averages over)."""
    return sum(
        w.num_scored for n in doc_lengths for w in plan_windows(n, length, stride, truncate)
    )
