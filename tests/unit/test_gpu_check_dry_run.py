"""The prepared GPU check (benchmarks/gpu/run_h200.py) through its CPU dry-run: every section runs at
tiny sizes and writes its JSON; a section past its cap is killed and recorded, and the next runs."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu" / "run_h200.py"

EXPECTED = {
    "correctness": ["ours_bf16.max_error", "ours_bf16.mean_error", "ours_bf16.top1_agreement",
                    "hf_bf16.max_error", "hf_bf16.mean_error", "hf_bf16.top1_agreement",
                    "max_error_ratio", "mean_error_ratio", "top1_agreement_ours_vs_hf_bf16",
                    "contiguous_loss.pose", "contiguous_loss.stock",
                    "contiguous_loss.relative_difference"],
    "step_time": [f"micro_batch_{b}.{k}" for b in (1, 2) for k in (
        "pose_ms", "stock_ms", "ratio", "tokens_per_s", "model_tflops", "mfu_spec_peak",
        "mfu_measured_matmul_peak")] + ["peak_tflops.spec_dense_bf16", "peak_tflops.measured_large_matmul"],
    "long_context": [f"{run}.{k}" for run in ("pose", "full_length") for k in (
        "seq", "target", "step_ms", "peak_memory_gib", "step_memory_gib")] + [
        "step_time_ratio", "peak_memory_ratio", "paper.ratio"],
    "evaluation": ["tokens_per_s.transformers", "tokens_per_s.megatron", "tokens_per_s.hf",
                   "ratio_megatron", "ratio_hf_backend", "length"],
}


def lookup(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted} missing in {sorted(record)}"
        value = value[part]
    return value


def numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def run_check(out: Path, *extra: str, timeout: float = 600):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - started


def read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_dry_run_writes_every_section(tmp_path):
    proc, seconds = run_check(tmp_path)
    log = tmp_path / "children.log"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-4000:] if log.exists() else "")
    summary = read(tmp_path, "summary")
    assert summary["sections"] == {name: "ok" for name in EXPECTED}
    assert summary["children"] == 1  # one process for all four when none overruns
    # What comes back from the device tool: at most eight plainly named files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.json" for name in EXPECTED] + ["summary.json", "children.log"])
    for name, keys in EXPECTED.items():
        record = read(tmp_path, name)
        assert record["status"] == "ok" and record["mode"] == "dry-run", record
        for key in keys:
            value = lookup(record, key)
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
        assert all(math.isfinite(v) for v in numbers(record)), name
        assert record["environment"]["device"].startswith("CPU")
        for goal in record.get("goals", {}).values():
            assert set(goal) == {"value", "goal", "met"}
    # What the dry-run can check for real: PoseGPTModel equals stock GPTModel on contiguous
    # positions, its bf16 error is of transformers' own size, and the timings are positive.
    correctness = read(tmp_path, "correctness")
    assert correctness["contiguous_loss"]["relative_difference"] <= 1e-3
    assert correctness["max_error_ratio"] <= 2.0 and correctness["mean_error_ratio"] <= 2.0
    assert read(tmp_path, "step_time")["micro_batch_2"]["pose_ms"] > 0
    long_context = read(tmp_path, "long_context")
    assert long_context["pose"]["seq"] < long_context["full_length"]["seq"]
    print(f"dry-run of all four sections: {seconds:.1f} s")


def test_a_section_past_its_cap_is_recorded_and_the_next_still_runs(tmp_path):
    proc, _ = run_check(tmp_path, "--sections", "step_time,long_context", "--cap", "step_time=0.05")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every section is ok
    timed_out = read(tmp_path, "step_time")
    assert timed_out["status"] == "timed_out" and timed_out["cap_s"] == 0.05, timed_out
    assert "cap of 0.05 s" in timed_out["error"]
    assert read(tmp_path, "long_context")["status"] == "ok"
    summary = read(tmp_path, "summary")
    assert summary["sections"] == {"step_time": "timed_out", "long_context": "ok"}
    assert summary["children"] == 2  # the overrunning child was killed, a new one ran the rest
    assert not (tmp_path / "correctness.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--sections", "warmup"], "choose from correctness, step_time"),
    (["--cap", "step_time"], "use NAME=SECONDS"),
    (["--cap", "step_time=soon"], "is not a number of seconds"),
    (["--megatron-core-wheel", "/nonexistent/megatron_core.whl"], "no such .whl file"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, args, message):
    proc, _ = run_check(tmp_path, *args, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_without_cuda_the_h200_run_refuses_before_starting_a_child(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU host
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "no CUDA device here" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "children.log").exists()  # refused before any section started
