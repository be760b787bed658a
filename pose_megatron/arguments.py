"""Command-line flags -> config dataclasses, validated once, before any process group exists.

Megatron-LM's flag names where Megatron has the setting (`--tensor-model-parallel-size`,
`--seq-length`, `--micro-batch-size`, `--lr`, `--save`, `--data-path`, ...); PoSE flags name their
group and field (`--pose-num-chunks` -> PoseSampling.num_chunks, `--rope-factor` ->
RopeScaling.factor). `FLAGS` is the one table from flags to fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pose_megatron.presets import MODEL_PRESETS
from pose_megatron.rope import ROPE_TYPES


@dataclass
class ParallelConfig:
    """How the model is split over the processes."""

    tensor_model_parallel_size: int = 1
    """TP: ranks that split each layer's weights."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages (layers split in order)."""


@dataclass
class DataConfig:
    """Where training text comes from."""

    data_path: list = field(default_factory=list)
    """Indexed-dataset prefixes, or Megatron's "weight prefix weight prefix ..." blend; empty: the
    bundled sample corpus."""
    split: str = "969,30,1"
    """Train / valid / test proportions of the documents."""
    tokenizer_type: str = "sentencepiece"
    """sentencepiece or huggingface."""
    tokenizer_model: Optional[str] = None
    """Tokenizer file (sentencepiece .model) or directory (huggingface)."""
    data_cache_path: Optional[str] = None
    """Where dataset index caches go (default: next to the data)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (samples are cheap to cut; 0 is usually right)."""


@dataclass
class TrainingConfig:
    """The optimisation run. Defaults are the PoSE paper's recipe (REFERENCE.md section 3)."""

    train_iters: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Samples per forward pass per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step (default: micro batch x data-parallel size)."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: str = "linear"
    """constant, linear or cosine decay after warm-up."""
    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr (default: train_iters)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    precision: str = "auto"
    """fp32, bf16 or fp16 (dynamic loss scaling); auto: bf16 on GPU, fp32 on CPU."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    recompute_activations: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."""
    seed: int = 1234
    """Seed of initialisation and of the PoSE sampler."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation (models trained from scratch)."""
    log_interval: int = 10
    """Steps between log lines."""
    eval_interval: int = 1000
    """Steps between validation passes."""
    eval_iters: int = 10
    """Validation batches per pass (0 disables validation)."""
    save: Optional[str] = None
    """Checkpoint directory (Megatron layout: iter_XXXXXXX/, latest_checkpointed_iteration.txt)."""
    save_interval: Optional[int] = None
    """Steps between checkpoints (a checkpoint is also written at the end and on SIGTERM)."""
    load: Optional[str] = None
    """Checkpoint to resume from (model, optimizer, scheduler, RNG, iteration, consumed samples)."""
    finetune: bool = False
    """With --load: take the weights only; iteration, optimizer and schedule start afresh."""
    no_load_optim: bool = False
    """With --load: do not restore optimizer state (needed when TP/PP changed)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here."""
    metrics_file: Optional[str] = None
    """Append every step's loss, lr and grad norm as JSON lines (full precision) to this file."""
    exit_interval: Optional[int] = None
    """Stop (after saving) once the iteration is a multiple of this; for tests and job chaining."""


