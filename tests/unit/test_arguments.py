"""Contradictory settings stop with one clear message before any process group is created; the
parser hands back built, validated configs."""

import dataclasses

import pytest
import torch.distributed as dist

from pose_megatron.positions import PoseSampling
from pose_megatron.presets import get_preset
from pose_megatron.rope import RopeScaling
from pose_megatron.train.arguments import build_parser, data_blend, parse_args
from pose_megatron.train.config import TrainingConfig
from pose_megatron.train.flags import field_docs


@pytest.fixture(scope="module")
def data_flags():
    from pose_megatron.corpus import ensure_sample_corpus

    corpus = ensure_sample_corpus()
    return ["--data-path", corpus.train_prefix, "--tokenizer-model", corpus.tokenizer_model]


@pytest.fixture
def ok(data_flags):
    return ["--model", "tiny", "--seq-length", "64", "--pose-target-length", "512"] + data_flags


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """Parsing and validation must never start torch.distributed."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process group was created during argument validation")

    monkeypatch.setattr(dist, "init_process_group", refuse)


def _error(argv, capsys, world_size=1):
    with pytest.raises(SystemExit) as exc:
        parse_args([str(a) for a in argv], world_size=world_size)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--pose-target-length", "32"], "--pose-target-length (32) is shorter than --seq-length (64)"),
    (["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4 must divide"),
    (["--rope-type", "yarn"], "original_max_position_embeddings"),
    (["--pose-num-chunks", "0"], "num_chunks"),
    (["--train-iters", "5", "--lr-warmup-iters", "10"], "--lr-warmup-iters (10)"),
    (["--finetune"], "--finetune needs --load"),
    (["--bf16"], "--bf16 needs a GPU"),
    (["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt does not exist"),
    (["--tokenizer-model", "/nonexistent/tok.model"], "--tokenizer-model /nonexistent/tok.model does not exist"),
])
def test_contradictions_are_reported(ok, extra, message, capsys):
    assert message in _error(ok + extra, capsys)


def test_missing_or_absent_data_is_reported_with_the_fix(capsys):
    line = _error(["--seq-length", "64"], capsys)
    assert "--data-path is required" in line and "tools/build_sample_corpus.py" in line
    line = _error(["--seq-length", "64", "--data-path", "/nonexistent/prefix",
                   "--tokenizer-model", "x"], capsys)
    assert "no /nonexistent/prefix.bin/.idx" in line


def test_global_batch_must_divide_by_micro_batch_times_dp(ok, capsys):
    line = _error(ok + ["--micro-batch-size", "2", "--global-batch-size", "6"], capsys, world_size=2)
    assert "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" in line


def test_world_size_must_fit_tp_times_pp(ok, capsys):
    line = _error(ok + ["--tensor-model-parallel-size", "2"], capsys, world_size=3)
    assert "3 processes cannot be split into TP=2 x PP=1" in line


def test_flags_come_back_as_built_configs(ok, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = parse_args(ok + ["--rope-type", "linear", "--pose-num-chunks", "3", "--lr", "3e-4",
                           "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
                           "--pose-min-doc-length", "100", "--num-layers", "4"])
    assert run.pose == PoseSampling(seq_length=64, target_length=512, num_chunks=3)
    # The factor defaults to target / seq for scaled types.
    assert run.rope == RopeScaling("linear", factor=8.0)
    assert run.training.lr == 3e-4 and run.training.use_distributed_optimizer
    assert run.parallel.tensor_model_parallel_size == 2 and run.world_size == 2
    assert run.data.min_doc_length == 100
    # The preset, with the flag's override and the tokenizer's vocabulary.
    assert run.model == dataclasses.replace(get_preset("tiny"), num_layers=4, vocab_size=8192)
    assert run.global_batch_size == 1 and run.num_microbatches == 1 and run.stored is None


def test_plain_training_defaults(data_flags):
    plain = parse_args(["--seq-length", "64"] + data_flags)
    assert plain.pose.target_length == 64 and plain.rope == RopeScaling()
    assert plain.training == TrainingConfig()


def test_help_comes_from_the_field_docstrings():
    docs = field_docs(PoseSampling)
    assert docs["num_chunks"].startswith("N: chunks per sample")
    helps = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    assert helps["--pose-num-chunks"] == docs["num_chunks"] + " (default: 2)"
    assert helps["--rope-beta-fast"].startswith(field_docs(RopeScaling)["beta_fast"])
    assert helps["--train-iters"] == field_docs(TrainingConfig)["train_iters"]
    assert "--pose-target-length / --seq-length" in helps["--rope-factor"]
    # The Megatron-LM names of the exceptions table.
    assert "--seq-length" in helps and "--pose-min-doc-length" in helps
    assert "--pose-seq-length" not in helps and "--rope-rope-type" not in helps


def test_data_blend_forms():
    assert data_blend(["a", "b"]) == (["a", "b"], None)
    assert data_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="blend weights must be >= 0"):
        data_blend(["-0.3", "a", "0.7", "b"])
