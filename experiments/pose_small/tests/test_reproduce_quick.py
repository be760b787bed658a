"""The small reproduction (experiments/pose_small): its quick mode runs every stage end to end
(2 gloo processes per tool) and writes well-formed outputs. Nothing is asserted about the numbers."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.pose_small.reproduce import read_training_metrics
from experiments.pose_small.settings import ALL_METHODS, FULL, QUICK, method_flags
from experiments.pose_small.summary import LABELS

REPO = Path(__file__).resolve().parents[3]
DRIVER = "experiments.pose_small.reproduce"


def _flag(flags, name):
    return int(flags[flags.index(name) + 1])


@pytest.mark.parametrize("settings", [FULL, QUICK], ids=["full", "quick"])
def test_every_method_trains_on_the_same_tokens_per_step(settings):
    for method in ALL_METHODS:
        flags = method_flags(method, settings)
        tokens = _flag(flags, "--seq-length") * _flag(flags, "--global-batch-size")
        assert tokens == settings.tokens_per_step, method
        assert _flag(flags, "--global-batch-size") % (settings.nproc * _flag(flags, "--micro-batch-size")) == 0
        positions = _flag(flags, "--pose-target-length")
        assert positions == (settings.seq_length if method == "pi-only" else settings.target_length)


def test_method_flags_match_the_paper_baselines():
    f = method_flags("randpos", FULL)
    assert _flag(f, "--pose-num-chunks") == FULL.seq_length
    f = method_flags("pi-only", FULL)
    assert f[f.index("--rope-type") + 1] == "linear" and f[f.index("--rope-factor") + 1] == "8"
    f = method_flags("pose-yarn-revised", FULL)
    assert _flag(f, "--rope-original-max-position-embeddings") == FULL.seq_length
    with pytest.raises(ValueError):
        method_flags("no-such-method", FULL)


def test_training_metrics_come_from_the_metrics_file(tmp_path):
    """The trainer's --metrics-file lines (every step; validations on their own lines): the first
    step (warm-up) is left out of the throughput, memory is the peak over all steps."""
    def step(iteration, loss, ms, tokens, peak):
        return json.dumps({"iteration": iteration, "loss": loss, "lr": 1e-3, "grad_norm": 2.0, "ms_per_it": ms,
                           "tokens_per_s": tokens, "samples_per_s": 8.0, "tflops_per_device": 0.05,
                           "peak_memory_gib": peak, "skipped": False})

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        step(1, 9.0, 2040.0, 2008.0, 0.95), step(2, 8.5, 1800.0, 2260.0, 0.80),
        json.dumps({"iteration": 2, "validation_loss": 4.0, "validation_ppl": 54.598}),
        step(3, 8.2, 1814.0, 2258.0, 0.88), step(4, 8.0, 1900.0, 2100.0, 0.88)]) + "\n")
    parsed = read_training_metrics(metrics)
    assert parsed["tokens_per_s"] == 2258.0 and parsed["ms_per_it"] == 1814.0
    assert parsed["peak_mem_gib"] == 0.95 and parsed["final_loss"] == 8.0
    assert parsed["validation"] == [{"iteration": 2, "loss": 4.0, "ppl": 54.598}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"iteration": 2, "validation_loss": 4.0, "validation_ppl": 54.6}) + "\n")
    with pytest.raises(ValueError, match="no training step"):
        read_training_metrics(empty)
    with pytest.raises(FileNotFoundError, match="--metrics-file"):
        read_training_metrics(tmp_path / "missing.jsonl")


def test_quick_mode_runs_every_stage_and_writes_its_outputs(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", DRIVER, "--quick", "--out", str(out),
                    "--docs-dir", str(docs)], cwd=REPO, check=True, timeout=600)
    elapsed = time.perf_counter() - started
    labels = ["base"] + QUICK.methods

    for label in labels:
        assert (out / "checkpoints" / label / "latest_checkpointed_iteration.txt").exists(), label
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == labels
    for label, model in summary["models"].items():
        assert sorted(map(int, model["perplexity"])) == QUICK.ppl_lengths
        assert all(v > 0 for v in model["perplexity"].values())
        assert sorted(map(int, model["passkey"])) == QUICK.passkey_lengths
        assert all(0.0 <= v <= 1.0 for v in model["passkey"].values())
        for far in ("far_corpus", "far_synthetic"):
            assert model[far]["full"] > 0 and model[far]["short"] > 0 and model[far]["tokens"] > 0
        if label != "base":
            cost = model["cost"]
            assert cost["wall_seconds"] > 0 and cost["tokens_per_s"] > 0 and cost["peak_mem_gib"] > 0
            assert cost["tokens_per_step"] == QUICK.tokens_per_step
    validations = summary["pretrain"]["validation"]  # read from the trainer's --metrics-file
    assert [v["iteration"] for v in validations] == list(range(QUICK.eval_interval, QUICK.pretrain_iters + 1,
                                                               QUICK.eval_interval))
    assert all(v["ppl"] > 1 for v in validations)
    for name in ("perplexity", "passkey", "far_tokens"):
        payload = json.loads((out / "eval" / f"{name}.json").read_text())
        assert set(labels) <= set(payload["checkpoints"])
    report = (out / "report.md").read_text()
    assert all(LABELS[label] in report for label in labels)
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("results_summary.json", "results_tables.md", "results.png"):
        assert (docs / name).stat().st_size > 0

    # A second invocation finds every stage cached and only redoes the report.
    again = time.perf_counter()
    subprocess.run([sys.executable, "-m", DRIVER, "--quick", "--out", str(out)],
                   cwd=REPO, check=True, timeout=120)
    assert time.perf_counter() - again < 30
    print(f"quick reproduction: {elapsed:.0f} s")
