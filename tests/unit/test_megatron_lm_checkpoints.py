"""Checkpoints exchanged with stock Megatron-LM, before any process group: the committed stock
checkpoint (tests/data/stock_megatron_lm) is read with megatron-core alone, its `args` give the
architecture, and what cannot continue is refused with the reason or the flag to pass."""

import argparse
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
from stock_data import STOCK_CHECKPOINT, write_fixed_batch, write_tokenizer

from pose_megatron.checkpoint.layout import resolve_checkpoint_dir, write_tracker
from pose_megatron.checkpoint.megatron_args import (
    megatron_args,
    run_config_from_megatron_args,
    stock_rope,
)
from pose_megatron.checkpoint.saved_state import SavedState, read_saved_state
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling
from pose_megatron.train.arguments import parse_args

# The stock run's schedule (so only what a test changes differs).
SCHEDULE = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "3", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--use-distributed-optimizer",
            "--split", "100,0,0", "--eval-iters", "0"]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock_data")
    return ["--data-path", write_fixed_batch(root / "fixed"), "--tokenizer-type", "huggingface",
            "--tokenizer-model", write_tokenizer(root / "tokenizer")]


@pytest.fixture(scope="module")
def stock() -> SavedState:
    return read_saved_state(resolve_checkpoint_dir(STOCK_CHECKPOINT))


def parse(argv, world_size=1):
    return parse_args([str(a) for a in argv], world_size=world_size)


def error_of(argv, capsys, world_size=1) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv, world_size)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_the_stock_checkpoint_is_small_and_needs_megatron_core_only(stock):
    # Reading it imported nothing of megatron.training (0.16.1's wheel lacks it; 0.19's ships it).
    assert not any(name.startswith("megatron.training") for name in sys.modules)
    files = [p for p in STOCK_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1 << 20
    assert not any(b"megatron.training" in p.read_bytes() for p in files)
    assert stock.written_by == "Megatron-LM" and stock.version == 3.0 and stock.iteration == 1
    assert stock.consumed_train_samples == 4 and stock.layout == (1, 1, 1)
    assert stock.optimizer_kind == "distributed" and stock.sharding_type == "dp_reshardable"
    assert stock.rng_shape == (1, 1)
    assert stock.schedule_in_samples()["num_steps"] == 4  # 1 iteration x global batch 4


def test_the_architecture_comes_from_megatron_lm_args(data, stock):
    run = parse(["--load", STOCK_CHECKPOINT] + SCHEDULE + data)
    assert run.model == ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=64, vocab_size=128,
                                    max_position_embeddings=64, rotary_base=10000.0,
                                    norm_epsilon=1e-5)
    assert run.rope == RopeScaling() and run.resuming
    # Flags that are not the architecture win; those that are must agree.
    assert parse(["--load", STOCK_CHECKPOINT, "--finetune", "--rope-type", "linear"] + SCHEDULE
                 + data).rope == RopeScaling("linear", factor=1.0)


@pytest.mark.parametrize("extra, world_size, expected", [
    (["--num-layers", "3"], 1, "--num-layers 3 contradicts the checkpoint's 2 (its Megatron-LM args)"),
    (["--hidden-size", "64"], 1, "--hidden-size 64 contradicts the checkpoint's 32"),
    (["--lr", "2e-3"], 1, "max_lr: checkpoint 0.001, flags 0.002"),
    (["--global-batch-size", "8"], 1,
     "lr_warmup_steps: checkpoint 4 samples (1 iteration of 4), flags 8 samples (1 iteration of 8)"),
    (["--tensor-model-parallel-size", "2"], 2, "Optimizer state reloads only at the layout"),
])
def test_what_contradicts_the_checkpoint_is_refused_with_the_way_out(data, capsys, extra, world_size,
                                                                      expected):
    line = error_of(["--load", STOCK_CHECKPOINT] + SCHEDULE + data + extra, capsys, world_size)
    assert expected in line


