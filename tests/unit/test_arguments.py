"""Contradictory settings stop with one clear message before any process group is created."""

import pytest
import torch.distributed as dist

from pose_megatron.arguments import data_blend, parse_args, rope_settings

OK = ["--model", "tiny", "--seq-length", "64", "--pose-target-length", "512"]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """Parsing and validation must never start torch.distributed."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process group was created during argument validation")

    monkeypatch.setattr(dist, "init_process_group", refuse)


def _error(argv, capsys, world_size=None, monkeypatch=None):
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--seq-length", "64", "--pose-target-length", "32"],
     "--pose-target-length (32) is shorter than --seq-length (64)"),
    (OK + ["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4 must divide"),
    (OK + ["--rope-type", "yarn"], "original_max_position_embeddings"),
    (OK + ["--data-path", "/nonexistent/prefix", "--tokenizer-model", "x"],
     "no /nonexistent/prefix.bin/.idx"),
    (OK + ["--pose-num-chunks", "0"], "num_chunks"),
    (OK + ["--train-iters", "5", "--lr-warmup-iters", "10"], "--lr-warmup-iters (10)"),
    (OK + ["--finetune"], "--finetune needs --load"),
    (OK + ["--bf16"], "--bf16 needs a GPU"),
])
def test_contradictions_are_reported(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_global_batch_must_divide_by_micro_batch_times_dp(capsys, monkeypatch):
    argv = OK + ["--micro-batch-size", "2", "--global-batch-size", "6"]
    line = _error(argv, capsys, world_size=2, monkeypatch=monkeypatch)
    assert "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" in line


def test_world_size_must_fit_tp_times_pp(capsys, monkeypatch):
    line = _error(OK + ["--tensor-model-parallel-size", "2"], capsys, world_size=3,
                  monkeypatch=monkeypatch)
    assert "3 processes cannot be split into TP=2 x PP=1" in line


def test_flags_land_in_their_fields(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(OK + ["--rope-type", "linear", "--pose-num-chunks", "3", "--lr", "3e-4",
                            "--tensor-model-parallel-size", "2", "--use-distributed-optimizer"])
    assert args.pose == {"seq_length": 64, "target_length": 512, "num_chunks": 3, "content": "skip"}
    assert args.training.lr == 3e-4 and args.training.use_distributed_optimizer
    assert args.parallel.tensor_model_parallel_size == 2
    # The factor defaults to target / seq for scaled types; target defaults to seq.
    assert rope_settings(args) == {"rope_type": "linear", "factor": 8.0}
    plain = parse_args(["--seq-length", "64"])
    assert plain.target_length == 64 and rope_settings(plain) == {"rope_type": "default"}


def test_data_blend_forms():
    assert data_blend(["a", "b"]) == (["a", "b"], None)
    assert data_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
