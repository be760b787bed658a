"""The trainer continues a checkpoint stock Megatron-LM saved, with no model flags, and reproduces the
losses stock Megatron-LM computed (tests/data/stock_megatron_lm, scripts/stock_megatron_lm/)."""

import pytest
from launch import read_metrics, train
from stock_data import STOCK_CHECKPOINT, STOCK_RECORD, write_fixed_batch, write_tokenizer

from pose_megatron.checkpoint.layout import read_tracker, resolve_checkpoint_dir
from pose_megatron.checkpoint.saved_state import read_saved_state

# The stock run's schedule and batch (stock_loss.json's megatron_lm_flags), not its architecture.
SCHEDULE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--clip-grad", "1.0"]


def test_trainer_resumes_a_stock_megatron_lm_checkpoint_without_model_flags(tmp_path):
    data = write_fixed_batch(tmp_path / "fixed")
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    metrics = tmp_path / "m.jsonl"
    proc = train(["--load", STOCK_CHECKPOINT, "--seq-length", "64", *SCHEDULE,
                  "--use-distributed-optimizer", "--data-path", data, "--split", "100,0,0",
                  "--tokenizer-type", "huggingface", "--tokenizer-model", tokenizer,
                  "--eval-iters", "0", "--log-interval", "1", "--metrics-file", metrics,
                  "--save", tmp_path / "ck"])
    log = proc.stdout + proc.stderr
    assert "2 layers, hidden 32" in log and "rope default x1" in log
    assert "(Megatron-LM) at iteration 1 (4 samples consumed)" in log

    steps = read_metrics(metrics)
    assert sorted(steps) == [2, 3]
    stock = STOCK_RECORD["step_on_fixed_batch"]
    # Iteration 2's loss is the stock weights' loss on the fixed batch; its update uses the stock
    # optimizer state and schedule, so iteration 3's loss is the one stock measured after its step.
    assert steps[2]["loss"] == pytest.approx(STOCK_RECORD["loss"], abs=1e-6)
    assert steps[2]["grad_norm"] == pytest.approx(stock["grad_norm"], rel=1e-5)
    assert steps[2]["lr"] == stock["lr_after"]
    assert steps[3]["loss"] == pytest.approx(STOCK_RECORD["loss_after_step"], abs=1e-5)

    # What it saves continues Megatron-LM's counts: samples in args and in the schedule.
    assert read_tracker(tmp_path / "ck") == 3
    saved = read_saved_state(resolve_checkpoint_dir(tmp_path / "ck"))
    assert saved.written_by == "pose_megatron" and saved.version == 3.0
    assert saved.args.consumed_train_samples == 12 and saved.args.iteration == 3
    assert saved.common["opt_param_scheduler"]["num_steps"] == 12
    assert saved.content_metadata["distrib_optim_sharding_type"] == "dp_reshardable"
    assert saved.rng_shape == (1, 1)