def test_a_tokenizer_larger_than_the_padded_vocabulary_is_refused(data, tmp_path, capsys):
    larger = write_tokenizer(tmp_path / "larger", size=200)
    line = error_of(["--load", STOCK_CHECKPOINT] + SCHEDULE + data[:2]
                    + ["--tokenizer-type", "huggingface", "--tokenizer-model", larger], capsys)
    assert "the tokenizer has 200 tokens but the checkpoint's model only 128 (its Megatron-LM args)" in line


def test_an_optimizer_of_another_kind_names_the_flags(data, capsys):
    argv = ["--load", STOCK_CHECKPOINT] + [a for a in SCHEDULE if a != "--use-distributed-optimizer"]
    line = error_of(argv + data, capsys)
    assert "holds distributed-optimizer state" in line and "add --use-distributed-optimizer" in line
    assert "--no-load-optim" in line and "--finetune" in line
    assert not parse(argv + data + ["--no-load-optim"]).training.use_distributed_optimizer
    assert not parse(argv + data + ["--finetune", "--lr", "2e-3"]).resuming


def test_schedule_flags_take_one_side(data, capsys):
    argv = ["--load", STOCK_CHECKPOINT] + SCHEDULE + data + ["--lr", "2e-3"]
    for flag in ("--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        assert parse(argv + [flag]).training.lr == 2e-3
    assert "contradict each other" in error_of(
        argv + ["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], capsys)


@pytest.mark.parametrize("field, value, reason", [
    ("position_embedding_type", "learned_absolute", "position embeddings 'learned_absolute', not rope"),
    ("rotary_percent", 0.5, "rotary_percent 0.5"),
    ("rotary_interleaved", True, "interleaved rotary embeddings"),
    ("normalization", "LayerNorm", "normalization 'LayerNorm', not RMSNorm"),
    ("add_bias_linear", True, "biases in the linear layers"),
    ("qk_layernorm", True, "query/key layer norms"),
    ("num_experts", 8, "a mixture of experts (8 experts)"),
    ("ckpt_format", "torch", "--ckpt-convert-format torch_dist"),
])
def test_models_the_plugin_cannot_build_are_refused_with_the_reason(stock, field, value, reason):
    args = argparse.Namespace(**vars(stock.args))
    setattr(args, field, value)
    with pytest.raises(ValueError, match="was saved by Megatron-LM with") as err:
        run_config_from_megatron_args(args, "ckpt")
    assert reason in str(err.value) and "cannot continue it" in str(err.value)


def test_a_legacy_torch_format_checkpoint_is_refused(data, tmp_path, capsys):
    (tmp_path / "iter_0000005" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    write_tracker(tmp_path, 5)
    line = error_of(["--load", tmp_path] + SCHEDULE + data, capsys)
    assert "legacy --ckpt-format torch" in line and "--ckpt-convert-format torch_dist" in line


def _stock_copy_with(tmp_path, **fields):
    """The stock checkpoint with some `args` fields changed."""
    copy = tmp_path / "stock"
    shutil.copytree(STOCK_CHECKPOINT, copy)
    common_pt = copy / "iter_0000001" / "common.pt"
    common = torch.load(common_pt, weights_only=False)
    for name, value in fields.items():
        setattr(common["args"], name, value)
    torch.save(common, common_pt)
    return copy


def test_a_llama31_pretrained_with_use_rope_scaling_keeps_it(data, tmp_path, capsys):
    copy = _stock_copy_with(tmp_path, use_rope_scaling=True)
    llama31 = RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192,
                          low_freq_factor=1.0, high_freq_factor=4.0)
    assert parse(["--load", copy] + SCHEDULE + data).rope == llama31
    assert parse(["--load", copy, "--finetune"] + SCHEDULE + data).rope == llama31
    assert "was trained with RopeScaling(rope_type='llama3'" in error_of(
        ["--load", copy, "--rope-type", "yarn", "--rope-original-max-position-embeddings", "64"]
        + SCHEDULE + data, capsys)


def test_rope_fields_stock_megatron_lm_does_not_apply_are_read_as_it_trained(stock):
    args = argparse.Namespace(**vars(stock.args))
    args.use_rope_scaling, args.rope_scaling_factor = True, 2.0
    args.rotary_seq_len_interpolation_factor = 4
    config, notes = run_config_from_megatron_args(args, "ckpt")
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.factor == 8.0
    assert any("--rope-scaling-factor 2" in n for n in notes)
    assert any("--rotary-seq-len-interpolation-factor 4" in n and "plain RoPE" in n for n in notes)


@pytest.mark.parametrize("rope, fields, faithful", [
    (RopeScaling(), dict(use_rope_scaling=False, rotary_seq_len_interpolation_factor=None), True),
    (RopeScaling("linear", factor=4.0), dict(rotary_seq_len_interpolation_factor=4), False),
    (RopeScaling("linear", factor=2.5), dict(rotary_seq_len_interpolation_factor=None), False),
    (RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192),
     dict(use_rope_scaling=True, rope_scaling_factor=8.0), True),
    (RopeScaling("llama3", factor=4.0, original_max_position_embeddings=8192),
     dict(use_rope_scaling=True, rope_scaling_factor=4.0), False),
    (RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64),
     dict(use_rope_scaling=False), False),
    (RopeScaling("yarn", factor=8.0, original_max_position_embeddings=64), dict(use_rope_scaling=False),
     False),
])
def test_args_express_the_rope_where_megatron_lm_can(rope, fields, faithful):
    reading = stock_rope(rope)
    assert {k: reading.args[k] for k in fields} == fields
    assert (reading.trains_with is None) == faithful


def test_our_args_rebuild_the_same_model(stock):
    config, _ = run_config_from_megatron_args(stock.args, "ckpt")
    again, _ = run_config_from_megatron_args(megatron_args(config, (1, 1, 1)), "ckpt")
    assert again.model == config.model and again.rope_scaling == config.rope_scaling


def _saved(common, has_run_config=True):
    return SavedState(STOCK_CHECKPOINT / "iter_0000001", common, has_run_config)


def test_schedule_units_samples_iterations_or_refused():
    schedule = dict(max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=6, num_steps=3,
                    lr_decay_style="linear", start_wd=0.0, end_wd=0.0, wd_incr_steps=6,
                    wd_incr_style="constant")
    earlier = _saved({"iteration": 3, "consumed_train_samples": 12, "opt_param_scheduler": schedule})
    assert earlier.written_by == "pose_megatron (earlier format)"
    converted = earlier.schedule_in_samples()
    assert (converted["lr_warmup_steps"], converted["lr_decay_steps"], converted["num_steps"],
            converted["wd_incr_steps"]) == (8, 24, 12, 24)
    samples = dict(schedule, lr_warmup_steps=8, lr_decay_steps=24, num_steps=12, wd_incr_steps=24)
    args = argparse.Namespace(global_batch_size=4, consumed_train_samples=12)
    current = _saved({"iteration": 3, "checkpoint_version": 3.0, "args": args,
                      "opt_param_scheduler": samples})
    assert current.schedule_in_samples() == samples
    ramped = _saved({"iteration": 3, "checkpoint_version": 3.0, "args": args,
                     "opt_param_scheduler": dict(samples, num_steps=10)}, has_run_config=False)
    with pytest.raises(ValueError, match="units cannot be told.*--finetune"):
        ramped.schedule_in_samples()


def test_common_state_saved_inside_the_dcp_checkpoint_is_read(tmp_path):
    """megatron-core 0.19 saves the common state as a "common_state" byte item of the DCP checkpoint
    (torch.save of a one-shard list) instead of common.pt; both forms read the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from pose_megatron.checkpoint.saved_state import read_common_state

    common = read_common_state(STOCK_CHECKPOINT / "iter_0000001")
    # DCP stores a non-tensor value as torch.save(value): the bytes megatron-core 0.19 writes.
    dcp.save({"common_state/shard_0_1": [common]}, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    assert not (tmp_path / "common.pt").exists()
    again = read_common_state(tmp_path)
    assert again.keys() == common.keys() and vars(again["args"]) == vars(common["args"])
    with pytest.raises(ValueError, match="holds no common.pt and no common_state item"):
        read_common_state(tmp_path / "missing")
