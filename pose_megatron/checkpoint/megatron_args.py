"""Megatron-LM's `args` namespace <-> this project's configs (docs/reference.md, "Megatron-LM checkpoints").

Every checkpoint this project writes carries an `args` namespace in Megatron-LM's argument names, so
stock Megatron-LM's `--use-checkpoint-args` builds the same architecture and `check_checkpoint_args`
can validate a launch against it; PoSE's own settings stay in pose_config.json. The other way, a
checkpoint stock Megatron-LM saved has no pose_config.json: `run_config_from_megatron_args` builds
the architecture and base RoPE from its `args`, and refuses what this plugin cannot build.

RoPE: Megatron-LM has flags for integer linear interpolation (`--rotary-seq-len-interpolation-factor`)
and for LLaMA-3.1's scaling at 1 / 4 / 8192 (`--use-rope-scaling`, `--rope-scaling-factor`); nothing
else of PoSE's RoPE. And its mcore GPT builder (gpt_builders.py, tag core_v0.16.1) passes neither the
interpolation factor nor the llama3 factor to GPTModel: integer linear trains as plain RoPE and
llama3 always with factor 8. `stock_rope` says what stock Megatron-LM would train.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from pose_megatron.checkpoint.layout import RunConfig
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = {"sentencepiece": "GPTSentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer"}
"""This project's --tokenizer-type -> Megatron-LM's tokenizer class of the same vocabulary."""
MEGATRON_LM_SOURCE = "Megatron-LM args"
"""RunConfig.extra["architecture_from"] of a configuration read from a Megatron-LM checkpoint."""
DISTRIBUTED_OPTIMIZER_FORMAT = "dp_reshardable"
"""The distributed optimizer's only checkpoint format that round-trips without Apex or Transformer
Engine (docs/reference.md, "Megatron-LM checkpoints"); every save uses it."""
_LLAMA3_FIXED = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
"""What megatron-core's llama3 scaling hard-codes (only the factor is a flag)."""
_STOCK_LLAMA3_FACTOR = 8.0
"""GPTModel's default rope_scaling_factor, which stock's GPT builder never overrides."""


@dataclass
class StockRope:
    """How stock Megatron-LM (tag core_v0.16.1, mcore GPT models) reads a RoPE scaling."""

    args: dict
    """The RoPE fields of `args` (rotary_seq_len_interpolation_factor, use_rope_scaling,
    rope_scaling_factor)."""
    trains_with: Optional[str]
    """None when stock Megatron-LM computes this very RoPE; else what it would train with instead."""
    flags: List[str] = field(default_factory=list)
    """Flags a stock launch must pass by hand: `--use-checkpoint-args` does not copy these fields."""


def stock_rope(rope: RopeScaling) -> StockRope:
    plain = dict(rotary_seq_len_interpolation_factor=None, use_rope_scaling=False,
                 rope_scaling_factor=_STOCK_LLAMA3_FACTOR)
    if rope.rope_type == "default":
        return StockRope(plain, None)
    if rope.rope_type == "linear" and float(rope.factor).is_integer():
        factor = int(rope.factor)
        return StockRope(
            dict(plain, rotary_seq_len_interpolation_factor=factor),
            "plain RoPE: its GPT model builder does not pass --rotary-seq-len-interpolation-factor "
            f"({factor}) to GPTModel", ["--rotary-seq-len-interpolation-factor", str(factor)])
    fixed = {name: getattr(rope, name) for name in _LLAMA3_FIXED}
    if rope.rope_type == "llama3" and fixed == _LLAMA3_FIXED:
        flags = ["--use-rope-scaling", "--rope-scaling-factor", f"{rope.factor:g}"]
        fields = dict(plain, use_rope_scaling=True, rope_scaling_factor=float(rope.factor))
        if rope.factor == _STOCK_LLAMA3_FACTOR:
            return StockRope(fields, None, flags)
        return StockRope(fields, f"llama3 scaling with factor 8, not {rope.factor:g}: its GPT model "
                                 "builder does not pass --rope-scaling-factor to GPTModel", flags)
    return StockRope(plain, f"plain RoPE: Megatron-LM has no flag for {rope.rope_type} x"
                            f"{rope.factor:g}")


def stock_rope_warning(rope: RopeScaling, reading: StockRope) -> str:
    """The warning a save logs when stock Megatron-LM would train `rope` otherwise (`reading`)."""
    return (f"stock Megatron-LM (core_v0.16.1) would continue this {rope.rope_type} x{rope.factor:g} "
            f"checkpoint with {reading.trains_with}; its args record "
            + (" ".join(reading.flags) if reading.flags else "plain RoPE")
            + " (PoSE's RoPE is in pose_config.json)")


