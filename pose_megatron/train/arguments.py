"""Command-line flags -> a validated `TrainingRun`, before any process group exists.

Flags are generated from the config dataclasses (train/flags.py): ModelConfig fields under
Megatron-LM's names (`--num-layers`, `--hidden-size`, ...), RopeScaling as `--rope-*`,
PoseSampling as `--pose-*`, and the trainer's own TrainingConfig / DataConfig / ParallelConfig
(`--train-iters`, `--data-path`, `--tensor-model-parallel-size`, ...). `RENAMES` is the one table of
flags whose Megatron-LM name is not the field's. Every cross-field check runs here, so contradictory
settings stop with one message naming the fix; what comes out is built once and passed down.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Optional, Sequence

from pose_megatron.checkpoint.layout import (
    holds_checkpoint,
    load_run_config,
    resolve_checkpoint_dir,
    why_no_checkpoint,
)
from pose_megatron.checkpoint.megatron_args import MEGATRON_LM_SOURCE
from pose_megatron.files import is_writable
from pose_megatron.positions import PoseSampling
from pose_megatron.presets import MODEL_PRESETS, ModelConfig, get_preset
from pose_megatron.rope import RopeScaling
from pose_megatron.train.config import (
    DataConfig,
    ParallelConfig,
    TrainingConfig,
    TrainingRun,
)
from pose_megatron.train.flags import add_dataclass_flags, group_values

logger = logging.getLogger(__name__)

# Flags whose Megatron-LM name differs from "--<group prefix><field>".
RENAMES = {
    "pose": {"seq_length": "--seq-length"},
    "data": {"min_doc_length": "--pose-min-doc-length"},
}
# ModelConfig fields that are not flags: the tokenizer (or the checkpoint) gives the vocabulary,
# the preset says whether the output layer is Baichuan2's NormHead.
_NOT_MODEL_FLAGS = ("vocab_size", "norm_head")
# Fields that fix the weights' shapes: a checkpoint's own value cannot be overridden.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pose_megatron.train",
        description="PoSE training of a LLaMA-style model on megatron-core.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model", dest="run.model", default="tiny", choices=sorted(MODEL_PRESETS),
                        help="architecture preset (ignored with --load: a pose_megatron checkpoint holds "
                             "its architecture in pose_config.json, a Megatron-LM one in its args)")
    add_dataclass_flags(parser.add_argument_group("model (override the preset or checkpoint)"),
                        ModelConfig, "model", exclude=_NOT_MODEL_FLAGS, keep_defaults=False)
    add_dataclass_flags(parser.add_argument_group("PoSE sampling"), PoseSampling, "pose",
                        prefix="pose-", renames=RENAMES["pose"], keep_defaults=False,
                        required=["seq_length"])
    add_dataclass_flags(parser.add_argument_group("RoPE scaling"), RopeScaling, "rope", prefix="rope-",
                        keep_defaults=False, notes={
                            "factor": "A scaled type given without it gets --pose-target-length / "
                                      "--seq-length."})
    add_dataclass_flags(parser.add_argument_group("data"), DataConfig, "data",
                        renames=RENAMES["data"])
    add_dataclass_flags(parser.add_argument_group("training"), TrainingConfig, "train")
    add_dataclass_flags(parser.add_argument_group("parallelism"), ParallelConfig, "parallel")
    parser.add_argument("--bf16", dest="train.precision", action="store_const", const="bf16",
                        help="same as --precision bf16")
    parser.add_argument("--fp16", dest="train.precision", action="store_const", const="fp16",
                        help="same as --precision fp16")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> TrainingRun:
    """Parse and validate; SystemExit(2) with one clear message on contradictory settings."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return build_run(namespace, world_size)
    except ValueError as err:
        parser.error(str(err))


def build_run(namespace: argparse.Namespace, world_size: int) -> TrainingRun:
    """The parsed flags as built, cross-checked configs; ValueError names the problem and the fix."""
    pose = _pose_sampling(namespace)
    data = DataConfig(**group_values(namespace, "data"))
    training = TrainingConfig(**group_values(namespace, "train"))
    parallel = ParallelConfig(**group_values(namespace, "parallel"))
    _check_paths(training, data)
    stored = _stored_run_config(training)
    rope = _rope_scaling(namespace, pose, stored)
    model = _model_config(namespace, stored, data)
    run = TrainingRun(model=model, rope=rope, pose=pose, training=training, data=data,
                      parallel=parallel, stored=stored, world_size=world_size)
    _check_layout(run)
    _check_schedule(training)
    _check_checkpoint(run)
    return run


