"""Seed means, spreads and the rule that calls a difference real (experiments/pose_small/summary.py)."""

import pytest

from experiments.pose_small.summary import difference, flatness, stat


def _row(ppl_by_length):
    return {"perplexity": {n: stat(v) for n, v in ppl_by_length.items()}}


def test_spread_is_the_largest_distance_of_a_seed_from_the_mean():
    s = stat([10.0, 11.0, 15.0])
    assert s["mean"] == pytest.approx(12.0) and s["spread"] == pytest.approx(3.0) and s["n"] == 3
    assert all(s["mean"] - s["spread"] <= v <= s["mean"] + s["spread"] for v in s["values"])
    assert stat([4.0]) == {"mean": 4.0, "spread": 0.0, "values": [4.0], "n": 1}


def test_a_difference_is_real_only_beyond_both_spreads():
    rows = {"a": _row({"1024": [10.0, 10.5, 11.0]}), "b": _row({"1024": [11.4, 12.0, 12.6]}),
            "c": _row({"1024": [13.0, 13.5, 14.0]})}
    ab = difference(rows, "a", "b", "perplexity", "1024")
    assert ab["difference"] == pytest.approx(-1.5) and ab["spreads"] == pytest.approx(1.1) and ab["real"]
    bc = difference(rows, "b", "c", "perplexity", "1024")
    assert bc["difference"] == pytest.approx(-1.5) and bc["spreads"] == pytest.approx(1.1) and bc["real"]
    rows["b"] = _row({"1024": [10.9, 12.0, 13.1]})
    assert not difference(rows, "a", "b", "perplexity", "1024")["real"]  # 1.5 < 0.5 + 1.1
    assert difference(rows, "a", "missing", "perplexity", "1024") is None


def test_a_one_seed_row_borrows_the_other_rows_spread():
    """One seed has no spread of its own: it gets the three-seed row's, so the bar is twice that."""
    rows = {"pose": _row({"1024": [10.0, 10.5, 11.0]}), "full": _row({"1024": [11.2]}),
            "single": _row({"1024": [12.0]})}
    close = difference(rows, "pose", "full", "perplexity", "1024")
    assert close["spreads"] == pytest.approx(1.0) and not close["real"]  # 0.7 apart
    far = difference(rows, "pose", "single", "perplexity", "1024")
    assert far["real"] and far["spreads"] == pytest.approx(1.0)
    assert not difference(rows, "full", "single", "perplexity", "1024")["real"]  # no spread known at all


def test_flatness_is_the_per_seed_ratio_of_long_to_short_perplexity():
    row = _row({"128": [10.0, 20.0], "1024": [12.0, 30.0]})
    f = flatness(row, {"seq_length": 128, "target_length": 1024})
    assert f["values"] == pytest.approx([1.2, 1.5]) and f["mean"] == pytest.approx(1.35)