def sharded_sd_metadata(use_distributed_optimizer: bool) -> dict:
    """Megatron-LM's content metadata: how the sharded state dict was built. Saved as
    `content_metadata`; its loader builds the same layout from it (without it, a distributed
    optimizer's state is taken for the old dp_zero_gather_scatter format)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = DISTRIBUTED_OPTIMIZER_FORMAT
    return metadata


def log_stock_rope(run_config: RunConfig, ckpt_dir) -> None:
    """Say, when saving, how stock Megatron-LM would continue this checkpoint's RoPE."""
    rope = run_config.rope_scaling
    reading = stock_rope(rope)
    if reading.trains_with is not None:
        logger.warning("%s: %s", ckpt_dir, stock_rope_warning(rope, reading))
    elif reading.flags:
        logger.info("%s: continue it in stock Megatron-LM with %s (--use-checkpoint-args does not "
                    "copy them)", ckpt_dir, " ".join(reading.flags))


def _integral(value: float):
    """Megatron-LM's --rotary-base is an int: write an integral base as one."""
    return int(value) if float(value).is_integer() else float(value)


def megatron_args(run_config: RunConfig, layout: Tuple[int, int, int], *, iteration: int = 0,
                  consumed_train_samples: int = 0, params_dtype: torch.dtype = torch.float32,
                  training: Optional[dict] = None) -> argparse.Namespace:
    """The `args` namespace stock Megatron-LM saves, for a checkpoint of `run_config` at layout
    (TP, PP, DP). `training` adds a training run's own fields, already in Megatron-LM's names
    (train_iters, lr, global_batch_size, ...). Only builtins and torch dtypes: the namespace
    unpickles with megatron-core alone."""
    model, rope = run_config.model, run_config.rope_scaling
    tp, pp, dp = layout
    args = dict(
        # Architecture, as load_args_from_checkpoint copies it under --use-checkpoint-args.
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        group_query_attention=model.num_query_groups != model.num_attention_heads,
        num_query_groups=model.num_query_groups, kv_channels=model.head_dim,
        seq_length=run_config.seq_length or model.max_position_embeddings,
        max_position_embeddings=model.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=True,
        use_rotary_position_embeddings=False, rotary_base=_integral(model.rotary_base),
        rotary_percent=1.0, rotary_interleaved=False, **stock_rope(rope).args,
        normalization="RMSNorm", layernorm_epsilon=model.norm_epsilon, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=True, apply_query_key_layer_scaling=False,
        attention_dropout=0.0, hidden_dropout=0.0, num_experts=None,
        # Vocabulary: padded as Megatron-LM pads it (a multiple of the divisor x TP).
        padded_vocab_size=model.padded_vocab_size(tp), vocab_size=model.vocab_size,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        tokenizer_type=None, tokenizer_model=None,
        # Layout and format.
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
        expert_model_parallel_size=1, data_parallel_size=dp, world_size=tp * pp * dp,
        ckpt_format="torch_dist", use_dist_ckpt=True, no_save_optim=None, no_save_rng=None,
        params_dtype=params_dtype, fp16=params_dtype == torch.float16,
        bf16=params_dtype == torch.bfloat16,
        # Progress: Megatron-LM reads consumed samples from here only.
        iteration=iteration, consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=0, skipped_train_samples=0,
    )
    args.update(training or {})
    return argparse.Namespace(**args)


# ---- reading a stock Megatron-LM checkpoint ------------------------------------------------------

# (field, is the value unsupported, why): what a LLaMA-style PoseGPTModel cannot be.
_UNSUPPORTED = (
    ("use_legacy_models", bool, "a legacy (non-mcore) model"),
    ("position_embedding_type", lambda v: v not in (None, "rope"), "position embeddings {v!r}, not rope"),
    ("rotary_percent", lambda v: v is not None and v != 1.0, "rotary_percent {v} (RoPE on part of each head)"),
    ("rotary_interleaved", bool, "interleaved rotary embeddings"),
    ("normalization", lambda v: v not in (None, "RMSNorm"), "normalization {v!r}, not RMSNorm"),
    ("layernorm_zero_centered_gamma", bool, "zero-centred norm weights (--apply-layernorm-1p)"),
    ("add_bias_linear", bool, "biases in the linear layers"),
    ("add_qkv_bias", bool, "QKV biases"),
    ("qk_layernorm", bool, "query/key layer norms (--qk-layernorm)"),
    ("qk_l2_norm", bool, "query/key L2 norms"),
    ("num_experts", bool, "a mixture of experts ({v} experts)"),
    ("swiglu", lambda v: v is False, "an MLP other than SwiGLU"),
    ("squared_relu", bool, "a squared-ReLU MLP"),
    ("untie_embeddings_and_output_weights", lambda v: v is False,
     "tied input and output embeddings (this plugin trains untied ones)"),
    ("multi_latent_attention", bool, "multi-latent attention"),
    ("is_hybrid_model", bool, "a hybrid (Mamba) model"),
    ("heterogeneous_layers_config_path", bool, "heterogeneous layers"),
    ("mtp_num_layers", bool, "multi-token prediction layers"),
    ("apply_residual_connection_post_layernorm", bool, "post-norm residual connections"),
    ("ckpt_format", lambda v: v not in (None, "torch_dist"),
     "the {v!r} checkpoint format (convert it to torch_dist with Megatron-LM's --ckpt-convert-format "
     "torch_dist --ckpt-convert-save DIR)"),
)