def _pose_sampling(namespace) -> PoseSampling:
    values = group_values(namespace, "pose", given_only=True)
    values.setdefault("target_length", values["seq_length"])
    if values["target_length"] < values["seq_length"]:
        raise ValueError(
            f"--pose-target-length ({values['target_length']}) is shorter than --seq-length "
            f"({values['seq_length']}); the target is the context to extend to, at least the window"
        )
    return PoseSampling(**values)  # ValueError names the field


def _rope_scaling(namespace, pose: PoseSampling, stored) -> RopeScaling:
    """The flags' RopeScaling (a scaled type without --rope-factor gets target / seq length); with
    no --rope-* flag at all, the loaded checkpoint's own (a LLaMA-3.1 keeps its llama3 scaling)."""
    values = group_values(namespace, "rope", given_only=True)
    if not values and stored is not None:
        return stored.rope_scaling
    if values.get("rope_type", "default") != "default" and "factor" not in values:
        values["factor"] = pose.target_length / pose.seq_length
    return RopeScaling(**values)


def _stored_run_config(training: TrainingConfig):
    """The RunConfig of the --load checkpoint: its pose_config.json, else (a checkpoint stock
    Megatron-LM saved) built from its `args`. None when --load holds no checkpoint yet, or, with
    --finetune, a checkpoint that records no architecture (the flags then give it)."""
    from pose_megatron.checkpoint.megatron_args import run_config_from_megatron_args
    from pose_megatron.checkpoint.saved_state import read_saved_state

    load = training.load
    if not load or not holds_checkpoint(load):
        return None
    try:
        ckpt = resolve_checkpoint_dir(load)
    except FileNotFoundError as err:
        raise ValueError(f"--load {load}: {err}") from err
    stored = load_run_config(ckpt)
    if stored is not None:
        return stored
    saved = read_saved_state(ckpt)
    if saved.args is None:
        if training.finetune:
            return None
        raise ValueError(f"--load {load} holds neither a pose_config.json nor Megatron-LM args, so "
                         "its architecture is unknown: pass --finetune with the model flags (--model "
                         "or --num-layers, --hidden-size, ...) to start from its weights")
    stored, notes = run_config_from_megatron_args(saved.args, load, release=saved.release)
    from pose_megatron.runtime import is_first_rank

    for note in notes if is_first_rank() else ():
        logger.warning("--load %s: %s", load, note)
    return stored


def _model_config(namespace, stored, data: DataConfig) -> ModelConfig:
    """A loaded checkpoint's own architecture wins over --model (flags still override fields);
    otherwise the preset, with the tokenizer's vocabulary."""
    from pose_megatron.tokenizer import build_tokenizer

    overrides = group_values(namespace, "model", given_only=True)
    tokenizer_vocab = build_tokenizer(data.tokenizer_type, data.tokenizer_model).vocab_size
    if stored is not None:
        source = ("its Megatron-LM args" if stored.extra.get("architecture_from") == MEGATRON_LM_SOURCE
                  else "its pose_config.json")
        for name in _SHAPE_FIELDS:
            if name in overrides and overrides[name] != getattr(stored.model, name):
                raise ValueError(
                    f"--{name.replace('_', '-')} {overrides[name]} contradicts the checkpoint's "
                    f"{getattr(stored.model, name)} ({source}); --load takes the "
                    "architecture from the checkpoint: drop the flag")
        model = dataclasses.replace(stored.model, **overrides)
        if tokenizer_vocab > model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer_vocab} tokens but the checkpoint's model only "
                f"{model.vocab_size} ({source}): use the checkpoint's tokenizer")
        return model
    return get_preset(group_values(namespace, "run")["model"], vocab_size=tokenizer_vocab, **overrides)


