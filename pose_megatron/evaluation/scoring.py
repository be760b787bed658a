"""Summed negative log-likelihood over planned windows: the loop perplexity and far-token scoring share.

A plan is a list of (document, Window) pairs (windows.py). This replica scores its share of the plan
(every `dp_size`-th pair from `dp_rank`), several windows of one length per `score()` call (the
pipeline schedule keeps its stages busy with them), and checks that the backend scored exactly the
tokens each window names. The sums are reduced over replicas by the caller (`all_reduce_sum`), once
per evaluation, so the result does not depend on the parallel layout.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pose_megatron.evaluation.backend import EvalBackend, ScoreRequest
from pose_megatron.evaluation.windows import Window, window_input, window_targets

PlannedWindow = Tuple[np.ndarray, Window]
"""A document's tokens [n] and one window over them."""
MarkedWindow = Tuple[np.ndarray, Window, np.ndarray]
"""A planned window and a boolean mask over its scored tokens [num_scored]: only the marked ones
count (far-token scoring of a task's answer tokens)."""


def replica_share(plan: Sequence[PlannedWindow], backend: EvalBackend) -> List[PlannedWindow]:
    """The windows this data-parallel replica scores."""
    return list(plan[backend.dp_rank :: backend.dp_size])


def equal_length_groups(plan: Sequence[PlannedWindow], group_size: int) -> Iterable[List[PlannedWindow]]:
    """Consecutive windows of equal length, at most group_size at a time (one score() call each)."""
    group: List[PlannedWindow] = []
    for item in plan:
        if group and (len(group) == group_size or group[0][1].num_tokens != item[1].num_tokens):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def score_windows(
    backend: EvalBackend,
    windows: Sequence[Union[PlannedWindow, MarkedWindow]],
    bos: int,
    on_group: Optional[Callable[[int], None]] = None,
) -> Tuple[float, int]:
    """NLL sum and token count of `windows` (already this replica's share) on this rank; both are
    0 on ranks that are not result ranks. A MarkedWindow counts only its marked tokens.
    `on_group(tokens)` follows each score() call (progress)."""
    nll_sum, count = 0.0, 0
    for group in equal_length_groups(windows, backend.group_size):
        requests = [
            ScoreRequest(input_ids=window_input(item[0], item[1], bos), targets=window_targets(item[0], item[1]),
                         first_target=item[1].first_target)
            for item in group
        ]
        for item, nll in zip(group, backend.score(requests)):
            w = item[1]
            if nll is None:
                continue
            if len(nll) != w.num_scored:
                raise RuntimeError(f"backend scored {len(nll)} tokens, expected {w.num_scored}")
            if len(item) > 2:
                nll = nll[torch.as_tensor(item[2], dtype=torch.bool)]  # [marked]
            nll_sum += float(nll.sum())
            count += len(nll)
        if on_group is not None:
            on_group(sum(w.num_scored for _, w in group))
    return nll_sum, count