def unsupported_features(args: argparse.Namespace) -> List[str]:
    """Why this plugin cannot build the model of a Megatron-LM `args` namespace (empty if it can)."""
    reasons = []
    for name, unsupported, reason in _UNSUPPORTED:
        value = getattr(args, name, None)
        if value is not None and unsupported(value):
            reasons.append(reason.format(v=value))
    heads, hidden = getattr(args, "num_attention_heads", None), getattr(args, "hidden_size", None)
    kv_channels = getattr(args, "kv_channels", None)
    if heads and hidden and kv_channels and kv_channels * heads != hidden:
        reasons.append(f"kv_channels {kv_channels} x {heads} heads != hidden size {hidden}")
    return reasons


def base_rope_from_args(args: argparse.Namespace) -> Tuple[RopeScaling, List[str]]:
    """The RoPE stock Megatron-LM's GPT model trained with, and warnings where `args` say more than
    its builder applied (see the module docstring)."""
    notes = []
    if getattr(args, "rotary_seq_len_interpolation_factor", None):
        notes.append(f"its args set --rotary-seq-len-interpolation-factor "
                     f"{args.rotary_seq_len_interpolation_factor}, which Megatron-LM's mcore GPT "
                     "builder does not apply: the model was trained with plain RoPE, and is read so")
    if not getattr(args, "use_rope_scaling", False):
        return RopeScaling(), notes
    factor = float(getattr(args, "rope_scaling_factor", _STOCK_LLAMA3_FACTOR))
    if factor != _STOCK_LLAMA3_FACTOR:
        notes.append(f"its args set --rope-scaling-factor {factor:g}, which Megatron-LM's mcore GPT "
                     "builder does not pass to GPTModel: the model was trained with llama3 scaling "
                     "x8, and is read so")
    return RopeScaling("llama3", factor=_STOCK_LLAMA3_FACTOR, **_LLAMA3_FIXED), notes


def run_config_from_megatron_args(args: argparse.Namespace, where: str,
                                  release: bool = False) -> Tuple[RunConfig, List[str]]:
    """(RunConfig, warnings) of a checkpoint stock Megatron-LM wrote; ValueError (naming every
    reason) for a model this plugin cannot build. The vocabulary is the checkpoint's padded one, so
    every stored row loads. `where` names the checkpoint in messages."""
    reasons = unsupported_features(args)
    if reasons:
        raise ValueError(f"--load {where} was saved by Megatron-LM with " + "; ".join(reasons)
                         + ". pose_megatron builds LLaMA-style models only (RoPE on whole heads, "
                           "RMSNorm, SwiGLU, no biases, untied embeddings), so it cannot continue it")
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                           "padded_vocab_size", "max_position_embeddings")
               if getattr(args, n, None) is None]
    if missing:
        raise ValueError(f"--load {where} has Megatron-LM args without {', '.join(missing)}, so its "
                         "architecture is unknown; is it a GPT checkpoint?")
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    model = ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=heads,
        num_query_groups=groups or heads, ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=args.padded_vocab_size, max_position_embeddings=args.max_position_embeddings,
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        norm_epsilon=float(getattr(args, "layernorm_epsilon", 1e-5)),
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128) or 128,
    )
    rope, notes = base_rope_from_args(args)
    run_config = RunConfig(
        model=model, rope_scaling=rope, family="llama",
        # A release starts afresh; a training checkpoint is resumed (see TrainingRun.resuming).
        seq_length=None if release else getattr(args, "seq_length", None),
        extra={"architecture_from": MEGATRON_LM_SOURCE,
               "padded_vocab_size": args.padded_vocab_size,
               "megatron_lm_tokenizer": [getattr(args, "tokenizer_type", None),
                                         getattr(args, "tokenizer_model", None)]},
    )
    return run_config, notes
