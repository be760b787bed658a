"""The PoSE training loop, built from megatron-core's pieces (0.16 ships no megatron.training).

PoseGPTModel -> (Float16Module for bf16/fp16) -> megatron DistributedDataParallel; get_megatron_optimizer
(optionally the distributed optimizer) with OptimizerParamScheduler; the pipeline schedule from
get_forward_backward_func runs the micro-batches of each global batch. Every pipeline stage reads the
batch itself, since each stage applies RoPE from the position ids.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from pose_megatron import runtime
from pose_megatron.arguments import RunArgs, TrainingConfig, data_blend, resolve_model_config, rope_settings
from pose_megatron.checkpoint.layout import RunConfig
from pose_megatron.checkpoint.training_state import (
    TrainingProgress,
    load_training_checkpoint,
    save_training_checkpoint,
)
from pose_megatron.model import build_transformer_config
from pose_megatron.presets import ModelConfig
from pose_megatron.loader import build_data_iterator
from pose_megatron.model import build_model
from pose_megatron.runtime import transformer_engine_usable
from pose_megatron.progress import ProgressReporter, model_flops_per_token
from pose_megatron.rope import RopeScaling

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-weighted LM loss of one micro-batch, in the schedules' 3-tuple form.

    Returns (sum of masked token losses, number of loss tokens, {"lm loss": [sum, tokens]}); the
    schedule divides by the token count, and reporting sums [sum, tokens] over micro-batches so the
    logged loss is the exact token-weighted mean.
    """
    losses = output_tensor.float()  # [b, s] per-token cross entropy
    mask = loss_mask.float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch: every pipeline stage reads the batch, since each needs its position ids."""
    batch = next(data_iterator)
    device = runtime.get_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)  # [b, s] token losses on the last stage
    return output, partial(loss_func, loss_mask)


def resolve_precision(training: TrainingConfig) -> str:
    if training.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return training.precision


def setup_model_and_optimizer(model_cfg: ModelConfig, rope: RopeScaling, training: TrainingConfig,
                              seq_length: int, tp: int, pp: int):
    """(DDP-wrapped model, optimizer, scheduler) for this rank's pipeline stage."""
    precision = resolve_precision(training)
    use_te = transformer_engine_usable()
    tconfig = build_transformer_config(
        model_cfg,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=_DTYPES[precision],
        # TE's fused RoPE takes one position sequence per micro-batch: only with micro-batch 1.
        apply_rope_fusion=use_te and training.micro_batch_size == 1,
        recompute_activations=training.recompute_activations,
        init_method_std=training.init_method_std,
    )
    model = build_model(
        model_cfg, tconfig, rope,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=use_te,
        max_sequence_length=seq_length,
    )
    if precision != "fp32":
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=_DTYPES[precision],
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters,
        lr_decay_steps=training.lr_decay_iters or training.train_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
    )
    # The schedules call these: DP gradient sync at the end of backward, loss scaling for fp16.
    tconfig.no_sync_func = ddp_model.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return ddp_model, optimizer, scheduler