# (flag, group, field, argparse keywords). Groups: model (ModelConfig overrides), rope (RopeScaling),
# pose (PoseSampling and min_doc_length), train, data, parallel, run (the preset, the target).
FLAGS = [
    ("--model", "run", "model", dict(default="tiny", choices=sorted(MODEL_PRESETS),
                                      help="architecture preset")),
    ("--num-layers", "model", "num_layers", dict(type=int)),
    ("--hidden-size", "model", "hidden_size", dict(type=int)),
    ("--num-attention-heads", "model", "num_attention_heads", dict(type=int)),
    ("--num-query-groups", "model", "num_query_groups", dict(type=int)),
    ("--ffn-hidden-size", "model", "ffn_hidden_size", dict(type=int)),
    ("--rotary-base", "model", "rotary_base", dict(type=float)),
    ("--norm-epsilon", "model", "norm_epsilon", dict(type=float)),
    ("--max-position-embeddings", "model", "max_position_embeddings",
     dict(type=int, help="the model's original window L_c (default: the preset's)")),
    ("--make-vocab-size-divisible-by", "model", "make_vocab_size_divisible_by", dict(type=int)),
    ("--seq-length", "pose", "seq_length", dict(type=int, required=True,
                                                 help="training window L_c (tokens per sample)")),
    ("--pose-target-length", "pose", "target_length",
     dict(type=int, help="PoSE target L_t (default: --seq-length, plain training)")),
    ("--pose-num-chunks", "pose", "num_chunks", dict(type=int, default=2,
                                                      help="2: PoSE; --seq-length: RandPos")),
    ("--pose-content", "pose", "content", dict(default="skip", choices=["skip", "contiguous"])),
    ("--pose-content-window", "pose", "content_window", dict(type=int,
                                                             help="L_x (default 5 x seq)")),
    ("--pose-min-doc-length", "pose", "min_doc_length",
     dict(type=int, help="skip shorter documents (default seq_length + 1)")),
    ("--rope-type", "rope", "rope_type", dict(default="default", choices=list(ROPE_TYPES))),
    ("--rope-factor", "rope", "factor",
     dict(type=float, help="default: target length / seq length for scaled types")),
    ("--rope-original-max-position-embeddings", "rope", "original_max_position_embeddings",
     dict(type=int, help="L_o for yarn, yarn-revised and llama3")),
    ("--rope-beta-fast", "rope", "beta_fast", dict(type=float)),
    ("--rope-beta-slow", "rope", "beta_slow", dict(type=float)),
    ("--rope-low-freq-factor", "rope", "low_freq_factor", dict(type=float)),
    ("--rope-high-freq-factor", "rope", "high_freq_factor", dict(type=float)),
    ("--rope-attention-factor", "rope", "attention_factor", dict(type=float)),
    ("--tensor-model-parallel-size", "parallel", "tensor_model_parallel_size",
     dict(type=int, default=1)),
    ("--pipeline-model-parallel-size", "parallel", "pipeline_model_parallel_size",
     dict(type=int, default=1)),
    ("--data-path", "data", "data_path", dict(nargs="*", default=[])),
    ("--split", "data", "split", dict(default="969,30,1")),
    ("--tokenizer-type", "data", "tokenizer_type",
     dict(default="sentencepiece", choices=["sentencepiece", "huggingface"])),
    ("--tokenizer-model", "data", "tokenizer_model", dict()),
    ("--data-cache-path", "data", "data_cache_path", dict()),
    ("--num-workers", "data", "num_workers", dict(type=int, default=0)),
]
# TrainingConfig flags are generated from its fields: --train-iters, --micro-batch-size, ...
_BOOL_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainingConfig) if f.type == "bool"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pose_megatron.train",
        description="PoSE training of a LLaMA-style model on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, group, name, kwargs in FLAGS:
        if kwargs.get("nargs") != "*" and "choices" not in kwargs:
            kwargs = dict(kwargs, metavar=name.upper())
        parser.add_argument(flag, dest=f"{group}.{name}", **kwargs)
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        dest = f"train.{f.name}"
        if f.name in _BOOL_TRAIN_FIELDS:
            parser.add_argument(flag, dest=dest, action="store_true")
        elif f.name == "precision":
            parser.add_argument(flag, dest=dest, default="auto",
                                choices=["auto", "fp32", "bf16", "fp16"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "")
                                                     .rstrip("]"), str)
            default = f.default if f.default is not dataclasses.MISSING else None
            parser.add_argument(flag, dest=dest, type=kind, default=default,
                                metavar=f.name.upper())
    parser.add_argument("--bf16", dest="train.precision", action="store_const", const="bf16")
    parser.add_argument("--fp16", dest="train.precision", action="store_const", const="fp16")
    return parser


@dataclass
class RunArgs:
    """Everything a training run was asked for, grouped by the config it becomes."""

    model: str
    """Preset name."""
    model_overrides: dict
    """ModelConfig fields given on the command line."""
    rope: dict
    """RopeScaling fields given on the command line (factor may be derived later)."""
    pose: dict
    """PoseSampling fields plus min_doc_length."""
    training: TrainingConfig
    data: DataConfig
    parallel: ParallelConfig

    @property
    def seq_length(self) -> int:
        return self.pose["seq_length"]

    @property
    def target_length(self) -> int:
        return self.pose["target_length"]