def _check_paths(training: TrainingConfig, data: DataConfig) -> None:
    if training.finetune and not training.load:
        raise ValueError("--finetune needs --load (the checkpoint whose weights to start from)")
    _check_load_and_save(training)
    if not data.data_path:
        raise ValueError(
            "--data-path is required (indexed-dataset prefixes from tools/preprocess_data.py); for "
            "the bundled sample corpus run tools/build_sample_corpus.py, which prints its "
            "--data-path and --tokenizer-model")
    for prefix in data_prefixes(data.data_path):
        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            raise ValueError(f"--data-path {prefix}: no {prefix}.bin/.idx; create them with "
                             "tools/preprocess_data.py")
        cache = data.data_cache_path or os.path.join(prefix, "cache")
        if not is_writable(cache):
            where = "--data-cache-path" if data.data_cache_path else f"the directory of {prefix}"
            raise ValueError(f"{where} is not writable, so the dataset index caches cannot be "
                             "written; pass --data-cache-path DIR (a writable directory)")
    if not data.tokenizer_model:
        raise ValueError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    if not os.path.exists(data.tokenizer_model):
        raise ValueError(f"--tokenizer-model {data.tokenizer_model} does not exist")
    if training.eval_iters and data.split_shares[1] == 0:
        raise ValueError(f"--split {data.split} leaves the validation split empty, but --eval-iters "
                         f"{training.eval_iters} asks for validation; give it a share (e.g. --split "
                         "98,2,0) or pass --eval-iters 0")


def _check_load_and_save(training: TrainingConfig) -> None:
    """--load names a checkpoint (or, as Megatron-LM's job chaining does, the empty --save of a
    first submission); --save is writable and holds no other run's checkpoints."""
    load, save = training.load, training.save
    chained = bool(load and save and os.path.realpath(load) == os.path.realpath(save))
    if load and not holds_checkpoint(load):
        fresh = not os.path.exists(load) or (os.path.isdir(load) and not os.listdir(load))
        if not (chained and fresh and not training.finetune):
            raise ValueError(why_no_checkpoint(load))
    if save:
        if not is_writable(save):
            raise ValueError(f"--save {save} is not writable (read-only file system or no "
                             "permission); choose a writable directory")
        if holds_checkpoint(save) and not chained and not training.overwrite_save:
            raise ValueError(
                f"--save {save} already holds a checkpoint that --load does not name; resume it "
                f"with --load {save}, choose another --save, or pass --overwrite-save to replace it")


def _check_layout(run: TrainingRun) -> None:
    tp = run.parallel.tensor_model_parallel_size
    pp = run.parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    run.model.check_parallel(tp, pp)
    if run.world_size % (tp * pp):
        raise ValueError(
            f"{run.world_size} processes cannot be split into TP={tp} x PP={pp}; use a process "
            "count that is a multiple of TP x PP")
    t, dp = run.training, run.data_parallel_size
    if run.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {run.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}")


def _check_schedule(t: TrainingConfig) -> None:
    if t.lr_warmup_iters >= t.decay_iters:
        raise ValueError(
            f"--lr-warmup-iters ({t.lr_warmup_iters}) must be smaller than the decay length "
            f"(--lr-decay-iters, default --train-iters: {t.decay_iters})")
    if t.precision in ("bf16", "fp16"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--{t.precision} needs a GPU; on CPU train in fp32 (--precision fp32)")


def _check_checkpoint(run: TrainingRun) -> None:
    if run.stored is None:
        return
    if run.resuming and run.stored.rope_scaling != run.rope:
        raise ValueError(
            f"--load {run.training.load} was trained with {run.stored.rope_scaling}, this run asks "
            f"for {run.rope}; resume with the same --rope-* flags, or start a new run with --finetune")
    from pose_megatron.checkpoint.vocab_padding import check_vocab_padding

    check_vocab_padding(dataclasses.replace(run.stored, model=run.model),
                        run.parallel.tensor_model_parallel_size, checkpoint=run.training.load)
    if run.resuming:
        _check_resume(run)


def _check_resume(run: TrainingRun) -> None:
    """The optimizer, schedule and RNG state the resume will load fit this run (else the flag to
    pass), decided now rather than after the processes have started."""
    from pose_megatron.checkpoint.resume_checks import plan_resume
    from pose_megatron.checkpoint.saved_state import read_saved_state

    plan_resume(read_saved_state(resolve_checkpoint_dir(run.training.load)), run.layout,
                run.load_options())


def data_prefixes(data_path: Sequence[str]) -> list:
    """The prefixes of a --data-path list, with or without interleaved weights."""
    return data_blend(data_path)[0]


def data_blend(data_path: Sequence[str]):
    """(prefixes, weights or None) from Megatron's --data-path forms: "p1 p2" or "w1 p1 w2 p2"."""
    if len(data_path) > 1 and len(data_path) % 2 == 0 and _is_number(data_path[0]):
        weights = [float(w) for w in data_path[0::2]]
        if any(w < 0 for w in weights):
            raise ValueError(f"--data-path blend weights must be >= 0, got {weights}")
        return list(data_path[1::2]), weights
    return list(data_path), None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
