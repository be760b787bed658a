"""Every CPU benchmark runs to its end at tiny sizes and prints each of its ratios as a number.

Not a timing test: the ratios' values at these sizes mean nothing and are not checked against any
goal. It catches a benchmark broken by a change elsewhere (bench_data once failed at its second
repeat for a whole issue before anyone ran it)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# benchmark -> (tiny arguments, {label printed before a ratio: how many times it appears})
CASES = {
    "bench_data": (["--items", "30", "--preprocess-mb", "0.1", "--repeats", "1"], {
        "ratio PoseGPTDataset / GPTDataset =": 1, "ratio preprocess per worker / raw encode =": 1}),
    "bench_model": (["--seq", "64", "--batch", "1", "--repeats", "2", "--memory-seq", "128"], {
        "ratio PoseGPTModel / GPTModel =": 1, "ratio SDPA / local =": 1}),
    "bench_train": (["--steps", "1", "--rounds", "1", "--window", "64", "--target", "256"], {
        "ratio PoSE / plain 64 step time =": 1, "ratio PoSE / full-length 256 step time =": 1,
        "ratio PoSE / full-length 256 peak memory =": 1, "ratio PoSE / full-length 256 step memory =": 1}),
    "bench_eval": (["--length", "128", "--rounds", "1", "--vocab", "256", "--layers", "1", "--hidden",
                    "64", "--heads", "4", "--groups", "2", "--ffn", "128"], {
        "ratio tool (Megatron) / transformers:": 1, "ratio tool (HF backend) / transformers:": 1}),
    "bench_convert": (["--layers", "1"], {"-> time / copy =": 2, "-> / checkpoint size =": 2}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_prints_its_ratios(name):
    args, labels = CASES[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for label, count in labels.items():
        values = re.findall(re.escape(label) + r" (\S+)", proc.stdout)
        assert len(values) == count, (label, proc.stdout)
        for value in values:
            assert math.isfinite(float(value)) and float(value) > 0, (label, value)
