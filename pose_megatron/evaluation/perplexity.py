"""Sliding-window perplexity, the paper's protocol (docs/reference.md, "Evaluation protocols"), for
any EvalBackend.

corpus perplexity = exp(sum of the NLL of every scored token / number of scored tokens), where the
windows (windows.py) score each document token exactly once. Windows are split over data-parallel
replicas (scoring.py); the sums are reduced at the end, so the number does not depend on the
parallel layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.scoring import replica_share, score_windows
from pose_megatron.evaluation.windows import effective_stride, plan_windows

logger = logging.getLogger(__name__)


class ExtrapolationWarning(UserWarning):
    """An evaluation length exceeds the positions the model was trained or extended to."""


def warn_extrapolation(backend: EvalBackend, lengths: Iterable[int], what: str = "window") -> List[int]:
    """Warn (once per call) about lengths beyond backend.max_positions; returns those lengths."""
    limit = backend.max_positions
    beyond = sorted(length for length in lengths if limit is not None and length > limit)
    if beyond:
        message = (
            f"{backend.label}: {what} lengths {beyond} exceed the model's {limit} positions; "
            f"evaluating anyway (this measures extrapolation)"
        )
        warnings.warn(message, ExtrapolationWarning, stacklevel=2)
        logger.warning(message)
    return beyond


@dataclass
class PerplexityResult:
    """The perplexity of one checkpoint at one window length."""

    length: int
    """Window length W (BOS included)."""
    perplexity: float
    """exp(nll)."""
    nll: float
    """Token-weighted mean negative log-likelihood (nats)."""
    tokens_scored: int
    """Tokens the mean is over: every token of every document, once."""
    documents: int
    """Documents evaluated."""
    windows: int
    """Model forwards."""
    stride: int
    """Stride used (the requested one capped at W - 1)."""
    truncate: bool
    """One window per document (its first W - 1 tokens)."""
    short_documents: int
    """Documents shorter than W - 1 tokens (scored with one shorter window)."""
    extrapolated: bool
    """W exceeds the model's positions."""
    seconds: float
    """Wall time."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        return data


def evaluate_length(
    backend: EvalBackend,
    documents: Sequence[np.ndarray],
    length: int,
    *,
    bos: int,
    stride: Optional[int] = None,
    truncate: bool = False,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `backend` on `documents` with windows of `length` tokens (collective)."""
    started = time.perf_counter()
    plan = [(doc, w) for doc in documents for w in plan_windows(len(doc), length, stride, truncate)]
    total_scored = sum(w.num_scored for _, w in plan)
    mine = replica_share(plan, backend)
    bar = tqdm(
        total=sum(w.num_scored for _, w in mine),
        desc=f"{backend.label} @ {length}",
        unit="tok",
        unit_scale=True,
        disable=not (progress and backend.is_main),
        leave=False,
    )
    with bar:
        nll_sum, count = score_windows(backend, mine, bos, on_group=bar.update)
    nll_sum, count = backend.all_reduce_sum([nll_sum, count])
    if round(count) != total_scored:
        raise RuntimeError(f"scored {count} tokens over all ranks, the windows hold {total_scored}")
    mean = nll_sum / total_scored
    return PerplexityResult(
        length=length,
        perplexity=math.exp(mean) if mean < 700 else math.inf,  # exp overflows a double past ~709
        nll=mean,
        tokens_scored=total_scored,
        documents=len(documents),
        windows=len(plan),
        stride=effective_stride(length, stride),
        truncate=truncate,
        short_documents=sum(1 for doc in documents if len(doc) < length - 1),
        extrapolated=backend.max_positions is not None and length > backend.max_positions,
        seconds=time.perf_counter() - started,
    )


def evaluate_perplexity(
    backend: EvalBackend,
    documents: Sequence[np.ndarray],
    lengths: Sequence[int],
    *,
    bos: int,
    stride: Optional[int] = None,
    truncate: bool = False,
    progress: bool = True,
) -> List[PerplexityResult]:
    """Perplexity at each window length; warns about lengths beyond the model's positions."""
    if not documents:
        raise ValueError("no documents to evaluate")
    warn_extrapolation(backend, lengths)
    results = []
    for length in lengths:
        result = evaluate_length(
            backend, documents, length, bos=bos, stride=stride, truncate=truncate, progress=progress
        )
        if backend.is_main:
            logger.info(
                "%s @ %d: perplexity %.4f over %d tokens (%.0f tok/s)",
                backend.label, length, result.perplexity, result.tokens_scored,
                result.tokens_per_second,
            )
        results.append(result)
    return results