def parse_args(argv: Optional[Sequence[str]] = None) -> RunArgs:
    """Parse and validate; raises SystemExit with one clear message on contradictory settings."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    groups: dict = {}
    for dest, value in ns.items():
        group, name = dest.split(".", 1)
        if value is not None:
            groups.setdefault(group, {})[name] = value
    pose = groups.get("pose", {})
    pose.setdefault("target_length", pose["seq_length"])
    args = RunArgs(
        model=groups["run"]["model"],
        model_overrides=groups.get("model", {}),
        rope=groups.get("rope", {}),
        pose=pose,
        training=TrainingConfig(**groups.get("train", {})),
        data=DataConfig(**groups.get("data", {})),
        parallel=ParallelConfig(**groups.get("parallel", {})),
    )
    try:
        validate(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        parser.error(str(err))
    return args


def rope_settings(args: RunArgs) -> dict:
    """RopeScaling keywords; a scaled type without --rope-factor gets target / seq length."""
    rope = dict(args.rope)
    if rope.get("rope_type", "default") != "default" and "factor" not in rope:
        rope["factor"] = args.target_length / args.seq_length
    return rope


def validate(args: RunArgs, world_size: int) -> None:
    """Cross-field checks that need no model, data or process group; ValueError names the fix."""
    from pose_megatron.positions import PoseSampling
    from pose_megatron.rope import RopeScaling

    if args.target_length < args.seq_length:
        raise ValueError(
            f"--pose-target-length ({args.target_length}) is shorter than --seq-length "
            f"({args.seq_length}); the target is the context to extend to, at least the window"
        )
    pose_fields = {k: v for k, v in args.pose.items() if k != "min_doc_length"}
    PoseSampling(**pose_fields)  # raises ValueError naming the field
    RopeScaling(**rope_settings(args))
    tp = args.parallel.tensor_model_parallel_size
    pp = args.parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    model, _ = resolve_model_config(args)
    model.check_parallel(tp, pp)
    if world_size % (tp * pp):
        raise ValueError(
            f"{world_size} processes cannot be split into TP={tp} x PP={pp}; use a process count "
            "that is a multiple of TP x PP"
        )
    dp = world_size // (tp * pp)
    t = args.training
    global_batch = t.global_batch_size or t.micro_batch_size * dp
    if global_batch % (t.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    if t.lr_decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"--lr-decay-style must be constant, linear or cosine, got {t.lr_decay_style!r}")
    decay_iters = t.lr_decay_iters or t.train_iters
    if t.lr_warmup_iters >= decay_iters:
        raise ValueError(
            f"--lr-warmup-iters ({t.lr_warmup_iters}) must be smaller than the decay length "
            f"(--lr-decay-iters, default --train-iters: {decay_iters})"
        )
    if t.precision in ("bf16", "fp16") and not _cuda_available():
        raise ValueError(f"--{t.precision} needs a GPU; on CPU train in fp32 (--precision fp32)")
    if t.finetune and not t.load:
        raise ValueError("--finetune needs --load (the checkpoint whose weights to start from)")
    if t.load and not os.path.exists(t.load):
        raise ValueError(f"--load {t.load} does not exist")
    for prefix in _data_prefixes(args.data.data_path):
        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            raise ValueError(
                f"--data-path {prefix}: no {prefix}.bin/.idx; create them with "
                "tools/preprocess_data.py"
            )
    if args.data.data_path and not args.data.tokenizer_model:
        raise ValueError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    if args.data.tokenizer_model and not os.path.exists(args.data.tokenizer_model):
        raise ValueError(f"--tokenizer-model {args.data.tokenizer_model} does not exist")


def resolve_model_config(args: RunArgs):
    """(ModelConfig, stored RunConfig or None): a loaded checkpoint's own architecture wins over
    --model and model flags (which then need not be repeated); otherwise the preset with overrides.
    vocab_size is replaced by the tokenizer's later, when the model is not from a checkpoint."""
    from pose_megatron.checkpoint.layout import load_run_config, read_tracker, resolve_checkpoint_dir
    from pose_megatron.presets import get_preset

    load = args.training.load
    if load and (read_tracker(load) is not None or os.path.exists(os.path.join(load, "metadata.json"))):
        stored = load_run_config(resolve_checkpoint_dir(load))
        if stored is not None:
            model = stored.model
            if args.model_overrides:
                model = dataclasses.replace(model, **args.model_overrides)
            return model, stored
    return get_preset(args.model, **args.model_overrides), None


def _data_prefixes(data_path: Sequence[str]) -> list:
    """The prefixes of a --data-path list, with or without interleaved weights."""
    if len(data_path) > 1 and len(data_path) % 2 == 0 and _is_number(data_path[0]):
        return list(data_path[1::2])
    return list(data_path)


def data_blend(data_path: Sequence[str]):
    """(prefixes, weights or None) from Megatron's --data-path forms."""
    prefixes = _data_prefixes(data_path)
    if len(prefixes) == len(data_path):
        return prefixes, None
    return prefixes, [float(w) for w in data_path[0::2]]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
