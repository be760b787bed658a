"""The small reproduction (experiments/pose_small): its protocol (flags and runs of every method),
its stage cache, and its quick mode, which runs every stage end to end (2 gloo processes per tool)
and writes well-formed outputs. Nothing is asserted about the quick run's numbers."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.pose_small.settings import ALL_METHODS, FULL, QUICK, extension_runs, method_flags
from experiments.pose_small.stages import StageCache, read_training_metrics
from experiments.pose_small.summary import LABELS

REPO = Path(__file__).resolve().parents[3]
DRIVER = "experiments.pose_small.reproduce"


def _flag(flags, name):
    return int(flags[flags.index(name) + 1])


@pytest.mark.parametrize("settings", [FULL, QUICK], ids=["full", "quick"])
def test_every_method_trains_the_same_sequences_per_step_but_full_length_at_equal_tokens(settings):
    """The paper's protocol: the same sequences per step for every method (full-length reads
    L_t / L_c times the tokens); the second comparison gives full-length the tokens of PoSE."""
    for method in ALL_METHODS:
        flags = method_flags(method, settings)
        batch, length = _flag(flags, "--global-batch-size"), _flag(flags, "--seq-length")
        if method == "full-length-equal-tokens":
            assert batch * length == settings.tokens_per_step and batch < settings.extend_batch
        else:
            assert batch == settings.extend_batch, method
        assert length == (settings.target_length if method.startswith("full-length") else settings.seq_length)
        assert batch % (settings.nproc * _flag(flags, "--micro-batch-size")) == 0
        positions = _flag(flags, "--pose-target-length")
        assert positions == (settings.seq_length if method == "pi-only" else settings.target_length)


def test_method_flags_match_the_paper_baselines():
    f = method_flags("randpos", FULL)
    assert _flag(f, "--pose-num-chunks") == FULL.seq_length
    f = method_flags("pi-only", FULL)
    assert f[f.index("--rope-type") + 1] == "linear" and f[f.index("--rope-factor") + 1] == "8"
    f = method_flags("pose-yarn-revised", FULL)
    assert _flag(f, "--rope-original-max-position-embeddings") == FULL.seq_length
    with pytest.raises(ValueError, match="unknown method"):
        method_flags("no-such-method", FULL)
    odd = QUICK.__class__(**{**QUICK.__dict__, "extend_batch": 4})  # 4 x 128 / 512 = 1 sequence
    with pytest.raises(ValueError, match="divisible by 2 processes, got 1"):
        method_flags("full-length-equal-tokens", odd)


def test_the_full_run_has_three_seeds_one_expensive_row_and_the_added_setting():
    runs = extension_runs(FULL)
    labels = [r.label for r in runs]
    assert len(labels) == len(set(labels))
    by_method = {m: [r for r in runs if r.method == m and r.setting == "main"] for m in ALL_METHODS}
    for method, group in by_method.items():
        assert [r.seed for r in group] == ([1] if method == "full-length" else [1, 2, 3]), method
        assert all(r.steps == FULL.extend_iters and r.lr == FULL.extend_lr for r in group)
    fair = [r for r in runs if r.setting == "fair"]
    assert [r.method for r in fair] == ["pose-linear", "pi-only", "full-length-equal-tokens"]
    assert all(r.steps == 2 * FULL.extend_iters and r.lr == 1e-4 and r.label.endswith(".fair.s1") for r in fair)


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
    assert parsed["peak_mem_gib"] == 0.95 and parsed["final_loss"] == 8.0 and parsed["steps"] == 4
    assert parsed["validation"] == [{"iteration": 2, "loss": 4.0, "ppl": 54.598}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"iteration": 2, "validation_loss": 4.0, "validation_ppl": 54.6}) + "\n")
    with pytest.raises(ValueError, match="no training step"):
        read_training_metrics(empty)
    with pytest.raises(FileNotFoundError, match="--metrics-file"):
        read_training_metrics(tmp_path / "missing.jsonl")


def test_a_stage_is_reused_only_with_the_same_fingerprint_and_its_outputs(tmp_path):
    output = tmp_path / "model.txt"
    output.write_text("x")
    cache = StageCache(tmp_path)
    cache.put("extend/a", ["--lr", "1"], {"wall_seconds": 2.0, "cpu_seconds": 3.0})
    again = StageCache(tmp_path)  # read back from state.json
    assert again.get("extend/a", ["--lr", "1"], output)["cpu_seconds"] == 3.0
    assert again.get("extend/a", ["--lr", "2"], output) is None  # other inputs: redo
    assert again.get("extend/a", ["--lr", "1"], tmp_path / "gone.txt") is None  # outputs gone: redo
    assert StageCache(tmp_path, force=True).get("extend/a", ["--lr", "1"], output) is None
    assert again.costs() == {"extend/a": {"wall_seconds": 2.0, "cpu_seconds": 3.0}}


def test_quick_mode_runs_every_stage_and_writes_its_outputs(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", DRIVER, "--quick", "--out", str(out),
                    "--docs-dir", str(docs)], cwd=REPO, check=True, timeout=600)
    elapsed = time.perf_counter() - started
    labels = ["base"] + [r.label for r in extension_runs(QUICK)]

    for label in labels:
        assert (out / "checkpoints" / label / "latest_checkpointed_iteration.txt").exists(), label
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["checkpoints"]) == labels
    for label, model in summary["checkpoints"].items():
        assert sorted(map(int, model["perplexity"])) == QUICK.ppl_lengths
        assert all(v > 0 for v in model["perplexity"].values())
        assert sorted(map(int, model["passkey"])) == QUICK.passkey_lengths
        assert all(0.0 <= v <= 1.0 for v in model["passkey"].values())
        assert model["far"]["synthetic"]["marked_only"] and not model["far"]["corpus"]["marked_only"]
        for far in model["far"].values():
            assert far["full"] > 0 and far["short"] > 0 and far["tokens"] > 0
        if label != "base":
            cost = model["cost"]
            assert cost["wall_seconds"] > 0 and cost["tokens_per_s"] > 0 and cost["peak_mem_gib"] > 0
            assert cost["sequences_per_step"] == QUICK.extend_batch and cost["steps"] == QUICK.extend_iters
    assert set(summary["rows"]) == {"base"} | set(QUICK.methods)
    answers = summary["data"]["data/extend"]["synth_extend_valid"]
    assert answers["far_answers"] > 0 and answers["far_answer_tokens"] >= answers["far_answers"]
    validations = summary["pretrain"]["validation"]  # read from the trainer's --metrics-file
    assert [v["iteration"] for v in validations] == list(range(QUICK.eval_interval, QUICK.pretrain_iters + 1,
                                                               QUICK.eval_interval))
    stages = summary["stages"]
    assert list(stages) == ["data/pretrain", "data/extend", "pretrain/1"] + [
        f"extend/{label}" for label in labels[1:]] + ["eval/1"]
    assert all(v["cpu_seconds"] > 0 and v["wall_seconds"] > 0 for v in stages.values())
    report = (out / "report.md").read_text()
    assert all(LABELS[m] in report for m in ["base"] + QUICK.methods)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("results_summary.json", "results_tables.md", "results.png"):
        assert (docs / name).stat().st_size > 0

    # A second invocation finds every stage cached and only redoes the report.
    rerun = subprocess.run([sys.executable, "-m", DRIVER, "--quick", "--out", str(out)],
                           cwd=REPO, check=True, timeout=120, capture_output=True, text=True)
    logged = rerun.stdout + rerun.stderr
    assert "done: all stages" in logged
    assert not any(word in logged for word in ("] building ", "] training ", "] evaluating ")), logged[-2000:]
    assert json.loads((out / "state.json").read_text()).keys() == json.loads(
        (out / "summary.json").read_text())["stages"].keys()
    print(f"quick reproduction: {elapsed:.0f} s")