def _reduce_lm_loss(reports: list) -> float:
    """Token-weighted mean loss over micro-batches and data-parallel ranks (last stage), shared
    with every rank so any rank can report it."""
    if parallel_state.is_pipeline_last_stage():
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    else:
        total = torch.zeros(2)
    total = total.to(runtime.get_device())
    # Send it from the last stage to every stage (sum: other stages contribute zeros).
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(model, optimizer, scheduler, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> dict:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return {
        "loss": _reduce_lm_loss(reports),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_successful,
        "loss_scale": optimizer.get_loss_scale().item() if resolve_precision_is_fp16(optimizer) else None,
    }


def resolve_precision_is_fp16(optimizer) -> bool:
    return bool(getattr(optimizer.config, "fp16", False))


@torch.no_grad()
def evaluate(model, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> float:
    model.eval()
    reports = []
    for _ in range(eval_iters):
        reports += get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
    model.train()
    return _reduce_lm_loss(reports)


class _StopSignal:
    """SIGTERM (a scheduler's preemption) asks the loop to save and exit after the current step."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], device=runtime.get_device())
        dist.all_reduce(flag)  # all ranks stop at the same step
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def run_training(args: RunArgs) -> Optional[str]:
    """Train as `args` says; returns the final checkpoint directory (None without --save)."""
    from pose_megatron.data import build_pose_datasets
    from pose_megatron.positions import PoseSampling
    from pose_megatron.tokenizer import build_tokenizer

    training, data, parallel = args.training, args.data, args.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    runtime.initialize_distributed()
    runtime.initialize_model_parallel(tp, pp)
    runtime.set_seed(training.seed)
    rank = dist.get_rank()
    dp = parallel_state.get_data_parallel_world_size()
    global_batch = training.global_batch_size or training.micro_batch_size * dp
    num_microbatches = global_batch // (training.micro_batch_size * dp)

    data = _resolve_data(data)
    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
    model_cfg, stored = resolve_model_config(args)
    if stored is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    else:
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's "
                             f"model only {model_cfg.vocab_size}: use the checkpoint's tokenizer")
        from pose_megatron.checkpoint.vocab_padding import check_vocab_padding

        check_vocab_padding(stored, tp, checkpoint=training.load)
    rope = RopeScaling(**rope_settings(args))
    resuming = stored is not None and stored.seq_length is not None and not training.finetune
    if resuming and stored.rope_scaling != rope:
        raise ValueError(
            f"--load {training.load} was trained with {stored.rope_scaling}, this run asks for "
            f"{rope}; resume with the same --rope-* flags, or start a new run with --finetune"
        )
    pose_fields = {k: v for k, v in args.pose.items() if k != "min_doc_length"}
    pose = PoseSampling(**pose_fields)

    model, optimizer, scheduler = setup_model_and_optimizer(
        model_cfg, rope, training, pose.seq_length, tp, pp)
    progress = TrainingProgress()
    if training.load:
        loaded = load_training_checkpoint(
            training.load, model.module, optimizer, scheduler,
            finetune=training.finetune, no_load_optim=training.no_load_optim)
        progress = loaded or progress

    eval_batches = training.eval_iters * global_batch
    n_evals = training.train_iters // training.eval_interval + 1 if training.eval_iters else 0
    sizes = [training.train_iters * global_batch, n_evals and eval_batches, 0]
    prefixes, weights = data_blend(data.data_path)
    build = partial(build_pose_datasets, prefixes, weights, data.split, sizes, training.seed,
                    tokenizer, pose, min_doc_length=args.pose.get("min_doc_length"),
                    path_to_cache=data.data_cache_path)
    # megatron-core's builder builds the index caches on rank 0 first, then the others read them.
    train_ds, valid_ds, _ = build()
    dp_rank = parallel_state.get_data_parallel_rank()
    train_iter = build_data_iterator(train_ds, progress.consumed_train_samples,
                                     training.micro_batch_size, dp_rank, dp, data.num_workers)

    # Provenance carries forward (the importer's hf_config lets the exporter rebuild config.json).
    extra = dict(stored.extra) if stored else {}
    extra.update(tokenizer_model=os.path.abspath(data.tokenizer_model),
                 padded_vocab_size=model_cfg.padded_vocab_size(tp))
    family = stored.family if stored else ("baichuan" if model_cfg.norm_head else "llama")
    run_config = RunConfig(model=model_cfg, rope_scaling=rope, family=family,
                           seq_length=pose.seq_length, target_length=pose.target_length, extra=extra)
    num_params = sum(p.numel() for p in model.parameters())
    num_params_all = torch.tensor([num_params], device=runtime.get_device())
    dist.all_reduce(num_params_all, group=parallel_state.get_model_parallel_group())
    reporter = ProgressReporter(
        training.train_iters, progress.iteration, global_batch * pose.seq_length,
        model_flops_per_token(int(num_params_all.item()), model_cfg.num_layers,
                              model_cfg.hidden_size, pose.seq_length),
        dist.get_world_size(), is_reporting_rank=rank == dist.get_world_size() - 1,
        tensorboard_dir=training.tensorboard_dir, metrics_file=training.metrics_file,
    )
    reporter.write(
        f"PoSE training: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"{int(num_params_all.item()):,} parameters | seq {pose.seq_length} -> target "
        f"{pose.target_length}, rope {rope.rope_type} x{rope.factor:g} | TP {tp} PP {pp} DP {dp} | "
        f"global batch {global_batch} ({num_microbatches} micro-batches of "
        f"{training.micro_batch_size}) | {resolve_precision(training)} | "
        f"{len(train_ds)} training samples"
    )

    stop = _StopSignal()
    saved_dir = None
    last_saved_iteration = None
    try:
        while progress.iteration < training.train_iters:
            started = time.perf_counter()
            metrics = train_step(model, optimizer, scheduler, train_iter, num_microbatches,
                                 pose.seq_length, training.micro_batch_size)
            step_time = time.perf_counter() - started
            progress.iteration += 1
            progress.consumed_train_samples += global_batch
            metrics["samples_per_step"] = global_batch
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at iteration {progress.iteration}")
            log = progress.iteration % training.log_interval == 0 or progress.iteration == 1
            reporter.step(progress.iteration, metrics, step_time, log)
            if training.eval_iters and progress.iteration % training.eval_interval == 0:
                valid_iter = build_data_iterator(valid_ds, 0, training.micro_batch_size, dp_rank,
                                                 dp, 0)
                reporter.validation(progress.iteration, evaluate(
                    model, valid_iter, training.eval_iters, num_microbatches, pose.seq_length,
                    training.micro_batch_size))
            stopping = stop.any_rank() or (
                training.exit_interval and progress.iteration % training.exit_interval == 0)
            periodic = training.save_interval and progress.iteration % training.save_interval == 0
            if training.save and (periodic or stopping):
                saved_dir = save_training_checkpoint(training.save, model.module, optimizer,
                                                     scheduler, progress, run_config)
                last_saved_iteration = progress.iteration
                reporter.write(f"saved checkpoint {saved_dir}")
            if stopping:
                reporter.write(f"stopping at iteration {progress.iteration} "
                               f"({'SIGTERM' if stop.received else '--exit-interval'})")
                break
        else:
            if training.save and last_saved_iteration != progress.iteration:
                saved_dir = save_training_checkpoint(training.save, model.module, optimizer,
                                                     scheduler, progress, run_config)
                reporter.write(f"saved checkpoint {saved_dir}")
    finally:
        stop.restore()
        reporter.close()
    runtime.destroy()
    return str(saved_dir) if saved_dir else None


def _resolve_data(data):
    """No --data-path: the bundled sample corpus (built once by rank 0, cached)."""
    if data.data_path:
        return data
    from pose_megatron.corpus import ensure_sample_corpus

    if dist.get_rank() == 0:
        corpus = ensure_sample_corpus()
    dist.barrier()
    if dist.get_rank() != 0:
        corpus = ensure_sample_corpus()
    return dataclasses.replace(data, data_path=[corpus.train_prefix],
                               tokenizer_type=corpus.tokenizer_type,
                               tokenizer_model=corpus.tokenizer_model)
