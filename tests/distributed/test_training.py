"""The trainer end to end on CPU: exact resume, TP / PP / DP equivalence, SIGTERM, the launch script."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from launch import REPO, _env, corpus_flags, read_metrics, train

from pose_megatron.checkpoint.layout import read_tracker
from pose_megatron.train.arguments import parse_args

# A tiny PoSE run on the bundled sample corpus (built once and cached by the first test).
_FLAGS = [
    "--model", "tiny", "--seq-length", "64", "--pose-target-length", "512",
    "--rope-type", "yarn-revised", "--rope-original-max-position-embeddings", "64",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
    "--lr-warmup-iters", "2", "--eval-iters", "0", "--log-interval", "1", "--seed", "7",
]


def base() -> list:
    return _FLAGS + list(corpus_flags())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Metrics of a straight 6-iteration run, and its final checkpoint (6 of 6)."""
    root = tmp_path_factory.mktemp("straight")
    train(base() + ["--train-iters", "6", "--metrics-file", root / "m.jsonl", "--save", root / "ck"])
    return {"metrics": read_metrics(root / "m.jsonl"), "checkpoint": root / "ck"}


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]],
                         ids=["adam", "distributed-optimizer"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, uninterrupted, optimizer):
    reference = uninterrupted["metrics"]
    if optimizer:
        # Held to an uninterrupted run of its own: megatron-core's CPU grad norm is the fp32 norm of
        # the per-parameter norms in the optimizer's order, and the distributed optimizer lists its
        # shards in another order than the plain one, so the two can differ in the last bit (and
        # then clip differently) on some data. They must still take the same steps.
        straight = tmp_path / "a.jsonl"
        train(base() + optimizer + ["--train-iters", "6", "--metrics-file", straight])
        reference = read_metrics(straight)
        for it in range(1, 7):
            for key in ("loss", "grad_norm"):
                assert reference[it][key] == pytest.approx(uninterrupted["metrics"][it][key],
                                                           rel=1e-5), (it, key)
    resumed = tmp_path / "b.jsonl"
    # Submitted as a job chain (--load = --save, not there yet): the first job starts fresh and says so.
    first = train(base() + optimizer + ["--train-iters", "6", "--exit-interval", "3", "--load",
                                        tmp_path / "ck", "--save", tmp_path / "ck",
                                        "--metrics-file", resumed])
    assert f"no checkpoint under {tmp_path / 'ck'}; starting from scratch" in first.stdout + first.stderr
    assert read_tracker(tmp_path / "ck") == 3
    train(base() + optimizer + ["--train-iters", "6", "--load", tmp_path / "ck", "--save",
                                tmp_path / "ck", "--metrics-file", resumed])
    a, b = reference, read_metrics(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in (4, 5, 6):
        assert (a[it]["loss"], a[it]["grad_norm"], a[it]["lr"]) == \
               (b[it]["loss"], b[it]["grad_norm"], b[it]["lr"]), it
    assert read_tracker(tmp_path / "ck") == 6


def test_resume_with_another_schedule_is_refused_unless_told_which(tmp_path, uninterrupted, capsys):
    """A finished 6-iteration run continued to 8 iterations: its schedule decayed to 0 at 6."""
    longer = base() + ["--train-iters", "8", "--load", uninterrupted["checkpoint"]]
    with pytest.raises(SystemExit) as refused:  # the parser refuses it, before any process starts
        parse_args([str(a) for a in longer + ["--lr", "2e-3"]], world_size=1)
    assert refused.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_lr: checkpoint 0.001, flags 0.002" in message
    assert ("lr_decay_steps: checkpoint 24 samples (6 iterations of 4), flags 32 samples "
            "(8 iterations of 4)") in message
    assert "--override-opt-param-scheduler" in message
    assert "--use-checkpoint-opt-param-scheduler" in message
    # The flags' schedule from sample 24 on: linear decay of 2e-3 after 2 warm-up iterations, to 0
    # at iteration 8 (the checkpoint's param groups would otherwise keep its 1e-3 bound).
    metrics = tmp_path / "m.jsonl"
    train(longer + ["--lr", "2e-3", "--override-opt-param-scheduler", "--metrics-file", metrics])
    lrs = {it: r["lr"] for it, r in read_metrics(metrics).items()}
    assert sorted(lrs) == [7, 8]
    assert lrs[7] == pytest.approx(2e-3 * (1 - (7 - 2) / (8 - 2)), rel=1e-12) and lrs[8] == 0.0


def test_activation_recompute_changes_nothing_but_memory(tmp_path):
    plain, recompute = tmp_path / "plain.jsonl", tmp_path / "recompute.jsonl"
    train(base() + ["--train-iters", "3", "--metrics-file", plain])
    train(base() + ["--train-iters", "3", "--recompute-activations", "--metrics-file", recompute])
    assert _losses(plain) == _losses(recompute)


def _losses(metrics_file) -> dict:
    """{iteration: (loss, lr, grad norm)}: the numbers that must not change (timings may)."""
    return {it: (r["loss"], r["lr"], r["grad_norm"]) for it, r in read_metrics(metrics_file).items()}


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """Weights every layout starts from (layouts draw different random inits otherwise)."""
    root = tmp_path_factory.mktemp("init")
    train(base() + ["--train-iters", "3", "--exit-interval", "1", "--save", root])
    return root


@pytest.mark.parametrize("layout", [
    dict(nproc=4, tp=2, pp=2, extra=[]),  # TP x PP
    dict(nproc=4, tp=1, pp=2, extra=["--use-distributed-optimizer"]),  # DP=2 x PP=2, ZeRO-1
])
def test_parallel_layouts_reproduce_single_process_losses(tmp_path, initial_weights, layout):
    common = base() + ["--train-iters", "3", "--load", initial_weights, "--finetune"]
    single = tmp_path / "single.jsonl"
    train(common + ["--metrics-file", single])
    parallel = tmp_path / "parallel.jsonl"
    train(common + ["--tensor-model-parallel-size", layout["tp"],
                    "--pipeline-model-parallel-size", layout["pp"], "--metrics-file", parallel]
          + layout["extra"], nproc=layout["nproc"])
    a, b = read_metrics(single), read_metrics(parallel)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for it in a:
        assert b[it]["loss"] == pytest.approx(a[it]["loss"], abs=1e-5), it
        assert b[it]["grad_norm"] == pytest.approx(a[it]["grad_norm"], rel=1e-4), it


def test_optimizer_state_at_another_layout_is_refused_clearly(initial_weights):
    proc = train(base() + ["--train-iters", "3", "--load", initial_weights,
                         "--tensor-model-parallel-size", "2"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "Optimizer state reloads only at the layout it was saved with" in proc.stderr
    assert "--no-load-optim" in proc.stderr and "--finetune" in proc.stderr
    # With --no-load-optim the weights reshard to TP=2 and training goes on from iteration 1.
    ok = train(base() + ["--train-iters", "3", "--load", initial_weights, "--no-load-optim",
                       "--tensor-model-parallel-size", "2"], nproc=2)
    assert "iteration        2/3" in ok.stdout and "iteration        1/3" not in ok.stdout


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "pose_megatron.train"] + base() + [
        "--train-iters", "1000", "--save", str(tmp_path / "ck"), "--metrics-file", str(metrics)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "SIGTERM" in out
    steps = max(read_metrics(metrics))
    assert 2 <= steps < 1000
    assert read_tracker(tmp_path / "ck") == steps


def test_launch_script_default_run(tmp_path):
    """The README's main job, shortened: CPU, 2 gloo processes, the bundled corpus."""
    env = _env({"TRAIN_ITERS": "3", "SAVE": str(tmp_path / "ck"), "PYTHON": sys.executable,
                "LOG_INTERVAL": "1"})
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run(["bash", str(REPO / "examples" / "pretrain_pose_llama.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "seq 256 -> target 2048, rope yarn-revised x8" in proc.stdout
    assert "iteration        3/3" in proc.stdout
    assert read_tracker(tmp_path / "ck") == 3
    assert f"checkpoint: {tmp_path / 'ck'}" in proc.stdout


def test_metrics_file_holds_throughput_memory_and_validation(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    train(base() + ["--train-iters", "3", "--eval-interval", "2", "--eval-iters", "1",
                  "--metrics-file", metrics])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["ms_per_it"] > 0 and r["tokens_per_s"] > 0 and r["samples_per_s"] > 0
        assert r["peak_memory_gib"] > 0 and r["skipped"] is False
    (valid,) = [r for r in records if "validation_loss" in r]
    assert valid["iteration"] == 2 and valid["validation_ppl"] > 1
