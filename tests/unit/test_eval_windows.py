"""The perplexity protocol's window bookkeeping (docs/reference.md, "Evaluation protocols")."""

import itertools

import numpy as np
import pytest

from pose_megatron.evaluation.windows import (
    count_scored,
    effective_stride,
    plan_windows,
    window_input,
    window_targets,
)

DOC_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 100, 257]
WINDOWS = [2, 3, 4, 8, 16, 17, 33, 64]
STRIDES = [None, 1, 2, 3, 5, 8, 15, 16, 40, 1000]


def cases():
    """A grid of edge cases (1-token documents, window = document +- 1, stride 1, stride >= W)
    and 300 random (document length, window, stride) draws up to 20k tokens."""
    yield from itertools.product(DOC_LENGTHS, WINDOWS, STRIDES)
    rng = np.random.default_rng(0)
    for _ in range(300):
        length = int(rng.integers(2, 4097))
        stride = None if rng.random() < 0.2 else int(rng.integers(1, 2 * length))
        yield int(rng.integers(1, 20001)), length, stride


@pytest.mark.parametrize("truncate", [False, True])
def test_every_token_is_scored_exactly_once(truncate):
    for n, length, stride in cases():
        windows = plan_windows(n, length, stride, truncate)
        hits = np.zeros(n, dtype=int)
        for w in windows:
            hits[w.score_from : w.end] += 1
        case = (n, length, stride)
        if truncate:
            assert len(windows) == 1, case
            assert hits.tolist() == [1] * min(n, length - 1) + [0] * max(0, n - length + 1), case
            continue
        assert hits.tolist() == [1] * n, case
        step = effective_stride(length, stride)
        scored_before = 0
        for i, w in enumerate(windows):
            assert w.num_tokens <= length, case  # BOS + at most W - 1 tokens
            assert w.start == i * step, case  # advanced by the stride
            # Later windows score only what no earlier window scored: exactly the tokens after it.
            assert w.score_from == scored_before, case
            assert w.start <= w.score_from < w.end, case
            scored_before = w.end
        assert windows[0].score_from == 0 and windows[0].num_scored == min(n, length - 1), case
        # Full windows everywhere except possibly the last one.
        assert all(w.num_tokens == length for w in windows[:-1]), case
        assert count_scored([n], length, stride, truncate) == n, case


def test_stride_gives_scored_context():
    """With stride S < W - 1 every later window scores S tokens with W - 1 - S tokens of context."""
    windows = plan_windows(100, length=33, stride=8)
    assert [w.num_scored for w in windows[1:-1]] == [8] * (len(windows) - 2)
    assert all(w.first_target == 32 - 8 for w in windows[1:-1])


def test_effective_stride():
    assert effective_stride(2048, None) == 2047
    assert effective_stride(2048, 1024) == 1024
    assert effective_stride(2048, 4096) == 2047  # capped: beyond W - 1 tokens would go unscored
    with pytest.raises(ValueError, match="stride"):
        effective_stride(2048, 0)
    with pytest.raises(ValueError, match="length"):
        effective_stride(1, None)


def test_window_inputs_start_with_bos_and_targets_are_next_tokens():
    doc = np.arange(100, 150)
    w = plan_windows(len(doc), length=16, stride=5)[2]
    inputs, targets = window_input(doc, w, bos=1), window_targets(doc, w)
    assert inputs[0] == 1 and len(inputs) == len(targets) == w.num_tokens - 1
    # Position i predicts the token after it: input i+1 is target i.
    assert inputs[1:].tolist() == targets[:-1].tolist()
    assert targets.tolist() == doc[w.start : w.end].tolist()


def test_rejects_empty_documents():
    with pytest.raises(ValueError, match="at least one token"):
        plan_windows(0, 16)
